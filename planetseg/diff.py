"""The ``diff`` stage: post-classification change between two epochs of a labels store.

For every pixel the class before and after give a from->to code (``before * n + after``);
a pixel has *changed* where they differ, unless

* either epoch's confidence is below ``min_confidence`` (the models' own doubt: shadows under
  another sun are where a segmentation is least sure), or
* its connected change region (8-connected, same from->to code) covers less than
  ``min_area_m2`` on the body.

Outputs, all in ``--out``, written to a staging folder ``<out>.partial`` and moved into place
only when complete (an earlier diff's folder is replaced only with ``--overwrite``; any other
existing folder is refused):

* ``change.tif`` (from->to code, 255 where unchanged) and ``mask.tif`` (1 changed), COGs
  with a colour table and a name per value (``CLASS_<v>``), in the quick look's colours;
* ``transitions.csv``: pixels and km^2 per from->to, areas on the body's own ellipsoid and
  projection (also in the STAC item);
* ``changes.parquet``: GeoParquet polygons in the body's CRS, one per change region, with
  from/to classes and area;
* ``quicklook.png``: before / after / change, with a legend entry for every colour drawn;
* ``items.ndjson`` + ``collection.json``: a STAC item describing them (a local catalog).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planetseg.config import DiffConfig
from planetseg.errors import InvalidArgumentError
from planetseg.executor import map_tasks
from planetseg.products import (
    BlockGrid,
    LabelsStore,
    Window,
    block_edges,
    merge_labels,
    open_labels,
    product_item,
    regions,
    write_product_catalog,
)
from planetseg.store import create_owned_dir, prepare_output, remove_owned

logger = logging.getLogger(__name__)

#: ``change.tif``'s value (and nodata) where no change is kept.
UNCHANGED = 255
#: Suffix of the staging folder beside ``--out``.
STAGING = ".partial"
#: The blocks' change codes and mask, in the staging folder until the COGs are written.
SCRATCH = "blocks.zarr"
#: Codes of the first pass, before the number of classes is known (labels are uint8).
WIDE = 256
#: Largest side of the quick look's maps (px): the grids are sampled every n-th pixel.
QUICKLOOK_PX = 1024


@dataclass(frozen=True)
class DiffResult:
    """What :func:`diff` wrote and found.

    Attributes:
        out: Output folder.
        before: Datetime of the first epoch.
        after: Datetime of the second epoch.
        changed_pixels: Pixels marked changed (after the filters).
        changed_km2: Their area on the body.
        transitions: Rows of the transition table.
        files: Every file written.
    """

    out: Path
    before: str
    after: str
    changed_pixels: int
    changed_km2: float
    transitions: list[dict[str, Any]]
    files: tuple[Path, ...]


def change_codes(
    before: np.ndarray,
    after: np.ndarray,
    *,
    n_classes: int,
    confidence: tuple[np.ndarray, np.ndarray] | None = None,
    min_confidence: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(from->to codes ``before * n + after``, changed mask after the confidence filter)."""
    codes = before.astype(np.int32) * n_classes + after.astype(np.int32)
    changed = before != after
    if confidence is not None and min_confidence > 0:
        c0, c1 = confidence
        sure = (np.nan_to_num(c0) >= min_confidence) & (np.nan_to_num(c1) >= min_confidence)
        changed &= sure
    return codes, changed


