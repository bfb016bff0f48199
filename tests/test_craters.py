"""`craters`: the crater probability, separating touching craters, unbiased diameters, scores
binned by one diameter above the limits, and the count for craterstats (run on it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from affine import Affine
from scipy import ndimage

from planetseg.config import CratersConfig, SegmentConfig
from planetseg.craters import craters, score
from planetseg.labels import CraterCatalog, rasterize_craters
from planetseg.products import LabelsStore, to_lonlat
from planetseg.segment import CONFIDENCE_STEPS, CRATER_PROBABILITY, CRATER_PROBABILITY_ATTR, segment
from planetseg.store import cf_attrs, pixel_centres
from tests.test_cli import assert_one_line_error, planetseg

CRS = "IAU_2015:30110"  # the Moon, equirectangular: 100 m pixels are 100 m at the equator
PIXEL_M = 100.0
SIZE = 320
TRANSFORM = Affine(PIXEL_M, 0, 0, 0, -PIXEL_M, SIZE / 2 * PIXEL_M)  # centred on the equator
CLASSES = {0: "plains", 1: "crater"}
NODATA_ROWS = 8  # the top rows are never segmented (confidence unset): not counted area


def _lonlat(row: float, col: float) -> tuple[float, float]:
    x, y = TRANSFORM * (col, row)
    lon, lat = to_lonlat(CRS, np.array([x]), np.array([y]))
    return float(lon[0]), float(lat[0])


def _catalog() -> pd.DataFrame:
    """Known craters in 64 px cells: single discs of 7-30 px and pairs that touch or overlap."""
    rng = np.random.default_rng(0)
    rows = []
    for k, (cy, cx) in enumerate((y, x) for y in range(5) for x in range(5)):
        r0, c0 = NODATA_ROWS + 40 + cy * 60, 32 + cx * 64
        if k % 2:  # a pair: centre distance 0.85-1.0 x the sum of the radii
            d1, d2 = rng.uniform(10, 26, 2)
            gap = rng.uniform(0.85, 1.0) * (d1 + d2) / 2
            discs = [(r0, c0 - gap / 2, d1, "pair"), (r0, c0 + gap / 2, d2, "pair")]
        else:
            discs = [(r0, c0, rng.uniform(7, 30), "single")]
        for r, c, d, kind in discs:
            lon, lat = _lonlat(r + rng.uniform(-0.5, 0.5), c + rng.uniform(-0.5, 0.5))
            rows.append({"lon": lon, "lat": lat, "diameter_km": d * PIXEL_M / 1000, "kind": kind})
    return pd.DataFrame(rows).assign(**{"class": "crater"})


def _write_store(
    path: Path,
    labels: np.ndarray,
    probability: np.ndarray | None,
    times: int = 1,
    *,
    confidence: np.ndarray | None = None,
    chunks: tuple[int, int] | None = None,
) -> Path:
    """A labels store of segment's layout (quantised confidence and crater probability).

    ``labels`` (and ``confidence``, default 1) are of one time step, repeated ``times``
    times, or of every time step (3-D); ``chunks`` the (y, x) chunks of every array.
    """
    import xarray as xr

    shape = labels.shape[-2:]
    if confidence is None:
        confidence = np.ones(labels.shape, np.float32)
    confidence = np.array(confidence, np.float32)
    confidence[..., :NODATA_ROWS, :] = np.nan  # never written: the store's fill value
    quantised = {
        "dtype": "uint8",
        "scale_factor": 1.0 / CONFIDENCE_STEPS,
        "add_offset": 0.0,
        "_FillValue": 255,
    }
    stack = lambda a: a if a.ndim == 3 else np.repeat(a[None], times, axis=0)  # noqa: E731
    times = len(stack(labels))
    data = {"labels": (("time", "y", "x"), stack(labels)), "confidence": (("time", "y", "x"),
            stack(confidence))}  # fmt: skip
    attrs = {
        "planetseg:stage": "segment",
        "planetseg:complete": True,
        "planetseg:classes": json.dumps({str(k): v for k, v in CLASSES.items()}),
    }
    if probability is not None:
        p = probability.astype(np.float32)
        p[..., :NODATA_ROWS, :] = np.nan
        data[CRATER_PROBABILITY] = (("time", "y", "x"), stack(p))
        attrs[CRATER_PROBABILITY_ATTR] = json.dumps(["crater"])
    when = np.array([f"2020-01-0{t + 1}" for t in range(times)], dtype="datetime64[ns]")
    ds = xr.Dataset(
        data,
        coords={
            "time": when,
            **pixel_centres(tuple(TRANSFORM)[:6], shape),
            "spatial_ref": xr.Variable((), np.int32(0), attrs=cf_attrs(CRS, tuple(TRANSFORM)[:6])),
        },
        attrs=attrs,
    )
    encoding = {name: dict(quantised) for name in data if name != "labels"}
    encoding["labels"] = {}
    if chunks:
        for name in data:
            encoding[name]["chunks"] = (1, *chunks)
    ds.to_zarr(str(path), mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    return path


@pytest.fixture(scope="module")
def discs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The known craters as an exact label raster, without and with a soft probability."""
    root = tmp_path_factory.mktemp("discs")
    truth = _catalog()
    reference = root / "reference.csv"
    truth.to_csv(reference, index=False)
    labels = rasterize_craters(
        CraterCatalog(truth, str(reference)),
        crs=CRS,
        transform=TRANSFORM,
        shape=(SIZE, SIZE),
        values={"crater": 1},
    )
    # What a network segmenting from 2x coarser input gives: the mask blurred, with noise.
    rng = np.random.default_rng(1)
    blurred = ndimage.gaussian_filter(labels.astype(float), 1.5)
    soft = np.clip(blurred + rng.normal(0, 0.05, labels.shape), 0, 1)
    return {
        "reference": reference,
        "labels": _write_store(root / "labels.zarr", labels, None),
        "exact": _write_store(root / "exact.zarr", labels, labels.astype(float)),
        "soft": _write_store(root / "soft.zarr", labels, soft),
        "three": _write_store(root / "three.zarr", labels, labels.astype(float), times=3),
    }


