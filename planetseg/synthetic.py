"""A synthetic planetary world: cratered scenes with exact ground truth, deterministic from a seed.

This is the embedded default data of planetseg and the ground truth that ingest, training,
segmentation, change detection and crater extraction are scored against. One call to
:func:`synthesize` writes, for a square scene on the Moon (an IAU_2015 CRS) or the Earth (a UTM
CRS), one single-band image and one label raster per epoch as Cloud-Optimized GeoTIFFs, a crater
catalog (``craters.csv``) and a STAC collection with one item per epoch.

The world is built in two steps, as the rest of planetseg is: a cheap *plan* (the grid and the
crater population, :func:`plan_craters`), then *rendering* (:func:`render`) of every epoch from
it. Terrain is a height field of smooth plains and rough highlands (spectral noise, masked), with
albedo variation; craters follow a power-law size-frequency distribution and come in two classes:

* ``fresh``: deep bowl, sharp raised rim, bright ejecta halo with rays, bright floor.
* ``degraded``: shallow, subdued rim, no ejecta, no albedo change.

Images are Lambertian hillshade (with cast shadows) of the height field under each epoch's sun,
times albedo, with mild sensor noise. The default epochs are: epoch 0 (base population), epoch 1
(same surface, only the sun moves: an illumination-only change that must not be detected as
change) and epoch 2 (new, mostly fresh craters).

Every random draw comes from a generator seeded by ``(seed, stream)``, nothing depends on the
output path or the clock, so the same seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from pyproj import CRS, Transformer

from planetseg import __version__
from planetseg.bodies import Body, body_of_crs, parse_crs
from planetseg.errors import InvalidArgumentError
from planetseg.items import Item, atomic_path, isoformat, raster_item, write_items
from planetseg.store import create_owned_dir, prepare_output

__all__ = [
    "CLASSES",
    "CRATER_CLASSES",
    "DEFAULT_EPOCHS",
    "EpochSpec",
    "LabelClass",
    "SynthConfig",
    "SynthScene",
    "SynthWorld",
    "plan_craters",
    "render",
    "synthesize",
]

logger = logging.getLogger(__name__)

CLASSIFICATION_SCHEMA = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
VIEW_SCHEMA = "https://stac-extensions.github.io/view/v1.0.0/schema.json"
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


class LabelClass(IntEnum):
    """Values of the label rasters (uint8)."""

    PLAINS = 0
    HIGHLANDS = 1
    FRESH_CRATER = 2
    DEGRADED_CRATER = 3


#: Label value -> class name, as written to the STAC collection and items.
CLASSES: dict[int, str] = {int(c): c.name.lower() for c in LabelClass}

_CLASS_DESCRIPTIONS = {
    LabelClass.PLAINS: "smooth low plains (mare-like)",
    LabelClass.HIGHLANDS: "rough elevated highlands",
    LabelClass.FRESH_CRATER: "fresh crater (rim-diameter disc): deep bowl, sharp rim, bright halo",
    LabelClass.DEGRADED_CRATER: "degraded crater (rim-diameter disc): shallow bowl, subdued rim",
}

#: Crater class name in the catalog -> label value.
CRATER_CLASSES: dict[str, int] = {
    "fresh": int(LabelClass.FRESH_CRATER),
    "degraded": int(LabelClass.DEGRADED_CRATER),
}

# Independent random streams, so that changing e.g. the noise level does not move the craters.
_STREAM_TERRAIN, _STREAM_CRATERS, _STREAM_SHAPES, _STREAM_NOISE = 1, 2, 3, 4

# Tries per crater before giving up on placing it (the scene is then simply a little sparser).
# New craters are few and must land on untouched ground, so they get many more tries.
_PLACEMENT_TRIES = 40
#: Smallest scene side in pixels, whatever the craters.
MIN_SIZE = 64
_NEW_CRATER_TRIES = 1000


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise InvalidArgumentError(f"{name} must be {what}")


@dataclass(frozen=True)
class EpochSpec:
    """One acquisition of the synthetic scene.

    Attributes:
        datetime: Acquisition time; naive values are taken as UTC.
        sun_azimuth: Direction of the sun in degrees clockwise from north, in [0, 360).
        sun_elevation: Sun elevation in degrees above the horizon, in (0, 90].
        new_craters: Craters that first appear in this epoch, on top of everything before. For
            the first epoch these are added to the base population (the default is 0).
    """

    datetime: dt.datetime
    sun_azimuth: float
    sun_elevation: float
    new_craters: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.datetime, dt.datetime):
            raise InvalidArgumentError(
                "EpochSpec.datetime must be a datetime.datetime, "
                f"got {type(self.datetime).__name__}"
            )
        if not (math.isfinite(self.sun_azimuth) and 0.0 <= self.sun_azimuth < 360.0):
            raise InvalidArgumentError(
                f"EpochSpec.sun_azimuth must be in [0, 360) degrees, got {self.sun_azimuth}"
            )
        if not (math.isfinite(self.sun_elevation) and 0.0 < self.sun_elevation <= 90.0):
            raise InvalidArgumentError(
                f"EpochSpec.sun_elevation must be in (0, 90] degrees, got {self.sun_elevation}"
            )
        if not _is_int(self.new_craters) or self.new_craters < 0:
            raise InvalidArgumentError(
                f"EpochSpec.new_craters must be an integer >= 0, got {self.new_craters!r}"
            )

    @property
    def utc(self) -> dt.datetime:
        """The acquisition time as an aware UTC datetime."""
        if self.datetime.tzinfo is None:
            return self.datetime.replace(tzinfo=dt.UTC)
        return self.datetime.astimezone(dt.UTC)


#: Base population under a western sun; the same surface under an eastern sun half a lunation
#: later (illumination-only change); new craters years later.
DEFAULT_EPOCHS: tuple[EpochSpec, ...] = (
    EpochSpec(dt.datetime(2010, 3, 1, 10, 0, tzinfo=dt.UTC), 270.0, 25.0, 0),
    EpochSpec(dt.datetime(2010, 3, 15, 22, 0, tzinfo=dt.UTC), 90.0, 40.0, 0),
    EpochSpec(dt.datetime(2014, 6, 20, 4, 0, tzinfo=dt.UTC), 200.0, 30.0, 12),
)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a synthetic world; the same config always gives the same files.

    Attributes:
        seed: Seed of every random draw (integer >= 0).
        size: Pixels per side of the square HR scene (>= 64, and twice the largest new
            crater: 96 with the default ``new_crater_diameter_px``).
        gsd: Ground sample distance of the HR scene, metres per pixel (> 0).
        crs: Projected CRS (metres) of the grid: an IAU_2015 code puts the scene on that body
            (default: Moon equirectangular), an EPSG UTM code (e.g. ``"EPSG:32633"``) on Earth;
            then set ``center_lon``/``center_lat`` inside the UTM zone.
        center_lon: Body longitude of the scene centre, degrees east.
        center_lat: Body latitude of the scene centre, degrees north.
        epochs: The acquisitions, with strictly increasing datetimes.
        crater_density: Base-population craters attempted per million HR pixels (>= 0); craters
            that cannot be placed without obscuring a neighbour are dropped.
        sfd_slope: Exponent b of the cumulative size-frequency distribution N(>D) ~ D^-b (> 0);
            about 2 for small lunar craters: many small, few large.
        min_diameter_px: Smallest rim diameter, HR pixels (>= 3). At the default of 4 the
            smallest craters span 2 px once the image is degraded 2x.
        max_diameter_px: Largest rim diameter, HR pixels; ``None`` means ``size / 8``.
        fresh_fraction: Fraction of the base population that is fresh, in [0, 1].
        new_crater_diameter_px: (min, max) rim diameter in HR pixels of the craters that appear
            in later epochs, drawn with the same ``sfd_slope``.
        new_fresh_fraction: Fraction of newly appearing craters that are fresh, in [0, 1].
        highland_fraction: Fraction of the scene covered by highlands, in [0, 1].
        highland_slope_deg: RMS slope of the highland roughness, degrees.
        plains_slope_deg: RMS slope of the plains, degrees.
        noise_std: Standard deviation of the Gaussian sensor noise, digital numbers (>= 0).
    """

    seed: int = 0
    size: int = 1024
    gsd: float = 0.5
    crs: str = "IAU_2015:30110"
    center_lon: float = 23.47
    center_lat: float = 0.67
    epochs: tuple[EpochSpec, ...] = DEFAULT_EPOCHS
    crater_density: float = 700.0
    sfd_slope: float = 1.8
    min_diameter_px: float = 4.0
    max_diameter_px: float | None = None
    fresh_fraction: float = 0.35
    new_crater_diameter_px: tuple[float, float] = (8.0, 48.0)
    new_fresh_fraction: float = 0.85
    highland_fraction: float = 0.35
    highland_slope_deg: float = 10.0
    plains_slope_deg: float = 2.5
    noise_std: float = 1.5

    def __post_init__(self) -> None:
        _require(_is_int(self.seed) and self.seed >= 0, "--seed", "an integer >= 0")
        new_range = tuple(float(v) for v in self.new_crater_diameter_px)
        # New craters land inside the scene, so it must be at least twice the largest (96 px
        # with the default new_crater_diameter_px).
        smallest = max(MIN_SIZE, math.ceil(2 * max(new_range, default=0)))
        _require(
            _is_int(self.size) and self.size >= smallest,
            "--size",
            f"an integer >= {smallest} pixels (at least {MIN_SIZE}, and twice the largest new "
            f"crater: new_crater_diameter_px max {max(new_range, default=0):g}), got {self.size}",
        )
        _require(
            _is_number(self.gsd) and self.gsd > 0,
            "--gsd",
            f"a positive number of metres, got {self.gsd}",
        )
        _require(
            math.isfinite(self.center_lat) and -90 < self.center_lat < 90,
            "center_lat",
            "in (-90, 90) degrees",
        )
        _require(
            math.isfinite(self.center_lon) and -360 <= self.center_lon <= 360,
            "center_lon",
            "in [-360, 360] degrees",
        )
        epochs = tuple(self.epochs)
        if not epochs or not all(isinstance(e, EpochSpec) for e in epochs):
            raise InvalidArgumentError("epochs must be a non-empty tuple of EpochSpec")
        object.__setattr__(self, "epochs", epochs)
        times = [e.utc for e in epochs]
        for k in range(1, len(times)):
            if times[k] <= times[k - 1]:
                raise InvalidArgumentError(
                    f"epochs must have strictly increasing datetimes: epoch {k} "
                    f"({isoformat(times[k])}) is not after epoch {k - 1} "
                    f"({isoformat(times[k - 1])})"
                )
        _require(
            math.isfinite(self.crater_density) and self.crater_density >= 0,
            "crater_density",
            ">= 0",
        )
        _require(math.isfinite(self.sfd_slope) and self.sfd_slope > 0, "sfd_slope", "> 0")
        _require(
            math.isfinite(self.min_diameter_px) and self.min_diameter_px >= 3,
            "min_diameter_px",
            ">= 3 pixels",
        )
        dmax = self.diameter_range_px[1]
        _require(
            math.isfinite(dmax) and self.min_diameter_px < dmax <= self.size / 2,
            "max_diameter_px",
            f"in ({self.min_diameter_px}, size / 2 = {self.size / 2}]",
        )
        _require(
            len(new_range) == 2 and 3 <= new_range[0] <= new_range[1] <= self.size / 2,
            "new_crater_diameter_px",
            f"(min, max) with 3 <= min <= max <= size / 2 = {self.size / 2}",
        )
        object.__setattr__(self, "new_crater_diameter_px", new_range)
        for name in ("fresh_fraction", "new_fresh_fraction", "highland_fraction"):
            value = getattr(self, name)
            _require(math.isfinite(value) and 0 <= value <= 1, name, "in [0, 1]")
        for name in ("highland_slope_deg", "plains_slope_deg"):
            value = getattr(self, name)
            _require(math.isfinite(value) and 0 <= value < 60, name, "in [0, 60) degrees")
        _require(math.isfinite(self.noise_std) and self.noise_std >= 0, "noise_std", ">= 0")
        # CRS problems surface here (CRSError from parse_crs) rather than halfway through a run.
        _grid(self)

    @property
    def diameter_range_px(self) -> tuple[float, float]:
        """(min, max) rim diameter of the base population, HR pixels."""
        dmax = self.size / 8 if self.max_diameter_px is None else float(self.max_diameter_px)
        return float(self.min_diameter_px), dmax


