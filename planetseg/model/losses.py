"""The three DSRL losses: cross-entropy, super-resolution MSE and feature affinity (FA).

FA follows the paper (Wang et al., CVPR 2020, eq. 3-4) where public code departs from it:

* features are average-pooled by ``subsample`` (paper: 1/8) before the affinity matrices;
* each pixel's feature vector is L2-normalised, so ``S_ij`` is a cosine similarity;
* the L1 distance of the two ``(H'W') x (H'W')`` matrices is divided by ``(H'W')**2`` **per
  image** and then averaged over the batch, so the loss does not grow with batch size (a known
  public implementation sums over the batch instead).

Choice of ours: the L1 distance uses the mean absolute difference (``p = q = 1`` in the
paper's notation), the paper's choice for the reported results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812

from planetseg.model.network import DSRLOutput


def affinity(features: torch.Tensor) -> torch.Tensor:
    """Cosine affinity of every pixel pair: (B, C, H, W) -> (B, HW, HW)."""
    flat = F.normalize(features.flatten(2), dim=1, eps=1e-8)  # (B, C, N), unit columns
    return flat.transpose(1, 2) @ flat


def feature_affinity_loss(
    seg_features: torch.Tensor, sr_features: torch.Tensor, *, subsample: int = 8
) -> torch.Tensor:
    """FA loss between segmentation and SR features (same shape), averaged over the batch.

    Args:
        seg_features: (B, C, H, W) transformed segmentation features.
        sr_features: (B, C, H, W) SR features.
        subsample: Average-pooling factor applied first (8 = the paper's 1/8).
    """
    if subsample > 1:
        seg_features = F.avg_pool2d(seg_features, subsample, ceil_mode=True)
        sr_features = F.avg_pool2d(sr_features, subsample, ceil_mode=True)
    diff = (affinity(seg_features) - affinity(sr_features)).abs()
    per_image = diff.flatten(1).mean(dim=1)  # sum / (H'W')**2
    return per_image.mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the total loss ``CE + w_dice * Dice + w_sr * MSE + w_fa * FA``.

    Attributes:
        sr: Weight of the super-resolution MSE (paper: 0.1).
        fa: Weight of the feature-affinity loss (paper: 1.0).
        fa_subsample: Pooling factor of the FA loss.
        dice: Weight of the foreground Dice loss (0: cross-entropy only, as the paper).
    """

    sr: float = 0.1
    fa: float = 1.0
    fa_subsample: int = 8
    dice: float = 0.0


def dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of the foreground classes (1..), averaged over those classes.

    Sums run over the whole batch (one Dice per class, not per image), so a window without a
    class adds only its false positives; a class absent from the batch and predicted nowhere
    costs nothing.

    Args:
        logits: (B, classes, H, W).
        labels: (B, H, W) int64.
    """
    n = logits.shape[1]
    probs = logits.softmax(dim=1)[:, 1:]
    target = F.one_hot(labels, n).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * target).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    return (1 - (2 * inter + 1) / (total + 1)).mean()


def dsrl_loss(
    out: DSRLOutput,
    labels: torch.Tensor,
    hr_image: torch.Tensor,
    weights: LossWeights,
    class_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Total and component losses of one batch.

    Args:
        out: The network's output.
        labels: (B, H, W) int64 HR labels.
        hr_image: (B, bands, H, W) normalised HR image (the SR target).
        weights: Loss weights.
        class_weights: Optional (classes,) weights of the cross-entropy.

    Returns:
        ``{"loss", "ce"}``, plus ``"dice"`` with a Dice weight and ``"mse"`` and ``"fa"``
        when the SR branch exists.
    """
    ce = F.cross_entropy(out.logits, labels, weight=class_weights)
    losses = {"ce": ce}
    total = ce
    if weights.dice > 0:
        losses["dice"] = dice_loss(out.logits, labels)
        total = total + weights.dice * losses["dice"]
    if out.sr is not None:
        losses["mse"] = F.mse_loss(out.sr, hr_image)
        losses["fa"] = feature_affinity_loss(
            out.seg_features, out.sr_features, subsample=weights.fa_subsample
        )
        total = total + weights.sr * losses["mse"] + weights.fa * losses["fa"]
    return {"loss": total, **losses}
