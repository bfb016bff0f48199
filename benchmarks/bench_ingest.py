"""Ingest throughput: planetseg vs. a naive odc-stac -> zarr path vs. the raw GDAL read ceiling.

A synthetic Moon world (``planetseg.synthetic``, 3 epochs of single-band uint8 deflate COGs of
``--size`` pixels a side, IAU_2015:30110) is served over loopback HTTP by ``RangeFileServer``
(a child process, Range requests, as an object store would serve it) and read through GDAL's
``/vsicurl/`` with ``GDAL_LOOPBACK_ENV`` (``CPL_VSIL_CURL_NON_CACHED=/vsicurl/``, so every run
really fetches every byte). Four ways of turning the same items into pixels are timed, interleaved
(the order rotates every repeat) so machine load affects them alike: (a) ``planetseg.ingest``
into a zarr v3 cube with 512-px tiles, on Dask's threaded scheduler and on a 2-worker
``LocalCluster`` (1 thread each; started once, its startup not timed); (b) the naive path,
``odc.stac.load(..., chunks=512, use_overviews=False).to_zarr(zarr_format=3)`` on the same grid
with the threaded scheduler; (c) the ceiling, rasterio reads of every 512-px window of every
image in a pool of 2 threads (one open dataset per thread and image), nothing written, and the
same with windows of the cube's read block (1024 px: the requests ingest's own tasks make, so
the stricter ceiling for planetseg). Each
figure is MB/s (10^6 bytes) of *uncompressed* pixels, time*band*H*W*itemsize / wall seconds,
with output stores deleted between runs (untimed); the table gives the median over repeats (and
this process's CPU seconds, a check on a shared machine) and the median of the per-repeat ratios
planetseg/naive and planetseg/ceiling. Before timing, the script checks once that the planetseg
and naive stores hold identical pixels (a fair comparison). ``--phases`` adds a breakdown of
where a threaded planetseg run spends its time, and ``--read-block 1024`` a naive run that reads
1024-px blocks into the same 512-px chunks.

``--plan`` measures the driver instead (nothing is read): the time and peak RSS to plan a virtual
cube (one epoch of one uint8 band, a 4 x 4 grid of items whose metadata says they cover it),
create its store's metadata, and generate the first ``--tasks`` tasks (their blocks, markers and
the items each reads), for a 64 GB (2^18 px a side) and a 1 TB (2^20 px) cube, each in a fresh
process. Flat means the 1 TB figures equal the 64 GB ones, though the cube has 16x the blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from importlib.metadata import version  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402
from tests.servers import GDAL_LOOPBACK_ENV, RangeFileServer, rebase_hrefs  # noqa: E402

# Before GDAL or Dask workers start: environment variables reach every thread and every worker
# process (they inherit os.environ), as the gdal_http_env test fixture does.
os.environ.update(GDAL_LOOPBACK_ENV)
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var, ""), "127.0.0.1"]))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.windows import Window  # noqa: E402

import planetseg.ingest as ps_ingest  # noqa: E402
from planetseg.bodies import celestial_proj  # noqa: E402
from planetseg.cluster import dask_client  # noqa: E402
from planetseg.config import ClusterConfig, IngestConfig  # noqa: E402
from planetseg.items import read_items  # noqa: E402
from planetseg.store import PROGRESS_SUFFIX  # noqa: E402
from planetseg.synthetic import SynthConfig, synthesize  # noqa: E402

TILE = 512
Item = dict[str, Any]


# --------------------------------------------------------------------------- the contenders


def run_planetseg(items: list[Item], out: Path, client: Any = None) -> None:
    """planetseg's ingest stage, as the CLI runs it (threaded scheduler when client is None)."""
    ps_ingest.ingest(items, IngestConfig(out=str(out), tile=TILE), client=client)


