"""Cloud-Optimized GeoTIFF export of planetseg's rasters, streamed block by block.

A product can be larger than memory, and GDAL's COG driver only writes by copying a whole
dataset. So the raster is first written window by window into a tiled GeoTIFF beside the
target, which the COG driver then copies (adding overviews); memory stays at one block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from planetseg.bodies import celestial_proj
from planetseg.items import atomic_path
from planetseg.palette import RGBA, class_tags

ReadWindow = Callable[[slice, slice], np.ndarray]


def write_cog(
    path: Path,
    read: ReadWindow,
    *,
    shape: tuple[int, int],
    dtype: str,
    crs_wkt: str,
    transform: tuple[float, ...],
    block: int = 512,
    categorical: bool = True,
    nodata: float | None = None,
    description: str = "",
    tags: dict[str, str] | None = None,
    classes: Mapping[int, str] | None = None,
    colormap: Mapping[int, RGBA] | None = None,
) -> Path:
    """Write a single-band COG at ``path`` (atomically) from ``read(rows, cols)`` windows.

    Args:
        path: Output file.
        read: Returns the pixels of a window, given row and column slices.
        shape: Height and width.
        dtype: Pixel type.
        crs_wkt: CRS as WKT (IAU CRSs included).
        transform: Affine ``(a, b, c, d, e, f)``.
        block: Side of the windows read and of the internal tiles (a multiple of 16).
        categorical: Nearest-neighbour overviews (classes) instead of averages.
        nodata: Nodata value, if any.
        description: Band description.
        tags: Metadata written into the file.
        classes: Value -> name of a label raster, written as ``CLASS_NAMES`` and ``CLASS_<v>``
            tags of the file and of the band (see :func:`planetseg.palette.class_tags`).
        colormap: Value -> RGBA colour table of the band (uint8 or uint16 rasters), which GDAL
            tools and QGIS show the raster in.
    """
    import rasterio
    from affine import Affine
    from rasterio.shutil import copy as rio_copy

    h, w = shape
    block = max(16, block - block % 16)
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 1,
        "dtype": dtype,
        "crs": rasterio.crs.CRS.from_wkt(crs_wkt),
        "transform": Affine(*transform),
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "nodata": nodata,
    }
    staging = path.with_name(path.name + ".staging.tif")
    with celestial_proj(), atomic_path(path) as tmp:
        try:
            with rasterio.open(staging, "w", **profile) as dst:
                for y0 in range(0, h, block):
                    for x0 in range(0, w, block):
                        ys, xs = slice(y0, min(y0 + block, h)), slice(x0, min(x0 + block, w))
                        window = rasterio.windows.Window(x0, y0, xs.stop - x0, ys.stop - y0)
                        dst.write(np.asarray(read(ys, xs), dtype=dtype), 1, window=window)
                dst.set_band_description(1, description)
                names = class_tags(classes) if classes else {}
                dst.update_tags(**(tags or {}), **names)
                if names:
                    dst.update_tags(1, **names)
                if colormap:
                    dst.write_colormap(1, dict(colormap))
            rio_copy(
                staging,
                tmp,
                driver="COG",
                compress="deflate",
                blocksize=block,
                overview_resampling="nearest" if categorical else "average",
            )
        finally:
            staging.unlink(missing_ok=True)
    return path
