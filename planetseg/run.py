"""The ``run`` stage: a workflow, incrementally, on one Dask cluster.

A run searches the workflow's catalog, then does only the work that is new, changed, failed or
whose *fingerprint* changed, step by step:

* ``ingest``: one unit per item (appended to the cube as a new time step);
* ``segment``: one unit per time step of the cube, into a labels store of its own
  (``outputs/labels/<n>-<key>.zarr``), so a new epoch never touches the earlier ones;
* ``diff``: one unit per pair of time steps (each against the previous one, or the first);
* ``craters``: one unit per time step (``outputs/craters/<n>-<key>.parquet``).

A fingerprint is a digest of what a unit's output depends on: the step's settings, the model's
digest, the planetseg version and the fingerprints of the units it reads. A new model thus
re-segments every time step and re-derives the products, and changed crater settings re-run
only ``craters``. The **ledger** (``outputs/ledger.sqlite``) holds, per unit and step, the
fingerprint, the status (done, failed, quarantined), the attempts and the last error; a unit is
recorded done only after its stage returned, that is after its outputs are complete on disk. A
unit that fails is retried on the next run, and quarantined after
:data:`QUARANTINE_AFTER` failures. One run at a time holds ``outputs/run.lock``; each run
writes ``outputs/runs/<id>.json`` and the Dask performance report ``<id>.html``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planetseg import __version__
from planetseg.errors import PlanetsegError, RunLockedError
from planetseg.workflow import Workflow

logger = logging.getLogger(__name__)

#: Failures after which a unit is quarantined (reported, no longer retried by itself).
QUARANTINE_AFTER = 3
#: Seconds between heartbeats of the lock; a lock whose heartbeat is older than
#: :data:`STALE_AFTER` is taken over.
HEARTBEAT = 30.0
STALE_AFTER = 600.0

STEPS = ("ingest", "segment", "diff", "craters")


# --------------------------------------------------------------------------- fingerprints


def digest(*parts: Any) -> str:
    """A short SHA-256 of JSON-encodable parts (sorted keys: the same value, the same digest)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _settings(config: Any, *drop: str) -> dict[str, Any]:
    """A config's fields without the output paths (a unit's own, not part of what it means)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in {"out", *drop}}


def _file_digest(path: str | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- ledger


@dataclass
class Ledger:
    """The state of every unit of work of a workflow, in SQLite beside the outputs."""

    path: Path

    def __post_init__(self) -> None:
        self.db = sqlite3.connect(self.path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS work (step TEXT, unit TEXT, fingerprint TEXT,"
            " status TEXT, attempts INTEGER, error TEXT, updated TEXT,"
            " PRIMARY KEY (step, unit))"
        )
        self.db.commit()

    def get(self, step: str, unit: str) -> dict[str, Any] | None:
        """The row of ``unit`` in ``step``, or None."""
        row = self.db.execute(
            "SELECT fingerprint, status, attempts, error FROM work WHERE step=? AND unit=?",
            (step, unit),
        ).fetchone()
        if row is None:
            return None
        return dict(zip(("fingerprint", "status", "attempts", "error"), row, strict=True))

    def done(self, step: str, unit: str, fingerprint: str) -> None:
        """Record ``unit`` done with ``fingerprint`` (call after its outputs are durable)."""
        self._put(step, unit, fingerprint, "done", 0, None)

    def failed(self, step: str, unit: str, fingerprint: str, error: str) -> str:
        """Record a failure; return the new status (``failed`` or ``quarantined``)."""
        row = self.get(step, unit)
        attempts = (row["attempts"] if row and row["status"] != "done" else 0) + 1
        status = "quarantined" if attempts >= QUARANTINE_AFTER else "failed"
        self._put(step, unit, fingerprint, status, attempts, error)
        return status

    def _put(
        self, step: str, unit: str, fp: str, status: str, attempts: int, error: str | None
    ) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.db.execute(
            "INSERT OR REPLACE INTO work VALUES (?, ?, ?, ?, ?, ?, ?)",
            (step, unit, fp, status, attempts, error, now),
        )
        self.db.commit()

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def why(row: dict[str, Any] | None, fingerprint: str, retry_failed: bool) -> str | None:
    """Why a unit must run (new, fingerprint, failed), or None if it is done or quarantined."""
    if row is None:
        return "new"
    if row["status"] == "done":
        return None if row["fingerprint"] == fingerprint else "fingerprint"
    if row["status"] == "quarantined" and not retry_failed:
        return None if row["fingerprint"] == fingerprint else "fingerprint"
    return "failed"


# --------------------------------------------------------------------------- lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_running(job: str) -> bool:
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: do not take the lock away from a job that may be running
    return out.returncode == 0 and bool(out.stdout.strip())


def lock_is_stale(info: dict[str, Any]) -> bool:
    """Whether a lock's holder is gone: a dead pid here, a finished job, a silent heartbeat."""
    if time.time() - float(info.get("heartbeat", 0)) > STALE_AFTER:
        return True
    if info.get("slurm_job_id") and not _job_running(str(info["slurm_job_id"])):
        return True
    return info.get("host") == socket.gethostname() and not _process_alive(int(info["pid"]))


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[dict[str, Any]]:
    """Hold the workflow's lock for the block (host, pid, SLURM job id, heartbeat).

    Raises:
        RunLockedError: another run holds it and is alive.
    """
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.time(),
        "heartbeat": time.time(),
    }
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                held = {}
            if held and not lock_is_stale(held):
                job = f", SLURM job {held['slurm_job_id']}" if held.get("slurm_job_id") else ""
                raise RunLockedError(
                    f"another run of this workflow holds {path} (host {held.get('host')}, "
                    f"pid {held.get('pid')}{job}): wait for it to finish"
                ) from None
            logger.warning("taking over the stale lock %s (%s)", path, held or "unreadable")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        break
    else:  # pragma: no cover - two takeovers raced
        raise RunLockedError(f"{path} is contended by another run: try again")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            info["heartbeat"] = time.time()
            tmp = path.with_name(path.name + ".beat")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)

    beater = threading.Thread(target=beat, daemon=True, name="planetseg-run-heartbeat")
    beater.start()
    try:
        yield info
    finally:
        stop.set()
        beater.join()
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Unit:
    """One unit of work: a step applied to an item, a time step or a pair of them."""

    step: str
    unit: str
    fingerprint: str
    reason: str | None  # None: nothing to do
    args: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class RunResult:
    """What a run did, per step: units processed, skipped, failed and quarantined."""

    id: str
    record: Path
    counts: dict[str, dict[str, int]]
    errors: list[dict[str, str]]
    planned: list[Unit]
    held: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any unit failed or was quarantined in this run."""
        return bool(self.errors)


def _time_units(flow: Workflow, ledger: Ledger, cube: Path, retry: bool) -> dict[str, list]:
    """The segment, diff and craters units of the cube's time steps."""
    from planetseg.export import read_card
    from planetseg.ingest import CubePlan
    from planetseg.store import get_attr

    units: dict[str, list[Unit]] = {"segment": [], "diff": [], "craters": []}
    if flow.segment is None or not (cube / "zarr.json").exists():
        return units
    if not get_attr(cube, "planetseg:complete"):
        return units
    plan = CubePlan.from_json(get_attr(cube, "planetseg:plan"))
    card = read_card(flow.segment.model)  # its digest; segment checks the weights against it
    settings = _settings(flow.segment, "times", "cog", "model")
    seg_fp: dict[int, str] = {}
    names: dict[int, str] = {}
    for n, step in enumerate(plan.times):
        names[n] = f"{n:04d}-{step.key}"
        fp = digest("segment", settings, card["digest"], __version__, step.item_ids, step.key)
        seg_fp[n] = fp
        unit = names[n]
        units["segment"].append(
            Unit("segment", unit, fp, why(ledger.get("segment", unit), fp, retry), {"index": n})
        )
    if flow.diff is not None:
        # --block changes how the map is computed, not what it holds
        settings = _settings(flow.diff, "block")
        for n in range(1, len(plan.times)):
            first = 0 if flow.diff.compare == "baseline" else n - 1
            unit = f"{names[first]}--{names[n]}"
            fp = digest("diff", settings, seg_fp[first], seg_fp[n])
            units["diff"].append(
                Unit(
                    "diff",
                    unit,
                    fp,
                    why(ledger.get("diff", unit), fp, retry),
                    {
                        "before": names[first],
                        "after": names[n],
                        "needs": [(names[first], seg_fp[first]), (names[n], seg_fp[n])],
                    },
                )  # fmt: skip
            )
    if flow.craters is not None:
        # --block changes how the catalog is computed, not what it holds
        settings = _settings(flow.craters, "reference", "overwrite", "block")
        ref = _file_digest(flow.craters.reference)
        for n in range(len(plan.times)):
            unit = names[n]
            fp = digest("craters", settings, ref, seg_fp[n], __version__)
            units["craters"].append(
                Unit(
                    "craters",
                    unit,
                    fp,
                    why(ledger.get("craters", unit), fp, retry),
                    {"needs": [(unit, seg_fp[n])]},
                )  # fmt: skip
            )
    return units


