"""The ``craters`` stage: a crater catalog from the crater classes of a labels store.

Per time step, the pixels of the crater classes are split into individual craters: touching
craters merge into one blob in the mask, so the blob is cut by a watershed on its distance
transform, seeded at the distance maxima (one per crater centre). Each crater gets

* ``lon``, ``lat``: its centroid in the body's own longitude/latitude (degrees);
* ``diameter_km``: the diameter of the circle of the same *true* area (pixel areas on the
  body, see :mod:`planetseg.products`), and ``diameter_px`` on the segmentation grid;
* ``major_km``, ``minor_km``, ``orientation_deg``: the fitted ellipse (image moments);
* ``class`` (the majority crater class), ``confidence`` (mean probability) and ``epoch``
  (time index) with ``time``.

``--reference`` scores the catalog against another (planetseg's or craterpy's columns) with
DeepMoon's matching criteria (Silburt et al. 2019): a detection ``d`` matches a reference
crater ``r`` when ``dist(d, r)^2 / min(R_d, R_r)^2 < 1.8`` (great-circle distance on the
body) and ``|R_d - R_r| / min(R_d, R_r) < 1.0``, radii ``R``; pairs are matched one to one,
closest first. Only reference craters whose centre lies in the grid count, and a reference
with an ``epoch`` column (the synthetic world's) is compared per time step with the craters
that exist by then (``epoch <= t``). Scores come per size bin of the diameter in pixels of the
segmentation grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from planetseg.config import CratersConfig
from planetseg.errors import InvalidArgumentError
from planetseg.labels import read_crater_catalog
from planetseg.products import LabelsStore
from planetseg.store import prepare_output

#: DeepMoon's thresholds (squared position / radius, relative radius).
POSITION_THRESHOLD2 = 1.8
RADIUS_THRESHOLD = 1.0
#: Size bins (diameter, pixels of the segmentation grid).
SIZE_BINS = (0.0, 4.0, 8.0, 16.0, 32.0, math.inf)


@dataclass(frozen=True)
class CratersResult:
    """What :func:`craters` wrote and scored.

    Attributes:
        table: The craters found.
        out: The catalog file.
        scores: Matching scores against the reference (None without one).
        files: Every file written.
        reference: The reference catalog scored against, if any.
    """

    table: pd.DataFrame
    out: Path
    scores: dict[str, Any] | None
    files: tuple[Path, ...]
    reference: str | None = None


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
    found = {v: n for v, n in store.classes.items() if "crater" in n.lower()}
    if not found:
        raise InvalidArgumentError(
            f"{store.path} has no class named like a crater (it has "
            f"{', '.join(store.classes.values()) or 'no class names'}): name them with "
            "--crater-class"
        )
    return found


def extract(
    labels: np.ndarray,
    confidence: np.ndarray,
    values: dict[int, str],
    *,
    min_diameter_px: float = 3.0,
) -> pd.DataFrame:
    """Individual craters of one labels grid, in pixel units (``row``, ``col``, ``area_px``...)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    mask = np.isin(labels, list(values))
    if not mask.any():
        return pd.DataFrame(columns=["row", "col", "area_px", "label"])
    blobs, _ = ndimage.label(mask)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(
        distance, min_distance=2, labels=blobs, exclude_border=False, threshold_abs=1.0
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Blobs without a peak (too thin for one) keep one marker of their own.
    missing = np.setdiff1d(np.unique(blobs[mask]), np.unique(blobs[tuple(peaks.T)]))
    if len(missing):
        spots = np.array(ndimage.maximum_position(distance, blobs, missing), dtype=int)
        markers[tuple(spots.T)] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(missing))
    regions = watershed(-distance, markers, mask=mask)
    rows = []
    for prop in regionprops(regions):
        d_px = prop.equivalent_diameter_area
        if d_px < min_diameter_px:
            continue
        rr, cc = prop.coords[:, 0], prop.coords[:, 1]
        counts = np.bincount(labels[rr, cc], minlength=max(values) + 1)
        cls = max(values, key=lambda v: counts[v])
        conf = confidence[rr, cc]
        rows.append(
            {
                "row": prop.centroid[0],
                "col": prop.centroid[1],
                "area_px": int(prop.area),
                "diameter_px": float(d_px),
                "major_px": float(prop.axis_major_length),
                "minor_px": float(prop.axis_minor_length),
                "orientation_deg": float(np.degrees(prop.orientation)),
                "label": int(prop.label),
                "class": values[cls],
                "confidence": float(np.nanmean(conf)) if np.isfinite(conf).any() else float("nan"),
                "_coords": (rr, cc),
            }
        )
    return pd.DataFrame(rows)


