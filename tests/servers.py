"""Real servers on 127.0.0.1 for tests and benchmarks.

Nothing here is a mock: each helper runs a real server on the loopback interface that the
production code paths (pystac-client, requests, GDAL's ``/vsicurl/``) talk to over TCP.

- :class:`RustacServer`: a STAC API (``rustac serve``, in-memory backend) loaded with
  collections and items.
- :class:`RangeFileServer`: static files with HTTP Range support, so GDAL reads COGs over HTTP
  exactly as it reads them from object storage; counts requests and bytes for benchmarks.
- :class:`FlakyProxy`: a reverse proxy that fails the first N (matching) requests, then forwards.
- :class:`SilentServer`: accepts TCP connections and never answers, for client timeouts.
- :func:`rebase_hrefs`: rewrite asset hrefs from a local directory to a server URL.

Every server is a context manager (or ``start()``/``stop()``), binds ``127.0.0.1`` on a free
port (or the one given), exposes ``.url`` (``http://127.0.0.1:PORT``, no trailing slash) and
stops promptly on exit. The HTTP servers run in child processes (``rustac``, or this file run
as a script), because GDAL deadlocks against a server thread of its own interpreter:
rasterio makes some GDAL calls that do HTTP while holding the GIL (observed: the directory
listing during ``rasterio.open``, which then hangs until ``GDAL_HTTP_TIMEOUT``). The Python
children also exit by themselves when the test process dies.

Clients must not route loopback through a proxy: if ``HTTP_PROXY`` is set in the environment,
set ``NO_PROXY=127.0.0.1`` too (requests and curl both honour it).
"""

from __future__ import annotations

import abc
import copy
import email.utils
import hashlib
import http.client
import http.server
import json
import mimetypes
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

Item = dict[str, Any]
Collection = dict[str, Any]

LOOPBACK = "127.0.0.1"

#: GDAL configuration for reading COGs from the loopback servers (used by the ``gdal_http_env``
#: fixture; benchmarks that measure caching should drop ``CPL_VSIL_CURL_NON_CACHED``).
GDAL_LOOPBACK_ENV: dict[str, str] = {
    # Without it every rasterio.open lists the "directory" (GET /dir/) and probes nine sidecar
    # files (x.tif.aux.xml, x.aux, x.AUX, x.tif.aux, x.tif.AUX, x.xml, x.XML, x.tif.msk,
    # x.tif.MSK) with HEAD: 10 extra requests.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # GDAL keeps a URL's header and blocks for the life of the process, answering a re-open
    # with no request at all, even after the server is gone or a new server on a reused port
    # serves other bytes under the same path. "/vsicurl/" (a prefix; GDAL splits the value on
    # ":", so a full http://host:port prefix cannot be given) turns that cache off.
    "CPL_VSIL_CURL_NON_CACHED": "/vsicurl/",
    # Retry 429/5xx quickly (a FlakyProxy in front of a RangeFileServer), and never hang.
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "0.1",
    "GDAL_HTTP_TIMEOUT": "20",
    "GDAL_HTTP_CONNECTTIMEOUT": "5",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and release it).

    Another process may take it before the caller binds it; :class:`RustacServer` retries with
    a new port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rebase_hrefs(
    items: Iterable[Item], old_prefix: str | os.PathLike[str], new_prefix: str
) -> list[Item]:
    """Deep copies of ``items`` with asset hrefs under ``old_prefix`` moved under ``new_prefix``.

    Prefixes match whole path segments (``/data/a`` does not match ``/data/ab/x.tif``); trailing
    slashes do not matter. When a filesystem path is rebased onto an ``http(s)://`` URL the
    remainder is percent-encoded (a space becomes ``%20``). Hrefs outside ``old_prefix`` and
    links are left as they are.
    """
    old = os.fspath(old_prefix).rstrip("/")
    new = new_prefix.rstrip("/")
    quote = "://" not in old and urllib.parse.urlsplit(new).scheme in ("http", "https")
    out = []
    for item in items:
        item = copy.deepcopy(item)
        for asset in item.get("assets", {}).values():
            href = asset.get("href")
            if not isinstance(href, str):
                continue
            if href == old or href.startswith(old + "/"):
                rest = href[len(old) :]
                asset["href"] = new + (urllib.parse.quote(rest, safe="/") if quote else rest)
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------
# HTTP servers in a child process
#
# RangeFileServer and FlakyProxy run in a child Python process (this file run as a script, with
# the standard library only), as independent of the client as a real object store is; see the
# module docstring for the GDAL deadlock this avoids. The parent reads the child's counters
# through CONTROL_PREFIX endpoints, which are neither logged nor forwarded.

