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

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from planetseg.errors import (
    CatalogReadError,
    InvalidArgumentError,
    MixedBodiesError,
    PlanetsegError,
    StoreMismatchError,
)
from planetseg.store import ChunkGuard


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

    @property
    def radius(self) -> int:
        """HR pixels of context the blur reads on each side of a pixel (0 without blur)."""
        return max(1, math.ceil(3 * self.psf_sigma * self.scale)) if self.psf_sigma > 0 else 0

    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) normalised HR -> (B, C, H / scale, W / scale) LR.

        ``psf_sigma = 0`` skips the blur and ``scale = 1`` the downsampling, so
        ``Degradation(1, 0.0)`` is the identity (the HR-input upper bound).
        """
        r = self.radius
        return self._degrade(hr, (r, r, r, r), generator)

    def window(
        self,
        read: Callable[[slice, slice], torch.Tensor],
        shape: tuple[int, int],
        rows: slice,
        columns: slice,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """LR ``rows`` x ``columns`` of the degradation of an HR image, reading only those.

        What ``self(image)[..., rows, columns]`` gives (noise aside: it is drawn for the
        window alone), for an HR image of ``shape`` (multiples of ``scale``) of which
        ``read(rows, columns)`` returns any part, normalised: the window and the blur's
        context, so memory follows the window, not the image.
        """
        s, r = self.scale, self.radius
        h, w = shape
        top, bottom = rows.start * s, rows.stop * s
        left, right = columns.start * s, columns.stop * s
        ya, yb = max(top - r, 0), min(bottom + r, h)
        xa, xb = max(left - r, 0), min(right + r, w)
        # Reflected where the image ends, as the whole image is padded; read context elsewhere.
        pads = (r - (left - xa), r - (xb - right), r - (top - ya), r - (yb - bottom))
        return self._degrade(read(slice(ya, yb), slice(xa, xb)), pads, generator)

    def _degrade(
        self, hr: torch.Tensor, pads: tuple[int, int, int, int], generator: torch.Generator | None
    ) -> torch.Tensor:
        """Blur, pool, add noise.

        ``hr`` is padded by reflection by ``pads`` (left, right, top, bottom): the blur's
        ``radius`` of context on each side less what ``hr`` already holds there.
        """
        x = hr
        if self.psf_sigma > 0:
            sigma, radius = self.psf_sigma * self.scale, self.radius
            t = torch.arange(-radius, radius + 1, dtype=hr.dtype, device=hr.device)
            kernel = torch.exp(-0.5 * (t / sigma) ** 2)
            kernel = kernel / kernel.sum()
            c = hr.shape[1]
            if any(pads):
                x = F.pad(x, pads, mode="reflect")
            x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
            x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        lr = F.avg_pool2d(x, self.scale) if self.scale > 1 else x
        if self.noise > 0:
            lr = lr + self.noise * torch.randn(lr.shape, generator=generator, dtype=lr.dtype)
        return lr


def smallest_label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned dtype that holds label values ``0 .. num_classes - 1``."""
    return np.min_scalar_type(max(num_classes - 1, 0))


def median_frequency(counts: np.ndarray) -> np.ndarray:
    """Median-frequency balancing (Eigen & Fergus 2015) of per-class pixel ``counts``.

    ``w_c = median(f) / f_c`` over the classes present, ``f_c`` being class ``c``'s share of
    the pixels; absent classes get 0. Rare classes (small craters are a few percent of the
    pixels) would otherwise be cheaper to ignore than to learn.
    """
    freq = counts / max(counts.sum(), 1)
    present = freq > 0
    weights = np.zeros(len(counts), np.float32)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights


def loss_weights(kind: str, counts: np.ndarray) -> np.ndarray | None:
    """Cross-entropy weights of ``--class-weights kind`` from per-class ``counts`` (None: none).

    ``balanced`` is :func:`median_frequency`; ``sqrt`` its square root, which halves the
    boost of rare classes on a log scale (balanced over-paints them, none misses them).
    """
    if kind == "none":
        return None
    weights = median_frequency(counts)
    return np.sqrt(weights) if kind == "sqrt" else weights


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


