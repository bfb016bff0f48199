"""`diff` and `craters` block by block on a 2-worker cluster equal the whole grid in memory.

The labels stores are made to straddle block borders: a change region spanning four blocks
whose parts are each smaller than ``--min-area`` (the whole is not), craters on block corners
and on the scene's border, craters larger than a block, chunks of 1 px and of odd sizes. The
expected values come from the in-memory functions on whole grids (``change_mask``,
``transition_table``, ``region_polygons``, ``extract``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from scipy import ndimage

from planetseg.bodies import celestial_proj
from planetseg.config import CratersConfig, DiffConfig
from planetseg.craters import craters, extract
from planetseg.diff import change_mask, diff, region_polygon, region_polygons, transition_table
from planetseg.labels import CraterCatalog, rasterize_craters
from planetseg.products import LabelsStore
from tests.test_cli import assert_one_line_error, planetseg
from tests.test_craters import CRS, NODATA_ROWS, SIZE, TRANSFORM, _catalog, _write_store


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _disc(shape: tuple[int, int], row: float, col: float, radius: float) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - row) ** 2 + (cc - col) ** 2 <= radius**2


def _epochs(shape: tuple[int, int], corner: tuple[int, int], seed: int) -> np.ndarray:
    """Two epochs: blobs of three classes, and a disc that appears across a block corner."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 3, (2, shape[0] // 3 + 1, shape[1] // 3 + 1))
    labels = np.kron(cells, np.ones((3, 3), int))[:, : shape[0], : shape[1]].astype(np.uint8)
    labels[0, NODATA_ROWS:] = np.where(rng.random(shape) < 0.6, labels[1], labels[0])[NODATA_ROWS:]
    disc = _disc(shape, corner[0] - 0.5, corner[1] - 0.5, 3.2)  # centred on the corner
    ring = ndimage.binary_dilation(disc, np.ones((3, 3))) & ~disc
    labels[:, ring] = 2  # unchanged around it: the disc is a region of its own
    labels[0][disc], labels[1][disc] = 0, 1
    return labels


