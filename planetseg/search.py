"""The ``search`` stage: find STAC items on a STAC API or in a local catalog.

Both paths take the same :class:`~planetseg.config.SearchConfig` and apply the same filters with
the same semantics (collections, a bbox in the body's own longitude/latitude that intersects the
item geometry, an RFC 3339 interval that intersects the item's time), so a query gives the same
ids whether the items sit behind an API or in a folder. Items come back as the plain dicts the
catalog holds, projection metadata untouched.

Inputs are accepted loosely at the boundary (:func:`parse_bbox`, :func:`parse_datetime`) and
normalised once; everything after that works on the normalised values.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shapely.geometry import box, shape

from planetseg import __version__
from planetseg.catalogs import ResolvedCatalog, resolve_catalog
from planetseg.config import SearchConfig
from planetseg.errors import (
    CatalogReadError,
    CatalogUnavailableError,
    CollectionNotFoundError,
    InvalidArgumentError,
    PlanetsegWarning,
    first_line,
)
from planetseg.formats import file_item, folder_items, is_image_file
from planetseg.items import ITEM_SUFFIXES, Item, absolute_hrefs, isoformat, read_items

logger = logging.getLogger(__name__)

BBox = tuple[float, float, float, float]
Interval = tuple[dt.datetime | None, dt.datetime | None]


@dataclass(frozen=True)
class SearchResult:
    """Items found by :func:`search`, and the query that found them (for provenance).

    Attributes:
        items: STAC items as GeoJSON dicts, in the catalog's order.
        catalog: Where the search went.
        query: The normalised query (collections, bbox, datetime, max_items).
    """

    items: list[Item]
    catalog: ResolvedCatalog
    query: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """Item ids in result order."""
        return [it["id"] for it in self.items]

    def provenance(self) -> dict[str, Any]:
        """Where these items came from, as written into every later product."""
        return {"catalog": self.catalog.location, "query": self.query, "planetseg": __version__}


# --------------------------------------------------------------------------- input parsing


def parse_bbox(value: str | Sequence[float] | None) -> BBox | None:
    """Normalise a bbox given as ``"W,S,E,N"`` or four numbers, in body longitude/latitude.

    Longitudes may use either convention, -180..180 or 0..360 east (common for planetary
    data); they are returned in -180..180. ``W > E`` after normalisation means the box crosses
    the antimeridian, as in the STAC API spec.

    Raises:
        InvalidArgumentError: not four finite numbers, latitudes outside -90..90, longitudes
            outside -180..360, ``S >= N`` or ``W == E``.
    """
    if value is None:
        return None
    parts: Sequence[Any] = value.split(",") if isinstance(value, str) else value
    try:
        w, s, e, n = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"bbox {value!r} is malformed: give four numbers W,S,E,N in degrees, "
            "e.g. --bbox 23.4,0.6,23.6,0.8"
        ) from None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise InvalidArgumentError(f"bbox {value!r} has a non-finite number")
    for lat in (s, n):
        if not -90.0 <= lat <= 90.0:
            raise InvalidArgumentError(
                f"bbox latitude {lat:g} is outside the body's range -90..90: check the order "
                "W,S,E,N"
            )
    for lon in (w, e):
        if not -180.0 <= lon <= 360.0:
            raise InvalidArgumentError(
                f"bbox longitude {lon:g} is outside the body's range (-180..180, or 0..360 east)"
            )
    if s >= n:
        raise InvalidArgumentError(f"bbox south {s:g} must be below north {n:g} (order W,S,E,N)")
    w, e = (_wrap180(v) for v in (w, e))
    if w == e:
        raise InvalidArgumentError(f"bbox has zero width (W = E = {w:g})")
    return (w, s, e, n)


def _wrap180(lon: float) -> float:
    return lon - 360.0 if lon > 180.0 else lon


_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def _parse_instant(text: str, *, end: bool) -> dt.datetime:
    """Parse one end of an interval; a bare year, month or day covers all of it."""
    m = _PARTIAL.match(text)
    if m:
        year, month, day = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        try:
            start = dt.datetime(year, month, day, tzinfo=dt.UTC)
        except ValueError as exc:
            raise InvalidArgumentError(f"datetime {text!r}: {exc}") from None
        if not end:
            return start
        if m[3]:
            nxt = start + dt.timedelta(days=1)
        elif m[2]:
            nxt = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        else:
            nxt = start.replace(year=year + 1)
        return nxt - dt.timedelta(microseconds=1)
    try:
        t = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidArgumentError(
            f"datetime {text!r} is not RFC 3339: use e.g. 2024-05-01T00:00:00Z, 2024-05-01, "
            "2024-05, 2024, or an interval A/B with '..' for an open end"
        ) from None
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def parse_datetime(value: str | None) -> Interval | None:
    """Normalise an RFC 3339 instant or interval (``A/B``, ``../B``, ``A/..``) to UTC bounds.

    A single instant given as a date (``2024-05-01``), month or year covers that whole period.

    Raises:
        InvalidArgumentError: unparseable, or the interval ends before it starts.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if "/" in text:
        a, _, b = text.partition("/")
        start = None if a in ("", "..") else _parse_instant(a, end=False)
        stop = None if b in ("", "..") else _parse_instant(b, end=True)
        if start is None and stop is None:
            raise InvalidArgumentError(f"datetime {value!r} is open at both ends: drop it instead")
    else:
        start, stop = _parse_instant(text, end=False), _parse_instant(text, end=True)
    if start is not None and stop is not None and stop < start:
        raise InvalidArgumentError(
            f"datetime interval {value!r} is reversed: the start must come before the end"
        )
    return (start, stop)