def _ingest_units(flow: Workflow, ledger: Ledger, items: list, retry: bool) -> list[Unit]:
    if flow.ingest is None:
        return []
    settings = _settings(flow.ingest)
    units = []
    for item in items:
        fp = digest("ingest", settings, __version__, digest(item))
        row = ledger.get("ingest", item["id"])
        reason = why(row, fp, retry)
        if reason == "fingerprint" and row and row["status"] == "done":
            reason = "changed"
        units.append(Unit("ingest", item["id"], fp, reason, {"item": item}))
    return units


# --------------------------------------------------------------------------- run


@dataclass
class _Run:
    flow: Workflow
    ledger: Ledger
    client: Any
    retry: bool
    progress: Callable[[int, int], None] | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    done_units: dict[str, list[str]] = field(default_factory=dict)
    held: list[dict[str, str]] = field(default_factory=list)

    def skip(self, step: str, units: list[Unit]) -> None:
        """Count the units with nothing to do; report those quarantined earlier."""
        for unit in units:
            row = self.ledger.get(unit.step, unit.unit)
            if row is not None and row["status"] == "quarantined":
                self.count(step, "quarantined")
                self.held.append({"step": step, "unit": unit.unit, "error": row["error"]})
            else:
                self.count(step, "skipped")

    def count(self, step: str, what: str, n: int = 1) -> None:
        c = self.counts.setdefault(
            step, {"processed": 0, "skipped": 0, "failed": 0, "quarantined": 0}
        )
        c[what] += n

    def fail(self, unit: Unit, exc: BaseException) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        status = self.ledger.failed(unit.step, unit.unit, unit.fingerprint, message)
        self.count(unit.step, status)
        self.errors.append(
            {"step": unit.step, "unit": unit.unit, "status": status, "error": message}
        )
        logger.warning("%s %s %s: %s", unit.step, unit.unit, status, message)

    def ok(self, unit: Unit) -> None:
        self.ledger.done(unit.step, unit.unit, unit.fingerprint)
        self.count(unit.step, "processed")
        self.done_units.setdefault(unit.step, []).append(unit.unit)


