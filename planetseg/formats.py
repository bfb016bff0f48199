"""Image files as STAC items: what GDAL reads of the formats planetary archives ship.

A folder with no STAC metadata is a catalog of its image files, searched recursively:

* GeoTIFF / COG (``.tif``, ``.tiff``);
* PDS3: an ``.IMG`` with its label attached, or a detached ``.LBL`` beside the ``.IMG`` it
  points to, or beside a JPEG2000 file (HiRISE ships ``.JP2`` + ``.LBL``);
* PDS4: an ``.xml`` label and the data file it describes;
* ISIS3 cubes (``.cub``);
* JPEG2000 (``.jp2``) georeferenced by its own GeoJP2/GMLJP2 boxes.

A label and the files it describes are one item, whose asset is the label (GDAL opens it and
reads the data file it names); ``.aux.xml`` side-cars, other XML files and the labels of
tables or indexes are not items. The CRS is the one GDAL builds from the file's own label (map
projection, target radii) and the body is the CRS's, cross-checked with the target the label
names. The acquisition time is the label's start time where the format carries one (PDS3
``START_TIME``, PDS4 ``start_date_time``, ISIS3 ``StartTime``), else the TIFF ``DateTime`` tag,
else a date in the file name, never the file's modification time. A file that tells no map
projection, no body or no time is refused in one line naming it and what to add.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planetseg.bodies import BODIES, Body, body_of_crs
from planetseg.errors import CatalogReadError, CRSError, first_line
from planetseg.items import Item, raster_item

#: Suffixes of files that may be items on their own (lower case).
RASTER_SUFFIXES = (".tif", ".tiff", ".cub", ".img", ".jp2")
#: Suffixes of detached labels: a PDS3 (or ISIS3) ``.lbl`` or a PDS4 ``.xml`` (lower case).
LABEL_SUFFIXES = (".lbl", ".xml")

_PDS4_NAMESPACE = "pds.nasa.gov/pds4"
#: Where each format keeps the acquisition time and the target, as the refusals name them.
_TIME_KEY = {
    "PDS": "START_TIME",
    "PDS4": "Time_Coordinates/start_date_time",
    "ISIS3": "StartTime (Instrument group)",
}
_TARGET_KEY = {
    "PDS": "TARGET_NAME",
    "PDS4": "Target_Identification/name",
    "ISIS3": "TargetName",
}
_PROJECTION_KEY = {
    "PDS": "an IMAGE_MAP_PROJECTION object",
    "PDS4": "a cart:Cartography section",
    "ISIS3": "a Mapping group (ISIS cam2map projects a cube)",
}


@dataclass(frozen=True)
class Label:
    """What a file's label says about its acquisition.

    Attributes:
        start: Acquisition start time (UTC), or None when the label gives none.
        target: The target's name as the label spells it, or None.
    """

    start: dt.datetime | None = None
    target: str | None = None


def folder_items(root: Path) -> list[Item]:
    """Every image file under ``root`` (recursively) as an item, in path order.

    Hidden files and folders, zarr stores and folders planetseg wrote (products, stores) are
    not searched. Item ids are the file's path below ``root`` without its suffix (the file's
    stem for files directly in ``root``); the collection is the name of the file's folder.

    Raises:
        CatalogReadError: no image file; a file that cannot be read, or tells no body, no map
            projection or no time; two files that would be items of the same id.
    """
    root = Path(os.path.abspath(root))
    files = sorted(_walk(root))
    labels = [p for p in files if _is_label(p)]
    claimed: set[Path] = set()
    items: dict[str, tuple[Path, Item]] = {}

    def add(path: Path) -> None:
        item, parts = file_item(path, root)
        claimed.update(parts)  # resolved: GDAL names the files as it found them
        if item["id"] in items:
            other = items[item["id"]][0]
            raise CatalogReadError(
                f"{other} and {path} would both be item {item['id']!r}: keep one of them, or "
                "move one into a folder of its own"
            )
        items[item["id"]] = (path, item)

    for path in labels:
        add(path)
    for path in files:
        if path.suffix.lower() in RASTER_SUFFIXES and path.resolve() not in claimed:
            add(path)
    if not items:
        raise CatalogReadError(
            f"local catalog {root} holds no STAC items, items files or image files "
            f"({', '.join(s for s in RASTER_SUFFIXES + LABEL_SUFFIXES)})"
        )
    return [item for _, item in sorted(items.values(), key=lambda pair: str(pair[0]))]


def _walk(root: Path) -> Iterator[Path]:
    from planetseg.store import owner

    for folder, dirs, names in os.walk(root):
        base = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and not d.lower().endswith(".zarr") and owner(base / d) is None
        )
        for name in names:
            if not name.startswith(".") and (base / name).is_file():
                yield base / name


#: What marks a label as one of an image (not of a table, an index or a collection): PDS3
#: image, JPEG2000 or cube pointers and objects, ISIS3's detached ``^Core``, PDS4 arrays.
_IMAGE_LABEL = {
    ".lbl": re.compile(
        rb"\^(IMAGE|QUBE|SPECTRAL_QUBE|CORE)\b|OBJECT\s*=\s*(IMAGE|COMPRESSED_FILE)\b",
        re.IGNORECASE,
    ),
    ".xml": re.compile(rb"<(\w+:)?Array_[23]D\w*[\s>]"),
}


def _is_label(path: Path) -> bool:
    """A PDS3 (or ISIS3) ``.lbl`` or a PDS4 ``.xml`` label describing an image.

    Labels of tables, indexes or collections, ``.aux.xml`` side-cars and other XML are not.
    """
    suffix = path.suffix.lower()
    if suffix not in _IMAGE_LABEL or path.name.lower().endswith(".aux.xml"):
        return False
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError as exc:
        raise CatalogReadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if suffix == ".xml" and _PDS4_NAMESPACE.encode() not in head:
        return False
    return _IMAGE_LABEL[suffix].search(head) is not None


def is_image_file(path: Path) -> bool:
    """Whether the file ``path`` is an image file or image label a local catalog takes."""
    return path.is_file() and (path.suffix.lower() in RASTER_SUFFIXES or _is_label(path))


def file_item(path: Path, root: Path) -> tuple[Item, set[Path]]:
    """Describe one image file (or label) below the folder ``root`` as an item.

    Also returns the files the item covers (resolved): a label's data files, the file itself.

    Raises:
        CatalogReadError: see :func:`folder_items`.
    """
    import rasterio

    try:
        with warnings.catch_warnings():
            # A file without georeferencing is refused below, in one line of its own.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            driver, crs = src.driver, src.crs
            parts = {Path(f).resolve() for f in src.files}
            stamp = src.tags().get("TIFFTAG_DATETIME") if driver == "GTiff" else None
    except rasterio.errors.RasterioIOError as exc:
        raise CatalogReadError(f"cannot read {path}: {first_line(exc)}") from exc
    label = read_label(path, driver)
    if crs is None:
        where = _PROJECTION_KEY.get(driver, "a CRS (gdal_edit.py -a_srs ... -a_ullr ...)")
        raise CatalogReadError(
            f"{path} has no map projection, so planetseg cannot place it on its body: add "
            f"{where} to it, or describe it with a STAC items file"
        )
    check_body(path, driver, crs.to_wkt(), label)
    when, source = acquisition_time(path, driver, label, stamp)
    item = raster_item(
        path.relative_to(root).with_suffix("").as_posix(),
        {"image": {"href": str(path.resolve()), "roles": ["data"]}},
        datetime=when,
        collection=path.parent.name,
        properties={"planetseg:datetime_source": source, "planetseg:format": driver},
    )
    return item, parts | {path.resolve()}


# --------------------------------------------------------------------------- labels


def read_label(path: Path, driver: str) -> Label:
    """The start time and target of a PDS3, PDS4 or ISIS3 label (empty for other formats).

    Raises:
        CatalogReadError: the label does not parse.
    """
    from pvl.exceptions import ParseError, QuantityError

    try:
        if driver in ("PDS", "ISIS3"):
            return _pvl_label(path, driver)
        if driver == "PDS4":
            return _pds4_label(path)
    except (ValueError, ParseError, QuantityError, ET.ParseError) as exc:
        raise CatalogReadError(f"cannot parse the label of {path}: {first_line(exc)}") from exc
    return Label()


def _pvl_label(path: Path, driver: str) -> Label:
    import pvl

    module = pvl.loads(_pvl_text(path))
    if driver == "ISIS3":
        cube = module.get("IsisCube", {})
        groups = [cube.get("Instrument", {}), cube.get("Mapping", {})]
        start = cube.get("Instrument", {}).get("StartTime")
        target = next((g["TargetName"] for g in groups if g.get("TargetName")), None)
    else:
        start, target = module.get("START_TIME"), module.get("TARGET_NAME")
    return Label(start=_label_time(start), target=str(target) if target else None)


def _pvl_text(path: Path, *, limit: int = 8 << 20) -> str:
    """The label at the head of ``path``: text up to its ``END`` line, not the pixels after."""
    end = re.compile(rb"^\s*end\s*$", re.IGNORECASE | re.MULTILINE)
    with path.open("rb") as f:
        head = b""
        while len(head) < limit:
            block = f.read(1 << 16)
            head += block
            found = end.search(head)
            if found:
                return head[: found.end()].decode("latin-1")
            if not block:
                break
    return head.split(b"\0", 1)[0].decode("latin-1")


def _pds4_label(path: Path) -> Label:
    tree = ET.parse(path)
    start = tree.find(".//{*}Time_Coordinates/{*}start_date_time")
    target = tree.find(".//{*}Target_Identification/{*}name")

    def text(el: ET.Element | None) -> str | None:
        return el.text.strip() if el is not None and el.text and el.text.strip() else None

    return Label(start=_label_time(text(start)), target=text(target))


_DOY = re.compile(r"^(\d{4})-(\d{3})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?)?Z?$")


def _label_time(value: Any) -> dt.datetime | None:
    """A label's time value (a datetime, a date, or text) in UTC; None if absent or unknown.

    Text may be ISO 8601 (``2008-01-15T12:30:00.000Z``) or day of year (``2008-015T12:30:00``),
    as PDS allows; placeholders such as ``UNK`` or ``N/A`` count as absent.
    """
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and value.strip():
        text = value.strip().strip('"')
        doy = _DOY.match(text)
        try:
            if doy:
                year, day, hh, mm, ss, frac = doy.groups(default="0")
                when = dt.datetime(int(year), 1, 1) + dt.timedelta(
                    days=int(day) - 1, hours=int(hh), minutes=int(mm), seconds=float(ss + frac)
                )
            else:
                when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


# --------------------------------------------------------------------------- body and time


def check_body(path: Path, driver: str, crs_wkt: str, label: Label) -> Body:
    """The body ``path`` shows: its CRS's, whose radius and label's target must agree with it.

    Raises:
        CatalogReadError: the CRS is of no known body, its radius is another body's than it
            names, or the label's target is another body.
    """
    from pyproj import CRS

    crs = CRS.from_wkt(crs_wkt)
    radius = crs.ellipsoid.semi_major_metre if crs.ellipsoid else float("nan")
    said = f"; its label names the target {label.target!r}" if label.target else ""
    try:
        body = body_of_crs(crs_wkt)
    except CRSError:
        raise CatalogReadError(
            f"cannot tell which body {path} shows: its CRS {crs.name!r} (radius {radius:.0f} m) "
            f"is of none of planetseg's bodies ({', '.join(BODIES)}){said}: give it a CRS of "
            "its body with that body's name and radius (e.g. IAU_2015:49900 for Mars)"
        ) from None
    if not _radius_of(body, radius):
        owner = next((b.name for b in BODIES.values() if _radius_of(b, radius)), "no known body")
        raise CatalogReadError(
            f"{path}: its CRS {crs.name!r} names the {body.name}, but its radius of "
            f"{radius:.0f} m is of {owner}{said}: fix the radii or the target in its label"
        )
    named = _target_body(label.target)
    if named is not None and named != body:
        raise CatalogReadError(
            f"{path}: its label names the target {label.target!r} "
            f"({_TARGET_KEY.get(driver, 'target')}) but its map projection is of the "
            f"{body.name}: fix the one that is wrong"
        )
    return body


def _radius_of(body: Body, radius: float) -> bool:
    return abs(radius - body.radius_m) <= 0.02 * body.radius_m


def _target_body(target: str | None) -> Body | None:
    """The body a label's target name starts with (``MARS``, ``Mars (2015) - Sphere``)."""
    word = re.match(r"[a-z]+", (target or "").strip().lower())
    return BODIES.get(word[0]) if word else None