@dataclass(frozen=True)
class _Grid:
    crs: CRS
    body: Body
    transform: Affine
    size: int


def _grid(config: SynthConfig) -> _Grid:
    crs = parse_crs(config.crs)
    if not crs.is_projected or any(
        (a.unit_name or "").lower() not in ("metre", "meter") for a in crs.axis_info
    ):
        raise InvalidArgumentError(
            f"crs must be a projected CRS in metres (e.g. IAU_2015:30110 or EPSG:32633), "
            f"got {crs.name!r}"
        )
    body = body_of_crs(crs)
    to_xy = Transformer.from_crs(body.crs, crs, always_xy=True)
    cx, cy = to_xy.transform(config.center_lon, config.center_lat, errcheck=False)
    if not (math.isfinite(cx) and math.isfinite(cy)):
        raise InvalidArgumentError(
            f"center_lon/center_lat ({config.center_lon}, {config.center_lat}) cannot be "
            f"projected to {crs.name!r}: choose a centre inside the CRS's area of use"
        )
    half = config.size * config.gsd / 2
    # Snapping the upper-left corner to a multiple of gsd keeps grids of different scenes
    # (and their 2x-degraded versions) aligned, which ingest and change detection rely on.
    x0 = math.floor((cx - half) / config.gsd) * config.gsd
    y0 = math.ceil((cy + half) / config.gsd) * config.gsd
    return _Grid(crs, body, Affine(config.gsd, 0.0, x0, 0.0, -config.gsd, y0), config.size)


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *extra])


