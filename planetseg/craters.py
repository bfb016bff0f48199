"""The ``craters`` stage: a crater catalog from the crater classes of a labels store.

Per time step, the crater pixels are split into individual craters. Stores that ``segment``
wrote with a ``crater_probability`` (the summed softmax of the crater classes) are read from
it: a pixel is a crater's where the probability is at least 0.5; stores without one (older
planetseg, or ``--crater-class`` naming other classes than were summed) fall back to the hard
labels. Touching craters merge into one blob, so the blob is cut by a watershed on its
distance transform, seeded at the distance maxima (one per crater centre; see
:func:`separate` and ``benchmarks/bench_crater_extraction.py`` for the surfaces compared).
Each crater gets

* ``lon``, ``lat``: its centroid in the body's own longitude/latitude (degrees);
* ``diameter_km``: the diameter of the circle of the same *true* area (pixel areas on the
  body, see :mod:`planetseg.products`), and ``diameter_px`` on the segmentation grid;
* ``major_km``, ``minor_km``, ``orientation_deg``: the fitted ellipse (image moments);
* ``class`` (the majority crater class), ``confidence`` (mean crater probability, or mean
  confidence without one; ``--min-confidence`` drops craters below it) and ``epoch`` (time
  index) with ``time``.

``--reference`` scores the catalog against another (planetseg's or craterpy's columns) with
DeepMoon's matching criteria (Silburt et al. 2019): a detection ``d`` matches a reference
crater ``r`` when ``dist(d, r)^2 / min(R_d, R_r)^2 < 1.8`` (great-circle distance on the
body) and ``|R_d - R_r| / min(R_d, R_r) < 1.0``, radii ``R``; pairs are matched one to one,
closest first. Only reference craters whose centre lies in the grid count, and a reference
with an ``epoch`` column (the synthetic world's) is compared per time step with the craters
that exist by then (``epoch <= t``). Scores come per size bin of one diameter (a pair's
reference diameter), in pixels of the segmentation grid and metres, above the limits
(``--min-diameter``, ``--reference-min-km``) on both sides; see :func:`score`.

``--craterstats FILE.scc`` writes the count of one time step with its counting area (the true
area of the grid's valid pixels) as a craterstats spatial crater count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from planetseg.config import CratersConfig
from planetseg.errors import InvalidArgumentError
from planetseg.executor import map_tasks
from planetseg.labels import read_crater_catalog
from planetseg.products import (
    MAX_PIXELS,
    LabelsStore,
    Window,
    block_edges,
    merge_labels,
    open_labels,
    regions,
)
from planetseg.segment import CRATER_PROBABILITY, CRATER_PROBABILITY_ATTR, is_crater_class
from planetseg.store import prepare_output

#: DeepMoon's thresholds (squared position / radius, relative radius).
POSITION_THRESHOLD2 = 1.8
RADIUS_THRESHOLD = 1.0
#: Media types of the files written beside the catalog.
MEDIA = {"scores": "application/json", "craterstats": "text/plain"}
#: Size bins (diameter, pixels of the segmentation grid).
SIZE_BINS = (0.0, 4.0, 8.0, 16.0, 32.0, math.inf)
#: A pixel is a crater's where the crater probability is at least this.
PROBABILITY_THRESHOLD = 0.5
#: How touching craters are separated (:func:`separate`); the default was chosen by
#: ``benchmarks/bench_crater_extraction.py``.
SEPARATIONS = ("distance", "probability", "combined")
SEPARATION = "distance"
#: Markers are local maxima of the separation surface this far apart (px) and above this floor
#: (px of distance; distance x probability; probability).
MIN_PEAK_DISTANCE = 3
PEAK_FLOOR = {"distance": 1.0, "combined": 0.5, "probability": PROBABILITY_THRESHOLD}
#: Gaussian sigma (px) of the probability smoothing before it is used as a surface.
SMOOTHING_PX = 1.0
#: Pixels around a blob that its separation reads: the distance transform's nearest
#: background (1 px) and the reach of the smoothing (scipy's 4 sigma).
MARGIN = 1 + int(4 * SMOOTHING_PX + 0.5)


@dataclass(frozen=True)
class CratersResult:
    """What :func:`craters` wrote and scored.

    Attributes:
        table: The craters found.
        out: The catalog file.
        scores: Matching scores against the reference (None without one).
        files: Every file written.
        reference: The reference catalog scored against, if any.
        source: What the craters were extracted from: ``crater_probability`` or ``labels``.
    """

    table: pd.DataFrame
    out: Path
    scores: dict[str, Any] | None
    files: tuple[Path, ...]
    reference: str | None = None
    source: str = "labels"


def crater_values(store: LabelsStore, names: tuple[str, ...]) -> dict[int, str]:
    """The class values that are craters (named, or every class with "crater" in its name).

    Raises:
        InvalidArgumentError: a name the store does not have, or no crater class at all.
    """
    if names:
        unknown = [n for n in names if n not in store.classes.values()]
        if unknown:
            raise InvalidArgumentError(
                f"{store.path} has no class {', '.join(unknown)} (it has "
                f"{', '.join(store.classes.values())}): fix --crater-class"
            )
        return {v: n for v, n in store.classes.items() if n in names}
    found = {v: n for v, n in store.classes.items() if is_crater_class(n)}
    if not found:
        raise InvalidArgumentError(
            f"{store.path} has no class named like a crater (it has "
            f"{', '.join(store.classes.values()) or 'no class names'}): name them with "
            "--crater-class"
        )
    return found


def crater_mask(
    labels: np.ndarray, values: dict[int, str], probability: np.ndarray | None
) -> np.ndarray:
    """The crater pixels: probability >= :data:`PROBABILITY_THRESHOLD`, or a crater class."""
    if probability is None:
        return np.isin(labels, list(values))
    return np.nan_to_num(probability, nan=0.0) >= PROBABILITY_THRESHOLD


def extract(
    labels: np.ndarray,
    confidence: np.ndarray,
    values: dict[int, str],
    *,
    probability: np.ndarray | None = None,
    min_diameter_px: float = 3.0,
    min_confidence: float = 0.0,
    separation: str = SEPARATION,
    within: np.ndarray | None = None,
    offset: tuple[int, int] = (0, 0),
) -> pd.DataFrame:
    """Individual craters of one labels grid, in pixel units (``row``, ``col``, ``area_px``...).

    Args:
        labels: The class of every pixel.
        confidence: The winning class's probability (NaN where unset).
        values: The crater classes (value -> name).
        probability: The crater probability (summed softmax of the crater classes; NaN where
            unset), or None to work on the hard labels.
        min_diameter_px: Drop craters of a smaller equivalent diameter.
        min_confidence: Drop craters whose mean probability (or, without it, confidence) is
            below this.
        separation: How touching craters are split (see :data:`SEPARATIONS`).
        within: Only the crater pixels marked here (one blob of a larger grid), or None.
        offset: The (row, column) of the arrays' first pixel in the grid: positions are the
            grid's.

    Returns:
        One row per crater, in raster order of their first pixels (``_first_row``,
        ``_first_col``); ``confidence`` is its mean crater probability (mean confidence
        without one); ``_coords`` its pixels in the arrays given.
    """
    from skimage.measure import regionprops

    if separation not in SEPARATIONS:
        raise InvalidArgumentError(f"separation {separation!r} is not one of {SEPARATIONS}")
    mask = crater_mask(labels, values, probability)
    score_map = confidence if probability is None else probability
    if within is not None:
        mask &= within
    if not mask.any():
        return pd.DataFrame(columns=["row", "col", "area_px", "label", "_first_row", "_first_col"])
    regions = separate(mask, probability, separation)
    rows = []
    for prop in regionprops(regions):
        d_px = prop.equivalent_diameter_area
        if d_px < min_diameter_px:
            continue
        rr, cc = prop.coords[:, 0], prop.coords[:, 1]
        conf = score_map[rr, cc]
        mean_conf = float(np.nanmean(conf)) if np.isfinite(conf).any() else float("nan")
        if min_confidence and not mean_conf >= min_confidence:
            continue
        counts = np.bincount(labels[rr, cc], minlength=max(values) + 1)
        cls = max(values, key=lambda v: counts[v])
        grid_rows, grid_cols = rr + offset[0], cc + offset[1]  # the same sums from any window
        rows.append(
            {
                "row": float(grid_rows.mean()),
                "col": float(grid_cols.mean()),
                "area_px": int(prop.area),
                "diameter_px": float(d_px),
                "major_px": float(prop.axis_major_length),
                "minor_px": float(prop.axis_minor_length),
                "orientation_deg": float(np.degrees(prop.orientation)),
                "label": int(prop.label),
                "class": values[cls],
                "confidence": mean_conf,
                "_first_row": int(grid_rows[0]),
                "_first_col": int(grid_cols[0]),
                "_coords": (rr, cc),
            }
        )
    found = pd.DataFrame(rows, columns=None if rows else ["row", "col", "area_px", "label"])
    if found.empty:
        return found.assign(_first_row=[], _first_col=[])
    return found.sort_values(["_first_row", "_first_col"], ignore_index=True)


def separate(mask: np.ndarray, probability: np.ndarray | None, separation: str) -> np.ndarray:
    """Split the crater pixels ``mask`` into one labelled region per crater.

    A watershed of the separation surface (``distance``: the Euclidean distance transform of
    the mask; ``probability``: the probability smoothed by :data:`SMOOTHING_PX`; ``combined``:
    their product), seeded at its local maxima at least :data:`MIN_PEAK_DISTANCE` px apart and
    above :data:`PEAK_FLOOR`. A crater's distance dome peaks at its centre and two touching
    craters meet in a neck, so each gets a marker; where the probability dips between two
    craters the product deepens that neck. Neighbouring maxima of one plateau (the flat top of
    a rasterised disc) are one marker. Without a probability every surface is ``distance``.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(mask)
    kind = "distance" if probability is None else separation
    surface = distance
    if kind != "distance":
        smooth = ndimage.gaussian_filter(np.nan_to_num(probability, nan=0.0), SMOOTHING_PX)
        surface = smooth if kind == "probability" else distance * smooth
    blobs, n_blobs = ndimage.label(mask)
    found = peak_local_max(
        surface,
        min_distance=MIN_PEAK_DISTANCE,
        labels=blobs,
        exclude_border=False,
        threshold_abs=PEAK_FLOOR[kind],
    )
    peaks = np.zeros(mask.shape, bool)
    peaks[tuple(found.T)] = True
    markers, n = ndimage.label(peaks, structure=np.ones((3, 3)))
    # Blobs without a marker (too thin or too faint for one) keep one marker of their own.
    missing = np.setdiff1d(np.arange(1, n_blobs + 1), np.unique(blobs[peaks]))
    if len(missing):
        spots = np.array(ndimage.maximum_position(distance, blobs, missing), dtype=int)
        markers[tuple(spots.T)] = np.arange(n + 1, n + 1 + len(missing))
    return watershed(-surface, markers, mask=mask)