CONTROL_PREFIX = "/__planetseg__/"


@dataclass(frozen=True)
class RequestRecord:
    """One request a server answered.

    Attributes:
        method: HTTP method.
        path: Request target (path and query) as sent.
        range: The ``Range`` header, if any.
        status: Status code answered.
        nbytes: Body bytes written (those actually sent if the client hung up).
    """

    method: str
    path: str
    range: str | None
    status: int
    nbytes: int


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # The default joins every handler thread on close; idle keep-alive connections would block.
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, state: Any) -> None:
        self.state = state
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 so that curl and requests keep connections alive, as against a real server.
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections end after this many seconds instead of holding a thread.
    timeout = 60
    server: _HTTPServer
    _status = 0
    _sent = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self._sent += len(data)

    def _send_bytes(
        self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self._write(data)

    def _send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, text.encode(), "text/plain; charset=utf-8", headers)

    def _send_json(self, status: int, doc: Any) -> None:
        self._send_bytes(status, json.dumps(doc).encode(), "application/json")

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def _handle(self) -> None:
        self._status, self._sent = 0, 0
        if self.path.startswith(CONTROL_PREFIX):
            body = self._read_body()
            name = urllib.parse.urlsplit(self.path).path[len(CONTROL_PREFIX) :]
            try:
                self._send_json(200, self.server.state.control(name, json.loads(body or b"{}")))
            except KeyError:
                self._send_text(404, f"unknown control {name!r}\n")
            return
        self.server.state.begin()
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            # The client went away mid-body (curl does this when it has read enough).
            self.close_connection = True
        finally:
            self.server.state.record(
                RequestRecord(
                    self.command, self.path, self.headers.get("Range"), self._status, self._sent
                )
            )

    def _serve(self) -> None:
        raise NotImplementedError

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle


class _State:
    """What a child server records; answered to the parent through the control endpoint."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.inflight = 0
        self.log: list[RequestRecord] = []
        self.url = ""  # the server's own URL, set once bound

    def begin(self) -> None:
        with self.lock:
            self.inflight += 1

    def record(self, record: RequestRecord) -> None:
        with self.lock:
            self.log.append(record)
            self.inflight -= 1
            self.idle.notify_all()

    def control(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            # A client may have its whole response while the handler thread has not yet
            # recorded it: let requests in flight finish so counts include them.
            self.idle.wait_for(lambda: self.inflight == 0, timeout=5)
            if name == "stats":
                return {"log": [astuple(r) for r in self.log], **self.counters()}
            if name == "reset":
                self.log.clear()
                self.reset()
                return {}
            return self.command(name, args)

    def counters(self) -> dict[str, int]:
        return {}

    def reset(self) -> None:
        pass

    def command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        raise KeyError(name)


# RangeFileServer ----------------------------------------------------------------------------

_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range_header(value: str, size: int) -> list[tuple[int, int]] | None:
    """Parse an HTTP ``Range`` header against a resource of ``size`` bytes (RFC 9110 §14.1.2).

    Returns:
        ``None`` if the header is not a valid ``bytes`` range set (the server then ignores it
        and sends the whole file), else the satisfiable ranges as inclusive ``(first, last)``
        pairs; an empty list means none is satisfiable (416).
    """
    unit, sep, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or not sep:
        return None
    out = []
    for part in spec.split(","):
        m = _RANGE_SPEC.match(part)
        if m is None:
            return None
        first, last = m.groups()
        if not first and not last:
            return None
        if not first:  # suffix range: the last n bytes
            n = int(last)
            if n > 0 and size > 0:
                out.append((max(size - n, 0), size - 1))
            continue
        a = int(first)
        b = int(last) if last else size - 1
        if last and b < a:
            return None
        if a < size:
            out.append((a, min(b, size - 1)))
    return out


class _RangeState(_State):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = Path(root).resolve()

    def resolve(self, target: str) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(target).path).lstrip("/")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path


class _RangeHandler(_Handler):
    server_version = "planetseg-test-range/1"

    def _serve(self) -> None:
        self._read_body()
        if self.command not in ("GET", "HEAD"):
            self._send_text(405, f"{self.command} not allowed\n", {"Allow": "GET, HEAD"})
            return
        path = self.server.state.resolve(self.path)
        if path is None:
            self._send_text(404, f"not found: {self.path}\n")
            return
        st = path.stat()
        size = st.st_size
        range_header = self.headers.get("Range")
        ranges = parse_range_header(range_header, size) if range_header else None
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        common = {
            "Accept-Ranges": "bytes",
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "ETag": '"' + hashlib.md5(f"{st.st_mtime_ns}-{size}".encode()).hexdigest() + '"',
        }
        if ranges == []:
            self._send_text(
                416, "range not satisfiable\n", {**common, "Content-Range": f"bytes */{size}"}
            )
        elif ranges is None:
            self._head(200, ctype, size, common)
            self._copy(path, [(0, size - 1)] if size else [])
        elif len(ranges) == 1:
            a, b = ranges[0]
            self._head(206, ctype, b - a + 1, {**common, "Content-Range": f"bytes {a}-{b}/{size}"})
            self._copy(path, ranges)
        else:
            self._multipart(path, ranges, size, ctype, common)

    def _head(self, status: int, ctype: str, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _copy(self, path: Path, ranges: list[tuple[int, int]]) -> None:
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            for a, b in ranges:
                f.seek(a)
                left = b - a + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    self._write(chunk)
                    left -= len(chunk)

    def _multipart(
        self,
        path: Path,
        ranges: list[tuple[int, int]],
        size: int,
        ctype: str,
        headers: dict[str, str],
    ) -> None:
        boundary = "planetseg" + hashlib.md5(repr(ranges).encode()).hexdigest()[:16]
        parts = []
        with path.open("rb") as f:
            for a, b in ranges:
                f.seek(a)
                head = f"--{boundary}\r\nContent-Type: {ctype}\r\n"
                head += f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n"
                parts.append(head.encode() + f.read(b - a + 1) + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        self._send_bytes(206, data, f"multipart/byteranges; boundary={boundary}", headers)


# FlakyProxy ---------------------------------------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


class _ProxyState(_State):
    def __init__(
        self,
        upstream_url: str,
        fail_first: int,
        status: int,
        path: str | None,
        retry_after: int | None,
        timeout: float,
    ) -> None:
        super().__init__()
        up = urllib.parse.urlsplit(upstream_url)
        self.host, self.port = up.hostname or LOOPBACK, up.port or 80
        self.prefix = up.path.rstrip("/")
        self.upstream_base = f"http://{up.netloc}{self.prefix}"
        self.fail_first, self.remaining = fail_first, fail_first
        self.status, self.path, self.retry_after, self.timeout = status, path, retry_after, timeout
        self.failed = self.forwarded = self.upstream_errors = 0

    def take_failure(self, path: str) -> int | None:
        with self.lock:
            if self.remaining <= 0 or (self.path is not None and not path.startswith(self.path)):
                return None
            self.remaining -= 1
            self.failed += 1
            return self.fail_first - self.remaining

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def counters(self) -> dict[str, int]:
        return {
            "failed": self.failed,
            "forwarded": self.forwarded,
            "upstream_errors": self.upstream_errors,
        }

    def reset(self) -> None:
        self.failed = self.forwarded = self.upstream_errors = 0

    def command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name != "fail-next":
            raise KeyError(name)
        self.fail_first = self.remaining = int(args["n"])
        return {}


class _ProxyHandler(_Handler):
    server_version = "planetseg-test-proxy/1"

    def _serve(self) -> None:
        state: _ProxyState = self.server.state
        body = self._read_body()
        n = state.take_failure(urllib.parse.urlsplit(self.path).path)
        if n is not None:
            doc = {
                "code": "InjectedFailure",
                "description": f"FlakyProxy: injected HTTP {state.status} "
                f"(failure {n} of {state.fail_first})",
            }
            extra = {"Retry-After": str(state.retry_after)} if state.retry_after is not None else {}
            self._send_bytes(state.status, json.dumps(doc).encode(), "application/json", extra)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        for k in ("Host", "Accept-Encoding", "Content-Length"):
            # Accept-Encoding dropped: an identity body is needed to rewrite hrefs in it.
            headers.pop(k, None)
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(state.host, state.port, timeout=state.timeout)
        try:
            conn.request(self.command, state.prefix + self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            state.count("upstream_errors")
            self._send_text(502, f"FlakyProxy: upstream {state.upstream_base} failed: {exc}\n")
            return
        finally:
            conn.close()
        encoded = resp.getheader("Content-Encoding", "identity").lower() != "identity"
        if not encoded and "json" in resp.getheader("Content-Type", ""):
            data = data.replace(state.upstream_base.encode(), state.url.encode())
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in _HOP_BY_HOP or lk in ("content-length", "server", "date"):
                continue
            if lk == "location":
                v = v.replace(state.upstream_base, state.url)
            self.send_header(k, v)
        if self.command == "HEAD":
            if resp.getheader("Content-Length") is not None:
                self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self._write(data)
        state.count("forwarded")


_KINDS: dict[str, tuple[type[_State], type[_Handler]]] = {
    "range": (_RangeState, _RangeHandler),
    "proxy": (_ProxyState, _ProxyHandler),
}


def _child_main(kind: str, config_json: str) -> None:
    """Entry point of the child process: serve until stdin closes (the parent stopped or died)."""
    config = json.loads(config_json)
    port = config.pop("port")
    state_cls, handler = _KINDS[kind]
    state = state_cls(**config)
    httpd = _HTTPServer((LOOPBACK, port), handler, state)
    state.url = f"http://{LOOPBACK}:{httpd.server_address[1]}"

    def watch_parent() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    print(f"PORT {httpd.server_address[1]}", flush=True)
    httpd.serve_forever(poll_interval=0.5)


class _Service(abc.ABC):
    """Context-manager protocol shared by the servers: ``with X(...) as x`` starts and stops."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Start serving; return self."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving and release the port."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ChildHTTPService(_Service):
    """Parent side of a server running in a child process (see the note above)."""

    _kind: str

    def __init__(self, config: dict[str, Any], *, port: int, startup_timeout: float) -> None:
        self._config = {**config, "port": port}
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def port(self) -> int:
        """The bound port (raises if the server is not running)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running: use it as a context manager")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        """Start the child process and wait until it listens; returns ``self``."""
        if self._proc is not None:
            return self
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            # -I: stdlib only, and the tests/ directory must not shadow a module.
            [sys.executable, "-I", __file__, self._kind, json.dumps(self._config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + self.startup_timeout
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if sel.select(timeout=0.05):
                    chunk = os.read(proc.stdout.fileno(), 64)
                    if not chunk:
                        break
                    line += chunk
        proc.stdout.close()
        if not line.startswith(b"PORT "):
            _terminate(proc)
            stderr.seek(0)
            err = stderr.read().decode(errors="replace").strip()
            stderr.close()
            raise RuntimeError(f"{type(self).__name__} did not start: {err or 'no output'}")
        stderr.close()
        self._proc = proc
        self._port = int(line.split()[1])
        return self

    def stop(self) -> None:
        """Stop the child (it exits when its stdin closes) and release the port."""
        proc, self._proc = self._proc, None
        self._port = None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _terminate(proc)

    def _control(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + CONTROL_PREFIX + name,
            data=json.dumps(args or {}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with self._opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    @property
    def log(self) -> list[RequestRecord]:
        """The requests answered so far, oldest first (control requests excluded)."""
        return [RequestRecord(*r) for r in self._control("stats")["log"]]

    @property
    def requests(self) -> int:
        """Number of requests answered."""
        return len(self._control("stats")["log"])

    def reset_stats(self) -> None:
        """Forget the requests recorded so far and zero the counters."""
        self._control("reset")


class RangeFileServer(_ChildHTTPService):
    """Serve the files under ``root`` over HTTP/1.1 with byte-range support.

    Behaviour (what GDAL's ``/vsicurl/`` and object stores rely on):

    - ``GET``/``HEAD`` of a file: ``200`` with ``Content-Length``, ``Accept-Ranges: bytes``,
      ``Last-Modified``, ``ETag`` and a ``Content-Type`` guessed from the suffix.
    - ``Range: bytes=a-b``, ``bytes=a-`` and ``bytes=-n``: ``206`` with ``Content-Range``;
      several ranges give a ``multipart/byteranges`` body; a range set none of whose ranges is
      satisfiable gives ``416`` with ``Content-Range: bytes */SIZE``; a malformed header is
      ignored (``200``, whole file), as RFC 9110 prescribes.
    - Missing files, directories and paths escaping ``root`` give ``404`` (no listings); other
      methods ``405``. Keep-alive connections; nothing is logged.

    The server runs in a child process (GDAL deadlocks against an in-process server). Every
    request is recorded: :attr:`log`, :attr:`requests`, :attr:`bytes_sent` (each a round trip
    to the child); :meth:`reset_stats` between benchmark phases.

    Args:
        root: Directory to serve.
        port: Port to bind (default: a free one, chosen by the child, so no race).
        startup_timeout: Seconds to wait for the child to listen.
    """

    _kind = "range"

    def __init__(
        self, root: str | os.PathLike[str], *, port: int = 0, startup_timeout: float = 20.0
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"RangeFileServer root {self.root} is not a directory")
        super().__init__({"root": str(self.root)}, port=port, startup_timeout=startup_timeout)

    def url_for(self, path: str | os.PathLike[str]) -> str:
        """The URL of ``path`` (absolute, or relative to :attr:`root`)."""
        p = Path(path)
        rel = (p.resolve() if p.is_absolute() else self.root / p).relative_to(self.root)
        return f"{self.url}/{urllib.parse.quote(rel.as_posix())}"

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent in all responses so far."""
        return sum(r.nbytes for r in self.log)


class FlakyProxy(_ChildHTTPService):
    """A reverse proxy to ``upstream_url`` that fails the first ``fail_first`` requests.

    The first ``fail_first`` requests (only those whose URL path starts with ``path``, if given)
    are answered with ``status`` and a small JSON error body (plus ``Retry-After`` when
    ``retry_after`` is set); every other request is forwarded to the upstream with its method,
    headers and body. In forwarded JSON responses (``application/json``,
    ``application/geo+json``, ...) and in ``Location`` headers the upstream's base URL is
    replaced by the proxy's, so that links a client follows (STAC ``next`` pages, ``self``,
    ``root``) come back through the proxy. An unreachable upstream gives ``502``.

    Counters (each a round trip to the child process the proxy runs in): :attr:`failed`
    (injected failures), :attr:`forwarded` (answered by the upstream), :attr:`upstream_errors`
    (502s), :attr:`log` (every request with its status). :meth:`fail_next` re-arms failures.

    Args:
        upstream_url: Base URL of the real server, e.g. ``RustacServer.url``; a path in it
            (``http://host:port/stac``) is prepended to every forwarded path.
        fail_first: How many (matching) requests to fail.
        status: Status code of the injected failures.
        path: Only requests whose path starts with this (e.g. ``"/search"``) can fail.
        retry_after: Value of a ``Retry-After`` header on failures (seconds), if any.
        timeout: Seconds to wait for the upstream.
        port: Port to bind (default: a free one).
        startup_timeout: Seconds to wait for the child to listen.
    """

    _kind = "proxy"

    def __init__(
        self,
        upstream_url: str,
        *,
        fail_first: int = 0,
        status: int = 503,
        path: str | None = None,
        retry_after: int | None = None,
        timeout: float = 30.0,
        port: int = 0,
        startup_timeout: float = 20.0,
    ) -> None:
        up = urllib.parse.urlsplit(upstream_url)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"FlakyProxy needs an http:// upstream URL, got {upstream_url!r}")
        self.upstream_url = upstream_url
        config = {
            "upstream_url": upstream_url,
            "fail_first": fail_first,
            "status": status,
            "path": path,
            "retry_after": retry_after,
            "timeout": timeout,
        }
        super().__init__(config, port=port, startup_timeout=startup_timeout)

    def fail_next(self, n: int) -> None:
        """Fail the next ``n`` matching requests (counters are kept)."""
        self._control("fail-next", {"n": n})

    @property
    def failed(self) -> int:
        """Requests answered with the injected failure."""
        return self._control("stats")["failed"]

    @property
    def forwarded(self) -> int:
        """Requests the upstream answered (whatever its status)."""
        return self._control("stats")["forwarded"]

    @property
    def upstream_errors(self) -> int:
        """Requests answered 502 because the upstream could not be reached."""
        return self._control("stats")["upstream_errors"]


