"""The cluster factory: kinds, job settings, and clean errors where a kind cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from planetseg.cluster import check_kind, dask_client, jobqueue_settings
from planetseg.config import ClusterConfig
from planetseg.errors import ClusterUnavailableError, InvalidArgumentError


def test_shipped_job_settings_are_valid_for_dask_jobqueue() -> None:
    import dask
    import dask_jobqueue

    for kind, cls in (("slurm", dask_jobqueue.SLURMCluster), ("pbs", dask_jobqueue.PBSCluster)):
        path, section = jobqueue_settings(ClusterConfig(kind=kind))
        assert path.name == f"{kind}.yaml" and section["cores"] == 1
        with (
            dask.config.set({f"jobqueue.{kind}.{k}": v for k, v in section.items()}),
            cls(scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"}) as cluster,
        ):
            script = cluster.job_script()
        assert "planetseg-worker" in script and "--nthreads 1" in script


def test_shipped_workers_retire_before_their_walltime() -> None:
    import dask.utils

    for kind in ("slurm", "pbs"):
        _, section = jobqueue_settings(ClusterConfig(kind=kind))
        args = section["worker-extra-args"]
        option = dict(zip(args[::2], args[1::2], strict=True))
        h, m, s = (int(v) for v in section["walltime"].split(":"))
        lifetime = dask.utils.parse_timedelta(option["--lifetime"])
        stagger = dask.utils.parse_timedelta(option["--lifetime-stagger"])
        assert 0 < stagger < lifetime and lifetime + stagger < h * 3600 + m * 60 + s, kind


def test_job_settings_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="needs its job settings"):
        jobqueue_settings(ClusterConfig(kind="slurm", config_file=str(tmp_path / "none.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobqueue:\n  pbs:\n    cores: 1\n")
    with pytest.raises(InvalidArgumentError, match="jobqueue: slurm:"):
        jobqueue_settings(ClusterConfig(kind="slurm", config_file=str(bad)))


def test_unknown_kind() -> None:
    check_kind("tcp://10.0.0.1:8786")
    with pytest.raises(InvalidArgumentError, match="unknown cluster"):
        check_kind("yarn")


def test_cuda_kind_without_dask_cuda_or_gpu_is_a_clean_error() -> None:
    import torch

    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        have = False
    else:
        have = torch.cuda.is_available()
    if have:
        pytest.skip("dask-cuda and a GPU are here: see test_cuda_cluster_runs")
    with pytest.raises(ClusterUnavailableError, match="cuda|GPU"):
        with dask_client(ClusterConfig(kind="cuda")):
            pass


@pytest.mark.cuda
def test_cuda_cluster_runs() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("dask_cuda")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with dask_client(ClusterConfig(kind="cuda")) as client:
        gpus = client.run(lambda: __import__("torch").cuda.device_count())
    assert gpus and all(n >= 1 for n in gpus.values())