# --------------------------------------------------------------------------------------------
# Plan: the crater population


@dataclass(frozen=True)
class _Crater:
    row: float  # fractional HR pixel coordinates of the centre (rasterio convention)
    col: float
    diameter_px: float
    fresh: bool
    epoch: int


def _power_law(rng: np.random.Generator, n: int, lo: float, hi: float, b: float) -> np.ndarray:
    """Diameters with cumulative N(>D) ~ D^-b truncated to [lo, hi], largest first."""
    if hi <= lo:
        return np.full(n, lo)
    u = rng.random(n)
    d = (lo**-b - u * (lo**-b - hi**-b)) ** (-1.0 / b)
    return np.sort(d)[::-1]


def _fits(
    row: float,
    col: float,
    r: float,
    rows: np.ndarray,
    cols: np.ndarray,
    radii: np.ndarray,
    *,
    disjoint: bool,
) -> bool:
    """Whether a crater drawn *on top of* the existing, larger ones leaves each identifiable.

    A newcomer may sit on a much larger crater's floor or wall but never cover its centre;
    craters of similar size must be almost disjoint. With ``disjoint`` (craters of later epochs)
    the discs may not touch at all, so each appearance is a clean terrain -> crater change.
    """
    if rows.size == 0:
        return True
    d = np.hypot(rows - row, cols - col)
    if disjoint:
        return bool(np.all(d >= r + radii + 1.0))
    clear_of_centre = d >= r + np.maximum(0.25 * radii, 1.0)
    similar = radii < 2.5 * r
    return bool(np.all(clear_of_centre & (~similar | (d >= 0.8 * (r + radii)))))