def craters(
    store: str | Path,
    config: CratersConfig,
    *,
    client: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> CratersResult:
    """Extract the craters of every selected time step of ``store`` into ``config.out``.

    Computed block by block (``config.block``; see :func:`_extract_blocks`) on ``client``'s
    workers, or on threads here without one: the craters equal those :func:`extract` finds
    on the whole grid in memory, with the same true areas.

    Raises:
        CatalogReadError: not a complete labels store; an unreadable reference.
        InvalidArgumentError: bad output suffix, times, classes or reference columns;
            ``--craterstats`` with more than one time step.
        OutputPathError: the catalog or a file beside it is an input, a folder, not writable,
            an earlier catalog without ``overwrite``, or a file craters did not write.
    """
    from planetseg.segment import select_times

    out = Path(config.out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise InvalidArgumentError(f"--out {out}: the catalog must end in .parquet or .csv")
    count_file = Path(config.craterstats) if config.craterstats else None
    for path in (out, *_companions(out), *([count_file] if count_file else [])):
        prepare_output(
            path,
            "craters",
            kind="file",
            inputs=(store, config.reference),
            overwrite=config.overwrite,
            replace_needs_overwrite=True,
            owns_file=lambda p: _written_by_craters(out, p),
            flag="--craterstats" if path == count_file else "--out",
            label=None if path in (out, count_file) else f"{path} (written beside --out {out})",
        )
    labels = LabelsStore.open(store)
    values = crater_values(labels, config.crater_classes)
    reference = read_crater_catalog(config.reference).table if config.reference else None
    times = select_times(labels.times, config.times)
    if count_file and len(times) != 1:
        raise InvalidArgumentError(
            f"--craterstats {count_file}: a crater count is of one surface at one time, and "
            f"{labels.path} has {len(times)} time steps selected: pick one with --time"
        )
    source = _source(labels, values)
    nominal_px_km = labels.nominal_pixel_km()
    frames, counted_km2 = [], 0.0
    for t in times:
        found, counted = _extract_blocks(
            labels, t, values, source, config, count=bool(count_file), client=client,
            progress=progress,
        )  # fmt: skip
        counted_km2 += counted  # one time step with a count (checked above)
        if found.empty:
            continue
        lon, lat = labels.pixel_centres_lonlat(found["row"].to_numpy(), found["col"].to_numpy())
        true_area = found["area_km2"].to_numpy()
        scale = np.sqrt(true_area / (found["area_px"].to_numpy() * 1.0))  # km per px, locally
        found = found.assign(
            lon=lon,
            lat=lat,
            diameter_km=2 * np.sqrt(true_area / math.pi),
            major_km=found["major_px"] * scale,
            minor_km=found["minor_px"] * scale,
            epoch=t,
            time=labels.times[t],
        )
        frames.append(found)
    columns = [
        "lon", "lat", "diameter_km", "class", "confidence", "epoch", "time", "diameter_px",
        "area_km2", "major_km", "minor_km", "orientation_deg", "row", "col",
    ]  # fmt: skip
    table = (
        pd.concat(frames, ignore_index=True)[columns]
        if frames
        else pd.DataFrame({c: [] for c in columns})
    )
    table.insert(0, "id", np.arange(len(table)))
    scores = None
    if reference is not None:
        scores = score(
            table,
            reference,
            labels,
            times,
            nominal_px_km,
            min_diameter_px=config.min_diameter_px,
            reference_min_km=config.reference_min_km,
        )
    count = (count_file, counted_km2) if count_file else None
    files = _write(out, table, labels, values, config, scores, count, source)
    return CratersResult(table, out, scores, files, config.reference, source)


def _blobs(
    path: str, t: int, window: Window, values: dict[int, str], source: str, count: bool
) -> dict[str, Any]:
    """First pass over a block: its crater blobs (8-connected), their first pixel and box."""
    from scipy import ndimage

    store = open_labels(path)
    labels = store.read(t, window=window)
    probability = store.read(t, source, window) if source == CRATER_PROBABILITY else None
    mask = crater_mask(labels, values, probability)
    found, n = regions(mask.view(np.uint8), mask)
    flat = found.ravel()
    present, first = np.unique(flat, return_index=True)
    first = first[present > 0]
    (r0, r1), (c0, c1) = window
    boxes = np.array(
        [(b[0].start, b[0].stop, b[1].start, b[1].stop) for b in ndimage.find_objects(found)],
        dtype=np.int64,
    ).reshape(n, 4) + np.array([r0, r0, c0, c0])
    counted = 0.0
    if count:  # the area of the pixels segment wrote
        valid = np.isfinite(store.read(t, "confidence", window))
        counted = float(store.pixel_area_km2(window)[valid].sum())
    return {
        "count": n,
        "first": (r0 + first // (c1 - c0)) * store.shape[1] + c0 + first % (c1 - c0),
        "boxes": boxes,
        "edges": block_edges(found, mask.view(np.uint8)),
        "counted": counted,
    }


def _measure(
    path: str,
    t: int,
    window: Window,
    blobs: np.ndarray,
    values: dict[int, str],
    source: str,
    config: CratersConfig,
) -> pd.DataFrame:
    """Second pass: the craters of whole blobs (rows: first row, first column, box with margin).

    Each blob is split and measured on its box alone (its own pixels, the probability around
    them): what the whole grid's :func:`extract` finds for its pixels, to the last bit.
    """
    from scipy import ndimage

    store = open_labels(path)
    labels = store.read(t, window=window)
    confidence = store.read(t, "confidence", window)
    probability = store.read(t, source, window) if source == CRATER_PROBABILITY else None
    found, _ = ndimage.label(crater_mask(labels, values, probability), structure=np.ones((3, 3)))
    (w0, _), (v0, _) = window
    frames = []
    for first_row, first_col, a0, a1, b0, b1 in blobs.tolist():
        crop = slice(a0 - w0, a1 - w0), slice(b0 - v0, b1 - v0)
        got = extract(
            labels[crop],
            confidence[crop],
            values,
            probability=None if probability is None else probability[crop],
            min_diameter_px=config.min_diameter_px,
            min_confidence=config.min_confidence,
            within=found[crop] == found[first_row - w0, first_col - v0],
            offset=(a0, b0),
        )
        if got.empty:
            continue
        area = store.pixel_area_km2(((a0, a1), (b0, b1)))
        frames.append(got.assign(area_km2=[area[c].sum() for c in got.pop("_coords")]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _extract_blocks(
    store: LabelsStore,
    t: int,
    values: dict[int, str],
    source: str,
    config: CratersConfig,
    *,
    count: bool,
    client: Any,
    progress: Callable[[int, int], None] | None,
) -> tuple[pd.DataFrame, float]:
    """The craters of time step ``t`` (pixel units, true areas) and the counted area (km^2).

    First pass: per block, the blobs of crater pixels, merged across block borders into
    whole blobs (first pixel and bounding box). Second pass: each blob is split and measured
    on its box grown by :data:`MARGIN` (what its separation reads), by the block holding its
    first pixel, so it is counted once; a blob whose box is higher or wider than a block gets
    a task of its own that reads just its box.

    Raises:
        InvalidArgumentError: one blob larger than a task can hold (:data:`MAX_PIXELS`).
    """
    grid = store.grid(config.block)
    blocks = list(grid.blocks())
    path = str(store.path)
    stats: dict[tuple[int, int], dict[str, Any]] = {}
    map_tasks(
        _blobs,
        ((path, t, grid.window(*b), values, source, count) for b in blocks),
        lambda k, r: stats.__setitem__(blocks[k], r),
        client=client,
        progress=progress,
        total=len(blocks),
    )
    _, objects = merge_labels(
        grid, {b: r["count"] for b, r in stats.items()}, {b: r["edges"] for b, r in stats.items()}
    )
    counted = sum(r["counted"] for r in stats.values())
    if not len(objects):
        return pd.DataFrame(), counted
    n = int(objects.max()) + 1
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, objects, np.concatenate([stats[b]["first"] for b in blocks]))
    boxes = np.concatenate([stats[b]["boxes"] for b in blocks])
    stats.clear()
    box = np.empty((n, 4), np.int64)
    h, w = store.shape
    for k, (reduce, grow, limit) in enumerate(
        ((np.minimum, -MARGIN, h), (np.maximum, MARGIN, h),
         (np.minimum, -MARGIN, w), (np.maximum, MARGIN, w))
    ):  # fmt: skip
        box[:, k] = np.iinfo(np.int64).max if reduce is np.minimum else 0
        reduce.at(box[:, k], objects, boxes[:, k])
        box[:, k] = np.clip(box[:, k] + grow, 0, limit)  # grown by the margin, in the grid
    first_row, first_col = np.divmod(first, w)
    blobs = np.c_[first_row, first_col, box]
    pixels = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    if pixels.max() > MAX_PIXELS:
        k = int(pixels.argmax())
        raise InvalidArgumentError(
            f"{store.path} has a crater blob of {pixels[k]:,} px in its box (first pixel at row "
            f"{first_row[k]}, column {first_col[k]}), more than one task holds "
            f"({MAX_PIXELS:,}): pick a --crater-class or --time whose craters are apart"
        )
    # A box higher or wider than a block gets a task of its own; the others are measured by the
    # block of their first pixel, in one window of at most 3 x 3 blocks.
    big = (box[:, 1] - box[:, 0] > grid.rows[1]) | (box[:, 3] - box[:, 2] > grid.cols[1])
    owner_i, owner_j = grid.block_of(first_row, first_col)
    owner = owner_i * grid.shape[1] + owner_j
    tasks = [blobs[[k]] for k in np.flatnonzero(big)]
    small = np.flatnonzero(~big)
    order = small[np.argsort(owner[small], kind="stable")]
    tasks += [
        g for g in np.split(blobs[order], np.flatnonzero(np.diff(owner[order])) + 1) if len(g)
    ]

    def window(group: np.ndarray) -> Window:
        return (
            (int(group[:, 2].min()), int(group[:, 3].max())),
            (int(group[:, 4].min()), int(group[:, 5].max())),
        )

    frames: list[pd.DataFrame] = []
    map_tasks(
        _measure,
        ((path, t, window(g), g, values, source, config) for g in tasks),
        lambda _, r: frames.append(r),
        client=client,
        progress=progress,
        total=len(tasks),
    )
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(), counted
    found = pd.concat(frames, ignore_index=True)
    found = found.sort_values(["_first_row", "_first_col"], ignore_index=True)
    return found.drop(columns=["_first_row", "_first_col", "label"]), counted


def _source(store: LabelsStore, values: dict[int, str]) -> str:
    """What to extract craters from: ``crater_probability`` or the hard ``labels``.

    The store's crater probability if it sums exactly the crater classes asked for; else the
    labels (as in stores of older planetseg, which have no crater probability).
    """
    summed = json.loads(store.attrs.get(CRATER_PROBABILITY_ATTR) or "[]")
    has = CRATER_PROBABILITY in store.dataset and sorted(summed) == sorted(values.values())
    return CRATER_PROBABILITY if has else "labels"


def read_craters(out: str | Path) -> CratersResult:
    """The result of an earlier :func:`craters`: its catalog and, if it was scored, its scores.

    Raises:
        CatalogReadError: ``out`` is not a catalog planetseg craters wrote.
    """
    from planetseg.errors import CatalogReadError

    out = Path(out)
    item = _own_item(out)
    if item is None:
        raise CatalogReadError(f"{out} is not a crater catalog of planetseg craters")
    table = pd.read_csv(out) if out.suffix.lower() == ".csv" else pd.read_parquet(out)
    table = table.drop(columns="geometry", errors="ignore")
    assets = item["assets"]
    scores = json.loads(Path(assets["scores"]["href"]).read_text()) if "scores" in assets else None
    beside = (Path(a["href"]) for key, a in assets.items() if key != "catalog")
    files = (out, *beside, _companions(out)[1])
    props = item["properties"]
    source = props.get("planetseg:extracted_from", "labels")
    return CratersResult(table, out, scores, files, props.get("planetseg:reference"), source)


def _companions(out: Path) -> tuple[Path, Path]:
    """The files written beside the catalog: its scores and its STAC item."""
    return out.with_name(out.stem + ".scores.json"), out.with_name(out.stem + ".items.ndjson")


def _own_item(out: Path) -> dict[str, Any] | None:
    """The STAC item beside the catalog ``out`` if an earlier craters run wrote both, else None."""
    from planetseg.errors import CatalogReadError
    from planetseg.items import read_items

    try:
        [item] = read_items(_companions(out)[1])
    except (CatalogReadError, ValueError):
        return None
    if item.get("properties", {}).get("planetseg:product") != "craters":
        return None
    return item if str(out.resolve()) in _hrefs(item) else None


def _hrefs(item: dict[str, Any]) -> set[str]:
    return {str(a.get("href")) for a in item.get("assets", {}).values()}


def _written_by_craters(out: Path, path: Path) -> bool:
    """Whether ``path`` is a file of an earlier craters run into ``out``, as its item says."""
    item = _own_item(out)
    if item is None:
        return False
    return path == _companions(out)[1] or str(path.resolve()) in _hrefs(item)


def _great_circle_km(lon1, lat1, lon2, lat2, radius_km: float) -> np.ndarray:  # noqa: ANN001
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dl = np.radians(np.asarray(lon2) - np.asarray(lon1))
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * radius_km * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


def match(
    detected: pd.DataFrame, reference: pd.DataFrame, radius_km: float
) -> list[tuple[int, int, float]]:
    """One-to-one DeepMoon matches ``(detected row, reference row, distance km)``, closest first."""
    if detected.empty or reference.empty:
        return []
    from scipy.spatial import cKDTree

    def xyz(frame: pd.DataFrame) -> np.ndarray:
        lon, lat = np.radians(frame["lon"].to_numpy()), np.radians(frame["lat"].to_numpy())
        return np.c_[np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)]

    rd = detected["diameter_km"].to_numpy() / 2
    rr = reference["diameter_km"].to_numpy() / 2
    reach = math.sqrt(POSITION_THRESHOLD2) * max(rd.max(), rr.max()) / radius_km
    tree = cKDTree(xyz(reference))
    near = tree.query_ball_point(xyz(detected), r=2 * math.sin(reach / 2) + 1e-12)
    i = np.repeat(np.arange(len(detected)), [len(n) for n in near])
    j = np.fromiter((k for n in near for k in n), dtype=int, count=len(i))
    dlon, dlat = detected["lon"].to_numpy(), detected["lat"].to_numpy()
    rlon, rlat = reference["lon"].to_numpy(), reference["lat"].to_numpy()
    dist = _great_circle_km(dlon[i], dlat[i], rlon[j], rlat[j], radius_km)
    r_min = np.minimum(rd[i], rr[j])
    ok = (dist**2 / r_min**2 < POSITION_THRESHOLD2) & (
        np.abs(rd[i] - rr[j]) / r_min < RADIUS_THRESHOLD
    )
    candidates = sorted(
        zip((dist / r_min)[ok], i[ok], j[ok], dist[ok], strict=True), key=lambda c: c[0]
    )
    used_d, used_r, pairs = set(), set(), []
    for _, a, b, d in candidates:
        if a not in used_d and b not in used_r:
            used_d.add(a)
            used_r.add(b)
            pairs.append((int(a), int(b), float(d)))
    return pairs


def score(
    table: pd.DataFrame,
    reference: pd.DataFrame,
    store: LabelsStore,
    times: list[int],
    px_km: float,
    *,
    min_diameter_px: float = 0.0,
    reference_min_km: float = 0.0,
) -> dict[str, Any]:
    """Precision, recall, F1 and median errors per size bin, above the limits and overall.

    Every crater is binned by *one* diameter, so a bin's precision and recall are of the same
    craters: a matched pair by the reference's diameter, an unmatched detection (a false
    positive) and an unmatched reference crater (a miss) by their own. A crater counts in the
    bins and in ``total`` only from ``min_diameter_px`` (nominal pixels of the grid) and
    ``reference_min_km`` up, on both sides alike: a smaller reference crater is no miss and a
    smaller unmatched detection no false positive. ``all`` counts every crater, no limits.
    """
    from pyproj import Transformer

    from planetseg.bodies import celestial_proj

    with celestial_proj():
        tr = Transformer.from_crs(store.body.crs, store.crs_wkt, always_xy=True)
        x, y = tr.transform(reference["lon"].to_numpy(), reference["lat"].to_numpy())
    a, _, c, _, e, f = store.transform
    h, w = store.shape
    col, row = (np.asarray(x) - c) / a, (np.asarray(y) - f) / e
    inside = reference[(col >= 0) & (col < w) & (row >= 0) & (row < h)].reset_index(drop=True)
    radius_km = store.body.radius_m / 1000
    # One record per matched pair, unmatched detection and unmatched reference crater.
    records = []
    for t in times:
        det = table[table["epoch"] == t].reset_index(drop=True)
        ref = inside[inside["epoch"] <= t] if "epoch" in inside else inside
        ref = ref.reset_index(drop=True)
        d_det, d_ref = det["diameter_km"].to_numpy(), ref["diameter_km"].to_numpy()
        pairs = match(det, ref, radius_km)
        for i, j, dist in pairs:
            records.append(
                ("match", d_ref[j], (d_det[i] - d_ref[j]) / d_ref[j], dist, dist / (d_ref[j] / 2))
            )
        nan = float("nan")
        hit_d, hit_r = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
        records += [("false", d, nan, nan, nan) for i, d in enumerate(d_det) if i not in hit_d]
        records += [("miss", d, nan, nan, nan) for j, d in enumerate(d_ref) if j not in hit_r]
    r = pd.DataFrame(
        records, columns=["kind", "diameter_km", "error", "position_km", "position_radii"]
    )
    size_px = r["diameter_km"].to_numpy(float) / px_km
    counted = (size_px >= min_diameter_px) & (r["diameter_km"].to_numpy(float) >= reference_min_km)
    which = np.digitize(size_px, SIZE_BINS) - 1

    def summary(sel: np.ndarray) -> dict[str, Any]:
        sub = r[sel]
        tp = int((sub["kind"] == "match").sum())
        n_d = tp + int((sub["kind"] == "false").sum())
        n_r = tp + int((sub["kind"] == "miss").sum())
        p = tp / n_d if n_d else None
        rc = tp / n_r if n_r else None
        f1 = (
            2 * p * rc / (p + rc)
            if p and rc
            else (0.0 if p is not None and rc is not None else None)
        )
        m = sub[sub["kind"] == "match"]

        def median(values: pd.Series) -> float | None:
            return float(values.median()) if len(m) else None

        return {
            "detected": n_d,
            "reference": n_r,
            "matched": tp,
            "precision": p,
            "recall": rc,
            "f1": f1,
            "median_diameter_error": median(m["error"].abs()),
            "median_diameter_bias": median(m["error"]),
            "median_position_error_km": median(m["position_km"]),
            "median_position_error_radii": median(m["position_radii"]),
        }

    m_per_px = px_km * 1000
    bins = {}
    for k in range(len(SIZE_BINS) - 1):
        lo, hi = SIZE_BINS[k], SIZE_BINS[k + 1]
        name = f"{lo:g}-{hi:g} px" if math.isfinite(hi) else f">={lo:g} px"
        bins[name] = {
            "px": [lo, hi if math.isfinite(hi) else None],
            "m": [lo * m_per_px, hi * m_per_px if math.isfinite(hi) else None],
            **summary(counted & (which == k)),
        }
    return {
        "criteria": {
            "position_threshold2": POSITION_THRESHOLD2,
            "radius_threshold": RADIUS_THRESHOLD,
            "binned_by": "reference diameter for a matched pair, its own for the others",
        },
        "pixel_km": px_km,
        "times": [store.times[t] for t in times],
        "limits": {
            "min_diameter_px": min_diameter_px,
            "min_diameter_m": min_diameter_px * m_per_px,
            "reference_min_km": reference_min_km,
        },
        "total": summary(counted),
        "all": summary(np.ones(len(r), bool)),
        "bins": bins,
    }


def _write(
    out: Path,
    table: pd.DataFrame,
    store: LabelsStore,
    values: dict[int, str],
    config: CratersConfig,
    scores: dict[str, Any] | None,
    count: tuple[Path, float] | None,
    source: str,
) -> tuple[Path, ...]:
    import geopandas as gpd

    from planetseg.bodies import celestial_proj
    from planetseg.items import atomic_path, write_items

    scores_path, items = _companions(out)
    # The item goes first: it is what tells a later run (with --overwrite) that the catalog
    # and the files beside it are craters' own, even if this run dies before writing them.
    extra = {"scores": scores_path} if scores is not None else {}
    if count:
        extra["craterstats"] = count[0]
    write_items([_catalog_item(out, table, store, values, config, extra, source)], items)
    files = [out]
    if scores is not None:
        with atomic_path(scores_path) as tmp:
            tmp.write_text(json.dumps(scores, indent=1))
        files.append(scores_path)
    else:
        scores_path.unlink(missing_ok=True)  # an earlier run's (checked), not for this catalog
    if count:
        with atomic_path(count[0]) as tmp:
            tmp.write_text(craterstats_text(table, count[1], store))
        files.append(count[0])
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".csv":
            table.to_csv(tmp, index=False)
        else:
            with celestial_proj():
                frame = gpd.GeoDataFrame(
                    table,
                    geometry=gpd.points_from_xy(table["lon"], table["lat"]),
                    crs=store.body.crs.to_wkt(),
                )
                frame.to_parquet(tmp)
    files.append(items)
    return tuple(files)


def craterstats_text(table: pd.DataFrame, area_km2: float, store: LabelsStore) -> str:
    """The catalog as a craterstats spatial crater count (``.scc``).

    It holds the counting area (km^2) and every crater's diameter (km), fraction (1: the whole
    crater is counted) and centre (body degrees).

    The area is written in fixed-point notation: craterstats reads ``Total_area`` as digits
    and dots only.
    """
    from planetseg import __version__

    radius = np.format_float_positional(store.body.radius_m / 1000, trim="-")
    when = ", ".join(sorted(set(table["time"]))) if len(table) else ""
    lines = [
        "# Spatial crater count",
        f"# planetseg {__version__} craters of {store.path.resolve()}"
        + (f" at {when}" if when else ""),
        f"# body: {store.body.name}; counting area: the valid pixels of the labels grid",
        "#",
        "# Ellipsoid axes:",
        *(f"{axis}_axis_radius = {radius} <km>" for axis in "abc"),
        "#",
        f"Total_area = {np.format_float_positional(area_km2, precision=12, trim='-')} <km^2>",
        "#",
        "# crater_diameters:",
        "crater = {diam,fraction,lon,lat",
        *(
            f"{np.format_float_positional(d, precision=9, trim='-')}\t1\t{lon:.9f}\t{lat:.9f}"
            for d, lon, lat in table[["diameter_km", "lon", "lat"]].itertuples(index=False)
        ),
        "}",
    ]
    return "\n".join(lines) + "\n"


def _catalog_item(
    out: Path,
    table: pd.DataFrame,
    store: LabelsStore,
    values: dict[int, str],
    config: CratersConfig,
    extra: dict[str, Path],
    source: str,
) -> dict[str, Any]:
    """A STAC item for the catalog: footprint of the grid in body lon/lat, the table as asset.

    The scores and craterstats files, if any, are assets too: the item lists every file the
    run wrote.
    """
    from shapely.geometry import box, mapping

    h, w = store.shape
    rows = np.array([0, 0, h, h, h / 2, 0, h / 2, h], float) - 0.5
    cols = np.array([0, w, 0, w, 0, w / 2, w, w / 2], float) - 0.5
    lon, lat = store.pixel_centres_lonlat(rows, cols)
    footprint = box(lon.min(), lat.min(), lon.max(), lat.max())
    times = sorted(set(table["time"])) if len(table) else store.times
    media = "text/csv" if out.suffix.lower() == ".csv" else "application/vnd.apache.parquet"
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": f"craters-{out.stem}",
        "collection": "planetseg-craters",
        "geometry": mapping(footprint),
        "bbox": list(footprint.bounds),
        "properties": {
            "datetime": None,
            "start_datetime": times[0] + "Z",
            "end_datetime": times[-1] + "Z",
            "planetseg:product": "craters",
            "planetseg:body": store.body.name,
            "planetseg:labels": str(store.path.resolve()),
            "planetseg:model": str(store.attrs.get("planetseg:model", "")),
            "planetseg:crater_classes": sorted(values.values()),
            "planetseg:count": len(table),
            "planetseg:min_diameter_px": config.min_diameter_px,
            "planetseg:min_confidence": config.min_confidence,
            "planetseg:extracted_from": source,
            "planetseg:reference": config.reference,
        },
        "links": [],
        "assets": {
            "catalog": {"href": str(out.resolve()), "type": media, "roles": ["data"]},
            **{
                key: {"href": str(path.resolve()), "type": MEDIA[key], "roles": ["metadata"]}
                for key, path in extra.items()
            },
        },
    }
