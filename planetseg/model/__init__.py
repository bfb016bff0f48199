"""The DSRL multi-task network, its losses, and the exported segmentation model."""

from __future__ import annotations

from planetseg.model.losses import LossWeights, dsrl_loss, feature_affinity_loss
from planetseg.model.network import (
    DSRLNet,
    DSRLOutput,
    NetConfig,
    SegmentationNet,
    fuse_for_inference,
    receptive_radius,
)

__all__ = [
    "DSRLNet",
    "DSRLOutput",
    "LossWeights",
    "NetConfig",
    "SegmentationNet",
    "dsrl_loss",
    "feature_affinity_loss",
    "fuse_for_inference",
    "receptive_radius",
]