def format_interval(interval: Interval) -> str:
    """RFC 3339 interval string as STAC APIs take it (``..`` for open ends)."""
    start, stop = interval
    return f"{isoformat(start) if start else '..'}/{isoformat(stop) if stop else '..'}"


# --------------------------------------------------------------------------- the stage


def search(config: SearchConfig) -> SearchResult:
    """Run a search described by ``config`` against an API or a local catalog.

    Raises:
        InvalidArgumentError: malformed bbox or datetime (SearchConfig checks the rest).
        CatalogNotFoundError / NoStacCollectionError: the catalog does not resolve.
        CollectionNotFoundError: a collection is not offered by the catalog.
        CatalogReadError: a local catalog cannot be read.
        CatalogUnavailableError: the API did not answer after the retries.
    """
    bbox = parse_bbox(config.bbox)
    interval = parse_datetime(config.datetime)
    catalog = resolve_catalog(config.catalog)
    collections = tuple(dict.fromkeys([*catalog.collections, *config.collections]))
    query = {
        "collections": list(collections),
        "bbox": list(bbox) if bbox else None,
        "datetime": format_interval(interval) if interval else None,
        "max_items": config.max_items,
    }
    if catalog.kind == "api":
        items = _search_api(catalog, collections, bbox, interval, config)
    else:
        items = _search_local(Path(catalog.location), collections, bbox, interval, config.max_items)
    logger.info("%d items from %s", len(items), catalog.name)
    return SearchResult(items, catalog, query)


# --------------------------------------------------------------------------- STAC API


def _search_api(
    catalog: ResolvedCatalog,
    collections: Sequence[str],
    bbox: BBox | None,
    interval: Interval | None,
    config: SearchConfig,
) -> list[Item]:
    import requests
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    # Retry every verb (searches are POSTs) on throttling and 5xx, with exponential backoff;
    # the per-request timeout bounds a server that accepts but never answers.
    retry = Retry(
        total=config.retries,
        backoff_factor=config.backoff,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,
        respect_retry_after_header=True,
    )
    stac_io = StacApiIO(timeout=config.timeout, max_retries=retry)
    where = catalog.location
    try:
        # Client.open resets the StacApiIO's timeout to its own argument: pass it twice.
        client = Client.open(
            where, stac_io=stac_io, timeout=config.timeout, modifier=_signer(catalog)
        )
        for cid in collections:
            if client.get_collection(cid) is None:
                raise CollectionNotFoundError(
                    f"collection {cid!r} is not offered by {catalog.name}: "
                    "list them with `planetseg catalogs` or the API's /collections"
                )
        found = client.search(
            collections=list(collections) or None,
            bbox=list(bbox) if bbox else None,
            datetime=format_interval(interval) if interval else None,
            max_items=config.max_items,
            limit=config.page_size,
        )
        return list(found.items_as_dicts())
    except (requests.exceptions.RequestException, APIError) as exc:
        raise CatalogUnavailableError(
            f"STAC API {where} failed after {config.retries} retries: {first_line(exc)}"
        ) from exc


def _signer(catalog: ResolvedCatalog) -> Any:
    if catalog.signing != "planetary-computer":
        return None
    try:
        import planetary_computer
    except ImportError:
        warnings.warn(
            "planetary-computer is not installed: asset hrefs stay unsigned and reading them will "
            "fail; pip install 'planetseg[planetary-computer]'",
            PlanetsegWarning,
            stacklevel=3,
        )
        return None
    return planetary_computer.sign_inplace


# --------------------------------------------------------------------------- local catalogs


def _search_local(
    root: Path,
    collections: Sequence[str],
    bbox: BBox | None,
    interval: Interval | None,
    max_items: int | None,
) -> list[Item]:
    known_collections: set[str] = set()
    items = list(_local_items(root, known_collections))
    known_collections.update(it["collection"] for it in items if it.get("collection"))
    missing = [c for c in collections if c not in known_collections]
    if missing:
        offered = ", ".join(sorted(known_collections)) or "none"
        raise CollectionNotFoundError(
            f"collection {missing[0]!r} is not in the local catalog {root} (it has: {offered})"
        )
    boxes = _bbox_polygons(bbox)
    out: list[Item] = []
    for item in items:
        if collections and item.get("collection") not in collections:
            continue
        if boxes and not _intersects(item, boxes):
            continue
        if interval and not _in_interval(item, interval):
            continue
        out.append(item)
        if max_items is not None and len(out) >= max_items:
            break
    return out


