"""What the product stages share: label stores, the body's geometry, STAC items.

``diff`` and ``craters`` read label stores written by ``segment``, measure on the body's own
geometry (pixel areas, lon/lat), and describe what they write with STAC items.

Areas and positions are computed on the body of the store's CRS, with its own ellipsoid (or
sphere) and projection: a pixel's true area is its projected area divided by the projection's
areal scale factor at that place (PROJ's ``get_factors``), so an equirectangular Moon pixel at
latitude 60 deg counts half of one at the equator, on a 1737.4 km sphere, not on Earth.

Both products are computed block by block (:class:`BlockGrid`, run by
:func:`planetseg.executor.map_tasks`): each task reads its own window of the store, so a
worker's memory is that of a block, whatever the scene's size. Objects that cross block
borders (change regions, crater blobs) are labelled per block and merged across the borders
(:func:`block_edges`, :func:`merge_labels`: the block-boundary union-find of dask-image's
``label``), so each is counted once.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np

from planetseg import __version__
from planetseg.bodies import Body, body_of_crs, parse_crs
from planetseg.config import PRODUCT_BLOCK
from planetseg.errors import CatalogReadError, InvalidArgumentError, MixedBodiesError
from planetseg.store import ChunkGuard, transform_from_cf

#: Largest window one task holds in memory (pixels): one object (a crater blob) larger than
#: this cannot be measured whole.
MAX_PIXELS = 2**30
#: Default side (px) of the blocks products are computed in.
BLOCK = PRODUCT_BLOCK

Window = tuple[tuple[int, int], tuple[int, int]]


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
        ds = xr.open_zarr(path, consolidated=False, chunks=None)  # windows read without Dask
        if "labels" not in ds or "spatial_ref" not in ds.coords or "time" not in ds["labels"].dims:
            raise CatalogReadError(f"{path} has no labels(time, y, x) with a spatial_ref")
        if not ds.attrs.get("planetseg:complete"):
            raise CatalogReadError(f"{path} is unfinished: re-run the segment that writes it")
        classes = json.loads(ds.attrs.get("planetseg:classes") or "{}")
        h, w = int(ds.sizes["y"]), int(ds.sizes["x"])
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
        """The store as a lazy xarray Dataset (opened once; indexing reads what it selects)."""
        import xarray as xr

        return xr.open_zarr(self.path, consolidated=False, chunks=None)

    def read(self, t: int, name: str = "labels", window: Window | None = None) -> np.ndarray:
        """One time step of ``labels`` (uint8), ``confidence`` or ``crater_probability``.

        The probabilities come decoded: float32 0..1, NaN where unset. ``window`` (rows and
        columns, ``((r0, r1), (c0, c1))``) reads a part; None the whole grid.

        Raises:
            StoreCorruptError: a chunk of it is missing or damaged.
        """
        if name not in self.dataset:
            raise CatalogReadError(f"{self.path} has no {name} variable")
        (r0, r1), (c0, c1) = window or ((0, self.shape[0]), (0, self.shape[1]))
        sel = (t, slice(r0, r1), slice(c0, c1))
        guard = ChunkGuard.of(self.path, self.attrs)  # a lost chunk is an error, not zeros
        return guard.read(name, sel, read=lambda: np.asarray(self.dataset[name][sel].values))

    @property
    def chunks(self) -> tuple[int, int]:
        """The (y, x) chunk shape of the store's ``labels``."""
        chunks = self.dataset["labels"].encoding.get("chunks") or self.dataset["labels"].shape
        return int(chunks[-2]), int(chunks[-1])

    def grid(self, block: int = BLOCK) -> BlockGrid:
        """Blocks of about ``block`` px, a whole number of the store's chunks each."""
        return BlockGrid.of(self.shape, self.chunks, block)

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

    def pixel_area_km2(self, window: Window | None = None) -> np.ndarray:
        """True area of every pixel (km^2) on the body's ellipsoid, of ``window`` or the grid."""
        return pixel_area_km2(self.crs_wkt, self.transform, self.shape, window)

    def nominal_pixel_km(self) -> float:
        """The side (km) of a typical pixel: the root of the median true pixel area.

        The median is of at most 1024 x 1024 pixels evenly spaced over the grid (all of a
        grid of up to 1024 rows and columns), so it costs the same on any scene.
        """
        (h, w), n = self.shape, 1024
        rows = np.unique(np.linspace(0, h - 1, min(h, n)).round().astype(int))
        cols = np.unique(np.linspace(0, w - 1, min(w, n)).round().astype(int))
        areas = pixel_areas_at(self.crs_wkt, self.transform, rows[:, None], cols)
        return math.sqrt(float(np.median(areas)))


