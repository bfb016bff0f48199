"""The DSRL ablation: does the SR branch (and the FA loss) help low-resolution segmentation?

Arms, all with the same network, budget, seeds and degradation:

* ``seg``:  segmentation only (``--no-sr``);
* ``sr``:   + SR branch with its MSE loss, no feature affinity (``w_fa = 0``);
* ``dsrl``: + SR branch + FA loss (the paper's weights 0.1 / 1.0);
* ``hr``:   the upper bound: the same network fed the HR image itself (``scale = 1``, no
  blur), segmentation only. It does not depend on the LR scale, so it runs once per seed.

Every arm trains on a synthetic world (seed 0) and is scored on a *different* world (another
seed, other sun angles), LR input made by the training degradation, HR labels. Per seed the
paired differences ``dsrl - seg`` and ``sr - seg`` are reported, with their mean and spread,
per class; the fine-grained classes (fresh vs degraded craters) are singled out.

``--previous`` trains with the defaults from before the crater recipe (balanced class weights,
cross-entropy only, uniform windows, no photometric jitter) instead of ``train``'s own, and
``--arms`` restricts the runs (``--arms dsrl`` for a quick old-vs-new comparison); each arm's
crater F1 on the test world (``planetseg.craters.extract`` on its predicted labels, DeepMoon
matching against the world's true craters mask) is printed with its IoU.

    python benchmarks/bench_ablation.py [--steps 300] [--seeds 0 1 2] [--scales 2 4] [--jobs 2]
        [--arms seg sr dsrl hr] [--previous] [--psf-sigma 0.5] [--out scores.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planetseg.config import CratersConfig, IngestConfig, SegmentConfig, TrainConfig  # noqa: E402
from planetseg.craters import craters  # noqa: E402
from planetseg.evaluate import evaluate  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.segment import segment  # noqa: E402
from planetseg.synthetic import EpochSpec, SynthConfig, synthesize  # noqa: E402
from planetseg.train import train  # noqa: E402

ARMS = {"seg": {"no_sr": True}, "sr": {"w_fa": 0.0}, "dsrl": {}}
HR_ARM = {"no_sr": True, "scale": 1, "psf_sigma": 0.0}
FINE = ("fresh_crater", "degraded_crater")
#: ``train``'s defaults before the crater recipe (``--previous``).
PREVIOUS = {"class_weights": "balanced", "loss": "ce", "foreground_windows": 0.0, "augment": "none"}


def make_cube(root: Path, name: str, config: SynthConfig) -> tuple[Path, object]:
    world = synthesize(root / name, config=config)
    cube = root / f"{name}.zarr"
    ingest(world.items, IngestConfig(out=str(cube), labels="labels"))
    return cube, world


def lr_scenes(test: Path, world: object, scale: int) -> Path:
    """The test world's scenes ingested ``scale`` x coarser (pixel averages), as the demo does."""
    import xarray as xr

    lr = test.with_name(f"{test.stem}-lr{scale}.zarr")
    res = abs(float(xr.open_zarr(test, consolidated=False).x.diff("x")[0])) * scale
    ingest(world.items, IngestConfig(out=str(lr), resolution=res, resampling="average"))
    return lr


def crater_f1(model: Path, lr: Path, world: object) -> float:
    """Crater F1 of ``model`` on the LR test scenes (segment, craters vs the true catalog)."""
    labels = model.parent / "labels.zarr"
    segment(lr, SegmentConfig(out=str(labels), model=str(model), threads=1), client=None)
    found = craters(
        labels, CratersConfig(out=str(model.parent / "craters.csv"), reference=str(world.craters))
    )
    return found.scores["all"]["f1"] or 0.0


