"""Crater catalogs on real, independently labelled Mars imagery: the chain a user runs.

Per scene, with planetseg's own commands (``python -m planetseg.cli``):

1. a local catalog of the scene (the read-only files symlinked under a dated name, since the
   time comes from the file name), ``ingest`` of the **training part** at the native grid with
   the crater CSV as labels;
2. ``train`` (its validation strip is the east end of the training part, never the test part);
3. ``ingest`` of the **test part** at 2x coarser resolution (``--resolution``,
   ``--resampling average``), ``segment`` back to the native grid, ``craters --reference``.

Scenes (``/work/shared/data/craters-real``, see its README):

* ``ctx``: the CTX mosaic (95 m/px) with Robbins craters. Training part lon 174-178 E, test part
  the east third, lon 178-180 E. Robbins is complete only above 1 km: totals are >= 1 km.
* ``themis``: THEMIS Day-IR tiles (142 m/px). The tiles are 1-degree squares scattered over
  three longitude bands, too sparse for one training cube, so the THEMIS scene is a test of
  **transfer**: the CTX-trained model maps the Sinus Sabaeus band (26 tiles, lon 4-43 E), each
  tile ingested at the model's input resolution (190 m/px, 1.33x coarser than THEMIS) and
  segmented to 95 m/px. Its labels were generated from Robbins >= 1 km and corrected by hand;
  below 1 km they are patchy, so totals are >= 1 km too. Boxes cut by the tile edge are
  dropped from the reference (their centre and size are those of the visible part).

Modes:

* default: the **new recipe** (``train``'s defaults) and the **previous defaults**
  (``--class-weights balanced --loss ce --foreground-windows 0 --augment none``) side by
  side, per seed, on each scene's test part;
* ``--screen``: the recipe's choices one at a time, scored on the CTX training part's
  validation strip (never the test part): crater F1 >= 1 km and crater-pixel P/R;
* ``--ablation``: DSRL vs segmentation-only (``--no-sr``) vs SR-only with the new recipe,
  paired per seed, per size bin. SR-only is not a training mode: it is scored as the LR
  input upsampled 2x (bicubic) into a segmenter trained on the HR imagery (``--scale 1``).

Budget: a step (batch 8 of 128 px) takes 0.4-1 s on one core (more when runs share the cores);
``--jobs 2`` trains two runs at once. ``--steps 300 --seeds 0`` takes about 15 minutes. The
runs documented in docs/crater-recipe.md are ``--screen --scenes ctx``, ``--steps 900``,
``--steps 300 --seeds 0 1 2`` and ``--ablation --steps 300 --seeds 0 1 2`` (one ``--work``
folder, so the modes share cubes and runs).

``--precision fp32 bf16`` segments each test part with each model on each inference path
(``segment --precision``) and scores each, with the share of labels equal to the first path's.

    python benchmarks/bench_craters_real.py [--scenes ctx themis] [--steps 300] [--seeds 0]
        [--jobs 2] [--screen] [--ablation] [--precision P ...] [--work DIR] [--out scores.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from planetseg.craters import SIZE_BINS  # noqa: E402

DATA = Path(os.environ.get("PLANETSEG_CRATERS_REAL", "/work/shared/data/craters-real"))
MARS_KM = 3396.19
#: The previous defaults of ``train`` (before the crater recipe).
PREVIOUS = ["--class-weights", "balanced", "--loss", "ce", "--foreground-windows", "0",
            "--augment", "none"]  # fmt: skip
#: Every run: the LR parts are made by ``ingest --resampling average`` (a box average, no
#: PSF), so training degrades the same way (README: match the degradation to the LR product).
COMMON = ["--psf-sigma", "0"]
#: Screening: one choice at a time from the previous defaults, then combined (a repeated
#: option's last value wins).
SCREEN = {
    "previous": [],
    "weights sqrt": ["--class-weights", "sqrt"],
    "sqrt + dice": ["--class-weights", "sqrt", "--loss", "ce+dice"],
    "sqrt + fg 0.5": ["--class-weights", "sqrt", "--foreground-windows", "0.5"],
    "sqrt + photometric": ["--class-weights", "sqrt", "--augment", "photometric"],
    "sqrt + dice + fg + photo": ["--class-weights", "sqrt", "--loss", "ce+dice",
                                 "--foreground-windows", "0.5", "--augment", "photometric"],
}  # fmt: skip
#: The ablation's arms (with the new recipe); ``hr`` is scored on bicubic-upsampled LR input.
ABLATION = {"dsrl": [], "seg-only": ["--no-sr"], "hr": ["--scale", "1"]}


def cli(*args: str | Path) -> None:
    """Run one planetseg command as a user would; stop the benchmark if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "planetseg.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode:
        sys.exit(f"planetseg {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")


