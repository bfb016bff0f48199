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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planetseg.config import DiffConfig
from planetseg.errors import InvalidArgumentError
from planetseg.products import LabelsStore, product_item, write_product_catalog
from planetseg.store import create_owned_dir, prepare_output, remove_owned

logger = logging.getLogger(__name__)

#: ``change.tif``'s value (and nodata) where no change is kept.
UNCHANGED = 255
#: Suffix of the staging folder beside ``--out``.
STAGING = ".partial"


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


def change_regions(codes: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Connected change regions (8-connected, one from->to code each), numbered from 1.

    One code per region: a crater that appears is one region, not merged with a neighbour's
    other change.
    """
    from scipy import ndimage

    regions = np.zeros(changed.shape, np.int64)
    offset = 0
    for code in np.unique(codes[changed]):
        lab, n = ndimage.label(changed & (codes == code), structure=np.ones((3, 3)))
        regions[lab > 0] = lab[lab > 0] + offset
        offset += n
    return regions


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
    """(from->to codes, changed mask, change regions) after the confidence and area filters.

    The regions are those of :func:`change_regions`, 0 outside the kept changes.
    """
    codes = before.astype(np.int32) * n_classes + after.astype(np.int32)
    changed = before != after
    if confidence is not None and min_confidence > 0:
        c0, c1 = confidence
        sure = (np.nan_to_num(c0) >= min_confidence) & (np.nan_to_num(c1) >= min_confidence)
        changed &= sure
    regions = change_regions(codes, changed)
    if min_area_m2 > 0 and changed.any():
        sizes = np.bincount(regions.ravel(), weights=area_km2.ravel())
        small = sizes * 1e6 < min_area_m2
        small[0] = False
        changed &= ~small[regions]
        regions[~changed] = 0  # whole regions go: the others stay as they were
    return codes, changed, regions


def transition_table(
    codes: np.ndarray,
    changed: np.ndarray,
    area_km2: np.ndarray,
    classes: dict[int, str],
    n: int,
) -> list[dict[str, Any]]:
    """Pixels and km^2 per (from, to) over the whole grid, from ``codes = before * n + after``.

    ``changed`` marks the kept changes; unchanged pixels count on the diagonal.
    """
    unchanged = codes // n == codes % n
    kept = np.where(changed | unchanged, codes, -1).ravel()
    valid = kept >= 0
    pixels = np.bincount(kept[valid], minlength=n * n)
    areas = np.bincount(kept[valid], weights=area_km2.ravel()[valid], minlength=n * n)
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


def diff(store: str | Path, config: DiffConfig) -> DiffResult:
    """Compare two epochs (of ``store``, or of ``store`` and ``config.other``) into ``config.out``.

    Raises:
        CatalogReadError: not a complete labels store.
        InvalidArgumentError / MixedBodiesError: unknown times, stores on other grids or bodies,
            bad thresholds.
        OutputPathError: ``config.out`` is an input, a file, not writable, an earlier diff's
            without ``overwrite``, or holds what diff did not write.
    """
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
    before, after = first.read(t0), second.read(t1)
    n = max(max(classes, default=0), int(before.max(initial=0)), int(after.max(initial=0))) + 1
    confidence = (first.read(t0, "confidence"), second.read(t1, "confidence"))
    area = first.pixel_area_km2()
    codes, changed, regions = change_mask(
        before,
        after,
        area_km2=area,
        confidence=confidence,
        min_confidence=config.min_confidence,
        min_area_m2=config.min_area_m2,
        n_classes=n,
    )
    table = transition_table(codes, changed, area, classes, n)
    out = output.path
    staging = out.with_name(out.name + STAGING)
    remove_owned(staging, "diff")  # what a killed diff left
    create_owned_dir(staging, "diff")
    try:
        files = _write_outputs(
            staging,
            first,
            second,
            (t0, t1),
            before,
            after,
            codes,
            changed,
            regions,
            area,
            table,
            classes,
            n,
            config,
        )
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
        int(changed.sum()),
        float(area[changed].sum()),
        table,
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
    before: np.ndarray,
    after: np.ndarray,
    codes: np.ndarray,
    changed: np.ndarray,
    regions: np.ndarray,
    area: np.ndarray,
    table: list[dict[str, Any]],
    classes: dict[int, str],
    n: int,
    config: DiffConfig,
) -> list[Path]:
    from planetseg import palette
    from planetseg.cog import write_cog

    code_raster = np.where(changed, codes, UNCHANGED).astype(np.uint8 if n * n < 255 else np.uint16)
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
        int(code): f"{classes.get(f, str(f))}->{classes.get(t, str(t))}"
        for code in np.unique(codes[changed])
        for f, t in [divmod(int(code), n)]
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
        lambda ys, xs: changed[ys, xs].astype(np.uint8),
        dtype="uint8",
        description="1 changed, 0 unchanged",
        tags=provenance,
        classes={0: "unchanged", 1: "changed"},
        colormap={0: palette.UNCHANGED, 1: palette.CHANGED},
        **grid,
    )
    csv = folder / "transitions.csv"
    import pandas as pd

    pd.DataFrame(table).to_csv(csv, index=False)
    polygons = _polygons(folder / "changes.parquet", codes, regions, area, first, classes, n)
    png = _quicklook(folder / "quicklook.png", before, after, changed, classes, n, (when0, when1))
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
            "planetseg:changed_pixels": int(changed.sum()),
            "planetseg:changed_km2": float(area[changed].sum()),
            "planetseg:transitions": table,
        },
        collection="planetseg-change",
        projection_asset="change",
    )
    final = Path(config.out).resolve()
    for asset in item["assets"].values():  # point at where the folder is about to be moved
        asset["href"] = str(final / Path(asset["href"]).name)
    write_product_catalog(folder, [item], "planetseg-change", "planetseg change maps")
    return [change_tif, mask_tif, csv, polygons, png]


def _polygons(
    path: Path,
    codes: np.ndarray,
    regions: np.ndarray,
    area: np.ndarray,
    store: LabelsStore,
    classes: dict[int, str],
    n: int,
) -> Path:
    """Change regions as polygons (GeoParquet, the store's CRS) with classes and body area."""
    import geopandas as gpd
    import rasterio.features
    from affine import Affine
    from shapely.geometry import shape
    from shapely.ops import unary_union

    from planetseg.bodies import celestial_proj

    flat = regions.ravel()
    km2 = np.bincount(flat, weights=area.ravel())
    px = np.bincount(flat)
    code_of = np.zeros(len(px), np.int64)
    code_of[flat] = codes.ravel()
    parts: dict[int, list[Any]] = {}
    for geom, value in rasterio.features.shapes(
        regions.astype(np.int32),
        mask=regions > 0,
        transform=Affine(*store.transform),
        connectivity=8,
    ):
        parts.setdefault(int(value), []).append(shape(geom))
    records, geoms = [], []
    for region, polys in sorted(parts.items()):
        f, t = divmod(int(code_of[region]), n)
        geoms.append(unary_union(polys))
        records.append(
            {
                "from": f,
                "to": t,
                "from_class": classes.get(f, str(f)),
                "to_class": classes.get(t, str(t)),
                "pixels": int(px[region]),
                "area_km2": float(km2[region]),
            }
        )
    with celestial_proj():
        frame = gpd.GeoDataFrame(records, geometry=geoms, crs=store.crs_wkt)
        if frame.empty:
            frame = gpd.GeoDataFrame(
                {k: [] for k in ("from", "to", "from_class", "to_class", "pixels", "area_km2")},
                geometry=[],
                crs=store.crs_wkt,
            )
        frame.to_parquet(path)
    return path


def quicklook_figure(
    before: np.ndarray,
    after: np.ndarray,
    changed: np.ndarray,
    classes: dict[int, str],
    n: int,
    when: tuple[str, str],
) -> Any:
    """The before, after and change maps side by side, with a legend for every colour.

    Before and after are drawn in the class colours of :mod:`planetseg.palette`; the change
    map in its change colours: changed, unchanged, and "differs, dropped" where the classes
    differ but a filter (``--min-confidence``, ``--min-area``) removed the change. Every
    colour drawn has a legend entry. Returns the matplotlib figure (not yet saved).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from planetseg import palette

    colors = [palette.as_float(palette.class_color(k)) for k in range(n)]
    step = max(1, max(before.shape) // 1024)  # a quick look, not the product
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
    axes[2].set_title(f"change: {int(changed.sum()):,} px")
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
) -> Path:
    """:func:`quicklook_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = quicklook_figure(before, after, changed, classes, n, when)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
