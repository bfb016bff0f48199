"""Bad arguments end in one line and exit 2, fast, before anything is written or started."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from planetseg.config import (
    ClusterConfig,
    CratersConfig,
    DemoConfig,
    DiffConfig,
    IngestConfig,
    SearchConfig,
    SegmentConfig,
    TrainConfig,
)
from planetseg.data import spatial_split
from planetseg.errors import InvalidArgumentError
from planetseg.export import WEIGHTS
from planetseg.ingest import ingest
from planetseg.segment import segment
from planetseg.synthetic import SynthConfig, synthesize
from planetseg.train import CHECKPOINT, train
from tests.test_cli import assert_one_line_error, planetseg

#: A bad argument must be refused at once: a hang (e.g. a cluster of 0 workers) fails the test.
FAST = 60

TINY = ["--width", "4", "--depth", "1", "--batch-size", "1", "--val-every", "1000"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world: a local catalog for search and ingest."""
    root = tmp_path_factory.mktemp("args")
    return synthesize(root / "world", config=SynthConfig(size=128, seed=1)).root


# (command and its bad arguments, words the one line must contain). "{world}" is the world's
# folder, "{out}" the output the command must not create; the other paths need not exist,
# since the arguments are refused before anything is read.
CASES = [
    (["search", "--catalog", "{world}", "--timeout", "-1"], ["--timeout -1", "seconds"]),
    (["search", "--catalog", "{world}", "--retries", "-1"], ["--retries -1"]),
    (["search", "--catalog", "{world}", "--max-items", "0"], ["--max-items 0"]),
    (["ingest", "{world}", "--resolution", "0"], ["--resolution 0", "positive"]),
    (["ingest", "{world}", "--resolution", "-1"], ["--resolution -1", "positive"]),
    (["ingest", "{world}", "--tile", "65536"], ["--tile 65536", "8192"]),
    (["ingest", "{world}", "--tile", "100"], ["--tile 100", "multiple of 16"]),
    (["ingest", "{world}", "--groupby", "bogus"], ["--groupby bogus", "solar_day"]),
    (["ingest", "{world}", "--resampling", "bogus"], ["--resampling bogus", "average"]),
    (["ingest", "{world}", "--dtype", "bogus"], ["--dtype bogus", "numpy dtype"]),
    (["ingest", "{world}", "--engine", "bogus"], ["--engine bogus", "stackstac"]),
    (["ingest", "{world}", "--workers", "0"], ["--workers 0"]),
    (["ingest", "{world}", "--workers", "-1"], ["--workers -1"]),
    (["ingest", "{world}", "--threads", "0"], ["--threads 0"]),
    (["ingest", "{world}", "--cluster", "slurm", "--jobs", "0"], ["--jobs 0"]),
    (["train", "cube.zarr", "--steps", "-5"], ["--steps -5", "positive"]),
    (["train", "cube.zarr", "--steps", "0"], ["--steps 0"]),
    (["train", "cube.zarr", "--batch-size", "0"], ["--batch-size 0"]),
    (["train", "cube.zarr", "--crop", "0"], ["--crop 0", "multiple"]),
    (["train", "cube.zarr", "--crop", "36"], ["--crop 36", "multiple"]),
    (["train", "cube.zarr", "--lr", "-1"], ["--lr -1"]),
    (["train", "cube.zarr", "--torch-threads", "0"], ["--torch-threads 0"]),
    (["train", "cube.zarr", "--loader-workers", "-1"], ["--loader-workers -1"]),
    (["train", "cube.zarr", "--scale", "3"], ["--scale 3", "1, 2 or 4"]),
    (["train", "cube.zarr", "--scale", "3", "--crop", "36"], ["--scale 3"]),
    (["train", "cube.zarr", "--class-weights", "bogus"], ["--class-weights bogus"]),
    (["train", "cube.zarr", "--loss", "focal"], ["--loss focal", "ce or ce+dice"]),
    (["train", "cube.zarr", "--foreground-windows", "1.5"], ["--foreground-windows 1.5"]),
    (["train", "cube.zarr", "--augment", "all"], ["--augment all", "none or photometric"]),
    (["train", "cube.zarr", "--nproc", "0"], ["--nproc 0"]),
    (["train", "cube.zarr", "--nproc", "3", "--batch-size", "4"], ["--batch-size 4", "--nproc"]),
    (["train", "cube.zarr", "--width", "0"], ["--width 0"]),
    (["train", "cube.zarr", "--depth", "0"], ["--depth 0"]),
    (["train", "cube.zarr", "--w-sr", "-1"], ["--w-sr -1"]),
    (["train", "cube.zarr", "--psf-sigma", "-1"], ["--psf-sigma -1"]),
    (["train", "cube.zarr", "--noise", "-0.5"], ["--noise -0.5"]),
    (["train", "cube.zarr", "--val-every", "0"], ["--val-every 0"]),
    (["train", "cube.zarr", "--checkpoint-every", "0"], ["--checkpoint-every 0"]),
    (["train", "cube.zarr", "--seed", "-1"], ["--seed -1"]),
    (["train", "cube.zarr", "--amp", "fp8"], ["--amp fp8", "off, bf16, fp16 or auto"]),
    (["evaluate", "model", "cube.zarr", "--region", "bogus"], ["--region bogus", "val"]),
    (["segment", "cube.zarr", "--model", "m", "--threads", "0"], ["--threads 0"]),
    (["segment", "cube.zarr", "--model", "m", "--workers", "0"], ["--workers 0"]),
    (["segment", "cube.zarr", "--model", "m", "--torch-threads", "0"], ["--torch-threads 0"]),
    (["segment", "cube.zarr", "--model", "m", "--batch", "0"], ["--batch 0"]),
    (["segment", "cube.zarr", "--model", "m", "--halo", "-1"], ["--halo -1"]),
    (["segment", "cube.zarr", "--model", "m", "--partition", "0"], ["--partition 0"]),
    (
        ["diff", "labels.zarr", "--before", "0", "--after", "1", "--min-confidence", "2"],
        ["--min-confidence 2", "0..1"],
    ),
    (
        ["diff", "labels.zarr", "--before", "0", "--after", "1", "--min-area", "-1"],
        ["--min-area -1"],
    ),
    (["craters", "labels.zarr", "--min-diameter", "-1"], ["--min-diameter -1"]),
    (["synth", "--size", "64"], ["--size", "96"]),
    (["synth", "--gsd", "-1"], ["--gsd"]),
    (["demo", "--steps", "0"], ["--steps 0"]),
    (["demo", "--workers", "0"], ["--workers 0"]),
    (["demo", "--size", "200"], ["--size 200", "256"]),
]


