"""The ``ingest`` stage: STAC items -> a tiled zarr datacube, lazily, on any world.

Plan, then execute. :func:`plan_ingest` looks only at item metadata (and opens each asset's
header once, to fail early on unreadable assets) and returns a small picklable
:class:`CubePlan`: the grid, the time steps and the items in each, the bands. Execution runs
:class:`BlockTasks` on :func:`planetseg.executor.execute`, on a Dask cluster or this process's
threads: task ``i`` is one read block of one time step, computed from ``i``; it reads its own
pixels through a :mod:`~planetseg.loaders` engine (:meth:`Loader.read_block`, from the items
whose footprint meets the block, sent to each worker once as :class:`BlockSources`) and
writes them tile by tile, one zarr chunk per tile. No graph of the whole cube is built.

Store layout (zarr v3, written through xarray, readable by rioxarray)::

    image(time, band, y, x)   chunks (1, all bands, T, T)
    labels(time, y, x) or labels(y, x)   uint8, optional
    valid(time, y, x)         uint8, integer cubes without nodata: 1 where an item covers
                              the pixel (see COVERAGE; chunks only where one does not)
    spatial_ref               CF grid mapping: the CRS as WKT2 (IAU CRSs included)
    x, y                      pixel centres; time: one step per acquisition group

Grid: the items' own pixel grid (extended or cut to ``bbox``) when the cube keeps their CRS
and resolution, so pixels are copied, not resampled; otherwise pixel edges on multiples of
the resolution.

Resumable: every tile written leaves a marker in ``<store>.progress/`` *after* its chunks; a
re-run writes only tiles without a marker, and the folder goes once the store is complete.
``attrs["planetseg:complete"]`` becomes true only once every tile is written, so an
interrupted store never passes for a finished one.
Appendable: new acquisitions are appended along ``time`` onto the cube's fixed grid, whatever
their footprint (real observations of a region never share one): pixels outside it are the
cube's nodata, and every chunk of the new step is written, all-nodata ones too (readers take
a missing chunk for lost data). Earlier chunks are not touched. Items that miss the cube, or in
another CRS (without ``--crs`` naming the cube's) or of another body, are refused.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import itertools
import json
import logging
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from planetseg import __version__
from planetseg.bodies import parse_crs, same_body
from planetseg.config import IngestConfig
from planetseg.errors import (
    AssetReadError,
    CatalogReadError,
    CRSError,
    InvalidArgumentError,
    PlanetsegWarning,
    StoreMismatchError,
)
from planetseg.items import Item, read_items
from planetseg.search import parse_bbox
from planetseg.store import (
    EVERY_CHUNK,
    PROGRESS_SUFFIX,
    STAGE_ATTR,
    Output,
    cf_attrs,
    consolidate,
    create_owned_dir,
    done_markers,
    drop_partial_writes,
    get_attr,
    missing_chunks,
    open_for_writing,
    pixel_centres,
    prepare_output,
    progress_dir,
    remove_owned,
    set_attrs,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class BandSpec:
    """One band of the cube.

    Attributes:
        name: Band coordinate value (``image`` or ``visual.2``).
        asset: Asset key it is read from.
        index: 1-based band index within the asset.
        multiband: Whether the asset has several bands.
    """

    name: str
    asset: str
    index: int = 1
    multiband: bool = False


@dataclass(frozen=True)
class TimeStep:
    """One time step: a group of items mosaicked together.

    Attributes:
        key: Group key (e.g. the UTC day); identifies the step across runs.
        datetime: RFC 3339 time of the step (its earliest item).
        item_ids: Items mosaicked into the step, first on top.
    """

    key: str
    datetime: str
    item_ids: tuple[str, ...]


@dataclass(frozen=True)
class CubePlan:
    """Everything needed to build and write a cube, and nothing heavy.

    Attributes:
        crs_wkt: Target CRS as WKT2.
        body: Body of the CRS.
        transform: Affine coefficients ``(a, b, c, d, e, f)`` of the pixel-corner grid.
        shape: ``(height, width)`` in pixels.
        tile: Tile (chunk) size in pixels.
        times: Time steps in time order.
        bands: Image bands.
        dtype: Image dtype.
        nodata: Image nodata/fill value (None: 0 for integers, NaN for floats).
        resampling: Image resampling (GDAL name).
        label_asset: Asset key of a label raster, giving ``labels(time, y, x)``.
        label_source: Path of a crater catalog or polygon file, giving ``labels(y, x)``.
        label_field: Class column of ``label_source``.
        fill_missing: Whether unreadable assets were dropped (with a warning).
        read_block: Pixels per side read at once (rounded down to whole tiles).
        coverage: Whether the cube has a :data:`COVERAGE` array: an integer cube without a
            nodata value cannot tell its fill (0) from a pixel value, so which pixels an item
            covers is kept beside it (cubes made before it existed have none).
    """

    crs_wkt: str
    body: str
    transform: tuple[float, float, float, float, float, float]
    shape: tuple[int, int]
    tile: int
    times: tuple[TimeStep, ...]
    bands: tuple[BandSpec, ...]
    dtype: str
    nodata: float | None
    resampling: str = "nearest"
    label_asset: str | None = None
    label_source: str | None = None
    label_field: str = "class"
    fill_missing: bool = False
    read_block: int = 0
    coverage: bool = False

    @property
    def block(self) -> int:
        """Pixels per side read at once: a multiple of the tile (``read_block``, else the tile)."""
        return max(self.tile, self.read_block // self.tile * self.tile)

    @property
    def band_names(self) -> list[str]:
        """Band coordinate values."""
        return [b.name for b in self.bands]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units."""
        a, _, c, _, e, f = self.transform
        h, w = self.shape
        return (c, f + e * h, c + a * w, f)

    @property
    def epsg(self) -> int | None:
        """EPSG code of the CRS, if it has one."""
        return parse_crs(self.crs_wkt).to_epsg()

    @property
    def tiles_yx(self) -> tuple[int, int]:
        """Number of tiles along y and x."""
        return (math.ceil(self.shape[0] / self.tile), math.ceil(self.shape[1] / self.tile))

    def geobox(self) -> Any:
        """The grid as an ``odc.geo.geobox.GeoBox``."""
        from affine import Affine
        from odc.geo.geobox import GeoBox

        from planetseg.bodies import celestial_proj

        with celestial_proj():
            return GeoBox(self.shape, Affine(*self.transform), self.crs_wkt)

    def grid_signature(self) -> dict[str, Any]:
        """What must match for two runs to write into the same store."""
        return {
            "crs_wkt": self.crs_wkt,
            "transform": list(self.transform),
            "shape": list(self.shape),
            "tile": self.tile,
            "bands": self.band_names,
            "dtype": self.dtype,
            "labels": bool(self.label_asset or self.label_source),
        }

    def to_json(self) -> str:
        """Serialise (stored in the cube's attributes)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CubePlan:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        d["transform"] = tuple(d["transform"])
        d["shape"] = tuple(d["shape"])
        d["times"] = tuple(
            TimeStep(t["key"], t["datetime"], tuple(t["item_ids"])) for t in d["times"]
        )
        d["bands"] = tuple(BandSpec(**b) for b in d["bands"])
        return cls(**d)


def _item_crs(item: Item, asset: str | None = None) -> str:
    holders = [item.get("assets", {}).get(asset, {})] if asset else []
    holders.append(item.get("properties", {}))
    for holder in holders:
        if holder.get("proj:code"):
            return str(holder["proj:code"])
        if holder.get("proj:epsg"):
            return f"EPSG:{holder['proj:epsg']}"
        if holder.get("proj:wkt2"):
            return str(holder["proj:wkt2"])
    raise CRSError(
        f"item {item['id']!r} has no projection metadata (proj:code, proj:epsg or proj:wkt2): "
        "add it to the item, or describe the files with a local catalog (a folder of image files)"
    )


def _distinct_crss(crss: Sequence[str]) -> list[str]:
    """The CRSs of ``crss`` that differ, one text each (the first seen, in sorted order).

    Equivalent CRSs written differently (GDAL names the CRS it builds from an ISIS3 or a PDS4
    label its own way) count once.
    """
    out: list[str] = []
    for text in sorted(set(crss)):
        crs = parse_crs(text)
        if not any(crs.equals(parse_crs(seen), ignore_axis_order=True) for seen in out):
            out.append(text)
    return out


def _item_grid(item: Item, asset: str) -> tuple[tuple[float, ...], tuple[int, int]] | None:
    for holder in (item["assets"].get(asset, {}), item.get("properties", {})):
        if holder.get("proj:transform") and holder.get("proj:shape"):
            return tuple(holder["proj:transform"][:6]), tuple(holder["proj:shape"])
    return None


def _group_key(item: Item, groupby: str, body: str) -> str:
    props = item["properties"]
    when = props.get("datetime") or props.get("start_datetime")
    if groupby == "id":
        return item["id"]
    if not when:
        raise InvalidArgumentError(f"item {item['id']!r} has no datetime to group by")
    t = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    if groupby == "time":
        return t.astimezone(dt.UTC).isoformat()
    if groupby == "solar_day":
        if body != "earth":
            raise InvalidArgumentError(
                f"--groupby solar_day uses Earth's local solar time; for the {body} use "
                "--groupby day, time or id"
            )
        lon = sum(item["bbox"][0::2][:2]) / 2 if item.get("bbox") else 0.0
        t = t + dt.timedelta(hours=lon / 15.0)
    return t.astimezone(dt.UTC).date().isoformat()


def _default_bands(item: Item, label_asset: str | None) -> list[str]:
    assets = item.get("assets", {})
    data = [k for k, a in assets.items() if "data" in a.get("roles", []) and k != label_asset]
    if data:
        return data
    return [
        k
        for k, a in assets.items()
        if k != label_asset
        and "labels" not in a.get("roles", [])
        and "image/tiff" in a.get("type", "image/tiff")
    ]


def plan_ingest(
    items: Sequence[Item], config: IngestConfig, *, onto: CubePlan | None = None
) -> CubePlan:
    """Plan a cube from item metadata. Cheap: reads no pixels.

    Args:
        items: The items.
        config: Grid, bands and labels.
        onto: The plan of the existing cube ``config.out`` that the items go into: the new plan
            keeps its grid (CRS, transform and shape; ``config.bbox`` is not used), wherever
            the items lie.

    Raises:
        CatalogReadError: no items.
        CRSError / MixedBodiesError: missing projection metadata, or items of several bodies
            (or of another body than ``onto``).
        InvalidArgumentError: no native resolution, bad bands, or a bbox missing every item
            (the config checked its own values).
        StoreMismatchError: with ``onto``, ``--crs`` or ``--resolution`` other than the
            cube's, or an item in another CRS than the cube's without ``--crs``.
    """
    if not items:
        raise CatalogReadError("no items to ingest: the items file or search result is empty")
    label_asset = config.labels if config.labels and not _is_file(config.labels) else None
    label_source = config.labels if config.labels and _is_file(config.labels) else None
    if label_source and not Path(label_source).is_file():
        raise CatalogReadError(
            f"--labels {label_source}: no such file (give a crater catalog, a polygon file or "
            "the key of a label asset)"
        )
    first = items[0]
    asset_keys = list(config.bands) or _default_bands(first, label_asset)
    if not asset_keys:
        raise InvalidArgumentError(
            f"item {first['id']!r} has no data assets: name them with --bands"
        )
    for item in items:
        for key in [*asset_keys, *([label_asset] if label_asset else [])]:
            if key not in item.get("assets", {}):
                raise InvalidArgumentError(
                    f"item {item['id']!r} has no asset {key!r} (it has "
                    f"{', '.join(item.get('assets', {}))}): choose --bands/--labels among them"
                )
    crss = [_item_crs(it, asset_keys[0]) for it in items]
    body = same_body(
        crss,
        what="the items",
        names=[it["id"] for it in items],
        fix="ingest each body's items into a cube of its own (search a folder of one body, or "
        "filter with --collection)",
    )
    if onto is not None:
        target = _cube_crs(items, crss, config, onto)
        transform, shape = onto.transform, onto.shape
    else:
        target = parse_crs(config.crs) if config.crs else None
        if target is None:
            distinct = _distinct_crss(crss)
            if len(distinct) > 1:
                raise InvalidArgumentError(
                    f"the items are in {len(distinct)} CRSs "
                    f"({'; '.join(parse_crs(d).name[:60] for d in distinct[:3])}): choose the "
                    "cube's with --crs"
                )
            target = parse_crs(distinct[0])
        same_body([target, crss[0]], what="--crs and the items")
        resolution = config.resolution or _native_resolution(items, crss, asset_keys[0], target)
        if resolution is None:
            raise InvalidArgumentError(
                "cannot tell the items' native resolution in the cube's CRS: give --resolution"
            )
        bounds = _extent(items, crss, asset_keys[0], target, config.bbox)
        transform, shape = _snap(
            bounds, resolution, _native_anchor(items, crss, asset_keys[0], target, resolution)
        )
    groups: dict[str, list[Item]] = {}
    for item in sorted(items, key=lambda it: (it["properties"].get("datetime") or "", it["id"])):
        groups.setdefault(_group_key(item, config.groupby, body.name), []).append(item)
    times = tuple(
        TimeStep(
            key, members[0]["properties"].get("datetime") or "", tuple(m["id"] for m in members)
        )
        for key, members in groups.items()
    )
    bands = tuple(_band_specs(first, asset_keys))
    dtype, nodata = _dtype_nodata(first, asset_keys[0], config)
    return CubePlan(
        crs_wkt=onto.crs_wkt if onto is not None else target.to_wkt(),
        body=body.name,
        transform=transform,
        shape=shape,
        tile=config.tile,
        times=times,
        bands=bands,
        dtype=dtype,
        nodata=nodata,
        resampling=config.resampling,
        label_asset=label_asset,
        label_source=str(Path(label_source).resolve()) if label_source else None,
        label_field=config.label_field,
        fill_missing=config.fill_missing,
        read_block=config.read_block,
        coverage=_widened(dtype, nodata) is not None,
    )


#: The array of an integer cube without nodata that says which pixels its items cover:
#: ``valid(time, y, x)`` uint8, 1 covered, 0 not (the image holds 0 there). Its fill is 1 and
#: only tiles with an uncovered pixel have a chunk, so a cube that its items cover costs
#: nothing more.
COVERAGE = "valid"


def _coverage_read(plan: CubePlan) -> tuple[str, int] | None:
    """How a block of ``plan``'s cube is read: :func:`_widened`, for a cube with coverage."""
    return _widened(plan.dtype, plan.nodata) if plan.coverage else None