# --------------------------------------------------------------------------------------------
# SilentServer


class SilentServer(_Service):
    """Accepts TCP connections on 127.0.0.1, reads what clients send, and never answers.

    A client's *read* timeout fires (the TCP connect succeeds at once). On exit every accepted
    connection is closed and the port released within ~0.1 s.

    Attributes:
        connections: Number of connections accepted so far.
    """

    def __init__(self, *, port: int = 0) -> None:
        self._port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connections = 0

    @property
    def port(self) -> int:
        """The bound port."""
        if self._sock is None:
            raise RuntimeError("SilentServer is not running: use it as a context manager")
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        """Listen and accept in a daemon thread; returns ``self``."""
        if self._sock is not None:
            return self
        self._stop.clear()
        self._sock = socket.create_server((LOOPBACK, self._port))
        self._sock.setblocking(False)
        self._thread = threading.Thread(
            target=self._run, args=(self._sock,), name=f"SilentServer:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, listener: socket.socket) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            conns: list[socket.socket] = []
            try:
                while not self._stop.is_set():
                    for key, _ in sel.select(timeout=0.05):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is listener:
                            try:
                                conn, _addr = listener.accept()
                            except BlockingIOError:
                                continue
                            conn.setblocking(False)
                            conns.append(conn)
                            sel.register(conn, selectors.EVENT_READ)
                            self.connections += 1
                        else:
                            try:
                                data = sock.recv(65536)
                            except BlockingIOError:
                                continue
                            except ConnectionError:
                                data = b""
                            if not data:  # the client closed (or reset) its end
                                sel.unregister(sock)
                                sock.close()
                                conns.remove(sock)
            finally:
                for conn in conns:
                    conn.close()

    def stop(self) -> None:
        """Close every connection and the listening socket."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        sock.close()


# --------------------------------------------------------------------------------------------
# RustacServer


def collection_for(
    collection_id: str,
    items: Iterable[Item] = (),
    *,
    description: str | None = None,
    license: str = "proprietary",  # noqa: A002 - the STAC field's name
    extra: dict[str, Any] | None = None,
) -> Collection:
    """A minimal valid STAC collection whose extent covers ``items``.

    The spatial extent is the union of the items' ``bbox`` (the whole globe if there are none),
    the temporal extent spans their ``datetime``/``start_datetime``/``end_datetime``.
    """
    items = list(items)
    boxes = [it["bbox"] for it in items if it.get("bbox")]
    if boxes:
        n = len(boxes[0]) // 2
        bbox = [min(b[i] for b in boxes) for i in range(n)] + [
            max(b[n + i] for b in boxes) for i in range(n)
        ]
    else:
        bbox = [-180.0, -90.0, 180.0, 90.0]
    times = sorted(
        t
        for it in items
        for k in ("datetime", "start_datetime", "end_datetime")
        if (t := it.get("properties", {}).get(k))
    )
    interval = [times[0], times[-1]] if times else [None, None]
    coll: Collection = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": collection_id,
        "description": description or f"planetseg test collection {collection_id}",
        "license": license,
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}},
        "links": [],
    }
    coll.update(extra or {})
    return coll


class RustacServer(_Service):
    """A real STAC API: ``rustac serve`` (in-memory backend) loaded with collections and items.

    Each ``(collection, items)`` pair is written to ``directory`` (a temporary one by default)
    as ``NN-collection.json`` and ``NN-items.ndjson``, then served with
    ``rustac serve --addr 127.0.0.1:PORT 00-collection.json 00-items.ndjson ...``. Items without
    a ``collection`` field get their pair's id; an item naming another collection is refused.
    The server is up when ``GET /`` answers 200; if it exits or does not answer within
    ``startup_timeout`` s, :class:`RuntimeError` carries rustac's stderr.

    Behaviour of ``rustac serve`` (rustac CLI 0.2.18, checked with pystac-client 0.9.1):

    - Search with ``POST /search`` (pystac-client's default) works with ``collections``,
      ``ids``, ``bbox``, ``intersects`` and ``datetime`` (instants, closed and open-ended
      intervals; items with ``start_datetime``/``end_datetime`` match by overlap).
    - ``GET /search`` fails with ``500 unsupported value`` as soon as ``collections`` or
      ``bbox`` is in the query string (``limit``, ``ids``, ``datetime`` alone work), so never
      use ``method="GET"``. ``GET /collections/{id}/items`` with ``bbox`` fails the same way;
      without it (``limit``/paging only) it works, so ``Collection.get_items()`` works.
    - Paging: default page size 10; no maximum (``limit=100000`` returns everything in one
      page). A full page has a ``next`` link (POST with the body and a ``skip``; GET pages use
      ``?limit=&skip=``), the last page has none, also when the total is a multiple of the
      limit (no trailing empty page). ``limit=0`` answers an empty page *with* a ``next`` link:
      a client that follows it loops forever.
    - Responses have neither ``numberMatched`` nor ``context``: pystac-client's
      ``search.matched()`` returns ``None`` and warns.
    - The conformance classes are core, features, collections and item-search only: ``sortby``
      and cql2-json ``filter`` are ignored (all items come back, in server order) and
      pystac-client warns ``DoesNotConformTo``; ``query`` and cql2-text ``filter`` return no
      items at all.
    - Order: within a collection, insertion order; across collections the order changes from
      one server start to the next. Tests must compare sorted ids.
    - Items naming a collection that was not loaded, or none, are still served: rustac creates
      the collection (``default-collection-id`` for items without one). A JSON document without
      ``"type": "Collection"`` is read as an item (and refused: "item without a collection").
    - An item with neither ``datetime`` nor ``start_datetime``/``end_datetime`` is served with
      ``datetime: null`` and matches every ``datetime`` query.
    - Duplicate item ids are kept and both served. An unknown collection in a search gives an
      empty 200, ``GET /collections/{unknown}`` gives 404.
    - Startup takes ~0.3 s. On a port already in use rustac exits with ``Address already in
      use``, but only after ``GET /`` may have reached the other server; so the port is checked
      here first (and another free one tried, unless ``port`` was given).

    Args:
        collections: ``(collection dict, items)`` pairs; see :func:`collection_for`.
        directory: Where to write the files (kept after exit); default a temporary directory
            removed on exit.
        port: Port to serve on (default: a free one).
        startup_timeout: Seconds to wait for ``GET /`` to answer 200.
        executable: The rustac CLI.
    """

    def __init__(
        self,
        collections: Sequence[tuple[Collection, Iterable[Item]]],
        *,
        directory: str | os.PathLike[str] | None = None,
        port: int | None = None,
        startup_timeout: float = 30.0,
        executable: str = "rustac",
    ) -> None:
        self._pairs = [(dict(c), list(items)) for c, items in collections]
        if not self._pairs:
            raise ValueError("RustacServer needs at least one (collection, items) pair")
        self._directory = Path(directory) if directory is not None else None
        self._port = port
        self.startup_timeout = startup_timeout
        self.executable = executable
        self.process: subprocess.Popen[bytes] | None = None
        self.paths: list[Path] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._bound_port: int | None = None

    @property
    def collection_ids(self) -> list[str]:
        """Ids of the collections served, in the order given."""
        return [c["id"] for c, _ in self._pairs]

    @property
    def port(self) -> int:
        """The port served on."""
        if self._bound_port is None:
            raise RuntimeError("RustacServer is not running: use it as a context manager")
        return self._bound_port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash), the API's landing page."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def directory(self) -> Path:
        """Directory holding the collection and items files."""
        if self._directory is None:
            raise RuntimeError("RustacServer is not running: use it as a context manager")
        return self._directory

    def _write(self) -> list[Path]:
        # Imported here: this file also runs as a stdlib-only script (the HTTP servers' child).
        from planetseg.items import write_items

        paths = []
        for i, (coll, items) in enumerate(self._pairs):
            cid = coll.get("id")
            if not isinstance(cid, str) or not cid:
                raise ValueError(f"collection {i} has no string 'id'")
            fixed = []
            for item in items:
                item = copy.deepcopy(item)
                other = item.setdefault("collection", cid)
                if other != cid:
                    raise ValueError(
                        f"item {item.get('id')!r} names collection {other!r} but was passed "
                        f"with collection {cid!r}"
                    )
                fixed.append(item)
            cpath = self.directory / f"{i:02d}-collection.json"
            cpath.write_text(json.dumps(coll))
            paths += [cpath, write_items(fixed, self.directory / f"{i:02d}-items.ndjson")]
        return paths

    def start(self) -> Self:
        """Write the files, start rustac and wait until it answers; returns ``self``."""
        if self.process is not None:
            return self
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(
                f"{self.executable!r} not found on PATH: install the test extra "
                "(pip install -e '.[test]') which provides the rustac CLI"
            )
        if self._directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rustac-")
            self._directory = Path(self._tmp.name)
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self.paths = self._write()
            attempts = 1 if self._port is not None else 3
            for attempt in range(attempts):
                port = self._port if self._port is not None else free_port()
                try:
                    self._launch(exe, port)
                    return self
                except _PortTaken:
                    if attempt == attempts - 1:
                        raise RuntimeError(f"rustac serve: port {port} already in use") from None
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def _launch(self, exe: str, port: int) -> None:
        # Checked first: GET / on a port another server holds would answer 200 before rustac
        # fails to bind and exits.
        try:
            with socket.create_server((LOOPBACK, port)):
                pass
        except OSError:
            raise _PortTaken from None
        logpath = self.directory / "rustac-serve.log"
        with logpath.open("wb") as logfile:
            proc = subprocess.Popen(
                [exe, "serve", "--addr", f"{LOOPBACK}:{port}", *map(str, self.paths)],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                out = logpath.read_text(errors="replace").strip()
                if "Address already in use" in out:
                    raise _PortTaken
                raise RuntimeError(f"rustac serve exited with status {code} at startup:\n{out}")
            try:
                with opener.open(f"http://{LOOPBACK}:{port}/", timeout=1) as resp:
                    if resp.status == 200 and proc.poll() is None:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                _terminate(proc)
                out = logpath.read_text(errors="replace").strip()
                raise RuntimeError(
                    f"rustac serve did not answer GET / within {self.startup_timeout} s:\n{out}"
                )
            time.sleep(0.05)
        self.process = proc
        self._bound_port = port

    def stop(self) -> None:
        """Terminate rustac (kill it if it does not exit within 5 s) and clean up."""
        proc, self.process = self.process, None
        if proc is not None:
            _terminate(proc)
        self._bound_port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._directory = None


class _PortTaken(Exception):
    pass


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