@pytest.mark.parametrize("store", ["labels", "exact", "soft"])
def test_touching_craters_split_and_diameters_are_unbiased(
    store: str, discs: dict[str, Path], tmp_path: Path
) -> None:
    result = craters(
        discs[store],
        CratersConfig(out=str(tmp_path / "c.csv"), reference=str(discs["reference"])),
    )
    assert result.source == ("labels" if store == "labels" else CRATER_PROBABILITY)
    truth = pd.read_csv(discs["reference"])
    assert (truth["kind"] == "pair").sum() >= 20
    found = result.scores["all"]
    # every crater, the touching pairs too, is found once, and nothing else
    assert found["reference"] == len(truth) and found["matched"] == len(truth)
    assert found["detected"] == len(truth) == len(result.table)
    assert abs(found["median_diameter_bias"]) < (0.01 if store != "soft" else 0.03)
    assert found["median_position_error_radii"] < 0.1


def test_min_confidence_drops_unsure_craters(discs: dict[str, Path], tmp_path: Path) -> None:
    every = craters(discs["soft"], CratersConfig(out=str(tmp_path / "a.csv"))).table
    cut = float(every["confidence"].median())
    sure = craters(
        discs["soft"], CratersConfig(out=str(tmp_path / "b.csv"), min_confidence=cut)
    ).table
    assert 0 < len(sure) < len(every)
    assert (sure["confidence"] >= cut).all()
    assert len(sure) == int((every["confidence"] >= cut).sum())


