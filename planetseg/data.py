"""Training pairs from a datacube: HR windows, their degraded LR input, a spatial split.

The degradation that makes the LR input is documented and fixed, so that a model trained here
meets the same kind of input at inference:

1. blur with a Gaussian point-spread function of ``psf_sigma * scale`` HR pixels (default
   ``0.5 * scale``, roughly a sensor whose PSF spans its own pixel),
2. downsample by ``scale`` with a box filter (pixel averaging, as a coarser detector does),
3. add Gaussian noise of ``noise`` standard deviations of the normalised image (default 0).

Validation is a **spatial** hold-out, not random pixels: the last ``val_fraction`` of the
columns (a strip along ``x``) in every time step, so no training window overlaps it.

Batches are a pure function of ``(seed, step, rank)``, which is what makes resumed and
distributed training reproducible without saving sampler state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from planetseg.errors import CatalogReadError, InvalidArgumentError, StoreMismatchError
from planetseg.store import ChunkGuard

MAX_IN_MEMORY = 4 * 2**30  # bytes of HR image held for sampling


@dataclass(frozen=True)
class Degradation:
    """How HR imagery becomes the LR input.

    Attributes:
        scale: Downsampling factor.
        psf_sigma: Gaussian PSF sigma in LR pixels (``psf_sigma * scale`` HR pixels).
        noise: Noise standard deviation, in units of the normalised image.
    """

    scale: int = 2
    psf_sigma: float = 0.5
    noise: float = 0.0

    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) normalised HR -> (B, C, H / scale, W / scale) LR.

        ``psf_sigma = 0`` skips the blur and ``scale = 1`` the downsampling, so
        ``Degradation(1, 0.0)`` is the identity (the HR-input upper bound).
        """
        x = hr
        if self.psf_sigma > 0:
            sigma = self.psf_sigma * self.scale
            radius = max(1, math.ceil(3 * sigma))
            t = torch.arange(-radius, radius + 1, dtype=hr.dtype, device=hr.device)
            kernel = torch.exp(-0.5 * (t / sigma) ** 2)
            kernel = kernel / kernel.sum()
            c = hr.shape[1]
            x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
            x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
            x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        lr = F.avg_pool2d(x, self.scale) if self.scale > 1 else x
        if self.noise > 0:
            lr = lr + self.noise * torch.randn(lr.shape, generator=generator, dtype=lr.dtype)
        return lr


@dataclass
class CubeData:
    """A cube's HR image and labels in memory, with what the model card needs.

    Attributes:
        image: (time, band, y, x) float32, raw values.
        labels: (time, y, x) int64.
        bands: Band names.
        classes: Label value -> class name.
        resolution: Pixel size of the cube in CRS units.
        body: Body of the cube.
        store: Path of the cube.
    """

    image: np.ndarray
    labels: np.ndarray
    bands: list[str]
    classes: dict[int, str]
    resolution: float
    body: str
    store: str

    @property
    def num_classes(self) -> int:
        """1 + the largest class value (values are used as indices)."""
        return max([*self.classes, int(self.labels.max())]) + 1

    def class_weights(self, columns: slice) -> np.ndarray:
        """Median-frequency balancing (Eigen & Fergus 2015) over ``columns`` of every time step.

        ``w_c = median(f) / f_c`` over the classes present, ``f_c`` being class ``c``'s share
        of the pixels; absent classes get 0. Rare classes (small craters are a few percent of
        the pixels) would otherwise be cheaper to ignore than to learn.
        """
        counts = np.bincount(self.labels[..., columns].ravel(), minlength=self.num_classes)
        freq = counts / max(counts.sum(), 1)
        present = freq > 0
        weights = np.zeros(self.num_classes, np.float32)
        weights[present] = np.median(freq[present]) / freq[present]
        return weights

    def loss_weights(self, kind: str, columns: slice) -> np.ndarray | None:
        """Cross-entropy weights of ``--class-weights kind`` over ``columns`` (None: unweighted).

        ``balanced`` is :meth:`class_weights`; ``sqrt`` its square root, which halves the
        boost of rare classes on a log scale (balanced over-paints them, none misses them).
        """
        if kind == "none":
            return None
        weights = self.class_weights(columns)
        return np.sqrt(weights) if kind == "sqrt" else weights

    def band_stats(self, columns: slice) -> tuple[list[float], list[float]]:
        """Per-band mean and standard deviation over ``columns`` of every time step."""
        sub = self.image[..., columns]
        mean = sub.mean(axis=(0, 2, 3))
        std = sub.std(axis=(0, 2, 3))
        return mean.tolist(), np.maximum(std, 1e-6).tolist()