def craters(store: str | Path, config: CratersConfig) -> CratersResult:
    """Extract the craters of every selected time step of ``store`` into ``config.out``.

    Raises:
        CatalogReadError: not a complete labels store; an unreadable reference.
        InvalidArgumentError: bad output suffix, times, classes or reference columns.
        OutputPathError: the catalog or a file beside it is an input, a folder, not writable,
            an earlier catalog without ``overwrite``, or a file craters did not write.
    """
    from planetseg.segment import select_times

    out = Path(config.out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise InvalidArgumentError(f"--out {out}: the catalog must end in .parquet or .csv")
    for path in (out, *_companions(out)):
        prepare_output(
            path,
            "craters",
            kind="file",
            inputs=(store, config.reference),
            overwrite=config.overwrite,
            replace_needs_overwrite=True,
            owns_file=lambda p: _written_by_craters(out, p),
            label=None if path == out else f"{path} (written beside --out {out})",
        )
    labels = LabelsStore.open(store)
    values = crater_values(labels, config.crater_classes)
    reference = read_crater_catalog(config.reference).table if config.reference else None
    times = select_times(labels.times, config.times)
    area = labels.pixel_area_km2()
    nominal_px_km = math.sqrt(float(np.median(area)))
    frames = []
    for t in times:
        found = extract(
            labels.read(t),
            labels.read(t, "confidence"),
            values,
            min_diameter_px=config.min_diameter_px,
        )
        if found.empty:
            continue
        lon, lat = labels.pixel_centres_lonlat(found["row"].to_numpy(), found["col"].to_numpy())
        true_area = np.array([area[rr, cc].sum() for rr, cc in found.pop("_coords")])
        scale = np.sqrt(true_area / (found["area_px"].to_numpy() * 1.0))  # km per px, locally
        found = found.assign(
            lon=lon,
            lat=lat,
            diameter_km=2 * np.sqrt(true_area / math.pi),
            area_km2=true_area,
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
        scores = score(table, reference, labels, times, nominal_px_km)
    files = _write(out, table, labels, values, config, scores)
    return CratersResult(table, out, scores, files, config.reference)


def read_craters(out: str | Path) -> CratersResult:
    """The result of an earlier :func:`craters`: its catalog and, if it was scored, its scores.

    Raises:
        CatalogReadError: ``out`` is not a catalog planetseg craters wrote.
    """
    from planetseg.errors import CatalogReadError
    from planetseg.items import read_items

    out = Path(out)
    scores_path, items = _companions(out)
    if not _written_by_craters(out, out):
        raise CatalogReadError(f"{out} is not a crater catalog of planetseg craters")
    [item] = read_items(items)
    table = pd.read_csv(out) if out.suffix.lower() == ".csv" else pd.read_parquet(out)
    table = table.drop(columns="geometry", errors="ignore")
    scored = "scores" in item["assets"]
    scores = json.loads(scores_path.read_text()) if scored else None
    files = (out, scores_path, items) if scored else (out, items)
    return CratersResult(table, out, scores, files, item["properties"].get("planetseg:reference"))


def _companions(out: Path) -> tuple[Path, Path]:
    """The files written beside the catalog: its scores and its STAC item."""
    return out.with_name(out.stem + ".scores.json"), out.with_name(out.stem + ".items.ndjson")


def _written_by_craters(out: Path, path: Path) -> bool:
    """Whether ``path`` is a file of an earlier craters run into ``out``, as its item says."""
    from planetseg.errors import CatalogReadError
    from planetseg.items import read_items

    items = _companions(out)[1]
    try:
        [item] = read_items(items)
    except (CatalogReadError, ValueError):
        return False
    if item.get("properties", {}).get("planetseg:product") != "craters":
        return False
    hrefs = {str(a.get("href")) for a in item.get("assets", {}).values()}
    return str(out.resolve()) in hrefs and (path == items or str(path.resolve()) in hrefs)


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
) -> dict[str, Any]:
    """Precision, recall, F1 and median errors, overall and per size bin (pixels)."""
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
    # Per crater, over every time step: its size bin and whether it was matched.
    dbin, dhit, rbin, rhit, matched = [], [], [], [], []
    for t in times:
        det = table[table["epoch"] == t].reset_index(drop=True)
        ref = inside[inside["epoch"] <= t] if "epoch" in inside else inside
        ref = ref.reset_index(drop=True)
        ref_bins = np.digitize(ref["diameter_km"] / px_km, SIZE_BINS) - 1
        det_hit = np.zeros(len(det), bool)
        ref_hit = np.zeros(len(ref), bool)
        for i, j, dist in match(det, ref, radius_km):
            det_hit[i] = ref_hit[j] = True
            d_ref = ref["diameter_km"].iat[j]
            matched.append(
                {
                    "bin": int(ref_bins[j]),
                    "diameter_error": abs(det["diameter_km"].iat[i] - d_ref) / d_ref,
                    "position_error_km": dist,
                    "position_error_radii": dist / (d_ref / 2),
                }
            )
        dbin.append(np.digitize(det["diameter_km"] / px_km, SIZE_BINS) - 1)
        dhit.append(det_hit)
        rbin.append(ref_bins)
        rhit.append(ref_hit)
    dbin, rbin = (np.concatenate([np.zeros(0, int), *b]) for b in (dbin, rbin))
    dhit, rhit = (np.concatenate([np.zeros(0, bool), *h]) for h in (dhit, rhit))
    m = pd.DataFrame(matched)

    def summary(dsel: np.ndarray, rsel: np.ndarray, msel: Any) -> dict[str, Any]:
        tp_d, n_d = int(dhit[dsel].sum()), int(dsel.sum())
        tp_r, n_r = int(rhit[rsel].sum()), int(rsel.sum())
        p = tp_d / n_d if n_d else None
        r = tp_r / n_r if n_r else None
        f1 = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
        sub = m[msel] if len(m) else m
        return {
            "detected": n_d,
            "reference": n_r,
            "matched": tp_r,
            "precision": p,
            "recall": r,
            "f1": f1,
            "median_diameter_error": float(sub["diameter_error"].median()) if len(sub) else None,
            "median_position_error_km": float(sub["position_error_km"].median())
            if len(sub)
            else None,
            "median_position_error_radii": float(sub["position_error_radii"].median())
            if len(sub)
            else None,
        }

    bins = {}
    for k in range(len(SIZE_BINS) - 1):
        lo, hi = SIZE_BINS[k], SIZE_BINS[k + 1]
        name = f"{lo:g}-{hi:g} px" if math.isfinite(hi) else f">={lo:g} px"
        bins[name] = summary(dbin == k, rbin == k, (m["bin"] == k) if len(m) else None)
    everything = summary(
        np.ones(len(dbin), bool),
        np.ones(len(rbin), bool),
        np.ones(len(m), bool) if len(m) else None,
    )
    return {
        "criteria": {
            "position_threshold2": POSITION_THRESHOLD2,
            "radius_threshold": RADIUS_THRESHOLD,
        },
        "pixel_km": px_km,
        "times": [store.times[t] for t in times],
        "all": everything,
        "bins": bins,
    }


def _write(
    out: Path,
    table: pd.DataFrame,
    store: LabelsStore,
    values: dict[int, str],
    config: CratersConfig,
    scores: dict[str, Any] | None,
) -> tuple[Path, ...]:
    import geopandas as gpd

    from planetseg.bodies import celestial_proj
    from planetseg.items import atomic_path, write_items

    scores_path, items = _companions(out)
    # The item goes first: it is what tells a later run (with --overwrite) that the catalog
    # and the scores beside it are craters' own, even if this run dies before writing them.
    listed = scores_path if scores is not None else None
    write_items([_catalog_item(out, table, store, values, config, listed)], items)
    files = [out]
    if scores is not None:
        with atomic_path(scores_path) as tmp:
            tmp.write_text(json.dumps(scores, indent=1))
        files.append(scores_path)
    else:
        scores_path.unlink(missing_ok=True)  # an earlier run's (checked), not for this catalog
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


def _catalog_item(
    out: Path,
    table: pd.DataFrame,
    store: LabelsStore,
    values: dict[int, str],
    config: CratersConfig,
    scores: Path | None,
) -> dict[str, Any]:
    """A STAC item for the catalog: footprint of the grid in body lon/lat, the table as asset.

    The scores file, if any, is an asset too: the item lists every file the run wrote.
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
            "planetseg:reference": config.reference,
        },
        "links": [],
        "assets": {
            "catalog": {"href": str(out.resolve()), "type": media, "roles": ["data"]},
            **(
                {
                    "scores": {
                        "href": str(scores.resolve()),
                        "type": "application/json",
                        "roles": ["metadata"],
                    }
                }
                if scores
                else {}
            ),
        },
    }