#: Dates in file names: 2014-03-01, 2014-03-01T12:00:00 (or 12-00-00), 20140301, 20140301T120000.
_NAME_DATES = (
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?:[T_ ](\d{2})[:-]?(\d{2})[:-]?(\d{2}))?(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2}))?(?!\d)"),
)


def acquisition_time(
    path: Path, driver: str, label: Label, stamp: str | None
) -> tuple[dt.datetime, str]:
    """A file's acquisition time and where it came from: label, TIFF tag, or file name.

    Never the file's modification time: copies made on one day would merge into one epoch.

    Raises:
        CatalogReadError: none of them holds a date.
    """
    if label.start is not None:
        return label.start, f"{driver.lower()}-label"
    if stamp:
        try:
            when = dt.datetime.strptime(stamp.strip(), "%Y:%m:%d %H:%M:%S")
            return when.replace(tzinfo=dt.UTC), "tiff-datetime"
        except ValueError:
            pass  # a malformed tag: the name may still tell
    for pattern in _NAME_DATES:
        for match in pattern.finditer(path.name):
            parts = [int(v) for v in match.groups(default="0")]
            try:
                when = dt.datetime(*parts, tzinfo=dt.UTC)  # type: ignore[misc]
            except ValueError:
                continue  # 8 digits that are not a date (an orbit number, say)
            if 1900 <= when.year <= 2200:
                return when, "file-name"
    bad = f" (its DateTime tag {stamp!r} is not 'YYYY:MM:DD HH:MM:SS')" if stamp else ""
    if driver in _TIME_KEY:
        how = f"set {_TIME_KEY[driver]} in its label, "
    elif driver == "GTiff":
        how = (
            "set its TIFF DateTime tag (gdal_edit.py -mo TIFFTAG_DATETIME='2014:03:01 12:00:00'), "
        )
    else:
        how = ""
    raise CatalogReadError(
        f"{path} tells no acquisition time{bad}: {how}put the date in its name "
        f"(scene_2014-03-01{path.suffix}), or describe the files with a STAC items file"
    )
