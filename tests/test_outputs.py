"""Outputs: planetseg never deletes or overwrites what it did not write, nor writes into inputs.

Every test runs the user's command with the real console script and checks the exit code, the
one-line error, that the user's files are still there byte for byte, and that no half output
is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planetseg.config import SegmentConfig
from planetseg.errors import OutputPathError
from planetseg.items import read_items, write_items
from planetseg.segment import segment
from planetseg.store import create_owned_dir, owner, remove_owned
from tests.test_cli import assert_one_line_error, planetseg
from tests.test_search import BBOX, DATETIME, EXPECTED, grid_items

USER_FILES = {"notes.txt": b"chapter 1: craters\n", "data/table.csv": b"a,b\n1,2\n"}


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's (two files, one in a subfolder); returns its snapshot."""
    for name, data in USER_FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return snapshot(path)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def labels(world: dict[str, Path]) -> Path:
    """A complete labels store of the session's tiny world (shared with test_products)."""
    out = world["root"] / "products-labels.zarr"
    if not out.exists():
        segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"])))
    return out


def diff_args(labels: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("diff", str(labels), "--before", "0", "--after", "2", "--out", str(out), *extra)


def segment_args(world: dict[str, Path], out: Path, *extra: str) -> tuple[str, ...]:
    model = str(world["model"])
    return ("segment", str(world["lr"]), "--model", model, "--out", str(out), *extra)


# --------------------------------------------------------------------------- diff


def test_diff_refuses_an_existing_user_folder(labels: Path, tmp_path: Path) -> None:
    thesis = tmp_path / "mythesis"
    before = user_folder(thesis)
    for extra in ((), ("--overwrite",)):
        proc = planetseg(*diff_args(labels, thesis, *extra))
        assert_one_line_error(proc, str(thesis), "not written by planetseg diff")
        assert proc.returncode == 2
        assert snapshot(thesis) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mythesis"]  # no .partial left


def test_diff_never_writes_into_its_input(labels: Path, world: dict[str, Path]) -> None:
    before = snapshot(labels)
    for out, why in (
        (labels, "is also an input"),
        (labels / "change", "inside the input"),
        (world["root"], "holds the input"),
    ):
        proc = planetseg(*diff_args(labels, out))
        assert_one_line_error(proc, why)
    assert snapshot(labels) == before
    assert not (labels / "change").exists()
    assert not list(world["root"].parent.glob("*.partial"))


def test_diff_replaces_its_own_output_only_with_overwrite(labels: Path, tmp_path: Path) -> None:
    out = tmp_path / "change"
    out.mkdir()  # an empty folder made for the product is fine
    first = planetseg(*diff_args(labels, out))
    assert first.returncode == 0, first.stderr
    assert owner(out) == "diff" and (out / "change.tif").is_file()
    written = snapshot(out)
    again = planetseg(*diff_args(labels, out))
    assert_one_line_error(again, str(out), "--overwrite")
    assert snapshot(out) == written
    replaced = planetseg(*diff_args(labels, out, "--min-confidence", "0.9", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "change.tif").is_file() and snapshot(out) != written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["change"]


def test_diff_keeps_a_user_folder_named_like_its_staging(labels: Path, tmp_path: Path) -> None:
    out = tmp_path / "change"
    partial = tmp_path / "change.partial"
    before = user_folder(partial)
    proc = planetseg(*diff_args(labels, out))
    assert_one_line_error(proc, str(partial), "not written by planetseg diff")
    assert snapshot(partial) == before
    assert not out.exists()


def test_diff_out_dot_is_one_line(labels: Path, tmp_path: Path) -> None:
    before = user_folder(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "planetseg.cli", *diff_args(labels, Path("."))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "--out .", "current folder")
    assert snapshot(tmp_path) == before
    assert not tmp_path.with_name(tmp_path.name + ".partial").exists()


# --------------------------------------------------------------------------- craters


def test_craters_never_overwrites_the_reference(
    labels: Path, world: dict[str, Path], tmp_path: Path
) -> None:
    reference = tmp_path / "ref.csv"
    shutil.copy(world["root"] / "world" / "craters.csv", reference)
    before = snapshot(tmp_path)
    proc = planetseg("craters", str(labels), "--out", str(reference), "--reference", str(reference))
    assert_one_line_error(proc, str(reference), "is also an input")
    inside = labels / "craters.parquet"
    proc = planetseg("craters", str(labels), "--out", str(inside), "--reference", str(reference))
    assert_one_line_error(proc, "inside the input")
    assert not inside.exists()
    assert snapshot(tmp_path) == before  # no ref.items.ndjson, no ref.scores.json either


@pytest.mark.slow
def test_craters_replaces_its_own_catalog_only_with_overwrite(
    labels: Path, world: dict[str, Path], tmp_path: Path
) -> None:
    reference = str(world["root"] / "world" / "craters.csv")
    mine = tmp_path / "mine.csv"
    mine.write_bytes(b"lon,lat,diameter_km\n1,2,3\n")
    for extra in ((), ("--overwrite",)):
        proc = planetseg("craters", str(labels), "--out", str(mine), *extra)
        assert_one_line_error(proc, str(mine), "not written by planetseg craters")
    beside = tmp_path / "cat.items.ndjson"  # a user file where craters puts its STAC item
    beside.write_bytes(b"{}\n")
    proc = planetseg("craters", str(labels), "--out", str(tmp_path / "cat.parquet"))
    assert_one_line_error(proc, str(beside), "not written by planetseg craters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.items.ndjson", "mine.csv"]
    assert mine.read_bytes() == b"lon,lat,diameter_km\n1,2,3\n" and beside.read_bytes() == b"{}\n"

    out = tmp_path / "craters.parquet"
    args = ("craters", str(labels), "--out", str(out), "--reference", reference)
    first = planetseg(*args)
    assert first.returncode == 0, first.stderr
    written = {p.name: p.read_bytes() for p in tmp_path.glob("craters.*")}
    assert set(written) == {"craters.parquet", "craters.scores.json", "craters.items.ndjson"}
    again = planetseg(*args)
    assert_one_line_error(again, str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("craters.*")} == written
    # --overwrite without --reference: the earlier scores no longer describe the catalog
    replaced = planetseg("craters", str(labels), "--out", str(out), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert {p.name for p in tmp_path.glob("craters.*")} == {
        "craters.parquet",
        "craters.items.ndjson",
    }


# --------------------------------------------------------------------------- ingest, segment


def test_a_user_folder_named_like_the_progress_folder_is_kept(
    world: dict[str, Path], tmp_path: Path
) -> None:
    for command, out in (
        (("ingest", str(world["items"]), "--out"), tmp_path / "cube.zarr"),
        (segment_args(world, tmp_path / "labels.zarr")[:-1], tmp_path / "labels.zarr"),
    ):
        progress = out.with_name(out.name + ".progress")
        before = user_folder(progress)
        proc = planetseg(*command, str(out), "--cluster", "none")
        assert_one_line_error(proc, str(progress), "not written by planetseg")
        assert snapshot(progress) == before
        assert not out.exists()


def test_markers_left_without_their_store_are_dropped(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cube.zarr"
    progress = create_owned_dir(out.with_name("cube.zarr.progress"), "ingest")
    (progress / "t0-0-0").touch()  # a killed ingest's marker; its store was deleted since
    proc = planetseg("ingest", str(world["items"]), "--out", str(out), "--cluster", "none")
    assert proc.returncode == 0, proc.stderr
    assert "tiles: 3 written, 0 kept" in proc.stdout
    assert not progress.exists()


@pytest.mark.parametrize("stage", ["ingest", "segment", "synth", "demo", "train"])
def test_a_foreign_output_folder_is_refused(
    stage: str, world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    before = user_folder(out)
    args = {
        "ingest": ("ingest", str(world["items"]), "--out", str(out), "--cluster", "none"),
        "segment": (*segment_args(world, out), "--cluster", "none"),
        "synth": ("synth", "--out", str(out), "--size", "128"),
        "demo": ("demo", "--out", str(out), "--size", "256", "--cluster", "none"),
        "train": ("train", str(world["hr"]), "--out", str(out), "--steps", "1", "--crop", "32"),
    }[stage]
    proc = planetseg(*args)
    assert_one_line_error(proc, str(out), f"not written by planetseg {stage}")
    assert proc.returncode == 2
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_labels_store_is_not_a_cube(world: dict[str, Path], labels: Path) -> None:
    before = snapshot(labels)
    proc = planetseg("ingest", str(world["items"]), "--out", str(labels), "--cluster", "none")
    assert_one_line_error(proc, "holds planetseg segment output, not ingest's")
    assert snapshot(labels) == before


# --------------------------------------------------------------------------- paths


@pytest.mark.slow
def test_an_output_that_is_a_file_is_one_line(
    world: dict[str, Path], labels: Path, tmp_path: Path
) -> None:
    path = tmp_path / "report.txt"
    path.write_bytes(b"my report\n")
    for args in (
        ("ingest", str(world["items"]), "--out", str(path), "--cluster", "none"),
        (*segment_args(world, path), "--cluster", "none"),
        (*segment_args(world, tmp_path / "l.zarr"), "--cog", str(path), "--cluster", "none"),
        diff_args(labels, path),
        ("synth", "--out", str(path), "--size", "128"),
        ("demo", "--out", str(path), "--size", "256", "--cluster", "none"),
        ("train", str(world["hr"]), "--out", str(path), "--steps", "1", "--crop", "32"),
    ):
        proc = planetseg(*args)
        assert_one_line_error(proc, str(path), "is a file, not a folder")
    assert path.read_bytes() == b"my report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


@pytest.mark.slow
def test_evaluate_out_a_folder_or_a_user_file_is_one_line(
    world: dict[str, Path], tmp_path: Path
) -> None:
    before = user_folder(tmp_path / "scores")
    notes = tmp_path / "notes.json"
    notes.write_bytes(b'{"title": "my notes"}\n')
    args = ("evaluate", str(world["model"]), str(world["hr"]), "--out")
    proc = planetseg(*args, str(tmp_path / "scores"))
    assert_one_line_error(proc, "is a folder: give a file name")
    proc = planetseg(*args, str(notes))
    assert_one_line_error(proc, str(notes), "not written by planetseg evaluate")
    assert snapshot(tmp_path / "scores") == before
    assert notes.read_bytes() == b'{"title": "my notes"}\n'
    scores = tmp_path / "scores.json"
    for _ in range(2):  # its own scores file is replaced
        proc = planetseg(*args, str(scores))
        assert proc.returncode == 0, proc.stderr
    assert json.loads(scores.read_text())["region"] == "all"


def test_an_output_under_a_file_is_one_line(labels: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_bytes(b"not a folder\n")
    out = blocker / "change"
    proc = planetseg(*diff_args(labels, out))
    assert_one_line_error(proc, "cannot be created", str(blocker), "is a file")
    proc = planetseg("craters", str(labels), "--out", str(out / "c.csv"))
    assert_one_line_error(proc, "cannot be created", str(blocker), "is a file")
    assert blocker.read_bytes() == b"not a folder\n"


#: Runs "$@" with the folder "$0" mounted read-only (in a mount namespace of its own).
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def read_only_runner(folder: Path) -> list[str]:
    """The command prefix under which ``folder`` is read-only, even for root; skip if none."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return [sys.executable]
    probe = ["unshare", "-m", "sh", "-c", READ_ONLY, str(folder), "true"]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("running as root without a mount namespace: nothing is read-only")
    return ["unshare", "-m", "sh", "-c", READ_ONLY, str(folder), sys.executable]


def test_a_read_only_folder_is_one_line(labels: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    runner = read_only_runner(locked)
    try:
        for args in (diff_args(labels, locked / "change"), ("synth", "--out", str(locked))):
            proc = subprocess.run(
                [*runner, "-m", "planetseg.cli", *args], capture_output=True, text=True, timeout=120
            )
            assert_one_line_error(proc, str(locked), "is not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_removal_is_only_of_marked_folders(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    before = user_folder(mine)
    with pytest.raises(OutputPathError, match="left alone"):
        remove_owned(mine, "diff")
    with pytest.raises(OutputPathError, match="not written by planetseg diff"):
        create_owned_dir(mine, "diff")
    assert snapshot(mine) == before
    ours = create_owned_dir(tmp_path / "ours", "diff")
    with pytest.raises(OutputPathError):
        remove_owned(ours, "segment")  # marked, but by another stage
    remove_owned(ours, "diff")
    assert not ours.exists()


def test_search_never_overwrites_its_catalog_or_a_user_file(tmp_path: Path) -> None:
    catalog = write_items(grid_items(), tmp_path / "items.ndjson")
    before = catalog.read_bytes()
    notes = tmp_path / "notes.json"
    notes.write_bytes(b'{"title": "my notes"}\n')
    args = ("search", "--catalog", str(catalog), "--bbox", BBOX, "--datetime", DATETIME)
    proc = planetseg(*args, "--out", str(catalog))
    assert_one_line_error(proc, str(catalog), "is also an input")
    proc = planetseg(*args, "--out", str(notes))
    assert_one_line_error(proc, str(notes), "not written by planetseg search")
    assert catalog.read_bytes() == before and notes.read_bytes() == b'{"title": "my notes"}\n'
    found = tmp_path / "found.parquet"
    for _ in range(2):  # an items file is what search writes: a re-run replaces it
        proc = planetseg(*args, "--out", str(found))
        assert proc.returncode == 0, proc.stderr
        assert [it["id"] for it in read_items(found)] == EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "found.parquet",
        "items.ndjson",
        "notes.json",
    ]
