"""Segmentation scores: confusion matrix, per-class IoU, mIoU, pixel accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = pixels of true class ``i`` predicted as ``j`` (int64, square)."""
    truth = np.asarray(truth, dtype=np.int64).ravel()
    pred = np.asarray(pred, dtype=np.int64).ravel()
    return np.bincount(truth * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def scores(cm: np.ndarray, classes: dict[int, str]) -> dict[str, Any]:
    """Per-class IoU (classes with no pixels in truth or prediction are left out of the mean).

    Returns:
        ``{"miou", "pixel_accuracy", "per_class": {name: {"iou", "pixels"}}, "confusion"}``.
    """
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    per_class = {}
    for k in range(cm.shape[0]):
        name = classes.get(k, f"class {k}")
        iou = float(tp[k] / union[k]) if union[k] else None
        per_class[name] = {"iou": iou, "pixels": int(cm[k].sum())}
    ious = [v["iou"] for v in per_class.values() if v["iou"] is not None]
    return {
        "miou": float(np.mean(ious)) if ious else 0.0,
        "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "per_class": per_class,
        "confusion": cm.tolist(),
    }
