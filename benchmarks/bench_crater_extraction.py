"""Which surface separates touching craters best, and are the diameters unbiased?

Side by side in one run, on rasters whose craters are known exactly:

* **pairs**: discs of known diameter (6-40 px) rasterised on a pixel grid, alone and in
  touching or overlapping pairs (centre distance 0.8-1.0 x the sum of the radii);
* **world**: the synthetic world's exact label rasters (seeds 4 and 5, 512 px, every epoch),
  matched to its catalog with DeepMoon's criteria;
* **ctx**: the Robbins craters of the real Mars CTX mosaic (``shared/data/craters-real``,
  577 craters of 1-32 km, 10-340 px at 95 m) rasterised as discs on its grid: the overlaps
  and clusters of a real crater population (labels only; the imagery is not used);

each as exact hard labels and as a *soft probability* (the crater mask blurred by a Gaussian
of 1.5 px and noised: what a network that segments from 2x coarser input gives). For each
separation (``previous``: the distance-transform peaks of planetseg before the crater
probability; ``distance``, ``probability``, ``combined``: :func:`planetseg.craters.separate`)
it prints how many pairs split into exactly two craters, isolated discs stay one, the F1 of
the world's craters of 8 px and more, and the median signed diameter error of matched
craters.

    python benchmarks/bench_crater_extraction.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from affine import Affine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu  # noqa: E402
from planetseg import craters as C  # noqa: E402
from planetseg.products import to_lonlat  # noqa: E402
from planetseg.synthetic import CLASSES, SynthConfig, synthesize  # noqa: E402

MOON_KM = 1737.4
MARS_KM = 3396.19
VALUES = {v: n for v, n in CLASSES.items() if "crater" in n}


def previous(mask: np.ndarray) -> np.ndarray:
    """planetseg's separation before this benchmark: distance peaks, min_distance 2."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    blobs, _ = ndimage.label(mask)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(
        distance, min_distance=2, labels=blobs, exclude_border=False, threshold_abs=1.0
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    missing = np.setdiff1d(np.unique(blobs[mask]), np.unique(blobs[tuple(peaks.T)]))
    if len(missing):
        spots = np.array(ndimage.maximum_position(distance, blobs, missing), dtype=int)
        markers[tuple(spots.T)] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(missing))
    return watershed(-distance, markers, mask=mask)


def regions_of(method: str, mask: np.ndarray, prob: np.ndarray | None) -> np.ndarray:
    if method == "previous":
        return previous(mask)
    return C.separate(mask, prob, method)


def soft(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    p = ndimage.gaussian_filter(mask.astype(float), 1.5) + rng.normal(0, 0.05, mask.shape)
    return np.clip(p, 0, 1)


def disc(shape: tuple[int, int], r0: float, c0: float, d: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]] + 0.5
    return (rr - r0) ** 2 + (cc - c0) ** 2 <= (d / 2) ** 2


def diameters(regions: np.ndarray) -> list[float]:
    from skimage.measure import regionprops

    return [p.equivalent_diameter_area for p in regionprops(regions) if p.area >= 7]


def pairs_bench(method: str, kind: str, rng: np.random.Generator) -> dict[str, float]:
    split = single = n_pairs = n_single = 0
    errors = []
    for _ in range(60):
        d1, d2 = rng.uniform(6, 40, 2)
        gap = rng.uniform(0.8, 1.0) * (d1 + d2) / 2
        shape = (int(d1 + d2 + 20), int(d1 + d2 + gap + 20))
        r0, c0 = shape[0] / 2 + rng.uniform(-0.5, 0.5), 10 + d1 / 2 + rng.uniform(-0.5, 0.5)
        one = disc(shape, r0, c0, d1)
        both = one | disc(shape, r0, c0 + gap, d2)
        for mask, truth in ((one, [d1]), (both, [d1, d2])):
            prob = soft(mask, rng) if kind == "soft" else mask.astype(float)
            m = prob >= C.PROBABILITY_THRESHOLD
            found = diameters(regions_of(method, m, prob))
            if len(truth) == 2:
                n_pairs += 1
                split += len(found) == 2
            else:
                n_single += 1
                single += len(found) == 1
            if len(found) == len(truth):
                errors += [(f - t) / t for f, t in zip(sorted(found), sorted(truth), strict=True)]
    return {
        "pairs split": split / n_pairs,
        "singles one": single / n_single,
        "median dD/D": float(np.median(errors)) if errors else float("nan"),
    }