def _widened(dtype: str, nodata: float | None) -> tuple[str, int] | None:
    """A wider integer dtype for reading ``dtype``, and a value outside ``dtype``'s range.

    Read so, the pixels no item covers hold that value, none of the items' own can: how the
    :data:`COVERAGE` of a cube without nodata is told. None when the cube needs no coverage
    (a float cube, whose fill is NaN, or one with nodata) or there is no wider dtype (64-bit).
    """
    kind, size = np.dtype(dtype).kind, np.dtype(dtype).itemsize
    if nodata is not None or kind not in "iu" or size > 4:
        return None
    wide = f"int{2 * 8 * size}"
    return wide, int(np.iinfo(dtype).min) - 1


def _cube_crs(items: Sequence[Item], crss: list[str], config: IngestConfig, cube: CubePlan) -> Any:
    """The CRS of the existing cube the items are appended to, after checking the items fit.

    Items are put onto the cube's grid as they are, or reprojected when ``--crs`` names the
    cube's CRS (as a new cube takes items of several CRSs only with ``--crs``).

    Raises:
        MixedBodiesError: an item of another body than the cube.
        StoreMismatchError: ``--crs`` or ``--resolution`` other than the cube's, or an item in
            another CRS than the cube's without ``--crs``.
    """
    target = parse_crs(cube.crs_wkt)
    ids = [it["id"] for it in items]
    same_body(
        [target, *crss],
        what=f"the cube {config.out} and the items",
        names=["the cube", *ids],
        fix="ingest each body's items into a cube of its own (choose another --out)",
    )
    if config.crs and not parse_crs(config.crs).equals(target, ignore_axis_order=True):
        raise StoreMismatchError(
            f"--crs {config.crs} is not the CRS of the cube {config.out} ({target.name}): leave "
            "--crs out to append onto the cube's grid, or choose another --out"
        )
    resolution = abs(cube.transform[0])
    if config.resolution and not math.isclose(config.resolution, resolution, rel_tol=1e-9):
        raise StoreMismatchError(
            f"--resolution {config.resolution:g} is not the resolution of the cube {config.out} "
            f"({resolution:g}): leave --resolution out to append onto the cube's grid, or "
            "choose another --out"
        )
    if not config.crs:
        for item_id, crs in zip(ids, crss, strict=True):
            if not parse_crs(crs).equals(target, ignore_axis_order=True):
                raise StoreMismatchError(
                    f"item {item_id!r} is in {parse_crs(crs).name}, the cube {config.out} in "
                    f"{target.name}: pass the cube's CRS as --crs to reproject the item onto "
                    "the cube's grid, or ingest it into another --out"
                )
    return target