def run_naive(items: list[Item], out: Path, crs: str, resolution: float, read: int = TILE) -> None:
    """odc-stac straight into zarr: the one-liner a user would write.

    ``read`` > 512 reads blocks of that size (fewer opens and requests) into 512-px zarr chunks.
    """
    import dask
    import odc.stac
    import pystac

    stac_items = [pystac.Item.from_dict(it, migrate=False) for it in items]
    with celestial_proj():
        ds = odc.stac.load(
            stac_items,
            bands=["image"],
            crs=crs,
            resolution=resolution,
            chunks={"x": read, "y": read},
            use_overviews=False,
        )
        encoding = {"image": {"chunks": (1, TILE, TILE)}}
        # A live distributed Client becomes Dask's default scheduler: pin the threaded one.
        with dask.config.set(scheduler="threads"):
            ds.to_zarr(str(out), zarr_format=3, encoding=encoding)


def run_ceiling(hrefs: list[str], threads: int = 2, window: int = TILE) -> int:
    """Decode every ``window``-px window of every COG over HTTP in a thread pool; return bytes.

    Each thread opens each image once (GDAL datasets are not thread-safe to share) and reads
    windows from it: headers are fetched once per thread and image, pixels exactly once. With
    ``window`` the cube's read block, the reads are the requests ingest's tasks make.
    """
    jobs = []
    for href in hrefs:
        with rasterio.open(href) as src:
            h, w = src.height, src.width
        jobs += [
            (href, Window(x, y, min(window, w - x), min(window, h - y)))
            for y in range(0, h, window)
            for x in range(0, w, window)
        ]
    local = threading.local()
    opened: list[Any] = []
    lock = threading.Lock()

    def read(job: tuple[str, Window]) -> int:
        href, window = job
        cache = local.__dict__.setdefault("datasets", {})
        if href not in cache:
            cache[href] = rasterio.open(href)
            with lock:
                opened.append(cache[href])
        return cache[href].read(window=window).nbytes

    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read, jobs))
    finally:
        for ds in opened:
            ds.close()


# --------------------------------------------------------------------------- helpers


def machine_facts() -> dict[str, str]:
    """nproc, CPU model, load, and the versions that matter."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    facts = {
        "nproc": str(os.cpu_count()),
        "cpu": cpu(),
        "loadavg (1/5/15 min)": load,
        "python": platform.python_version(),
        "gdal": rasterio.__gdal_version__,
    }
    for pkg in ("rasterio", "odc-stac", "odc-loader", "zarr", "xarray", "dask", "distributed"):
        facts[pkg] = version(pkg)
    return facts


def verify_same_pixels(ps_store: Path, naive_store: Path) -> str:
    """Raise unless both stores hold identical image pixels on the same grid and times."""
    import xarray as xr

    ps = xr.open_zarr(ps_store, consolidated=False)["image"].isel(band=0).load()
    nv = xr.open_zarr(naive_store)["image"].load()
    if ps.shape != nv.shape:
        raise SystemExit(f"shape mismatch: planetseg {ps.shape} vs naive {nv.shape}")
    if ps.dtype != nv.dtype:
        raise SystemExit(f"dtype mismatch: planetseg {ps.dtype} vs naive {nv.dtype}")
    for dim in ("time", "y", "x"):
        if not np.array_equal(ps[dim].values, nv[dim].values):
            raise SystemExit(f"{dim} coordinates differ between the planetseg and naive stores")
    if not np.array_equal(ps.values, nv.values):
        n = int((ps.values != nv.values).sum())
        raise SystemExit(f"pixel mismatch: {n} pixels differ between planetseg and naive")
    return f"identical: {ps.shape} {ps.dtype}, {int(np.count_nonzero(ps.values))} nonzero pixels"


class Phases:
    """Wall time of planetseg.ingest's phases, by wrapping its module functions (threaded only).

    Writes run in parallel threads, so ``_write_block`` (and its parts) are summed thread-seconds;
    the rest are wall seconds on the calling thread.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.totals[name] += seconds
            self.counts[name] += 1

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap the phases for the block's duration."""
        import zarr

        from planetseg.loaders import ENGINES

        loader = ENGINES["odc"]
        saved_mod = {
            n: getattr(ps_ingest, n)
            for n in (
                "plan_ingest",
                "check_assets",
                "read_state",
                "_create_store",
                "_execute",
                "ingest_block",
                "set_attrs",
                "_write_block",
            )
        }
        saved_open = zarr.open_array
        saved_read = loader.read_block
        try:
            for n, fn in saved_mod.items():
                setattr(ps_ingest, n, self._timed(n, fn))
            # _write_block imports zarr inside, so patching the module attribute reaches it.
            zarr.open_array = self._timed("  zarr.open_array (in _write_block)", saved_open)
            loader.read_block = self._timed("  loader.read_block (in ingest_block)", saved_read)
            yield
        finally:
            for n, fn in saved_mod.items():
                setattr(ps_ingest, n, fn)
            zarr.open_array = saved_open
            loader.read_block = saved_read


