"""`segment`: no seams, cluster = one process, resume after kills, bounded plans, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from planetseg.cluster import dask_client
from planetseg.config import ClusterConfig, IngestConfig, SegmentConfig
from planetseg.errors import (
    CheckpointError,
    InvalidArgumentError,
    MixedBodiesError,
    PlanetsegWarning,
    StoreMismatchError,
)
from planetseg.evaluate import predict_logits
from planetseg.export import load_model
from planetseg.ingest import ingest
from planetseg.model import fuse_for_inference
from planetseg.segment import CONFIDENCE_STEPS, plan_segment, segment
from planetseg.store import done_markers, progress_dir
from planetseg.synthetic import SynthConfig, synthesize
from tests.test_cli import assert_one_line_error, planetseg, start_planetseg
from tests.virtual import virtual_cube


def _arrays(store: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return group["labels"][:], group["confidence"][:]


@pytest.fixture(scope="module")
def reference(world: dict[str, Path]) -> Path:
    """A clean run in this process, one tile per task."""
    out = world["root"] / "reference.zarr"
    segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"]), batch=1))
    return out


def test_mosaic_equals_whole_image(world: dict[str, Path], reference: Path) -> None:
    net, card = load_model(world["model"])
    net = fuse_for_inference(net)  # what the workers run
    image = zarr.open_group(str(world["lr"]), mode="r")["image"][:].astype(np.float32)
    mean = torch.tensor(card["normalisation"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["normalisation"]["std"]).view(1, -1, 1, 1)
    labels, confidence = _arrays(reference)
    assert labels.shape == (3, 256, 256)  # 128 LR px x scale 2, every epoch
    for t in range(image.shape[0]):
        whole = predict_logits(net, (torch.from_numpy(image[t : t + 1]) - mean) / std, tile=None)
        prob = torch.softmax(whole[0], dim=0)
        np.testing.assert_array_equal(labels[t], prob.argmax(0).numpy())
        expected = np.round(prob.max(0).values.numpy() * CONFIDENCE_STEPS)
        assert np.abs(confidence[t].astype(int) - expected).max() <= 1


def test_output_store_carries_grid_and_provenance(world: dict[str, Path], reference: Path) -> None:
    import rioxarray  # noqa: F401 - registers .rio
    import xarray as xr

    ds = xr.open_zarr(reference, consolidated=False)
    cube = xr.open_zarr(world["lr"], consolidated=False)
    assert ds.attrs["planetseg:complete"] is True
    assert ds.attrs["planetseg:model"] == load_model(world["model"])[1]["digest"]
    assert ds.attrs["planetseg:cube"] == str(world["lr"].resolve())
    assert ds.attrs["planetseg:body"] == "moon"
    assert ds.rio.crs == cube.rio.crs
    assert ds.rio.resolution()[0] == pytest.approx(cube.rio.resolution()[0] / 2)
    assert ds.rio.bounds() == pytest.approx(cube.rio.bounds())
    assert float(ds["confidence"].min()) >= 0.25 - 1e-6  # decoded: a probability of 4 classes
    assert not progress_dir(reference).exists()


def test_local_cluster_equals_one_process(world: dict[str, Path], reference: Path) -> None:
    out = world["root"] / "cluster.zarr"
    config = SegmentConfig(out=str(out), model=str(world["model"]), batch=3)
    with dask_client(ClusterConfig(kind="local", workers=2, threads=1)) as client:
        result = segment(world["lr"], config, client=client)
    assert result.computed == 48 and result.kept == 0
    for a, b in zip(_arrays(out), _arrays(reference), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_worker_killed_mid_run(world: dict[str, Path], reference: Path) -> None:
    out = world["root"] / "killed-worker.zarr"
    config = SegmentConfig(out=str(out), model=str(world["model"]), batch=1, partition=2)
    with dask_client(ClusterConfig(kind="local", workers=2, threads=1)) as client:
        pids = client.run(os.getpid)
        outcome: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: outcome.update(result=segment(world["lr"], config, client=client))
        )
        runner.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(done_markers(out)) >= 4:
                break
            time.sleep(0.01)
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        runner.join(120)
        assert not runner.is_alive()
        assert victim not in client.run(os.getpid).values()  # the nanny started a new one
    assert outcome["result"].computed == 48
    for a, b in zip(_arrays(out), _arrays(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_kill_and_resume_computes_only_the_rest(world: dict[str, Path], reference: Path) -> None:
    out = world["root"] / "resumed.zarr"
    args = [
        "segment", str(world["lr"]), "--model", str(world["model"]), "--out", str(out),
        "--batch", "1", "--cluster", "none",
    ]  # fmt: skip
    proc = start_planetseg(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(done_markers(out)) >= 10:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(done_markers(out))
    assert 10 <= done < 48, "the run finished before it could be killed"
    assert zarr.open_group(str(out), mode="r").attrs["planetseg:complete"] is False
    again = planetseg(*args)
    assert again.returncode == 0, again.stderr
    assert f"{48 - done} segmented, {done} kept" in " ".join(again.stdout.split())
    for a, b in zip(_arrays(out), _arrays(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    rerun = planetseg(*args)
    assert "0 segmented, 48 kept" in " ".join(rerun.stdout.split())


@pytest.mark.slow
def test_dashboard_answers_while_running(world: dict[str, Path], tmp_path: Path) -> None:
    args = [
        "segment", str(world["lr"]), "--model", str(world["model"]),
        "--out", str(tmp_path / "dash.zarr"), "--batch", "1", "--partition", "1",
        "--workers", "1", "--threads", "1",
    ]  # fmt: skip
    proc = start_planetseg(*args, stderr=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        assert line.startswith("Dask dashboard: http://127.0.0.1:"), line
        url = line.split()[-1]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        assert proc.poll() is None, "the job ended before the dashboard was checked"
    finally:
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "48 segmented" in " ".join(rest.split())


def test_cog_export(world: dict[str, Path], tmp_path: Path) -> None:
    import rasterio

    from planetseg.bodies import celestial_proj

    out = tmp_path / "cog.zarr"
    result = segment(
        world["lr"],
        SegmentConfig(
            out=str(out), model=str(world["model"]), times=("-1",), cog=str(tmp_path / "cogs")
        ),
    )
    assert [p.name.split("-")[0] for p in result.cogs] == ["labels", "confidence"]
    labels, _ = _arrays(out)
    with celestial_proj(), rasterio.open(result.cogs[0]) as src:
        assert src.driver == "GTiff" and src.overviews(1)
        assert "IAU" in src.crs.to_wkt() or "Moon" in src.crs.to_wkt()
        np.testing.assert_array_equal(src.read(1), labels[0])
        assert src.tags()["planetseg_model"] == result.plan.digest


def test_time_selection_and_changed_settings(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.zarr"
    model = str(world["model"])
    plan = plan_segment(world["lr"], SegmentConfig(out=str(out), model=model, times=("2014",)))
    assert plan.times == (2,)
    with pytest.raises(InvalidArgumentError, match="matches several"):
        plan_segment(world["lr"], SegmentConfig(out=str(out), model=model, times=("2010",)))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        plan_segment(world["lr"], SegmentConfig(out=str(out), model=model, times=("7",)))
    segment(world["lr"], SegmentConfig(out=str(out), model=model, times=("0",)))
    with pytest.raises(StoreMismatchError, match="other settings"):
        segment(world["lr"], SegmentConfig(out=str(out), model=model, times=("1",)))


def test_short_halo_warns(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.warns(PlanetsegWarning, match="seams"):
        plan_segment(
            world["lr"], SegmentConfig(out=str(tmp_path / "x"), model=str(world["model"]), halo=0)
        )


def test_dry_run_of_a_virtual_terabyte(world: dict[str, Path], tmp_path: Path) -> None:
    cube = virtual_cube(tmp_path / "tb.zarr", like=world["lr"], side=2**20, tile=1024)
    start = time.perf_counter()
    proc = planetseg(
        "segment", str(cube), "--model", str(world["model"]), "--out", str(tmp_path / "o.zarr"),
        "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 30
    text = " ".join(proc.stdout.split())
    assert "tiles 1,048,576 of 1024 px" in text and "reads 1.0 TiB" in text
    assert not (tmp_path / "o.zarr").exists()


# Measured in a fresh process: the peak RSS while the tasks run, over the RSS just before (the
# model loaded and run once, so only what the tasks themselves hold counts).
_PEAK_OF_TASKS = """
import json, sys
from pathlib import Path
import torch
from planetseg.config import SegmentConfig
from planetseg.segment import plan_segment, segment, worker_model

