"""One Dask cluster factory for every stage that computes.

``--cluster`` takes:

* ``none``: Dask's threaded scheduler in this process, for small jobs;
* ``local``: a :class:`distributed.LocalCluster` on this machine (the default);
* ``cuda``: a dask-cuda ``LocalCUDACluster``, one single-threaded worker per GPU (install
  the ``cuda`` extra); dask-cuda lists each worker's own GPU first in its
  ``CUDA_VISIBLE_DEVICES``, and the worker runs the model there
  (:func:`planetseg.model.inference.worker_device`);
* ``slurm`` / ``pbs``: dask-jobqueue submits ``--jobs`` batch jobs that run the workers. The
  job settings (cores, memory, queue, account, walltime, ...) are dask-jobqueue's own
  configuration keys, read from ``cluster/<kind>.yaml`` (``--cluster-config`` to name another).
  A job with N GPUs runs ``processes: N`` workers, and each claims one of the job's GPUs;
* the address of a running scheduler (``tcp://host:8786``).

The scheduler and dashboard bind to 127.0.0.1 unless told otherwise (a batch cluster whose
jobs run on other nodes needs ``--host`` set to an address they reach), and the dashboard
link is reported as soon as the cluster is up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from planetseg.config import ClusterConfig
from planetseg.errors import ClusterUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

KINDS = ("none", "local", "cuda", "slurm", "pbs")
BATCH_KINDS = ("slurm", "pbs")
ADDRESS_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://")


def check_kind(kind: str) -> None:
    """Refuse an unknown ``--cluster`` before any work starts.

    Raises:
        InvalidArgumentError: not a known kind or scheduler address.
    """
    if kind not in KINDS and not kind.startswith(ADDRESS_SCHEMES):
        raise InvalidArgumentError(
            f"unknown cluster {kind!r}: use {', '.join(KINDS)} or a scheduler address "
            "tcp://HOST:PORT"
        )


@contextmanager
def dask_client(
    config: ClusterConfig, *, on_dashboard: Callable[[str], None] | None = None
) -> Iterator[Any]:
    """Start (or connect to) the cluster ``config`` names; yield a Client, or None for ``none``.

    Args:
        config: Kind and size of the cluster.
        on_dashboard: Called with the dashboard URL once the cluster is up.

    Raises:
        InvalidArgumentError: unknown kind, or a batch kind without its settings file.
        ClusterUnavailableError: a scheduler address that does not answer, dask-cuda or a
            GPU missing, or batch jobs whose workers never join.
    """
    check_kind(config.kind)
    if config.kind == "none":
        yield None
        return
    from distributed import Client

    if config.kind.startswith(ADDRESS_SCHEMES):
        try:
            client = Client(config.kind, timeout=config.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterUnavailableError(
                f"no Dask scheduler answers at {config.kind} within "
                f"{config.connect_timeout:g} s: start one (dask scheduler) or use --cluster local"
            ) from exc
        with client:
            _report(client, on_dashboard)
            yield client
        return
    with _cluster(config) as cluster, Client(cluster) as client:
        _report(client, on_dashboard)
        if config.kind in BATCH_KINDS:
            _wait_for_jobs(client, config)
        yield client


def _dashboard(config: ClusterConfig) -> str:
    return f"{config.host}:{config.dashboard_port}"


@contextmanager
def _cluster(config: ClusterConfig) -> Iterator[Any]:
    if config.kind == "local":
        from distributed import LocalCluster

        with LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads,
            host=config.host,
            dashboard_address=_dashboard(config),
            processes=True,
            # A task's error reaches the client, which reports it (one line for a
            # PlanetsegError): the worker's own "Compute Failed" log would repeat it.
            silence_logs=logging.CRITICAL,
        ) as cluster:
            yield cluster
    elif config.kind == "cuda":
        with _cuda_cluster(config) as cluster:
            yield cluster
    else:
        with _batch_cluster(config) as cluster:
            yield cluster


@contextmanager
def _cuda_cluster(config: ClusterConfig) -> Iterator[Any]:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClusterUnavailableError(
            "--cluster cuda needs dask-cuda: pip install 'planetseg[cuda]' (on a machine with "
            "NVIDIA GPUs)"
        ) from exc
    import torch

    if not torch.cuda.is_available():
        raise ClusterUnavailableError(
            "--cluster cuda found no CUDA GPU (torch.cuda.is_available() is False): use "
            "--cluster local, or a torch build with CUDA"
        )
    # One worker per GPU, one thread each: a second thread would only queue on the same GPU.
    with LocalCUDACluster(
        n_workers=config.workers,
        threads_per_worker=1,
        ip=config.host,
        dashboard_address=_dashboard(config),
        silence_logs=logging.CRITICAL,  # the client reports a task's error, see _cluster
    ) as cluster:
        yield cluster


def jobqueue_settings(config: ClusterConfig) -> tuple[Path, dict[str, Any]]:
    """The dask-jobqueue settings file of a batch kind and its ``jobqueue.<kind>`` section.

    Raises:
        InvalidArgumentError: no such file, or one without a ``jobqueue: <kind>:`` section.
    """
    import yaml

    kind = config.kind
    name = f"{kind}.yaml"
    candidates = (
        [Path(config.config_file)]
        if config.config_file
        else [Path.cwd() / "cluster" / name, Path(__file__).resolve().parents[1] / "cluster" / name]
    )
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise InvalidArgumentError(
            f"--cluster {kind} needs its job settings: no {' or '.join(map(str, candidates))} "
            "(pass --cluster-config FILE)"
        )
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
        section = loaded["jobqueue"][kind]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise InvalidArgumentError(
            f"{path} is not dask-jobqueue settings: it needs a 'jobqueue: {kind}:' section"
        ) from exc
    return path, dict(section or {})


@contextmanager
def _batch_cluster(config: ClusterConfig) -> Iterator[Any]:
    import dask
    import dask_jobqueue

    path, section = jobqueue_settings(config)
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[config.kind]
    logger.info("%s jobs configured by %s", config.kind, path)
    scheduler = {"dashboard_address": _dashboard(config)}
    if not section.get("interface"):
        scheduler["host"] = config.host
    # Jobs read their settings when they are created (at the start, and again whenever a job
    # is replaced), so the settings stay in force for the cluster's whole life. Adaptive with
    # minimum = maximum keeps --jobs jobs: a worker that retires at its --lifetime (before the
    # walltime, see cluster/slurm.yaml) is replaced by a new job instead of leaving a hole.
    with (
        dask.config.set({f"jobqueue.{config.kind}.{k}": v for k, v in section.items()}),
        cls(scheduler_options=scheduler, silence_logs=logging.ERROR) as cluster,
    ):
        cluster.adapt(minimum_jobs=config.jobs, maximum_jobs=config.jobs)
        yield cluster


def _wait_for_jobs(client: Any, config: ClusterConfig) -> None:
    try:
        client.wait_for_workers(1, timeout=config.worker_timeout)
    except TimeoutError as exc:
        raise ClusterUnavailableError(
            f"no {config.kind} job's worker joined within {config.worker_timeout:g} s: check "
            "the queue and the jobs' logs (log-directory in the cluster settings)"
        ) from exc


def _report(client: Any, on_dashboard: Callable[[str], None] | None) -> None:
    link = client.dashboard_link
    logger.info("Dask dashboard: %s", link)
    if on_dashboard is not None:
        on_dashboard(link)