@pytest.mark.parametrize(("args", "words"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_argument_is_one_line_exit_2_and_leaves_nothing(
    args: list[str], words: list[str], world_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = [a.replace("{world}", str(world_dir)) for a in args]
    if command[0] != "search":
        command += ["--out", str(out)]
    start = time.perf_counter()
    proc = planetseg(*command, timeout=FAST)
    assert time.perf_counter() - start < FAST
    assert_one_line_error(proc, *words)
    assert proc.returncode == 2
    assert "Dask dashboard" not in proc.stdout  # refused before any cluster started
    assert not out.exists()


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (TrainConfig, {"out": "x", "steps": -5}, "--steps -5"),
        (TrainConfig, {"out": "x", "scale": 3, "crop": 36}, "--scale 3"),
        (TrainConfig, {"out": "x", "threads": 0}, "--torch-threads 0"),
        (IngestConfig, {"out": "x", "resampling": "bogus"}, "--resampling bogus"),
        (IngestConfig, {"out": "x", "resolution": float("nan")}, "--resolution nan"),
        (ClusterConfig, {"workers": 0}, "--workers 0"),
        (SegmentConfig, {"out": "x", "model": "m", "threads": 0}, "--torch-threads 0"),
        (
            DiffConfig,
            {"out": "x", "before": "0", "after": "1", "min_area_m2": -1.0},
            "--min-area -1",
        ),
        (CratersConfig, {"out": "x", "min_diameter_px": -1.0}, "--min-diameter -1"),
        (SearchConfig, {"catalog": "x", "timeout": 0}, "--timeout 0"),
        (DemoConfig, {"out": "x", "steps": 0}, "--steps 0"),
    ],
)
def test_a_config_built_in_python_is_checked_the_same_way(
    config: type, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=f"^{message}: "):
        config(**kwargs)


def test_diff_names_before_and_after(labels: Path, tmp_path: Path) -> None:
    out = tmp_path / "change"
    for flag, other in (("--before", "--after"), ("--after", "--before")):
        proc = planetseg(
            "diff", str(labels), flag, "2010", other, "0", "--out", str(out), timeout=FAST
        )
        assert_one_line_error(proc, f"{flag} 2010 matches several time step")
        assert "--time" not in proc.stderr
        assert not out.exists()
    proc = planetseg("diff", str(labels), "--before", "7", "--after", "0", "--out", str(out))
    assert_one_line_error(proc, "--before 7: time index 7 is out of range")
    assert not out.exists()
    proc = planetseg("craters", str(labels), "--time", "2010", "--out", str(tmp_path / "c.csv"))
    assert_one_line_error(proc, "--time 2010 matches several")


def test_spatial_split_takes_every_width_of_two_windows() -> None:
    split = spatial_split(608, 0.25, multiple=128)  # 456 rounds to 512: a 96 px strip is short
    assert (split.train, split.val) == (slice(0, 384), slice(384, 608))
    # Widths the old rounding accepted keep their split (evaluate recomputes it from the card).
    assert spatial_split(1024, 0.25, multiple=128).val == slice(768, 1024)
    assert spatial_split(256, 0.25, multiple=32).val == slice(192, 256)
    with pytest.raises(InvalidArgumentError, match="255 px wide.*--crop 128.*256 px"):
        spatial_split(255, 0.25, multiple=128)


@pytest.mark.slow
def test_a_608_px_cube_trains_with_128_px_windows(tmp_path: Path) -> None:
    world = synthesize(tmp_path / "world", config=SynthConfig(size=608, seed=2))
    cube = tmp_path / "cube.zarr"
    ingest(world.items, IngestConfig(out=str(cube), labels="labels", tile=304))
    run = tmp_path / "run"
    proc = planetseg("train", str(cube), "--out", str(run), "--crop", "128", "--steps", "1", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert (run / "model" / "model.json").exists()


def test_tile_larger_than_the_workers_memory_is_refused_up_front(
    world_dir: Path, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    from planetseg.search import search

    items = search(SearchConfig(catalog=str(world_dir))).items
    store = tmp_path / "cube.zarr"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, memory_limit="100KiB"
        ) as cluster,
        Client(cluster) as client,
        # (a uint8 cube without nodata is read as int16, to tell the pixels no item covers)
        pytest.raises(InvalidArgumentError, match=r"^--tile 128: .* use --tile 80 or less"),
    ):
        ingest(items, IngestConfig(out=str(store), tile=128, labels="labels"), client=client)
    assert not store.exists()


@pytest.fixture(scope="module")
def labels(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared LR cube segmented with the shared model (three epochs)."""
    out = tmp_path_factory.mktemp("labels") / "labels.zarr"
    segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"])))
    return out


@pytest.fixture(scope="module")
def tiny_run(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-step run (width 8, depth 2, crop 32) on the shared HR cube."""
    run = tmp_path_factory.mktemp("resume") / "run"
    train(
        world["hr"],
        TrainConfig(out=str(run), steps=1, width=8, depth=2, crop=32, batch_size=4),
    )
    return run


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (["--width", "16"], ["--width 8, not --width 16"]),
        (["--scale", "4"], ["--scale 2, not --scale 4"]),
        (["--depth", "3"], ["--depth 2, not --depth 3"]),
        (["--no-sr"], ["no --no-sr, not --no-sr"]),
    ],
)
def test_resume_with_other_network_settings_names_the_runs(
    change: list[str], words: list[str], world: dict[str, Path], tiny_run: Path
) -> None:
    settings = {"--width": "8", "--depth": "2", "--crop": "32", "--batch-size": "4"}
    for flag, value in zip(change[::2], change[1::2], strict=False):
        settings[flag] = value
    args = [x for kv in settings.items() for x in kv] + [c for c in change if c == "--no-sr"]
    before = (tiny_run / CHECKPOINT).read_bytes()
    proc = planetseg(
        "train", str(world["hr"]), "--out", str(tiny_run), "--steps", "2", "--resume", *args
    )
    assert_one_line_error(proc, "--resume", *words)
    assert proc.returncode == 2
    assert (tiny_run / CHECKPOINT).read_bytes() == before


def test_resume_of_a_checkpoint_without_settings_checks_the_weights(
    world: dict[str, Path], tiny_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "old"
    run.mkdir()
    state = torch.load(tiny_run / CHECKPOINT, weights_only=True)
    del state["config"], state["bands"]  # as written before checkpoints recorded them
    torch.save(state, run / CHECKPOINT)
    proc = planetseg(
        "train", str(world["hr"]), "--out", str(run), "--resume", "--steps", "2",
        "--width", "16", "--depth", "2", "--crop", "32", "--batch-size", "4",
    )  # fmt: skip
    assert_one_line_error(proc, "--resume", "--width")
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT]


def test_segment_checks_the_model_digest_before_creating_anything(
    world: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    weights = bytearray((model / WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF
    (model / WEIGHTS).write_bytes(bytes(weights))
    out = tmp_path / "labels.zarr"
    proc = planetseg("segment", str(world["lr"]), "--model", str(model), "--out", str(out))
    assert_one_line_error(proc, "digest", WEIGHTS)
    assert "Dask dashboard" not in proc.stdout
    assert not out.exists()
