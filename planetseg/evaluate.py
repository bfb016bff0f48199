"""The ``evaluate`` stage: an exported model's scores on a labelled cube.

The cube's imagery is treated as the high-resolution truth: it is degraded exactly as in
training (the model card's degradation) to make the low-resolution input, the model predicts
labels at ``scale`` x that input, and the prediction is scored against the cube's HR labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from planetseg.data import Degradation, open_cube, spatial_split
from planetseg.errors import CheckpointError, InvalidArgumentError
from planetseg.export import load_model
from planetseg.metrics import confusion_matrix, scores
from planetseg.model import SegmentationNet, receptive_radius


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
    m = net.config.divisor
    _, _, h, w = lr.shape
    if tile is None:
        tile, halo = max(h, w), 0
    elif tile % m:
        raise ValueError(f"tile {tile} is not a multiple of the network's divisor {m}")
    if halo is None:
        halo = math.ceil(receptive_radius(net.config) / m) * m
    out = torch.empty((1, net.config.num_classes, h * s, w * s))
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            ya, xa = max(y0 - halo, 0), max(x0 - halo, 0)
            yb, xb = min(y1 + halo, h), min(x1 + halo, w)
            # Pad the window to the network's divisor by reflection, then cut the padding off.
            window = lr[..., ya:yb, xa:xb]
            ph, pw = (-window.shape[-2]) % m, (-window.shape[-1]) % m
            if ph or pw:
                window = torch.nn.functional.pad(window, (0, pw, 0, ph), mode="reflect")
            logits = net(window)
            oy, ox = (y0 - ya) * s, (x0 - xa) * s
            out[..., y0 * s : y1 * s, x0 * s : x1 * s] = logits[
                ..., oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
            ]
    return out


def evaluate(
    model: str | Path,
    cube: str | Path,
    *,
    region: Literal["all", "val"] = "all",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``cube``: per-class IoU, mIoU, pixel accuracy, confusion matrix.

    Args:
        model: Exported model directory (or its ``model.json``).
        cube: A complete cube with labels and the model's bands.
        region: ``all`` pixels, or only the ``val`` strip held out in training.
        out: Also write the scores there as JSON (replacing only an earlier scores file).

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
    cm = np.zeros((n, n), np.int64)
    for t in range(data.shape[0]):  # one time step in memory at a time
        image = data.read("image", (t, slice(None), slice(None), columns))
        hr = torch.from_numpy(image.astype(np.float32)[None])
        h, w = hr.shape[-2] - hr.shape[-2] % scale, hr.shape[-1] - hr.shape[-1] % scale
        lr = degrade((hr[..., :h, :w] - mean) / std)
        pred = predict_logits(net, lr).argmax(1)[0].numpy()
        labels = data.labels_at(t, slice(None), columns)[:h, :w]
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