def plan_run(flow: Workflow, *, retry_failed: bool = False) -> tuple[list[dict], list[Unit]]:
    """The catalog's items and every unit of work with why it would run; nothing is changed."""
    from planetseg.search import search

    found = search(flow.search)
    ledger_path = flow.outputs / "ledger.sqlite"
    if not ledger_path.exists():
        units = _ingest_units(flow, _EmptyLedger(), found.items, retry_failed)
        return found.items, units
    ledger = Ledger(ledger_path)
    try:
        units = _ingest_units(flow, ledger, found.items, retry_failed)
        cube = Path(flow.ingest.out) if flow.ingest else None
        if cube is not None:
            for step_units in _time_units(flow, ledger, cube, retry_failed).values():
                units += step_units
    finally:
        ledger.close()
    return found.items, units


class _EmptyLedger:
    """The ledger of a workflow that never ran (planning must not create files)."""

    def get(self, step: str, unit: str) -> None:
        return None


def run_workflow(
    flow: Workflow,
    *,
    client: Any = None,
    retry_failed: bool = False,
    on_progress: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Run the workflow's steps in order, doing only what the ledger says is missing.

    Args:
        flow: The workflow.
        client: Dask client to compute on (None: threads in this process).
        retry_failed: Retry quarantined units now.
        on_progress: Called with a line on what each step is about to do.
        progress: Tile progress of ingest and segment (``(done, total)``, as theirs).

    Raises:
        RunLockedError: another run of the workflow is alive.
        PlanetsegError: the catalog cannot be searched, or the model cannot be loaded.
    """
    from planetseg.store import create_owned_dir

    say = on_progress or (lambda _msg: None)
    create_owned_dir(flow.outputs, "run")
    runs = create_owned_dir(flow.outputs / "runs", "run")
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    with run_lock(flow.outputs / "run.lock") as lock:
        ledger = Ledger(flow.outputs / "ledger.sqlite")
        state = _Run(flow, ledger, client, retry_failed, progress)
        started = time.time()
        planned: list[Unit] = []
        try:
            with _performance_report(client, runs / f"{run_id}.html"):
                planned = _execute(state, say)
        finally:
            ledger.close()
            record = runs / f"{run_id}.json"
            _write_record(record, flow, state, planned, lock, started)
    return RunResult(run_id, record, state.counts, state.errors, planned, state.held)


@contextlib.contextmanager
def _performance_report(client: Any, path: Path) -> Iterator[None]:
    if client is None:
        yield
        return
    from distributed import performance_report

    with performance_report(filename=str(path)):
        yield


def _execute(state: _Run, say: Callable[[str], None]) -> list[Unit]:
    from planetseg.search import search

    flow = state.flow
    t0 = time.time()
    found = search(flow.search)
    state.timings["search"] = time.time() - t0
    planned = _ingest_units(flow, state.ledger, found.items, state.retry)
    if flow.ingest is not None:
        t0 = time.time()
        _run_ingest(state, planned, found, say)
        state.timings["ingest"] = time.time() - t0
    cube = Path(flow.ingest.out) if flow.ingest else None
    if cube is None:
        return planned
    # Planned once: running a step changes only its own rows, which no later step's plan reads
    # (a product unit checks its labels when it is about to run, see _inputs_done).
    by_step = _time_units(flow, state.ledger, cube, state.retry)
    for step in ("segment", "diff", "craters"):
        units = by_step[step]
        planned += units
        todo = [u for u in units if u.reason]
        state.skip(step, [u for u in units if not u.reason])
        if not todo:
            continue
        say(f"{step}: {len(todo)} to do ({_reasons(todo)})")
        t0 = time.time()
        for unit in todo:
            if not _inputs_done(state.ledger, unit):
                state.count(step, "skipped")  # its labels failed: it runs once they exist
                continue
            try:
                _RUNNERS[step](state, unit, cube)
            except PlanetsegError as exc:
                state.fail(unit, exc)
            else:
                state.ok(unit)
        state.timings[step] = time.time() - t0
    return planned


def _inputs_done(ledger: Ledger, unit: Unit) -> bool:
    """Whether the labels stores a product unit reads are segmented with today's settings."""
    for name, fp in unit.args.get("needs", ()):
        row = ledger.get("segment", name)
        if row is None or row["status"] != "done" or row["fingerprint"] != fp:
            return False
    return True


def _reasons(units: list[Unit]) -> str:
    counts: dict[str, int] = {}
    for u in units:
        counts[u.reason or "-"] = counts.get(u.reason or "-", 0) + 1
    return ", ".join(f"{n} {r}" for r, n in counts.items())


def _run_ingest(state: _Run, units: list[Unit], found: Any, say: Callable[[str], None]) -> None:
    from planetseg.ingest import check_assets, ingest, plan_ingest

    flow = state.flow
    todo = [u for u in units if u.reason]
    state.skip("ingest", [u for u in units if not u.reason])
    if not todo:
        return
    say(f"ingest: {len(todo)} item(s) to do ({_reasons(todo)})")
    changed = [u for u in todo if u.reason == "changed"]
    for unit in changed:
        state.fail(
            unit,
            PlanetsegError(
                f"item {unit.unit} changed since it was ingested: ingest cannot rewrite an "
                "ingested time step; ingest into a new cube"
            ),
        )
    todo = [u for u in todo if u.reason != "changed"]
    # Items whose assets cannot be read fail alone; the others go on.
    probe = replace(flow.ingest, fill_missing=True)
    try:
        bad = set(check_assets([u.args["item"] for u in todo],
                               plan_ingest([u.args["item"] for u in todo], probe)))  # fmt: skip
    except PlanetsegError as exc:
        for unit in todo:
            state.fail(unit, exc)
        return
    for unit in [u for u in todo if u.unit in bad]:
        state.fail(unit, PlanetsegError(f"item {unit.unit}: an asset cannot be read"))
    good = [u for u in todo if u.unit not in bad]
    if not good:
        return
    done_ids = {u.unit for u in units if not u.reason}
    items = [it for it in found.items if it["id"] in done_ids] + [u.args["item"] for u in good]
    try:
        ingest(
            items,
            flow.ingest,
            client=state.client,
            progress=state.progress,
            provenance=found.provenance(),
        )
    except PlanetsegError as exc:
        for unit in good:
            state.fail(unit, exc)
        return
    for unit in good:
        state.ok(unit)


#: Where each step's units write, under the workflow's outputs: folder and suffix.
OUTPUTS = {
    "segment": ("labels", ".zarr"),
    "diff": ("change", ""),
    "craters": ("craters", ".parquet"),
}


def output_of(flow: Workflow, step: str, unit: str) -> Path:
    """The output of ``unit`` of ``step`` (a labels store, a change folder or a catalog)."""
    folder, suffix = OUTPUTS[step]
    return flow.outputs / folder / f"{unit}{suffix}"


def _run_segment(state: _Run, unit: Unit, cube: Path) -> None:
    from planetseg.segment import segment
    from planetseg.store import create_owned_dir, owner, remove_owned

    flow = state.flow
    store = output_of(flow, "segment", unit.unit)
    create_owned_dir(store.parent, "run")
    if unit.reason == "fingerprint" and owner(store) == "segment":
        remove_owned(store, "segment")  # another model or settings: segment anew
    cog = None
    if flow.segment.cog:
        cog = str(flow.outputs / "cogs" / unit.unit)
    config = replace(flow.segment, out=str(store), times=(str(unit.args["index"]),), cog=cog)
    segment(cube, config, client=state.client, progress=state.progress)


def _run_diff(state: _Run, unit: Unit, cube: Path) -> None:
    from planetseg.config import DiffConfig
    from planetseg.diff import diff
    from planetseg.store import create_owned_dir

    flow = state.flow
    out = output_of(flow, "diff", unit.unit)
    create_owned_dir(out.parent, "run")
    config = DiffConfig(
        out=str(out),
        before="0",
        after="0",
        other=str(output_of(flow, "segment", unit.args["after"])),
        min_confidence=flow.diff.min_confidence,
        min_area_m2=flow.diff.min_area_m2,
        block=flow.diff.block,
        overwrite=True,
    )
    diff(output_of(flow, "segment", unit.args["before"]), config, client=state.client)


def _run_craters(state: _Run, unit: Unit, cube: Path) -> None:
    from planetseg.craters import craters
    from planetseg.store import create_owned_dir

    flow = state.flow
    out = output_of(flow, "craters", unit.unit)
    create_owned_dir(out.parent, "run")
    count = str(out.with_suffix(".scc")) if flow.craters.craterstats else None
    config = replace(flow.craters, out=str(out), craterstats=count, overwrite=True)
    craters(output_of(flow, "segment", unit.unit), config, client=state.client)


_RUNNERS = {"segment": _run_segment, "diff": _run_diff, "craters": _run_craters}


def _write_record(
    path: Path,
    flow: Workflow,
    state: _Run,
    planned: list[Unit],
    lock: dict[str, Any],
    started: float,
) -> None:
    record = {
        "workflow": str(flow.path),
        "name": flow.name,
        "planetseg": __version__,
        "host": lock["host"],
        "pid": lock["pid"],
        "slurm_job_id": lock["slurm_job_id"],
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "timings": {k: round(v, 3) for k, v in state.timings.items()},
        "counts": state.counts,
        "processed": state.done_units,
        "errors": state.errors,
        "quarantined": state.held,
        "units": [
            {"step": u.step, "unit": u.unit, "fingerprint": u.fingerprint, "reason": u.reason}
            for u in planned
        ],
        "settings": {
            name: _jsonable(getattr(flow, name))
            for name in ("search", "ingest", "segment", "diff", "craters", "cluster")
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def _jsonable(config: Any) -> Any:
    return None if config is None else dataclasses.asdict(config)
