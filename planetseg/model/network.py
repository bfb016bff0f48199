"""The multi-task network of Dual Super-Resolution Learning (DSRL), sized by a config.

::

    LR image --encoder--+--seg decoder (SSSR) --x scale--> seg features --1x1--> logits (HR)
                        |                                      |
                        |                               1x1 feature transform --+
                        |                                                       | FA loss
                        +--SR decoder (SISR)  --x scale--> SR features ---------+
                                                               |
                                                             1x1 --> HR image  (MSE)

Both decoders mirror the encoder with skip connections (a small U-Net) and add one more
upsampling stage of ``scale``, so their outputs are at ``scale`` x the input resolution. The
encoder is shared; the SR decoder and the feature transform exist only for training:
:meth:`DSRLNet.detach` returns the :class:`SegmentationNet` (encoder + segmentation branch),
which is what is exported and run at inference.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the torch convention

from planetseg.errors import InvalidArgumentError


@dataclass(frozen=True)
class NetConfig:
    """Shape of the network.

    Attributes:
        in_bands: Input bands (from the cube).
        num_classes: Label classes (from the cube).
        scale: Output resolution / input resolution: 2 or 4 (1: plain segmentation at the
            input resolution, the "HR input" upper bound of the ablation).
        width: Channels of the first encoder level; level ``k`` has ``width * 2**k``.
        depth: Encoder levels (each halves the resolution after the first).
        head_channels: Channels of the decoders' final (HR) features.
    """

    in_bands: int
    num_classes: int
    scale: int = 2
    width: int = 32
    depth: int = 3
    head_channels: int = 32

    def __post_init__(self) -> None:
        if self.scale not in (1, 2, 4):
            raise InvalidArgumentError(f"scale must be 1, 2 or 4, got {self.scale}")
        if self.in_bands < 1 or self.num_classes < 2:
            raise InvalidArgumentError(
                f"need at least one band and two classes (got {self.in_bands}, {self.num_classes})"
            )
        if self.width < 4 or self.depth < 1 or self.head_channels < 4:
            raise InvalidArgumentError("width and head_channels must be >= 4 and depth >= 1")

    @property
    def divisor(self) -> int:
        """LR input sides must be multiples of this (the encoder's total downsampling)."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict[str, int]:
        """Plain dict (for model cards)."""
        return asdict(self)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """Convolutional encoder; returns the feature map of every level (finest first)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        chans = [config.width * 2**k for k in range(config.depth)]
        self.levels = nn.ModuleList(
            _block(cin, cout)
            for cin, cout in zip([config.in_bands, *chans[:-1]], chans, strict=True)
        )
        self.channels = chans

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: (B, bands, h, w) -> per level (B, C_k, h / 2**k, w / 2**k)."""
        feats = []
        for k, level in enumerate(self.levels):
            x = level(x if k == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """U-Net decoder back to the input resolution, then ``scale`` x more (pixel shuffle)."""

    def __init__(self, channels: list[int], scale: int, out_channels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deep, skip in zip(channels[::-1][:-1], channels[::-1][1:], strict=True):
            self.ups.append(nn.ConvTranspose2d(deep, skip, 2, stride=2))
            self.blocks.append(_block(2 * skip, skip))
        # Sub-pixel convolution: learned upsampling without checkerboard transposed convs.
        self.upscale = nn.Sequential(
            nn.Conv2d(channels[0], out_channels * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
            nn.ReLU(inplace=True),
        )
        self.refine = _block(out_channels, out_channels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features (finest first) -> (B, out_channels, scale*h, scale*w)."""
        x = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, feats[::-1][1:], strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.refine(self.upscale(x))


class SegmentationNet(nn.Module):
    """Encoder + segmentation branch: what inference runs (no SR parameters)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.seg_decoder = Decoder(self.encoder.channels, config.scale, config.head_channels)
        self.classifier = nn.Conv2d(config.head_channels, config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR image (B, bands, h, w), normalised -> class logits (B, classes, s*h, s*w)."""
        return self.classifier(self.seg_decoder(self.encoder(x)))


@dataclass
class DSRLOutput:
    """Everything one training forward pass produces (all at HR, ``scale`` x the input).

    Attributes:
        logits: (B, classes, H, W) segmentation logits.
        sr: (B, bands, H, W) reconstructed HR image, or None without the SR branch.
        seg_features: (B, C_sr, H, W) segmentation features after the 1x1 feature transform,
            or None without the SR branch.
        sr_features: (B, C_sr, H, W) SR features, or None.
    """

    logits: torch.Tensor
    sr: torch.Tensor | None = None
    seg_features: torch.Tensor | None = None
    sr_features: torch.Tensor | None = None


class DSRLNet(nn.Module):
    """Shared encoder, segmentation branch, and (optionally) SR branch + feature transform.

    With ``with_sr=False`` it is the segmentation-only baseline with exactly the same
    segmentation path, so an ablation compares like with like.
    """

    def __init__(self, config: NetConfig, *, with_sr: bool = True) -> None:
        super().__init__()
        self.config = config
        self.with_sr = with_sr
        self.seg = SegmentationNet(config)
        if with_sr:
            self.sr_decoder = Decoder(self.seg.encoder.channels, config.scale, config.head_channels)
            self.sr_head = nn.Conv2d(config.head_channels, config.in_bands, 1)
            # The paper's feature transform: 1x1 conv mapping segmentation features to the SR
            # branch's channel count before the affinity matrices are compared.
            self.feature_transform = nn.Conv2d(config.head_channels, config.head_channels, 1)

    def forward(self, x: torch.Tensor) -> DSRLOutput:
        """LR image (B, bands, h, w), normalised -> :class:`DSRLOutput`."""
        feats = self.seg.encoder(x)
        seg_feat = self.seg.seg_decoder(feats)
        logits = self.seg.classifier(seg_feat)
        if not self.with_sr:
            return DSRLOutput(logits)
        sr_feat = self.sr_decoder(feats)
        return DSRLOutput(
            logits,
            sr=self.sr_head(sr_feat),
            seg_features=self.feature_transform(seg_feat),
            sr_features=sr_feat,
        )

    def detach(self) -> SegmentationNet:
        """The segmentation-only network with this network's weights (a copy, eval mode)."""
        net = SegmentationNet(self.config)
        net.load_state_dict(self.seg.state_dict())
        return net.eval()


@functools.lru_cache(maxsize=16)
def receptive_radius(config: NetConfig) -> int:
    """How far (in input pixels) an output pixel of a ``config`` network sees, measured.

    A fresh network with seeded random weights is fed seeded random input and the gradient of
    one central output pixel is traced back: the farthest input pixel with a non-zero
    gradient gives the radius. Tiles read with at least this much halo (rounded up to
    ``config.divisor``) segment exactly as the whole image would.
    """
    size = 64
    while True:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(0)
            net = SegmentationNet(config).eval()
            x = torch.randn(1, config.in_bands, size, size, requires_grad=True)
            c = size // 2
            s = config.scale
            net(x)[0, :, c * s, c * s].sum().backward()
        ys, xs = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
        radius = int(max((ys - c).abs().max(), (xs - c).abs().max()))
        if radius < c - 1:  # the field fits inside the probe: it is the true radius
            return radius
        size *= 2


def fuse_for_inference(net: SegmentationNet) -> SegmentationNet:
    """A copy of ``net`` with every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is an affine map per channel, so it folds exactly into the
    preceding convolution's weights and bias: the same function (up to float rounding) with
    one pass over the activations less per block. The ReLU after a pixel shuffle moves
    before it, where it fuses into the convolution. Segmentation at scale runs this copy.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(net).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
            elif isinstance(conv, nn.PixelShuffle) and isinstance(bn, nn.ReLU):
                # An elementwise map commutes with the shuffle's permutation: applied first,
                # it fuses into the convolution before (exactly the same values).
                module[i], module[i + 1] = bn, conv
    return fused