@dataclass
class TestPart:
    """A cube to segment and the reference craters inside it.

    Attributes:
        cube: LR cube (the model's input resolution).
        reference: CSV of the reference craters whose centre lies in the cube.
    """

    cube: Path
    reference: Path


@dataclass
class Scene:
    """One real scene: where to train, validate and test, and the reference's limit.

    Attributes:
        name: Scene name.
        limit_km: Completeness limit of the reference (totals count craters >= this).
        train: Training cube (native grid, crater labels), or None to use CTX's model.
        val: The training cube's validation strip as LR test parts (screening only).
        val_columns: Columns of the training cube that train holds out for validation.
        tests: The test parts.
    """

    name: str
    limit_km: float
    train: Path | None
    val: list[TestPart] = field(default_factory=list)
    val_columns: slice | None = None
    tests: list[TestPart] = field(default_factory=list)


def _catalog(work: Path, name: str, files: list[Path]) -> Path:
    """A local catalog folder: each read-only file symlinked under a dated name."""
    folder = work / f"{name}-catalog"
    folder.mkdir(exist_ok=True)
    for f in files:
        link = folder / f"{f.stem}_2010-01-01.tif"
        if not link.exists():
            link.symlink_to(f)
    return folder


def _reference(table: pd.DataFrame, bounds: tuple[float, ...], path: Path) -> Path:
    w, s, e, n = bounds
    inside = table[(table.lon >= w) & (table.lon < e) & (table.lat >= s) & (table.lat < n)]
    inside[["lon", "lat", "diameter_km", "class"]].to_csv(path, index=False)
    return path


def _lr_part(work: Path, catalog: Path, name: str, bbox: tuple[float, ...], res: float) -> Path:
    cube = work / f"{name}.zarr"
    if not cube.exists():
        cli("ingest", catalog, "--out", cube, "--bbox", ",".join(f"{v:.9f}" for v in bbox),
            "--resolution", repr(res), "--resampling", "average", "--cluster", "none")  # fmt: skip
    return cube


def ctx_scene(work: Path, crop: int, scale: int = 2) -> Scene:
    """CTX: train on lon 174-178 E (validation at its east end), test on lon 178-180 E; the
    LR parts ``scale`` times coarser than the native grid."""
    src = DATA / "mars_ctx_robbins"
    catalog = _catalog(work, "ctx", [src / "ctx_mosaic.tif"])
    labels = pd.read_csv(src / "ctx_craters.csv")
    px = 6 / 3744
    train = work / "ctx-train.zarr"
    if not train.exists():
        cli("ingest", catalog, "--out", train, "--bbox", "174,-20,178,-14", "--labels",
            src / "ctx_craters.csv", "--cluster", "none")  # fmt: skip
    from planetseg.data import spatial_split

    cut = spatial_split(round(4 / px), 0.25, multiple=crop).val.start  # train's own split
    val_box = (174 + cut * px, -20.0, 178.0, -14.0)
    test_box = (178.0, -20.0, 180.0, -14.0)
    lr = "lr" if scale == 2 else f"lr{scale}"  # scale 2 keeps its earlier cube names
    return Scene(
        "ctx",
        1.0,
        train,
        val_columns=slice(cut, None),
        val=[
            TestPart(
                _lr_part(work, catalog, f"ctx-val-{lr}", val_box, scale * px),
                _reference(labels, val_box, work / "ctx-val-ref.csv"),
            )
        ],
        tests=[
            TestPart(
                _lr_part(work, catalog, f"ctx-test-{lr}", test_box, scale * px),
                _reference(labels, test_box, work / "ctx-test-ref.csv"),
            )
        ],
    )


