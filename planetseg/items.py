"""STAC items as plain GeoJSON dicts: reading, writing, and describing rasters.

Items are kept as the dicts a catalog served (not round-tripped through ``pystac.Item``), so
their projection metadata (``proj:code``, ``proj:epsg``, ``proj:wkt2``) is written back exactly
as it came. Files are written atomically: a failed write leaves no file behind.

Formats, chosen by suffix: ``.json``/``.geojson`` (a FeatureCollection, or a single item when
read), ``.ndjson`` (one item a line) and ``.parquet`` (stac-geoparquet).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.warp
from shapely.geometry import box, mapping

from planetseg.bodies import body_of_crs
from planetseg.errors import CatalogReadError, InvalidArgumentError

Item = dict[str, Any]

ITEM_SUFFIXES = (".json", ".geojson", ".ndjson", ".parquet")
PROJECTION_SCHEMA = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
#: Media types of the rasters GDAL drivers read. Formats without a registered one (PDS3, PDS4
#: and ISIS3 labels) get none: their ``data`` role tells readers (odc-stac) they are rasters.
MEDIA_TYPES = {
    "GTiff": "image/tiff; application=geotiff; profile=cloud-optimized",
    "COG": "image/tiff; application=geotiff; profile=cloud-optimized",
    "JP2OpenJPEG": "image/jp2",
}


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in ITEM_SUFFIXES:
        raise InvalidArgumentError(
            f"{path}: unknown items format {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(ITEM_SUFFIXES)}"
        )
    return suffix


def read_items(path: str | os.PathLike[str]) -> list[Item]:
    """Read items from a FeatureCollection, a single item, NDJSON or stac-geoparquet file.

    Relative asset hrefs are resolved against the file's folder (as STAC says), so a folder
    of items and their assets can be copied or moved as a whole.

    Raises:
        CatalogReadError: the file is missing, unreadable, or holds no STAC items.
    """
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            from stac_geoparquet.arrow import stac_table_to_items

            items = list(stac_table_to_items(pq.read_table(path)))
        elif suffix == ".ndjson":
            with path.open() as f:
                items = [json.loads(line) for line in f if line.strip()]
        else:
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
                items = list(doc.get("features", []))
            elif isinstance(doc, dict) and doc.get("type") == "Feature":
                items = [doc]
            else:
                raise CatalogReadError(f"{path}: not a STAC item or FeatureCollection")
    except CatalogReadError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CatalogReadError(f"cannot read items from {path}: {first}") from exc
    bad = [i for i, it in enumerate(items) if not _is_item(it)]
    if bad:
        raise CatalogReadError(f"{path}: entry {bad[0]} is not a STAC item (needs type, id)")
    return [absolute_hrefs(item, path.parent) for item in items]


def absolute_hrefs(item: Item, base: str | os.PathLike[str]) -> Item:
    """Make ``item``'s relative asset hrefs absolute, relative to ``base`` (in place).

    Later stages (on any worker, from any directory) can then open them; URLs and absolute
    paths are left as they are.
    """
    from urllib.parse import urlparse

    for asset in item.get("assets", {}).values():
        href = asset.get("href", "")
        if href and not urlparse(href).scheme and not os.path.isabs(href):
            asset["href"] = str((Path(base) / href).resolve())
    return item


def _is_item(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("type") == "Feature" and "id" in obj


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the mode a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_items_output(
    path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse an items ``--out`` that would lose data, before anything is searched or written.

    An existing items file is replaced (it is what ``search`` writes); anything else is
    refused: another file, a folder, an input, a location that is not writable.

    Raises:
        OutputPathError: see :func:`planetseg.store.prepare_output`.
    """
    from planetseg.store import prepare_output

    def holds_items(existing: Path) -> bool:
        try:
            read_items(existing)
        except CatalogReadError:
            return False
        return True

    prepare_output(path, "search", kind="file", inputs=inputs, owns_file=holds_items)


def write_items(items: Iterable[Item], path: str | os.PathLike[str]) -> Path:
    """Write items atomically in the format named by the suffix of ``path``."""
    path = Path(path)
    suffix = _suffix(path)
    items = list(items)
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            write_geoparquet(items, tmp)
        elif suffix == ".ndjson":
            with tmp.open("w") as f:
                for item in items:
                    f.write(json.dumps(item, separators=(",", ":")) + "\n")
        else:
            tmp.write_text(json.dumps(feature_collection(items), indent=1))
    return path