#: Copies of a read block a task holds at once: the sources' reads, their mosaic, the encoded
#: chunks.
BLOCK_COPIES = 3
#: Share of a worker's memory limit (per thread) one task may take: Dask pauses a worker at 80 %.
MEMORY_SHARE = 0.6


def _block_shape(plan: CubePlan) -> tuple[int, int]:
    """Pixels of the largest read block (the block, or the whole cube if that is smaller)."""
    return min(plan.block, plan.shape[0]), min(plan.block, plan.shape[1])


def task_bytes(plan: CubePlan) -> int:
    """Memory a task needs, about: ``BLOCK_COPIES`` copies of one read block of every band."""
    wide = _coverage_read(plan)
    itemsize = np.dtype(wide[0] if wide else plan.dtype).itemsize
    labels = 1 if plan.label_asset or plan.label_source else 0
    h, w = _block_shape(plan)
    return h * w * (len(plan.bands) * itemsize + labels) * BLOCK_COPIES


def _task_budget(client: Any) -> tuple[int, str] | None:
    """Bytes a task may use and where that comes from, or None if the cluster does not say."""
    if client is None:  # the threaded scheduler: one task per core, in this process
        import os

        import psutil

        cores = os.cpu_count() or 1
        return int(psutil.virtual_memory().total / cores * MEMORY_SHARE), "this machine's memory"
    workers = client.scheduler_info().get("workers", {}).values()
    limits = [
        w["memory_limit"] / max(int(w.get("nthreads") or 1), 1)
        for w in workers
        if w.get("memory_limit")
    ]
    if not limits:
        return None
    return int(min(limits) * MEMORY_SHARE), "a Dask worker's memory limit"


def check_memory(plan: CubePlan, client: Any) -> None:
    """Refuse a tile whose task would not fit in a worker's memory, before anything is written.

    A task reads one block (``plan.block``, the tile or ``read_block``, at most the cube) of
    every band; each of a worker's threads runs one task, so a task may use ``MEMORY_SHARE`` of
    the worker's memory limit over its threads (of this machine's memory over its cores
    without a cluster).

    Raises:
        InvalidArgumentError: the task would not fit; the message gives the largest tile that
            does.
    """
    budget = _task_budget(client)
    need = task_bytes(plan)
    if budget is None or need <= budget[0]:
        return
    h, w = _block_shape(plan)
    largest = max(16, int(math.sqrt(budget[0] / (need / (h * w)))) // 16 * 16)
    raise InvalidArgumentError(
        f"--tile {plan.tile}: a task reads {h} x {w} px of {len(plan.bands)} "
        f"{plan.dtype} band(s) at once, about {need / 2**20:,.0f} MiB, more than "
        f"{budget[0] / 2**20:,.0f} MiB per task ({budget[1]} per thread): use --tile {largest} "
        "or less, or workers with more memory"
    )


def _is_file(value: str) -> bool:
    return Path(value).suffix.lower() in (".csv", ".parquet", ".geojson", ".json", ".gpkg")


def _band_specs(item: Item, asset_keys: list[str]) -> Iterable[BandSpec]:
    for key in asset_keys:
        n = len(item["assets"][key].get("raster:bands", [])) or 1
        if n == 1:
            yield BandSpec(key, key)
        else:
            yield from (BandSpec(f"{key}.{i}", key, i, True) for i in range(1, n + 1))


def _dtype_nodata(item: Item, asset: str, config: IngestConfig) -> tuple[str, float | None]:
    bands = item["assets"][asset].get("raster:bands") or [{}]
    dtype = config.dtype or bands[0].get("data_type") or "float32"
    try:
        np.dtype(dtype)
    except TypeError:
        raise InvalidArgumentError(
            f"asset {asset!r} of item {item['id']!r} has data_type {dtype!r}, not a numpy "
            "dtype: give the cube's with --dtype"
        ) from None
    nodata = config.nodata if config.nodata is not None else bands[0].get("nodata")
    if nodata is None:
        return dtype, None
    if np.dtype(dtype).kind in "iu" and not (
        float(nodata).is_integer() and np.iinfo(dtype).min <= nodata <= np.iinfo(dtype).max
    ):
        raise InvalidArgumentError(
            f"nodata {nodata:g} is not a {dtype} value: give --nodata a value of the cube's "
            "dtype, or a --dtype that holds it"
        )
    return dtype, float(nodata)


def _native_resolution(
    items: Sequence[Item], crss: list[str], asset: str, target: Any
) -> float | None:
    native = [
        abs(grid[0][0])
        for item, crs in zip(items, crss, strict=True)
        if (grid := _item_grid(item, asset)) is not None and parse_crs(crs) == target
    ]
    return min(native) if native else None


def _extent(
    items: Sequence[Item], crss: list[str], asset: str, target: Any, bbox_arg: Any
) -> tuple[float, float, float, float]:
    from pyproj import Transformer

    from planetseg.bodies import body_of_crs

    geographic = body_of_crs(target).crs
    to_target = Transformer.from_crs(geographic, target, always_xy=True)
    footprints = [
        fp
        for item, crs in zip(items, crss, strict=True)
        if (fp := _footprint(item, crs, asset, target, to_target)) is not None
    ]
    if not footprints:
        raise InvalidArgumentError("the items carry neither proj:transform nor bbox: give --bbox")
    union = (
        min(b[0] for b in footprints),
        min(b[1] for b in footprints),
        max(b[2] for b in footprints),
        max(b[3] for b in footprints),
    )
    bbox = parse_bbox(bbox_arg)
    if bbox is None:
        return union
    w, s, e, n = bbox
    if w > e:
        raise InvalidArgumentError("--bbox crossing the antimeridian is not supported by ingest")
    req = to_target.transform_bounds(w, s, e, n, densify_pts=21)
    inter = (
        max(req[0], union[0]),
        max(req[1], union[1]),
        min(req[2], union[2]),
        min(req[3], union[3]),
    )
    if inter[0] >= inter[2] or inter[1] >= inter[3]:
        raise InvalidArgumentError(
            f"--bbox {bbox_arg} does not intersect any item: the items cover "
            f"{_lonlat_union(items)} (lon/lat)"
        )
    return inter


class Footprint(NamedTuple):
    """An item's bounds in the cube's CRS; ``approx`` when transformed from its lon/lat bbox."""

    left: float
    bottom: float
    right: float
    top: float
    approx: bool


def _footprint(item: Item, crs: str, asset: str, target: Any, to_target: Any) -> Footprint | None:
    """Bounds of ``item`` in ``target``: its own grid's if in that CRS, else its bbox's."""
    grid = _item_grid(item, asset)
    if grid is not None and parse_crs(crs) == target:
        (a, _, c, _, e, f), (h, w) = grid
        xs, ys = sorted((c, c + a * w)), sorted((f, f + e * h))
        return Footprint(xs[0], ys[0], xs[1], ys[1], False)
    if item.get("bbox"):
        bbox = item["bbox"]
        return Footprint(*to_target.transform_bounds(*bbox[:2], *bbox[-2:], densify_pts=21), True)
    return None


def _cube_lonlat(cube: CubePlan) -> tuple[float, float, float, float]:
    """The cube's extent in its body's lon/lat."""
    from pyproj import Transformer

    from planetseg.bodies import body_of_crs

    crs = parse_crs(cube.crs_wkt)
    to_lonlat = Transformer.from_crs(crs, body_of_crs(crs).crs, always_xy=True)
    return to_lonlat.transform_bounds(*cube.bounds, densify_pts=21)


def _lonlat_union(items: Sequence[Item]) -> str:
    boxes = [it["bbox"] for it in items if it.get("bbox")]
    if not boxes:
        return "an unknown area"
    return _lonlat(
        (
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[-2] for b in boxes),
            max(b[-1] for b in boxes),
        )
    )


