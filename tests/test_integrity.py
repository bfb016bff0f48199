"""Data integrity: lost and damaged chunks, scene times, copied worlds, corrupt TIFFs,
consolidated metadata and ``planetseg info``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from planetseg.config import DiffConfig, IngestConfig, SearchConfig, SegmentConfig
from planetseg.data import open_training_data
from planetseg.diff import diff
from planetseg.errors import StoreCorruptError
from planetseg.ingest import ingest, plan_ingest
from planetseg.items import read_items
from planetseg.search import search
from planetseg.segment import segment
from planetseg.store import get_attr, open_for_writing
from planetseg.synthetic import SynthConfig, synthesize
from tests.test_cli import assert_one_line_error, planetseg

LOST = "image/c/1/0/1/0"  # time step 1, tile row 0, column 1 of a 2 x 2-tile cube


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _chunk_hashes(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "/c/" in str(p.relative_to(store)).replace(os.sep, "/")
    }


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="module")
def labels_store(world: dict[str, Path]) -> Path:
    """The LR cube segmented by the world's model (complete)."""
    out = world["root"] / "integrity-labels.zarr"
    if not out.exists():
        segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"])))
    return out


# --------------------------------------------------------------------------- lost chunks


def test_every_chunk_is_written_even_all_fill(world: dict[str, Path], tmp_path: Path) -> None:
    # A chunk equal to the fill value would be skipped by zarr: then "missing" could not
    # tell lost data from an empty tile. planetseg's writers write them all.
    store = tmp_path / "fill.zarr"
    zarr.create_array(str(store), name="a", shape=(4, 4), chunks=(2, 2), dtype="uint8")
    open_for_writing(store, "a")[:] = 0  # all fill
    assert zarr.open_array(str(store), path="a", mode="r").nchunks_initialized == 4
    for name in ("image", "labels"):
        array = zarr.open_array(str(world["hr"]), path=name, mode="r")
        assert array.nchunks_initialized == array.nchunks, name


