"""Virtual cubes: a planetseg cube's metadata at any size, with no chunk written.

The planner reads only metadata, so a cube of a terabyte can be planned on a laptop; these
stores are how the tests and benchmarks check that it stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def virtual_cube(path: Path, *, like: Path, side: int, tile: int, times: int = 1) -> Path:
    """Write a complete-looking cube of ``times x bands x side x side`` with ``like``'s grid.

    Pixel size, CRS, bands and attributes are ``like``'s; no chunk is written (reads return
    the fill value, so the cube does not claim that every chunk was written).
    """
    import dask.array as da
    import xarray as xr

    from planetseg.store import EVERY_CHUNK, cf_attrs, pixel_centres, transform_from_cf

    src = xr.open_zarr(like, consolidated=False)
    transform = transform_from_cf(dict(src["spatial_ref"].attrs))
    bands = src["band"].values
    t0 = src["time"].values[0]
    coords = {
        "time": np.array([t0 + np.timedelta64(i, "D") for i in range(times)]),
        "band": bands,
        **pixel_centres(transform, (side, side)),
        "spatial_ref": xr.Variable(
            (), np.int32(0), attrs=cf_attrs(src["spatial_ref"].attrs["crs_wkt"], transform)
        ),
    }
    shape = (times, len(bands), side, side)
    # One dask chunk (one graph node): to_zarr(compute=False) writes metadata only, and a
    # graph of a million zarr-sized chunks would cost minutes to build for nothing.
    image = da.zeros(shape, dtype=src["image"].dtype, chunks=shape)
    ds = xr.Dataset(
        {"image": (("time", "band", "y", "x"), image, {"grid_mapping": "spatial_ref"})},
        coords=coords,
        attrs={
            **{k: v for k, v in src.attrs.items() if k != EVERY_CHUNK},
            "planetseg:complete": True,
        },
    )
    encoding = {"image": {"chunks": (1, len(bands), tile, tile)}}
    ds.to_zarr(
        str(path), mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding
    )
    return path