def change_mask(
    before: np.ndarray,
    after: np.ndarray,
    *,
    area_km2: np.ndarray,
    confidence: tuple[np.ndarray, np.ndarray] | None = None,
    min_confidence: float = 0.0,
    min_area_m2: float = 0.0,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(from->to codes, changed mask, change regions) of whole grids held in memory.

    The regions are the 8-connected regions of one from->to code each (a crater that appears
    is one region, not merged with a neighbour's other change), numbered from 1, 0 outside
    the kept changes. :func:`diff` computes the same block by block.
    """
    codes, changed = change_codes(
        before, after, n_classes=n_classes, confidence=confidence, min_confidence=min_confidence
    )
    found, _ = regions(codes, changed)
    if min_area_m2 > 0 and changed.any():
        sizes = np.bincount(found.ravel(), weights=area_km2.ravel())
        small = sizes * 1e6 < min_area_m2
        small[0] = False
        changed &= ~small[found]
        found[~changed] = 0  # whole regions go: the others stay as they were
    return codes, changed, found


def transition_counts(
    codes: np.ndarray, changed: np.ndarray, area_km2: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and km^2 per code ``before * n + after`` (``n * n`` each) of the counted pixels.

    ``changed`` marks the kept changes; unchanged pixels count on the diagonal, a change a
    filter dropped nowhere.
    """
    unchanged = codes // n == codes % n
    kept = np.where(changed | unchanged, codes, -1).ravel()
    valid = kept >= 0
    pixels = np.bincount(kept[valid], minlength=n * n)
    areas = np.bincount(kept[valid], weights=area_km2.ravel()[valid], minlength=n * n)
    return pixels, areas


def transition_rows(
    pixels: np.ndarray, areas: np.ndarray, classes: dict[int, str], n: int
) -> list[dict[str, Any]]:
    """The transition table's rows from :func:`transition_counts` (summed over the grid)."""
    rows = []
    for code in np.flatnonzero(pixels):
        f, t = divmod(int(code), n)
        rows.append(
            {
                "from": f,
                "to": t,
                "from_class": classes.get(f, str(f)),
                "to_class": classes.get(t, str(t)),
                "changed": f != t,
                "pixels": int(pixels[code]),
                "area_km2": float(areas[code]),
            }
        )
    return rows


def transition_table(
    codes: np.ndarray,
    changed: np.ndarray,
    area_km2: np.ndarray,
    classes: dict[int, str],
    n: int,
) -> list[dict[str, Any]]:
    """Pixels and km^2 per (from, to) of whole grids in memory (see :func:`transition_counts`)."""
    return transition_rows(*transition_counts(codes, changed, area_km2, n), classes, n)


def region_polygons(found: np.ndarray, offset: tuple[int, int] = (0, 0)) -> dict[int, list[Any]]:
    """Polygon parts of every region of ``found`` (0: none), in pixel coordinates of the grid.

    ``offset`` is the (row, column) of ``found``'s first pixel in the grid. The parts of a
    region, from any number of blocks, make its polygon by :func:`region_polygon`.
    """
    import warnings

    import rasterio.features
    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning
    from shapely.geometry import shape

    parts: dict[int, list[Any]] = {}
    with warnings.catch_warnings():  # pixel coordinates: at (0, 0) the identity transform
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for geom, value in rasterio.features.shapes(
            found.astype(np.int32),
            mask=found > 0,
            transform=Affine.translation(offset[1], offset[0]),
            connectivity=4,  # no part touches itself at a corner: unions equal from any blocks
        ):
            parts.setdefault(int(value), []).append(shape(geom))
    return parts


def region_polygon(parts: list[Any], transform: tuple[float, ...]) -> Any:
    """One region's polygon in the grid's CRS from its parts: unioned, normalised.

    The union is exact (integer pixel corners) and collinear vertices (where blocks met) go,
    so the polygon does not depend on the blocks it was computed in.
    """
    import shapely
    from shapely.affinity import affine_transform

    a, b, c, d, e, f = transform
    merged = shapely.simplify(shapely.union_all(parts), 0)
    return shapely.normalize(affine_transform(merged, [a, b, d, e, c, f]))


@dataclass(frozen=True)
class _Pair:
    """The two epochs compared (what a task needs to read its block of them)."""

    first: str
    t0: int
    second: str
    t1: int
    min_confidence: float

    def changes(
        self, window: Window, n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """(before, after, codes, changed, regions, count) of a block, filtered by confidence.

        The regions (:func:`~planetseg.products.regions`) are numbered the same for any
        ``n`` larger than every class: the first pass labels without knowing ``n``.
        """
        first, second = open_labels(self.first), open_labels(self.second)
        before, after = first.read(self.t0, window=window), second.read(self.t1, window=window)
        confidence = None
        if self.min_confidence > 0:
            confidence = (
                first.read(self.t0, "confidence", window),
                second.read(self.t1, "confidence", window),
            )
        codes, changed = change_codes(
            before, after, n_classes=n, confidence=confidence, min_confidence=self.min_confidence
        )
        found, count = regions(codes, changed)
        return before, after, codes, changed, found, count


def _region_stats(pair: _Pair, window: Window) -> dict[str, Any]:
    """First pass over a block: its change regions' pixels, areas, codes, first pixels, edges."""
    before, after, codes, changed, found, count = pair.changes(window, WIDE)
    store = open_labels(pair.first)
    area = store.pixel_area_km2(window)
    flat = found.ravel()
    present, first = np.unique(flat, return_index=True)
    (r0, _), (c0, c1) = window
    first_pixel = (r0 + first // (c1 - c0)) * store.shape[1] + c0 + first % (c1 - c0)
    code = np.zeros(count + 1, np.int64)
    code[flat] = codes.ravel()
    return {
        "count": count,
        "pixels": np.bincount(flat, minlength=count + 1)[1:],
        "km2": np.bincount(flat, weights=area.ravel(), minlength=count + 1)[1:],
        "code": code[1:],
        "first": first_pixel[present > 0],
        "edges": block_edges(found, codes),
        "top": int(max(before.max(initial=0), after.max(initial=0))),
    }


def _write_block(
    pair: _Pair,
    window: Window,
    keep: np.ndarray,
    ids: np.ndarray,
    n: int,
    scratch: str,
    step: int,
) -> dict[str, Any]:
    """Second pass over a block: its kept changes into the scratch store, counts, polygons.

    ``keep`` and ``ids`` are, per region of the block (index 0: no region), whether it is
    kept and its object number over the whole grid.
    """
    import zarr

    before, after, codes, _, found, _ = pair.changes(window, n)
    kept = keep[found]
    area = open_labels(pair.first).pixel_area_km2(window)
    (r0, r1), (c0, c1) = window
    change = zarr.open_array(scratch, path="change", mode="r+")
    change[r0:r1, c0:c1] = np.where(kept, codes, UNCHANGED).astype(change.dtype)
    zarr.open_array(scratch, path="mask", mode="r+")[r0:r1, c0:c1] = kept.astype(np.uint8)
    parts = region_polygons(np.where(kept, found, 0), (r0, c0))
    rows, cols = (np.arange(-(-lo // step) * step, hi, step) - lo for lo, hi in window)
    sample = np.ix_(rows, cols)
    return {
        "counts": transition_counts(codes, kept, area, n),
        "changed": int(kept.sum()),
        "km2": float(area[kept].sum()),
        "parts": [(int(ids[k]), v) for k, v in parts.items()],  # a region may have several
        "sample": (-(-r0 // step), -(-c0 // step), before[sample], after[sample], kept[sample]),
    }


@dataclass
class _Changes:
    """What the two passes found over the whole grid (see :func:`_compute`)."""

    table: list[dict[str, Any]]
    changed_pixels: int
    changed_km2: float
    polygons: list[tuple[dict[str, Any], Any]]
    samples: tuple[np.ndarray, np.ndarray, np.ndarray]
    present: list[int]


def _compute(
    pair: _Pair,
    first: LabelsStore,
    grid: BlockGrid,
    classes: dict[int, str],
    config: DiffConfig,
    scratch: Path,
    client: Any,
    progress: Callable[[int, int], None] | None,
) -> tuple[_Changes, int]:
    """Both passes: regions per block merged across borders, then the kept changes written."""
    import zarr

    blocks = list(grid.blocks())
    total = 2 * len(blocks)
    stats: dict[tuple[int, int], dict[str, Any]] = {}
    map_tasks(
        _region_stats,
        ((pair, grid.window(*b)) for b in blocks),
        lambda k, r: stats.__setitem__(blocks[k], r),
        client=client,
        progress=progress,
        total=total,
    )
    offsets, objects = merge_labels(
        grid, {b: r["count"] for b, r in stats.items()}, {b: r["edges"] for b, r in stats.items()}
    )
    n = max(max(classes, default=0), *(r["top"] for r in stats.values())) + 1
    every = lambda key: np.concatenate([stats[b][key] for b in blocks])  # noqa: E731
    n_obj = int(objects.max()) + 1 if len(objects) else 0
    obj_px = np.bincount(objects, weights=every("pixels"), minlength=n_obj).astype(np.int64)
    obj_km2 = np.bincount(objects, weights=every("km2"), minlength=n_obj)
    obj_code = np.zeros(n_obj, np.int64)
    obj_code[objects] = every("code")
    obj_first = np.full(n_obj, np.iinfo(np.int64).max)
    np.minimum.at(obj_first, objects, every("first"))
    keep = np.ones(n_obj, bool)
    if config.min_area_m2 > 0:
        keep = ~(obj_km2 * 1e6 < config.min_area_m2)
    step = max(1, max(first.shape) // QUICKLOOK_PX)
    dtype = np.uint8 if n * n < UNCHANGED else np.uint16
    chunks = (grid.rows[1] - grid.rows[0], grid.cols[1] - grid.cols[0])
    for name, kind, fill in (("change", dtype, UNCHANGED), ("mask", np.uint8, 0)):
        zarr.create_array(
            str(scratch), name=name, shape=first.shape, chunks=chunks, dtype=kind, fill_value=fill
        )

    def task(b: tuple[int, int]) -> tuple[Any, ...]:
        local = objects[offsets[b] : offsets[b] + stats[b]["count"]]
        ids = np.r_[-1, local]
        return pair, grid.window(*b), np.r_[False, keep[local]], ids, n, str(scratch), step

    sh = (-(-first.shape[0] // step), -(-first.shape[1] // step))
    before, after = np.zeros(sh, np.uint8), np.zeros(sh, np.uint8)
    kept = np.zeros(sh, bool)
    pixels, areas = np.zeros(n * n, np.int64), np.zeros(n * n)
    changed = [0, 0.0]
    parts: dict[int, list[Any]] = {}

    def gather(_: int, r: dict[str, Any]) -> None:
        pixels[:] += r["counts"][0]
        areas[:] += r["counts"][1]
        changed[0] += r["changed"]
        changed[1] += r["km2"]
        for k, v in r["parts"]:
            parts.setdefault(k, []).extend(v)
        i, j, b, a, c = r["sample"]
        for target, block in ((before, b), (after, a), (kept, c)):
            target[i : i + block.shape[0], j : j + block.shape[1]] = block

    def second(done: int, _: int) -> None:
        if progress:
            progress(len(blocks) + done, total)

    map_tasks(
        _write_block, (task(b) for b in blocks), gather, client=client, progress=second, total=total
    )
    polygons = []
    for k in sorted(parts, key=lambda k: obj_first[k]):  # in raster order of first pixels
        f, t = divmod(int(obj_code[k]), WIDE)
        record = {
            "from": f,
            "to": t,
            "from_class": classes.get(f, str(f)),
            "to_class": classes.get(t, str(t)),
            "pixels": int(obj_px[k]),
            "area_km2": float(obj_km2[k]),
        }
        polygons.append((record, region_polygon(parts[k], first.transform)))
    present = [int(c) for c in np.flatnonzero(pixels) if c // n != c % n]
    result = _Changes(
        transition_rows(pixels, areas, classes, n),
        changed[0],
        changed[1],
        polygons,
        (before, after, kept),
        present,
    )
    return result, n


def diff(
    store: str | Path,
    config: DiffConfig,
    *,
    client: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> DiffResult:
    """Compare two epochs (of ``store``, or of ``store`` and ``config.other``) into ``config.out``.

    Computed block by block (``config.block``), on ``client``'s workers or on threads here
    without one; the results equal those of the whole grids in memory (:func:`change_mask`,
    :func:`transition_table`, :func:`region_polygons`), to the rounding of area sums.

    Raises:
        CatalogReadError: not a complete labels store.
        InvalidArgumentError / MixedBodiesError: unknown times, stores on other grids or bodies,
            bad thresholds.
        OutputPathError: ``config.out`` is an input, a file, not writable, an earlier diff's
            without ``overwrite``, or holds what diff did not write.
    """
    import shutil

    output = prepare_output(
        config.out,
        "diff",
        inputs=(store, config.other),
        overwrite=config.overwrite,
        replace_needs_overwrite=True,
        scratch=(STAGING,),
    )
    first = LabelsStore.open(store)
    second = LabelsStore.open(config.other) if config.other else first
    if second is not first:
        first.same_grid(second)
    t0 = first.time_index(config.before, "--before")
    t1 = second.time_index(config.after, "--after")
    if second is first and t0 == t1:
        raise InvalidArgumentError("--before and --after name the same time step: pick two")
    classes = {**second.classes, **first.classes}
    pair = _Pair(str(first.path), t0, str(second.path), t1, config.min_confidence)
    out = output.path
    staging = out.with_name(out.name + STAGING)
    remove_owned(staging, "diff")  # what a killed diff left
    create_owned_dir(staging, "diff")
    try:
        found, n = _compute(
            pair, first, first.grid(config.block), classes, config, staging / SCRATCH,
            client, progress,
        )  # fmt: skip
        files = _write_outputs(staging, first, second, (t0, t1), found, classes, n, config)
        shutil.rmtree(staging / SCRATCH)
        if output.earlier:
            remove_owned(out, "diff")
        staging.rename(out)  # all or nothing (an empty folder is replaced by the rename)
    except BaseException:
        remove_owned(staging, "diff")
        raise
    return DiffResult(
        out,
        first.times[t0],
        second.times[t1],
        found.changed_pixels,
        found.changed_km2,
        found.table,
        tuple(out / f.name for f in files),
    )


def read_diff(folder: str | Path) -> DiffResult:
    """The result of an earlier :func:`diff`, from the STAC item in its folder.

    Raises:
        CatalogReadError: ``folder`` is not a change folder diff wrote.
    """
    from planetseg.errors import CatalogReadError
    from planetseg.items import read_items

    out = Path(folder)
    try:
        [item] = read_items(out / "items.ndjson")
        props = item["properties"]
        when = (props["planetseg:before"], props["planetseg:after"])
        counts = (props["planetseg:changed_pixels"], props["planetseg:changed_km2"])
        table = props["planetseg:transitions"]
    except (CatalogReadError, KeyError, ValueError) as exc:
        raise CatalogReadError(f"{out} is not a change folder of planetseg diff") from exc
    files = tuple(out / Path(a["href"]).name for a in item["assets"].values())
    return DiffResult(out, *when, int(counts[0]), float(counts[1]), table, files)


def _write_outputs(
    folder: Path,
    first: LabelsStore,
    second: LabelsStore,
    times: tuple[int, int],
    found: _Changes,
    classes: dict[int, str],
    n: int,
    config: DiffConfig,
) -> list[Path]:
    import zarr

    from planetseg import palette
    from planetseg.cog import write_cog

    scratch = str(folder / SCRATCH)
    code_raster = zarr.open_array(scratch, path="change", mode="r")
    changed = zarr.open_array(scratch, path="mask", mode="r")
    grid = {
        "crs_wkt": first.crs_wkt,
        "transform": first.transform,
        "shape": first.shape,
        "block": 512,
    }
    when0, when1 = first.times[times[0]], second.times[times[1]]
    provenance = {
        "planetseg_before": f"{first.path}@{when0}",
        "planetseg_after": f"{second.path}@{when1}",
        "planetseg_model_before": str(first.attrs.get("planetseg:model", "")),
        "planetseg_model_after": str(second.attrs.get("planetseg:model", "")),
    }
    # Each from->to code present is named and drawn in the quick look's change colour.
    transitions = {
        code: f"{classes.get(f, str(f))}->{classes.get(t, str(t))}"
        for code in found.present
        for f, t in [divmod(code, n)]
    }
    change_tif = write_cog(
        folder / "change.tif",
        lambda ys, xs: code_raster[ys, xs],
        dtype=str(code_raster.dtype),
        nodata=UNCHANGED,
        description="from*n+to class code of changed pixels",
        tags={**provenance, "planetseg_codes": json.dumps({str(k): v for k, v in classes.items()})},
        classes=transitions,
        colormap={**dict.fromkeys(transitions, palette.CHANGED), UNCHANGED: palette.NODATA},
        **grid,
    )
    mask_tif = write_cog(
        folder / "mask.tif",
        lambda ys, xs: changed[ys, xs],
        dtype="uint8",
        description="1 changed, 0 unchanged",
        tags=provenance,
        classes={0: "unchanged", 1: "changed"},
        colormap={0: palette.UNCHANGED, 1: palette.CHANGED},
        **grid,
    )
    csv = folder / "transitions.csv"
    import pandas as pd

    pd.DataFrame(found.table).to_csv(csv, index=False)
    polygons = _polygons(folder / "changes.parquet", found.polygons, first)
    png = _quicklook(
        folder / "quicklook.png", *found.samples, classes, n, (when0, when1), found.changed_pixels
    )
    item = product_item(
        f"diff-{when0}-{when1}".replace(":", ""),
        {
            "change": {"href": str(change_tif), "roles": ["data"], "title": "from->to codes"},
            "mask": {"href": str(mask_tif), "roles": ["data"], "title": "change mask"},
            "polygons": {
                "href": str(polygons),
                "type": "application/vnd.apache.parquet",
                "roles": ["data"],
                "title": "change polygons (GeoParquet)",
            },
            "transitions": {"href": str(csv), "type": "text/csv", "roles": ["metadata"]},
            "quicklook": {"href": str(png), "type": "image/png", "roles": ["overview"]},
        },
        start=when0,
        end=when1,
        properties={
            "planetseg:product": "change",
            "planetseg:models": sorted(
                {provenance["planetseg_model_before"], provenance["planetseg_model_after"]}
            ),
            "planetseg:labels": sorted({str(first.path.resolve()), str(second.path.resolve())}),
            "planetseg:min_confidence": config.min_confidence,
            "planetseg:min_area_m2": config.min_area_m2,
            "planetseg:before": when0,
            "planetseg:after": when1,
            "planetseg:changed_pixels": found.changed_pixels,
            "planetseg:changed_km2": found.changed_km2,
            "planetseg:transitions": found.table,
        },
        collection="planetseg-change",
        projection_asset="change",
    )
    final = Path(config.out).resolve()
    for asset in item["assets"].values():  # point at where the folder is about to be moved
        asset["href"] = str(final / Path(asset["href"]).name)
    write_product_catalog(folder, [item], "planetseg-change", "planetseg change maps")
    return [change_tif, mask_tif, csv, polygons, png]


def _polygons(path: Path, polygons: list[tuple[dict[str, Any], Any]], store: LabelsStore) -> Path:
    """Change regions as polygons (GeoParquet, the store's CRS) with classes and body area."""
    import geopandas as gpd

    from planetseg.bodies import celestial_proj

    columns = ("from", "to", "from_class", "to_class", "pixels", "area_km2")
    records = [r for r, _ in polygons] or {k: [] for k in columns}
    with celestial_proj():
        frame = gpd.GeoDataFrame(records, geometry=[g for _, g in polygons], crs=store.crs_wkt)
        frame.to_parquet(path)
    return path


def quicklook_figure(
    before: np.ndarray,
    after: np.ndarray,
    changed: np.ndarray,
    classes: dict[int, str],
    n: int,
    when: tuple[str, str],
    changed_pixels: int | None = None,
) -> Any:
    """The before, after and change maps side by side, with a legend for every colour.

    Before and after are drawn in the class colours of :mod:`planetseg.palette`; the change
    map in its change colours: changed, unchanged, and "differs, dropped" where the classes
    differ but a filter (``--min-confidence``, ``--min-area``) removed the change. Every
    colour drawn has a legend entry. The maps may come sampled already, with the pixels
    changed on the whole grid as ``changed_pixels``. Returns the matplotlib figure (not yet
    saved).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from planetseg import palette

    colors = [palette.as_float(palette.class_color(k)) for k in range(n)]
    step = max(1, max(before.shape) // QUICKLOOK_PX)  # a quick look, not the product
    b, a, c = before[::step, ::step], after[::step, ::step], changed[::step, ::step]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), constrained_layout=True)
    for ax, img, title in ((axes[0], b, f"before {when[0]}"), (axes[1], a, f"after {when[1]}")):
        ax.imshow(
            img, cmap=ListedColormap(colors), vmin=-0.5, vmax=n - 0.5, interpolation="nearest"
        )
        ax.set_title(title)
    change_rgba = np.empty((*c.shape, 4))
    change_rgba[:] = palette.as_float(palette.UNCHANGED)
    change_rgba[(b != a) & ~c] = palette.as_float(palette.DROPPED)
    change_rgba[c] = palette.as_float(palette.CHANGED)
    axes[2].imshow(change_rgba, interpolation="nearest")
    count = int(changed.sum()) if changed_pixels is None else changed_pixels
    axes[2].set_title(f"change: {count:,} px")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=colors[k], label=classes.get(k, str(k))) for k in range(n)]
    handles += [
        Patch(color=palette.as_float(rgba), label=label)
        for rgba, label in palette.CHANGE_LABELS.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    return fig


def _quicklook(
    path: Path,
    before: np.ndarray,
    after: np.ndarray,
    changed: np.ndarray,
    classes: dict[int, str],
    n: int,
    when: tuple[str, str],
    changed_pixels: int,
) -> Path:
    """:func:`quicklook_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = quicklook_figure(before, after, changed, classes, n, when, changed_pixels)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
