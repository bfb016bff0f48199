"""Crater-label rasterisation per tile: a catalog of 1k vs 100k craters, the same tiles.

Ingest draws a crater catalog's labels tile by tile (``planetseg.ingest._static_labels_tile``
calls :func:`planetseg.labels.rasterize_craters` with the tile's grid). The tiles here hold
the same craters whatever the catalog's size: ``--local`` craters over a grid of ``--tiles`` x
``--tiles`` tiles on the Moon, and the rest of the catalog (up to 1k, then 100k craters)
elsewhere on the body. A tile should cost what its own craters cost, so the per-tile time at
100k over that at 1k should be about 1. It prints, measured in one run on this machine:

* the spatial index's one-off build time per catalog (once per catalog and process);
* the mean time per tile, indexed, at each catalog size, and their ratio;
* the mean time per tile testing every crater (``indexed=False``, what every tile cost before
  the index) on the first ``--brute-tiles`` tiles, and that the indexed tiles equal them
  byte for byte.

    python benchmarks/bench_labels.py            # 16 tiles of 512 px, 500 local craters
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from affine import Affine  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402
from planetseg.labels import CraterCatalog, class_values, rasterize_craters  # noqa: E402

MOON = "IAU_2015:30100"  # Moon, geographic (lon/lat degrees): the grid wraps at 180 E
MOON_KM_PER_DEG = 1737.4 * np.pi / 180


def craters(
    n: int, west: float, south: float, east: float, north: float, seed: int
) -> pd.DataFrame:
    """``n`` craters with a power-law size distribution (0.5 to 50 km) in a lon/lat box."""
    rng = np.random.default_rng(seed)
    lon = (rng.uniform(west, east, n) + 180.0) % 360.0 - 180.0
    lat = np.degrees(
        np.arcsin(rng.uniform(np.sin(np.radians(south)), np.sin(np.radians(north)), n))
    )
    diameter = 0.5 * (1 - rng.uniform(0, 0.99, n)) ** (-1 / 1.0)  # N(>D) ~ D^-1
    kind = np.where(rng.uniform(size=n) < 0.5, "fresh", "degraded")
    return pd.DataFrame(
        {"lon": lon, "lat": lat, "diameter_km": np.minimum(diameter, 50.0), "class": kind}
    )


def catalog_of(local: pd.DataFrame, size: int, box: tuple[float, ...], seed: int) -> CraterCatalog:
    """The local craters plus ``size - len(local)`` craters 10 degrees or more off ``box``."""
    west, south, east, north = box
    rest = craters(4 * size, -180, -90, 180, 90, seed)
    off_centre = np.abs((rest.lon - (west + east) / 2 + 180.0) % 360.0 - 180.0)
    away = (off_centre > (east - west) / 2 + 10) | (rest.lat < south - 10)
    away |= rest.lat > north + 10
    rest = rest[away].head(size - len(local))
    return CraterCatalog(pd.concat([local, rest], ignore_index=True), f"{size} craters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tiles", type=int, default=4, help="tiles per side of the grid")
    parser.add_argument("--local", type=int, default=500, help="craters over the tiles")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--brute-tiles", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    res = 0.01  # degrees, about 300 m
    west, north = 170.0, 10.0  # 2048 px of 0.01 degrees reach across the antimeridian
    side = args.tile * args.tiles
    east, south = west + res * side, north - res * side
    local = craters(args.local, west, south, east, north, args.seed)
    tiles = [(iy, ix) for iy in range(args.tiles) for ix in range(args.tiles)]

    def tile_grid(iy: int, ix: int) -> Affine:
        return Affine(res, 0, west + res * ix * args.tile, 0, -res, north - res * iy * args.tile)

    print(f"CPU: {cpu()}")
    print(
        f"grid: {side} x {side} px of {res * MOON_KM_PER_DEG:.2f} km on the Moon (lon/lat, "
        f"{west:.0f}..{east:.1f} E), {len(tiles)} tiles of {args.tile} px, "
        f"{args.local} craters over them"
    )
    catalogs, builds = {}, {}
    for size in args.sizes:
        catalogs[size] = catalog_of(local, size, (west, south, east, north), args.seed + 1)
        start = time.perf_counter()
        catalogs[size].index(MOON)
        builds[size] = time.perf_counter() - start

    def draw(size: int, iy: int, ix: int, *, indexed: bool = True) -> np.ndarray:
        catalog = catalogs[size]
        return rasterize_craters(
            catalog,
            crs=MOON,
            transform=tile_grid(iy, ix),
            shape=(args.tile, args.tile),
            values=class_values(catalog.classes),
            indexed=indexed,
        )

    # Rounds alternate between the catalogs, so that a load change on the machine hits both;
    # the first round warms PROJ's caches up and is not timed.
    rounds: dict[int, list[float]] = {size: [] for size in args.sizes}
    drawn: dict[tuple[int, int, int], np.ndarray] = {}
    for _ in range(1 + args.repeat):
        for size in args.sizes:
            start = time.perf_counter()
            for iy, ix in tiles:
                drawn[size, iy, ix] = draw(size, iy, ix)
            rounds[size].append((time.perf_counter() - start) / len(tiles))
    per_tile = {size: statistics.median(times[1:]) for size, times in rounds.items()}
    for size in args.sizes:
        brute = []
        for iy, ix in tiles[: args.brute_tiles]:
            start = time.perf_counter()
            want = draw(size, iy, ix, indexed=False)
            brute.append(time.perf_counter() - start)
            if not np.array_equal(drawn[size, iy, ix], want):
                raise SystemExit(f"tile {iy},{ix} at {size} craters differs from testing all")
        labelled = np.mean([(drawn[size, iy, ix] > 0).mean() for iy, ix in tiles])
        print(
            f"{size:>8,} craters: index built in {builds[size]:5.2f} s; per tile "
            f"{per_tile[size] * 1e3:6.1f} ms indexed, {statistics.mean(brute) * 1e3:7.1f} ms "
            f"testing every crater ({len(brute)} tiles, identical); {100 * labelled:.1f} % of "
            "pixels labelled"
        )
    lo, hi = min(args.sizes), max(args.sizes)
    print(
        f"per-tile time, {hi:,} / {lo:,} craters in the catalog: {per_tile[hi] / per_tile[lo]:.2f}"
    )


if __name__ == "__main__":
    main()
