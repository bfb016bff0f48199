"""The ``evaluate`` stage: an exported model's scores on a labelled cube.

The cube's imagery is treated as the high-resolution truth: it is degraded exactly as in
training (the model card's degradation) to make the low-resolution input, the model predicts
labels at ``scale`` x that input, and the prediction is scored against the cube's HR labels.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from planetseg.data import Degradation, open_cube, spatial_split
from planetseg.errors import CheckpointError, InvalidArgumentError
from planetseg.export import load_model
from planetseg.metrics import confusion_matrix, scores
from planetseg.model import NetConfig, SegmentationNet, receptive_radius


@dataclass(frozen=True)
class Tile:
    """One tile of :func:`predict_logits`, in LR pixels: the part it predicts, the part it reads.

    Attributes:
        y0: First row predicted.
        y1: Row after the last predicted.
        x0: First column predicted.
        x1: Column after the last predicted.
        ya: First row read (``y0`` minus the halo, clipped to the image).
        yb: Row after the last read.
        xa: First column read.
        xb: Column after the last read.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    ya: int
    yb: int
    xa: int
    xb: int

    def in_window(self) -> Tile:
        """The same tile, in the pixels of the window it reads (which starts at 0, 0)."""
        dy, dx = self.ya, self.xa
        return Tile(
            self.y0 - dy, self.y1 - dy, self.x0 - dx, self.x1 - dx,
            0, self.yb - dy, 0, self.xb - dx,
        )  # fmt: skip


def halo_of(config: NetConfig) -> int:
    """LR pixels of context a tile reads on each side (the default halo).

    The network's receptive radius rounded up to its divisor: tiles put together then equal
    one pass.
    """
    m = config.divisor
    return math.ceil(receptive_radius(config) / m) * m


def tiles(
    config: NetConfig, h: int, w: int, *, tile: int | None = 512, halo: int | None = None
) -> list[Tile]:
    """The tiles, row by row, that :func:`predict_logits` cuts an ``h`` x ``w`` LR image into.

    Args:
        config: The network's shape (its divisor and receptive radius).
        h: LR image height.
        w: LR image width.
        tile: LR tile size (a multiple of the network's divisor); None for one tile.
        halo: LR pixels of context around each tile; None for the network's receptive radius.
    """
    m = config.divisor
    if tile is None:
        tile, halo = max(h, w), 0
    elif tile % m:
        raise ValueError(f"tile {tile} is not a multiple of the network's divisor {m}")
    if halo is None:
        halo = halo_of(config)
    return [
        Tile(
            y0,
            min(y0 + tile, h),
            x0,
            min(x0 + tile, w),
            max(y0 - halo, 0),
            min(y0 + tile + halo, h),
            max(x0 - halo, 0),
            min(x0 + tile + halo, w),
        )
        for y0 in range(0, h, tile)
        for x0 in range(0, w, tile)
    ]


@torch.no_grad()
def predict_tile(net: SegmentationNet, lr: torch.Tensor, t: Tile) -> torch.Tensor:
    """Logits of one tile of a normalised LR image: (1, classes, s * rows, s * columns).

    The tile's window (with its halo) is padded to the network's divisor by reflection and
    the padding and the halo are cut off again, so tiles put together equal one pass.
    """
    s = net.config.scale
    window = padded_to_divisor(lr[..., t.ya : t.yb, t.xa : t.xb], net.config.divisor)
    oy, ox = (t.y0 - t.ya) * s, (t.x0 - t.xa) * s
    return net(window)[..., oy : oy + (t.y1 - t.y0) * s, ox : ox + (t.x1 - t.x0) * s]


def padded_to_divisor(window: torch.Tensor, divisor: int) -> torch.Tensor:
    """``window`` (..., h, w) padded by reflection to multiples of ``divisor``.

    The padding is at the bottom and right: a size the network takes, its pixels where they
    were.
    """
    ph, pw = (-window.shape[-2]) % divisor, (-window.shape[-1]) % divisor
    if ph or pw:
        window = torch.nn.functional.pad(window, (0, pw, 0, ph), mode="reflect")
    return window


