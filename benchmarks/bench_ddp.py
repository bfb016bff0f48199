"""DDP scaling of `planetseg train` against what the machine allows, measured in one run.

Three arms, each a fresh ``planetseg train`` process (or pair of processes), 1 torch thread per
process, the same network, cube and global batch:

* ``one``: 1 process;
* ``ddp``: ``--nproc 2`` (2 ranks, half the batch each, gradients all-reduced over gloo);
* ``pair``: two INDEPENDENT 1-process runs started at once (no communication at all).

``ddp / one`` is the DDP speed-up; ``pair / one`` (the two runs' summed samples/s over one
alone) is its ceiling on this machine at this moment (two cores that share caches, memory
bandwidth and other users' load); the goal is ``ddp / one >= 0.9 x pair / one``. The arms
alternate over the repeats so machine noise hits them alike; each figure is the median over the
repeats of the samples/s between 25% and 75% of the steps (rank 0's ``metrics.jsonl``), which
leaves out start-up, the first steps and the tail where one of a pair may run alone. Beside
each arm: the cores it got (its processes' CPU time over its wall time), which says how busy
the machine was: with Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``)
the CPU is shared per session, so on a machine busy with other sessions every arm gets about
the same share whatever its number of processes, and the ceiling falls toward 1.

What DDP adds to a step, measured in CPU time (which other users' load hardly changes):
the gloo all-reduce of the network's gradients between 2 processes, and the training step's
CPU time per sample at the per-rank batch (half) against the whole batch.

    python benchmarks/bench_ddp.py [--steps 40] [--repeats 2] [--crop 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from planetseg.config import IngestConfig, TrainConfig  # noqa: E402
from planetseg.data import Degradation  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.model import DSRLNet, LossWeights, NetConfig, dsrl_loss  # noqa: E402
from planetseg.model.inference import CPU_FLAGS, cpu_flags  # noqa: E402
from planetseg.synthetic import SynthConfig, synthesize  # noqa: E402


def start(cube: Path, out: Path, nproc: int, batch: int, args: argparse.Namespace):
    """One ``planetseg train`` run in a fresh process (started, not waited for)."""
    command = [
        sys.executable, "-m", "planetseg.cli", "train", str(cube), "--out", str(out),
        "--steps", str(args.steps), "--batch-size", str(batch), "--crop", str(args.crop),
        "--nproc", str(nproc), "--torch-threads", "1",
        "--val-every", str(10**6), "--checkpoint-every", str(10**6),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def rate(out: Path, batch: int) -> float:
    """Samples/s between 25% and 75% of the steps, from the cumulative rate rank 0 logs."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    a, b = records[len(records) // 4], records[3 * len(records) // 4]
    elapsed = [r["step"] * batch / r["samples_per_s"] for r in (a, b)]  # since the first step
    return (b["step"] - a["step"]) * batch / (elapsed[1] - elapsed[0])


def finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"train failed:\n{stderr}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    return usage.ru_utime + usage.ru_stime


def arm(name: str, cube: Path, root: Path, args: argparse.Namespace) -> float:
    """Run arm ``name`` once; its samples/s (for ``pair``: the two runs' sum)."""
    nproc = 2 if name == "ddp" else 1
    outs = [root / f"{name}-{i}" for i in range(2 if name == "pair" else 1)]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    finish([start(cube, out, nproc, args.batch, args) for out in outs])
    wall, cpu_s = time.perf_counter() - t0, _children_cpu() - cpu0
    rates = [rate(out, args.batch) for out in outs]
    parts = f"({' + '.join(f'{r:.2f}' for r in rates)}) " if len(rates) > 1 else ""
    print(
        f"  {name:4s}: {sum(rates):6.2f} samples/s {parts}"
        f"(wall {wall:.0f} s, {cpu_s / wall:.2f} cores)",
        flush=True,
    )
    return sum(rates)