def test_scores_bin_a_pair_by_the_reference_diameter(discs: dict[str, Path]) -> None:
    store = LabelsStore.open(discs["labels"])
    lon, lat = _lonlat(100, 100)
    far_lon, far_lat = _lonlat(250, 250)
    km = PIXEL_M / 1000
    detected = pd.DataFrame(
        {
            "lon": [lon, far_lon, far_lon + 0.05],
            "lat": [lat, far_lat, far_lat],
            "diameter_km": [8.4 * km, 12 * km, 5 * km],  # a match, a false one, a small false
            "epoch": 0,
        }
    )
    # the match (7.6 px), a miss of 20 px, a miss of 2 px, one of 5 px
    where = [(lon, lat), _lonlat(40, 250), _lonlat(40, 20), _lonlat(200, 20)]
    reference = pd.DataFrame(where, columns=["lon", "lat"]).assign(
        diameter_km=[7.6 * km, 20 * km, 2 * km, 5 * km]
    )
    s = score(detected, reference, store, [0], km, min_diameter_px=3)
    b = s["bins"]
    # the pair is in the reference's bin on both sides: no "precision 100, recall 0" rows
    assert b["4-8 px"]["matched"] == 1 and b["4-8 px"]["precision"] == 0.5
    assert (b["4-8 px"]["detected"], b["4-8 px"]["reference"]) == (2, 2)  # + 5 px false, miss
    assert (b["8-16 px"]["detected"], b["8-16 px"]["reference"]) == (1, 0)
    assert b["8-16 px"]["precision"] == 0 and b["8-16 px"]["recall"] is None
    assert (b["16-32 px"]["detected"], b["16-32 px"]["reference"]) == (0, 1)
    assert b["0-4 px"]["reference"] == 0  # the 2 px miss is below --min-diameter
    assert b["4-8 px"]["m"] == [400.0, 800.0] and b[">=32 px"]["m"] == [3200.0, None]
    total, everything = s["total"], s["all"]
    assert (total["detected"], total["reference"], total["matched"]) == (3, 3, 1)
    assert (everything["detected"], everything["reference"]) == (3, 4)
    assert total["median_diameter_bias"] == pytest.approx(0.8 / 7.6)
    # the reference's completeness limit holds on both sides: 0.6 km drops the 5 px craters
    s = score(detected, reference, store, [0], km, min_diameter_px=3, reference_min_km=0.6)
    assert (s["total"]["detected"], s["total"]["reference"]) == (2, 2)
    assert s["limits"] == {"min_diameter_px": 3, "min_diameter_m": 300.0, "reference_min_km": 0.6}


