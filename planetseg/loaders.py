"""Loader engines: STAC items -> a lazy ``xarray`` cube on a given grid.

The I/O boundary of ingest is one small contract, :class:`Loader`: given the items of a plan and
the plan itself, return ``image(time, band, y, x)`` (and ``labels(time, y, x)`` when the plan
takes labels from a raster asset) as Dask-backed arrays chunked one read block (``plan.block``
pixels, whole tiles) per chunk, **without reading pixels**; and ``read_block``, the pixels of one
block of one time step, read now, which is what an ingest task calls. Two engines implement it:

* ``odc`` (default): odc-stac. It understands WKT2 and IAU CRSs (with PROJ's celestial-body
  check lifted, see :func:`planetseg.bodies.celestial_proj`) and multi-band assets.
* ``stackstac``: for EPSG-coded Earth items. It reads only ``proj:epsg`` (pystac renames it to
  ``proj:code``, so it is put back) and cannot represent IAU CRSs or multi-band assets; both
  are refused with a message naming the other engine.

Both are driven with the same explicit grid, nearest resampling and full-resolution reads, so
they give the same cube pixel for pixel.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import rasterio
from odc.loader._rio import (
    RioDriver,
    RioReader,
    _do_read,
    _reproject_info_from_rio,
    resolve_band_query,
    rio_env,
)

from planetseg.bodies import celestial_proj
from planetseg.errors import AssetReadError, InvalidArgumentError
from planetseg.items import Item

if TYPE_CHECKING:
    import xarray as xr

    from planetseg.ingest import CubePlan

log = logging.getLogger(__name__)


class Loader(Protocol):
    """Turns the items of a plan into a lazy cube on the plan's grid."""

    name: str

    def check(self, plan: CubePlan) -> None:
        """Refuse, before anything is written, a plan this engine cannot load.

        Raises:
            InvalidArgumentError: the engine cannot represent the plan's CRS or bands.
        """
        ...

    def load(self, items: dict[str, Item], plan: CubePlan) -> xr.Dataset:
        """Return ``image(time, band, y, x)`` [+ ``labels(time, y, x)``], lazy, tile-chunked.

        Args:
            items: Item dicts by id (every id the plan's time steps name).
            plan: The grid, time steps, bands and tile size.
        """
        ...

    def read_block(
        self, items: Sequence[Item], plan: CubePlan, window: tuple[slice, slice]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read one block of one time step: its pixels now, as numpy arrays.

        What :meth:`load` gives for that block and time step, pixel for pixel, reading only
        what the block needs: a task of ingest calls it for its own block.

        Args:
            items: The time step's items that may meet the block (at least one), in the
                step's order.
            plan: The grid, bands and labels.
            window: Rows and columns of the block in the plan's grid.

        Returns:
            ``image(band, y, x)`` and, when the plan takes labels from an asset,
            ``labels(y, x)`` (else None).
        """
        ...


def _group_key(plan: CubePlan) -> dict[str, int]:
    return {item_id: i for i, step in enumerate(plan.times) for item_id in step.item_ids}


class OdcLoader:
    """odc-stac engine (default): any CRS PROJ knows, IAU included; multi-band assets."""

    name = "odc"

    def check(self, plan: CubePlan) -> None:
        """See :class:`Loader` (odc-stac loads any plan)."""

    def load(self, items: dict[str, Item], plan: CubePlan) -> xr.Dataset:
        """See :class:`Loader`."""
        import xarray as xr

        order = _group_key(plan)
        stac_items = [items[i] for i in order]
        names = _odc_bands(plan)

        def load(bands: list[str], dtype: str, nodata: float | None, resampling: str) -> Any:
            return _odc_load(
                stac_items,
                plan,
                bands,
                dtype,
                nodata,
                resampling,
                geobox=plan.geobox(),
                chunks={"x": plan.block, "y": plan.block},
                group=order.__getitem__,
            )

        ds = load(names, plan.dtype, plan.nodata, plan.resampling)
        image = xr.concat([ds[n] for n in names], dim="band").transpose("time", "band", "y", "x")
        out = xr.Dataset({"image": image.assign_coords(band=plan.band_names)})
        if plan.label_asset:
            out["labels"] = load([plan.label_asset], "uint8", 0, "nearest")[plan.label_asset]
        return out.chunk({"time": 1, "band": -1})

    def read_block(
        self, items: Sequence[Item], plan: CubePlan, window: tuple[slice, slice]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """See :class:`Loader`: odc-stac on the block's geobox, without Dask."""
        names = _odc_bands(plan)
        geobox = _grid(plan.crs_wkt, plan.transform, plan.shape)[window]

        def read(bands: list[str], dtype: str, nodata: float | None, resampling: str) -> Any:
            ds = _odc_load(
                items, plan, bands, dtype, nodata, resampling, geobox=geobox, chunks=None
            )
            return [ds[n].values[0] for n in bands]

        image = np.stack(read(names, plan.dtype, plan.nodata, plan.resampling))
        labels = read([plan.label_asset], "uint8", 0, "nearest")[0] if plan.label_asset else None
        return image, labels


@functools.lru_cache(maxsize=8)
def _grid(crs_wkt: str, transform: tuple[float, ...], shape: tuple[int, int]) -> Any:
    """A cube's grid as a GeoBox, made once per process; its blocks are slices of it.

    They share its CRS object, whose EPSG code (none, for an IAU CRS) PROJ searches for once,
    not once per block (0.4 s each).
    """
    from affine import Affine
    from odc.geo.geobox import GeoBox

    with celestial_proj():
        geobox = GeoBox(shape, Affine(*transform), crs_wkt)
        geobox.crs.to_epsg()
    return geobox


def _odc_bands(plan: CubePlan) -> list[str]:
    """odc-stac's names of the plan's bands.

    A multi-band asset shows up as "asset.1", "asset.2", ... when its raster:bands says how
    many bands it has; asking for "asset" alone would read band 1 only.
    """
    return [f"{b.asset}.{b.index}" if b.multiband else b.asset for b in plan.bands]


def _odc_load(
    items: Sequence[Item],
    plan: CubePlan,
    bands: list[str],
    dtype: str,
    nodata: float | None,
    resampling: str,
    *,
    geobox: Any,
    chunks: dict[str, int] | None,
    group: Callable[[str], int] | None = None,
) -> xr.Dataset:
    """``odc.stac.load`` of ``items`` on ``geobox``, as planetseg reads.

    Full resolution, read errors that name the file, one time step per ``group(item id)`` (all
    in one without it), y/x dims. ``chunks`` None reads the pixels now (numpy); else the
    result is lazy.
    """
    import odc.stac
    import pystac

    stac_items = [pystac.Item.from_dict(item, migrate=False) for item in items]
    with celestial_proj():
        ds = odc.stac.load(
            stac_items,
            bands=bands,
            geobox=geobox,
            chunks=chunks,
            groupby=lambda item, _parsed, _idx: group(item.id) if group else 0,
            resampling=resampling,
            dtype=dtype,
            nodata=nodata,
            use_overviews=False,  # read full resolution, as stackstac does
            fail_on_error=not plan.fill_missing,
            driver=NamingRioDriver(),
        )
    return _yx(ds)


#: Datasets one thread keeps open for a run (least recently used closed first).
MAX_OPEN = 32


class _OpenDatasets(threading.local):
    """This thread's open GDAL datasets, by URI, for one run (GDAL's are not thread-safe)."""

    def __init__(self) -> None:
        self.run: str | None = None
        self.active = False
        self.datasets: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def close(self, uri: str | None = None) -> None:
        """Close one dataset (``uri``), or all of them."""
        for key in [uri] if uri is not None else list(self.datasets):
            dataset = self.datasets.pop(key, None)
            if dataset is not None:
                dataset.close()

    def get(self, uri: str) -> Any:
        """The open dataset of ``uri``, opened now if it is not."""
        dataset = self.datasets.pop(uri, None)
        if dataset is None:
            dataset = rasterio.open(uri, "r", sharing=False)
        self.datasets[uri] = dataset
        while len(self.datasets) > MAX_OPEN:
            self.datasets.popitem(last=False)[1].close()
        return dataset


_OPEN = _OpenDatasets()


@contextlib.contextmanager
def datasets_kept_open(run: str) -> Iterator[None]:
    """Keep the datasets this thread reads open across the calls of one run.

    An ingest task reads its block within this; the next task of the same ``run`` in this thread
    reads from the same open datasets, without opening the file again (over HTTP an open is a
    request or more for the header, and as long as the block's read itself). A new ``run`` in
    the thread closes the previous run's, so a file replaced between runs is opened anew. At
    most :data:`MAX_OPEN` stay open per thread; the blocks they read stay in GDAL's block
    cache (``GDAL_CACHEMAX``, 5 % of the RAM by default) until newer ones evict them.
    """
    if _OPEN.run != run:
        _OPEN.close()
        _OPEN.run = run
    _OPEN.active = True
    try:
        yield
    finally:
        _OPEN.active = False


class NamingRioReader(RioReader):
    """odc-loader's rasterio reader, whose read failures name the file in one line.

    Within :func:`datasets_kept_open` it reads from the thread's open dataset of the file
    (odc-loader's own reader opens and closes the file for every read); its read is then
    odc-loader's, with the same pixel placement.
    """

    def read(self, cfg: Any, dst_geobox: Any, **kwargs: Any) -> Any:
        """See ``RioReader.read``.

        Raises:
            AssetReadError: the pixels cannot be read (a corrupt TIFF whose header opens).
        """
        src = self._src
        try:
            out = None
            if _OPEN.active and not cfg.use_overviews:
                try:
                    out = _read_open(_OPEN.get(src.uri), src, cfg, dst_geobox, **kwargs)
                except rasterio.errors.RasterioError:
                    _OPEN.close(src.uri)
                    raise
            return out if out is not None else super().read(cfg, dst_geobox, **kwargs)
        except rasterio.errors.RasterioError as exc:
            if not cfg.fail_on_error:  # as odc-loader's reader: an empty read, nodata
                log.warning("ignoring a failed read of %s: %s", src.uri, _gdal_reason(exc))
                return np.s_[0:0, 0:0], np.ndarray((0, 0), dtype=cfg.dtype)
            error = AssetReadError(
                f"cannot read the pixels of {self._src.uri} (band {self._src.band}): "
                f"{_gdal_reason(exc)}; replace the file (or pass --fill-missing to fill it "
                "with nodata) and re-run: the store stays unfinished and resumes"
            )
        # Raised outside the handler, so without rasterio's exceptions as its context: this
        # runs on a worker, and distributed sends the chain too, where GDAL's errors do not
        # unpickle and the client would get a bare Exception instead.
        raise error


def _read_open(
    dataset: Any, src: Any, cfg: Any, dst_geobox: Any, *, dst: Any = None, selection: Any = None
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """odc-loader's full-resolution read of ``src`` into ``dst_geobox``, from an open dataset.

    None for a read whose bands odc-loader lays out band-last (``y, x, band``): its own reader
    reads that.
    """
    bidx = resolve_band_query(src, dataset.count, selection=selection)
    if src.ydim != 1 and not isinstance(bidx, int):
        return None
    # As odc-loader: with nearest resampling a sub-pixel shift still pastes pixels as they are.
    info = _reproject_info_from_rio(dataset, dst_geobox, ttol=0.9 if cfg.nearest else 0.05)
    with rio_env(VSI_CACHE=False):
        return _do_read(rasterio.band(dataset, bidx), cfg, dst_geobox, info, dst=dst)


class NamingRioDriver(RioDriver):
    """odc-loader's rasterio driver with :class:`NamingRioReader`."""

    def open(self, src: Any, ctx: Any) -> NamingRioReader:
        """See ``RioDriver.open``."""
        _quiet_odc_read_errors()
        return NamingRioReader(src, ctx)


def _gdal_reason(exc: BaseException) -> str:
    """The innermost GDAL message of a rasterio error (``Read failed`` says nothing)."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if str(cause):
            reason = str(cause).splitlines()[0]
        cause = cause.__cause__ or cause.__context__
    return reason


class _FailedLoadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load")


def _quiet_odc_read_errors() -> None:
    """Drop odc-loader's log line of a failed read: the AssetReadError says it, in one line."""
    log = logging.getLogger("odc.loader._rio")
    if not any(isinstance(f, _FailedLoadFilter) for f in log.filters):
        log.addFilter(_FailedLoadFilter())


def _yx(ds: xr.Dataset) -> xr.Dataset:
    """odc-stac names the dims of a geographic grid latitude/longitude: the cube says y/x."""
    names = {"latitude": "y", "longitude": "x"}
    return ds.rename({k: v for k, v in names.items() if k in ds.dims})


class StackstacLoader:
    """stackstac engine: EPSG-coded Earth items with single-band assets."""

    name = "stackstac"

    def check(self, plan: CubePlan) -> None:
        """See :class:`Loader`: EPSG CRSs and single-band assets only."""
        if plan.epsg is None:
            raise InvalidArgumentError(
                "the stackstac engine needs an EPSG CRS (it cannot represent IAU or WKT-only "
                "CRSs): use --engine odc"
            )
        if any(b.multiband for b in plan.bands):
            raise InvalidArgumentError(
                "the stackstac engine reads single-band assets only: use --engine odc"
            )

    def load(self, items: dict[str, Item], plan: CubePlan) -> xr.Dataset:
        """See :class:`Loader`."""
        import xarray as xr

        self.check(plan)
        order = _group_key(plan)
        dicts = [_with_epsg(items[i]) for i in order]
        groups = [order[i] for i in order]

        def stack(asset_keys: list[str], dtype: str, fill: Any, resampling: str) -> xr.DataArray:
            return _stack(dicts, groups, plan, plan.bounds, asset_keys, dtype, fill, resampling)

        image = stack([b.asset for b in plan.bands], plan.dtype, plan.nodata or 0, plan.resampling)
        image = image.assign_coords(band=plan.band_names)
        out = xr.Dataset({"image": image.transpose("time", "band", "y", "x")})
        if plan.label_asset:
            out["labels"] = stack([plan.label_asset], "uint8", 0, "nearest").isel(band=0, drop=True)
        return out.chunk({"time": 1, "band": -1, "y": plan.block, "x": plan.block})

    def read_block(
        self, items: Sequence[Item], plan: CubePlan, window: tuple[slice, slice]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """See :class:`Loader`: stackstac on the block's bounds, computed in this thread."""
        import dask

        self.check(plan)
        dicts = [_with_epsg(item) for item in items]
        groups = [0] * len(dicts)
        ys, xs = window
        a, _, c, _, e, f = plan.transform
        bounds = (c + a * xs.start, f + e * ys.stop, c + a * xs.stop, f + e * ys.start)
        image = _stack(
            dicts, groups, plan, bounds, [b.asset for b in plan.bands], plan.dtype,
            plan.nodata or 0, plan.resampling,
        )  # fmt: skip
        labels = (
            _stack(dicts, groups, plan, bounds, [plan.label_asset], "uint8", 0, "nearest")
            if plan.label_asset
            else None
        )
        # The synchronous scheduler: on a Dask worker, not a graph sent back to the cluster.
        image, labels = dask.compute(image, labels, scheduler="synchronous")
        return image.values[0], (labels.values[0, 0] if labels is not None else None)


def _stack(
    dicts: list[Item],
    groups: list[int],
    plan: CubePlan,
    bounds: tuple[float, float, float, float],
    asset_keys: list[str],
    dtype: str,
    fill: Any,
    resampling: str,
) -> xr.DataArray:
    """``(time, band, y, x)`` of ``dicts`` within ``bounds``, on the plan's pixel grid.

    One step per group (``groups[i]`` is item ``i``'s), overlapping items mosaicked (first
    valid pixel wins, as in odc-stac), one Dask chunk per read block.
    """
    import stackstac
    import xarray as xr
    from rasterio.enums import Resampling

    arr = stackstac.stack(
        dicts,
        assets=asset_keys,
        epsg=plan.epsg,
        resolution=(plan.transform[0], -plan.transform[4]),
        bounds=bounds,
        snap_bounds=False,
        xy_coords="center",
        chunksize=plan.block,
        dtype=dtype,
        fill_value=np.dtype(dtype).type(fill),
        rescale=False,
        resampling=getattr(Resampling, resampling),
    )
    keys = np.asarray(groups)
    steps = [
        stackstac.mosaic(
            arr.isel(time=np.flatnonzero(keys == k)), dim="time", reverse=True, nodata=fill
        )
        for k in sorted(set(groups))
    ]
    out = xr.concat(steps, dim="time")
    return out.drop_vars([c for c in out.coords if c not in ("x", "y")])


def _with_epsg(item: Item) -> Item:
    """Copy an item, adding ``proj:epsg`` wherever ``proj:code`` is an EPSG code."""
    item = copy.deepcopy(item)
    for holder in (item["properties"], *item.get("assets", {}).values()):
        code = holder.get("proj:code")
        if (
            isinstance(code, str)
            and code.upper().startswith("EPSG:")
            and not holder.get("proj:epsg")
        ):
            holder["proj:epsg"] = int(code.split(":", 1)[1])
    return item


ENGINES: dict[str, Loader] = {"odc": OdcLoader(), "stackstac": StackstacLoader()}


def get_loader(name: str) -> Loader:
    """Look an engine up by name.

    Raises:
        InvalidArgumentError: unknown engine.
    """
    try:
        return ENGINES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown loader engine {name!r}: choose one of {', '.join(ENGINES)}"
        ) from None