@pytest.mark.slow
def test_lost_chunk_stops_train_evaluate_and_segment(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cube = _copy(world["hr"], tmp_path / "hr.zarr")
    before = _chunk_hashes(cube)
    (cube / LOST).unlink()

    run = tmp_path / "run"
    proc = planetseg("train", str(cube), "--out", str(run), "--steps", "1", "--crop", "32")
    assert_one_line_error(proc, str(cube), LOST, "missing", "re-run the ingest")
    assert not run.exists()

    scores = tmp_path / "scores.json"
    proc = planetseg("evaluate", str(world["model"]), str(cube), "--out", str(scores))
    assert_one_line_error(proc, str(cube), LOST, "missing")
    assert not scores.exists()

    lr = _copy(world["lr"], tmp_path / "lr.zarr")
    (lr / "image/c/2/0/3/1").unlink()
    labels = tmp_path / "labels.zarr"
    proc = planetseg(
        "segment", str(lr), "--model", str(world["model"]), "--out", str(labels),
        "--cluster", "local", "--workers", "1",
    )  # fmt: skip
    assert_one_line_error(proc, str(lr), "image/c/2/0/3/1", "missing")
    assert not get_attr(labels, "planetseg:complete")  # nothing passes for finished

    # Re-running the ingest that wrote the cube repairs it: only the lost tile is rewritten.
    proc = planetseg(
        "ingest", str(world["items"]), "--out", str(cube), "--labels", "labels", "--tile", "128",
        "--cluster", "none",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 written, 11 kept" in proc.stdout
    assert _chunk_hashes(cube) == before
    assert get_attr(cube, "planetseg:complete")


def test_truncated_chunk_is_one_line_naming_it(world: dict[str, Path], tmp_path: Path) -> None:
    cube = _copy(world["hr"], tmp_path / "hr.zarr")
    _truncate(cube / "labels/c/2/1/1")
    proc = planetseg("evaluate", str(world["model"]), str(cube))
    assert_one_line_error(proc, str(cube), "labels/c/2/1/1", "cannot be decoded", "delete")
    with pytest.raises(StoreCorruptError, match="labels/c/2/1/1"):
        open_training_data([cube], crop=32, val_fraction=0.25)  # its statistics read every chunk


def test_lost_labels_chunk_stops_products_and_segment_repairs_it(
    world: dict[str, Path], labels_store: Path, tmp_path: Path
) -> None:
    store = _copy(labels_store, tmp_path / "labels.zarr")
    before = _chunk_hashes(store)
    (store / "labels/c/1/0/1").unlink()
    out = tmp_path / "craters.parquet"
    proc = planetseg("craters", str(store), "--out", str(out))
    assert_one_line_error(proc, str(store), "labels/c/1/0/1", "missing", "re-run the segment")
    assert not out.exists()
    change = tmp_path / "change"
    proc = planetseg("diff", str(store), "--before", "0", "--after", "1", "--out", str(change))
    assert_one_line_error(proc, "labels/c/1/0/1")
    assert not change.exists()

    result = segment(world["lr"], SegmentConfig(out=str(store), model=str(world["model"])))
    assert result.computed == 4  # one task of 4 tiles: the lost one's
    assert _chunk_hashes(store) == before
    assert get_attr(store, "planetseg:complete")


# --------------------------------------------------------------------------- scene times


def _cog(path: Path, *, tag: str | None = None) -> Path:
    profile = dict(
        driver="GTiff", width=32, height=32, count=1, dtype="uint8", crs="IAU_2015:30110",
        transform=from_origin(0.0, 30_000.0, 10.0, 10.0),
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((1, 32, 32), "uint8"))
        if tag:
            dst.update_tags(TIFFTAG_DATETIME=tag)
    os.utime(path, (1_700_000_000, 1_700_000_000))  # copied the same day: one mtime
    return path


def test_cog_folder_times_come_from_the_files_not_mtime(tmp_path: Path) -> None:
    folder = tmp_path / "scenes"
    folder.mkdir()
    _cog(folder / "scene_2014-03-01.tif")
    _cog(folder / "scene_20150702T101500.tif")
    _cog(folder / "scene_b.tif", tag="2016:01:02 03:04:05")
    found = search(SearchConfig(catalog=str(folder)))
    when = {it["id"]: it["properties"]["datetime"] for it in found.items}
    assert when == {
        "scene_2014-03-01": "2014-03-01T00:00:00Z",
        "scene_20150702T101500": "2015-07-02T10:15:00Z",
        "scene_b": "2016-01-02T03:04:05Z",
    }
    plan = plan_ingest(found.items, IngestConfig(out=str(tmp_path / "c.zarr"), tile=16))
    assert len(plan.times) == 3  # three epochs, not one "day of copying"


def test_cog_without_time_is_one_line_saying_how(tmp_path: Path) -> None:
    folder = tmp_path / "scenes"
    folder.mkdir()
    _cog(folder / "M1234567890LE.tif")  # an orbit number, not a date
    out = tmp_path / "items.ndjson"
    proc = planetseg("search", "--catalog", str(folder), "--out", str(out))
    assert_one_line_error(proc, "M1234567890LE.tif", "TIFFTAG_DATETIME", "name", "items file")
    assert not out.exists()


# --------------------------------------------------------------------------- copied world


def test_copied_world_reads_its_own_files(tmp_path: Path) -> None:
    original = synthesize(tmp_path / "world", config=SynthConfig(size=128, seed=3)).root
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    items = tmp_path / "items.ndjson"
    proc = planetseg("search", "--catalog", str(copy), "--out", str(items))
    assert proc.returncode == 0, proc.stderr
    for item in read_items(items):
        for asset in item["assets"].values():
            assert Path(asset["href"]).parent == copy.resolve()
    cube = tmp_path / "cube.zarr"
    proc = planetseg("ingest", str(copy), "--out", str(cube), "--tile", "64", "--cluster", "none")
    assert proc.returncode == 0, proc.stderr
    assert get_attr(cube, "planetseg:complete")


# --------------------------------------------------------------------------- corrupt TIFF


@pytest.mark.parametrize("cluster", ["none", "local"])
def test_corrupt_tiff_whose_header_opens_is_one_line(
    world: dict[str, Path], tmp_path: Path, cluster: str
) -> None:
    copy = _copy(Path(world["items"]).parent, tmp_path / "world")
    _truncate(copy / "image-e01.tif", 0.6)
    with rasterio.open(copy / "image-e01.tif"):
        pass  # the header still opens
    cube = tmp_path / "cube.zarr"
    proc = planetseg(
        "ingest", str(copy), "--out", str(cube), "--tile", "128", "--cluster", cluster,
        "--workers", "1",
    )  # fmt: skip
    assert_one_line_error(proc, str(copy / "image-e01.tif"), "--fill-missing")
    assert not get_attr(cube, "planetseg:complete")


# --------------------------------------------------------------------------- consolidated


def test_stores_open_without_consolidation_warning(
    world: dict[str, Path], labels_store: Path, tmp_path: Path
) -> None:
    import xarray as xr

    items = read_items(world["items"])
    cube = tmp_path / "cube.zarr"
    ingest(items[:2], IngestConfig(out=str(cube), tile=128))
    ingest(items, IngestConfig(out=str(cube), tile=128))  # appended: consolidated again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for store in (world["hr"], world["lr"], labels_store, cube):
            xr.open_zarr(store).close()
        assert xr.open_zarr(cube, consolidated=True).sizes["time"] == 3


# --------------------------------------------------------------------------- info


@pytest.mark.slow
def test_info_on_each_kind(world: dict[str, Path], labels_store: Path, tmp_path: Path) -> None:
    proc = planetseg("info", str(world["hr"]), "--json", "--verify")
    assert proc.returncode == 0, proc.stderr
    cube = json.loads(proc.stdout)
    assert cube["kind"] == "cube" and cube["complete"] is True
    assert cube["shape"] == {"time": 3, "band": 1, "y": 256, "x": 256}
    assert cube["crs_code"] == "IAU_2015:30110" and cube["body"] == "moon"
    assert cube["resolution"] == [0.5, 0.5] and cube["bands"] == ["image"]
    assert len(cube["times"]) == 3 and cube["labels"] is True
    assert cube["verify"]["image"]["count"] == 0 and cube["verify"]["labels"]["count"] == 0

    proc = planetseg("info", str(labels_store))
    assert proc.returncode == 0, proc.stderr
    card = json.loads((world["model"] / "model.json").read_text())
    assert "planetseg labels" in proc.stdout and card["digest"] in proc.stdout

    proc = planetseg("info", str(world["model"]), "--json")
    model = json.loads(proc.stdout)
    assert model["kind"] == "model" and model["model_digest"] == card["digest"]

    change = tmp_path / "change"
    diff(labels_store, DiffConfig(out=str(change), before="0", after="2"))
    proc = planetseg("info", str(change), "--json")
    info = json.loads(proc.stdout)
    assert info["kind"] == "change" and info["complete"] is True and info["body"] == "moon"

    # An unfinished store says what is missing; --verify lists the lost chunks.
    unfinished = _copy(world["hr"], tmp_path / "hr.zarr")
    (unfinished / LOST).unlink()
    zarr.open_group(str(unfinished), mode="r+").attrs.update(
        {"planetseg:complete": False, "planetseg:times_done": 0}  # as if killed early
    )
    info = json.loads(planetseg("info", str(unfinished), "--json", "--verify").stdout)
    assert info["complete"] is False and info["missing_tiles"]["count"] == 12
    assert info["verify"]["image"] == {"count": 1, "first": [LOST]}

    proc = planetseg("info", str(tmp_path))
    assert_one_line_error(proc, "not a planetseg store")