def predict_window(
    net: SegmentationNet,
    piece: Tile,
    read: Callable[[slice, slice], torch.Tensor],
    shape: tuple[int, int],
    degrade: Degradation,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Labels of one tile of an HR image, reading and degrading only the tile's window.

    The image (``shape``, multiples of the scale) is seen through ``read(rows, columns)``,
    which returns any part of it normalised; the tile's window and the blur's context are
    read, degraded (:meth:`Degradation.window`, noise from ``generator``) and predicted.
    Tiles of :func:`tiles` put together equal the whole image's prediction, in memory that
    follows the tile, not the image.

    Returns:
        ``(s * rows, s * columns)`` labels of the tile's HR pixels.
    """
    lr = degrade.window(
        read, shape, slice(piece.ya, piece.yb), slice(piece.xa, piece.xb), generator
    )
    device = next(net.parameters()).device
    return predict_tile(net, lr.to(device), piece.in_window()).argmax(1)[0].cpu().numpy()


@torch.no_grad()
def predict_logits(
    net: SegmentationNet, lr: torch.Tensor, *, tile: int | None = 512, halo: int | None = None
) -> torch.Tensor:
    """Logits for a normalised LR image of any size, tile by tile with a halo (no seams).

    Args:
        net: The segmentation network (eval mode).
        lr: (1, bands, h, w) normalised LR image.
        tile: LR tile size processed at once (bounds memory; a multiple of the network's
            divisor); None for the whole image in one pass.
        halo: LR pixels of context read around each tile and discarded; None for the
            network's receptive radius, which makes the result equal to a single pass.

    Returns:
        (1, classes, scale*h, scale*w) logits.
    """
    s = net.config.scale
    _, _, h, w = lr.shape
    out = torch.empty((1, net.config.num_classes, h * s, w * s))
    for t in tiles(net.config, h, w, tile=tile, halo=halo):
        out[..., t.y0 * s : t.y1 * s, t.x0 * s : t.x1 * s] = predict_tile(net, lr, t)
    return out


def evaluate(
    model: str | Path,
    cube: str | Path,
    *,
    region: Literal["all", "val"] = "all",
    out: str | Path | None = None,
    tile: int = 512,
) -> dict[str, Any]:
    """Score ``model`` on ``cube``: per-class IoU, mIoU, pixel accuracy, confusion matrix.

    Args:
        model: Exported model directory (or its ``model.json``).
        cube: A complete cube with labels and the model's bands.
        region: ``all`` pixels, or only the ``val`` strip held out in training.
        out: Also write the scores there as JSON (replacing only an earlier scores file).
        tile: LR side of the tiles predicted at once (a multiple of the network's divisor):
            memory follows it, the scores do not depend on it (float rounding aside).

    Raises:
        InvalidArgumentError: ``region`` is neither ``all`` nor ``val``.
        CheckpointError: the model's bands differ from the cube's.
        OutputPathError: ``out`` is a folder, an input, not writable, or a file that is not
            an earlier scores file.
    """
    if region not in ("all", "val"):
        raise InvalidArgumentError(f"--region {region}: use all or val")
    from planetseg.items import atomic_path
    from planetseg.store import prepare_output

    if out is not None:
        prepare_output(out, "evaluate", kind="file", inputs=(model, cube), owns_file=_is_scores)
    net, card = load_model(model)
    data = open_cube(cube)
    if list(data.bands) != card["bands"]:
        raise CheckpointError(
            f"the model was trained on bands {card['bands']} but the cube has "
            f"{list(data.bands)}: ingest the cube with the model's bands (--bands)"
        )
    scale = card["scale"]
    degrade = Degradation(**card["degradation"])
    mean = torch.tensor(card["normalisation"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["normalisation"]["std"]).view(1, -1, 1, 1)
    classes = {int(k): v for k, v in card["classes"].items()}
    n = max(net.config.num_classes, max(data.classes, default=0) + 1)
    columns = slice(None)
    if region == "val":
        crop = card["training"]["config"]["crop"]
        columns = spatial_split(
            data.shape[-1], card["training"]["config"]["val_fraction"], multiple=crop
        ).val
    start = columns.start or 0
    width = (columns.stop if columns.stop is not None else data.shape[-1]) - start
    height, width = data.shape[-2] - data.shape[-2] % scale, width - width % scale
    fill = np.asarray(card["normalisation"]["mean"], np.float32)[:, None, None]
    cm = np.zeros((n, n), np.int64)
    numbers = itertools.count()  # of the tiles, each with its own noise (fixed: seed 0)
    for t in range(data.shape[0]):  # tile by tile: memory follows the tile, not the cube

        def read(rows: slice, cols: slice, t: int = t) -> torch.Tensor:
            cols = slice(start + cols.start, start + cols.stop)
            image = data.read("image", (t, slice(None), rows, cols)).astype(np.float32)
            image = np.where(np.isnan(image), fill, image)  # NaN: the band mean, as in training
            return (torch.from_numpy(image[None]) - mean) / std

        for piece in tiles(net.config, height // scale, width // scale, tile=tile):
            noise = torch.Generator().manual_seed(500_009 + next(numbers))
            pred = predict_window(net, piece, read, (height, width), degrade, noise)
            rows = slice(piece.y0 * scale, piece.y1 * scale)
            cols = slice(start + piece.x0 * scale, start + piece.x1 * scale)
            labels = data.labels_at(t, rows, cols)
            if (top := int(labels.max(initial=0)) + 1) > n:  # a value the classes do not name
                cm = np.pad(cm, (0, top - n))
                n = top
            cm += confusion_matrix(labels, pred, n)
    result = scores(cm, classes)
    result["model"] = card["digest"]
    result["cube"] = data.store
    result["region"] = region
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    return result


def _is_scores(path: Path) -> bool:
    """Whether ``path`` holds scores written by :func:`evaluate` (which it may replace)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"miou", "per_class", "model", "region"} <= set(doc)