def _lonlat(bbox: Sequence[float]) -> str:
    """A lon/lat box as ``W,S,E,N`` (what ``--bbox`` takes)."""
    return ",".join(f"{v:.4f}" for v in (*bbox[:2], *bbox[-2:]))


def _native_anchor(
    items: Sequence[Item], crss: list[str], asset: str, target: Any, res: float
) -> tuple[float, float]:
    """A pixel corner of the items' own grid, when the cube keeps their CRS and resolution.

    Snapping to it keeps the cube on the native pixel grid (no sub-pixel shift, reads without
    resampling) also when the native origin is not a multiple of the pixel size. The earliest
    item decides, so re-runs and appends of the same acquisitions get the same grid.
    """
    eps = 1e-9 * max(1.0, abs(res))
    ordered = sorted(
        zip(items, crss, strict=True),
        key=lambda p: (p[0]["properties"].get("datetime") or "", p[0]["id"]),
    )
    for item, crs in ordered:
        grid = _item_grid(item, asset)
        if grid is None or parse_crs(crs) != target:
            continue
        (a, _, c, _, e, f), _shape = grid
        if abs(abs(a) - res) > eps or abs(abs(e) - res) > eps:
            continue
        # Origins on multiples of the pixel size need no anchor (and keep exact arithmetic).
        on_multiple = [abs(v / res - round(v / res)) < 1e-6 for v in (c, f)]
        return (0.0 if on_multiple[0] else c, 0.0 if on_multiple[1] else f)
    return (0.0, 0.0)


def _snap(
    bounds: tuple[float, float, float, float],
    res: float,
    anchor: tuple[float, float] = (0.0, 0.0),
) -> tuple[tuple[float, float, float, float, float, float], tuple[int, int]]:
    """Grid whose pixel edges sit on ``anchor`` + multiples of the resolution, so epochs align."""
    left, bottom, right, top = bounds
    ax, ay = anchor
    eps = 1e-9 * max(1.0, abs(res))
    x0 = ax + math.floor((left - ax) / res + eps) * res
    y0 = ay + math.ceil((top - ay) / res - eps) * res
    width = max(1, math.ceil((right - x0) / res - eps))
    height = max(1, math.ceil((y0 - bottom) / res - eps))
    return (res, 0.0, x0, 0.0, -res, y0), (height, width)


# --------------------------------------------------------------------------- preflight


def check_assets(items: Sequence[Item], plan: CubePlan, *, threads: int = 8) -> list[str]:
    """Open every asset's header once; return ids of items with an unreadable asset.

    Raises:
        AssetReadError: an asset cannot be read and ``plan.fill_missing`` is off.
    """
    import rasterio

    keys = sorted(
        {b.asset for b in plan.bands} | ({plan.label_asset} if plan.label_asset else set())
    )
    jobs = [(it["id"], k, it["assets"][k]["href"]) for it in items for k in keys]

    def probe(job: tuple[str, str, str]) -> tuple[str, str, str, str | None]:
        item_id, key, href = job
        try:
            with rasterio.open(href):
                return item_id, key, href, None
        except rasterio.errors.RasterioIOError as exc:
            return item_id, key, href, str(exc).splitlines()[0] if str(exc) else "unreadable"

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        failures = [r for r in pool.map(probe, jobs) if r[3] is not None]
    if failures and not plan.fill_missing:
        item_id, key, href, why = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise AssetReadError(
            f"cannot read asset {key!r} of item {item_id!r} at {href}: {why}{more}; fix the "
            "catalog, or pass --fill-missing to fill such items with nodata"
        )
    bad = sorted({f[0] for f in failures})
    if bad:
        warnings.warn(
            f"{len(bad)} item(s) with unreadable assets are filled with nodata: {', '.join(bad)}",
            PlanetsegWarning,
            stacklevel=2,
        )
    return bad


# --------------------------------------------------------------------------- the store


def _template(plan: CubePlan, times: Sequence[TimeStep], *, static_labels: bool) -> Any:
    """A Dataset with the store's variables as never-computed Dask zeros (metadata only).

    One Dask chunk per variable (the zarr chunks come from :func:`_encoding`): to_zarr writes
    metadata only, and a graph of one node per tile would cost minutes and gigabytes to build
    for a terabyte cube.
    """
    import dask.array as da
    import xarray as xr

    h, w = plan.shape
    nb = len(plan.bands)
    coords = {
        "time": np.array([_np_time(s.datetime) for s in times], dtype="datetime64[ns]"),
        "band": np.array(plan.band_names, dtype=object),
        **pixel_centres(plan.transform, plan.shape),
        "spatial_ref": xr.Variable((), np.int32(0), attrs=cf_attrs(plan.crs_wkt, plan.transform)),
    }
    image = da.zeros((len(times), nb, h, w), dtype=plan.dtype, chunks=-1)
    data = {"image": (("time", "band", "y", "x"), image, {"grid_mapping": "spatial_ref"})}
    if plan.label_asset:
        data["labels"] = (
            ("time", "y", "x"),
            da.zeros((len(times), h, w), dtype="uint8", chunks=-1),
            {"grid_mapping": "spatial_ref"},
        )
    if static_labels:
        data["labels"] = (
            ("y", "x"),
            da.zeros((h, w), dtype="uint8", chunks=-1),
            {"grid_mapping": "spatial_ref"},
        )
    if plan.coverage:
        data[COVERAGE] = (
            ("time", "y", "x"),
            da.ones((len(times), h, w), dtype="uint8", chunks=-1),
            {"grid_mapping": "spatial_ref", "long_name": "pixel covered by an item (1) or not"},
        )
    ds = xr.Dataset(data, coords=coords)
    ds["x"].attrs.update(standard_name="projection_x_coordinate", axis="X")
    ds["y"].attrs.update(standard_name="projection_y_coordinate", axis="Y")
    return ds


def _np_time(text: str) -> np.datetime64:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.UTC)
    return np.datetime64(t.replace(tzinfo=None), "ns")