def plan_craters(config: SynthConfig) -> pd.DataFrame:
    """Place the crater population of every epoch (no pixels are rendered).

    Base craters are placed largest first; a centre is rejected where the crater would obscure
    one already placed, so each crater in the catalog stays identifiable in every epoch's labels
    (its centre pixel carries its class and at least most of its disc does). Craters of
    ``EpochSpec.new_craters`` are placed after the base population, each on ground no earlier
    crater's disc touches, so their appearance changes terrain labels only.

    Args:
        config: The world to plan.

    Returns:
        One row per crater in drawing order (epoch, then diameter descending), with columns
        ``row``, ``col`` (float64, fractional HR pixel coordinates of the centre: pixel
        ``(i, j)`` spans ``[i, i+1) x [j, j+1)``), ``diameter_px`` (float64), ``class``
        (``"fresh"``/``"degraded"``) and ``epoch`` (int64, index of the first epoch showing it).
    """
    rng = _rng(config.seed, _STREAM_CRATERS)
    n = config.size
    lo, hi = config.diameter_range_px
    craters: list[_Crater] = []
    rows = np.empty(0)
    cols = np.empty(0)
    radii = np.empty(0)

    def place(diameters: np.ndarray, fresh_fraction: float, epoch: int, disjoint: bool) -> int:
        nonlocal rows, cols, radii
        placed = 0
        for d in diameters:
            fresh = bool(rng.random() < fresh_fraction)
            for _ in range(_NEW_CRATER_TRIES if disjoint else _PLACEMENT_TRIES):
                row, col = rng.random(2) * n
                if _fits(row, col, d / 2, rows, cols, radii, disjoint=disjoint):
                    craters.append(_Crater(float(row), float(col), float(d), fresh, epoch))
                    rows = np.append(rows, row)
                    cols = np.append(cols, col)
                    radii = np.append(radii, d / 2)
                    placed += 1
                    break
        return placed

    n_base = round(config.crater_density * n * n / 1e6)
    placed = place(
        _power_law(rng, n_base, lo, hi, config.sfd_slope), config.fresh_fraction, 0, disjoint=False
    )
    logger.debug("placed %d of %d base craters", placed, n_base)
    new_lo, new_hi = config.new_crater_diameter_px
    for k, epoch in enumerate(config.epochs):
        if epoch.new_craters == 0:
            continue
        diameters = _power_law(rng, epoch.new_craters, new_lo, new_hi, config.sfd_slope)
        placed = place(diameters, config.new_fresh_fraction, k, disjoint=True)
        if placed < epoch.new_craters:
            logger.warning(
                "epoch %d: placed %d of %d new craters (the scene is crowded: lower "
                "crater_density or new_crater_diameter_px)",
                k,
                placed,
                epoch.new_craters,
            )
    return pd.DataFrame(
        {
            "row": np.array([c.row for c in craters], dtype=np.float64),
            "col": np.array([c.col for c in craters], dtype=np.float64),
            "diameter_px": np.array([c.diameter_px for c in craters], dtype=np.float64),
            "class": pd.Series(["fresh" if c.fresh else "degraded" for c in craters], dtype=object),
            "epoch": np.array([c.epoch for c in craters], dtype=np.int64),
        }
    )


# --------------------------------------------------------------------------------------------
# Rendering


def _spectral_noise(rng: np.random.Generator, n: int, beta: float, k0: float) -> np.ndarray:
    """Zero-mean, unit-std field with power spectrum ~ (k^2 + k0^2)^(-beta/2), k in cycles/px."""
    white = rng.standard_normal((n, n))
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    amplitude = (kx**2 + ky**2 + k0**2) ** (-beta / 4)
    amplitude[0, 0] = 0.0
    field_ = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(n, n))
    return (field_ - field_.mean()) / field_.std()


