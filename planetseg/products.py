"""What the product stages share: label stores, the body's geometry, STAC items.

``diff`` and ``craters`` read label stores written by ``segment``, measure on the body's own
geometry (pixel areas, lon/lat), and describe what they write with STAC items.

Areas and positions are computed on the body of the store's CRS, with its own ellipsoid (or
sphere) and projection: a pixel's true area is its projected area divided by the projection's
areal scale factor at that place (PROJ's ``get_factors``), so an equirectangular Moon pixel at
latitude 60 deg counts half of one at the equator, on a 1737.4 km sphere, not on Earth.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from planetseg import __version__
from planetseg.bodies import Body, body_of_crs, parse_crs
from planetseg.errors import CatalogReadError, InvalidArgumentError, MixedBodiesError
from planetseg.store import ChunkGuard, transform_from_cf

#: Largest grid a product holds in memory at once (pixels of one time step).
MAX_PIXELS = 2**30


@dataclass
class LabelsStore:
    """A complete labels store written by ``segment`` (or any store of the same layout).

    Attributes:
        path: The store.
        times: Datetimes (ISO 8601, seconds) of its time steps.
        classes: Class value -> name.
        crs_wkt: CRS of the grid.
        transform: Affine ``(a, b, c, d, e, f)`` of the grid.
        shape: Height and width.
        attrs: The store's attributes.
    """

    path: Path
    times: list[str]
    classes: dict[int, str]
    crs_wkt: str
    transform: tuple[float, ...]
    shape: tuple[int, int]
    attrs: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> LabelsStore:
        """Open and check a labels store.

        Raises:
            CatalogReadError: not a complete labels store.
        """
        import xarray as xr

        path = Path(path)
        if not (path / "zarr.json").exists():
            raise CatalogReadError(
                f"{path} is not a zarr store: give a labels store made by planetseg segment"
            )
        ds = xr.open_zarr(path, consolidated=False)
        if "labels" not in ds or "spatial_ref" not in ds.coords or "time" not in ds["labels"].dims:
            raise CatalogReadError(f"{path} has no labels(time, y, x) with a spatial_ref")
        if not ds.attrs.get("planetseg:complete"):
            raise CatalogReadError(f"{path} is unfinished: re-run the segment that writes it")
        classes = json.loads(ds.attrs.get("planetseg:classes") or "{}")
        h, w = int(ds.sizes["y"]), int(ds.sizes["x"])
        if h * w > MAX_PIXELS:
            raise InvalidArgumentError(
                f"{path} has {h * w:,} pixels per time step, more than products hold in "
                f"memory ({MAX_PIXELS:,}): segment a smaller area"
            )
        store = cls(
            path=path,
            times=[np.datetime_as_string(v, unit="s") for v in ds["time"].values],
            classes={int(k): v for k, v in classes.items()},
            crs_wkt=str(ds["spatial_ref"].attrs["crs_wkt"]),
            transform=transform_from_cf(dict(ds["spatial_ref"].attrs)),
            shape=(h, w),
            attrs=dict(ds.attrs),
        )
        store.__dict__["dataset"] = ds  # the cached_property below, already open
        return store

    @cached_property
    def body(self) -> Body:
        """The body of the grid's CRS."""
        return body_of_crs(parse_crs(self.crs_wkt))

    def time_index(self, wanted: str, flag: str = "--time") -> int:
        """Index of a time given as a date prefix or an index (``flag`` names it in errors).

        Raises:
            InvalidArgumentError: no such time, or several.
        """
        from planetseg.segment import select_times

        return select_times(self.times, [wanted], flag)[0]

    @cached_property
    def dataset(self) -> Any:
        """The store as a lazy xarray Dataset (opened once)."""
        import xarray as xr

        return xr.open_zarr(self.path, consolidated=False)

    def read(self, t: int, name: str = "labels") -> np.ndarray:
        """One time step of ``labels`` (uint8), ``confidence`` or ``crater_probability``.

        The probabilities come decoded: float32 0..1, NaN where unset.

        Raises:
            StoreCorruptError: a chunk of it is missing or damaged.
        """
        if name not in self.dataset:
            raise CatalogReadError(f"{self.path} has no {name} variable")
        guard = ChunkGuard.of(self.path, self.attrs)  # a lost chunk is an error, not zeros
        return guard.read(name, (t,), read=lambda: np.asarray(self.dataset[name][t].values))

    def same_grid(self, other: LabelsStore) -> None:
        """Refuse two stores that are not on the same grid of the same body.

        Raises:
            MixedBodiesError: other bodies.
            InvalidArgumentError: other CRS, transform or shape.
        """
        if self.body.name != other.body.name:
            raise MixedBodiesError(
                f"{self.path} is on the {self.body.name} and {other.path} on the "
                f"{other.body.name}: compare stores of one body"
            )
        same_crs = parse_crs(self.crs_wkt) == parse_crs(other.crs_wkt)
        close = np.allclose(
            self.transform, other.transform, rtol=0, atol=1e-6 * abs(self.transform[0])
        )
        if not same_crs or not close or self.shape != other.shape:
            raise InvalidArgumentError(
                f"{self.path} and {other.path} are on different grids (CRS, pixel size, origin "
                "or shape): segment both on the same cube grid"
            )

    def pixel_centres_lonlat(
        self, rows: np.ndarray, cols: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Body longitude/latitude (degrees) of fractional pixel positions ``(row, col)``."""
        a, b, c, d, e, f = self.transform
        x = c + a * (cols + 0.5) + b * (rows + 0.5)
        y = f + d * (cols + 0.5) + e * (rows + 0.5)
        return to_lonlat(self.crs_wkt, x, y)

    def pixel_area_km2(self) -> np.ndarray:
        """True area of every pixel (km^2) on the body's ellipsoid, shape ``self.shape``."""
        return pixel_area_km2(self.crs_wkt, self.transform, self.shape)


def to_lonlat(crs_wkt: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected coordinates -> the same body's longitude/latitude in degrees."""
    from pyproj import Transformer

    crs = parse_crs(crs_wkt)
    geo = crs.geodetic_crs
    tr = Transformer.from_crs(crs, geo, always_xy=True)
    lon, lat = tr.transform(np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lon), np.asarray(lat)


def pixel_area_km2(
    crs_wkt: str, transform: tuple[float, ...], shape: tuple[int, int]
) -> np.ndarray:
    """True pixel areas (km^2) of a north-up grid on its body (projected area / areal scale).

    Geographic (lon/lat) grids are handled too: their pixel is the exact spherical/ellipsoidal
    band between two parallels.
    """
    from pyproj import Proj

    crs = parse_crs(crs_wkt)
    a, _, c, _, e, f = transform
    h, w = shape
    rows = np.arange(h, dtype=float)
    cols = np.arange(w, dtype=float)
    if crs.is_geographic:
        r = crs.ellipsoid.semi_major_metre / 1000.0
        lat_edges = np.radians(f + e * np.arange(h + 1))
        band = np.abs(np.diff(np.sin(lat_edges))) * r**2 * math.radians(abs(a))
        return np.repeat(band[:, None], w, axis=1)
    proj = Proj(crs)
    out = np.empty(shape, dtype=np.float64)
    step = max(1, 2**20 // max(w, 1))
    for r0 in range(0, h, step):
        rr = rows[r0 : r0 + step]
        x = np.broadcast_to(c + a * (cols + 0.5), (len(rr), w))
        y = np.broadcast_to((f + e * (rr + 0.5))[:, None], (len(rr), w))
        lon, lat = to_lonlat(crs_wkt, x.ravel(), y.ravel())
        scale = np.asarray(proj.get_factors(lon, lat).areal_scale).reshape(len(rr), w)
        out[r0 : r0 + step] = abs(a * e) / scale / 1e6
    return out


def product_item(
    item_id: str,
    assets: dict[str, dict[str, Any]],
    *,
    start: str,
    end: str,
    properties: dict[str, Any],
    collection: str,
    projection_asset: str,
) -> dict[str, Any]:
    """A STAC item for a product (raster assets first), so planetseg can search products."""
    from planetseg.items import raster_item

    def when(s: str) -> dt.datetime:
        return dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC)

    item = raster_item(
        item_id,
        assets,
        datetime=when(end),
        collection=collection,
        properties={
            "start_datetime": when(start).isoformat().replace("+00:00", "Z"),
            "end_datetime": when(end).isoformat().replace("+00:00", "Z"),
            "planetseg:version": __version__,
            **properties,
        },
        projection_asset=projection_asset,
    )
    return item


def write_product_catalog(
    folder: Path, items: list[dict[str, Any]], collection: str, title: str
) -> Path:
    """Write ``items.ndjson`` and ``collection.json`` into ``folder`` (a local catalog)."""
    from planetseg.items import atomic_path, write_items

    write_items(items, folder / "items.ndjson")
    bboxes = np.array([it["bbox"] for it in items])
    starts = sorted(
        it["properties"].get("start_datetime", it["properties"]["datetime"]) for it in items
    )
    ends = sorted(
        it["properties"].get("end_datetime", it["properties"]["datetime"]) for it in items
    )
    coll = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": collection,
        "title": title,
        "description": f"{title}, made by planetseg {__version__}",
        "license": "proprietary",
        "extent": {
            "spatial": {
                "bbox": [
                    [
                        float(bboxes[:, 0].min()),
                        float(bboxes[:, 1].min()),
                        float(bboxes[:, 2].max()),
                        float(bboxes[:, 3].max()),
                    ]
                ]
            },
            "temporal": {"interval": [[starts[0], ends[-1]]]},
        },
        "links": [],
    }
    with atomic_path(folder / "collection.json") as tmp:
        tmp.write_text(json.dumps(coll, indent=1))
    return folder
