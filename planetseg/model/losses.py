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
    """Weights of the total loss ``CE + w_sr * MSE + w_fa * FA`` (paper: 0.1 and 1.0).

    Attributes:
        sr: Weight of the super-resolution MSE.
        fa: Weight of the feature-affinity loss.
        fa_subsample: Pooling factor of the FA loss.
    """

    sr: float = 0.1
    fa: float = 1.0
    fa_subsample: int = 8


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
        ``{"loss", "ce"}`` plus ``"mse"`` and ``"fa"`` when the SR branch exists.
    """
    ce = F.cross_entropy(out.logits, labels, weight=class_weights)
    if out.sr is None:
        return {"loss": ce, "ce": ce}
    mse = F.mse_loss(out.sr, hr_image)
    fa = feature_affinity_loss(out.seg_features, out.sr_features, subsample=weights.fa_subsample)
    return {"loss": ce + weights.sr * mse + weights.fa * fa, "ce": ce, "mse": mse, "fa": fa}