def _rms_slope(h: np.ndarray, gsd: float) -> float:
    gy, gx = np.gradient(h, gsd)
    return float(np.sqrt(np.mean(gx**2 + gy**2)))


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _terrain(config: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base height (m, float64), albedo (float64) and labels (uint8) before any crater."""
    rng = _rng(config.seed, _STREAM_TERRAIN)
    n, gsd = config.size, config.gsd
    # Highlands are the high part of a very smooth field: a few large blobs per scene.
    mask_field = _spectral_noise(rng, n, 4.0, 2.0 / n)
    if config.highland_fraction >= 1:
        threshold = -np.inf
    elif config.highland_fraction <= 0:
        threshold = np.inf
    else:
        threshold = float(np.quantile(mask_field, 1 - config.highland_fraction))
    highland = mask_field > threshold
    ramp = _smoothstep(threshold - 0.15, threshold + 0.35, mask_field)

    plains = _spectral_noise(rng, n, 3.6, 1.0 / n)
    plains *= math.tan(math.radians(config.plains_slope_deg)) / max(_rms_slope(plains, gsd), 1e-12)
    # The spectrum is flattened below ~n/12 px so the roughness is hummocky, not mountainous:
    # large-scale relief would only cast scene-wide shadows.
    rough = _spectral_noise(rng, n, 3.0, 12.0 / n)
    rough *= math.tan(math.radians(config.highland_slope_deg)) / max(_rms_slope(rough, gsd), 1e-12)
    # A low plateau makes the plains/highland contact a visible but gentle scarp.
    uplift = 0.006 * n * gsd
    height = plains + ramp * (rough + uplift)

    albedo_lowfreq = _spectral_noise(rng, n, 3.0, 4.0 / n)
    speckle = _spectral_noise(rng, n, 1.0, 0.25)
    albedo = 0.42 + 0.2 * ramp + 0.035 * albedo_lowfreq + 0.015 * speckle

    labels = np.where(highland, LabelClass.HIGHLANDS, LabelClass.PLAINS).astype(np.uint8)
    return height, albedo, labels


def _draw_crater(
    crater: pd.Series,
    index: int,
    config: SynthConfig,
    height: np.ndarray,
    albedo: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Add one crater to the rasters in place, touching only its bounding window."""
    rng = _rng(config.seed, _STREAM_SHAPES, index)
    n = config.size
    fresh = crater["class"] == "fresh"
    radius = crater["diameter_px"] / 2
    d_m = crater["diameter_px"] * config.gsd
    extent = radius * (3.0 if fresh else 1.8)
    r0 = max(0, math.floor(crater["row"] - extent))
    r1 = min(n, math.ceil(crater["row"] + extent) + 1)
    c0 = max(0, math.floor(crater["col"] - extent))
    c1 = min(n, math.ceil(crater["col"] + extent) + 1)
    if r0 >= r1 or c0 >= c1:
        return
    dy = (np.arange(r0, r1) + 0.5 - crater["row"])[:, None]
    dx = (np.arange(c0, c1) + 0.5 - crater["col"])[None, :]
    dist = np.hypot(dy, dx)
    r = dist / radius
    win = (slice(r0, r1), slice(c0, c1))

    if fresh:
        depth = rng.uniform(0.17, 0.21) * d_m
        rim = rng.uniform(0.035, 0.045) * d_m
        # Parabolic bowl meeting a rim crest with an ejecta apron thinning as r^-3: the kink at
        # the crest is what makes fresh rims look sharp.
        inside = -depth + (depth + rim) * r**2
        outside = rim * np.maximum(r, 1.0) ** -3 * (1 - _smoothstep(2.4, 3.0, r))
        profile = np.where(r < 1, inside, outside)
        # The impact excavates the old surface: erase pre-existing relief inside the bowl.
        ring = (r >= 1.0) & (r < 1.4)
        reference = float(height[win][ring].mean()) if ring.any() else float(height[win].mean())
        erase = 1 - _smoothstep(0.8, 1.1, r)
        height[win] = height[win] * (1 - erase) + reference * erase + profile

        strength = rng.uniform(0.25, 0.4)
        n_rays = int(rng.integers(5, 12))
        phase = rng.uniform(0, 2 * np.pi)
        theta = np.arctan2(dy, dx)
        rays = np.cos(n_rays * theta + phase + 0.6 * np.sin(3 * theta + phase)) ** 2
        halo = np.where(
            r < 1,
            0.75 * strength,
            strength * (np.exp(-(r - 1) / 0.45) + 0.5 * rays * np.exp(-(r - 1) / 1.0)),
        )
        albedo[win] += halo * (1 - _smoothstep(2.4, 3.0, r))
        value = LabelClass.FRESH_CRATER
    else:
        depth = rng.uniform(0.06, 0.12) * d_m
        rim = rng.uniform(0.005, 0.02) * d_m
        # (1 - r^2)^2 has zero slope at the rim: no crest, a softened, infilled bowl.
        bowl = -depth * np.clip(1 - r**2, 0, None) ** 2
        bump = rim * np.exp(-(((r - 1.0) / 0.3) ** 2)) * (1 - _smoothstep(1.5, 1.8, r))
        height[win] += bowl + bump
        value = LabelClass.DEGRADED_CRATER
    labels[win][dist <= radius] = value


def _shadow(height: np.ndarray, gsd: float, azimuth: float, elevation: float) -> np.ndarray:
    """Cast-shadow mask (bool, True = in shadow) by marching toward the sun in whole pixels."""
    n = height.shape[0]
    tan_el = math.tan(math.radians(elevation))
    relief = float(height.max() - height.min())
    steps = min(int(math.ceil(relief / (tan_el * gsd))), n)
    if steps == 0:
        return np.zeros(height.shape, dtype=bool)
    h = height.astype(np.float32)
    az = math.radians(azimuth)
    # Toward the sun: east is +col, north is -row.
    u_col, u_row = math.sin(az), -math.cos(az)
    horizon = np.full(h.shape, -np.inf, dtype=np.float32)
    drop = np.float32(tan_el * gsd)
    last = None
    for t in range(1, steps + 1):
        sr, sc = round(t * u_row), round(t * u_col)
        if (sr, sc) == last:
            continue
        last = (sr, sc)
        if abs(sr) >= n or abs(sc) >= n:
            break
        step = np.float32(math.hypot(sr, sc)) * drop
        dst_r = slice(max(0, -sr), n - max(0, sr))
        dst_c = slice(max(0, -sc), n - max(0, sc))
        src_r = slice(max(0, sr), n - max(0, -sr))
        src_c = slice(max(0, sc), n - max(0, -sc))
        np.maximum(horizon[dst_r, dst_c], h[src_r, src_c] - step, out=horizon[dst_r, dst_c])
    return horizon > h


def _image(
    height: np.ndarray, albedo: np.ndarray, epoch: EpochSpec, config: SynthConfig, k: int
) -> np.ndarray:
    """Render one epoch as uint8 digital numbers."""
    gsd = config.gsd
    gy, gx = np.gradient(height, gsd)
    # Rows grow southward, so the northward slope is -d/drow.
    dzdx, dzdy = gx, -gy
    az, el = math.radians(epoch.sun_azimuth), math.radians(epoch.sun_elevation)
    sun = (math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el))
    lambert = (-dzdx * sun[0] - dzdy * sun[1] + sun[2]) / np.sqrt(dzdx**2 + dzdy**2 + 1)
    lambert = np.clip(lambert, 0.0, None)
    lambert[_shadow(height, gsd, epoch.sun_azimuth, epoch.sun_elevation)] = 0.0
    # Exposure is set per acquisition, as a camera would: flat plains land at the same grey
    # whatever the sun, and a soft knee keeps sunlit slopes and halos from clipping.
    radiance = albedo * (lambert + 0.02) / math.sin(el)
    dn = 6.0 + 245.0 * np.tanh(radiance / 1.1)
    if config.noise_std > 0:
        dn += _rng(config.seed, _STREAM_NOISE, k).normal(0.0, config.noise_std, dn.shape)
    return np.clip(np.rint(dn), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SynthScene:
    """A rendered world held in memory.

    Attributes:
        config: The configuration it was rendered from.
        crs: The grid's CRS.
        body: The body the CRS belongs to.
        transform: Affine transform of the HR grid (pixel corner to CRS metres).
        images: Per epoch, the image, ``(size, size)`` uint8.
        labels: Per epoch, the labels, ``(size, size)`` uint8, values from :class:`LabelClass`.
        heights: Per epoch, the height field, ``(size, size)`` float64, metres.
        craters: The crater catalog, as written to ``craters.csv`` (see :func:`synthesize`).
    """

    config: SynthConfig
    crs: CRS
    body: Body
    transform: Affine
    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    heights: tuple[np.ndarray, ...]
    craters: pd.DataFrame


def render(config: SynthConfig | None = None) -> SynthScene:
    """Render every epoch of a synthetic world in memory (eager; nothing is written).

    Args:
        config: The world; ``None`` means ``SynthConfig()``.

    Returns:
        The rendered scene with its catalog.
    """
    config = SynthConfig() if config is None else config
    grid = _grid(config)
    plan = plan_craters(config)
    height, albedo, labels = _terrain(config)
    images, label_maps, heights = [], [], []
    for k, epoch in enumerate(config.epochs):
        for index in np.flatnonzero(plan["epoch"].to_numpy() == k):
            _draw_crater(plan.iloc[index], int(index), config, height, albedo, labels)
        images.append(_image(height, albedo, epoch, config, k))
        label_maps.append(labels.copy())
        heights.append(height.copy())
    return SynthScene(
        config=config,
        crs=grid.crs,
        body=grid.body,
        transform=grid.transform,
        images=tuple(images),
        labels=tuple(label_maps),
        heights=tuple(heights),
        craters=_catalog(plan, grid),
    )


def _catalog(plan: pd.DataFrame, grid: _Grid) -> pd.DataFrame:
    xs, ys = grid.transform @ (plan["col"].to_numpy(), plan["row"].to_numpy())
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    to_lonlat = Transformer.from_crs(grid.crs, grid.body.crs, always_xy=True)
    lons, lats = to_lonlat.transform(xs, ys)
    gsd = grid.transform.a
    return pd.DataFrame(
        {
            "id": np.arange(len(plan), dtype=np.int64),
            "lon": np.asarray(lons, dtype=np.float64),
            "lat": np.asarray(lats, dtype=np.float64),
            "diameter_km": plan["diameter_px"].to_numpy() * gsd / 1000.0,
            "class": plan["class"],
            "epoch": plan["epoch"],
            "x": xs,
            "y": ys,
            "row": plan["row"],
            "col": plan["col"],
            "diameter_px": plan["diameter_px"],
        }
    )


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class SynthWorld:
    """What :func:`synthesize` wrote.

    Attributes:
        root: The output directory.
        collection: ``collection.json``, the STAC collection.
        items: ``items.ndjson``, one STAC item per epoch.
        craters: ``craters.csv``, the crater catalog.
        images: Per epoch, the image COG (uint8, one band).
        labels: Per epoch, the label COG (uint8, one band, values of :data:`CLASSES`).
        collection_id: ``"synthetic-<body>"``.
        item_ids: Per epoch, the STAC item id.
        body: Name of the body (``"moon"``, ``"earth"``).
        classes: Label value -> class name.
    """

    root: Path
    collection: Path
    items: Path
    craters: Path
    images: tuple[Path, ...]
    labels: tuple[Path, ...]
    collection_id: str
    item_ids: tuple[str, ...]
    body: str
    classes: dict[int, str] = field(default_factory=lambda: dict(CLASSES))


def _classification() -> list[dict[str, Any]]:
    return [
        {"value": int(c), "name": CLASSES[int(c)], "description": _CLASS_DESCRIPTIONS[c]}
        for c in LabelClass
    ]


def _write_cog(path: Path, array: np.ndarray, grid: _Grid, *, labels: bool) -> None:
    # Overviews are built down to one block, so small scenes get small blocks to keep >= 1 level.
    block = 256 if grid.size >= 512 else (128 if grid.size >= 256 else 32)
    profile = {
        "driver": "COG",
        "width": grid.size,
        "height": grid.size,
        "count": 1,
        "dtype": "uint8",
        "crs": rasterio.crs.CRS.from_wkt(grid.crs.to_wkt()),
        "transform": grid.transform,
        "compress": "deflate",
        "blocksize": block,
        "overview_resampling": "nearest" if labels else "average",
    }
    if not labels:
        profile["predictor"] = 2
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array, 1)
            dst.set_band_description(1, "labels" if labels else "reflectance")