def world_bench(method: str, kind: str, worlds: list[Path], rng: np.random.Generator) -> dict:
    tp = n_det = n_ref = 0
    errors = []
    for root in worlds:
        catalog = pd.read_csv(root / "craters.csv")
        for epoch in range(3):
            with rasterio.open(root / f"labels-e{epoch:02d}.tif") as src:
                truth, tf, wkt = src.read(1), src.transform, src.crs.to_wkt()
            mask = np.isin(truth, list(VALUES))
            prob = soft(mask, rng) if kind == "soft" else mask.astype(float)
            m = prob >= C.PROBABILITY_THRESHOLD
            from skimage.measure import regionprops

            props = [p for p in regionprops(regions_of(method, m, prob)) if p.area >= 7]
            det = pd.DataFrame(
                {
                    "row": [p.centroid[0] for p in props],
                    "col": [p.centroid[1] for p in props],
                    "diameter_px": [p.equivalent_diameter_area for p in props],
                }
            )
            lon, lat = to_lonlat(
                wkt,
                (tf.c + tf.a * (det["col"] + 0.5)).to_numpy(),
                (tf.f + tf.e * (det["row"] + 0.5)).to_numpy(),
            )
            det = det.assign(lon=lon, lat=lat, diameter_km=det["diameter_px"] * tf.a / 1000)
            ref = catalog[catalog["epoch"] <= epoch].reset_index(drop=True)
            pairs = C.match(det, ref, MOON_KM)
            big_ref = ref["diameter_px"] >= 8
            hit = np.zeros(len(ref), bool)
            hit[[j for _, j, _ in pairs]] = True
            big_det = det["diameter_px"] >= 8
            det_hit = np.zeros(len(det), bool)
            det_hit[[i for i, _, _ in pairs]] = True
            tp += int(hit[big_ref].sum())
            n_ref += int(big_ref.sum())
            n_det += int(hit[big_ref].sum() + (big_det & ~det_hit).sum())
            errors += [
                (det["diameter_km"].iat[i] - ref["diameter_km"].iat[j]) / ref["diameter_km"].iat[j]
                for i, j, _ in pairs
                if ref["diameter_px"].iat[j] >= 8
            ]
    p, r = tp / max(n_det, 1), tp / max(n_ref, 1)
    return {
        "P >=8px": p,
        "R >=8px": r,
        "F1 >=8px": 2 * p * r / (p + r) if p + r else 0.0,
        "median dD/D": float(np.median(errors)),
    }


CTX = Path(__file__).resolve().parents[2] / "shared" / "data" / "craters-real" / "mars_ctx_robbins"


def ctx_raster() -> tuple[np.ndarray, pd.DataFrame, Affine, str] | None:
    """The CTX mosaic's grid with its Robbins craters drawn as discs, or None without the data."""
    from planetseg.labels import rasterize_craters, read_crater_catalog

    if not (CTX / "ctx_mosaic.tif").exists():
        return None
    with rasterio.open(CTX / "ctx_mosaic.tif") as src:
        tf, wkt, shape = src.transform, src.crs.to_wkt(), src.shape
    catalog = read_crater_catalog(CTX / "ctx_craters.csv")
    labels = rasterize_craters(catalog, crs=wkt, transform=tf, shape=shape, values={"crater": 1})
    return labels > 0, catalog.table, tf, wkt


def ctx_bench(method: str, kind: str, ctx: tuple, rng: np.random.Generator) -> dict:
    from skimage.measure import regionprops

    mask, ref, tf, wkt = ctx
    prob = soft(mask, rng) if kind == "soft" else mask.astype(float)
    m = prob >= C.PROBABILITY_THRESHOLD
    props = [p for p in regionprops(regions_of(method, m, prob)) if p.area >= 7]
    rows = np.array([p.centroid[0] for p in props])
    cols = np.array([p.centroid[1] for p in props])
    lon, lat = to_lonlat(wkt, *(tf * (cols + 0.5, rows + 0.5)))
    # A lon/lat grid: the true diameter of the same area on the 3396.19 km sphere.
    area = np.array([p.area for p in props]) * (tf.a * np.pi / 180 * MARS_KM) ** 2
    area *= np.cos(np.radians(lat))
    det = pd.DataFrame({"lon": lon, "lat": lat, "diameter_km": 2 * np.sqrt(area / np.pi)})
    pairs = C.match(det, ref, MARS_KM)
    p, r = len(pairs) / max(len(det), 1), len(pairs) / len(ref)
    errors = [
        (det["diameter_km"].iat[i] - ref["diameter_km"].iat[j]) / ref["diameter_km"].iat[j]
        for i, j, _ in pairs
    ]
    return {
        "P": p,
        "R": r,
        "F1": 2 * p * r / (p + r) if p + r else 0.0,
        "median dD/D": float(np.median(errors)),
    }


def main() -> None:
    print(f"CPU: {cpu()}")
    ctx = ctx_raster()
    with tempfile.TemporaryDirectory() as tmp:
        worlds = [
            synthesize(Path(tmp) / f"w{s}", config=SynthConfig(size=512, seed=s)).root
            for s in (4, 5)
        ]
        for kind in ("exact", "soft"):
            print(f"\n== {kind} {'labels' if kind == 'exact' else 'probability'}")
            for method in ("previous", *C.SEPARATIONS):
                t0 = time.perf_counter()
                rows = {
                    "pairs": pairs_bench(method, kind, np.random.default_rng(0)),
                    "world": world_bench(method, kind, worlds, np.random.default_rng(1)),
                }
                if ctx is not None:
                    rows["ctx"] = ctx_bench(method, kind, ctx, np.random.default_rng(2))
                took = time.perf_counter() - t0
                for name, found in rows.items():
                    cells = "  ".join(f"{k} {v:6.3f}" for k, v in found.items())
                    print(f"{method:12s}{name:6s} {cells}")
                print(f"{'':12s}({took:.1f} s)")


if __name__ == "__main__":
    main()
