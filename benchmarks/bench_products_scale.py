"""``diff`` + ``craters`` over a scene and over one 16x larger: worker memory flat, time x16.

Generates two labels stores of ``segment``'s layout (labels of three classes, quantised
confidence and crater probability, two epochs; craters of 2-20 px radius, touching ones among
them, blobs of change), one of ``--size`` px square and one 4x wider and higher, chunk by
chunk (the generator holds one chunk at a time). Each store is then computed in a fresh
process on a fresh 2-worker LocalCluster (1 thread each), after a run on a one-chunk scene
that pays what a process pays once (imports, PROJ's database): ``diff`` (with the confidence and
area filters) and ``craters`` (with a craterstats count), timed, with the workers' and the
driver's peak RSS (``ru_maxrss`` of each process). Printed: both runs, the ratios large/small
and the CPU. Goals (issue 13): worker peak RSS ratio <= 1.2, time ratio ~16.

    python benchmarks/bench_products_scale.py --size 2048 --block 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402

CHUNK = 512
CRS = "IAU_2015:30110"  # the Moon, equirectangular
PIXEL_M = 100.0


def chunk(t: int, i: int, j: int) -> dict[str, np.ndarray]:
    """One chunk of epoch ``t``: labels, confidence, crater probability (seeded by its place)."""
    from scipy import ndimage

    rng = np.random.default_rng([i, j])
    coarse = rng.random((CHUNK // 64 + 1, CHUNK // 64 + 1))
    dunes = ndimage.zoom(coarse, 64, order=1)[:CHUNK, :CHUNK] > 0.7
    rr, cc = np.ogrid[:CHUNK, :CHUNK]
    craters = np.zeros((CHUNK, CHUNK), bool)
    centres = rng.uniform(0, CHUNK, (72, 2))
    radii = rng.uniform(2, 20, 72)
    pairs = rng.integers(0, 60, 10)  # touching pairs: a second disc beside some
    side = rng.choice([-1, 1], (len(pairs), 2))
    centres = np.r_[centres, centres[pairs] + radii[pairs, None] * 1.6 * side]
    radii = np.r_[radii, radii[pairs] * rng.uniform(0.6, 1.0, len(pairs))]
    new = (np.arange(len(radii)) >= 60) & (np.arange(len(radii)) < 72)
    kept = ~new | bool(t)  # epoch 1: 12 new craters
    centres, radii = centres[kept], radii[kept]
    for (y, x), r in zip(centres, radii, strict=True):
        y0, y1 = max(0, int(y - r - 1)), min(CHUNK, int(y + r + 2))
        x0, x1 = max(0, int(x - r - 1)), min(CHUNK, int(x + r + 2))
        craters[y0:y1, x0:x1] |= (rr[y0:y1] - y) ** 2 + (cc[:, x0:x1] - x) ** 2 <= r**2
    if t:
        dunes = ndimage.binary_dilation(dunes, iterations=3)  # the dunes spread: change
    labels = np.where(craters, 1, np.where(dunes, 2, 0)).astype(np.uint8)
    soft = ndimage.gaussian_filter(craters.astype(np.float32), 1.5)
    probability = np.clip(soft + rng.normal(0, 0.05, soft.shape), 0, 1).astype(np.float32)
    confidence = rng.uniform(0.5, 1.0, soft.shape).astype(np.float32)
    return {"labels": labels, "confidence": confidence, "crater_probability": probability}


def generate(path: Path, size: int) -> Path:
    """A two-epoch labels store of ``size`` x ``size`` px, written chunk by chunk."""
    import dask.array as da
    import xarray as xr

    from planetseg.segment import CONFIDENCE_STEPS, CRATER_PROBABILITY_ATTR
    from planetseg.store import cf_attrs, pixel_centres

    transform = (PIXEL_M, 0.0, 0.0, 0.0, -PIXEL_M, size / 2 * PIXEL_M)
    chunks = ((1, 1), (CHUNK,) * (size // CHUNK), (CHUNK,) * (size // CHUNK))

    def array(name: str, dtype: type) -> da.Array:
        def make(block_info: dict | None = None) -> np.ndarray:
            (t, _), (r0, _), (c0, _) = block_info[None]["array-location"]
            return chunk(t, r0 // CHUNK, c0 // CHUNK)[name][None]

        return da.map_blocks(make, chunks=chunks, dtype=dtype)

    quantised = {
        "dtype": "uint8",
        "scale_factor": 1.0 / CONFIDENCE_STEPS,
        "add_offset": 0.0,
        "_FillValue": 255,
    }
    names = {"labels": np.uint8, "confidence": np.float32, "crater_probability": np.float32}
    ds = xr.Dataset(
        {name: (("time", "y", "x"), array(name, dtype)) for name, dtype in names.items()},
        coords={
            "time": np.array(["2020-01-01", "2021-01-01"], dtype="datetime64[ns]"),
            **pixel_centres(transform, (size, size)),
            "spatial_ref": xr.Variable((), np.int32(0), attrs=cf_attrs(CRS, transform)),
        },
        attrs={
            "planetseg:stage": "segment",
            "planetseg:complete": True,
            "planetseg:classes": json.dumps({"0": "plains", "1": "crater", "2": "dunes"}),
            CRATER_PROBABILITY_ATTR: json.dumps(["crater"]),
        },
    )
    encoding = {n: dict(quantised) for n in ("confidence", "crater_probability")}
    import dask

    with dask.config.set(scheduler="threads", num_workers=2):
        ds.to_zarr(str(path), mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    return path


def run(store: Path, block: int, out: Path, client: object) -> tuple[int, int, float]:
    """diff + craters of ``store``: changed pixels, craters, and when diff ended."""
    from planetseg.config import CratersConfig, DiffConfig
    from planetseg.craters import craters
    from planetseg.diff import diff

    changed = diff(
        store,
        DiffConfig(
            out=str(out / "change"), before="0", after="1", min_confidence=0.6,
            min_area_m2=2e5, block=block,
        ),
        client=client,
    ).changed_pixels  # fmt: skip
    t1 = time.perf_counter()
    found = craters(
        store,
        CratersConfig(
            out=str(out / "craters.parquet"), times=("0",), block=block,
            craterstats=str(out / "craters.scc"),
        ),
        client=client,
    ).table  # fmt: skip
    return changed, len(found), t1


def measure(store: Path, block: int, out: Path) -> dict[str, float]:
    """diff + craters of ``store`` on a fresh 2-worker cluster; times and peak RSS (bytes)."""
    from distributed import Client, LocalCluster

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        # What a process pays once (imports, the PROJ database, first reads), whatever the
        # scene: paid before the clock starts, on both sides alike, on a one-chunk scene.
        (out / "warm").mkdir()
        run(generate(out / "warm.zarr", CHUNK), block, out / "warm", client)
        start_rss = max(client.run(peak).values())
        t0 = time.perf_counter()
        changed, found, t1 = run(store, block, out, client)
        t2 = time.perf_counter()
        workers = max(client.run(peak).values())
    return {
        "diff_s": t1 - t0,
        "craters_s": t2 - t1,
        "worker_peak": workers,
        "worker_start": start_rss,
        "driver_peak": peak(),
        "changed_px": changed,
        "craters": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="Side of the small scene (px).")
    parser.add_argument("--block", type=int, default=1024, help="--block of diff and craters.")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.block, args.out)))
        return
    mib = 2**20
    print(f"CPU: {cpu()}; 2 Dask workers x 1 thread; --block {args.block}, chunks {CHUNK}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in (("small", args.size), ("16x", 4 * args.size)):
            t = time.perf_counter()
            store = generate(Path(tmp) / f"{name}.zarr", size)
            print(
                f"{name}: {size} x {size} px x 2 epochs, generated in "
                f"{time.perf_counter() - t:.0f} s"
            )
            out = Path(tmp) / f"{name}-out"
            out.mkdir()
            proc = subprocess.run(
                [sys.executable, __file__, "--measure", str(store), "--out", str(out),
                 "--block", str(args.block)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"  diff {r['diff_s']:.1f} s ({r['changed_px']:,} px changed), craters "
                f"{r['craters_s']:.1f} s ({r['craters']:,} craters); worker peak RSS "
                f"{r['worker_peak'] / mib:.0f} MiB (idle {r['worker_start'] / mib:.0f}), "
                f"driver peak {r['driver_peak'] / mib:.0f} MiB"
            )
    small, large = runs["small"], runs["16x"]
    total = lambda r: r["diff_s"] + r["craters_s"]  # noqa: E731
    print(
        f"ratios 16x/small: worker peak RSS {large['worker_peak'] / small['worker_peak']:.2f} "
        f"(goal <= 1.2), time {total(large) / total(small):.1f} (goal ~16: diff "
        f"{large['diff_s'] / small['diff_s']:.1f}, craters "
        f"{large['craters_s'] / small['craters_s']:.1f}), driver peak RSS "
        f"{large['driver_peak'] / small['driver_peak']:.2f}, craters "
        f"{large['craters'] / max(small['craters'], 1):.1f}"
    )


if __name__ == "__main__":
    main()