def mbps(nbytes: int, seconds: float) -> float:
    """MB/s with MB = 10^6 bytes."""
    return nbytes / seconds / 1e6


def fresh(path: Path) -> None:
    """Remove a store and its progress folder (untimed)."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + PROGRESS_SUFFIX), ignore_errors=True)


# --------------------------------------------------------------------------- planning


def virtual_items(template: Item, side: int, grid: int = 4) -> list[Item]:
    """``grid`` x ``grid`` items of ``side / grid`` px each, tiling a ``side`` px square.

    Copies of a synthetic item whose projection metadata (shape, transform) is rewritten: the
    planner reads only metadata, so no pixel exists behind them.
    """
    import copy

    a, _, c, _, e, f = template["properties"]["proj:transform"][:6]
    part = side // grid
    items = []
    for row in range(grid):
        for col in range(grid):
            item = copy.deepcopy(template)
            item["id"] = f"virtual-{row}-{col}"
            grid_meta = {
                "proj:shape": [part, part],
                "proj:transform": [a, 0.0, c + a * col * part, 0.0, e, f + e * row * part],
            }
            item["properties"].update(grid_meta)
            for asset in item["assets"].values():
                if "proj:shape" in asset or "proj:transform" in asset:
                    asset.update(grid_meta)
            items.append(item)
    return items


def driver_steps(items: list[Item], out: Path, n_tasks: int) -> dict[str, Any]:
    """Plan, create the store's metadata, generate the first ``n_tasks`` tasks; time each."""
    import itertools
    import pickle

    from planetseg.executor import pending
    from planetseg.store import prepare_output

    by_id = {it["id"]: it for it in items}
    config = IngestConfig(out=str(out))
    t0 = time.perf_counter()
    plan = ps_ingest.plan_ingest(items, config)
    t1 = time.perf_counter()
    ps_ingest._create_store(prepare_output(out, "ingest", kind="store"), plan, config, None, by_id)
    t2 = time.perf_counter()
    tasks = ps_ingest.BlockTasks.of(plan)
    sources = ps_ingest.BlockSources.of(plan, by_id, "odc")
    todo = tasks.todo(0, True)
    read = generated = 0
    for index in itertools.islice(pending(tasks, set(), todo), n_tasks):
        t, _, _ = tasks.block(index)
        tasks.markers(index)
        read += len(sources.meeting(t, plan, tasks.window(index)))
        generated += 1
    t3 = time.perf_counter()
    return {
        "tiles": tasks.n_tiles(todo),
        "tasks": tasks.n_tasks,
        "plan_s": t1 - t0,
        "store_s": t2 - t1,
        "tasks_s": t3 - t2,
        "generated": generated,
        "items_read": read / max(generated, 1),
        "task_bytes": len(pickle.dumps((tasks, 0, str(out)))),
    }