def _step(chunks: tuple[int, int], block: int) -> tuple[int, int]:
    """The side of the blocks of ``--block`` over these chunks (whole chunks)."""
    return tuple(c * -(-block // c) for c in chunks)


@pytest.fixture(scope="module")
def change_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Two-epoch stores (and the block size to use) of 1 px, odd and even chunks."""
    root = tmp_path_factory.mktemp("change")
    rng = np.random.default_rng(3)
    out = {}
    for name, shape, chunks, block in (
        ("1px", (14, 13), (1, 1), 1),
        ("odd", (61, 53), (7, 5), 1),
        ("blocks", (64, 64), (8, 8), 16),
    ):
        corner = tuple(2 * s for s in _step(chunks, block)) if name != "1px" else (10, 6)
        labels = _epochs(shape, corner, seed=len(out))
        confidence = rng.uniform(0.2, 1.0, (2, *shape)).astype(np.float32)
        store = _write_store(
            root / f"{name}.zarr", labels, None, confidence=confidence, chunks=chunks
        )
        out[name] = (store, block)
    return out


def _expected_diff(
    store: Path, min_confidence: float, min_area_m2: float
) -> tuple[np.ndarray, np.ndarray, list[dict[str, object]], pd.DataFrame]:
    s = LabelsStore.open(store)
    before, after = s.read(0), s.read(1)
    area = s.pixel_area_km2()
    n = max(max(s.classes), int(before.max()), int(after.max())) + 1
    codes, changed, found = change_mask(
        before,
        after,
        area_km2=area,
        confidence=(s.read(0, "confidence"), s.read(1, "confidence")),
        min_confidence=min_confidence,
        min_area_m2=min_area_m2,
        n_classes=n,
    )
    table = transition_table(codes, changed, area, s.classes, n)
    px = np.bincount(found.ravel())
    km2 = np.bincount(found.ravel(), weights=area.ravel())
    rows = [
        {"pixels": int(px[k]), "area_km2": float(km2[k]), "code": int(codes[found == k][0]),
         "geometry": region_polygon(parts, s.transform)}
        for k, parts in region_polygons(found).items()
    ]  # fmt: skip
    return np.where(changed, codes, 255), changed, table, pd.DataFrame(rows)


def _same_table(got: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert [(r["from"], r["to"], r["pixels"]) for r in got] == [
        (r["from"], r["to"], r["pixels"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        assert g["area_km2"] == pytest.approx(w["area_km2"], rel=1e-12)


@pytest.mark.parametrize("name", ["1px", "odd", "blocks"])
@pytest.mark.parametrize(("min_confidence", "min_area_m2"), [(0.0, 0.0), (0.3, 6e4)])
def test_diff_in_blocks_equals_the_whole_grid(
    name: str,
    min_confidence: float,
    min_area_m2: float,
    change_stores: dict[str, tuple[Path, int]],
    client: object,
    tmp_path: Path,
) -> None:
    import geopandas as gpd

    store, block = change_stores[name]
    config = DiffConfig(
        out=str(tmp_path / "d"),
        before="0",
        after="1",
        min_confidence=min_confidence,
        min_area_m2=min_area_m2,
        block=block,
    )
    result = diff(store, config, client=client)
    code_raster, changed, table, polygons = _expected_diff(store, min_confidence, min_area_m2)
    assert 0 < changed.sum() < changed.size
    with (
        rasterio.open(tmp_path / "d" / "change.tif") as a,
        rasterio.open(tmp_path / "d" / "mask.tif") as m,
    ):
        np.testing.assert_array_equal(a.read(1), code_raster)
        np.testing.assert_array_equal(m.read(1), changed.astype(np.uint8))
    _same_table(result.transitions, table)
    assert result.changed_pixels == int(changed.sum())
    with celestial_proj():
        got = gpd.read_parquet(tmp_path / "d" / "changes.parquet")
    key = lambda f: f.assign(wkb=[g.wkb for g in f.geometry]).sort_values("wkb")  # noqa: E731
    got, want = key(got), key(polygons)
    assert len(got) == len(want) > 0
    assert list(got["pixels"]) == list(want["pixels"])
    np.testing.assert_allclose(got["area_km2"], want["area_km2"], rtol=1e-12)
    assert all(g.equals_exact(w, 0) for g, w in zip(got.geometry, want.geometry, strict=True))


def test_a_region_over_four_blocks_is_kept_whole(
    change_stores: dict[str, tuple[Path, int]], client: object, tmp_path: Path
) -> None:
    """The disc on the corner of four blocks: each quarter is below --min-area, the disc not."""
    store, block = change_stores["blocks"]
    s = LabelsStore.open(store)
    corner = 2 * _step((8, 8), block)[0]
    disc = _disc(s.shape, corner - 0.5, corner - 0.5, 3.2)
    area_m2 = s.pixel_area_km2() * 1e6
    quarters = [
        area_m2[rows, cols][disc[rows, cols]].sum()
        for rows in (slice(0, corner), slice(corner, None))
        for cols in (slice(0, corner), slice(corner, None))
    ]
    min_area = 1.5 * max(quarters)
    assert area_m2[disc].sum() > min_area
    config = DiffConfig(
        out=str(tmp_path / "d"), before="0", after="1", min_area_m2=min_area, block=block
    )
    diff(store, config, client=client)
    with rasterio.open(tmp_path / "d" / "mask.tif") as m:
        mask = m.read(1).astype(bool)
    assert mask[disc].all()  # kept: the four quarters are one region


def _crater_scene(rows: slice, cols: slice, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crater labels and a soft probability of a part of the known craters' scene.

    More craters are added on block corners and on the scene's borders.
    """
    labels = rasterize_craters(
        CraterCatalog(_catalog(), "craters.csv"),
        crs=CRS,
        transform=TRANSFORM,
        shape=(SIZE, SIZE),
        values={"crater": 1},
    )
    for r, c, radius in ((64, 64, 5), (128, 96, 9), (SIZE - 2, 30, 6), (40, 0, 4), (48, 76, 3)):
        labels[_disc(labels.shape, r - 0.5, c - 0.5, radius)] = 1
    rng = np.random.default_rng(seed)
    blurred = ndimage.gaussian_filter(labels.astype(float), 1.5)
    soft = np.clip(blurred + rng.normal(0, 0.05, labels.shape), 0, 1)
    return labels[rows, cols], soft[rows, cols]


@pytest.fixture(scope="module")
def crater_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    root = tmp_path_factory.mktemp("craters")
    out = {}
    everything = slice(None)
    for name, rows, cols, chunks, block, soft in (
        ("1px", slice(32, 60), slice(82, 110), (1, 1), 1, True),  # a touching pair, cut
        ("odd", everything, everything, (37, 23), 1, True),
        ("labels", everything, slice(0, 200), (16, 16), 16, False),  # craters over blocks
    ):
        labels, probability = _crater_scene(rows, cols, seed=len(out))
        store = _write_store(
            root / f"{name}.zarr", labels, probability if soft else None, chunks=chunks
        )
        out[name] = (store, block)
    return out


@pytest.mark.parametrize("name", ["1px", "odd", "labels"])
def test_craters_in_blocks_equal_the_whole_grid(
    name: str, crater_stores: dict[str, tuple[Path, int]], client: object, tmp_path: Path
) -> None:
    store, block = crater_stores[name]
    config = CratersConfig(
        out=str(tmp_path / "c.parquet"), block=block, craterstats=str(tmp_path / "c.scc")
    )
    result = craters(store, config, client=client)
    s = LabelsStore.open(store)
    soft = result.source == "crater_probability"
    want = extract(
        s.read(0),
        s.read(0, "confidence"),
        {1: "crater"},
        probability=s.read(0, "crater_probability") if soft else None,
    )
    area = s.pixel_area_km2()
    true_area = np.array([area[c].sum() for c in want["_coords"]])
    lon, lat = s.pixel_centres_lonlat(want["row"].to_numpy(), want["col"].to_numpy())
    got = result.table
    assert len(got) == len(want) >= 2
    for column in ("row", "col", "diameter_px", "orientation_deg", "confidence"):
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
    np.testing.assert_array_equal(got["area_km2"], true_area)
    np.testing.assert_array_equal(got["diameter_km"], 2 * np.sqrt(true_area / math.pi))
    np.testing.assert_array_equal(got["lon"], lon)
    np.testing.assert_array_equal(got["lat"], lat)
    scale = np.sqrt(true_area / want["area_px"].to_numpy())
    np.testing.assert_array_equal(got["major_km"], want["major_px"].to_numpy() * scale)
    assert list(got["id"]) == list(range(len(got)))
    counted = float(area[np.isfinite(s.read(0, "confidence"))].sum())
    text = (tmp_path / "c.scc").read_text()
    total = float(text.split("Total_area = ")[1].split()[0])
    assert total == pytest.approx(counted, rel=1e-9)
    if name == "labels":  # some craters were larger than a block: measured whole
        assert (got["diameter_px"] > 16).any()


@pytest.mark.slow
def test_cli_computes_on_a_cluster_of_its_own(
    crater_stores: dict[str, tuple[Path, int]],
    change_stores: dict[str, tuple[Path, int]],
    tmp_path: Path,
) -> None:
    store, _ = crater_stores["odd"]
    ok = planetseg(
        "craters", str(store), "--out", str(tmp_path / "c.csv"), "--block", "64",
        "--cluster", "local", "--workers", "2", "--threads", "1",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    in_process = craters(store, CratersConfig(out=str(tmp_path / "d.csv"), block=4096))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c.csv"), pd.read_csv(tmp_path / "d.csv"))
    assert len(in_process.table) > 2
    change, _ = change_stores["odd"]
    ok = planetseg(
        "diff", str(change), "--before", "0", "--after", "1", "--out", str(tmp_path / "d"),
        "--block", "9", "--cluster", "none",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "changed:" in ok.stdout


def test_a_block_of_0_px_is_refused_in_one_line(
    change_stores: dict[str, tuple[Path, int]], tmp_path: Path
) -> None:
    store, _ = change_stores["odd"]
    for args in (
        ["diff", str(store), "--before", "0", "--after", "1", "--out", str(tmp_path / "d")],
        ["craters", str(store), "--out", str(tmp_path / "c.csv")],
    ):
        assert_one_line_error(planetseg(*args, "--block", "0"), "--block 0", ">= 1 px")
    assert not (tmp_path / "d").exists() and not (tmp_path / "c.csv").exists()