def _write_csv(path: Path, craters: pd.DataFrame) -> None:
    # Fixed float formats make the file byte-stable and readable.
    formats = {
        "lon": "{:.9f}",
        "lat": "{:.9f}",
        "diameter_km": "{:.7f}",
        "x": "{:.4f}",
        "y": "{:.4f}",
        "row": "{:.4f}",
        "col": "{:.4f}",
        "diameter_px": "{:.4f}",
    }
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(craters.columns)
    for rec in craters.itertuples(index=False):
        writer.writerow(
            formats[col].format(val) if col in formats else val
            for col, val in zip(craters.columns, rec, strict=True)
        )
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _config_record(config: SynthConfig) -> dict[str, Any]:
    record = asdict(config)
    record["epochs"] = [{**asdict(e), "datetime": isoformat(e.utc)} for e in config.epochs]
    record["new_crater_diameter_px"] = list(config.new_crater_diameter_px)
    return record


def synthesize(out_dir: str | Path, *, config: SynthConfig | None = None) -> SynthWorld:
    """Generate a synthetic world and write it as COGs, a crater catalog and a STAC collection.

    Files written in ``out_dir`` (created if missing; existing files of the same names are
    replaced atomically), with ``k`` the epoch index as two digits:

    * ``image-e{k}.tif``: COG, one band uint8, hillshade x albedo + noise, no nodata, deflate,
      tiled, overviews (average).
    * ``labels-e{k}.tif``: COG, one band uint8, values of :data:`CLASSES`, overviews (nearest).
    * ``craters.csv``: one row per crater in drawing order: ``id``, ``lon``, ``lat`` (body
      degrees), ``diameter_km``, ``class`` (``fresh``/``degraded``), ``epoch`` (first epoch
      showing it), ``x``, ``y`` (CRS metres), ``row``, ``col`` (fractional HR pixel coordinates:
      the centre pixel is ``(floor(row), floor(col))``) and ``diameter_px``. Diameters are
      measured on the grid, in CRS metres.
    * ``items.ndjson``: one STAC item per epoch (assets ``image`` and ``labels`` with file
      hrefs relative to it, ``proj:code``/``proj:wkt2``,
      ``view:sun_azimuth``/``view:sun_elevation``, ``gsd``, ``planetseg:epoch``).
    * ``collection.json``: the STAC collection ``synthetic-<body>`` (extent, gsd and
      ``classification:classes`` summaries, ``item_assets``, the generating config).

    All outputs are byte-identical for the same config, in any output directory, and the
    world can be copied or moved as a whole.

    Args:
        out_dir: Directory to write into.
        config: The world; ``None`` means ``SynthConfig()`` (a 1024 x 1024 Moon scene at
            0.5 m in IAU_2015:30110 with three epochs).

    Returns:
        The paths written and the class names.

    Raises:
        InvalidArgumentError: ``config`` is not a :class:`SynthConfig`.
        OutputPathError: ``out_dir`` is a file, not writable, or a folder holding files that
            synth did not write (an earlier world is rewritten).
    """
    if config is None:
        config = SynthConfig()
    if not isinstance(config, SynthConfig):
        raise InvalidArgumentError(f"config must be a SynthConfig, got {type(config).__name__}")
    start = time.perf_counter()
    prepare_output(out_dir, "synth")
    root = create_owned_dir(Path(out_dir).resolve(), "synth")
    scene = render(config)
    grid = _Grid(scene.crs, scene.body, scene.transform, config.size)
    collection_id = f"synthetic-{scene.body.name}"

    images, labels = [], []
    for k in range(len(config.epochs)):
        images.append(root / f"image-e{k:02d}.tif")
        labels.append(root / f"labels-e{k:02d}.tif")
        _write_cog(images[-1], scene.images[k], grid, labels=False)
        _write_cog(labels[-1], scene.labels[k], grid, labels=True)
    craters_path = root / "craters.csv"
    _write_csv(craters_path, scene.craters)

    classes = _classification()
    items: list[Item] = []
    for k, epoch in enumerate(config.epochs):
        n_new = int((scene.craters["epoch"] == k).sum()) if k else 0
        item = raster_item(
            f"{collection_id}-e{k:02d}",
            {
                "image": {
                    "href": str(images[k]),
                    "roles": ["data"],
                    "title": f"Image, epoch {k} (hillshade x albedo, uint8)",
                },
                "labels": {
                    "href": str(labels[k]),
                    "roles": ["labels"],
                    "title": f"Labels, epoch {k}",
                    "classification:classes": classes,
                    "raster:bands": [{"data_type": "uint8"}],
                },
            },
            datetime=epoch.utc,
            collection=collection_id,
            properties={
                "gsd": config.gsd,
                "view:sun_azimuth": epoch.sun_azimuth,
                "view:sun_elevation": epoch.sun_elevation,
                "planetseg:epoch": k,
                "planetseg:new_craters": n_new,
                "planetseg:synthetic_seed": config.seed,
            },
        )
        item["stac_extensions"] += [VIEW_SCHEMA, CLASSIFICATION_SCHEMA]
        # Hrefs relative to items.ndjson, which sits beside the COGs: a copied world reads
        # its own files, never the original's.
        for asset in item["assets"].values():
            asset["href"] = Path(asset["href"]).name
        items.append(item)
    items_path = write_items(items, root / "items.ndjson")

    collection_path = root / "collection.json"
    collection = _collection(collection_id, scene, items, classes)
    with atomic_path(collection_path) as tmp:
        tmp.write_text(json.dumps(collection, indent=1) + "\n")

    logger.info(
        "synthetic %s world (seed %d, %d px, %d craters, %d epochs) written to %s in %.1f s",
        scene.body.name,
        config.seed,
        config.size,
        len(scene.craters),
        len(config.epochs),
        root,
        time.perf_counter() - start,
    )
    return SynthWorld(
        root=root,
        collection=collection_path,
        items=items_path,
        craters=craters_path,
        images=tuple(images),
        labels=tuple(labels),
        collection_id=collection_id,
        item_ids=tuple(it["id"] for it in items),
        body=scene.body.name,
    )