def _local_items(root: Path, collections: set[str]) -> Iterator[Item]:
    """Yield every item under ``root``, recording collection ids seen in ``collections``."""
    if root.is_dir():
        for name in ("catalog.json", "collection.json"):
            if (root / name).is_file() and _has_links(root / name):
                yield from _walk_static(root / name, collections, set())
                return
        files = sorted(p for p in root.iterdir() if p.is_file())
        stac_files = [p for p in files if p.suffix.lower() in ITEM_SUFFIXES]
        item_files = []
        for path in stac_files:
            doc = _peek(path)
            if doc.get("type") == "Collection":
                collections.add(doc.get("id", ""))
            elif doc.get("type") != "Catalog":
                item_files.append(path)
        if item_files:
            for path in item_files:
                yield from read_items(path)  # relative hrefs resolved against the file
            return
        # No STAC metadata: the image files of the tree are the catalog (an LROC or HiRISE
        # download, say). Where metadata exists the files beside it are its assets, not items.
        yield from folder_items(root)
        return
    if root.suffix.lower() in ITEM_SUFFIXES and _peek(root).get("type") in (
        "Collection",
        "Catalog",
    ):
        yield from _walk_static(root, collections, set())
        return
    if is_image_file(root):
        yield file_item(root, root.parent)[0]  # one scene: a .cub, a .LBL, a .jp2, ...
        return
    yield from read_items(root)


def _peek(path: Path) -> dict[str, Any]:
    """The JSON document of a ``.json``/``.geojson`` file (empty for NDJSON and Parquet)."""
    if path.suffix.lower() not in (".json", ".geojson"):
        return {}
    doc = _load_json(path)
    return doc if isinstance(doc, dict) else {}


def _has_links(path: Path) -> bool:
    """Whether a catalog/collection file links to children or items (else items sit beside it)."""
    return any(link.get("rel") in ("child", "item") for link in _load_json(path).get("links", []))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogReadError(f"cannot read {path}: {first_line(exc)}") from exc


def _walk_static(path: Path, collections: set[str], seen: set[Path]) -> Iterator[Item]:
    """Follow child/item links of a static catalog, as pystac would, without a server."""
    path = path.resolve()
    if path in seen:
        return
    seen.add(path)
    doc = _load_json(path)
    if doc.get("type") == "Collection":
        collections.add(doc.get("id", ""))
    for link in doc.get("links", []):
        rel, href = link.get("rel"), link.get("href", "")
        if rel not in ("child", "item") or urlparse(href).scheme in ("http", "https"):
            continue
        target = (path.parent / href).resolve()
        if not target.is_file():
            raise CatalogReadError(f"{path}: {rel} link {href!r} points to a missing file")
        if rel == "child":
            yield from _walk_static(target, collections, seen)
        else:
            item = _load_json(target)
            if doc.get("type") == "Collection":
                item.setdefault("collection", doc.get("id"))
            yield absolute_hrefs(item, target.parent)


# --------------------------------------------------------------------------- filters


def _bbox_polygons(bbox: BBox | None) -> list[Any]:
    if bbox is None:
        return []
    w, s, e, n = bbox
    if w <= e:
        return [box(w, s, e, n)]
    return [box(w, s, 180.0, n), box(-180.0, s, e, n)]  # crosses the antimeridian


def _intersects(item: Item, boxes: Iterable[Any]) -> bool:
    geom = item.get("geometry")
    if geom is not None:
        footprint = shape(geom)
    elif item.get("bbox"):
        b = item["bbox"]  # 2D (W,S,E,N) or 3D (W,S,zmin,E,N,zmax)
        half = len(b) // 2
        footprint = box(b[0], b[1], b[half], b[half + 1])
    else:
        return False
    return any(footprint.intersects(b) for b in boxes)


def _item_time(item: Item) -> Interval:
    props = item.get("properties", {})
    start = props.get("start_datetime") or props.get("datetime")
    stop = props.get("end_datetime") or props.get("datetime")
    return (
        _parse_instant(start, end=False) if start else None,
        _parse_instant(stop, end=False) if stop else None,
    )


def _in_interval(item: Item, interval: Interval) -> bool:
    start, stop = interval
    t0, t1 = _item_time(item)
    if t0 is None and t1 is None:
        return False
    if start is not None and (t1 or t0) < start:
        return False
    return not (stop is not None and (t0 or t1) > stop)
