"""The real `planetseg` console script: output files, one-line errors, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planetseg.items import read_items, write_items
from tests.test_search import BBOX, DATETIME, EXPECTED, grid_items


def planetseg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planetseg.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_planetseg(*args: str, **popen: object) -> subprocess.Popen:
    """The console script started in the background (stdout piped, as text unless told)."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "planetseg.cli", *args], **options)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("planetseg: error: ")
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    return write_items(grid_items(), tmp_path / "catalog" / "items.ndjson")


def test_search_writes_each_format(tmp_path: Path, items_file: Path) -> None:
    for suffix in (".json", ".ndjson", ".parquet"):
        out = tmp_path / f"found{suffix}"
        proc = planetseg(
            "search",
            "--catalog",
            str(items_file),
            "--bbox",
            BBOX,
            "--datetime",
            DATETIME,
            "--out",
            str(out),
        )
        assert proc.returncode == 0, proc.stderr
        assert f"{len(EXPECTED)} items" in proc.stdout
        assert [it["id"] for it in read_items(out)] == EXPECTED


def test_search_json_to_stdout(items_file: Path) -> None:
    proc = planetseg(
        "search", "-c", str(items_file), "--bbox", BBOX, "--datetime", DATETIME, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["type"] == "FeatureCollection"
    assert [f["id"] for f in doc["features"]] == EXPECTED


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--bbox", "1,2,3"], ["bbox", "malformed"]),
        (["--bbox", "0,-100,1,1"], ["outside the body's range"]),
        (["--datetime", "2024-02-01/2024-01-01"], ["reversed"]),
        (["--collection", "nope"], ["collection 'nope'"]),
        (["--max-items", "0"], ["--max-items 0"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, items_file: Path, args: list[str], words: list[str]
) -> None:
    out = tmp_path / "out.parquet"
    proc = planetseg("search", "-c", str(items_file), *args, "--out", str(out))
    assert_one_line_error(proc, *words)
    assert not out.exists()
    assert list(tmp_path.glob("*.part")) == []


def test_bad_catalogs(tmp_path: Path) -> None:
    assert_one_line_error(planetseg("search", "-c", "no-such-catalog"), "unknown catalog")
    assert_one_line_error(planetseg("search", "-c", "lroc"), "PDS", "local catalog")
    garbage = tmp_path / "garbage.ndjson"
    garbage.write_text("this is not json\n")
    assert_one_line_error(planetseg("search", "-c", str(garbage)), "cannot read items")
    assert_one_line_error(
        planetseg("search", "-c", str(garbage), "--out", str(tmp_path / "x.csv")), ".parquet"
    )


def test_catalogs_lists_worlds_and_collections() -> None:
    proc = planetseg("catalogs")
    assert proc.returncode == 0, proc.stderr
    for word in (
        "earth-search",
        "planetary-computer",
        "usgs-astro",
        "hirise",
        "mro_hirise_uncontrolled_observations",
        "kaguya",
        "lroc",
        "mars",
        "moon",
    ):
        assert word in proc.stdout


@pytest.mark.slow
def test_demo_runs_offline_as_a_workflow_and_is_idempotent(tmp_path: Path) -> None:
    import xarray as xr

    out = tmp_path / "demo-out"
    args = ("demo", "--out", str(out), "--size", "512", "--steps", "2", "--cluster", "none")
    first = planetseg(*args)
    assert first.returncode == 0, first.stderr
    assert "3 items" in first.stdout and "tiles: 3 written" in first.stdout
    assert "mIoU" in first.stdout and (out / "run" / "model" / "model.json").exists()
    cube = xr.open_zarr(out / "cube.zarr", consolidated=False)
    assert cube.attrs["planetseg:complete"] is True
    assert dict(cube.sizes) == {"time": 3, "band": 1, "y": 512, "x": 512}
    assert [it["id"] for it in read_items(out / "items.parquet")] == [
        f"synthetic-moon-e0{k}" for k in range(3)
    ]
    # The products are a run of the shipped workflows/demo.yaml with its root in the demo folder.
    shipped = Path(__file__).resolve().parents[1] / "workflows" / "demo.yaml"
    text = " ".join(first.stdout.split())
    assert f"workflow {shipped} with root {out}" in text
    record = json.loads(Path(first.stdout.split("record -> ")[1].split()[0]).read_text())
    assert record["workflow"] == str(shipped)
    assert {s: c["processed"] for s, c in record["counts"].items()} == {
        "ingest": 3, "segment": 3, "diff": 2, "craters": 3
    }  # fmt: skip
    products = out / "products"
    days = ["2020-01-01", "2020-01-15", "2024-02-01"]  # the unseen world's epochs
    stores = sorted((products / "labels").glob("*.zarr"))
    assert [p.name for p in stores] == [f"000{n}-{d}.zarr" for n, d in enumerate(days)]
    for store, day in zip(stores, days, strict=True):
        labels = xr.open_zarr(store, consolidated=False)
        assert labels.attrs["planetseg:complete"] is True
        assert dict(labels.sizes) == {"time": 1, "y": 512, "x": 512}  # the LR cube x 2
        assert str(labels["time"].values[0])[:10] == day
    changes = sorted(p.name for p in (products / "change").iterdir() if p.is_dir())
    assert changes == ["0000-2020-01-01--0001-2020-01-15", "0000-2020-01-01--0002-2024-02-01"]
    for change in changes:
        assert (products / "change" / change / "quicklook.png").exists()
        assert (products / "change" / change / "changes.parquet").exists()
    for n, day in enumerate(days):
        scores = json.loads((products / "craters" / f"000{n}-{day}.scores.json").read_text())
        assert [t[:10] for t in scores["times"]] == [day]
    assert "craters" in first.stdout and "diff" in first.stdout
    # Training shows its progress beside the tile bar (one line per record off a terminal),
    # and the run says what each step is about to do.
    assert "planetseg: train step 2/2 loss" in first.stderr
    assert "planetseg: segment: 3 to do (3 new)" in first.stderr
    # The model trains on one world; every product is made and scored on another, and says so.
    assert "training world, seed 0, suns 270/25, 90/40, 200/30" in text
    unseen = "world seed 1, suns 135/35, 315/20, 45/30 (azimuth/elevation, degrees), not seen"
    assert text.count(unseen) == 7  # its synth line, segment scores, two diffs, three catalogs
    lr = xr.open_zarr(out / "lr.zarr", consolidated=False)
    assert json.loads(lr.attrs["planetseg:provenance"])["catalog"] == str(out / "unseen-world")
    # Again: nothing is recomputed, every figure is printed from what the first run made.
    again = planetseg(*args)
    assert again.returncode == 0, again.stderr
    assert "tiles: 0 written" in again.stdout and "nothing new" in again.stdout
    assert again.stdout.count("mIoU") == first.stdout.count("mIoU") == 2
    assert " ".join(again.stdout.split()).count(unseen) == 7
    # The shipped workflow itself, beside a demo-out folder, runs on it: nothing left to do.
    flow = tmp_path / "workflows" / "demo.yaml"
    flow.parent.mkdir()
    shutil.copy(shipped, flow)
    run = planetseg("run", str(flow), "--cluster", "none")
    assert run.returncode == 0, run.stderr
    assert "nothing new" in run.stdout and str(products / "runs") in run.stdout


COMMANDS = ("catalogs", "search", "ingest", "train", "evaluate", "segment", "diff", "craters",
            "info", "run", "schedule", "synth", "demo")  # fmt: skip


@pytest.mark.parametrize("command", [(), *((c,) for c in COMMANDS)])
def test_help_reads_like_a_mature_cli(command: tuple[str, ...]) -> None:
    proc = planetseg(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for placeholder in ("<bool>", "list[", "<int>", "<float>", "<str>]"):
        assert placeholder not in text, (placeholder, text)
    help_line = next(line for line in text.splitlines() if "--help " in line)
    assert help_line.split("--help", 1)[1].split()[0] == "Show", help_line  # a plain flag
    if command == ("train",):
        assert "Torch threads per process" in text and "Dask" in text
        assert "--no-resume" not in text and " N " in text and "FLOAT" in text
        for panel in ("Model", "Training", "Processes", "Run directory"):
            assert panel in text
    if command == ("segment",):
        assert "Dask threads per worker" in text and "Torch threads per task" in text
        assert "Dask cluster" in text and "W,S,E,N" not in text
    if command == ("search",):
        assert "W,S,E,N" in text and "TEXT" in text  # --collection: repeatable, one per flag
