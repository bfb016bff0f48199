"""What every zarr store planetseg writes has in common: grid metadata, attributes, progress.

A stage that writes a store (``ingest``, ``segment``) creates it from metadata first, writes
chunks in tasks that each touch a *marker* in ``<store>.progress/`` after their chunks, and
sets ``planetseg:complete`` only at the end, removing the markers. A killed run therefore
leaves a store that reads as unfinished, and a re-run redoes exactly the unmarked work.

Ownership: planetseg deletes, replaces or resumes only what it wrote itself. Every folder it
creates records the stage that made it: a store in its root attributes (``planetseg:stage``),
any other folder (``<store>.progress``, a product folder, a COG folder, the synthetic world, a
training run, the demo folder) in a small ``.planetseg`` file. Every stage calls
:func:`prepare_output` on its outputs before it writes anything, creates folders with
:func:`create_owned_dir` and removes them only with :func:`remove_owned`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from planetseg import __version__
from planetseg.bodies import parse_crs
from planetseg.errors import OutputPathError, StoreCorruptError

T = TypeVar("T")

PROGRESS_SUFFIX = ".progress"
#: The file that marks a plain folder as planetseg's: JSON with the stage and the version.
MARKER = ".planetseg"
#: The root attribute that names the stage that wrote a store.
STAGE_ATTR = "planetseg:stage"
#: Stores written before ``planetseg:stage`` existed, known by their stage's own attribute.
_LEGACY_STORE_ATTRS = {"planetseg:plan": "ingest", "planetseg:segment": "segment"}
#: Folders written before markers existed, known by the file only their stage writes there
#: (a training run's checkpoint), so that an earlier version's run still resumes.
_LEGACY_FOLDER_FILES = {"checkpoint.pt": "train"}


def progress_dir(store: Path) -> Path:
    """Where task markers of an unfinished run live: beside the store, removed on completion."""
    return store.with_name(store.name + PROGRESS_SUFFIX)


def done_markers(store: Path) -> set[str]:
    """Names of the markers an unfinished run left (empty if none)."""
    marks = progress_dir(store)
    return {p.name for p in marks.iterdir() if p.name != MARKER} if marks.exists() else set()


def set_attrs(store: Path, **attrs: Any) -> None:
    """Update the root group's attributes."""
    import zarr

    zarr.open_group(str(store), mode="r+").attrs.update(attrs)


def get_attr(store: Path, name: str, default: Any = None) -> Any:
    """One attribute of the root group (``default`` if it is absent)."""
    import zarr

    return zarr.open_group(str(store), mode="r").attrs.get(name, default)


def drop_partial_writes(store: Path) -> None:
    """Remove the temporary files a killed run left mid-write.

    zarr writes each chunk to ``<chunk>.<uuid>.partial`` and renames it into place; a kill
    between the two leaves the temporary behind. Its task has no marker, so it is redone;
    the stray file only has to go.
    """
    for path in store.rglob("*.partial"):
        path.unlink(missing_ok=True)


def cf_attrs(crs_wkt: str, transform: tuple[float, ...]) -> dict[str, Any]:
    """CF ``grid_mapping`` attributes (WKT2 included, so IAU CRSs survive) and GDAL's transform."""
    crs = parse_crs(crs_wkt)
    attrs = dict(crs.to_cf())
    attrs["crs_wkt"] = crs.to_wkt()
    attrs["spatial_ref"] = crs.to_wkt()  # GDAL's name for the same thing
    a, b, c, d, e, f = transform
    attrs["GeoTransform"] = " ".join(str(v) for v in (c, a, b, f, d, e))
    return attrs


def transform_from_cf(attrs: dict[str, Any]) -> tuple[float, ...]:
    """The affine ``(a, b, c, d, e, f)`` of a ``spatial_ref`` variable's ``GeoTransform``."""
    c, a, b, f, d, e = (float(v) for v in str(attrs["GeoTransform"]).split())
    return (a, b, c, d, e, f)