def _collection(
    collection_id: str, scene: SynthScene, items: list[Item], classes: list[dict[str, Any]]
) -> dict[str, Any]:
    config = scene.config
    counts = scene.craters.groupby(["epoch", "class"]).size()
    bbox = items[0]["bbox"]
    first, last = items[0]["properties"]["datetime"], items[-1]["properties"]["datetime"]
    proj = {k: v for k, v in items[0]["properties"].items() if k in ("proj:code", "proj:epsg")}
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": [
            CLASSIFICATION_SCHEMA,
            VIEW_SCHEMA,
            "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
        ],
        "id": collection_id,
        "title": f"Synthetic {scene.body.name.capitalize()} world (seed {config.seed})",
        "description": (
            f"Synthetic cratered {scene.body.name.capitalize()} scene generated by "
            f"planetseg.synthetic with exact ground truth: {config.size} x {config.size} px "
            f"at {config.gsd} m, "
            f"{len(config.epochs)} epochs, {len(scene.craters)} craters "
            f"({', '.join(f'epoch {e} {c}: {n}' for (e, c), n in counts.items())}). "
            "Images are hillshade x albedo (uint8); labels are "
            + ", ".join(f"{v} {n}" for v, n in CLASSES.items())
            + "."
        ),
        "license": "CC0-1.0",
        "keywords": ["synthetic", scene.body.name, "craters", "ground truth"],
        "extent": {
            "spatial": {"bbox": [bbox]},
            "temporal": {"interval": [[first, last]]},
        },
        "summaries": {
            "gsd": [config.gsd],
            "planetseg:body": [scene.body.name],
            **{k: [v] for k, v in proj.items()},
            "view:sun_azimuth": {
                "minimum": min(e.sun_azimuth for e in config.epochs),
                "maximum": max(e.sun_azimuth for e in config.epochs),
            },
            "view:sun_elevation": {
                "minimum": min(e.sun_elevation for e in config.epochs),
                "maximum": max(e.sun_elevation for e in config.epochs),
            },
            "classification:classes": classes,
        },
        "item_assets": {
            "image": {
                "type": COG_TYPE,
                "roles": ["data"],
                "title": "Image (uint8)",
                "raster:bands": [{"data_type": "uint8"}],
            },
            "labels": {
                "type": COG_TYPE,
                "roles": ["labels"],
                "title": "Labels (uint8)",
                "classification:classes": classes,
                "raster:bands": [{"data_type": "uint8"}],
            },
        },
        "links": [],
        "planetseg:provenance": {
            "generator": "planetseg.synthetic",
            "planetseg_version": __version__,
            "config": _config_record(config),
        },
    }
