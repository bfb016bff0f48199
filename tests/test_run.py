"""`planetseg run`: a workflow runs incrementally, records what it did, and holds its lock."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from planetseg.items import read_items, write_items
from tests.test_cli import assert_one_line_error, planetseg

FLOW = """\
catalog:
  catalog: catalog.ndjson
cube:
  store: cube.zarr
  resolution: 1.0
  resampling: average
  tile: 32
steps:
  ingest: {{}}
  segment:
    model: {model}
  diff:
    compare: previous
  craters:
    min_diameter: {min_diameter}
cluster:
  kind: none
outputs: out
"""


def _flow(tmp_path: Path, world: dict[str, Path], epochs: int, min_diameter: int = 3) -> Path:
    items = read_items(world["items"])
    write_items(items[:epochs], tmp_path / "catalog.ndjson")
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW.format(model=world["model"], min_diameter=min_diameter))
    return path


def _record(proc_stdout: str) -> dict:
    path = proc_stdout.strip().splitlines()[-1].split("record -> ")[1]
    return json.loads(Path(path).read_text())


def _processed(record: dict) -> dict[str, int]:
    return {step: c["processed"] for step, c in record["counts"].items()}


def test_run_is_incremental_and_equals_the_stages_by_hand(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import xarray as xr

    flow = _flow(tmp_path, world, epochs=2)
    first = planetseg("run", str(flow))
    assert first.returncode == 0, first.stderr
    assert _processed(_record(first.stdout)) == {
        "ingest": 2, "segment": 2, "diff": 1, "craters": 2
    }  # fmt: skip
    # A third epoch in the catalog: exactly that epoch is ingested, segmented and derived.
    _flow(tmp_path, world, epochs=3)
    plan = planetseg("run", str(flow), "--plan")
    assert plan.returncode == 0 and "new" in plan.stdout and "synthetic-moon-e02" in plan.stdout
    second = planetseg("run", str(flow))
    assert second.returncode == 0, second.stderr
    record = _record(second.stdout)
    assert _processed(record) == {"ingest": 1, "segment": 1, "diff": 1, "craters": 1}
    [name] = record["processed"]["segment"]
    assert name.startswith("0002-")
    # Nothing new: nothing runs, and it says so; --plan changes nothing.
    ledger = tmp_path / "out" / "ledger.sqlite"
    before = ledger.stat().st_mtime_ns
    plan = planetseg("run", str(flow), "--plan")
    assert "nothing to do" in plan.stdout and ledger.stat().st_mtime_ns == before
    third = planetseg("run", str(flow))
    assert third.returncode == 0 and "nothing new" in third.stdout
    assert _processed(_record(third.stdout)) == {
        s: 0 for s in ("ingest", "segment", "diff", "craters")
    }
    # diff's and craters' block change how they compute, not what they hold: nothing re-runs.
    text = flow.read_text().replace("  diff:\n", "  diff:\n    block: 16\n")
    flow.write_text(text.replace("  craters:\n", "  craters:\n    block: 16\n"))
    plan = planetseg("run", str(flow), "--plan")
    assert plan.returncode == 0 and "nothing to do" in plan.stdout, plan.stdout
    # Only the crater settings change: only craters re-run (each with its craterstats count).
    _flow(tmp_path, world, epochs=3, min_diameter=4)
    flow.write_text(
        flow.read_text().replace(
            "  craters:\n", "  craters:\n    craterstats: true\n    block: 16\n"
        )
    )
    fourth = planetseg("run", str(flow))
    assert _processed(_record(fourth.stdout)) == {
        "ingest": 0, "segment": 0, "diff": 0, "craters": 3
    }  # fmt: skip
    counts = sorted(p.name for p in (tmp_path / "out" / "craters").glob("*.scc"))
    assert len(counts) == 3 and counts[2].startswith("0002-")
    # The run's labels equal segmenting the cube by hand.
    by_hand = tmp_path / "by-hand.zarr"
    proc = planetseg(
        "segment", str(tmp_path / "cube.zarr"), "--model", str(world["model"]),
        "--out", str(by_hand), "--time", "2", "--cluster", "none",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [store] = sorted((tmp_path / "out" / "labels").glob("0002-*.zarr"))
    ran = xr.open_zarr(store)["labels"].values
    assert np.array_equal(ran, xr.open_zarr(by_hand)["labels"].values)


@pytest.mark.slow
def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(
    world: dict[str, Path], tmp_path: Path
) -> None:
    flow = _flow(tmp_path, world, epochs=1)
    out = tmp_path / "out"
    assert planetseg("run", str(flow)).returncode == 0
    lock = out / "run.lock"
    live = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    lock.write_text(json.dumps(live))
    proc = planetseg("run", str(flow))
    assert_one_line_error(proc, "another run", str(lock))
    assert lock.exists()
    dead = {**live, "pid": 2**22 + 17}  # no such process
    lock.write_text(json.dumps(dead))
    proc = planetseg("run", str(flow), "--cluster", "local", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert not lock.exists()
    # On a Dask cluster the run prints the dashboard and keeps its performance report.
    assert "Dask dashboard: http://127.0.0.1:" in proc.stdout
    record = Path(proc.stdout.strip().splitlines()[-1].split("record -> ")[1])
    assert record.with_suffix(".html").stat().st_size > 0


@pytest.mark.slow
def test_an_unreadable_item_fails_alone_and_is_retried(
    world: dict[str, Path], tmp_path: Path
) -> None:
    flow = _flow(tmp_path, world, epochs=2)
    items = read_items(tmp_path / "catalog.ndjson")
    for asset in items[1]["assets"].values():
        asset["href"] = str(tmp_path / "missing.tif")
    write_items(items, tmp_path / "catalog.ndjson")
    proc = planetseg("run", str(flow))
    assert proc.returncode == 1
    record = _record(proc.stdout)
    assert record["counts"]["ingest"]["processed"] == 1
    assert [e["unit"] for e in record["errors"]] == [items[1]["id"]]
    # Retried on every run; the third failure quarantines it, and later runs report it.
    for status in ("failed", "quarantined"):  # the second and third attempts
        proc = planetseg("run", str(flow))
        assert proc.returncode == 1
        assert _record(proc.stdout)["errors"][0]["status"] == status
    proc = planetseg("run", str(flow))
    assert proc.returncode == 0, proc.stderr
    assert "quarantined earlier, not retried" in " ".join(proc.stdout.split())
    assert _record(proc.stdout)["counts"]["ingest"]["quarantined"] == 1
    # Repaired catalog: --retry-failed ingests exactly the quarantined item.
    _flow(tmp_path, world, epochs=2)
    assert "failed" in planetseg("run", str(flow), "--plan", "--retry-failed").stdout
    proc = planetseg("run", str(flow), "--retry-failed")
    assert proc.returncode == 0, proc.stderr
    assert _processed(_record(proc.stdout))["ingest"] == 1


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("  ingest: {{}}", "  train: {{}}", ["steps.train", "unknown key"]),
        ("outputs: out", "outputs: [1, 2]", ["outputs", "single value"]),
        ("    min_diameter: {min_diameter}", "    min_diameter: -1", ["steps.craters"]),
        ("  diff:", "  diff:", [":11: steps.segment.model", "model"]),  # no model there
    ],
)
def test_a_bad_workflow_is_one_line_and_writes_nothing(
    tmp_path: Path, old: str, new: str, words: list[str]
) -> None:
    path = tmp_path / "flow.yaml"
    assert old in FLOW
    path.write_text(FLOW.replace(old, new).format(model=tmp_path / "model", min_diameter=3))
    proc = planetseg("run", str(path))
    assert_one_line_error(proc, str(path), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.yaml"]


@pytest.mark.slow
def test_a_run_killed_mid_segment_resumes_to_the_same_outputs(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import signal

    import xarray as xr

    from tests.test_cli import start_planetseg

    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean_dir.mkdir()
    killed_dir.mkdir()
    clean, killed = _flow(clean_dir, world, epochs=3), _flow(killed_dir, world, epochs=3)
    assert planetseg("run", str(clean)).returncode == 0
    proc = start_planetseg("run", str(killed))
    labels = killed_dir / "out" / "labels"
    deadline = time.monotonic() + 120
    while not labels.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    again = planetseg("run", str(killed))  # takes over the dead run's lock
    assert again.returncode == 0, again.stderr
    for store in sorted((clean_dir / "out" / "labels").glob("*.zarr")):
        a, b = xr.open_zarr(store), xr.open_zarr(labels / store.name)
        for name in ("labels", "confidence"):
            assert np.array_equal(a[name].values, b[name].values), (store.name, name)


@pytest.mark.slow
def test_a_new_model_resegments_every_epoch_and_rederives_the_products(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from planetseg.config import TrainConfig
    from planetseg.train import train

    flow = _flow(tmp_path, world, epochs=2)
    assert planetseg("run", str(flow)).returncode == 0
    other = train(
        world["hr"],
        TrainConfig(out=str(tmp_path / "run2"), steps=2, width=8, depth=2, crop=32,
                    batch_size=4, val_every=1000, seed=1),
    )  # fmt: skip
    flow.write_text(FLOW.format(model=other, min_diameter=3))
    plan = planetseg("run", str(flow), "--plan")
    assert plan.stdout.count("fingerprint") == 2 + 1 + 2, plan.stdout
    proc = planetseg("run", str(flow))
    assert proc.returncode == 0, proc.stderr
    assert _processed(_record(proc.stdout)) == {
        "ingest": 0, "segment": 2, "diff": 1, "craters": 2
    }  # fmt: skip
    import zarr

    from planetseg.export import load_model

    digest = load_model(other)[1]["digest"]
    stores = sorted((tmp_path / "out" / "labels").glob("*.zarr"))
    assert len(stores) == 2
    for store in stores:
        assert zarr.open_group(str(store), mode="r").attrs["planetseg:model"] == digest
