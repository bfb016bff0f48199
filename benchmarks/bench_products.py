"""Products against the synthetic world's exact truth: change detection and crater catalogs.

Runs on the output of ``planetseg demo`` (the products of its workflow run: a labels store per
time step, the change folders and a crater catalog per time step) and scores them against the
truth of the world they were made from: the demo's *unseen* world (``unseen-world/``: another
seed, other suns than the world the model was trained on), so the figures are those of a model
on new ground. It scores:

1. the change mask of epoch 0 -> 1 (only the sun angle differs: every flagged pixel is a false
   change) and 0 -> 2 (new craters), pixel precision / recall / F1 against the true label
   rasters' own change, for several confidence / minimum-area filters;
2. new craters: change regions that turn into a crater class, matched one to one to the
   craters the world added in epoch 2 (DeepMoon criteria), precision / recall / F1;
3. each time step's crater catalog's scores per size bin (``products/craters/*.scores.json``).

    planetseg demo --out demo-out && python benchmarks/bench_products.py demo-out
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import rasterio  # noqa: E402

from planetseg.bodies import celestial_proj  # noqa: E402
from planetseg.config import DiffConfig  # noqa: E402
from planetseg.craters import match  # noqa: E402
from planetseg.diff import diff  # noqa: E402
from planetseg.products import LabelsStore, to_lonlat  # noqa: E402


def prf(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    tp = int((pred & truth).sum())
    p = tp / pred.sum() if pred.sum() else None
    r = tp / truth.sum() if truth.sum() else None
    f1 = 2 * p * r / (p + r) if p and r else None
    return {
        "precision": p,
        "recall": r,
        "f1": f1,
        "flagged": int(pred.sum()),
        "true": int(truth.sum()),
    }


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def world_summary(world: Path) -> str:
    """Seed and suns of a synthetic world, from its STAC items."""
    from planetseg.items import read_items

    items = read_items(world / "items.ndjson")
    seeds = sorted({it["properties"]["planetseg:synthetic_seed"] for it in items})
    suns = ", ".join(
        f"{it['properties']['view:sun_azimuth']:g}/{it['properties']['view:sun_elevation']:g}"
        for it in items
    )
    return f"seed {', '.join(map(str, seeds))}, suns {suns} (azimuth/elevation, degrees)"


def truth(world: Path, epoch: int) -> np.ndarray:
    with rasterio.open(world / f"labels-e{epoch:02d}.tif") as src:
        return src.read(1)


def new_craters(change: Path, store: LabelsStore, catalog: pd.DataFrame) -> dict[str, float | None]:
    import geopandas as gpd

    with celestial_proj():
        polys = gpd.read_parquet(change / "changes.parquet")
    to, was = polys["to_class"].astype(str), polys["from_class"].astype(str)
    found = polys[to.str.contains("crater") & ~was.str.contains("crater")]
    if found.empty:
        det = pd.DataFrame({"lon": [], "lat": [], "diameter_km": []})
    else:
        c = found.geometry.centroid
        lon, lat = to_lonlat(store.crs_wkt, c.x.to_numpy(), c.y.to_numpy())
        det = pd.DataFrame(
            {
                "lon": lon,
                "lat": lat,
                "diameter_km": 2 * np.sqrt(found["area_km2"].to_numpy() / math.pi),
            }
        )
    ref = catalog[catalog["epoch"] == 2].reset_index(drop=True)
    pairs = match(det, ref, store.body.radius_m / 1000)
    p = len(pairs) / len(det) if len(det) else None
    r = len(pairs) / len(ref) if len(ref) else None
    f1 = 2 * p * r / (p + r) if p and r else None
    return {"precision": p, "recall": r, "f1": f1, "flagged": len(det), "true": len(ref)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="output folder of `planetseg demo`")
    args = parser.parse_args()
    demo, world = args.demo, args.demo / "unseen-world"
    if not (world / "items.ndjson").exists():
        sys.exit(f"{world} is missing: run this on the output of the current `planetseg demo`")
    products = demo / "products"
    stores = sorted((products / "labels").glob("*.zarr"))
    if len(stores) != 3:
        sys.exit(
            f"{products / 'labels'} must hold the 3 time steps of the current `planetseg demo`"
        )
    store = LabelsStore.open(stores[0])
    catalog = pd.read_csv(world / "craters.csv")
    t0 = truth(world, 0)
    print(f"labels {store.path} (model {store.attrs.get('planetseg:model', '')[:19]}...)")
    print(f"trained on world {world_summary(demo / 'world')}")
    print(f"scored on world {world_summary(world)}, not seen in training")
    print("\n1. change mask vs the true labels' change (pixels, %), by filter setting")
    print(f"{'pair':22s}{'filters':>24s}{'flagged':>10s}{'true':>8s}{'P':>7s}{'R':>7s}{'F1':>7s}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-products-"))
    settings = [(0.0, 0.0), (0.5, 2.0), (0.7, 2.0), (0.9, 2.0), (0.9, 8.0)]
    for after, what in ((1, "0->1 sun angle only"), (2, "0->2 new craters")):
        real = t0 != truth(world, after)
        for conf, area in settings:
            folder = scratch / f"{after}-{conf}-{area}"
            cfg = DiffConfig(
                out=str(folder),
                before="0",
                after="0",
                other=str(stores[after]),
                min_confidence=conf,
                min_area_m2=area,
            )
            diff(stores[0], cfg)
            with rasterio.open(folder / "mask.tif") as src:
                flagged = src.read(1).astype(bool)
            s = prf(flagged, real)
            share = f"  ({100 * flagged.mean():.2f}% of the scene)" if after == 1 else ""
            print(
                f"{what:22s}{f'conf>={conf:g}, area>={area:g} m2':>24s}{s['flagged']:>10,}"
                f"{s['true']:>8,}{fmt(s['precision']):>7s}{fmt(s['recall']):>7s}"
                f"{fmt(s['f1']):>7s}{share}"
            )
    print(
        "\n2. new craters of epoch 2 (change regions turning into a crater class), DeepMoon match"
    )
    print("   (the demo's change folder 0 -> 2: confidence >= 0.7, area >= 2 m2)")
    [change] = (products / "change").glob("0000-*--0002-*")
    s = new_craters(change, store, catalog)
    print(
        f"  true {s['true']}, found {s['flagged']}: precision {fmt(s['precision'])}, "
        f"recall {fmt(s['recall'])}, F1 {fmt(s['f1'])}"
    )
    print("\n3. crater catalog of each time step vs the unseen world's catalog, DeepMoon criteria")
    for path in sorted((products / "craters").glob("*.scores.json")):
        scores = json.loads(path.read_text())
        print(f"{path.name.split('.')[0]}:")
        print(
            f"{'size':10s}{'ref':>7s}{'found':>7s}{'P':>7s}{'R':>7s}{'F1':>7s}"
            f"{'dD/D':>7s}{'dx/R':>7s}"
        )
        limited = [(f">={scores['limits']['min_diameter_px']:g} px", scores["total"])]
        for name, b in [*scores["bins"].items(), *limited, ("all", scores["all"])]:
            dd = "-" if b["median_diameter_error"] is None else f"{b['median_diameter_error']:.2f}"
            dx = b["median_position_error_radii"]
            dx = "-" if dx is None else f"{dx:.2f}"
            print(
                f"{name:10s}{b['reference']:>7d}{b['detected']:>7d}{fmt(b['precision']):>7s}"
                f"{fmt(b['recall']):>7s}{fmt(b['f1']):>7s}{dd:>7s}{dx:>7s}"
            )
    grid_m = scores["pixel_km"] * 1000
    print(f"(size bins: diameter in pixels of the {grid_m:.2f} m segmentation grid)")


if __name__ == "__main__":
    main()