def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024

cube, model, out = sys.argv[1:]
config = SegmentConfig(out=out, model=model, batch=2)
plan = plan_segment(cube, config)
net, _ = worker_model(plan.model, plan.digest, plan.path)  # loaded (compiled) as a worker's
with torch.no_grad():
    net(torch.zeros(1, plan.bands, 64, 64))
before = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the current RSS
segment(cube, config, plan=plan)
print(json.dumps({"peak": status("VmHWM:") - before}))
"""


def test_dry_run_estimate_is_within_2x_of_a_tasks_measured_peak(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import json
    import re

    # 3 tasks of 2 tiles per row: the middle ones read the full halo on every side.
    cube = virtual_cube(tmp_path / "v.zarr", like=world["lr"], side=768, tile=128)
    args = ("segment", str(cube), "--model", str(world["model"]), "--out", str(tmp_path / "o.zarr"))
    proc = planetseg(*args, "--batch", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"about ([0-9.]+) (KiB|MiB|GiB) per task", " ".join(proc.stdout.split()))
    assert found, proc.stdout
    estimate = float(found[1]) * 1024 ** ("KiB", "MiB", "GiB").index(found[2]) * 1024
    assert not (tmp_path / "o.zarr").exists()
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_TASKS, str(cube), str(world["model"]), str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    peak = json.loads(run.stdout.strip().splitlines()[-1])["peak"]
    assert peak > 20 * 2**20  # the window's activations, not noise
    assert 0.5 <= estimate / peak <= 2.0, (estimate, peak)


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(world: dict[str, Path], tmp_path: Path) -> None:
    model = str(world["model"])
    lr = str(world["lr"])
    # a cube of other bands than the model's
    other = tmp_path / "labels-band.zarr"
    ingest(world["items"], IngestConfig(out=str(other), bands=("labels",), tile=64))
    proc = planetseg("segment", str(other), "--model", model, "--out", str(tmp_path / "a.zarr"))
    assert_one_line_error(proc, "bands")
    assert not (tmp_path / "a.zarr").exists()
    # an unknown cluster kind, an unreachable scheduler, a missing dask-cuda or GPU
    for cluster, word in [("kubernetes", "unknown cluster"), ("tcp://127.0.0.1:9", "no Dask")]:
        out = tmp_path / f"{word[:3]}.zarr"
        proc = planetseg("segment", lr, "--model", model, "--out", str(out), "--cluster", cluster)
        assert_one_line_error(proc, word)
        assert not (out / "zarr.json").exists() or not zarr.open_group(
            str(out), mode="r"
        ).attrs.get("planetseg:complete")
    proc = planetseg("segment", lr, "--model", model, "--out", str(tmp_path / "c.zarr"),
                     "--cluster", "cuda")  # fmt: skip
    if not torch.cuda.is_available():
        assert_one_line_error(proc, "cuda")
    # a damaged model, a cube that is not one
    proc = planetseg("segment", lr, "--model", str(tmp_path), "--out", str(tmp_path / "d.zarr"))
    assert_one_line_error(proc, "not an exported model")
    proc = planetseg("segment", str(tmp_path), "--model", model, "--out", str(tmp_path / "e"))
    assert_one_line_error(proc, "not a zarr store")


def test_other_body_refused_unless_allowed(world: dict[str, Path], tmp_path: Path) -> None:
    earth = synthesize(tmp_path / "earth", config=SynthConfig(size=128, seed=1, crs="EPSG:32633"))
    cube = tmp_path / "earth.zarr"
    ingest(earth.items, IngestConfig(out=str(cube), resolution=1.0, resampling="average", tile=32))
    config = SegmentConfig(out=str(tmp_path / "e.zarr"), model=str(world["model"]))
    with pytest.raises(MixedBodiesError, match="moon.*earth|--any-body"):
        plan_segment(cube, config)
    with pytest.warns(PlanetsegWarning, match="any-body"):
        plan_segment(cube, SegmentConfig(out=config.out, model=config.model, any_body=True))


def test_changed_model_weights_are_refused_by_workers(world: dict[str, Path]) -> None:
    from planetseg.segment import worker_model

    with pytest.raises(CheckpointError, match="changed during the run"):
        worker_model(str(world["model"]), "sha256:" + "0" * 64)


@pytest.mark.slurm
def test_slurm_jobs_equal_the_local_result(
    world: dict[str, Path], reference: Path, local_slurm: Any, tmp_path: Path
) -> None:
    settings = tmp_path / "slurm.yaml"
    settings.write_text(
        "jobqueue:\n  slurm:\n    cores: 1\n    processes: 1\n    memory: 2GiB\n"
        f"    walltime: '00:10:00'\n    log-directory: {tmp_path / 'logs'}\n"
    )
    out = tmp_path / "slurm.zarr"
    proc = subprocess.run(
        [
            sys.executable, "-m", "planetseg.cli", "segment", str(world["lr"]),
            "--model", str(world["model"]), "--out", str(out), "--batch", "2",
            "--cluster", "slurm", "--jobs", "2", "--cluster-config", str(settings),
        ],
        capture_output=True, text=True, timeout=300, env=local_slurm.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Dask dashboard: http://127.0.0.1:" in proc.stdout
    assert list((tmp_path / "logs").glob("*.err")) or list((tmp_path / "logs").iterdir())
    for a, b in zip(_arrays(out), _arrays(reference), strict=True):
        np.testing.assert_array_equal(a, b)