def themis_scene(work: Path) -> Scene:
    """THEMIS Sinus Sabaeus band (lon 4-43 E): each tile at the CTX model's input resolution."""
    src = DATA / "mars_themis_dayir"
    tiles = pd.read_csv(src / "valid_tiles.csv")
    band = tiles[(tiles.west >= 0) & (tiles.east <= 44)]
    catalog = _catalog(work, "themis", [src / f for f in band.file])
    labels = pd.read_csv(src / "valid_craters.csv")
    labels = labels[~labels.touches_tile_edge.astype(bool)]
    res = 2 * 6 / 3744  # the CTX model's input pixel
    tests = []
    for row in band.itertuples():
        box = (row.west, row.south, row.east, row.north)
        tests.append(
            TestPart(
                _lr_part(work, catalog, f"themis-{row.tile_id}-lr", box, res),
                _reference(labels, box, work / f"themis-{row.tile_id}-ref.csv"),
            )
        )
    return Scene("themis", 1.0, None, tests=tests)


def slug(text: str) -> str:
    """A file-name-safe form of an arm's name."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def train_run(work: Path, seed: int, flags: list[str], args) -> Path:  # noqa: ANN001
    """Train one model (or reuse a finished one in ``work``); return its model folder."""
    # Keyed by the flags, so arms with the same settings (in any mode) share one run.
    name = slug(" ".join(flags)) or "train-defaults"
    out = work / "runs" / f"ctx-{name}-{args.steps}x{args.batch}x{args.crop}-s{seed}"
    if (out / "model" / "model.json").exists():
        return out / "model"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    budget = ["--steps", args.steps, "--batch-size", args.batch, "--crop", args.crop]
    every = ["--val-every", args.steps, "--checkpoint-every", args.steps]
    cli("train", work / "ctx-train.zarr", "--out", out, *budget, "--seed", seed, *every,
        "--torch-threads", 1, *COMMON, *flags)  # fmt: skip
    print(f"  trained {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out / "model"


def score_part(
    work: Path,
    model: Path,
    part: TestPart,
    tag: str,
    limit_km: float,
    upsample: int = 0,
    precision: str | None = None,
) -> dict:
    """Segment one LR part with ``model`` and score its craters against the reference.

    ``craters --reference-min-km limit_km``: the reference's completeness limit on both sides
    (a reference crater below it is no miss, an unmatched detection below it no false
    positive); craters come from the store's crater probability. ``upsample``: resample the
    LR part this many times finer (bicubic) first, for a segmenter trained at ``--scale 1``.
    ``precision``: segment's ``--precision`` (None: its default, ``auto``).
    """
    from planetseg.config import CratersConfig, SegmentConfig
    from planetseg.craters import craters
    from planetseg.products import LabelsStore
    from planetseg.segment import segment

    out = work / "scores" / f"{tag}-{part.cube.stem}{f'-{precision}' if precision else ''}"
    out.mkdir(parents=True, exist_ok=True)
    cube = part.cube
    if upsample:
        cube = _upsampled(part.cube, out / "hr-input.zarr", upsample)
    labels = out / "labels.zarr"
    if (labels / "zarr.json").exists() and "crater_probability" not in LabelsStore.open(
        labels
    ).dataset:
        shutil.rmtree(labels)  # this benchmark's own store of an earlier planetseg: segment anew
    if not (labels / "zarr.json").exists():
        # In this process (as `segment --cluster none` does): 26 THEMIS tiles would otherwise
        # spend most of their time starting Python and torch.
        options = {"precision": precision} if precision else {}
        segment(cube, SegmentConfig(out=str(labels), model=str(model), **options))
    result = craters(
        labels,
        CratersConfig(
            out=str(out / "craters.csv"),
            reference=str(part.reference),
            reference_min_km=limit_km,
            overwrite=True,
        ),
    )
    reference = pd.read_csv(part.reference)
    return {
        "scores": result.scores, "table": result.table, "reference": reference, "labels": labels
    }  # fmt: skip


def _upsampled(cube: Path, out: Path, factor: int) -> Path:
    """The LR cube resampled ``factor`` x finer (bicubic), by ``ingest --resolution`` from its
    COG."""
    import rioxarray  # noqa: F401 - registers .rio
    import xarray as xr

    if (out / "zarr.json").exists():
        return out
    folder = out.parent / "lr-catalog"
    folder.mkdir(exist_ok=True)
    ds = xr.open_zarr(cube, consolidated=False)
    image = ds["image"].isel(time=0, band=0).rio.write_crs(ds.rio.crs)
    tif = folder / "lr_2010-01-01.tif"
    image.rio.to_raster(tif, driver="COG")
    res = abs(float(ds.x[1] - ds.x[0])) / factor
    cli("ingest", folder, "--out", out, "--resolution", repr(res), "--resampling", "cubic",
        "--cluster", "none")  # fmt: skip
    return out


def _prf(counts: dict) -> dict:
    """Counts summed over parts, with their precision, recall and F1 (precision and recall NaN
    where undefined; F1 0 when nothing matched although there was something to match, e.g. a
    run that detects nothing, NaN when there was nothing on either side)."""
    p = counts["matched"] / counts["detected"] if counts["detected"] else float("nan")
    r = counts["matched"] / counts["reference"] if counts["reference"] else float("nan")
    if counts["matched"]:
        f1 = 2 * p * r / (p + r)
    else:
        f1 = 0.0 if counts["detected"] or counts["reference"] else float("nan")
    return {**counts, "precision": p, "recall": r, "f1": f1}


def _summed(blocks: list[dict]) -> dict:
    keys = ("detected", "matched", "reference")
    return _prf({k: sum(b[k] for b in blocks) for k in keys})


def above(parts: list[dict], limit_km: float) -> dict:
    """P/R/F1 above the completeness limit over ``parts``: ``craters``' ``total`` (the limit
    was given as ``--reference-min-km``), summed."""
    assert all(p["scores"]["limits"]["reference_min_km"] == limit_km for p in parts)
    return _summed([p["scores"]["total"] for p in parts])


def binned(parts: list[dict]) -> dict[str, dict]:
    """``craters``' per-bin counts summed over parts (a matched pair in the reference's bin,
    a miss or a false detection in its own)."""
    names = parts[0]["scores"]["bins"]
    return {n: _summed([p["scores"]["bins"][n] for p in parts]) for n in names}


def pixel_pr(labels: Path, truth: np.ndarray) -> tuple[float, float]:
    """Crater-pixel precision and recall of a labels store against the true labels."""
    from planetseg.products import LabelsStore

    pred = LabelsStore.open(labels).read(0) > 0
    h, w = min(pred.shape[0], truth.shape[0]), min(pred.shape[1], truth.shape[1])
    pred, true = pred[:h, :w], truth[:h, :w] > 0
    tp = (pred & true).sum()
    return tp / max(pred.sum(), 1), tp / max(true.sum(), 1)


def agreement(
    results: dict[str, list[list[dict]]], scored: dict[str, str], paths: list[str], seeds: list[int]
) -> None:
    """Per arm and seed, the share of output pixels whose label each path gives as the first."""
    import xarray as xr

    print(f"\nlabels equal to {paths[0]}'s (all pixels of the parts):")
    for arm in dict.fromkeys(scored.values()):
        for i, seed in enumerate(seeds):
            base = results[f"{arm}, {paths[0]}"][i]
            for path in paths[1:]:
                same = total = 0
                for a, b in zip(base, results[f"{arm}, {path}"][i], strict=True):
                    la = xr.open_zarr(a["labels"])["labels"].values
                    lb = xr.open_zarr(b["labels"])["labels"].values
                    same, total = same + int((la == lb).sum()), total + la.size
                print(f"  {arm}, seed {seed}: {path} {100 * same / total:.3f} %")


def print_bins(title: str, arms: dict[str, list[dict]], limit_km: float, px_km: float) -> None:
    print(f"\n{title}")
    print(f"{'bin (px / km)':24s}" + "".join(f"{a:>26s}" for a in arms))
    print(f"{'':24s}" + "".join(f"{'P':>8s}{'R':>8s}{'F1':>8s}  " for _ in arms))
    names = list(next(iter(arms.values()))[0]["scores"]["bins"])
    for k, name in enumerate(names):
        lo, hi = SIZE_BINS[k] * px_km, SIZE_BINS[k + 1] * px_km
        label = f"{name} ({lo:.1f}-{hi:.1f} km)" if math.isfinite(hi) else f"{name}"
        row = f"{label:24s}"
        for parts in arms.values():
            b = binned(parts)[name]
            row += f"{100 * b['precision']:8.1f}{100 * b['recall']:8.1f}{100 * b['f1']:8.1f}  "
        print(row + f"  (n_ref {binned(next(iter(arms.values())))[name]['reference']})")
    row = f"{f'>= {limit_km:g} km ({limit_km / px_km:.1f} px)':24s}"
    for parts in arms.values():
        a = above(parts, limit_km)
        row += f"{100 * a['precision']:8.1f}{100 * a['recall']:8.1f}{100 * a['f1']:8.1f}  "
    print(row + f"  (n_ref {above(next(iter(arms.values())), limit_km)['reference']})")


def summary(results: dict[str, list[list[dict]]], limit_km: float) -> None:
    """Mean +/- sd over seeds of the >= limit totals, and paired differences to the first arm."""
    first = next(iter(results))
    for arm, per_seed in results.items():
        # A run with no detection has no precision: it counts as 0 in the mean (as its F1 does).
        tot = [
            {m: 0.0 if math.isnan(v) else v for m, v in above(parts, limit_km).items()}
            for parts in per_seed
        ]
        line = ", ".join(
            f"{m} {100 * statistics.mean(t[m] for t in tot):.1f}"
            + (f" +/- {100 * statistics.stdev(t[m] for t in tot):.1f}" if len(tot) > 1 else "")
            for m in ("precision", "recall", "f1")
        )
        if arm != first:
            d = [
                100 * (above(a, limit_km)["f1"] - above(b, limit_km)["f1"])
                for a, b in zip(per_seed, results[first], strict=True)
            ]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            each = " / ".join(f"{v:+.1f}" for v in d)
            line += f"; F1 - {first}: {statistics.mean(d):+.1f} +/- {sd:.1f} (per seed {each})"
        print(f"  {arm:28s} {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", nargs="+", default=["ctx", "themis"], choices=["ctx", "themis"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (1 thread each)")
    parser.add_argument("--screen", action="store_true", help="the recipe's choices, on val")
    parser.add_argument("--ablation", action="store_true", help="DSRL vs seg-only vs SR-only")
    parser.add_argument(
        "--scale",
        type=int,
        default=2,
        choices=[2, 4],
        help="LR input this many times coarser (scale 4: CTX only)",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16", "fp16", "auto"],
        help="score each model segmented on each of these paths (default: segment's auto)",
    )
    parser.add_argument("--work", type=Path, help="keep (and reuse) cubes and runs here")
    parser.add_argument("--out", type=Path, help="write the >= limit totals as JSON")
    args = parser.parse_args()
    print(f"CPU: {cpu()} ({os.cpu_count()} cores)")
    work = args.work or Path(tempfile.mkdtemp(prefix="craters-real-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(exist_ok=True)
    if args.scale != 2 and "themis" in args.scenes:
        sys.exit("--scale 4 is for the CTX scene only: add --scenes ctx")
    ctx = ctx_scene(work, args.crop, args.scale)
    scenes = [ctx] + ([themis_scene(work)] if "themis" in args.scenes else [])
    px_km = 6 / 3744 * math.pi * MARS_KM / 180  # the segmentation grid (CTX's native pixel)
    if args.screen:
        arms = {name: PREVIOUS + flags for name, flags in SCREEN.items()}
    elif args.ablation:
        arms = ABLATION
    else:
        arms = {"new recipe": [], "previous defaults": PREVIOUS}
    if args.scale != 2:  # the HR arm (--scale 1) stays as it is
        arms = {a: f + (["--scale", str(args.scale)] if a != "hr" else []) for a, f in arms.items()}
    print(f"{len(arms)} arms x seeds {args.seeds}: {args.steps} steps of batch {args.batch} x "
          f"{args.crop} px, work {work}", flush=True)  # fmt: skip
    jobs = [(arm, seed) for seed in args.seeds for arm in arms]

    def run(job: tuple[str, int]) -> Path:
        arm, seed = job
        return train_run(work, seed, arms[arm], args)

    with ThreadPoolExecutor(args.jobs) as pool:
        models = dict(zip(jobs, pool.map(run, jobs), strict=True))
    totals = {}
    for scene in scenes:
        parts_of = scene.val if args.screen else scene.tests
        if not parts_of:
            continue
        results: dict[str, list[list[dict]]] = {}
        scored = {}  # arm as scored (with the precision) -> the arm trained
        for arm in arms:
            for precision in args.precision or [None]:
                name = f"{arm}, {precision}" if precision else arm
                scored[name] = arm
                for seed in args.seeds:
                    up = args.scale if args.ablation and arm == "hr" else 0
                    model = models[(arm, seed)]
                    parts = [
                        score_part(work, model, p, model.parent.name, scene.limit_km, up, precision)
                        for p in parts_of
                    ]
                    results.setdefault(name, []).append(parts)
        where = "validation strip of the training part" if args.screen else "test part"
        for i, seed in enumerate(args.seeds):
            print_bins(
                f"{scene.name}: {where}, seed {seed} (P/R/F1 x100, craters >= "
                f"{scene.limit_km:g} km; a matched pair in the reference's bin)",
                {name: results[name][i] for name in scored},
                scene.limit_km,
                px_km,
            )
        if args.precision and len(args.precision) > 1:
            agreement(results, scored, args.precision, args.seeds)
        print(f"\n{scene.name}: >= {scene.limit_km:g} km totals over seeds {args.seeds}")
        summary(results, scene.limit_km)
        if args.screen and scene.name == "ctx":
            import xarray as xr

            truth = xr.open_zarr(scene.train, consolidated=False)["labels"].values
            truth = truth.reshape(-1, *truth.shape[-2:])[0][:, scene.val_columns]
            print("\ncrater-pixel precision / recall on train's validation strip:")
            for arm in arms:
                pr = [
                    pixel_pr(work / "scores" / f"{models[(arm, s)].parent.name}-ctx-val-lr"
                             / "labels.zarr", truth)
                    for s in args.seeds
                ]  # fmt: skip
                print(f"  {arm:28s} P {100 * np.mean([p for p, _ in pr]):.1f} "
                      f"R {100 * np.mean([r for _, r in pr]):.1f}")  # fmt: skip
        totals[scene.name] = {
            arm: [above(parts, scene.limit_km) for parts in per_seed]
            for arm, per_seed in results.items()
        }
    if args.out:
        args.out.write_text(json.dumps(totals, indent=1))


if __name__ == "__main__":
    main()