def open_cube_dataset(path: str | Path) -> Any:
    """A complete cube made by ``ingest``, opened lazily (an xarray Dataset, nothing read).

    Raises:
        CatalogReadError: not a zarr store, unreadable, or without ``image`` and its grid.
        StoreMismatchError: the cube is unfinished.
    """
    import xarray as xr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise CatalogReadError(f"{path} is not a zarr store: give a cube made by planetseg ingest")
    try:
        ds = xr.open_zarr(path, consolidated=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CatalogReadError(f"cannot open cube {path}: {str(exc).splitlines()[0]}") from exc
    if "image" not in ds or "spatial_ref" not in ds.coords:
        raise CatalogReadError(f"{path} is not a planetseg cube (no image or spatial_ref)")
    if not ds.attrs.get("planetseg:complete"):
        raise StoreMismatchError(f"cube {path} is unfinished: re-run its ingest to complete it")
    return ds


def open_cube(path: str | Path) -> CubeData:
    """Read a complete cube with labels into memory for training or evaluation.

    Raises:
        CatalogReadError: not a readable cube.
        StoreMismatchError: the cube is unfinished.
        StoreCorruptError: a chunk of it is missing or damaged.
        InvalidArgumentError: it has no labels, or is too large to hold in memory.
    """
    path = Path(path)
    ds = open_cube_dataset(path)
    if "labels" not in ds:
        raise InvalidArgumentError(
            f"cube {path} has no labels: ingest it with --labels (a label asset or a crater "
            "catalog) to train on it"
        )
    nbytes = ds["image"].size * 4
    if nbytes > MAX_IN_MEMORY:
        raise InvalidArgumentError(
            f"cube {path} holds {nbytes / 2**30:.1f} GiB of imagery, more than training reads "
            "into memory: ingest a smaller --bbox for training"
        )
    guard = ChunkGuard.of(path, ds.attrs)  # every chunk read is checked: none stands in zeros
    image = guard.read("image", read=lambda: ds["image"].values).astype(np.float32)
    labels = guard.read("labels", read=lambda: ds["labels"].values).astype(np.int64)
    if labels.ndim == 2:
        labels = np.broadcast_to(labels, (image.shape[0], *labels.shape))
    x = ds["x"].values
    classes = {int(k): v for k, v in json.loads(ds.attrs.get("planetseg:classes") or "{}").items()}
    if not classes:
        classes = {int(v): f"class {v}" for v in np.unique(labels)}
    return CubeData(
        image=image,
        labels=np.ascontiguousarray(labels),
        bands=[str(b) for b in ds["band"].values],
        classes=classes,
        resolution=float(abs(x[1] - x[0])) if len(x) > 1 else 1.0,
        body=str(ds.attrs.get("planetseg:body", "")),
        store=str(path.resolve()),
    )


@dataclass(frozen=True)
class Split:
    """Column ranges of the spatial split (HR pixels).

    Attributes:
        train: Columns training windows are drawn from.
        val: Columns held out for validation.
    """

    train: slice
    val: slice


def spatial_split(width: int, val_fraction: float, *, multiple: int) -> Split:
    """Hold out the last ``val_fraction`` of the columns, cut at a multiple of ``multiple``.

    ``multiple`` is the training window (``--crop``): the training strip must hold a window and
    the validation strip is at least one window wide. The cut is the multiple nearest to
    ``width * (1 - val_fraction)`` that leaves both strips that wide, so every width of at
    least ``2 * multiple`` splits (a 608 px cube with 128 px windows: 384 + 224 px).

    Raises:
        InvalidArgumentError: ``val_fraction`` outside (0, 1), or a cube narrower than two
            windows.
    """
    if not 0 < val_fraction < 1:
        raise InvalidArgumentError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if width < 2 * multiple:
        raise InvalidArgumentError(
            f"the cube is {width} px wide: too narrow for a training and a validation strip of "
            f"--crop {multiple} px each (it needs {2 * multiple} px): lower --crop, or ingest a "
            "wider --bbox"
        )
    nearest = int(round(width * (1 - val_fraction) / multiple)) * multiple
    cut = min(max(nearest, multiple), (width - multiple) // multiple * multiple)
    return Split(slice(0, cut), slice(cut, width))


class WindowSampler:
    """Random HR windows from the training strip; batch = f(seed, step, rank) only.

    With ``foreground`` > 0 that share of the windows (drawn per window) is centred on a random
    foreground pixel (label != 0) of the training strip, clipped to fit, so rare small objects
    are seen often enough; the rest are uniform. The foreground pixels are listed once, in a
    fixed order, so batches stay a pure function of (seed, step, rank).
    """

    def __init__(
        self, data: CubeData, split: Split, *, crop: int, seed: int, foreground: float = 0.0
    ) -> None:
        _, _, height, _ = data.image.shape
        width = split.train.stop - split.train.start
        if crop > height or crop > width:
            raise InvalidArgumentError(
                f"--crop {crop} does not fit the training strip ({height} x {width} px): "
                "lower --crop"
            )
        self.data, self.split, self.crop, self.seed = data, split, crop, seed
        self.foreground = foreground
        self.centres = np.zeros((0, 3), np.int64)
        if foreground > 0:
            # Every 4th foreground pixel per axis is plenty to centre windows on, and bounded.
            sub = data.labels[:, ::4, split.train][..., ::4]
            t, y, x = np.nonzero(sub)
            self.centres = np.stack([t, 4 * y, split.train.start + 4 * x], axis=1)

    def batch(self, step: int, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """HR images (size, bands, crop, crop) float32 and labels (size, crop, crop) int64."""
        rng = np.random.default_rng([self.seed, step, rank])
        n_t, _, height, _ = self.data.image.shape
        c = self.crop
        t = rng.integers(0, n_t, size)
        y = rng.integers(0, height - c + 1, size)
        x = rng.integers(self.split.train.start, self.split.train.stop - c + 1, size)
        if len(self.centres):
            on = rng.random(size) < self.foreground
            pick = self.centres[rng.integers(0, len(self.centres), size)]
            jitter = rng.integers(-(c // 4), c // 4 + 1, (size, 2))  # not always dead centre
            t = np.where(on, pick[:, 0], t)
            y = np.where(on, np.clip(pick[:, 1] + jitter[:, 0] - c // 2, 0, height - c), y)
            low, high = self.split.train.start, self.split.train.stop - c
            x = np.where(on, np.clip(pick[:, 2] + jitter[:, 1] - c // 2, low, high), x)
        flips = rng.integers(0, 8, size)  # the dihedral group: any rotation/reflection
        images, labels = [], []
        for ti, yi, xi, f in zip(t, y, x, flips, strict=True):
            img = self.data.image[ti, :, yi : yi + c, xi : xi + c]
            lab = self.data.labels[ti, yi : yi + c, xi : xi + c]
            images.append(_dihedral(img, f))
            labels.append(_dihedral(lab, f))
        return np.stack(images), np.stack(labels)


@dataclass(frozen=True)
class Photometric:
    """Random gamma, contrast and brightness of normalised HR windows (real-imagery stretch).

    Per window: its values are mapped to 0..1 (window minimum..maximum), raised to ``gamma``
    (log-uniform in ``[1/g, g]``) and mapped back, then scaled about the window mean by
    ``contrast`` (uniform in ``1 +/- c``) and shifted by ``brightness`` (uniform in ``+/- b``,
    normalised units). Drawn from the step's generator: a pure function of (seed, step, rank).

    Attributes:
        brightness: Largest offset ``b``.
        contrast: Largest relative contrast change ``c``.
        gamma: Largest gamma factor ``g`` (>= 1).
    """

    brightness: float = 0.3
    contrast: float = 0.3
    gamma: float = 1.5

    def __call__(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) normalised HR windows -> jittered windows of the same shape."""
        u = torch.rand((3, hr.shape[0], 1, 1, 1), generator=generator, dtype=hr.dtype)
        gamma = self.gamma ** (2 * u[0] - 1)
        contrast = 1 + self.contrast * (2 * u[1] - 1)
        offset = self.brightness * (2 * u[2] - 1)
        low = hr.amin(dim=(1, 2, 3), keepdim=True)
        span = (hr.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
        x = low + span * ((hr - low) / span).clamp(0, 1).pow(gamma)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + offset + contrast * (x - mean)


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    a = np.rot90(a, k % 4, axes=(-2, -1))
    return np.ascontiguousarray(a[..., ::-1] if k >= 4 else a)
