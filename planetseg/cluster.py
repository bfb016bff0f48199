"""One Dask cluster factory for every stage that computes.

``--cluster`` takes ``none`` (Dask's threaded scheduler in this process, for small jobs),
``local`` (a :class:`distributed.LocalCluster` on this machine, the default), or the address of
a running scheduler (``tcp://host:8786``). The scheduler and dashboard bind to 127.0.0.1 unless
told otherwise, and the dashboard link is reported as soon as the cluster is up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from planetseg.config import ClusterConfig
from planetseg.errors import ClusterUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

KINDS = ("none", "local")


@contextmanager
def dask_client(
    config: ClusterConfig, *, on_dashboard: Callable[[str], None] | None = None
) -> Iterator[Any]:
    """Start (or connect to) the cluster ``config`` names; yield a Client, or None for ``none``.

    Args:
        config: Kind and size of the cluster.
        on_dashboard: Called with the dashboard URL once the cluster is up.

    Raises:
        InvalidArgumentError: unknown kind.
        ClusterUnavailableError: a scheduler address that does not answer.
    """
    kind = config.kind
    if kind == "none":
        yield None
        return
    from distributed import Client, LocalCluster

    if kind == "local":
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads,
            host=config.host,
            dashboard_address=f"{config.host}:{config.dashboard_port}",
            processes=True,
            silence_logs=logging.ERROR,
        )
        with cluster, Client(cluster) as client:
            _report(client, on_dashboard)
            yield client
        return
    if kind.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        try:
            client = Client(kind, timeout=config.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterUnavailableError(
                f"no Dask scheduler answers at {kind} within {config.connect_timeout:g} s: start "
                "one (dask scheduler) or use --cluster local"
            ) from exc
        with client:
            _report(client, on_dashboard)
            yield client
        return
    raise InvalidArgumentError(
        f"unknown cluster {kind!r}: use {', '.join(KINDS)} or a scheduler address tcp://HOST:PORT"
    )


def _report(client: Any, on_dashboard: Callable[[str], None] | None) -> None:
    link = client.dashboard_link
    logger.info("Dask dashboard: %s", link)
    if on_dashboard is not None:
        on_dashboard(link)
