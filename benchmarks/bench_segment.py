"""`planetseg segment` benchmarks, each measured side by side in one run.

1. Throughput (tiles/s): ``segment`` on a 2-worker x 1-thread LocalCluster vs a plain
   single-process PyTorch loop (2 torch threads) over the same zarr tiles, same model, same
   halo, writing the same outputs. Repeats alternate the arms; the ratio is per repeat. The
   workers fold BatchNorm into the convolutions; a third arm runs the plain loop on that
   folded model too, so the cost of Dask alone is visible.
2. FLOP/s: the model's FLOPs per tile (torch's FlopCounterMode) x tiles/s, against the
   machine's dense float32 matmul FLOP/s measured here with the same 2 threads.
3. Peak RSS of the workers (and of the client) for an area 16 x larger, each size in a fresh
   process with a fresh cluster.
4. Planning a virtual 1 TB cube: planning time, tasks, and the tasks held by the scheduler at
   once (the graph size), with the largest graph observed during run 1 for comparison.
5. The memory ``--dry-run`` estimates per task against the measured peak: in a fresh process,
   the peak RSS while the tasks of 3 rows of 3 tasks run (the middle one with the full halo),
   over the RSS before (model loaded), for a few tile / batch sizes and inference paths.
   ``tests/test_segment.py`` checks the same within 2x.
6. Inference paths (``--precision``): per path (eager fp32, channels-last fp32, channels-last
   bf16, and OpenVINO fp32 and bf16 where it is installed), the network's time on one task's
   window (1 thread), its FLOP/s against dense matmul of the same precision, and its labels'
   agreement with eager fp32 over every window of the cube; the CPU's flags and the path
   ``auto`` takes here. Then torch.compile of torch's fastest path against it eager.

Parts 1 and 2 run ``segment`` with ``--precision auto`` against the plain loop on eager fp32
(today's reference) and on the same path as ``auto`` (the best plain loop).

    python benchmarks/bench_segment.py [--size 2048] [--repeats 3] [--parts 1 2 3 4 5 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from planetseg.cluster import dask_client  # noqa: E402
from planetseg.config import ClusterConfig, IngestConfig, SegmentConfig, TrainConfig  # noqa: E402
from planetseg.evaluate import padded_to_divisor, predict_logits  # noqa: E402
from planetseg.export import load_model  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.model.inference import (  # noqa: E402
    CPU_FLAGS,
    InferenceNet,
    InferencePath,
    activation_bytes,
    choose_path,
    cpu_flags,
    this_hardware,
)
from planetseg.segment import CONFIDENCE_STEPS, plan_segment, segment  # noqa: E402
from planetseg.synthetic import SynthConfig, synthesize  # noqa: E402
from planetseg.train import train  # noqa: E402
from tests.virtual import virtual_cube  # noqa: E402


def make_inputs(root: Path, size: int, tile: int = 256) -> tuple[Path, Path]:
    """A model (default width/depth, barely trained: speed does not depend on its skill) and
    the x2-coarser cube of a ``size`` px synthetic world it segments."""
    world = synthesize(root / f"world{size}", config=SynthConfig(seed=0, size=size))
    model = root / "run" / "model"
    if not (model / "model.json").exists():
        hr = root / "hr.zarr"
        ingest(world.items, IngestConfig(out=str(hr), labels="labels"))
        train(hr, TrainConfig(out=str(root / "run"), steps=2, val_every=10**6))
    lr = root / f"lr{size}-{tile}.zarr"
    ingest(
        world.items,
        IngestConfig(out=str(lr), resolution=1.0, resampling="average", tile=tile),
    )
    return model, lr


# --------------------------------------------------------------------------- 1. throughput


_PLAIN_NETS: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}


def plain_loop(
    cube: Path,
    model: Path,
    out: Path,
    halo: int,
    threads: int,
    fused: bool = False,
    path: InferencePath | None = None,
) -> int:
    """The baseline: one process, tile after tile, the same halo and outputs, no Dask.

    ``fused``: the model with BatchNorm folded; ``path``: that, run on an inference path. The
    model is loaded on the first call of each kind (the benchmark warms every arm up).
    """
    import zarr

    from planetseg.model import fuse_for_inference

    torch.set_num_threads(threads)
    key = (str(model), threads, fused, path)
    if key not in _PLAIN_NETS:  # loaded (and compiled) once, as a worker does
        net, card = load_model(model)
        if fused or path:
            net = fuse_for_inference(net)
        if path:
            net = InferenceNet(net, path)
        _PLAIN_NETS[key] = net, card
    net, card = _PLAIN_NETS[key]
    s = card["scale"]
    mean = torch.tensor(card["normalisation"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["normalisation"]["std"]).view(1, -1, 1, 1)
    image = zarr.open_array(str(cube), path="image", mode="r")
    n_t, _, h, w = image.shape
    tile = image.chunks[-1]
    group = zarr.open_group(str(out), mode="w")
    labels = group.create_array(
        "labels", shape=(n_t, h * s, w * s), chunks=(1, tile * s, tile * s), dtype="uint8"
    )
    conf = group.create_array(
        "confidence", shape=(n_t, h * s, w * s), chunks=(1, tile * s, tile * s), dtype="uint8"
    )
    tiles = 0
    for t in range(n_t):
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                ya, yb, xa, xb = (
                    max(y0 - halo, 0),
                    min(y1 + halo, h),
                    max(x0 - halo, 0),
                    min(x1 + halo, w),
                )
                window = torch.from_numpy(image[t, :, ya:yb, xa:xb].astype(np.float32)[None])
                cy = slice((y0 - ya) * s, (y1 - ya) * s)
                cx = slice((x0 - xa) * s, (x1 - xa) * s)
                if path:  # the path's own products (OpenVINO: inside its graph)
                    window = padded_to_divisor((window - mean) / std, net.config.divisor)
                    c, q = (m[0, cy, cx] for m in net.products(window, (), CONFIDENCE_STEPS))
                else:
                    logits = predict_logits(net, (window - mean) / std, tile=None)[0]
                    p, c = torch.softmax(logits[:, cy, cx], 0).max(0)
                    q = torch.round(p * CONFIDENCE_STEPS).to(torch.uint8)
                labels[t, y0 * s : y1 * s, x0 * s : x1 * s] = c.to(torch.uint8).numpy()
                conf[t, y0 * s : y1 * s, x0 * s : x1 * s] = q.numpy()
                tiles += 1
    return tiles


class GraphWatch:
    """Samples the scheduler's task count while a run goes on (the graph it holds)."""

    def __init__(self, client: Any) -> None:
        self.client, self.peak, self._stop = client, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            self.peak = max(self.peak, n)
            time.sleep(0.05)

    def __enter__(self) -> GraphWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def throughput(cube: Path, model: Path, root: Path, repeats: int) -> dict[str, Any]:
    config = SegmentConfig(out="", model=str(model))
    plan = plan_segment(cube, config)
    rows = []
    with dask_client(ClusterConfig(kind="local", workers=2, threads=1)) as client:
        # Warm up every arm: worker processes load torch and the model once per cluster, as in
        # use, and the plain loops load theirs once too (an OpenVINO path compiles it).
        res = segment(
            cube, SegmentConfig(out=str(root / "warm.zarr"), model=str(model)), client=client
        )
        for name, kwargs in (
            ("plain", {}),
            ("fused", {"fused": True}),
            ("best", {"path": res.plan.path}),
        ):
            plain_loop(cube, model, root / f"warm-{name}.zarr", plan.halo, threads=2, **kwargs)
        peak_graph = 0
        for r in range(repeats):
            out = root / f"ps{r}.zarr"
            t0 = time.perf_counter()
            with GraphWatch(client) as watch:
                res = segment(cube, SegmentConfig(out=str(out), model=str(model)), client=client)
            ps = res.computed / (time.perf_counter() - t0)
            peak_graph = max(peak_graph, watch.peak)
            t0 = time.perf_counter()
            n = plain_loop(cube, model, root / f"plain{r}.zarr", plan.halo, threads=2)
            plain = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = plain_loop(cube, model, root / f"fused{r}.zarr", plan.halo, threads=2, fused=True)
            fused = n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = plain_loop(cube, model, root / f"best{r}.zarr", plan.halo, 2, path=res.plan.path)
            best = n / (time.perf_counter() - t0)
            rows.append((ps, plain, fused, best))
            print(
                f"  repeat {r}: planetseg ({res.plan.path.name}) {ps:.2f} tiles/s, plain loop "
                f"{plain:.2f}, on the folded model {fused:.2f}, on {res.plan.path.name} "
                f"{best:.2f}; ratios {ps / plain:.2f}, {ps / fused:.2f}, {ps / best:.2f}",
                flush=True,
            )
    return {"rows": rows, "tiles": plan.n_tiles, "peak_graph": peak_graph, "plan": res.plan}


