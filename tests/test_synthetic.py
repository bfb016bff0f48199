from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from pyproj import CRS, Transformer

from planetseg.bodies import body_of_crs, get_body
from planetseg.errors import CRSError, InvalidArgumentError
from planetseg.items import read_items
from planetseg.synthetic import (
    CLASSES,
    CRATER_CLASSES,
    EpochSpec,
    LabelClass,
    SynthConfig,
    SynthWorld,
    render,
    synthesize,
)

# Small but crowded enough to have both classes and overlaps; generates in well under a second.
SMALL = SynthConfig(seed=3, size=256, crater_density=1500.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SynthWorld:
    return synthesize(tmp_path_factory.mktemp("small"), config=SMALL)


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthWorld, float]:
    start = time.perf_counter()
    world = synthesize(tmp_path_factory.mktemp("default"))
    return world, time.perf_counter() - start


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if not p.name.startswith(".")}


def disc(shape: tuple[int, int], row: float, col: float, diameter_px: float) -> np.ndarray:
    """Pixels whose centres lie within the rim, as the generator draws labels."""
    rows = np.arange(shape[0])[:, None] + 0.5
    cols = np.arange(shape[1])[None, :] + 0.5
    return np.hypot(rows - row, cols - col) <= diameter_px / 2


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(small: SynthWorld, tmp_path: Path) -> None:
    first = outputs(small.root)
    assert set(first) == {
        "collection.json",
        "items.ndjson",
        "craters.csv",
        "image-e00.tif",
        "image-e01.tif",
        "image-e02.tif",
        "labels-e00.tif",
        "labels-e01.tif",
        "labels-e02.tif",
    }
    # Regenerating in place gives the same bytes, and so does any other directory: the item
    # hrefs are relative to the items file.
    synthesize(small.root, config=SMALL)
    assert outputs(small.root) == first
    assert outputs(synthesize(tmp_path / "again", config=SMALL).root) == first


def test_files_hold_what_render_computes(small: SynthWorld) -> None:
    scene = render(SMALL)
    for k in range(len(SMALL.epochs)):
        np.testing.assert_array_equal(read(small.images[k]), scene.images[k])
        np.testing.assert_array_equal(read(small.labels[k]), scene.labels[k])
    catalog = pd.read_csv(small.craters)
    np.testing.assert_allclose(catalog["diameter_px"], scene.craters["diameter_px"], atol=1e-4)