def run_arm(args: tuple) -> tuple[str, int, int, dict]:
    arm, scale, seed, cube, test, opts, world, lr = args
    out = Path(tempfile.mkdtemp(prefix=f"abl-{arm}-{scale}-{seed}-"))
    settings = {"scale": scale, **opts, **(HR_ARM if arm == "hr" else ARMS[arm])}
    config = TrainConfig(
        out=str(out), seed=seed, val_every=10**6, checkpoint_every=10**6, **settings
    )
    start = time.perf_counter()
    model = train(cube, config)
    scores = evaluate(model, test)
    scores["seconds"] = time.perf_counter() - start
    scores["crater_f1"] = crater_f1(model, lr, world) if lr is not None else None
    f1 = f", crater F1 {100 * scores['crater_f1']:.1f}" if lr is not None else ""
    print(
        f"  {arm:5s} scale {scale} seed {seed}: mIoU {100 * scores['miou']:.1f}{f1} "
        f"({scores['seconds']:.0f} s)",
        flush=True,
    )
    return arm, scale, seed, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=int, nargs="+", default=[2])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--arms", nargs="+", default=[*ARMS, "hr"], choices=[*ARMS, "hr"])
    parser.add_argument("--previous", action="store_true", help="the pre-recipe defaults")
    parser.add_argument(
        "--psf-sigma", type=float, default=0.5, help="0 matches the crater F1's averaged scenes"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--out", type=Path, help="write all scores as JSON")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ablation-"))
    cube, _ = make_cube(root, "train", SynthConfig(seed=0, size=args.size))
    test_epochs = (
        EpochSpec(dt.datetime(2020, 1, 1, tzinfo=dt.UTC), 135.0, 35.0),
        EpochSpec(dt.datetime(2020, 2, 1, tzinfo=dt.UTC), 315.0, 20.0, new_craters=8),
    )
    test, world = make_cube(root, "test", SynthConfig(seed=100, size=args.size, epochs=test_epochs))
    lr = {scale: lr_scenes(test, world, scale) for scale in args.scales}  # shared by the runs
    arms = [a for a in ARMS if a in args.arms]
    opts = {
        "steps": args.steps,
        "batch_size": args.batch,
        "crop": args.crop,
        "threads": 1,
        "psf_sigma": args.psf_sigma,
        **(PREVIOUS if args.previous else {}),
    }
    hr = [("hr", 1, seed, str(cube), str(test), opts, world, None) for seed in args.seeds]
    runs = (hr if "hr" in args.arms else []) + [
        (arm, scale, seed, str(cube), str(test), opts, world, lr[scale])
        for scale in args.scales
        for seed in args.seeds
        for arm in arms
    ]
    print(
        f"{len(runs)} runs: arms {args.arms}, scales {args.scales}, seeds {args.seeds}, "
        f"{args.steps} steps of batch {args.batch} x {args.crop} px, "
        f"{'previous defaults' if args.previous else 'train defaults (crater recipe)'}",
        flush=True,
    )
    # spawn, not fork: the parent has Dask and torch threads whose locks a fork would copy held
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_arm, runs))
    table = {(a, s, seed): sc for a, s, seed, sc in results}
    if args.out:
        args.out.write_text(
            json.dumps(
                [{"arm": a, "scale": s, "seed": seed, **sc} for (a, s, seed), sc in table.items()],
                indent=1,
            )
        )
    classes = list(next(iter(table.values()))["per_class"])
    shown = [*arms, *(["hr"] if "hr" in args.arms else [])]
    pairs = [other for other in ("dsrl", "sr") if other in arms and "seg" in arms]
    for scale in args.scales:
        print(f"\nscale {scale}: IoU x100 on the test world (mean over seeds {args.seeds})")
        print(
            f"{'metric':18s}"
            + "".join(f"{a:>9s}" for a in shown)
            + "".join(f"{other + '-seg':>18s}" for other in pairs)
        )
        for metric in ["mIoU", *classes, "crater F1"]:

            def value(arm: str, seed: int, metric: str = metric, scale: int = scale) -> float:
                sc = table[(arm, 1 if arm == "hr" else scale, seed)]
                if metric == "mIoU":
                    return 100 * sc["miou"]
                if metric == "crater F1":
                    return 100 * sc["crater_f1"] if sc["crater_f1"] is not None else math.nan
                return 100 * (sc["per_class"][metric]["iou"] or 0.0)

            means = [statistics.mean(value(a, s) for s in args.seeds) for a in shown]
            diffs = []
            for other in pairs:
                d = [value(other, s) - value("seg", s) for s in args.seeds]
                sd = statistics.stdev(d) if len(d) > 1 else 0.0
                diffs.append(f"{statistics.mean(d):+6.1f} +/- {sd:4.1f}")
            mark = " *" if metric in FINE else ""
            print(
                f"{metric + mark:18s}"
                + "".join(f"{m:9.1f}" for m in means)
                + "".join(f"{d:>18s}" for d in diffs)
            )
        cost = {
            a: statistics.mean(
                table[(a, 1 if a == "hr" else scale, s)]["seconds"] for s in args.seeds
            )
            for a in shown
        }
        print(
            "training time per run (s, mean over seeds): "
            + ", ".join(f"{a} {t:.0f}" for a, t in cost.items())
        )
    print("\n* fine-grained classes; differences are paired per seed (mean +/- sd over seeds)")
    print("hr: the same network fed HR input (scale 1, no blur), the upper bound")
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
    print(f"CPU: {cpu.stdout.strip()} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