def to_lonlat(crs_wkt: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected coordinates -> the same body's longitude/latitude in degrees."""
    lon, lat = _projections(crs_wkt)[0].transform(np.asarray(x, float), np.asarray(y, float))
    return np.asarray(lon), np.asarray(lat)


_local = threading.local()


def _projections(crs_wkt: str) -> tuple[Any, Any]:
    """The CRS -> its body's lon/lat transformer and the CRS's Proj, made once per thread."""
    from pyproj import Proj, Transformer

    made = _local.__dict__.setdefault("projections", {})
    if crs_wkt not in made:
        crs = parse_crs(crs_wkt)
        made[crs_wkt] = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True), Proj(crs)
    return made[crs_wkt]


def pixel_area_km2(
    crs_wkt: str,
    transform: tuple[float, ...],
    shape: tuple[int, int],
    window: Window | None = None,
) -> np.ndarray:
    """True pixel areas (km^2) of a north-up grid on its body (projected area / areal scale).

    Geographic (lon/lat) grids are handled too: their pixel is the exact spherical/ellipsoidal
    band between two parallels. ``window`` (``((r0, r1), (c0, c1))``) gives the areas of a
    part of the grid, equal to that part of the whole grid's to the last bit (each pixel's
    area is computed from its own row and column).
    """
    (r0, r1), (c0, c1) = window or ((0, shape[0]), (0, shape[1]))
    cols = np.arange(c0, c1)
    out = np.empty((r1 - r0, c1 - c0), dtype=np.float64)
    step = max(1, 2**20 // max(c1 - c0, 1))
    for i in range(r0, r1, step):
        rows = np.arange(i, min(i + step, r1))
        out[i - r0 : i - r0 + len(rows)] = pixel_areas_at(crs_wkt, transform, rows[:, None], cols)
    return out


def pixel_areas_at(
    crs_wkt: str, transform: tuple[float, ...], rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """True areas (km^2) of the pixels at integer ``rows`` and ``cols`` (broadcast together)."""
    crs = parse_crs(crs_wkt)
    a, _, c, _, e, f = transform
    rows, cols = np.broadcast_arrays(np.asarray(rows), np.asarray(cols))
    if crs.is_geographic:
        r = crs.ellipsoid.semi_major_metre / 1000.0
        top, bottom = np.radians(f + e * rows), np.radians(f + e * (rows + 1))
        return np.abs(np.sin(bottom) - np.sin(top)) * r**2 * math.radians(abs(a))
    x = c + a * (cols + 0.5)
    y = f + e * (rows + 0.5)
    lon, lat = to_lonlat(crs_wkt, x.ravel(), y.ravel())
    scale = np.asarray(_projections(crs_wkt)[1].get_factors(lon, lat).areal_scale)
    scale = scale.reshape(rows.shape)
    return abs(a * e) / scale / 1e6


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


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockGrid:
    """The blocks a product is computed in: row and column edges over the grid.

    Attributes:
        rows: Row edges ``0 = r_0 < r_1 < ... = height``.
        cols: Column edges.
    """

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @classmethod
    def of(cls, shape: tuple[int, int], chunks: tuple[int, int], block: int) -> BlockGrid:
        """Blocks of whole chunks, the fewest chunks per side that reach ``block`` px."""
        edges = []
        for size, chunk in zip(shape, chunks, strict=True):
            step = chunk * max(1, -(-block // chunk))
            edges.append((*range(0, size, step), size))
        return cls(*edges)

    @property
    def shape(self) -> tuple[int, int]:
        """Blocks down and across."""
        return len(self.rows) - 1, len(self.cols) - 1

    def window(self, i: int, j: int) -> Window:
        """The rows and columns of block ``(i, j)``."""
        return (self.rows[i], self.rows[i + 1]), (self.cols[j], self.cols[j + 1])

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Every block index, row by row."""
        for i in range(self.shape[0]):
            for j in range(self.shape[1]):
                yield i, j

    def block_of(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The block indices holding pixels ``(row, col)``."""
        i = np.searchsorted(self.rows, row, side="right") - 1
        j = np.searchsorted(self.cols, col, side="right") - 1
        return i, j


@dataclass(frozen=True)
class Edges:
    """The outermost rows and columns of a labelled block: labels and the code of each pixel.

    Pixels of two blocks are one object where they touch (8-connected) with the same code.
    """

    top: tuple[np.ndarray, np.ndarray]
    bottom: tuple[np.ndarray, np.ndarray]
    left: tuple[np.ndarray, np.ndarray]
    right: tuple[np.ndarray, np.ndarray]


def block_edges(labels: np.ndarray, codes: np.ndarray) -> Edges:
    """The :class:`Edges` of a block labelled ``labels`` (0: no object) with pixel ``codes``."""

    def line(sel: tuple[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
        return labels[sel].copy(), codes[sel].copy()

    return Edges(line((0, slice(None))), line((-1, slice(None))),
                 line((slice(None), 0)), line((slice(None), -1)))  # fmt: skip


def _touching(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], diagonal: bool = True
) -> np.ndarray:
    """Label pairs ``(a, b)`` of two facing lines whose pixels touch (offsets -1, 0, +1)."""
    (la, ca), (lb, cb) = a, b
    n, pairs = len(la), []
    for d in (-1, 0, 1) if diagonal else (0,):
        lo, hi = max(0, -d), min(n, n - d)
        x, y = la[lo:hi], lb[lo + d : hi + d]
        same = (x > 0) & (y > 0) & (ca[lo:hi] == cb[lo + d : hi + d])
        pairs.append(np.c_[x[same], y[same]])
    return np.concatenate(pairs)


def _end(line: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first (``k = 0``) or last (``-1``) pixel of an edge line."""
    return line[0][[k]], line[1][[k]]


def merge_labels(
    grid: BlockGrid, counts: dict[tuple[int, int], int], edges: dict[tuple[int, int], Edges]
) -> tuple[dict[tuple[int, int], int], np.ndarray]:
    """Merge per-block labels into objects across block borders (8-connected, same code).

    Args:
        grid: The blocks.
        counts: Labels of each block (numbered 1..count).
        edges: The :class:`Edges` of each block.

    Returns:
        The offset of each block's labels in the global numbering (label ``k`` of block ``b``
        is ``offset[b] + k - 1``) and the object of every global label (0..objects - 1, in
        the order of each object's first label).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets, total = {}, 0
    for b in grid.blocks():
        offsets[b] = total
        total += counts[b]
    links = []

    def link(b1: tuple[int, int], b2: tuple[int, int], pairs: np.ndarray) -> None:
        if len(pairs):
            links.append(pairs + np.array([offsets[b1], offsets[b2]]) - 1)

    ny, nx = grid.shape
    for i, j in grid.blocks():
        e = edges[i, j]
        if j + 1 < nx:
            link((i, j), (i, j + 1), _touching(e.right, edges[i, j + 1].left))
        if i + 1 < ny:
            link((i, j), (i + 1, j), _touching(e.bottom, edges[i + 1, j].top))
            if j + 1 < nx:  # the corner pixels diagonally across
                below = edges[i + 1, j + 1].top
                link((i, j), (i + 1, j + 1), _touching(_end(e.bottom, -1), _end(below, 0), False))
            if j > 0:
                below = edges[i + 1, j - 1].top
                link((i, j), (i + 1, j - 1), _touching(_end(e.bottom, 0), _end(below, -1), False))
    pairs = np.concatenate(links) if links else np.empty((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(total, total))
    _, objects = connected_components(graph, directed=False)
    # Renumber in order of first appearance, so objects follow the blocks' order.
    _, first = np.unique(objects, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return offsets, rank[objects]


def regions(codes: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of ``valid`` pixels of one code each (numbered from 1), and how many."""
    from scipy import ndimage

    out = np.zeros(valid.shape, np.int64)
    offset = 0
    for code in np.unique(codes[valid]):
        lab, n = ndimage.label(valid & (codes == code), structure=np.ones((3, 3)))
        out[lab > 0] = lab[lab > 0] + offset
        offset += n
    return out, offset


def open_labels(path: str | Path) -> LabelsStore:
    """The labels store at ``path``, opened once per process and version (for tasks)."""
    stamp = (Path(path) / "zarr.json").stat().st_mtime_ns
    return _open_labels(str(path), stamp)


@cache
def _open_labels(path: str, stamp: int) -> LabelsStore:
    return LabelsStore.open(path)