def _encoding(plan: CubePlan, ds: Any) -> dict[str, Any]:
    t = plan.tile
    fill = (
        plan.nodata
        if plan.nodata is not None
        else (0 if np.issubdtype(np.dtype(plan.dtype), np.integer) else float("nan"))
    )
    enc: dict[str, Any] = {
        "image": {"chunks": (1, len(plan.bands), t, t), "fill_value": fill},
        "time": {"units": "microseconds since 1970-01-01", "dtype": "int64"},
    }
    if "labels" in ds:
        chunks = (t, t) if ds["labels"].dims == ("y", "x") else (1, t, t)
        enc["labels"] = {"chunks": chunks, "fill_value": 0}
    if COVERAGE in ds:
        enc[COVERAGE] = {"chunks": (1, t, t), "fill_value": 1}
    return enc


@dataclass
class StoreState:
    """What an existing store already holds.

    Attributes:
        exists: Whether the store exists.
        complete: Whether it was marked complete.
        keys: Time-step keys in the store, in order.
        times_done: Leading time steps known to be fully written.
        static_done: Whether time-less labels are fully written (or there are none).
        done: Markers of tiles written since the store was last complete.
    """

    exists: bool
    complete: bool = False
    keys: list[str] = field(default_factory=list)
    times_done: int = 0
    static_done: bool = True
    done: set[str] = field(default_factory=set)


def read_state(store: Path) -> StoreState:
    """Inspect a store written by :func:`ingest` (absent stores give ``exists=False``).

    Raises:
        StoreMismatchError: the path holds something that is not a planetseg cube.
    """
    import zarr

    if not (store / "zarr.json").exists():
        if store.exists() and any(store.iterdir()):
            raise StoreMismatchError(
                f"{store} exists and is not a planetseg cube: choose another --out"
            )
        return StoreState(False)
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    plan = attrs.get("planetseg:plan")
    if plan is None:
        raise StoreMismatchError(f"{store} is not a planetseg cube: choose another --out")
    done = done_markers(store)
    return StoreState(
        True,
        bool(attrs.get("planetseg:complete")),
        [t.key for t in CubePlan.from_json(plan).times],
        int(attrs.get("planetseg:times_done", 0)),
        bool(attrs.get("planetseg:static_done", True)),
        done,
    )


def tile_marker(t: int | None, iy: int, ix: int) -> str:
    """Name of the marker a written tile leaves in the progress folder."""
    return f"s-{iy}-{ix}" if t is None else f"t{t}-{iy}-{ix}"


# --------------------------------------------------------------------------- execution