def _network() -> tuple[DSRLNet, torch.optim.Optimizer, Degradation]:
    """train's default network (1 band, 4 classes), its optimiser and degradation."""
    config = TrainConfig(out="unused")
    torch.manual_seed(0)
    model = DSRLNet(NetConfig(1, 4, config.scale, config.width, config.depth, config.head_channels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    return model, optimizer, Degradation(config.scale, config.psf_sigma, config.noise)


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    degrade: Degradation,
    batch: int,
    crop: int,
) -> tuple[float, float]:
    """One training step on random windows: (CPU seconds, wall seconds)."""
    hr = torch.randn(batch, 1, crop, crop)
    labels = torch.randint(0, 4, (batch, crop, crop))
    cpu0, t0 = time.process_time(), time.perf_counter()
    losses = dsrl_loss(model(degrade(hr)), labels, hr, LossWeights())
    optimizer.zero_grad()
    losses["loss"].backward()
    optimizer.step()
    return time.process_time() - cpu0, time.perf_counter() - t0


def _ddp_rank(rank: int, port: int, batch: int, crop: int, out: str) -> None:
    """Rank ``rank`` of 2, timed: the gradients' all-reduce; DDP steps alternating with steps of
    a network of its own (no DDP) while the other rank does the same."""
    from torch import distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, optimizer, degrade = _network()
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # as train makes it
    grads = torch.randn(sum(p.numel() for p in model.parameters()))
    reduces = []
    for _ in range(55):
        cpu0, t0 = time.process_time(), time.perf_counter()
        dist.all_reduce(grads)
        reduces.append((time.process_time() - cpu0, time.perf_counter() - t0))
    own, own_optimizer, _ = _network()
    steps, plain = [], []
    for _ in range(7):
        steps.append(_step(ddp, optimizer, degrade, batch, crop))
        plain.append(_step(own, own_optimizer, degrade, batch, crop))
        dist.barrier()
    if rank == 0:  # medians, leaving out the warm-up
        medians = [
            [statistics.median(c) for c in zip(*t[k:], strict=True)]
            for t, k in ((reduces, 5), (steps, 1), (plain, 1))
        ]
        Path(out).write_text(json.dumps(medians))
    dist.destroy_process_group()


def step_costs(args: argparse.Namespace, root: Path) -> None:
    """What DDP adds to a rank's step, in CPU time: the all-reduce, DDP's hooks, the batch."""
    import torch.multiprocessing as mp

    from planetseg.train import _free_port

    torch.set_num_threads(1)
    half, whole = args.batch // 2, args.batch
    out = root / "ddp_steps.json"
    mp.spawn(_ddp_rank, args=(_free_port(), half, args.crop, str(out)), nprocs=2)
    (reduce_cpu, reduce_wall), (ddp_cpu, ddp_wall), (pair_cpu, _) = json.loads(out.read_text())
    model, optimizer, degrade = _network()
    cpu: dict[int, list[float]] = {half: [], whole: []}
    for r in range(7):  # alternating; the first round is a warm-up
        for b in (half, whole) if r % 2 else (whole, half):
            cpu[b].append(_step(model, optimizer, degrade, b, args.crop)[0])
    local = {b: statistics.median(v[1:]) for b, v in cpu.items()}
    numel = sum(p.numel() for p in model.parameters())
    print(f"\nWhat DDP adds to a rank's step (CPU time, 1 thread, batch {half} per rank):")
    print(
        f"  gloo all-reduce of the gradients ({numel * 4 / 2**20:.2f} MiB): "
        f"{reduce_cpu * 1e3:.1f} ms CPU ({reduce_wall * 1e3:.1f} ms wall)"
    )
    print(
        f"  step: {local[half] * 1e3:.0f} ms CPU alone, {pair_cpu * 1e3:.0f} ms with another "
        f"process stepping at once ({pair_cpu / local[half] - 1:+.0%}: the machine), "
        f"{ddp_cpu * 1e3:.0f} ms under DDP ({ddp_cpu / pair_cpu - 1:+.0%}: DDP); "
        f"{ddp_wall * 1e3:.0f} ms wall under DDP"
    )
    print(
        f"  CPU per sample: batch {half} {local[half] / half * 1e3:.0f} ms, batch {whole} "
        f"{local[whole] / whole * 1e3:.0f} ms (the per-rank batch costs "
        f"{local[half] / half / (local[whole] / whole) - 1:+.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    flags = sorted(f for f in cpu_flags() if f in CPU_FLAGS)
    print(f"CPU: {cpu()} ({os.cpu_count()} cores; flags {' '.join(flags) or 'none'})")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    names = ["one", "ddp", "pair"]
    rates: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = synthesize(root / "world", config=SynthConfig(size=512))
        cube = root / "cube.zarr"
        ingest(world.items, IngestConfig(out=str(cube), labels="labels"))
        for r in range(args.repeats):
            print(f"repeat {r + 1}:")
            for name in names if r % 2 == 0 else names[::-1]:
                rates[name].append(arm(name, cube, root / f"r{r}", args))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        one, ddp, pair = (statistics.median(rates[n]) for n in ("one", "ddp", "pair"))
        print(f"\nDDP scaling (gloo, CPU, 1 thread/process, batch {args.batch}, crop {args.crop}):")
        print(f"  1 process            : {one:6.2f} samples/s")
        print(f"  DDP 2 processes      : {ddp:6.2f} samples/s   ratio {ddp / one:.2f}")
        print(f"  2 independent at once: {pair:6.2f} samples/s   ceiling {pair / one:.2f}")
        print(f"  DDP / ceiling        : {ddp / pair:.2f}   (goal >= 0.90)")
        step_costs(args, root)


if __name__ == "__main__":
    main()