def plan_child(template_path: str, side: int, n_tasks: int) -> None:
    """In a fresh process: the driver's steps on a ``side`` px virtual cube; print JSON.

    The same steps run first on a small cube (imports, PROJ's database), so the figures are
    the driver's work, not Python's imports; RSS growth is measured from after that warm-up.
    """
    import json
    import resource

    template = read_items(template_path)[0]
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        driver_steps(virtual_items(template, 4096), work / "warm.zarr", n_tasks)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row = driver_steps(virtual_items(template, side), work / "cube.zarr", n_tasks)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        row.update(side=side, bytes=side * side, rss_mib=peak / 1024)
        row["rss_growth_mib"] = (peak - baseline) / 1024
        print(json.dumps(row))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plan_part(n_tasks: int) -> None:
    """Plan a 64 GB and a 1 TB virtual cube, each in a fresh process, and print the table."""
    import json
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        world = synthesize(work / "world", config=SynthConfig(size=256))
        rows = []
        for side in (2**18, 2**20):
            proc = subprocess.run(
                [sys.executable, __file__, "--plan-child", str(world.items), str(side)]
                + ["--tasks", str(n_tasks)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {cpu()}; nproc {os.cpu_count()}; loadavg {os.getloadavg()[0]:.2f}")
    print(
        f"driver cost of a virtual cube (1 epoch, 1 uint8 band, 16 items, 512 px tiles, 1024 px "
        f"read blocks), the first {n_tasks:,} tasks generated:"
    )
    print(
        f"{'cube':>8}  {'tiles':>11}  {'tasks':>10}  {'plan s':>7}  {'store s':>7}  "
        f"{'tasks s':>7}  {'items/task':>10}  {'task B':>6}  {'peak RSS MiB':>12}  "
        f"{'RSS growth MiB':>14}"
    )
    for r in rows:
        size = f"{r['bytes'] / 1e9:,.0f} GB"
        print(
            f"{size:>8}  {r['tiles']:>11,}  {r['tasks']:>10,}  {r['plan_s']:>7.3f}  "
            f"{r['store_s']:>7.3f}  {r['tasks_s']:>7.3f}  {r['items_read']:>10.2f}  "
            f"{r['task_bytes']:>6}  {r['rss_mib']:>12.0f}  {r['rss_growth_mib']:>14.0f}"
        )
    small, big = rows
    total = [r["plan_s"] + r["store_s"] + r["tasks_s"] for r in rows]
    print(
        f"1 TB / 64 GB ({big['tasks'] // small['tasks']}x the tasks): driver time "
        f"{total[1] / total[0]:.2f}x, RSS growth "
        f"{big['rss_growth_mib'] / max(small['rss_growth_mib'], 1):.2f}x"
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="pixels per side of each COG")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster run")
    parser.add_argument(
        "--read-block",
        type=int,
        default=0,
        help="also time the naive path reading blocks of this many px into 512-px chunks",
    )
    parser.add_argument(
        "--phases", action="store_true", help="also time planetseg's phases (threaded run)"
    )
    parser.add_argument(
        "--plan", action="store_true", help="time the driver on virtual 64 GB and 1 TB cubes only"
    )
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks generated by --plan")
    parser.add_argument("--plan-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan_child:
        plan_child(args.plan_child[0], int(args.plan_child[1]), args.tasks)
        return
    if args.plan:
        plan_part(args.tasks)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        t0 = time.perf_counter()
        world = synthesize(work / "world", config=SynthConfig(size=args.size))
        print(f"synthetic world {args.size}x{args.size}: {time.perf_counter() - t0:.1f} s")
        with RangeFileServer(world.root) as server:
            items = rebase_hrefs(read_items(world.items), world.root, server.url)
            hrefs = [it["assets"]["image"]["href"] for it in items]
            plan = ps_ingest.plan_ingest(items, IngestConfig(out=str(work / "x"), tile=TILE))
            nbytes = (
                len(plan.times)
                * len(plan.bands)
                * plan.shape[0]
                * plan.shape[1]
                * np.dtype(plan.dtype).itemsize
            )
            print(
                f"cube: {len(plan.times)} times x {len(plan.bands)} band x {plan.shape} "
                f"{plan.dtype} = {nbytes / 1e6:.1f} MB uncompressed; COGs "
                f"{sum(p.stat().st_size for p in world.images) / 1e6:.1f} MB on the server"
            )
            stores = {"ps": work / "ps.zarr", "naive": work / "naive.zarr"}

            # Once, untimed: identical pixels (and it warms imports and PROJ databases).
            run_planetseg(items, stores["ps"])
            grid = (plan.crs_wkt, plan.transform[0])
            run_naive(items, stores["naive"], *grid)
            print("verify:", verify_same_pixels(stores["ps"], stores["naive"]))
            if args.read_block:
                fresh(stores["naive"])
                run_naive(items, stores["naive"], *grid, read=args.read_block)
                print(
                    f"verify {args.read_block}-px reads:",
                    verify_same_pixels(stores["ps"], stores["naive"]),
                )
            fresh(stores["ps"])
            fresh(stores["naive"])

            with contextlib.ExitStack() as stack:
                client = None
                if not args.no_cluster:
                    t0 = time.perf_counter()
                    client = stack.enter_context(
                        dask_client(ClusterConfig(kind="local", workers=2, threads=1))
                    )
                    print(f"LocalCluster 2x1 started in {time.perf_counter() - t0:.1f} s")
                    # Warm the workers (imports, PROJ) with one untimed ingest.
                    run_planetseg(items, stores["ps"], client)
                    fresh(stores["ps"])

                def ps_threads() -> int:
                    run_planetseg(items, stores["ps"])
                    return nbytes

                def ps_cluster() -> int:
                    run_planetseg(items, stores["ps"], client)
                    return nbytes

                def naive() -> int:
                    run_naive(items, stores["naive"], *grid)
                    return nbytes

                def naive_blocks() -> int:
                    run_naive(items, stores["naive"], *grid, read=args.read_block)
                    return nbytes

                def ceiling(window: int = TILE) -> int:
                    got = run_ceiling(hrefs, window=window)
                    if got != nbytes:
                        raise SystemExit(f"ceiling decoded {got} bytes, expected {nbytes}")
                    return got

                methods: dict[str, Callable[[], int]] = {
                    "planetseg threads": ps_threads,
                    "planetseg LocalCluster 2x1": ps_cluster,
                    "naive odc-stac->zarr threads": naive,
                    "ceiling rasterio 2 threads": ceiling,
                    f"ceiling, {plan.block}-px windows": functools.partial(ceiling, plan.block),
                }
                if client is None:
                    del methods["planetseg LocalCluster 2x1"]
                if args.read_block:
                    methods[f"naive, {args.read_block}-px reads"] = naive_blocks
                rates: dict[str, list[float]] = {name: [] for name in methods}
                secs: dict[str, list[float]] = {name: [] for name in methods}
                cpus: dict[str, list[float]] = {name: [] for name in methods}
                reqs: dict[str, int] = {}
                names = list(methods)
                for rep in range(args.repeats):
                    order = names[rep % len(names) :] + names[: rep % len(names)]
                    for name in order:
                        fresh(stores["ps"])
                        fresh(stores["naive"])
                        server.reset_stats()
                        t0, c0 = time.perf_counter(), time.process_time()
                        got = methods[name]()
                        dt = time.perf_counter() - t0
                        cpus[name].append(time.process_time() - c0)
                        reqs[name] = server.requests
                        secs[name].append(dt)
                        rates[name].append(mbps(got, dt))
                    print(
                        f"repeat {rep + 1}/{args.repeats}: "
                        + ", ".join(
                            f"{n.split(' threads')[0].split(' 2x1')[0]} {secs[n][-1]:.2f}s"
                            for n in order
                        )
                    )

            phases = None
            if args.phases:
                phases = Phases()
                fresh(stores["ps"])
                with phases.installed():
                    t0 = time.perf_counter()
                    run_planetseg(items, stores["ps"])
                    phases.add("total ingest()", time.perf_counter() - t0)
            fresh(stores["ps"])
            fresh(stores["naive"])

        tile_bytes = len(plan.bands) * TILE * TILE * np.dtype(plan.dtype).itemsize
        report(machine_facts(), args, nbytes, tile_bytes, rates, secs, cpus, reqs, phases)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    facts: dict[str, str],
    args: argparse.Namespace,
    nbytes: int,
    tile_bytes: int,
    rates: dict[str, list[float]],
    secs: dict[str, list[float]],
    cpus: dict[str, list[float]],
    reqs: dict[str, int],
    phases: Phases | None,
) -> None:
    """Print machine facts, the throughput table and the ratios."""
    print()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()))
    print(
        f"size {args.size}, repeats {args.repeats}, {nbytes / 1e6:.1f} MB of pixels per run, "
        f"tile {TILE}, GDAL env GDAL_LOOPBACK_ENV (CPL_VSIL_CURL_NON_CACHED=/vsicurl/)"
    )
    print()
    width = max(len(n) for n in rates)
    print(
        f"{'method':<{width}}  {'median MB/s':>11}  {'tiles/s':>7}  {'median s':>8}  "
        f"{'min..max s':>13}  {'CPU s':>6}  {'HTTP req':>8}"
    )
    for name in rates:
        s = secs[name]
        # Only this process's CPU: a LocalCluster computes in its worker processes.
        cpu = "-" if "Cluster" in name else f"{statistics.median(cpus[name]):.2f}"
        print(
            f"{name:<{width}}  {statistics.median(rates[name]):>11.1f}  "
            f"{statistics.median(rates[name]) * 1e6 / tile_bytes:>7.1f}  "
            f"{statistics.median(s):>8.2f}  {min(s):>6.2f}..{max(s):<6.2f}  {cpu:>6}  "
            f"{reqs[name]:>8d}"
        )
    print(
        f"(MB = 10^6 bytes of decoded pixels; tiles/s = {TILE} px tiles of every band; "
        "CPU s = this process only, median; "
        "HTTP req = requests the server answered in the last repeat)"
    )
    print()
    naive, ceiling = "naive odc-stac->zarr threads", "ceiling rasterio 2 threads"
    block = next(n for n in rates if n.startswith("ceiling, "))
    pairs = [("planetseg/naive   (threads)", "planetseg threads", naive)]
    pairs.append(("planetseg/ceiling (threads)", "planetseg threads", ceiling))
    pairs.append(("planetseg/block ceiling (threads)", "planetseg threads", block))
    if "planetseg LocalCluster 2x1" in rates:
        cluster = "planetseg LocalCluster 2x1"
        pairs.append(("planetseg LocalCluster/naive", cluster, naive))
        pairs.append(("planetseg LocalCluster/threads", cluster, "planetseg threads"))
        pairs.append(("planetseg LocalCluster/ceiling", cluster, ceiling))
        pairs.append(("planetseg LocalCluster/block ceiling", cluster, block))
    pairs.append(("naive/ceiling", naive, ceiling))
    for label, a, b in pairs:
        per_rep = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        listed = ", ".join(f"{r:.2f}" for r in per_rep)
        print(f"{label:<37} median {statistics.median(per_rep):.2f}  (per repeat: {listed})")
    if phases is not None:
        print()
        print("planetseg phases (one threaded run; _write_tile parts are summed thread-seconds):")
        for name, total in phases.totals.items():
            print(f"  {name:<44} {total:7.3f} s  x{phases.counts[name]}")


if __name__ == "__main__":
    main()
