"""DDP scaling of `planetseg train`: samples/s with 2 processes x 1 thread vs 1 x 1, one run.

Both arms train the same network on the same synthetic cube with the same global batch; the
arms alternate over the repeats so machine noise hits both alike. The figure is the median of
the samples/s that rank 0 logs over the steps after a warm-up.

    python benchmarks/bench_ddp.py [--steps 60] [--repeats 2] [--crop 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planetseg.config import IngestConfig, TrainConfig  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.synthetic import SynthConfig, synthesize  # noqa: E402
from planetseg.train import train  # noqa: E402


def run(cube: Path, out: Path, nproc: int, args: argparse.Namespace) -> float:
    config = TrainConfig(
        out=str(out),
        steps=args.steps,
        batch_size=args.batch,
        crop=args.crop,
        nproc=nproc,
        threads=1,
        val_every=10**6,
        checkpoint_every=10**6,
    )
    start = time.perf_counter()
    train(cube, config)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm = records[len(records) // 4]
    last = records[-1]
    # rank 0 logs cumulative samples/s; the rate between warm-up and the end excludes start-up
    t_warm = warm["step"] * config.batch_size / warm["samples_per_s"]
    t_last = last["step"] * config.batch_size / last["samples_per_s"]
    rate = (last["step"] - warm["step"]) * config.batch_size / (t_last - t_warm)
    print(f"  nproc={nproc}: {rate:7.2f} samples/s  (wall {wall:.1f} s incl. start-up)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = synthesize(root / "world", config=SynthConfig(size=512))
        cube = root / "cube.zarr"
        ingest(world.items, IngestConfig(out=str(cube), labels="labels"))
        rates: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.repeats):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                rates[n].append(run(cube, root / f"r{r}-n{n}", n, args))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"\nDDP scaling (gloo, CPU, 1 thread/process, batch {args.batch}, crop {args.crop}):")
    print(f"  1 process : {one:.2f} samples/s")
    print(f"  2 processes: {two:.2f} samples/s")
    print(f"  ratio 2/1 : {two / one:.2f}")


if __name__ == "__main__":
    main()
