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

    python benchmarks/bench_ablation.py [--steps 300] [--seeds 0 1 2] [--scales 2 4] [--jobs 2]
        [--class-weights balanced|none] [--out scores.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planetseg.config import IngestConfig, TrainConfig  # noqa: E402
from planetseg.evaluate import evaluate  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.synthetic import EpochSpec, SynthConfig, synthesize  # noqa: E402
from planetseg.train import train  # noqa: E402

ARMS = {"seg": {"no_sr": True}, "sr": {"w_fa": 0.0}, "dsrl": {}}
HR_ARM = {"no_sr": True, "scale": 1, "psf_sigma": 0.0}
FINE = ("fresh_crater", "degraded_crater")


def make_cube(root: Path, name: str, config: SynthConfig) -> Path:
    world = synthesize(root / name, config=config)
    cube = root / f"{name}.zarr"
    ingest(world.items, IngestConfig(out=str(cube), labels="labels"))
    return cube


def run_arm(args: tuple[str, int, int, str, str, dict]) -> tuple[str, int, int, dict]:
    arm, scale, seed, cube, test, opts = args
    out = Path(tempfile.mkdtemp(prefix=f"abl-{arm}-{scale}-{seed}-"))
    settings = {"scale": scale, **opts, **(HR_ARM if arm == "hr" else ARMS[arm])}
    config = TrainConfig(
        out=str(out), seed=seed, val_every=10**6, checkpoint_every=10**6, **settings
    )
    start = time.perf_counter()
    model = train(cube, config)
    scores = evaluate(model, test)
    print(
        f"  {arm:5s} scale {scale} seed {seed}: mIoU {100 * scores['miou']:.1f} "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    scores["seconds"] = time.perf_counter() - start
    return arm, scale, seed, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=int, nargs="+", default=[2])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--class-weights", default="balanced", choices=["balanced", "none"])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--out", type=Path, help="write all scores as JSON")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ablation-"))
    cube = make_cube(root, "train", SynthConfig(seed=0, size=args.size))
    test_epochs = (
        EpochSpec(dt.datetime(2020, 1, 1, tzinfo=dt.UTC), 135.0, 35.0),
        EpochSpec(dt.datetime(2020, 2, 1, tzinfo=dt.UTC), 315.0, 20.0, new_craters=8),
    )
    test = make_cube(root, "test", SynthConfig(seed=100, size=args.size, epochs=test_epochs))
    opts = {
        "steps": args.steps,
        "batch_size": args.batch,
        "crop": args.crop,
        "threads": 1,
        "class_weights": args.class_weights,
    }
    runs = [("hr", 1, seed, str(cube), str(test), opts) for seed in args.seeds] + [
        (arm, scale, seed, str(cube), str(test), opts)
        for scale in args.scales
        for seed in args.seeds
        for arm in ARMS
    ]
    print(
        f"{len(runs)} runs: arms {list(ARMS)}, scales {args.scales}, seeds {args.seeds}, "
        f"{args.steps} steps of batch {args.batch} x {args.crop} px, "
        f"class weights {args.class_weights}",
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
    for scale in args.scales:
        print(f"\nscale {scale}: IoU x100 on the test world (mean over seeds {args.seeds})")
        print(
            f"{'metric':18s}"
            + "".join(f"{a:>9s}" for a in [*ARMS, "hr"])
            + f"{'dsrl-seg':>18s}{'sr-seg':>18s}"
        )
        for metric in ["mIoU", *classes]:

            def value(arm: str, seed: int, metric: str = metric, scale: int = scale) -> float:
                sc = table[(arm, 1 if arm == "hr" else scale, seed)]
                if metric == "mIoU":
                    return 100 * sc["miou"]
                return 100 * (sc["per_class"][metric]["iou"] or 0.0)

            means = [statistics.mean(value(a, s) for s in args.seeds) for a in [*ARMS, "hr"]]
            diffs = []
            for other in ("dsrl", "sr"):
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
            a: statistics.mean(table[(a, scale, s)]["seconds"] for s in args.seeds) for a in ARMS
        }
        print(
            "training time per run (s, mean over seeds): "
            + ", ".join(f"{a} {t:.0f}" for a, t in cost.items())
            + f", hr {statistics.mean(table[('hr', 1, s)]['seconds'] for s in args.seeds):.0f}"
        )
    print("\n* fine-grained classes; differences are paired per seed (mean +/- sd over seeds)")
    print("hr: the same network fed HR input (scale 1, no blur), the upper bound")


if __name__ == "__main__":
    main()
