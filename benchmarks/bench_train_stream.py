"""Streaming training windows from zarr: samples/s against memory, peak RSS against cube size.

1. **Throughput**, in one run: the same network trains on the same synthetic cube (a) with its
   windows streamed from the zarr store by ``--loader-workers`` DataLoader processes (the
   default path), (b) streamed by the training process itself (``--loader-workers 0``) and
   (c) sliced from the cube held in memory (the arrays read once, as ``train`` did before).
   The arms alternate over the repeats so machine noise hits them alike; the figure is the
   median of the samples/s rank 0 logs between the warm-up and the end of each run.
2. **Peak memory**: ``planetseg train`` in a fresh process on that cube and on one 16x larger
   (4 x 4 copies of it side by side, written chunk by chunk), sampling the RSS of the training
   process and of its whole process tree (loader workers included) every 0.1 s, validation
   included (one tile of a strip at a time); and of the streaming alone (the statistics and
   20 batches, read in a fresh process).

    python benchmarks/bench_train_stream.py [--steps 30] [--repeats 2] [--size 1024] [--no-rss]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402
from planetseg.config import IngestConfig, TrainConfig  # noqa: E402
from planetseg.data import TrainingData, open_training_data  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.synthetic import SynthConfig, synthesize  # noqa: E402
from planetseg.train import train_loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def samples_per_s(run: Path, batch: int) -> float:
    """Samples/s between a quarter of the run and its end (rank 0's cumulative log)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    warm, last = records[len(records) // 4], records[-1]
    t_warm = warm["step"] * batch / warm["samples_per_s"]
    t_last = last["step"] * batch / last["samples_per_s"]
    return (last["step"] - warm["step"]) * batch / (t_last - t_warm)


def throughput(data: TrainingData, out: Path, workers: int, args: argparse.Namespace) -> float:
    config = TrainConfig(
        out=str(out),
        steps=args.steps,
        batch_size=args.batch,
        crop=args.crop,
        loader_workers=workers,
        threads=args.threads,
        val_every=10**6,
        checkpoint_every=10**6,
    )
    torch.set_num_threads(config.threads)  # as train's ranks do
    train_loop(0, 1, data, config, torch.device("cpu"))
    return samples_per_s(out, args.batch)


def tile_cube(cube: Path, out: Path, times: int) -> Path:
    """``cube`` repeated ``times`` x ``times`` side by side: a larger cube of the same kind."""
    import xarray as xr

    ds = xr.open_zarr(cube)
    step_x = float(ds.x[1] - ds.x[0]) * ds.sizes["x"]
    step_y = float(ds.y[1] - ds.y[0]) * ds.sizes["y"]
    rows = []
    for i in range(times):
        row = [ds.assign_coords(x=ds.x + j * step_x, y=ds.y + i * step_y) for j in range(times)]
        rows.append(xr.concat(row, dim="x", data_vars="minimal", coords="minimal"))
    big = xr.concat(rows, dim="y", data_vars="minimal", coords="minimal")
    tile = ds["image"].encoding["chunks"][-1]
    encoding = {name: {"chunks": ds[name].encoding["chunks"]} for name in ("image", "labels")}
    big = big.chunk({"x": tile, "y": tile})
    big.attrs = dict(ds.attrs)
    # every chunk written, as ingest does (readers check for missing ones)
    big.to_zarr(out, encoding=encoding, consolidated=True, write_empty_chunks=True, zarr_format=3)
    return out


def peak_rss(cube: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Peak RSS (MiB) of ``planetseg train`` on ``cube``: the process, and its process tree."""
    command = [
        sys.executable, "-m", "planetseg.cli", "train", str(cube), "--out", str(out),
        "--steps", str(args.rss_steps), "--batch-size", str(args.batch), "--crop", str(args.crop),
        "--val-every", "1000000", "--checkpoint-every", "1000000",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main = psutil.Process(proc.pid)
    own = tree = 0
    while proc.poll() is None:
        try:
            rss = main.memory_info().rss
            total = rss + sum(c.memory_info().rss for c in main.children(recursive=True))
        except psutil.Error:
            continue  # a process ended while it was read
        own, tree = max(own, rss), max(tree, total)
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"train failed: {proc.stderr.read().decode()[-2000:]}")
    return own / 2**20, tree / 2**20


READER = """
import resource, sys
from planetseg.data import WindowSampler, open_training_data
data = open_training_data([sys.argv[1]], crop=int(sys.argv[2]), val_fraction=0.25)
sampler = WindowSampler(data, crop=int(sys.argv[2]), seed=0)
for step in range(20):
    sampler.batch(step, 0, int(sys.argv[3]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def reader_rss(cube: Path, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process that streams the statistics and 20 batches of ``cube``."""
    out = subprocess.run(
        [sys.executable, "-c", READER, str(cube), str(args.crop), str(args.batch)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rss-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=TrainConfig.loader_workers)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads")
    parser.add_argument("--no-rss", action="store_true", help="measure the throughput only")
    args = parser.parse_args()
    print(f"CPU: {cpu()} ({psutil.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = synthesize(root / "world", config=SynthConfig(size=args.size))
        cube = root / "cube.zarr"
        ingest(world.items, IngestConfig(out=str(cube), labels="labels"))
        streamed = open_training_data([cube], crop=args.crop, val_fraction=0.25)
        memory = dataclasses.replace(streamed, cubes=tuple(c.load() for c in streamed.cubes))
        arms = {
            f"zarr, {args.workers} loader workers": (streamed, args.workers),
            "zarr, in process": (streamed, 0),
            "memory": (memory, 0),
        }
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(args.repeats):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for k, name in enumerate(order):
                data, workers = arms[name]
                rate = throughput(data, root / f"run-{r}-{k}", workers, args)
                rates[name].append(rate)
                print(f"  {name:28s} {rate:7.2f} samples/s")
        median = {name: statistics.median(v) for name, v in rates.items()}
        print(
            f"\nThroughput (batch {args.batch}, crop {args.crop}, {args.size} px cube, "
            f"{args.threads} torch thread(s)):"
        )
        for name, rate in median.items():
            print(
                f"  {name:28s} {rate:7.2f} samples/s  ratio to memory {rate / median['memory']:.2f}"
            )

        if args.no_rss:
            return
        big = tile_cube(cube, root / "big.zarr", 4)
        rss = {
            "1x": peak_rss(cube, root / "rss-1x", args),
            "16x": peak_rss(big, root / "rss-16x", args),
        }
        print(f"\nPeak RSS of planetseg train ({args.rss_steps} steps, fresh process each):")
        for name, path in (("1x", cube), ("16x", big)):
            own, tree = rss[name]
            shape = open_training_data([path], crop=args.crop, val_fraction=0.25).cubes[0].shape
            print(f"  {name:4s} cube {shape}: process {own:7.1f} MiB, tree {tree:7.1f} MiB")
        print(
            f"  ratio 16x / 1x: process {rss['16x'][0] / rss['1x'][0]:.2f}, "
            f"tree {rss['16x'][1] / rss['1x'][1]:.2f}"
        )
        reading = {name: reader_rss(path, args) for name, path in (("1x", cube), ("16x", big))}
        print("Peak RSS of the streaming alone (statistics + 20 batches, fresh process each):")
        print(
            f"  1x {reading['1x']:.1f} MiB, 16x {reading['16x']:.1f} MiB, "
            f"ratio {reading['16x'] / reading['1x']:.2f}"
        )


if __name__ == "__main__":
    main()