def pixel_centres(transform: tuple[float, ...], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """``y`` and ``x`` coordinates of the pixel centres of a north-up grid."""
    a, _, c, _, e, f = transform
    h, w = shape
    return {"y": f + e * (np.arange(h) + 0.5), "x": c + a * (np.arange(w) + 0.5)}


# --------------------------------------------------------------------------- integrity

#: Attribute of a store whose writer wrote every chunk (all-fill ones too), so that a missing
#: chunk file is lost data, never an empty tile.
EVERY_CHUNK = "planetseg:every_chunk"


def open_for_writing(store: str | Path, name: str) -> Any:
    """Array ``name`` of ``store`` opened to write every chunk, all-fill ones included.

    zarr skips chunks equal to the fill value by default; then a missing chunk could be an
    empty tile or lost data. planetseg writes them all, so a reader can tell.
    """
    import zarr

    array = zarr.open_array(str(store), path=name, mode="r+")
    return array.with_config({"write_empty_chunks": True})


def consolidate(store: str | Path) -> None:
    """Write the store's consolidated metadata (after it was created, appended or finished).

    ``xr.open_zarr(store)`` then opens it without a warning. The root's attributes are not
    part of it (they stay authoritative in the root's ``zarr.json``), so setting them later
    does not make it stale; a change of shape (an append) needs a new call.
    """
    import zarr

    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is not in the v3 spec yet; xarray reads it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(store))


Selection = tuple[int | slice, ...]