#: zarr arrays this process opened, by (store, array): a window read opens nothing.
_OPEN: dict[tuple[str, str], Any] = {}


@dataclass(frozen=True)
class Cube:
    """A labelled cube's metadata; its pixels are read by index when asked (zarr, no Dask).

    Picklable and small: DataLoader worker processes and DDP ranks get this, not pixels, and
    each opens the zarr arrays itself on its first read. ``memory`` holds the arrays instead
    for a cube already in memory (tests, the benchmark's in-memory arm).

    Attributes:
        store: Path of the cube.
        shape: ``(time, band, y, x)`` of its image.
        bands: Band names.
        classes: Label value -> class name, as the cube's attributes give them (may be empty).
        resolution: Pixel size in CRS units.
        body: Body of the cube.
        fill: The image's fill value (nodata; NaN for float images without one).
        static_labels: Whether the labels are ``labels(y, x)``, one map for every time step.
        guard: Checks every chunk read (None in memory).
        memory: ``(image, labels)`` arrays in memory, or None to read the store.
    """

    store: str
    shape: tuple[int, int, int, int]
    bands: tuple[str, ...]
    classes: dict[int, str]
    resolution: float
    body: str
    fill: float
    static_labels: bool
    guard: ChunkGuard | None = None
    memory: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_arrays(
        cls,
        image: np.ndarray,
        labels: np.ndarray,
        bands: list[str],
        classes: dict[int, str],
        *,
        resolution: float = 1.0,
        body: str = "",
        store: str = "",
        fill: float = math.nan,
    ) -> Cube:
        """A cube held in memory: ``image(time, band, y, x)``, ``labels([time,] y, x)``."""
        return cls(
            store, image.shape, tuple(bands), dict(classes), resolution, body, fill,
            labels.ndim == 2, None, (image, labels),
        )  # fmt: skip

    def load(self) -> Cube:
        """This cube with its image and labels read into memory (the whole cube: small only)."""
        whole = (slice(None),) * 4
        image = self.read("image", whole)
        labels = self.read("labels", whole[2:] if self.static_labels else whole[1:])
        return dataclasses.replace(self, guard=None, memory=(image, labels))

    def read(self, name: str, selection: tuple[Any, ...]) -> np.ndarray:
        """``array[selection]`` of ``image`` or ``labels``: only the chunks it touches are read.

        Raises:
            StoreCorruptError: one of those chunks is missing or damaged.
        """
        array = self.array(name)
        if self.guard is None:
            return np.asarray(array[selection])
        return self.guard.read(name, selection, array=array)

    def array(self, name: str) -> Any:
        """The ``image`` or ``labels`` array: in memory, or the zarr array (opened once)."""
        if self.memory is not None:
            image, labels = self.memory
            return labels if name == "labels" else image
        key = (self.store, name)
        if key not in _OPEN:
            import zarr

            _OPEN[key] = zarr.open_array(self.store, path=name, mode="r")
        return _OPEN[key]

    def labels_at(self, t: int, rows: slice, columns: slice) -> np.ndarray:
        """Labels of time step ``t`` (any, for static labels) in ``rows`` x ``columns``."""
        return self.read("labels", (rows, columns) if self.static_labels else (t, rows, columns))

    def nodata(self, image: np.ndarray) -> np.ndarray:
        """Pixels of ``image(band, y, x)`` with no data: NaN, or the fill value in every band."""
        missing = np.isnan(image).any(axis=0)
        if not math.isnan(self.fill):
            missing |= (image == self.fill).all(axis=0)
        return missing