def write_geoparquet(items: list[Item], path: Path) -> None:
    """Write items as stac-geoparquet (an empty list gives a valid empty table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    if not items:
        pq.write_table(pa.table({"id": pa.array([], pa.string())}), path)
        return
    to_parquet(parse_stac_items_to_arrow(items), path)


def feature_collection(items: Iterable[Item]) -> dict[str, Any]:
    """Wrap items in a GeoJSON FeatureCollection."""
    items = list(items)
    return {"type": "FeatureCollection", "features": items, "numberReturned": len(items)}


def isoformat(t: dt.datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def raster_item(
    item_id: str,
    assets: dict[str, dict[str, Any]],
    *,
    datetime: dt.datetime,
    collection: str | None = None,
    properties: dict[str, Any] | None = None,
    projection_asset: str | None = None,
) -> Item:
    """Describe rasters as one STAC item with full projection metadata.

    ``assets`` maps keys to asset dicts with at least ``href`` (a path or URL rasterio can open);
    the grid (``proj:shape``, ``proj:transform``, ``proj:bbox``) and CRS come from
    ``projection_asset`` (default: the first asset). The CRS is written as ``proj:code`` when it
    has an authority code and always as ``proj:wkt2``, so readers that need either find it;
    ``proj:epsg`` is added for EPSG CRSs (stackstac reads only that). Geometry and ``bbox`` are
    in the body's own longitude/latitude, never Earth's. Assets that carry no ``type`` get the
    media type of the projection asset's format (:data:`MEDIA_TYPES`), where it has one.
    """
    key = projection_asset or next(iter(assets))
    with rasterio.open(assets[key]["href"]) as src:
        crs, transform, shape, bounds = src.crs, src.transform, (src.height, src.width), src.bounds
        media_type = MEDIA_TYPES.get(src.driver)
        bands = [
            {
                "data_type": src.dtypes[i],
                **({"nodata": src.nodata} if src.nodata is not None else {}),
            }
            for i in range(src.count)
        ]
    wkt = crs.to_wkt()
    wkt2, auth = _wkt2_and_code(wkt)
    body = body_of_crs(wkt)
    lonlat = rasterio.crs.CRS.from_wkt(body.crs.to_wkt())
    # Densified footprint: straight lines in a projected CRS are curves in lon/lat.
    xs, ys = _ring(bounds, 21)
    lons, lats = rasterio.warp.transform(crs, lonlat, xs, ys)
    footprint = box(min(lons), min(lats), max(lons), max(lats))
    proj: dict[str, Any] = {
        "proj:wkt2": wkt2,
        "proj:shape": list(shape),
        "proj:transform": list(transform)[:6],
        "proj:bbox": [bounds.left, bounds.bottom, bounds.right, bounds.top],
    }
    if auth is not None:
        proj["proj:code"] = f"{auth[0]}:{auth[1]}"
        if auth[0] == "EPSG":
            proj["proj:epsg"] = int(auth[1])
    props = {"datetime": isoformat(datetime), "planetseg:body": body.name, **proj}
    props.update(properties or {})
    out_assets = {}
    for k, asset in assets.items():
        a = {**({"type": media_type} if media_type else {}), **asset}
        if k == key:
            a.setdefault("raster:bands", bands)
        out_assets[k] = a
    item: Item = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            PROJECTION_SCHEMA,
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "id": item_id,
        "geometry": mapping(footprint),
        "bbox": list(footprint.bounds),
        "properties": props,
        "links": [],
        "assets": out_assets,
    }
    if collection is not None:
        item["collection"] = collection
    return item


@lru_cache(maxsize=256)
def _wkt2_and_code(wkt: str) -> tuple[str, tuple[str, str] | None]:
    """A CRS's WKT2 and authority code (PROJ's lookup is slow: once per CRS of a catalog)."""
    from pyproj import CRS

    crs = CRS.from_wkt(wkt)
    return crs.to_wkt(), crs.to_authority(min_confidence=90)


def _ring(bounds: rasterio.coords.BoundingBox, n: int) -> tuple[list[float], list[float]]:
    t = np.linspace(0.0, 1.0, n)
    left, bottom, right, top = bounds
    xs = np.concatenate(
        [left + (right - left) * t, np.full(n, right), right - (right - left) * t, np.full(n, left)]
    )
    ys = np.concatenate(
        [np.full(n, top), top - (top - bottom) * t, np.full(n, bottom), bottom + (top - bottom) * t]
    )
    return xs.tolist(), ys.tolist()
