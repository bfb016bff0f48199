"""The one task executor of ingest and segment: lazy pending tasks, resume markers, errors,
the in-process paths, and tasks in flight that follow a cluster's threads as it grows.

Clusters here are real ``distributed`` LocalClusters with in-process workers (threads, so they
start in a second); the ingest runs are real ingests of a synthetic world.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from planetseg.config import IngestConfig
from planetseg.errors import AssetReadError
from planetseg.executor import REFRESH_SECONDS, InFlight, execute, pending
from planetseg.ingest import ingest
from planetseg.items import read_items
from planetseg.synthetic import SynthConfig, synthesize


@dataclass(frozen=True)
class Tiny:
    """A plan of ``n_tasks`` tasks that each touch their marker in ``folder``."""

    n_tasks: int
    folder: str = ""
    fail_at: int = -1
    seconds: float = 0.0

    def markers(self, index: int) -> tuple[str]:
        return (f"task-{index}",)


def run_tiny(plan: Tiny, index: int, scale: int) -> int:
    """A task: sleep, fail at ``plan.fail_at``, else touch the marker; ``scale`` units done."""
    time.sleep(plan.seconds)
    if index == plan.fail_at:
        raise AssetReadError(f"task {index}: cannot read the pixels of x.tif")
    (Path(plan.folder) / plan.markers(index)[0]).touch()
    return scale


def marked(folder: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def client() -> Any:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_pending_is_lazy_and_skips_marked_tasks() -> None:
    plan = Tiny(n_tasks=10**15)  # a list of them would not fit in memory
    assert list(itertools.islice(pending(plan, set()), 3)) == [0, 1, 2]
    assert list(itertools.islice(pending(plan, {"task-1", "task-3"}), 4)) == [0, 2, 4, 5]
    assert list(pending(plan, {"task-5"}, among=range(4, 8))) == [4, 6, 7]


@pytest.mark.parametrize("threads", [1, 3])
def test_in_process_resumes_the_unmarked_tasks(tmp_path: Path, threads: int) -> None:
    plan = Tiny(n_tasks=10, folder=str(tmp_path))
    done = {"task-2", "task-5"}
    seen: list[tuple[int, int]] = []
    units = execute(
        run_tiny,
        plan,
        pending(plan, done),
        10,
        threads=threads,
        progress=lambda d, t: seen.append((d, t)),
        done=20,
        total=100,
    )
    assert units == 80
    assert marked(tmp_path) == set(range(10)) - {2, 5}
    assert [d for d, _ in seen] == list(range(30, 101, 10)) and {t for _, t in seen} == {100}


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failing_task_stops_the_run_with_its_own_error(tmp_path: Path, threads: int) -> None:
    plan = Tiny(n_tasks=50, folder=str(tmp_path), fail_at=4, seconds=0.01)
    with pytest.raises(AssetReadError, match="task 4: cannot read the pixels of x.tif"):
        execute(run_tiny, plan, pending(plan, set()), 1, threads=threads)
    got = marked(tmp_path)
    assert 4 not in got and set(range(4)) <= got
    # Stopped: at most the tasks in flight when it failed (4 per thread) ran past it.
    assert max(got) < 4 + 4 * threads + 1


def test_on_a_cluster_errors_propagate_and_in_flight_is_bounded(
    client: Any, tmp_path: Path
) -> None:
    plan = Tiny(n_tasks=30, folder=str(tmp_path / "ok"), seconds=0.02)
    Path(plan.folder).mkdir()
    held: list[int] = []

    def progress(done: int, total: int) -> None:
        held.append(sum(1 for key in client.futures if str(key).startswith("tiny-")))

    bound = InFlight(client, fixed=3)
    units = execute(
        run_tiny, plan, pending(plan, set()), 2, client=client, in_flight=bound,
        progress=progress, total=60, name="tiny",
    )  # fmt: skip
    assert units == 60 and marked(Path(plan.folder)) == set(range(30))
    assert max(held) <= 3 and len(held) == 30

    failing = Tiny(n_tasks=30, folder=str(tmp_path / "bad"), fail_at=2, seconds=0.02)
    Path(failing.folder).mkdir()
    with pytest.raises(AssetReadError, match="task 2: cannot read"):
        execute(run_tiny, failing, pending(failing, set()), 1, client=client, name="tiny")
    assert 2 not in marked(Path(failing.folder))
    time.sleep(0.2)  # cancelled tasks are gone from the client and the cluster
    assert not [key for key in client.futures if str(key).startswith("tiny-")]


def test_in_flight_follows_the_cluster_threads_and_an_override_wins() -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        bound = InFlight(c, per_thread=2, minimum=1)
        assert bound.limit() == 2
        cluster.scale(3)
        c.wait_for_workers(3, timeout=30)
        assert bound.limit() == 2  # read at most every REFRESH_SECONDS ...
        time.sleep(REFRESH_SECONDS)
        assert bound.limit() == 6  # ... then the cluster's threads now
        assert InFlight(c, fixed=5, per_thread=2).limit() == 5
        cluster.scale(1)
        deadline = time.monotonic() + 30
        while len(c.nthreads()) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(REFRESH_SECONDS)
        assert bound.limit() == 2
    assert InFlight(None, threads=3, per_thread=2).limit() == 6


# --------------------------------------------------------------------------- ingest


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return synthesize(tmp_path_factory.mktemp("exec") / "world", config=SynthConfig(size=256))


def chunk_hashes(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for var in ("image", "labels")
        for p in sorted((store / var).rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def placement(scheduler: Any) -> Any:
    """A scheduler plugin recording the worker each ingest task is placed on (``.workers``)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Placement(SchedulerPlugin):
        name = "placement"

        def __init__(self) -> None:
            self.workers: dict[str, str] = {}

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kw: Any) -> None:
            if finish == "processing" and str(key).startswith("ingest-"):
                self.workers[str(key)] = scheduler.tasks[key].processing_on.address

    plugin = Placement()
    scheduler.add_plugin(plugin)
    return plugin