def _chunk_ranges(array: Any, selection: Selection) -> list[range]:
    ranges = []
    full = (*selection, *(slice(None),) * (array.ndim - len(selection)))
    for sel, size, chunk in zip(full, array.shape, array.chunks, strict=True):
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(size)
            ranges.append(range(start // chunk, (stop - 1) // chunk + 1) if stop > start else [])
        else:
            index = sel % size
            ranges.append(range(index // chunk, index // chunk + 1))
    return ranges


def chunk_keys(array: Any, selection: Selection = ()) -> list[str]:
    """Keys (``c/0/0/1/2``) of the chunks of a zarr ``array`` that ``selection`` touches.

    ``selection`` holds an integer or a slice per leading dimension (the rest: all).
    """
    encode = array.metadata.encode_chunk_key
    return [encode(coords) for coords in itertools.product(*_chunk_ranges(array, selection))]


def _repair_hint(store: Path, attrs: dict[str, Any]) -> str:
    stage = "segment" if attrs.get("planetseg:product") == "labels" else "ingest"
    return f"re-run the {stage} that wrote {store} (same --out) to rewrite it"


@dataclass(frozen=True)
class ChunkGuard:
    """Checks what a reader reads of a store marked complete (picklable, for tasks).

    A read costs one ``stat`` per chunk it touches, in the task that reads it: opening a
    store never lists it. A missing chunk (in a store whose writer wrote every chunk) or a
    chunk that does not decode (truncated: a zstd or blosc error) becomes a
    :class:`~planetseg.errors.StoreCorruptError` naming the store, the array and the chunk,
    instead of zarr's fill value or a codec's traceback.

    Attributes:
        store: The store's path.
        every_chunk: Whether its writer wrote every chunk (else only decoding is checked).
        hint: How to repair, for the message.
    """

    store: str
    every_chunk: bool
    hint: str

    @classmethod
    def of(cls, store: str | Path, attrs: dict[str, Any]) -> ChunkGuard:
        """The guard of ``store``, whose root attributes are ``attrs``."""
        store = Path(store)
        return cls(str(store), bool(attrs.get(EVERY_CHUNK)), _repair_hint(store, attrs))

    def check(self, name: str, selection: Selection = (), array: Any = None) -> None:
        """Stat the chunks of array ``name`` (opened here unless given) that ``selection`` touches.

        Raises:
            StoreCorruptError: one is missing.
        """
        if not self.every_chunk:
            return
        if array is None:
            import zarr

            array = zarr.open_array(self.store, path=name, mode="r")
        root = Path(self.store) / name
        for key in chunk_keys(array, selection):
            if not (root / key).is_file():
                raise StoreCorruptError(
                    f"store {self.store} is marked complete but chunk {name}/{key} is "
                    f"missing: {self.hint}"
                )

    def read(
        self,
        name: str,
        selection: Selection = (),
        read: Callable[[], T] | None = None,
        *,
        array: Any = None,
    ) -> T:
        """``read()`` (default: zarr's ``array[selection]``) after :meth:`check`.

        ``array`` is the zarr array ``name`` when the caller has it open already (else it is
        opened here).

        Raises:
            StoreCorruptError: a chunk is missing, or does not decode.
        """
        if array is None:
            import zarr

            array = zarr.open_array(self.store, path=name, mode="r")
        self.check(name, selection, array)
        try:
            return read() if read is not None else array[selection]
        except (RuntimeError, ValueError) as exc:
            # Codecs raise plain RuntimeErrors (zstd, blosc) or ValueErrors: find the chunk.
            for key, coords in zip(
                chunk_keys(array, selection),
                itertools.product(*_chunk_ranges(array, selection)),
                strict=True,
            ):
                try:
                    array.get_block_selection(coords)
                except (RuntimeError, ValueError) as chunk_exc:
                    why = str(chunk_exc).splitlines()[0] if str(chunk_exc) else "unreadable"
                    raise StoreCorruptError(
                        f"store {self.store} is marked complete but chunk {name}/{key} cannot "
                        f"be decoded ({why}): delete {Path(self.store) / name / key} and "
                        f"{self.hint}"
                    ) from exc
            raise


def missing_chunks(store: str | Path, name: str) -> list[tuple[int, ...]]:
    """Chunk coordinates of array ``name`` that have no chunk file (lists the array's folder).

    A full listing, for the writers' repair and ``planetseg info --verify``; readers use
    :class:`ChunkGuard`, which costs a stat per chunk read instead.
    """
    import zarr

    array = zarr.open_array(str(store), path=name, mode="r")
    root = Path(store) / name
    present = {
        os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
        for folder, _, files in os.walk(root)
        for f in files
    }
    encode = array.metadata.encode_chunk_key
    grid = [range(n) for n in array.cdata_shape]
    return [c for c in itertools.product(*grid) if encode(c) not in present]


# --------------------------------------------------------------------------- ownership


def owner(path: Path) -> str | None:
    """The planetseg stage that wrote the folder ``path``; None if absent, a file, or foreign."""
    path = Path(path)
    if not path.is_dir():
        return None
    marker, root = path / MARKER, path / "zarr.json"
    try:
        if marker.is_file():
            stage = json.loads(marker.read_text()).get("stage")
            return stage if isinstance(stage, str) else None
        if root.is_file():  # zarr v3 keeps the root group's attributes in zarr.json
            attrs = json.loads(root.read_text()).get("attributes") or {}
            if isinstance(attrs.get(STAGE_ATTR), str):
                return attrs[STAGE_ATTR]
            return next((s for a, s in _LEGACY_STORE_ATTRS.items() if a in attrs), None)
    except (OSError, ValueError, AttributeError):
        return None
    return next((s for f, s in _LEGACY_FOLDER_FILES.items() if (path / f).is_file()), None)


def mark_owned(folder: Path, stage: str) -> None:
    """Write ``folder``'s marker (atomically: a kill leaves no half-written marker)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{MARKER}.", suffix=".part", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump({"stage": stage, "planetseg": __version__}, f)
    os.replace(tmp, folder / MARKER)


def create_owned_dir(path: Path, stage: str) -> Path:
    """Create the folder ``path`` marked as ``stage``'s; keep it if it already is.

    A new folder is made and marked under a temporary name, then renamed into place, so a kill
    never leaves an unmarked folder under the real name; an empty folder is marked where it is.

    Raises:
        OutputPathError: ``path`` holds files that ``stage`` did not write, or is not writable.
    """
    path = Path(path)
    if owner(path) == stage:
        return path
    if path.is_dir() and any(path.iterdir()):
        raise OutputPathError(f"{path} exists and was not written by planetseg {stage}")
    try:
        if path.is_dir():
            mark_owned(path, stage)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the mode mkdir would
        try:
            mark_owned(tmp, stage)
            tmp.rename(path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if owner(path) != stage:  # not another process of the same run (DDP ranks)
                raise
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise OutputPathError(f"{path} cannot be created: {path.parent} is not writable") from exc
    return path


def remove_owned(path: Path, stage: str) -> None:
    """Remove the folder ``path`` (if present) only if ``stage`` wrote it.

    Raises:
        OutputPathError: ``path`` is not ``stage``'s: it is left as it is.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or owner(path) != stage:
        raise OutputPathError(
            f"{path} was not written by planetseg {stage}: it is left alone; move it away"
        )
    shutil.rmtree(path)


@dataclass(frozen=True)
class Output:
    """An output path checked by :func:`prepare_output`.

    Attributes:
        path: The path as given.
        stage: The stage that writes it.
        earlier: It holds an earlier output of ``stage`` (to resume, or to replace).
        existed: The path existed before this run (an empty folder counts).
    """

    path: Path
    stage: str
    earlier: bool
    existed: bool

    def discard(self) -> None:
        """Remove what this run wrote at ``path`` after a failed first write.

        An earlier output is kept, and so is a folder that was there before (emptied again).
        """
        if self.earlier or not self.path.exists():
            return
        if not self.path.is_dir():
            self.path.unlink()
        elif not self.existed:
            shutil.rmtree(self.path)
        else:
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


def prepare_output(
    path: str | os.PathLike[str],
    stage: str,
    *,
    kind: Literal["dir", "store", "file"] = "dir",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
    replace_needs_overwrite: bool = False,
    owns_file: Callable[[Path], bool] | None = None,
    scratch: Iterable[str] = (),
    flag: str = "--out",
    label: str | None = None,
) -> Output:
    """Check an output path before ``stage`` writes anything there; nothing is written.

    Refused: a path that is, is inside, or holds an input (symlinks resolved); the current
    folder or one holding it; a file where a folder is wanted and the reverse; a location that
    cannot be created or written; an existing folder (not empty) or store not written by
    ``stage``, an existing file that ``owns_file`` does not recognise as ``stage``'s; an
    earlier output of ``stage`` when ``replace_needs_overwrite`` and not ``overwrite``; and a
    scratch folder (where the stage keeps its work) that is not ``stage``'s.

    Args:
        path: The output.
        stage: The stage that writes it (``ingest``, ``segment``, ``diff``, ...).
        kind: ``dir`` (a folder), ``store`` (a zarr store) or ``file``.
        inputs: Paths the command reads (None entries are skipped).
        overwrite: The user passed ``--overwrite``.
        replace_needs_overwrite: An earlier output of ``stage`` is replaced only with
            ``overwrite`` (products); otherwise it is resumed or rewritten.
        owns_file: Whether an existing file is ``stage``'s own earlier output (``kind="file"``).
        scratch: Suffixes of the folders ``<path><suffix>`` beside the output that the stage
            creates and removes (``.progress``, ``.partial``).
        flag: The option that names ``path``, for the messages.
        label: How the messages name ``path``; default ``"<flag> <path>"``.

    Returns:
        What is there: an earlier output of ``stage`` or nothing (or an empty folder).

    Raises:
        OutputPathError: the path is refused; the message says why and what to do.
    """
    path = Path(path)
    where = label or f"{flag} {path}"
    real = path.resolve()
    if kind != "file":
        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            raise OutputPathError(f"{where} is the current folder or holds it: name a new folder")
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if real == source:
            raise OutputPathError(
                f"{where} is also an input of this command: choose another {flag}"
            )
        if source in real.parents:
            raise OutputPathError(f"{where} is inside the input {given}: choose another {flag}")
        if real in source.parents:
            raise OutputPathError(f"{where} holds the input {given}: choose another {flag}")
    existed = path.exists() or path.is_symlink()
    if existed and kind == "file" and path.is_dir():
        raise OutputPathError(f"{where} is a folder: give a file name")
    if existed and kind != "file" and not path.is_dir():
        raise OutputPathError(f"{where} is a file, not a folder: choose another {flag}")
    _check_writable(path, kind, where, flag)
    earlier = False
    if existed and (kind == "file" or any(path.iterdir())):
        found = None if kind == "file" else owner(path)
        earlier = owns_file(path) if kind == "file" and owns_file else found == stage
        if not earlier:
            what = (
                f"holds planetseg {found} output, not {stage}'s"
                if found
                else f"exists and was not written by planetseg {stage}"
            )
            raise OutputPathError(
                f"{where} {what}: choose another {flag} (planetseg never overwrites what it did "
                "not write)"
            )
        if replace_needs_overwrite and not overwrite:
            raise OutputPathError(
                f"{where} holds an earlier planetseg {stage} output: pass --overwrite to replace "
                f"it, or choose another {flag}"
            )
    for suffix in scratch:
        extra = path.with_name(path.name + suffix)
        if (extra.exists() or extra.is_symlink()) and owner(extra) != stage:
            raise OutputPathError(
                f"{extra} exists and was not written by planetseg {stage}, which keeps its work "
                f"there while writing {where}: move it away or choose another {flag}"
            )
    return Output(path, stage, earlier, existed)


def _check_writable(path: Path, kind: str, where: str, flag: str) -> None:
    """Refuse an output whose folder (or nearest existing ancestor) is a file or not writable."""
    probes = [path] if kind != "file" and path.is_dir() else []
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{where} cannot be created: {ancestor} is a file")
    for probe in [ancestor, *probes]:
        if not os.access(probe, os.W_OK | os.X_OK):
            raise OutputPathError(
                f"{where}: {probe} is not writable: choose another {flag} or make it writable"
            )
