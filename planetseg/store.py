"""What every zarr store planetseg writes has in common: grid metadata, attributes, progress.

A stage that writes a store (``ingest``, ``segment``) creates it from metadata first, writes
chunks in tasks that each touch a *marker* in ``<store>.progress/`` after their chunks, and
sets ``planetseg:complete`` only at the end, removing the markers. A killed run therefore
leaves a store that reads as unfinished, and a re-run redoes exactly the unmarked work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from planetseg.bodies import parse_crs

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