def _write_block(
    store: str,
    t: int | None,
    origin: tuple[int, int],
    tiles: list[tuple[int, int]],
    tile: int,
    image: np.ndarray | None,
    labels: np.ndarray | None,
    *,
    whole: bool = False,
    valid: np.ndarray | None = None,
) -> int:
    """Write tiles out of one block read at pixel ``origin``, then mark them.

    Runs on a worker. The arrays are opened once per block, not once per tile; a marker is
    touched only after its tile's chunks are written, so a kill never marks a tile done early.
    Every chunk is written, all-fill ones too, so a missing chunk is always lost data. With
    ``whole`` (``tiles`` are all the block's) the block is written in one call, which lets zarr
    encode and store its chunks together, and the markers follow it. ``valid`` (the block's
    :data:`COVERAGE`) is written only in the tiles that have an uncovered pixel, before the
    image's.

    Returns:
        The number of tiles written.
    """
    y0, x0 = origin
    image_out = open_for_writing(store, "image") if image is not None else None
    labels_out = open_for_writing(store, "labels") if labels is not None else None
    if valid is not None and not valid.all():
        valid_out = open_for_writing(store, COVERAGE)
        for iy, ix in tiles:
            ys, xs = slice(iy * tile, (iy + 1) * tile), slice(ix * tile, (ix + 1) * tile)
            part = valid[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            if not part.all():
                valid_out[t, ys, xs] = part
    marks = progress_dir(Path(store))
    # Each write: the cube's rows and columns, and the tiles it completes.
    if whole:
        h, w = (image if image is not None else labels).shape[-2:]  # type: ignore[union-attr]
        writes = [((slice(y0, y0 + h), slice(x0, x0 + w)), tiles)]
    else:
        writes = [
            ((slice(iy * tile, (iy + 1) * tile), slice(ix * tile, (ix + 1) * tile)), [(iy, ix)])
            for iy, ix in tiles
        ]
    for (ys, xs), completed in writes:
        ly, lx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        if image_out is not None:
            image_out[t, :, ys, xs] = image[0, :, ly, lx]
        if labels_out is not None:
            if t is None:
                labels_out[ys, xs] = labels[ly, lx]
            else:
                labels_out[t, ys, xs] = labels[0, ly, lx]
        for iy, ix in completed:
            (marks / tile_marker(t, iy, ix)).touch()
    return len(tiles)


def _static_labels_tile(plan: CubePlan, iy: int, ix: int, catalog: Any) -> np.ndarray:
    from affine import Affine

    from planetseg import labels as lab

    t = plan.tile
    a, b, c, d, e, f = plan.transform
    h = min(t, plan.shape[0] - iy * t)
    w = min(t, plan.shape[1] - ix * t)
    transform = Affine(a, b, c + a * ix * t, d, e, f + e * iy * t)
    if catalog is not None:
        values = lab.class_values(catalog.classes)
        return lab.rasterize_craters(
            catalog, crs=plan.crs_wkt, transform=transform, shape=(h, w), values=values
        )
    array, _ = lab.rasterize_polygons(
        plan.label_source,
        crs=plan.crs_wkt,
        transform=transform,
        shape=(h, w),
        field=plan.label_field,
    )
    return array


@dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest` did.

    Attributes:
        store: The cube's path.
        plan: The full plan of the store (all time steps).
        written: Tiles written by this run.
        skipped: Tiles already present (resume) and left alone.
        appended: Time-step keys appended by this run.
        filled: Items whose unreadable assets were filled with nodata.
    """

    store: Path
    plan: CubePlan
    written: int
    skipped: int
    appended: tuple[str, ...] = ()
    filled: tuple[str, ...] = ()


def load_items(source: str | Path | Sequence[Item]) -> list[Item]:
    """Items from a list, or from an items file written by ``planetseg search``."""
    if isinstance(source, (str, Path)):
        return read_items(source)
    return list(source)


def ingest(
    items: str | Path | Sequence[Item],
    config: IngestConfig,
    *,
    client: Any = None,
    progress: Progress | None = None,
    provenance: dict[str, Any] | None = None,
) -> IngestResult:
    """Ingest items into the cube at ``config.out`` (create, resume or append).

    Args:
        items: Item dicts, or an items file.
        config: Grid, bands, labels and engine.
        client: A ``distributed.Client`` to compute on; None uses Dask's threaded scheduler.
        progress: Called as ``progress(done, total)`` as tiles are written.
        provenance: Extra provenance for the store's attributes (e.g. the search query).

    Raises:
        PlanetsegError: see :func:`plan_ingest`, :func:`check_memory` and
            :func:`check_assets`;
            :class:`~planetseg.errors.StoreMismatchError` when ``config.out`` holds a cube on
            another grid; :class:`~planetseg.errors.OutputPathError` when it is an input, a
            file, not writable, or holds what ingest did not write (see
            :func:`planetseg.store.prepare_output`).
    """
    from planetseg.loaders import get_loader

    store = Path(config.out)
    labels_file = config.labels if config.labels and _is_file(config.labels) else None
    output = prepare_output(
        store,
        "ingest",
        kind="store",
        inputs=(items if isinstance(items, (str, Path)) else None, labels_file),
        scratch=(PROGRESS_SUFFIX,),
    )
    loader = get_loader(config.engine)
    items = load_items(items)
    state = read_state(store)
    existed = state.exists
    # An existing cube keeps its grid: new acquisitions go onto it wherever they lie.
    old = CubePlan.from_json(get_attr(store, "planetseg:plan")) if existed else None
    plan = plan_ingest(items, config, onto=old)
    loader.check(plan)
    check_memory(plan, client)
    by_id = {it["id"]: it for it in items}
    new_times = plan.times
    if old is not None:
        _check_same_cube(store, old, plan, nodata=config.nodata)
        known = set(state.keys)
        new_times = tuple(t for t in plan.times if t.key not in known)
        if new_times and not state.complete:
            raise StoreMismatchError(
                f"{store} is an unfinished ingest of other acquisitions: re-run that ingest to "
                "finish it before appending"
            )
        check_overlap([by_id[i] for step in new_times for i in step.item_ids], old, store)
        plan = replace(
            old,
            times=old.times + new_times,
            fill_missing=plan.fill_missing,
            read_block=plan.read_block,
        )
    filled = (
        check_assets([by_id[i] for s in new_times for i in s.item_ids], plan) if new_times else []
    )
    if not state.exists:
        remove_owned(progress_dir(store), "ingest")  # markers of a store that is gone
        _create_store(output, plan, config, provenance, by_id)
    elif new_times:
        _append_times(store, plan, new_times)
    if existed and not state.complete:
        drop_partial_writes(store)
    create_owned_dir(progress_dir(store), "ingest")
    state = read_state(store)
    tasks = BlockTasks.of(plan)
    todo = tasks.todo(state.times_done, state.static_done)
    lost = _lost_tiles(store, plan, tasks, todo) if existed and not new_times else []
    if lost:
        # A complete store that lost chunks: rewrite their tiles, marked unfinished meanwhile.
        logger.warning("%s: %d tile(s) lost chunks: rewriting them", store, len(lost))
        set_attrs(store, **{"planetseg:complete": False})
    sources = BlockSources.of(plan, by_id, config.engine)
    if (
        new_times
        and plan.nodata is None
        and not plan.coverage
        and np.dtype(plan.dtype).kind in "iu"
    ):
        _warn_uncovered(plan, by_id, new_times)  # 64-bit, or a cube made before COVERAGE
    written, skipped = _execute(
        store,
        tasks,
        todo,
        sources,
        done=state.done,
        lost=lost,
        client=client,
        progress=progress,
        batch=config.batch_tiles,
    )
    set_attrs(
        store,
        **{
            "planetseg:complete": True,
            "planetseg:times_done": len(plan.times),
            "planetseg:static_done": True,
        },
    )
    consolidate(store)
    remove_owned(progress_dir(store), "ingest")
    appended = tuple(s.key for s in new_times) if existed else ()
    logger.info("%s: %d tiles written, %d already there", store, written, skipped)
    return IngestResult(store, plan, written, skipped, appended, tuple(filled))


def _warn_uncovered(plan: CubePlan, items: dict[str, Item], steps: Sequence[TimeStep]) -> None:
    """Warn of time steps whose items leave part of an integer cube without nodata uncovered.

    Their pixels there are 0, and 0 is a pixel value like any other to ``segment`` (it would
    label them as data): the fix is a nodata value (``--nodata``) or a float cube (NaN).
    Footprints are the items' grids (their lon/lat bbox when in another CRS).
    """
    import shapely
    from pyproj import Transformer

    from planetseg.bodies import body_of_crs

    target = parse_crs(plan.crs_wkt)
    to_target = Transformer.from_crs(body_of_crs(target).crs, target, always_xy=True)
    asset = plan.bands[0].asset
    grid = shapely.box(*plan.bounds)
    short = []
    for step in steps:
        fps = [
            _footprint(items[i], _item_crs(items[i], asset), asset, target, to_target)
            for i in step.item_ids
        ]
        if not fps or None in fps:
            continue  # an item of unknown extent: nothing to tell
        covered = shapely.union_all([shapely.box(*fp[:4]) for fp in fps]).intersection(grid).area
        if covered < grid.area * (1 - 1e-9):
            short.append(f"{step.key} ({100 * covered / grid.area:.1f} %)")
    if short:
        warnings.warn(
            f"time step(s) {', '.join(short[:5])}{' ...' if len(short) > 5 else ''} do not "
            f"cover the whole cube: outside their items the {plan.dtype} cube holds 0, which "
            "segment takes as data; ingest into a cube with --nodata (a value the data never "
            "takes) or --dtype float32 (NaN) to have those pixels marked missing",
            PlanetsegWarning,
            stacklevel=3,
        )


def _check_same_cube(
    store: Path, old: CubePlan, new: CubePlan, *, nodata: float | None = None
) -> None:
    """Refuse an ingest into ``store`` whose settings are not the cube's.

    Tiles, bands, dtype and labels; and ``nodata`` (the ``--nodata`` given, if one was): the
    items' own may differ between epochs.

    Raises:
        StoreMismatchError: naming the first setting that differs and the cube's value.
    """
    assets = ",".join(dict.fromkeys(b.asset for b in old.bands))
    fixes = {
        "tile": f"pass --tile {old.tile}",
        "bands": f"pass --bands {assets}",
        "dtype": f"pass --dtype {old.dtype}",
        "labels": "give --labels as the cube was made (with or without)",
    }
    mine, theirs = new.grid_signature(), old.grid_signature()
    if nodata is not None:
        fixes["nodata"] = "leave --nodata out"
        mine["nodata"], theirs["nodata"] = nodata, old.nodata
    for key, fix in fixes.items():
        if mine[key] != theirs[key]:
            raise StoreMismatchError(
                f"{store} holds a cube with {key} {theirs[key]}, not {mine[key]}: {fix} to add "
                "to it, or choose another --out"
            )


def check_overlap(items: Sequence[Item], cube: CubePlan, store: Path) -> None:
    """Refuse items that do not reach the cube's grid at all (they would add nodata only).

    An item's footprint is its ``proj:transform``/``proj:shape`` when it is in the cube's
    CRS, else its lon/lat ``bbox`` projected onto the cube's CRS.

    Raises:
        InvalidArgumentError: naming the first such item, its extent and the cube's.
    """
    from pyproj import Transformer

    from planetseg.bodies import body_of_crs

    if not items:
        return
    target = parse_crs(cube.crs_wkt)
    asset = cube.bands[0].asset
    crss = [_item_crs(it, asset) for it in items]
    left, bottom, right, top = cube.bounds
    to_target = Transformer.from_crs(body_of_crs(target).crs, target, always_xy=True)
    for item, crs in zip(items, crss, strict=True):
        fp = _footprint(item, crs, asset, target, to_target)
        if fp is None:
            continue
        if fp[0] < right and fp[2] > left and fp[1] < top and fp[3] > bottom:
            continue
        where = f" (lon/lat {_lonlat(item['bbox'])})" if item.get("bbox") else ""
        raise InvalidArgumentError(
            f"item {item['id']!r}{where} does not intersect the cube {store} (lon/lat "
            f"{_lonlat(_cube_lonlat(cube))}): ingest it into another --out"
        )


def _create_store(
    output: Output,
    plan: CubePlan,
    config: IngestConfig,
    provenance: dict[str, Any] | None,
    items: dict[str, Item],
) -> None:
    ds = _template(plan, plan.times, static_labels=bool(plan.label_source))
    ds.attrs.update(_store_attrs(plan, config, provenance, items))
    try:
        ds.to_zarr(
            str(output.path),
            mode="w",
            compute=False,
            zarr_format=3,
            consolidated=False,
            encoding=_encoding(plan, ds),
        )
    except BaseException:
        output.discard()
        raise
    consolidate(output.path)


def unfinished_tiles(
    plan: CubePlan, times_done: int = 0, static_done: bool | None = None
) -> list[tuple[int | None, int, int]]:
    """Tiles ``(time or None, row, column)`` after the first ``times_done`` time steps.

    Time-less label tiles (``None``) come last, unless ``static_done`` (default: the plan
    has none).
    """
    ny, nx = plan.tiles_yx
    timed = range(times_done, len(plan.times))
    tiles = [(t, iy, ix) for t in timed for iy in range(ny) for ix in range(nx)]
    if not (static_done if static_done is not None else not plan.label_source):
        tiles += [(None, iy, ix) for iy in range(ny) for ix in range(nx)]
    return tiles


def _lost_tiles(
    store: Path, plan: CubePlan, tasks: BlockTasks, todo: range
) -> list[tuple[int | None, int, int]]:
    """Tiles outside the tasks ``todo`` with a chunk missing, in a store that writes every chunk.

    A full listing of the store: done when an ingest is re-run on an existing store, which is
    how a store that lost chunks is repaired.
    """
    if not get_attr(store, EVERY_CHUNK):
        return []
    lost: set[tuple[int | None, int, int]] = set()
    for t, _, iy, ix in missing_chunks(store, "image"):
        lost.add((t, iy, ix))
    if plan.label_asset or plan.label_source:
        for coords in missing_chunks(store, "labels"):
            lost.add((None, *coords) if len(coords) == 2 else coords)  # type: ignore[arg-type]
    return sorted(
        (k for k in lost if tasks.task_of(*k) not in todo),
        key=lambda k: (k[0] is None, k[0] or 0, k[1], k[2]),
    )


def _append_times(store: Path, plan: CubePlan, new_times: Sequence[TimeStep]) -> None:
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs)
    # Mark unfinished first: if we die during the append, the store must not pass as complete.
    group.attrs.update({"planetseg:complete": False})
    ds = _template(plan, new_times, static_labels=False)
    ds = ds.drop_vars(["x", "y", "band", "spatial_ref"])
    if "labels" in ds and ds["labels"].dims != ("time", "y", "x"):
        ds = ds.drop_vars("labels")
    ds.to_zarr(str(store), mode="a", append_dim="time", compute=False, consolidated=False)
    # to_zarr replaces the group's attributes with the (empty) template's: restore them.
    attrs.update(
        {
            "planetseg:complete": False,
            "planetseg:plan": plan.to_json(),
            "planetseg:items": {t.key: list(t.item_ids) for t in plan.times},
        }
    )
    zarr.open_group(str(store), mode="r+").attrs.update(attrs)
    consolidate(store)  # the arrays' shapes changed


def _store_attrs(
    plan: CubePlan,
    config: IngestConfig,
    provenance: dict[str, Any] | None,
    items: dict[str, Item],
) -> dict[str, Any]:
    return {
        STAGE_ATTR: "ingest",
        "planetseg:complete": False,
        EVERY_CHUNK: True,
        "planetseg:times_done": 0,
        "planetseg:static_done": not plan.label_source,
        "planetseg:version": __version__,
        "planetseg:plan": plan.to_json(),
        "planetseg:items": {t.key: list(t.item_ids) for t in plan.times},
        "planetseg:body": plan.body,
        "planetseg:engine": config.engine,
        "planetseg:config": json.dumps(asdict(config), default=str),
        "planetseg:provenance": json.dumps(provenance or {}, default=str),
        "planetseg:classes": json.dumps(_classes(plan, items)),
    }


def _classes(plan: CubePlan, items: dict[str, Item]) -> dict[str, str]:
    """Label value -> class name.

    A label asset's come from its STAC ``classification:classes`` (first item that has them);
    a label file's are numbered as :func:`planetseg.labels.class_values` does, reading the file
    now so that a bad file fails before anything is written.
    """
    if plan.label_asset:
        for step in plan.times:
            for item_id in step.item_ids:
                asset = items[item_id]["assets"][plan.label_asset]
                listed = asset.get("classification:classes") or []
                named = {
                    str(int(c["value"])): str(c.get("name") or c.get("description") or "")
                    for c in listed
                    if isinstance(c, dict) and "value" in c
                }
                if named:
                    return named
        return {}
    if not plan.label_source:
        return {}
    from planetseg import labels as lab

    if lab.is_crater_catalog(plan.label_source):
        names = lab.read_crater_catalog(plan.label_source).classes
    else:
        names = lab.polygon_classes(plan.label_source, field=plan.label_field, crs=plan.crs_wkt)
    values = lab.class_values(names)
    return {"0": "background", **{str(v): k for k, v in values.items()}}


@dataclass(frozen=True)
class BlockTasks:
    """Ingest's work as numbered tasks (a :class:`planetseg.executor.TaskPlan`).

    Task ``index`` is one read block (``plan.block`` px a side, whole tiles) of one time step
    (``t * blocks + row * block columns + column``), or, after every time step's, one block of
    the time-less labels. Computed from the index, never listed. A task writes the block's
    tiles, each followed by its marker (:func:`tile_marker`), so a task is done when all its
    tiles' markers are there.

    Attributes:
        plan: The cube's plan, without the time steps' item ids (each task carries it; the
            items travel once, in :class:`BlockSources`).
    """

    plan: CubePlan

    @classmethod
    def of(cls, plan: CubePlan) -> BlockTasks:
        """The tasks of ``plan`` (all time steps, and the time-less labels if it has them)."""
        times = tuple(replace(step, item_ids=()) for step in plan.times)
        return cls(replace(plan, times=times))

    @property
    def per_block(self) -> int:
        """Tiles per block side."""
        return self.plan.block // self.plan.tile

    @property
    def blocks_yx(self) -> tuple[int, int]:
        """Blocks along y and x."""
        ny, nx = self.plan.tiles_yx
        return math.ceil(ny / self.per_block), math.ceil(nx / self.per_block)

    @property
    def per_time(self) -> int:
        """Blocks per time step (and of the time-less labels)."""
        by, bx = self.blocks_yx
        return by * bx

    @property
    def n_tasks(self) -> int:
        """Blocks of every time step, then of the time-less labels."""
        static = 1 if self.plan.label_source else 0
        return (len(self.plan.times) + static) * self.per_time

    def todo(self, times_done: int, static_done: bool) -> range:
        """Tasks after the first ``times_done`` time steps (the time-less ones, unless done)."""
        end = len(self.plan.times) if static_done else len(self.plan.times) + 1
        return range(times_done * self.per_time, min(end * self.per_time, self.n_tasks))

    def block(self, index: int) -> tuple[int | None, int, int]:
        """Task ``index`` -> (time step or None for the time-less labels, block row, column)."""
        t, rest = divmod(index, self.per_time)
        by, bx = divmod(rest, self.blocks_yx[1])
        return (t if t < len(self.plan.times) else None), by, bx

    def task_of(self, t: int | None, iy: int, ix: int) -> int:
        """The task that writes tile ``(t, iy, ix)``."""
        k = len(self.plan.times) if t is None else t
        return k * self.per_time + iy // self.per_block * self.blocks_yx[1] + ix // self.per_block

    def window(self, index: int) -> tuple[slice, slice]:
        """Rows and columns of task ``index``'s block (cut at the grid's edge)."""
        _, by, bx = self.block(index)
        b, (h, w) = self.plan.block, self.plan.shape
        return slice(by * b, min((by + 1) * b, h)), slice(bx * b, min((bx + 1) * b, w))

    def tiles(self, index: int) -> list[tuple[int, int]]:
        """Tiles ``(row, column)`` of task ``index``'s block."""
        ys, xs = self.window(index)
        t = self.plan.tile
        return [
            (iy, ix)
            for iy in range(ys.start // t, math.ceil(ys.stop / t))
            for ix in range(xs.start // t, math.ceil(xs.stop / t))
        ]

    def n_tiles(self, tasks: range) -> int:
        """Tiles of a range of tasks (whole time steps, computed rather than counted)."""
        ny, nx = self.plan.tiles_yx
        return len(tasks) // self.per_time * ny * nx

    def markers(self, index: int) -> list[str]:
        """Markers task ``index`` leaves: one per tile."""
        t = self.block(index)[0]
        return [tile_marker(t, iy, ix) for iy, ix in self.tiles(index)]


@dataclass(frozen=True)
class BlockSources:
    """What ingest's tasks read from, sent to each worker once (``client.scatter``).

    Attributes:
        engine: Loader engine name.
        steps: Items of each time step, in the step's order.
        footprints: Per time step, ``(n, 4)`` bounds ``(left, bottom, right, top)`` of its
            items in the cube's CRS, widened by a margin (infinite where unknown): a task
            reads only the items whose footprint meets its block.
        catalog: The crater catalog the time-less labels are drawn from (None for none, or
            a polygon file, which each task reads).
        run: This run's name: a worker thread keeps the files it reads open across the
            run's tasks (:func:`planetseg.loaders.datasets_kept_open`), and opens them anew
            in the next run.
    """

    engine: str
    steps: tuple[tuple[Item, ...], ...]
    footprints: tuple[np.ndarray, ...]
    catalog: Any = None
    run: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, plan: CubePlan, items: dict[str, Item], engine: str) -> BlockSources:
        """The sources of ``plan``'s time steps (metadata only: no pixel is read)."""
        from pyproj import Transformer

        from planetseg.bodies import body_of_crs

        target = parse_crs(plan.crs_wkt)
        to_target = Transformer.from_crs(body_of_crs(target).crs, target, always_xy=True)
        asset = plan.bands[0].asset
        margin = 2 * max(abs(plan.transform[0]), abs(plan.transform[4]))
        # Items of earlier time steps may be missing from an append's: no task reads them.
        steps = tuple(tuple(items[i] for i in s.item_ids if i in items) for s in plan.times)
        footprints = []
        for members in steps:
            bounds = np.empty((len(members), 4))
            for k, item in enumerate(members):
                fp = _footprint(item, _item_crs(item, asset), asset, target, to_target)
                if fp is None:
                    bounds[k] = (-np.inf, -np.inf, np.inf, np.inf)
                    continue
                # A footprint from a lon/lat bbox is approximate: widen it by 1 % too.
                slack = margin + (0.01 * max(fp[2] - fp[0], fp[3] - fp[1]) if fp.approx else 0)
                bounds[k] = (fp[0] - slack, fp[1] - slack, fp[2] + slack, fp[3] + slack)
            footprints.append(bounds)
        catalog = None
        if plan.label_source:
            from planetseg.labels import is_crater_catalog, read_crater_catalog

            if is_crater_catalog(plan.label_source):
                catalog = read_crater_catalog(plan.label_source)
        return cls(engine, steps, tuple(footprints), catalog)

    def meeting(self, t: int, plan: CubePlan, window: tuple[slice, slice]) -> list[Item]:
        """Items of time step ``t`` whose footprint meets ``window``, in the step's order.

        At least one: a block no item meets is read from the step's first item, which gives
        the nodata a lazy load of the whole step gives there.
        """
        ys, xs = window
        a, _, c, _, e, f = plan.transform
        left, right = sorted((c + a * xs.start, c + a * xs.stop))
        bottom, top = sorted((f + e * ys.stop, f + e * ys.start))
        fp = self.footprints[t]
        hit = (fp[:, 0] <= right) & (fp[:, 2] >= left) & (fp[:, 1] <= top) & (fp[:, 3] >= bottom)
        members = self.steps[t]
        if not members:
            raise CatalogReadError(
                f"time step {plan.times[t].key} of the cube must be read again, and none of "
                "its items is among those given: ingest with the items of every time step"
            )
        return [members[k] for k in np.flatnonzero(hit)] or [members[0]]


def ingest_block(tasks: BlockTasks, index: int, store: str, sources: BlockSources) -> int:
    """Task ``index`` of ingest: read its block, write its tiles; return the tiles written.

    Runs on a worker (or a thread of this process). The block's pixels are read here, from the
    items that meet it (:meth:`Loader.read_block`), or its time-less labels drawn here, tile by
    tile. Tiles whose marker is already there (a resumed run) are neither read nor rewritten.
    """
    from planetseg.loaders import datasets_kept_open, get_loader

    plan = tasks.plan
    t, _, _ = tasks.block(index)
    marks = progress_dir(Path(store))
    every = tasks.tiles(index)
    tiles = [k for k in every if not (marks / tile_marker(t, *k)).exists()]
    if not tiles:
        return 0
    whole = len(tiles) == len(every)
    ys, xs = tasks.window(index)
    origin = (ys.start, xs.start)
    if t is None:
        labels = np.zeros((ys.stop - ys.start, xs.stop - xs.start), dtype="uint8")
        size = plan.tile
        for iy, ix in tiles:
            tile = _static_labels_tile(plan, iy, ix, sources.catalog)
            y, x = iy * size - ys.start, ix * size - xs.start
            labels[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
        return _write_block(store, None, origin, tiles, size, None, labels, whole=whole)
    loader = get_loader(sources.engine)
    # An integer cube without nodata is read wider, its fill out of the data's range: the
    # pixels that keep it are those no item covers (its COVERAGE); the image holds 0 there.
    wide = _coverage_read(plan)
    read_as = replace(plan, dtype=wide[0], nodata=wide[1]) if wide else plan
    with datasets_kept_open(sources.run):
        image, labels = loader.read_block(sources.meeting(t, plan, (ys, xs)), read_as, (ys, xs))
    valid = None
    if wide:
        valid = (image != wide[1]).all(axis=0)
        image = (image if valid.all() else np.where(valid, image, 0)).astype(plan.dtype)
    block_labels = labels[None] if labels is not None else None
    return _write_block(
        store, t, origin, tiles, plan.tile, image[None], block_labels, whole=whole, valid=valid
    )


#: Tasks kept in flight per worker thread: one running, one queued behind it.
PER_THREAD = 2


def _execute(
    store: Path,
    tasks: BlockTasks,
    todo: range,
    sources: BlockSources,
    *,
    done: set[str],
    lost: list[tuple[int | None, int, int]],
    client: Any,
    progress: Progress | None,
    batch: int | None,
) -> tuple[int, int]:
    """Run the tasks of ``todo`` not marked ``done``, and those of the ``lost`` tiles.

    Returns:
        Tiles written, and tiles of the job already there.
    """
    import os

    from planetseg.executor import InFlight, execute, pending

    # A lost tile's task rewrites that tile only: the rest of its block is marked done.
    lost_tasks = sorted({tasks.task_of(*k) for k in lost})
    lost_set = {tile_marker(*k) for k in lost}
    for index in lost_tasks:
        for name in tasks.markers(index):
            if name not in lost_set:
                (progress_dir(store) / name).touch()
    # With lost tiles the job is the whole cube (what a complete store holds), else the rest.
    total = tasks.n_tiles(range(tasks.n_tasks) if lost else todo)
    expected = tasks.n_tiles(todo) - len(done) + len(lost)
    if progress:
        progress(max(0, total - expected), total)
    indices = itertools.chain(lost_tasks, pending(tasks, done, todo))
    fixed = max(1, batch // tasks.per_block**2) if batch is not None else None
    threads = 1 if client is not None else os.cpu_count() or 1
    bound = InFlight(
        client, fixed=fixed, per_thread=PER_THREAD, minimum=PER_THREAD, threads=threads
    )
    shared = client.scatter(sources, broadcast=True, hash=False) if client is not None else sources
    try:
        written = execute(
            ingest_block,
            tasks,
            indices,
            str(store),
            shared,
            client=client,
            in_flight=bound,
            threads=threads,
            progress=progress,
            done=max(0, total - expected),
            total=total,
            name="ingest",
        )
    except Exception as exc:
        import rasterio

        if isinstance(exc, rasterio.errors.RasterioIOError):
            raise AssetReadError(
                f"reading pixels failed: {str(exc).splitlines()[0]}; the store stays marked "
                "incomplete: fix the asset (or pass --fill-missing) and re-run to resume"
            ) from exc
        raise
    finally:
        if client is not None:
            shared.release()
    return written, total - written
