"""One bounded task executor, for every stage that computes task by task.

Ingest and segment write a store task by task; diff and craters compute block by block.

A stage plans from metadata and exposes its work as tasks numbered ``0 .. n_tasks - 1``
(:class:`TaskPlan`); a task is a picklable function ``run(plan, index, *args)`` that writes its
chunks, then touches its markers in the store's progress folder, and returns how many units
(tiles) it did. :func:`execute` runs them:

* Pending indices come from a generator (:func:`pending`): no list of every task is ever
  built, so the driver's time and memory do not grow with the cube.
* At most ``in_flight`` tasks are on the cluster at once; the next is submitted as one
  finishes. Unless the caller fixes it (``--partition``), the limit follows the cluster's
  *current* thread count, re-read as tasks complete: workers joining an adaptive cluster
  (SLURM jobs starting) get work, and workers leaving it shrink the queue.
* ``client=None`` runs the tasks in this process: one after the other, or on a pool of
  ``threads`` threads under the same bound.
* A task that fails stops the run: the tasks still queued are cancelled, the ones running in
  this process are waited for, and the task's own exception is raised, so a stage's one-line
  errors stay one line. Markers are written by the tasks themselves, on success only, so what
  was done survives and a re-run resumes with the rest.

:func:`map_tasks` runs the products' tasks on the same bound: each task is a function and its
own arguments (a block's window), and each result goes to a callback as it arrives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from typing import Any, Protocol

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

#: Seconds between two reads of the cluster's thread count (one scheduler round trip each).
REFRESH_SECONDS = 0.5


class TaskPlan(Protocol):
    """Work a stage planned from metadata, as numbered tasks."""

    @property
    def n_tasks(self) -> int:
        """How many tasks there are."""
        ...

    def markers(self, index: int) -> Sequence[str]:
        """Names of the markers task ``index`` leaves in the progress folder once it is done."""
        ...


def pending(plan: TaskPlan, done: Set[str], among: range | None = None) -> Iterator[int]:
    """Tasks of ``plan`` (of ``among`` only) whose markers are not all in ``done``, lazily."""
    indices = range(plan.n_tasks) if among is None else among
    if not done:
        yield from indices
        return
    for index in indices:
        if not all(m in done for m in plan.markers(index)):
            yield index


class InFlight:
    """How many tasks to keep on the cluster: fixed, or following its current thread count.

    Args:
        client: The Dask client (None: in this process, ``threads`` threads).
        fixed: A limit that wins over the cluster's size (``--partition``).
        per_thread: Tasks per worker thread (queued ones keep a worker busy between tasks).
        minimum: The least kept in flight (also while a cluster has no worker yet).
        threads: Threads of the in-process pool (``client=None``).
    """

    def __init__(
        self,
        client: Any,
        *,
        fixed: int | None = None,
        per_thread: int = 4,
        minimum: int = 1,
        threads: int = 1,
    ) -> None:
        self.client, self.fixed = client, fixed
        self.per_thread, self.minimum, self.threads = per_thread, minimum, threads
        self._limit, self._read_at = 0, -float("inf")

    def cluster_threads(self) -> int:
        """Worker threads now (the in-process pool's without a client)."""
        if self.client is None:
            return self.threads
        return sum(self.client.nthreads().values())

    def limit(self) -> int:
        """The current limit (the thread count is re-read at most every REFRESH_SECONDS)."""
        if self.fixed is not None:
            return self.fixed
        now = time.monotonic()
        if now - self._read_at >= REFRESH_SECONDS:
            self._read_at = now
            limit = max(self.minimum, self.per_thread * self.cluster_threads())
            if limit != self._limit:
                logger.debug("tasks in flight: %d -> %d", self._limit, limit)
                self._limit = limit
        return self._limit


def execute(
    run: Callable[..., int],
    plan: Any,
    indices: Iterable[int],
    *args: Any,
    client: Any = None,
    in_flight: InFlight | None = None,
    threads: int = 1,
    progress: Progress | None = None,
    done: int = 0,
    total: int = 0,
    name: str = "task",
) -> int:
    """Run ``run(plan, index, *args)`` for every index, keeping a bounded number in flight.

    Args:
        run: The task function (picklable, module level); returns the units it did.
        plan: The stage's plan (small: it is sent with every task).
        indices: The tasks to run (a generator, see :func:`pending`).
        *args: Further arguments of every task (send big ones once: ``client.scatter``).
        client: A ``distributed.Client``; None runs in this process.
        in_flight: The bound (default: 4 per thread of the cluster, or of the pool).
        threads: Without a client, the threads to run tasks on (1: one after the other).
        progress: Called with (units done, ``total``) after each task.
        done: Units done before this run (where the progress starts).
        total: Units of the whole job, for the progress.
        name: Prefix of the tasks' Dask keys (a run's keys are unique to it).

    Returns:
        The units this run did (the sum of the tasks' results).

    Raises:
        Exception: the first failing task's exception, once the run has stopped.
    """
    bound = in_flight or InFlight(client, threads=threads)
    computed = 0

    def finished(_: int, units: int) -> None:
        nonlocal computed
        computed += units
        if progress:
            progress(done + computed, total)

    if client is None and threads <= 1:
        for index in indices:
            finished(index, run(plan, index, *args))
        return computed
    jobs = ((index, run, (plan, index, *args)) for index in indices)
    _drive(client, threads, name, bound, jobs, finished)
    return computed


def map_tasks(
    fn: Callable[..., Any],
    tasks: Iterable[tuple[Any, ...]],
    on_result: Callable[[int, Any], None],
    *,
    client: Any = None,
    threads: int | None = None,
    progress: Progress | None = None,
    total: int = 0,
    name: str = "block",
) -> None:
    """Run ``fn(*args)`` for every ``args`` of ``tasks``, a bounded number in flight at once.

    Args:
        fn: The task function (picklable, module level).
        tasks: Each task's arguments (a generator: made as the bound lets them in).
        on_result: Called with (the task's position in ``tasks``, its result), in the order
            the tasks finish.
        client: A ``distributed.Client``; None runs on ``threads`` threads of this process.
        threads: Threads without a client (default: one per CPU).
        progress: Called with (tasks done, ``total``) after each task.
        total: Tasks of the whole job, for the progress.
        name: Prefix of the tasks' Dask keys.

    Raises:
        Exception: the first failing task's exception, once the run has stopped.
    """
    threads = threads or os.cpu_count() or 1
    finished = 0

    def done(index: int, result: Any) -> None:
        nonlocal finished
        on_result(index, result)
        finished += 1
        if progress:
            progress(finished, total)

    jobs = ((index, fn, args) for index, args in enumerate(tasks))
    _drive(client, threads, name, InFlight(client, threads=threads), jobs, done)


def _drive(
    client: Any,
    threads: int,
    name: str,
    bound: InFlight,
    jobs: Iterator[tuple[int, Callable[..., Any], tuple[Any, ...]]],
    on_done: Callable[[int, Any], None],
) -> None:
    """Submit ``(index, fn, args)`` jobs while fewer than the bound run; hand results over."""
    backend = _Distributed(client, name) if client is not None else _Threads(threads)
    running: dict[Any, int] = {}
    try:
        while True:
            limit = bound.limit()
            while len(running) < limit and (job := next(jobs, None)) is not None:
                index, fn, args = job
                running[backend.submit(fn, args, index)] = index
            if not running:
                return
            future = backend.next_done()
            result = future.result()  # a failed task's future stays in running: cancelled below
            index = running.pop(future)
            backend.release(future)
            on_done(index, result)
    except BaseException:
        backend.cancel(set(running))
        raise
    finally:
        backend.close()


class _Distributed:
    """Tasks on a Dask cluster, completions in the order they happen."""

    def __init__(self, client: Any, name: str) -> None:
        from distributed import as_completed

        self.client = client
        self.prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self.completed = as_completed()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], index: int) -> Any:
        future = self.client.submit(fn, *args, key=f"{self.prefix}-{index}")
        self.completed.add(future)
        return future

    def next_done(self) -> Any:
        return next(self.completed)

    def release(self, future: Any) -> None:
        future.release()

    def cancel(self, running: set[Any]) -> None:
        if running:
            self.client.cancel(list(running))

    def close(self) -> None:
        self.completed.clear()


class _Threads:
    """Tasks on a thread pool of this process, completions in the order they happen."""

    def __init__(self, threads: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.completed: queue.SimpleQueue[concurrent.futures.Future] = queue.SimpleQueue()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], index: int) -> Any:
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self.completed.put)
        return future

    def next_done(self) -> Any:
        return self.completed.get()

    def release(self, future: Any) -> None:
        pass

    def cancel(self, running: set[Any]) -> None:
        for future in running:
            future.cancel()

    def close(self) -> None:
        # Waits for the tasks running now (at most ``threads``): none writes after the return.
        self.pool.shutdown(wait=True, cancel_futures=True)