def test_different_seeds_differ() -> None:
    a = render(SMALL)
    b = render(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(a.images[0], b.images[0])
    assert not np.array_equal(a.labels[0], b.labels[0])
    assert not a.craters[["row", "col"]].equals(b.craters[["row", "col"]])


# --- ground truth --------------------------------------------------------------------------


def test_catalog_craters_are_in_their_epochs_labels(small: SynthWorld) -> None:
    catalog = pd.read_csv(small.craters)
    labels = [read(p) for p in small.labels]
    assert set(catalog["class"]) == {"fresh", "degraded"}
    for crater in catalog.rename(columns={"class": "kind"}).itertuples():
        value = CRATER_CLASSES[crater.kind]
        mask = disc(labels[0].shape, crater.row, crater.col, crater.diameter_px)
        centre = (int(np.floor(crater.row)), int(np.floor(crater.col)))
        for k, lab in enumerate(labels):
            if k >= crater.epoch:
                assert lab[centre] == value, (crater.id, k)
                assert (lab[mask] == value).mean() > 0.5, (crater.id, k)
            else:
                # Before it appears its ground is bare terrain.
                assert set(np.unique(lab[mask])) <= {LabelClass.PLAINS, LabelClass.HIGHLANDS}


def test_new_craters_appear_only_in_their_epoch(small: SynthWorld) -> None:
    catalog = pd.read_csv(small.craters)
    per_epoch = catalog.groupby("epoch").size().to_dict()
    assert per_epoch.keys() == {0, 2}
    assert per_epoch[2] == SMALL.epochs[2].new_craters == 12
    assert (catalog.loc[catalog["epoch"] == 2, "class"] == "fresh").mean() >= 0.5
    e1, e2 = read(small.labels[1]), read(small.labels[2])
    new = np.zeros(e1.shape, dtype=bool)
    for crater in catalog[catalog["epoch"] == 2].itertuples():
        new |= disc(e1.shape, crater.row, crater.col, crater.diameter_px)
    changed = e1 != e2
    assert changed.any()
    assert not (changed & ~new).any()


def test_sun_only_epoch_changes_image_not_labels(small: SynthWorld) -> None:
    np.testing.assert_array_equal(read(small.labels[0]), read(small.labels[1]))
    a, b = read(small.images[0]).astype(float), read(small.images[1]).astype(float)
    assert np.abs(a - b).mean() > 5


def test_labels_cover_all_classes(small: SynthWorld) -> None:
    values = set(np.unique(read(small.labels[0])).tolist())
    assert values == set(CLASSES) == {0, 1, 2, 3}
    assert small.classes == {0: "plains", 1: "highlands", 2: "fresh_crater", 3: "degraded_crater"}


# --- files and metadata --------------------------------------------------------------------


def test_rasters_are_cogs_on_the_requested_grid(small: SynthWorld) -> None:
    requested = CRS.from_user_input(SMALL.crs)
    for path in (*small.images, *small.labels):
        with rasterio.open(path) as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG", path
            assert src.profile["tiled"] and src.overviews(1), path
            assert src.compression.name == "deflate"
            assert (src.count, src.dtypes[0], src.nodata) == (1, "uint8", None)
            assert src.shape == (SMALL.size, SMALL.size)
            assert src.transform.a == SMALL.gsd and src.transform.e == -SMALL.gsd
            crs = CRS.from_wkt(src.crs.to_wkt())
            assert crs.equals(requested)
            assert crs.to_authority() == ("IAU_2015", "30110")
            assert body_of_crs(crs) is get_body("moon")
            # The scene is centred on the requested point.
            to_lonlat = Transformer.from_crs(crs, get_body("moon").crs, always_xy=True)
            lon, lat = to_lonlat.transform(*src.xy(SMALL.size / 2, SMALL.size / 2, offset="ul"))
            assert lon == pytest.approx(SMALL.center_lon, abs=1e-4)
            assert lat == pytest.approx(SMALL.center_lat, abs=1e-4)


def test_items_and_collection(small: SynthWorld) -> None:
    items = read_items(small.items)
    assert [it["id"] for it in items] == list(small.item_ids)
    assert small.collection_id == "synthetic-moon" and small.body == "moon"
    for k, (item, epoch) in enumerate(zip(items, SMALL.epochs, strict=True)):
        props = item["properties"]
        assert item["collection"] == "synthetic-moon"
        assert props["proj:code"] == "IAU_2015:30110"
        assert CRS.from_wkt(props["proj:wkt2"]).equals(CRS.from_user_input(SMALL.crs))
        assert props["datetime"] == epoch.datetime.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert props["view:sun_azimuth"] == epoch.sun_azimuth
        assert props["view:sun_elevation"] == epoch.sun_elevation
        assert props["gsd"] == SMALL.gsd and props["planetseg:epoch"] == k
        assert item["assets"]["image"]["roles"] == ["data"]
        assert item["assets"]["labels"]["roles"] == ["labels"]
        assert Path(item["assets"]["image"]["href"]) == small.images[k]
        assert Path(item["assets"]["labels"]["href"]) == small.labels[k]
        west, south, east, north = item["bbox"]
        # 256 px x 0.5 m on a 1737.4 km Moon is ~0.0042 degrees across.
        assert west < SMALL.center_lon < east and south < SMALL.center_lat < north
        assert 0.003 < east - west < 0.006 and 0.003 < north - south < 0.006
    collection = json.loads(small.collection.read_text())
    assert collection["id"] == "synthetic-moon" and collection["type"] == "Collection"
    classes = collection["summaries"]["classification:classes"]
    assert {c["value"]: c["name"] for c in classes} == small.classes
    assert collection["summaries"]["gsd"] == [SMALL.gsd]
    assert collection["extent"]["spatial"]["bbox"] == [items[0]["bbox"]]
    assert collection["extent"]["temporal"]["interval"] == [
        [items[0]["properties"]["datetime"], items[-1]["properties"]["datetime"]]
    ]
    assert set(collection["item_assets"]) == {"image", "labels"}


def test_catalog_columns_and_coordinates(small: SynthWorld) -> None:
    catalog = pd.read_csv(small.craters)
    assert list(catalog.columns) == [
        "id",
        "lon",
        "lat",
        "diameter_km",
        "class",
        "epoch",
        "x",
        "y",
        "row",
        "col",
        "diameter_px",
    ]
    np.testing.assert_allclose(
        catalog["diameter_km"], catalog["diameter_px"] * SMALL.gsd / 1000, atol=1e-7
    )
    with rasterio.open(small.images[0]) as src:
        xs, ys = src.transform @ (catalog["col"].to_numpy(), catalog["row"].to_numpy())
        crs = CRS.from_wkt(src.crs.to_wkt())
    np.testing.assert_allclose(catalog["x"], xs, atol=1e-3)
    np.testing.assert_allclose(catalog["y"], ys, atol=1e-3)
    lons, lats = Transformer.from_crs(crs, get_body("moon").crs, always_xy=True).transform(xs, ys)
    np.testing.assert_allclose(catalog["lon"], lons, atol=1e-8)
    np.testing.assert_allclose(catalog["lat"], lats, atol=1e-8)


# --- realism -------------------------------------------------------------------------------


def test_default_world_is_fast_and_has_a_power_law(default: tuple[SynthWorld, float]) -> None:
    world, seconds = default
    assert seconds < 20  # a few seconds on 2 cores; generous for loaded CI machines
    catalog = pd.read_csv(world.craters)
    base = catalog[catalog["epoch"] == 0]
    assert len(base) > 500
    assert base["diameter_px"].min() >= 4 and base["diameter_px"].max() <= 1024 / 8
    assert base["diameter_px"].quantile(0.1) <= 8
    # Many small, few large.
    assert (base["diameter_px"] < 8).sum() > 10 * (base["diameter_px"] >= 32).sum() > 0
    assert 0.2 < (base["class"] == "fresh").mean() < 0.5


def test_fresh_and_degraded_craters_differ_in_the_hr_image(
    default: tuple[SynthWorld, float],
) -> None:
    world, _ = default
    catalog = pd.read_csv(world.craters)
    image = read(world.images[0]).astype(float)
    contrast: dict[str, list[float]] = {"fresh": [], "degraded": []}
    halo: dict[str, list[float]] = {"fresh": [], "degraded": []}
    rows = np.arange(image.shape[0])[:, None] + 0.5
    cols = np.arange(image.shape[1])[None, :] + 0.5
    catalog = catalog.rename(columns={"class": "kind"})
    for crater in catalog[(catalog["epoch"] == 0) & (catalog["diameter_px"] >= 8)].itertuples():
        r = np.hypot(rows - crater.row, cols - crater.col) / (crater.diameter_px / 2)
        inside, near, far = r <= 1, (r > 1.1) & (r <= 1.8), (r > 3) & (r <= 4)
        contrast[crater.kind].append(image[inside].std())
        halo[crater.kind].append(image[near].mean() - image[far].mean())
    # Fresh bowls hold a black shadow and a bright sunlit wall; degraded ones only soft shading.
    assert np.median(contrast["fresh"]) > 2 * np.median(contrast["degraded"])
    # Fresh craters sit in a bright halo; degraded ones do not.
    assert np.median(halo["fresh"]) > np.median(halo["degraded"]) + 10


# --- configuration -------------------------------------------------------------------------


T0 = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"size": 16}, "size"),
        ({"gsd": 0.0}, "gsd"),
        ({"gsd": -1.0}, "gsd"),
        ({"seed": -1}, "seed"),
        ({"center_lat": 95.0}, "center_lat"),
        ({"crater_density": -1.0}, "crater_density"),
        ({"min_diameter_px": 1.0}, "min_diameter_px"),
        ({"max_diameter_px": 2.0}, "max_diameter_px"),
        ({"fresh_fraction": 1.5}, "fresh_fraction"),
        ({"new_crater_diameter_px": (40.0, 8.0)}, "new_crater_diameter_px"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"epochs": ()}, "epochs"),
        ({"epochs": (EpochSpec(T0, 90, 30), EpochSpec(T0, 270, 30))}, "increasing"),
        ({"crs": "EPSG:4326"}, "projected"),
    ],
)
def test_bad_config_is_refused(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        SynthConfig(**changes)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sun_azimuth": 360.0}, "sun_azimuth"),
        ({"sun_elevation": 0.0}, "sun_elevation"),
        ({"new_craters": -1}, "new_craters"),
    ],
)
def test_bad_epoch_is_refused(kwargs: dict[str, object], field: str) -> None:
    args = {"datetime": T0, "sun_azimuth": 90.0, "sun_elevation": 30.0, **kwargs}
    with pytest.raises(InvalidArgumentError, match=field):
        EpochSpec(**args)


def test_unknown_crs_is_refused() -> None:
    with pytest.raises(CRSError, match="unknown CRS"):
        SynthConfig(crs="IAU_2015:99999999")


def test_utm_variant_puts_the_scene_on_earth(tmp_path: Path) -> None:
    config = SynthConfig(seed=1, size=128, crs="EPSG:32633", center_lon=15.2, center_lat=45.1)
    world = synthesize(tmp_path, config=config)
    assert world.collection_id == "synthetic-earth" and world.body == "earth"
    with rasterio.open(world.labels[0]) as src:
        crs = CRS.from_wkt(src.crs.to_wkt())
        assert crs.to_epsg() == 32633 and src.overviews(1)
    (item,) = read_items(world.items)[:1]
    assert item["properties"]["proj:epsg"] == 32633
    assert item["properties"]["planetseg:body"] == "earth"
    west, south, east, north = item["bbox"]
    assert west < 15.2 < east and south < 45.1 < north and east - west < 0.01
    catalog = pd.read_csv(world.craters)
    assert ((catalog["lon"] - 15.2).abs() < 0.01).all()
    assert ((catalog["lat"] - 45.1).abs() < 0.01).all()