def test_ingest_uses_workers_added_mid_run(small_world: Any, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    items = read_items(small_world.items)
    # 3 epochs x 64 blocks of 32 px (image and labels): 192 tasks.
    config = IngestConfig(out=str(tmp_path / "grown.zarr"), tile=32, read_block=32)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        placed = placement(cluster.scheduler)
        first = c.scheduler_info()["workers"]
        before: list[int] = []
        after: list[int] = []
        grown = threading.Event()

        def progress(done: int, total: int) -> None:
            held = sum(1 for key in c.futures if str(key).startswith("ingest-"))
            if done >= 32 and not grown.is_set():
                grown.set()
                cluster.scale(3)  # two more workers join while the ingest runs
            (after if len(c.nthreads()) == 3 else before).append(held)

        result = ingest(items, config, client=c, progress=progress)
    assert result.written == 3 * 64
    # 2 per thread: 2 in flight on one worker, up to 6 once three have joined.
    assert before and max(before) <= 2
    assert after and 2 < max(after) <= 6, (before, after)
    joined = set(placed.workers.values()) - set(first)
    assert len(joined) == 2, "the workers that joined ran no task"
    # The same bytes as an ingest in this process.
    alone = ingest(items, IngestConfig(out=str(tmp_path / "alone.zarr"), tile=32, read_block=32))
    assert chunk_hashes(result.store) == chunk_hashes(alone.store)


def test_ingest_blocks_cover_every_tile_once() -> None:
    from planetseg.ingest import BandSpec, BlockTasks, CubePlan, TimeStep, tile_marker

    times = tuple(TimeStep(f"day{k}", f"2020-01-0{k + 1}T00:00:00Z", (f"item{k}",)) for k in (0, 1))
    plan = CubePlan(
        crs_wkt="EPSG:32633", body="earth", transform=(10.0, 0.0, 0.0, 0.0, -10.0, 0.0),
        shape=(1000, 700), tile=128, times=times, bands=(BandSpec("image", "image"),),
        dtype="uint8", nodata=None, label_source="/x/craters.csv", read_block=300,
    )  # fmt: skip
    tasks = BlockTasks.of(plan)
    assert tasks.plan.times[0].item_ids == ()  # tasks carry no item ids
    ny, nx = plan.tiles_yx  # 8 x 6 tiles of 128 px, blocks of 256 px (2 x 2 tiles)
    assert (tasks.per_block, tasks.blocks_yx, tasks.n_tasks) == (2, (4, 3), 3 * 12)
    seen = [(tasks.block(i)[0], *k) for i in range(tasks.n_tasks) for k in tasks.tiles(i)]
    every = [(t, iy, ix) for t in (0, 1, None) for iy in range(ny) for ix in range(nx)]
    assert sorted(seen, key=str) == sorted(every, key=str)  # each tile once
    for i in range(tasks.n_tasks):
        t = tasks.block(i)[0]
        assert all(tasks.task_of(t, *k) == i for k in tasks.tiles(i))
        assert tasks.markers(i) == [tile_marker(t, *k) for k in tasks.tiles(i)]
        ys, xs = tasks.window(i)
        assert 0 < ys.stop - ys.start <= 256 and 0 < xs.stop - xs.start <= 256
    assert tasks.todo(0, False) == range(36) and tasks.n_tiles(range(36)) == 3 * ny * nx
    assert tasks.todo(1, False) == range(12, 36) and tasks.todo(2, True) == range(24, 24)
    assert tasks.block(35) == (None, 3, 2) and tasks.window(35) == (
        slice(768, 1000),
        slice(512, 700),
    )