# --------------------------------------------------------------------------- 2. FLOP/s


def matmul_flops(dtype: torch.dtype, threads: int, n: int = 2048) -> float:
    """Dense matmul FLOP/s of ``dtype`` on ``threads`` threads (best of 5)."""
    torch.set_num_threads(threads)
    a, bm = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, bm)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, bm)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def flops(model: Path, plan: Any, tiles_per_s: float) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    net, _ = load_model(model)
    side = plan.tile + 2 * plan.halo  # an interior tile's window (batch 1)
    x = torch.randn(1, plan.bands, side, side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    per_window = counter.get_total_flops()
    # Per tile in a batch-4 task: one window of 4 tiles + halo, i.e. (t+2h) x (4t+2h) / 4.
    t, h, b = plan.tile, plan.halo, plan.batch
    per_tile = per_window * (t + 2 * h) * (b * t + 2 * h) / (b * side * side)
    dtype = torch.bfloat16 if plan.path.precision == "bf16" else torch.float32
    machine = matmul_flops(dtype, 2)
    achieved = per_tile * tiles_per_s
    return {"per_tile": per_tile, "achieved": achieved, "machine": machine, "dtype": str(dtype)}


# --------------------------------------------------------------------------- 3. peak RSS


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(cube: str, model: str, out: str) -> None:
    """Run in a fresh process: segment on a fresh 2-worker cluster, print peak RSS (MiB)."""
    with dask_client(ClusterConfig(kind="local", workers=2, threads=1)) as client:
        res = segment(cube, SegmentConfig(out=out, model=model), client=client)
        workers = client.run(peak_mib)
    print(
        json.dumps(
            {"tiles": res.computed, "workers_mib": max(workers.values()), "client_mib": peak_mib()}
        )
    )


def peak_rss(cube: Path, model: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(cube), str(model), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 4. planning 1 TB


def plan_terabyte(like: Path, model: Path, root: Path) -> dict[str, Any]:
    cube = virtual_cube(root / "tb.zarr", like=like, side=2**20, tile=1024)
    t0 = time.perf_counter()
    plan = plan_segment(cube, SegmentConfig(out=str(root / "tb-out.zarr"), model=str(model)))
    seconds = time.perf_counter() - t0
    est = plan.estimate(partition=8)  # the default for 2 worker threads: max(8, 4 x 2)
    return {"seconds": seconds, **est}


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` prints it."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line]
    return names[0] if names else platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="HR side of the throughput world")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--task-peak-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    if args.task_peak_child:
        task_peak_child(*args.task_peak_child)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-segment-"))
    flags = cpu_flags()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; CPU flags: "
        + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
        + f"; --precision auto here: {choose_path('auto', this_hardware()).name}"
    )
    model, cube = make_inputs(root, args.size)

    print(f"\n1. throughput: {args.size // 2}^2 px LR cube x 3 epochs, 256 px tiles, model x2")
    tp = throughput(cube, model, root, args.repeats)
    ps = statistics.median(row[0] for row in tp["rows"])
    arms = ("plain loop", "plain loop on the folded model", "plain loop on auto's path")
    for k, name in enumerate(arms, start=1):
        ratios = [row[0] / row[k] for row in tp["rows"]]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"  planetseg / {name} = {statistics.median(ratios):.2f} (median; {each})")

    print("\n2. FLOP/s")
    f = flops(model, tp["plan"], ps)
    print(
        f"  model {f['per_tile'] / 1e9:.2f} GFLOP per tile; achieved {f['achieved'] / 1e9:.1f} "
        f"GFLOP/s; dense {f['dtype']} matmul {f['machine'] / 1e9:.1f} GFLOP/s (2 threads); "
        f"{100 * f['achieved'] / f['machine']:.0f}% of it"
    )

    if 3 in args.parts:
        peak_rss_part(root, model)
    if 4 in args.parts:
        print("\n4. a virtual 1 TB cube (2^20 x 2^20 uint8, 1024 px tiles)")
        tb = plan_terabyte(cube, model, root)
        print(
            f"  planned in {tb['seconds']:.2f} s: {tb['tiles']:,} tiles, {tb['tasks']:,} tasks, "
            f"{tb['partitions']:,} partitions; graph on the scheduler: at most "
            f"{tb['tasks_in_flight']} tasks at a time"
        )
        print(f"  largest graph observed in run 1 ({tp['tiles']} tiles): {tp['peak_graph']} tasks")
    if 5 in args.parts:
        task_memory_part(root, model, cube)
    if 6 in args.parts:
        paths_part(root, model, cube, tp["plan"])


# --------------------------------------------------------------------------- 5. task memory


def task_peak_child(cube: str, model: str, out: str, batch: str, precision: str) -> None:
    """In a fresh process: peak RSS over the tasks of a run, above the RSS before (bytes)."""
    from planetseg.segment import worker_model

    config = SegmentConfig(out=out, model=model, batch=int(batch), precision=precision)
    plan = plan_segment(cube, config)
    net, _ = worker_model(plan.model, plan.digest, plan.path)
    with torch.no_grad():
        net(torch.zeros(1, plan.bands, 64, 64))
    status = Path("/proc/self/status")
    before = next(int(x.split()[1]) for x in status.read_text().splitlines() if "VmRSS" in x)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    segment(cube, config, plan=plan)
    peak = next(int(x.split()[1]) for x in status.read_text().splitlines() if "VmHWM" in x)
    print(json.dumps({"peak": (peak - before) * 1024, "estimate": plan.task_bytes()}))


def task_memory_part(root: Path, model: Path, like: Path) -> None:
    print("\n5. memory per task: the --dry-run estimate vs the measured peak (fresh processes)")
    cases = ((512, 1, "fp32"), (512, 1, "auto"), (256, 4, "fp32"), (256, 4, "auto"))
    if "amx_bf16" not in cpu_flags():
        cases += ((256, 4, "bf16"),)
    for tile, batch, precision in cases:
        cube = root / f"mem{tile}x{batch}.zarr"
        if not cube.exists():
            virtual_cube(cube, like=like, side=3 * tile * batch, tile=tile)
        out = root / f"m{tile}x{batch}{precision}"
        proc = subprocess.run(
            [sys.executable, __file__, "--task-peak-child", str(cube), str(model), str(out)]
            + [str(batch), precision],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        est = sum(r["estimate"].values())
        terms = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in r["estimate"].items())
        print(
            f"  {batch} x {tile} px tiles, --precision {precision}: estimate {est / 2**20:.0f} "
            f"MiB ({terms}); measured {r['peak'] / 2**20:.0f} MiB; measured / estimate "
            f"{r['peak'] / est:.2f}",
            flush=True,
        )


# --------------------------------------------------------------------------- 6. paths


def paths_part(root: Path, model: Path, cube: Path, plan: Any) -> None:
    """Each inference path: time and FLOP/s on one task's window, labels against eager fp32."""
    import zarr
    from torch.utils.flop_counter import FlopCounterMode

    from planetseg.model import fuse_for_inference

    print("\n6. inference paths: one task's window (1 thread), labels over the whole cube")
    net = fuse_for_inference(load_model(model)[0])
    t, h, b = plan.tile, plan.halo, plan.batch
    x = torch.randn(1, plan.bands, t + 2 * h, b * t + 2 * h)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    work = counter.get_total_flops()
    paths = [InferencePath(), InferencePath("fp32", True), InferencePath("bf16", True)]
    if this_hardware().openvino:
        paths += [InferencePath(p, backend="openvino") for p in ("fp32", "bf16")]
    matmul = {p: matmul_flops(_DTYPE[p], 1) for p in ("fp32", "bf16")}
    reference = None
    for path in paths:
        torch.set_num_threads(1)  # before InferenceNet: OpenVINO compiles for the thread count
        run = InferenceNet(net, path)
        seconds = window_seconds(run, x)
        out = root / f"path-{path.name.replace(' ', '-')}.zarr"
        plain_loop(cube, model, out, plan.halo, threads=2, path=path)
        labels = zarr.open_group(str(out), mode="r")["labels"][:]
        reference = labels if reference is None else reference
        side = 16 * net.config.divisor
        # OpenVINO's buffers are not torch tensors: only torch's are counted (see --dry-run's
        # estimate of them, segment.OPENVINO_MEMORY).
        activations = (
            f"{activation_bytes(run, plan.bands, side, side) / side**2:.0f} B per input px"
            if path.backend == "torch"
            else "not torch tensors"
        )
        print(
            f"  {path.name}: {seconds:.3f} s per window, {work / seconds / 1e9:.1f} GFLOP/s = "
            f"{100 * work / seconds / matmul[path.precision]:.0f}% of {path.precision} matmul "
            f"({matmul[path.precision] / 1e9:.1f} GFLOP/s, 1 thread); labels equal to eager "
            f"fp32: {100 * float(np.mean(labels == reference)):.3f}%; activations "
            f"{activations}",
            flush=True,
        )

    # torch.compile (inductor, weights frozen) of torch's fastest path: measured, not taken.
    import torch._inductor.config as inductor

    inductor.freezing = True
    torch_only = dataclasses.replace(this_hardware(), openvino=False)
    fastest = InferenceNet(net, choose_path("auto", torch_only))
    eager = window_seconds(fastest, x)
    compiled = window_seconds(torch.compile(fastest.eval(), dynamic=False), x)
    print(
        f"  torch.compile of {fastest.path.name}: {compiled:.3f} s per window against "
        f"{eager:.3f} s eager ({eager / compiled:.2f}x)",
        flush=True,
    )


def window_seconds(run: Any, x: torch.Tensor) -> float:
    """Best of 3 passes of ``run`` over ``x``, after two warm-up passes (compilation)."""
    with torch.inference_mode():
        run(x)
        run(x)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
    return min(times)


_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_part(root: Path, model: Path) -> None:
    print("\n3. peak RSS, area x16 (fresh process and cluster each)")
    # 128 px tiles, so that even the small area's rows hold a whole task (4 tiles): both
    # sizes then run the same windows, and only the area differs.
    _, small = make_inputs(root, 1024, tile=128)
    _, large = make_inputs(root, 4096, tile=128)
    a = peak_rss(small, model, root / "rss-small.zarr")
    b = peak_rss(large, model, root / "rss-large.zarr")
    print(
        f"  {a['tiles']} tiles: workers {a['workers_mib']:.0f} MiB, "
        f"client {a['client_mib']:.0f} MiB"
    )
    print(
        f"  {b['tiles']} tiles: workers {b['workers_mib']:.0f} MiB, "
        f"client {b['client_mib']:.0f} MiB"
    )
    print(
        f"  ratio x16 / x1: workers {b['workers_mib'] / a['workers_mib']:.2f}, "
        f"client {b['client_mib'] / a['client_mib']:.2f}"
    )


if __name__ == "__main__":
    main()
