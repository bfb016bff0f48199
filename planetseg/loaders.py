"""Loader engines: STAC items -> a lazy ``xarray`` cube on a given grid.

The I/O boundary of ingest is one small contract, :class:`Loader`: given the items of a plan and
the plan itself, return ``image(time, band, y, x)`` (and ``labels(time, y, x)`` when the plan
takes labels from a raster asset) as Dask-backed arrays chunked one read block (``plan.block``
pixels, whole tiles) per chunk, **without reading pixels**. Two engines implement it:

* ``odc`` (default): odc-stac. It understands WKT2 and IAU CRSs (with PROJ's celestial-body
  check lifted, see :func:`planetseg.bodies.celestial_proj`) and multi-band assets.
* ``stackstac``: for EPSG-coded Earth items. It reads only ``proj:epsg`` (pystac renames it to
  ``proj:code``, so it is put back) and cannot represent IAU CRSs or multi-band assets; both
  are refused with a message naming the other engine.

Both are driven with the same explicit grid, nearest resampling and full-resolution reads, so
they give the same cube pixel for pixel.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from planetseg.bodies import celestial_proj
from planetseg.errors import InvalidArgumentError
from planetseg.items import Item

if TYPE_CHECKING:
    import xarray as xr

    from planetseg.ingest import CubePlan


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


def _group_key(plan: CubePlan) -> dict[str, int]:
    return {item_id: i for i, step in enumerate(plan.times) for item_id in step.item_ids}


class OdcLoader:
    """odc-stac engine (default): any CRS PROJ knows, IAU included; multi-band assets."""

    name = "odc"

    def check(self, plan: CubePlan) -> None:
        """See :class:`Loader` (odc-stac loads any plan)."""

    def load(self, items: dict[str, Item], plan: CubePlan) -> xr.Dataset:
        """See :class:`Loader`."""
        import odc.stac
        import pystac
        import xarray as xr

        order = _group_key(plan)
        stac_items = [pystac.Item.from_dict(items[i], migrate=False) for i in order]
        # A multi-band asset shows up as "asset.1", "asset.2", ... when its raster:bands says
        # how many bands it has; asking for "asset" alone would read band 1 only.
        names = [f"{b.asset}.{b.index}" if b.multiband else b.asset for b in plan.bands]

        def load(bands: list[str], dtype: str, nodata: float | None, resampling: str) -> Any:
            with celestial_proj():
                return odc.stac.load(
                    stac_items,
                    bands=bands,
                    geobox=plan.geobox(),
                    chunks={"x": plan.block, "y": plan.block},
                    groupby=lambda item, _parsed, _idx: order[item.id],
                    resampling=resampling,
                    dtype=dtype,
                    nodata=nodata,
                    use_overviews=False,  # read full resolution, as stackstac does
                    fail_on_error=not plan.fill_missing,
                )

        ds = _yx(load(names, plan.dtype, plan.nodata, plan.resampling))
        image = xr.concat([ds[n] for n in names], dim="band").transpose("time", "band", "y", "x")
        out = xr.Dataset({"image": image.assign_coords(band=plan.band_names)})
        if plan.label_asset:
            out["labels"] = _yx(load([plan.label_asset], "uint8", 0, "nearest"))[plan.label_asset]
        return out.chunk({"time": 1, "band": -1})


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
        import stackstac
        import xarray as xr
        from rasterio.enums import Resampling

        self.check(plan)
        epsg = plan.epsg
        order = _group_key(plan)
        dicts = [_with_epsg(items[i]) for i in order]
        left, bottom, right, top = plan.bounds
        assets = [b.asset for b in plan.bands]

        def stack(asset_keys: list[str], dtype: str, fill: Any, resampling: str) -> xr.DataArray:
            arr = stackstac.stack(
                dicts,
                assets=asset_keys,
                epsg=epsg,
                resolution=(plan.transform[0], -plan.transform[4]),
                bounds=(left, bottom, right, top),
                snap_bounds=False,
                xy_coords="center",
                chunksize=plan.block,
                dtype=dtype,
                fill_value=np.dtype(dtype).type(fill),
                rescale=False,
                resampling=getattr(Resampling, resampling),
            )
            # One step per time group, overlapping items mosaicked (first valid pixel wins, as
            # in odc-stac).
            keys = xr.DataArray([order[i] for i in arr.id.values], dims="time")
            steps = [
                stackstac.mosaic(
                    arr.isel(time=np.flatnonzero(keys.values == k)),
                    dim="time",
                    reverse=True,
                    nodata=fill,
                )
                for k in range(len(plan.times))
            ]
            return xr.concat(steps, dim="time")

        image = stack(assets, plan.dtype, plan.nodata or 0, plan.resampling)
        image = image.drop_vars([c for c in image.coords if c not in ("x", "y")])
        image = image.assign_coords(band=plan.band_names)
        out = xr.Dataset({"image": image.transpose("time", "band", "y", "x")})
        if plan.label_asset:
            labels = stack([plan.label_asset], "uint8", 0, "nearest").isel(band=0, drop=True)
            out["labels"] = labels.drop_vars([c for c in labels.coords if c not in ("x", "y")])
        return out.chunk({"time": 1, "band": -1, "y": plan.block, "x": plan.block})


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
