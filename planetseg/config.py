"""Configuration of every stage, one frozen dataclass each.

The CLI and workflow files build these; the library functions take them. Values are validated
where they are used (e.g. :func:`planetseg.search.parse_bbox`), so a config built in Python and
one built from the command line are checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SearchConfig:
    """What to search and how patiently.

    Attributes:
        catalog: Catalog name, data-set alias, STAC API URL or local path
            (see :func:`planetseg.catalogs.resolve_catalog`).
        collections: Collection ids; empty means all (an alias adds its own).
        bbox: ``"W,S,E,N"`` or four numbers in the body's longitude/latitude (degrees), or None.
        datetime: RFC 3339 instant or interval (``A/B``, ``../B``, ``A/..``), or None.
        max_items: Stop after this many items; None for all.
        page_size: Items per page requested from an API.
        timeout: Seconds to wait for each HTTP connect/read before retrying.
        retries: Retries per request on timeouts, connection errors, 429 and 5xx.
        backoff: Backoff factor in seconds; retry ``k`` waits ``backoff * 2**(k-1)``.
    """

    catalog: str
    collections: tuple[str, ...] = ()
    bbox: str | tuple[float, float, float, float] | None = None
    datetime: str | None = None
    max_items: int | None = None
    page_size: int = 100
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5


@dataclass(frozen=True)
class IngestConfig:
    """How to turn items into a datacube.

    Attributes:
        out: Path of the zarr store to create, resume or append to.
        bbox: Area to ingest, ``"W,S,E,N"`` in body lon/lat; None for the items' union.
        crs: Cube CRS (authority code or WKT2); None for the items' own (they must agree).
        resolution: Pixel size in CRS units; None for the items' finest native resolution.
        tile: Tile and chunk size in pixels (a multiple of 16).
        bands: Asset keys to read; empty for the assets with role ``data``.
        groupby: Time steps: ``day`` (UTC day), ``time`` (exact datetime), ``id`` (one step per
            item) or ``solar_day`` (Earth only). Items of one step are mosaicked.
        dtype: Image dtype; None for the assets' own.
        engine: Loader: ``odc`` (any CRS) or ``stackstac`` (EPSG Earth items).
        resampling: Image resampling when the grid differs from the native one.
        labels: Label source: an asset key holding label rasters, or a crater catalog
            (``.csv``/``.parquet``) or polygon file (``.geojson``/``.gpkg``/``.parquet``).
        label_field: Class column of a polygon file.
        fill_missing: Fill items whose assets cannot be read with nodata (with a warning)
            instead of failing.
        batch_tiles: Tiles per submitted partition; bounds the graph and memory.
    """

    out: str
    bbox: str | tuple[float, float, float, float] | None = None
    crs: str | None = None
    resolution: float | None = None
    tile: int = 512
    bands: tuple[str, ...] = ()
    groupby: Literal["day", "time", "id", "solar_day"] = "day"
    dtype: str | None = None
    engine: Literal["odc", "stackstac"] = "odc"
    resampling: str = "nearest"
    labels: str | None = None
    label_field: str = "class"
    fill_missing: bool = False
    batch_tiles: int = 64


@dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster a stage computes on (see :mod:`planetseg.cluster`).

    Attributes:
        kind: ``none`` (threads in this process), ``local`` (LocalCluster) or a scheduler
            address such as ``tcp://10.0.0.5:8786``.
        workers: Worker processes of a local cluster; None lets Dask choose.
        threads: Threads per worker; None lets Dask choose.
        host: Interface the scheduler and dashboard bind to.
        dashboard_port: Dashboard port; 0 picks a free one.
        connect_timeout: Seconds to wait for a remote scheduler.
    """

    kind: str = "local"
    workers: int | None = None
    threads: int | None = None
    host: str = "127.0.0.1"
    dashboard_port: int = 0
    connect_timeout: float = 10.0