def open_cube(path: str | Path) -> Cube:
    """A complete cube with labels, for training or evaluation: metadata only, no pixels read.

    Raises:
        CatalogReadError: not a readable cube.
        StoreMismatchError: the cube is unfinished.
        InvalidArgumentError: it has no labels.
    """
    path = Path(path)
    ds = open_cube_dataset(path)
    if "labels" not in ds:
        raise InvalidArgumentError(
            f"cube {path} has no labels: ingest it with --labels (a label asset or a crater "
            "catalog) to train on it"
        )
    import zarr

    x = ds["x"].values
    classes = {int(k): v for k, v in json.loads(ds.attrs.get("planetseg:classes") or "{}").items()}
    fill = zarr.open_array(path, path="image", mode="r").fill_value
    return Cube(
        store=str(path.resolve()),
        shape=tuple(int(n) for n in ds["image"].shape),
        bands=tuple(str(b) for b in ds["band"].values),
        classes=classes,
        resolution=float(abs(x[1] - x[0])) if len(x) > 1 else 1.0,
        body=str(ds.attrs.get("planetseg:body", "")),
        fill=math.nan if fill is None else float(fill),
        static_labels=ds["labels"].ndim == 2,
        guard=ChunkGuard.of(path, ds.attrs),  # every chunk read is checked: none stands in zeros
    )


def cube_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The cubes ``paths`` name: each a zarr store, or a folder whose zarr stores are taken.

    Raises:
        CatalogReadError: a folder holds no zarr store, or a path does not exist.
        InvalidArgumentError: no path, or a cube given twice.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "zarr.json").exists():
            inside = sorted(p for p in path.iterdir() if (p / "zarr.json").is_file())
            if not inside:
                raise CatalogReadError(
                    f"{path} is neither a zarr store nor a folder of them: give cubes made by "
                    "planetseg ingest"
                )
            found.extend(inside)
        else:
            found.append(path)
    if not found:
        raise InvalidArgumentError("no cube to train on: give one or more cubes, or a folder")
    seen: dict[Path, Path] = {}
    for path in found:
        if path.resolve() in seen:
            raise InvalidArgumentError(f"cube {path} is given twice: give each cube once")
        seen[path.resolve()] = path
    return found


@dataclass(frozen=True)
class Statistics:
    """What training needs to know of its cubes' pixels, streamed from them chunk by chunk.

    Attributes:
        counts: Pixels of each label value over the training strips (every time step).
        present: Label values found anywhere in the cubes.
        mean: Per-band mean over the training strips (finite pixels).
        std: Per-band standard deviation over them (at least 1e-6).
        foreground: One row per label block of a training strip that holds foreground pixels
            (label != 0) on the 4-pixel grid: ``(cube, time or -1, y0, y1, x0, x1, count)``,
            what :class:`WindowSampler` centres ``--foreground-windows`` on.
    """

    counts: np.ndarray
    present: tuple[int, ...]
    mean: list[float]
    std: list[float]
    foreground: np.ndarray


class _Moments:
    """Per-band count, mean and sum of squared deviations, merged block by block (Chan et al.)."""

    def __init__(self, bands: int) -> None:
        self.n = np.zeros(bands)
        self.mean = np.zeros(bands)
        self.m2 = np.zeros(bands)

    def add(self, block: np.ndarray) -> None:
        """Merge ``block(band, y, x)``'s finite values."""
        values = block.reshape(block.shape[0], -1).astype(np.float64)
        finite = np.isfinite(values)
        n = finite.sum(axis=1)
        values = np.where(finite, values, 0.0)
        mean = values.sum(axis=1) / np.maximum(n, 1)
        m2 = (np.where(finite, values - mean[:, None], 0.0) ** 2).sum(axis=1)
        total = self.n + n
        delta = mean - self.mean
        share = np.divide(n, total, out=np.zeros_like(total), where=total > 0)
        self.mean = self.mean + delta * share
        self.m2 = self.m2 + m2 + delta**2 * self.n * share
        self.n = total

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.n, 1))


