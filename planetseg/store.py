"""What every zarr store planetseg writes has in common: grid metadata, attributes, progress.

A stage that writes a store (``ingest``, ``segment``) creates it from metadata first, writes
chunks in tasks that each touch a *marker* in ``<store>.progress/`` after their chunks, and
sets ``planetseg:complete`` only at the end, removing the markers. A killed run therefore
leaves a store that reads as unfinished, and a re-run redoes exactly the unmarked work.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from planetseg.bodies import parse_crs
from planetseg.errors import StoreCorruptError

T = TypeVar("T")

PROGRESS_SUFFIX = ".progress"


def progress_dir(store: Path) -> Path:
    """Where task markers of an unfinished run live: beside the store, removed on completion."""
    return store.with_name(store.name + PROGRESS_SUFFIX)


def done_markers(store: Path) -> set[str]:
    """Names of the markers an unfinished run left (empty if none)."""
    marks = progress_dir(store)
    return {p.name for p in marks.iterdir()} if marks.exists() else set()


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

    def check(self, name: str, selection: Selection = ()) -> None:
        """Stat the chunks of array ``name`` that ``selection`` touches.

        Raises:
            StoreCorruptError: one is missing.
        """
        if not self.every_chunk:
            return
        import zarr

        array = zarr.open_array(self.store, path=name, mode="r")
        root = Path(self.store) / name
        for key in chunk_keys(array, selection):
            if not (root / key).is_file():
                raise StoreCorruptError(
                    f"store {self.store} is marked complete but chunk {name}/{key} is "
                    f"missing: {self.hint}"
                )

    def read(self, name: str, selection: Selection = (), read: Callable[[], T] | None = None) -> T:
        """``read()`` (default: zarr's ``array[selection]``) after :meth:`check`.

        Raises:
            StoreCorruptError: a chunk is missing, or does not decode.
        """
        import zarr

        self.check(name, selection)
        array = zarr.open_array(self.store, path=name, mode="r")
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
    import os

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