def test_cli_prints_bins_in_pixels_and_metres_and_the_total_above_the_limits(
    discs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "c.parquet"
    args = ("--reference", str(discs["reference"]), "--reference-min-km", "1.5")
    proc = planetseg("craters", str(discs["exact"]), "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    assert "from the crater probability" in proc.stdout
    assert re.search(r">= 3 px, >= 1\.5 km", proc.stdout)
    assert re.search(r"8-16 px\W+800-1600", proc.stdout)
    scores = json.loads(out.with_name("c.scores.json").read_text())
    truth = pd.read_csv(discs["reference"])
    assert scores["total"]["reference"] == int((truth["diameter_km"] >= 1.5).sum())
    assert scores["total"]["precision"] == 1.0 and scores["total"]["recall"] == 1.0


def test_craterstats_reads_the_count_and_its_area(discs: dict[str, Path], tmp_path: Path) -> None:
    count = tmp_path / "count.scc"
    out = tmp_path / "c.csv"
    proc = planetseg("craters", str(discs["exact"]), "--out", str(out), "--craterstats", str(count))
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    # craterstats itself (its command line) bins the count and writes its .stat table
    stat = _craterstats(count, tmp_path / "cs")
    area = float(re.search(r"Total area = ([\d.eE+-]+)", stat).group(1))
    rows = [ln.split() for ln in stat.splitlines() if ln and not ln.startswith("#")]
    assert sum(float(r[1]) for r in rows) == len(table) == len(pd.read_csv(discs["reference"]))
    assert float(rows[0][4]) == len(table)  # the cumulative count at the smallest bin
    # the valid pixels only: rows of lon/lat cells on the Moon's 1737.4 km sphere, each
    # R^2 * dlon * (sin(top) - sin(bottom)) (craterstats prints 6 significant figures)
    edges = TRANSFORM * (np.zeros(SIZE + 1), np.arange(SIZE + 1.0))
    _, lat = to_lonlat(CRS, *edges)
    bands = np.abs(np.diff(np.sin(np.radians(lat))))[NODATA_ROWS:]
    valid = 1737.4**2 * (SIZE * PIXEL_M / 1737400.0) * bands.sum()  # dlon in radians
    assert valid == pytest.approx((SIZE - NODATA_ROWS) * SIZE * (PIXEL_M / 1000) ** 2, rel=1e-4)
    assert area == pytest.approx(valid, rel=1e-5)
    d_min = float(rows[0][0])
    assert d_min <= table["diameter_km"].min() < float(rows[1][0])
    [item] = [json.loads(ln) for ln in (tmp_path / "c.items.ndjson").read_text().splitlines()]
    assert item["assets"]["craterstats"]["href"] == str(count.resolve())
    # a second run replaces it only with --overwrite, as the catalog
    proc = planetseg("craters", str(discs["exact"]), "--out", str(out), "--craterstats", str(count))
    assert_one_line_error(proc, "--overwrite")


def _craterstats(count: Path, out: Path) -> str:
    """Run craterstats' command line on ``count``; return the .stat file it writes.

    craterstats 3.2 (the last release for Python 3.11) uses two names that numpy 2 and scipy
    1.14 removed (``np.Inf``, ``scipy.integrate.simps``): they are put back before its command
    line runs; newer releases have neither and run as they are.
    """
    shim = (
        "import sys, numpy, scipy.integrate as si\n"
        "numpy.Inf = getattr(numpy, 'Inf', numpy.inf)\n"
        "si.simps = getattr(si, 'simps', None) or si.simpson\n"
        "from craterstats.cli import main\n"
        "sys.argv[0] = 'craterstats'\n"
        "main()\n"
    )
    out.mkdir()
    cmd = [sys.executable, "-c", shim, "-cs", "moon", "-p", f"source={count}", "-o", str(out)]
    proc = subprocess.run(
        [*cmd, "-f", "stat"], capture_output=True, text=True, timeout=120, cwd=out
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [stat] = out.glob("*.stat")
    return stat.read_text()


def test_bad_crater_arguments(discs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c.csv"
    proc = planetseg("craters", str(discs["exact"]), "--out", str(out), "--min-confidence", "2")
    assert_one_line_error(proc, "--min-confidence 2")
    proc = planetseg("craters", str(discs["exact"]), "--out", str(out), "--reference-min-km", "-1")
    assert_one_line_error(proc, "--reference-min-km -1")
    proc = planetseg("craters", str(discs["exact"]), "--out", str(out), "--craterstats", "c.txt")
    assert_one_line_error(proc, "--craterstats c.txt", ".scc")
    count = tmp_path / "c.scc"
    proc = planetseg("craters", str(discs["three"]), "--out", str(out), "--craterstats", str(count))
    assert_one_line_error(proc, "--craterstats", "3 time steps", "--time")
    proc = planetseg(
        "craters",
        str(discs["three"]),
        "--out",
        str(out),
        "--craterstats",
        str(count),
        "--time",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(out)) == len(pd.read_csv(discs["reference"]))
    assert not list(tmp_path.glob("*.partial*"))


def test_segment_stores_the_crater_probability(world: dict[str, Path], tmp_path: Path) -> None:
    import zarr

    out = tmp_path / "labels.zarr"
    segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"])))
    store = LabelsStore.open(out)
    summed = json.loads(store.attrs[CRATER_PROBABILITY_ATTR])
    assert sorted(summed) == ["degraded_crater", "fresh_crater"]
    raw = zarr.open_array(str(out), path=CRATER_PROBABILITY, mode="r")
    assert raw.dtype == np.uint8 and raw.chunks == zarr.open_array(str(out), path="labels").chunks
    crater = [v for v, n in store.classes.items() if "crater" in n]
    step = 1 / CONFIDENCE_STEPS
    for t in range(len(store.times)):
        labels, conf = store.read(t), store.read(t, "confidence")
        p = store.read(t, CRATER_PROBABILITY)
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1 + 1e-6).all()
        is_crater = np.isin(labels, crater)
        # the winning crater class is part of the sum; a winning other class leaves the rest
        assert (p[is_crater] >= conf[is_crater] - step).all()
        assert (p[~is_crater] <= 1 - conf[~is_crater] + step).all()
    result = craters(out, CratersConfig(out=str(tmp_path / "c.csv")))
    assert result.source == CRATER_PROBABILITY
    # naming only one crater class falls back to the hard labels of that class
    one = craters(out, CratersConfig(out=str(tmp_path / "d.csv"), crater_classes=("fresh_crater",)))
    assert one.source == "labels"


def test_workflow_accepts_the_crater_limits(tmp_path: Path) -> None:
    from planetseg.workflow import load_workflow
    from tests.test_workflow import GOOD

    (tmp_path / "world").mkdir()
    path = tmp_path / "flow.yaml"
    path.write_text(
        GOOD.replace(
            "    reference: world/craters.csv\n",
            "    reference: world/craters.csv\n    min_confidence: 0.6\n    reference_min_km: 1\n",
        )
    )
    flow = load_workflow(path)
    assert flow.craters.min_confidence == 0.6 and flow.craters.reference_min_km == 1.0