def _blocks(size: int, chunk: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``0 .. size`` at chunk boundaries and at ``cuts``."""
    edges = sorted({*range(0, size, chunk), *cuts, size})
    return list(itertools.pairwise(edges))


def _grid4(start: int) -> int:
    """The first multiple of 4 at or after ``start``: the foreground grid is global."""
    return start + (-start) % 4


def statistics(cubes: Sequence[Cube], splits: Sequence[Split]) -> Statistics:
    """Class counts, band moments and the foreground index of ``cubes``, read chunk by chunk.

    Memory is one chunk at a time, whatever the cubes' size.

    Raises:
        StoreCorruptError: a chunk is missing or damaged.
    """
    counts = np.zeros(256, np.int64)
    present: set[int] = set()
    moments = _Moments(len(cubes[0].bands))
    foreground: list[tuple[int, ...]] = []
    for index, (cube, split) in enumerate(zip(cubes, splits, strict=True)):
        n_t, _, height, width = cube.shape
        tile_y, tile_x = _chunk_shape(cube, "labels")
        cut = split.train.stop
        times = [-1] if cube.static_labels else list(range(n_t))
        for t in times:
            for y0, y1 in _blocks(height, tile_y):
                for x0, x1 in _blocks(width, tile_x, [cut]):
                    labels = cube.labels_at(t, slice(y0, y1), slice(x0, x1))
                    found = np.bincount(labels.ravel())
                    present.update(np.flatnonzero(found).tolist())
                    if x0 >= cut:
                        continue
                    if len(found) > len(counts):
                        counts = np.pad(counts, (0, len(found) - len(counts)))
                    counts[: len(found)] += found * (n_t if cube.static_labels else 1)
                    on_grid = labels[_grid4(y0) - y0 :: 4, _grid4(x0) - x0 :: 4]
                    if hits := int(np.count_nonzero(on_grid)):
                        foreground.append((index, t, y0, y1, x0, x1, hits))
        tile_y, tile_x = _chunk_shape(cube, "image")
        for t in range(n_t):
            for y0, y1 in _blocks(height, tile_y):
                for x0, x1 in _blocks(split.train.stop, tile_x):
                    moments.add(cube.read("image", (t, slice(None), slice(y0, y1), slice(x0, x1))))
    top = max(present, default=0) + 1
    return Statistics(
        counts=counts[:top] if len(counts) >= top else np.pad(counts, (0, top - len(counts))),
        present=tuple(sorted(present)),
        mean=moments.mean.tolist(),
        std=np.maximum(moments.std(), 1e-6).tolist(),
        foreground=np.array(foreground, np.int64).reshape(-1, 7),
    )


def _chunk_shape(cube: Cube, name: str) -> tuple[int, int]:
    """The (y, x) chunk shape of ``image`` or ``labels`` (in memory: 512 px blocks)."""
    array = cube.array(name)
    return tuple(array.chunks[-2:]) if hasattr(array, "chunks") else (512, 512)


@dataclass(frozen=True)
class TrainingData:
    """The cubes a run trains on (one or several scenes), their splits and statistics.

    Bands, classes, body and resolution agree across the cubes (checked by
    :func:`open_training_data`). Small and picklable: ranks and loader workers receive this and
    read windows and strips from the stores themselves.

    Attributes:
        cubes: The cubes.
        splits: Each cube's spatial split (its own columns).
        stats: Class counts, band statistics and foreground index over the training strips.
    """

    cubes: tuple[Cube, ...]
    splits: tuple[Split, ...]
    stats: Statistics

    @property
    def bands(self) -> list[str]:
        """Band names, shared by every cube."""
        return list(self.cubes[0].bands)

    @property
    def classes(self) -> dict[int, str]:
        """Label value -> class name (the cubes' own, else one name per value present)."""
        return self.cubes[0].classes or {v: f"class {v}" for v in self.stats.present}

    @property
    def num_classes(self) -> int:
        """1 + the largest class value (values are used as indices)."""
        return max([*self.classes, *self.stats.present]) + 1

    @property
    def label_dtype(self) -> np.dtype:
        """The dtype labels travel in: the smallest that holds the classes."""
        return smallest_label_dtype(self.num_classes)

    @property
    def resolution(self) -> float:
        """Pixel size of the cubes in CRS units."""
        return self.cubes[0].resolution

    @property
    def body(self) -> str:
        """Body of the cubes."""
        return self.cubes[0].body

    @property
    def stores(self) -> list[str]:
        """Paths of the cubes."""
        return [cube.store for cube in self.cubes]

    def loss_weights(self, kind: str) -> np.ndarray | None:
        """Cross-entropy weights of ``--class-weights kind`` over the training strips."""
        counts = np.zeros(self.num_classes, np.int64)
        counts[: len(self.stats.counts)] = self.stats.counts
        return loss_weights(kind, counts)

    def validation_parts(self) -> list[tuple[int, int]]:
        """The validation strips, ``(cube, time step)`` each: what ranks may share out."""
        return [(c, t) for c, cube in enumerate(self.cubes) for t in range(cube.shape[0])]

    def validation_shape(self, part: tuple[int, int]) -> tuple[int, int]:
        """HR rows and columns of one strip of :meth:`validation_parts` (nothing is read)."""
        c, _ = part
        val = self.splits[c].val
        return self.cubes[c].shape[-2], val.stop - val.start

    def validation_window(self, part: tuple[int, int], rows: slice, columns: slice) -> np.ndarray:
        """Image ``(1, band, y, x)`` float32 of ``rows`` x ``columns`` of a validation strip.

        Rows and columns are the strip's (of :meth:`validation_parts`); only the chunks they
        touch are read. NaN pixels hold the band mean (0 once normalised).
        """
        c, t = part
        cols = self._in_cube(c, columns)
        return self.finite(self.cubes[c].read("image", (t, slice(None), rows, cols)))[None]

    def validation_labels(self, part: tuple[int, int], rows: slice, columns: slice) -> np.ndarray:
        """Labels ``(y, x)`` of ``rows`` x ``columns`` of a strip, in :attr:`label_dtype`."""
        c, t = part
        labels = self.cubes[c].labels_at(t, rows, self._in_cube(c, columns))
        return labels.astype(self.label_dtype, copy=False)

    def _in_cube(self, c: int, columns: slice) -> slice:
        """Columns of cube ``c``'s validation strip as the cube's own columns."""
        start = self.splits[c].val.start
        return slice(start + columns.start, start + columns.stop)

    def finite(self, image: np.ndarray) -> np.ndarray:
        """``image(band, y, x)`` as float32 with its NaN pixels set to the band means.

        Integer fill values stay what they are: 0 may be a real black pixel.
        """
        out = image.astype(np.float32)
        missing = np.isnan(out)
        if missing.any():
            out = np.where(missing, np.asarray(self.stats.mean, np.float32)[:, None, None], out)
        return out


def open_training_data(
    paths: Sequence[str | Path], *, crop: int, val_fraction: float
) -> TrainingData:
    """Open the cubes ``paths`` name (stores or folders of them), check they agree, stream stats.

    Raises:
        CatalogReadError, StoreMismatchError: a path is not a complete cube.
        InvalidArgumentError: a cube has no labels, is too small for ``crop``, or its bands,
            classes or resolution differ from the first cube's.
        MixedBodiesError: the cubes are of more than one body.
        StoreCorruptError: a chunk read is missing or damaged.
    """
    cubes = [open_cube(path) for path in cube_paths(paths)]
    first = cubes[0]
    for cube in cubes[1:]:
        _check_agrees(first, cube)
    splits = []
    for cube in cubes:
        try:
            splits.append(spatial_split(cube.shape[-1], val_fraction, multiple=crop))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"cube {cube.store}: {exc}") from None
        if crop > cube.shape[2]:
            raise InvalidArgumentError(
                f"--crop {crop} does not fit cube {cube.store} ({cube.shape[2]} px high): "
                "lower --crop"
            )
    return TrainingData(tuple(cubes), tuple(splits), statistics(cubes, splits))


def _check_agrees(first: Cube, cube: Cube) -> None:
    """Refuse ``cube`` beside ``first`` unless bands, classes, body and resolution agree."""
    if cube.body != first.body:
        raise MixedBodiesError(
            f"cubes mix bodies: {first.body} ({first.store}), {cube.body} ({cube.store}): "
            "train on the cubes of one body"
        )
    if cube.bands != first.bands:
        raise InvalidArgumentError(
            f"cube {cube.store} has bands {list(cube.bands)}, cube {first.store} has "
            f"{list(first.bands)}: train on cubes ingested with the same --bands"
        )
    if cube.classes != first.classes:
        raise InvalidArgumentError(
            f"cube {cube.store} has classes {cube.classes}, cube {first.store} has "
            f"{first.classes}: train on cubes labelled with the same classes"
        )
    if not math.isclose(cube.resolution, first.resolution, rel_tol=1e-3):
        raise InvalidArgumentError(
            f"cube {cube.store} has {cube.resolution:g} CRS units per pixel, cube "
            f"{first.store} {first.resolution:g}: ingest them at one --resolution"
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


#: Draws of a window position before one that is mostly nodata is kept anyway.
NODATA_TRIES = 16
#: A window with more than this share of nodata pixels is drawn again.
NODATA_SHARE = 0.5


class WindowSampler:
    """Random HR windows from the cubes' training strips: a pure function of the window's index.

    Window ``index`` of ``rank``'s batch at ``step`` is drawn from a generator seeded by
    ``(seed, step, rank, index)``: its cube (in proportion to the cube's window positions, so
    every position of every cube is equally likely), time step, position and dihedral flip.
    So batches do not depend on which process reads them, and resume needs no sampler state.
    A draw whose window is more than half nodata is drawn again from the same generator (up
    to :data:`NODATA_TRIES` times). Windows lie inside each cube's training strip.

    With ``foreground`` > 0 that share of the windows (drawn per window) is centred on a random
    foreground pixel (label != 0, on every 4th row and column) of the training strips, clipped
    to fit, so rare small objects are seen often enough; the statistics' foreground index says
    which label blocks hold them, and the window's worker reads the block it picked.
    """

    def __init__(
        self, data: TrainingData, *, crop: int, seed: int, foreground: float = 0.0
    ) -> None:
        self.data, self.crop, self.seed, self.foreground = data, crop, seed, foreground
        positions = np.array(
            [
                cube.shape[0] * (cube.shape[2] - crop + 1) * (split.train.stop - crop + 1)
                for cube, split in zip(data.cubes, data.splits, strict=True)
            ],
            np.float64,
        )
        self.cube_p = positions / positions.sum()
        self.foreground_end = np.cumsum(data.stats.foreground[:, 6])

    def batch(self, step: int, rank: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """HR images (size, bands, crop, crop) float32 and labels (size, crop, crop)."""
        windows = [self.window(step, rank, index) for index in range(size)]
        return np.stack([w[0] for w in windows]), np.stack([w[1] for w in windows])

    def window(self, step: int, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``index`` of the batch: image (bands, crop, crop) float32 and its labels."""
        rng = np.random.default_rng([self.seed, step, rank, index])
        c = self.crop
        for _ in range(NODATA_TRIES):
            cube, t, y, x = self._position(rng)
            image = cube.read("image", (t, slice(None), slice(y, y + c), slice(x, x + c)))
            if cube.nodata(image).mean() <= NODATA_SHARE:
                break
        labels = cube.labels_at(t, slice(y, y + c), slice(x, x + c))
        flip = int(rng.integers(0, 8))  # the dihedral group: any rotation/reflection
        labels = labels.astype(self.data.label_dtype, copy=False)
        return _dihedral(self.data.finite(image), flip), _dihedral(labels, flip)

    def _position(self, rng: np.random.Generator) -> tuple[Cube, int, int, int]:
        """A window's cube, time step and top-left corner."""
        if len(self.foreground_end) and rng.random() < self.foreground:
            return self._on_foreground(rng)
        k = int(rng.choice(len(self.cube_p), p=self.cube_p))
        cube, train = self.data.cubes[k], self.data.splits[k].train
        t = int(rng.integers(0, cube.shape[0]))
        y = int(rng.integers(0, cube.shape[2] - self.crop + 1))
        x = int(rng.integers(train.start, train.stop - self.crop + 1))
        return cube, t, y, x

    def _on_foreground(self, rng: np.random.Generator) -> tuple[Cube, int, int, int]:
        """A window centred (give or take a quarter window) on a random foreground pixel."""
        c = self.crop
        k = int(rng.integers(0, self.foreground_end[-1]))
        row = int(np.searchsorted(self.foreground_end, k, side="right"))
        index, t, y0, y1, x0, x1, _ = (int(v) for v in self.data.stats.foreground[row])
        cube, train = self.data.cubes[index], self.data.splits[index].train
        block = cube.labels_at(t, slice(y0, y1), slice(x0, x1))
        ys, xs = np.nonzero(block[_grid4(y0) - y0 :: 4, _grid4(x0) - x0 :: 4])
        j = k - (int(self.foreground_end[row - 1]) if row else 0)
        centre_y, centre_x = _grid4(y0) + 4 * int(ys[j]), _grid4(x0) + 4 * int(xs[j])
        if t < 0:  # labels(y, x): the same map in every time step
            t = int(rng.integers(0, cube.shape[0]))
        jitter = rng.integers(-(c // 4), c // 4 + 1, 2)  # not always dead centre
        y = int(np.clip(centre_y + jitter[0] - c // 2, 0, cube.shape[2] - c))
        x = int(np.clip(centre_x + jitter[1] - c // 2, train.start, train.stop - c))
        return cube, t, y, x


class _StepBatches(torch.utils.data.Dataset):
    """Step -> one rank's batch of that step: what DataLoader workers compute."""

    def __init__(self, sampler: WindowSampler, rank: int, size: int) -> None:
        self.sampler, self.rank, self.size = sampler, rank, size

    def __getitem__(self, step: int) -> Any:
        try:
            return self.sampler.batch(step, self.rank, self.size)
        except PlanetsegError as exc:  # re-raised by the training process, as one line
            return exc


def _start_worker(trainer: int, _: int) -> None:
    """Set up a loader worker of the training process ``trainer`` (a pid).

    The worker leaves SIGINT/SIGTERM to the training process, which stops its workers, and
    exits once that process is gone: a forkserver's child outlives a SIGKILLed trainer
    otherwise (its parent, the server, lives on, so torch's own parent check never fires).
    """
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        process = psutil.Process(trainer)
    except psutil.NoSuchProcess:
        os._exit(0)

    def watch() -> None:
        while True:
            try:
                gone = not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                os._exit(0)
            time.sleep(1)

    threading.Thread(target=watch, name="planetseg-trainer-watch", daemon=True).start()


def _loader_context() -> Any:
    """The forkserver context where the platform has it (workers fork a clean server), else spawn.

    Never fork: the training process has read zarr chunks (and their codecs' threads) by then.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["planetseg.data"])  # each worker starts with these imported
    return context


def streamed_batches(
    sampler: WindowSampler, rank: int, size: int, steps: range, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``rank``'s batches of ``steps``, read ahead by ``workers`` DataLoader processes.

    ``workers = 0`` reads them in this process. Every batch is the same whatever ``workers``
    is (a batch is a function of its step). Close the iterator to stop the workers.

    Yields:
        HR images ``(size, bands, crop, crop)`` float32 and labels ``(size, crop, crop)`` in
        the smallest dtype that holds the classes.

    Raises:
        PlanetsegError: a worker could not read a window (a damaged chunk).
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _StepBatches(sampler, rank, size),
        batch_size=None,
        sampler=steps,
        num_workers=workers,
        multiprocessing_context=_loader_context() if workers else None,
        worker_init_fn=functools.partial(_start_worker, os.getpid()) if workers else None,
        prefetch_factor=2 if workers else None,
    )
    batches = iter(loader)
    try:
        for batch in batches:
            if isinstance(batch, PlanetsegError):
                raise batch
            yield batch
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # a worker iterator only
        if shutdown is not None:
            shutdown()


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
