"""Configuration of every stage, one frozen dataclass each.

The CLI and workflow files build these; the library functions take them. Each config checks
its own values when it is built (``__post_init__``), naming the command-line flag a value comes
from, so a config built in Python and one built from the command line are checked the same way
and a bad value stops a command before it starts anything. Values that need data to check are
validated where they are used (e.g. :func:`planetseg.search.parse_bbox`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from planetseg.errors import InvalidArgumentError

#: Values of ``--groupby`` (see :class:`IngestConfig`).
GROUPBY = ("day", "time", "id", "solar_day")
#: Values of ``--engine``.
ENGINES = ("odc", "stackstac")
#: Values of ``--class-weights``.
CLASS_WEIGHTS = ("balanced", "sqrt", "none")
#: Values of ``--loss``.
LOSSES = ("ce", "ce+dice")
#: Values of ``--augment``.
AUGMENTS = ("none", "photometric")
#: Values of ``--amp``: mixed precision of the training step.
AMPS = ("off", "bf16", "fp16", "auto")
#: Output/input resolution ratios the network supports (1: the HR-input baseline).
SCALES = (1, 2, 4)
#: ``segment --precision``: see :mod:`planetseg.model.inference`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Largest ``--tile``: beyond it a tile is no longer a unit of work (see also the memory check
#: of :func:`planetseg.ingest.check_memory`).
MAX_TILE = 8192
#: Default side (px) of the blocks ``diff`` and ``craters`` compute at once.
PRODUCT_BLOCK = 2048


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, flag: str, value: object, what: str) -> None:
    """Raise the one-line error ``"<flag> <value>: <what>"`` unless ``ok``."""
    if not ok:
        shown = f"{value:g}" if isinstance(value, float) else value
        raise InvalidArgumentError(f"{flag} {shown}: {what}")


def _int_at_least(flag: str, value: object, low: int, what: str) -> None:
    _require(_is_int(value) and value >= low, flag, value, what)


def _optional_int_at_least(flag: str, value: object, low: int, what: str) -> None:
    if value is not None:
        _int_at_least(flag, value, low, what)


def _number_in(
    flag: str,
    value: object,
    what: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = _is_number(value) and (
        (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    _require(ok, flag, value, what)


def _one_of(flag: str, value: object, choices: tuple[object, ...]) -> None:
    _require(value in choices, flag, value, f"use {_or(choices)}")


def _or(choices: tuple[object, ...]) -> str:
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


@dataclass(frozen=True)
class SearchConfig:
    """What to search and how patiently.

    Attributes:
        catalog: Catalog name, data-set alias, STAC API URL or local path
            (see :func:`planetseg.catalogs.resolve_catalog`).
        collections: Collection ids; empty means all (an alias adds its own).
        bbox: ``"W,S,E,N"`` or four numbers in the body's longitude/latitude (degrees), or None.
        datetime: RFC 3339 instant or interval (``A/B``, ``../B``, ``A/..``), or None.
        max_items: Stop after this many items; None for all.
        page_size: Items per page requested from an API.
        timeout: Seconds to wait for each HTTP connect/read before retrying.
        retries: Retries per request on timeouts, connection errors, 429 and 5xx.
        backoff: Backoff factor in seconds; retry ``k`` waits ``backoff * 2**(k-1)``.
    """

    catalog: str
    collections: tuple[str, ...] = ()
    bbox: str | tuple[float, float, float, float] | None = None
    datetime: str | None = None
    max_items: int | None = None
    page_size: int = 100
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5

    def __post_init__(self) -> None:
        _optional_int_at_least("--max-items", self.max_items, 1, "give at least 1 item")
        _int_at_least("page_size", self.page_size, 1, "give at least 1 item per page")
        _number_in(
            "--timeout", self.timeout, "give a positive number of seconds", low=0, low_open=True
        )
        _int_at_least("--retries", self.retries, 0, "give a number of retries >= 0")
        _number_in("backoff", self.backoff, "give a number of seconds >= 0", low=0)


@dataclass(frozen=True)
class IngestConfig:
    """How to turn items into a datacube.

    Attributes:
        out: Path of the zarr store to create, resume or append to. An existing cube keeps
            its grid: new items go onto it (``bbox`` is not used; ``crs`` and ``resolution``,
            if given, must be the cube's).
        bbox: Area to ingest, ``"W,S,E,N"`` in body lon/lat; None for the items' union.
        crs: Cube CRS (authority code or WKT2); None for the items' own (they must agree).
        resolution: Pixel size in CRS units; None for the items' finest native resolution.
        tile: Tile and chunk size in pixels (a multiple of 16, at most ``MAX_TILE``).
        bands: Asset keys to read; empty for the assets with role ``data``.
        groupby: Time steps: ``day`` (UTC day), ``time`` (exact datetime), ``id`` (one step per
            item) or ``solar_day`` (Earth only). Items of one step are mosaicked.
        dtype: Image dtype; None for the assets' own.
        nodata: The image's nodata value; None for the assets' own (declared in their
            ``raster:bands``), if any. Pixels outside the items' footprints get it, and
            pixels holding it in every band are missing to ``segment``. An integer cube
            without one fills them with 0, a pixel value like any other: give one that the
            data never takes.
        engine: Loader: ``odc`` (any CRS) or ``stackstac`` (EPSG Earth items).
        resampling: Image resampling when the grid differs from the native one (a rasterio
            ``Resampling`` name).
        labels: Label source: an asset key holding label rasters, or a crater catalog
            (``.csv``/``.parquet``) or polygon file (``.geojson``/``.gpkg``/``.parquet``).
        label_field: Class column of a polygon file.
        fill_missing: Fill items whose assets cannot be read with nodata (with a warning)
            instead of failing.
        batch_tiles: Tiles kept on the cluster at once (rounded down to whole read blocks, at
            least one); None for 2 read blocks per worker thread, following the cluster's
            threads as workers join or leave.
        read_block: Pixels per side read from the assets at once (whole tiles): bigger blocks
            open each COG fewer times; writes stay one chunk per tile.
    """

    out: str
    bbox: str | tuple[float, float, float, float] | None = None
    crs: str | None = None
    resolution: float | None = None
    tile: int = 512
    bands: tuple[str, ...] = ()
    groupby: Literal["day", "time", "id", "solar_day"] = "day"
    dtype: str | None = None
    nodata: float | None = None
    engine: Literal["odc", "stackstac"] = "odc"
    resampling: str = "nearest"
    labels: str | None = None
    label_field: str = "class"
    fill_missing: bool = False
    batch_tiles: int | None = None
    read_block: int = 1024

    def __post_init__(self) -> None:
        if self.resolution is not None:
            _number_in(
                "--resolution",
                self.resolution,
                "give a positive pixel size in the CRS's units (or leave it out for the native)",
                low=0,
                low_open=True,
            )
        _int_at_least("--tile", self.tile, 16, "use a multiple of 16, at least 16")
        _require(self.tile % 16 == 0, "--tile", self.tile, "use a multiple of 16, at least 16")
        _require(
            self.tile <= MAX_TILE,
            "--tile",
            self.tile,
            f"use at most {MAX_TILE} px (a tile is one task's unit of work; the default is 512)",
        )
        _one_of("--groupby", self.groupby, GROUPBY)
        _one_of("--engine", self.engine, ENGINES)
        if self.dtype is not None:
            _check_dtype(self.dtype)
        if self.nodata is not None:
            _require(math.isfinite(self.nodata), "--nodata", self.nodata, "give a finite value")
        _check_resampling(self.resampling)
        _optional_int_at_least("batch_tiles", self.batch_tiles, 1, "give at least 1 tile")
        _int_at_least("read_block", self.read_block, 0, "give a block side >= 0 px")


def _check_dtype(dtype: str) -> None:
    import numpy as np

    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        kind = ""
    _require(
        kind in ("i", "u", "f"),
        "--dtype",
        dtype,
        "use a numeric numpy dtype (uint8, uint16, int16, float32, ...)",
    )


def _check_resampling(name: str) -> None:
    from rasterio.enums import Resampling

    names = tuple(r.name for r in Resampling)
    _require(name in names, "--resampling", name, f"use {_or(names)}")


@dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster a stage computes on (see :mod:`planetseg.cluster`).

    Attributes:
        kind: ``none`` (this process), ``local`` (LocalCluster), ``cuda`` (dask-cuda, one
            worker per GPU), ``slurm`` or ``pbs`` (dask-jobqueue batch jobs), or a scheduler
            address such as ``tcp://10.0.0.5:8786``.
        workers: Worker processes of a local cluster; None lets Dask choose.
        threads: Threads per worker; None lets Dask choose.
        jobs: Batch jobs to submit (``slurm``/``pbs``).
        config_file: dask-jobqueue settings for ``slurm``/``pbs``; None for
            ``cluster/<kind>.yaml`` in the working directory, then planetseg's own.
        host: Interface the scheduler and dashboard bind to.
        dashboard_port: Dashboard port; 0 picks a free one.
        connect_timeout: Seconds to wait for a remote scheduler.
        worker_timeout: Seconds to wait for the first batch-job worker to join.
    """

    kind: str = "local"
    workers: int | None = None
    threads: int | None = None
    jobs: int = 1
    config_file: str | None = None
    host: str = "127.0.0.1"
    dashboard_port: int = 0
    connect_timeout: float = 10.0
    worker_timeout: float = 600.0

    def __post_init__(self) -> None:
        _optional_int_at_least("--workers", self.workers, 1, "give at least 1 worker")
        _optional_int_at_least("--threads", self.threads, 1, "give at least 1 thread per worker")
        _int_at_least("--jobs", self.jobs, 1, "give at least 1 batch job")
        _require(
            _is_int(self.dashboard_port) and 0 <= self.dashboard_port <= 65535,
            "dashboard_port",
            self.dashboard_port,
            "use a port in 0..65535 (0 picks a free one)",
        )
        for name in ("connect_timeout", "worker_timeout"):
            _number_in(
                name, getattr(self, name), "give a positive number of seconds", low=0, low_open=True
            )


@dataclass(frozen=True)
class SegmentConfig:
    """How to segment a cube with an exported model (see :mod:`planetseg.segment`).

    Attributes:
        out: Labels store to create or resume.
        model: Exported model directory (``train``'s ``RUN/model``).
        times: Time steps to segment (indices or date prefixes); empty for all.
        batch: Input tiles per task (a run along one tile row, read as one window).
        halo: Input pixels of context around each window; None for the model's receptive
            radius (no seams).
        partition: Tasks kept on the cluster at once; None for 4 per worker thread.
        threads: Torch threads per task (``--torch-threads``).
        cog: Folder to also write Cloud-Optimized GeoTIFFs into (labels and confidence per
            time step), or None.
        any_body: Segment a cube of another body than the model's (with a warning) instead of
            refusing.
        precision: How the network computes (``--precision``): ``auto`` for the fastest path
            known to be correct on the hardware found, ``fp32`` for the exactly reproducible
            reference, ``bf16`` / ``fp16`` to force that autocast (see
            :mod:`planetseg.model.inference`).
    """

    out: str
    model: str
    times: tuple[str, ...] = ()
    batch: int = 4
    halo: int | None = None
    partition: int | None = None
    threads: int = 1
    cog: str | None = None
    any_body: bool = False
    precision: str = "auto"

    def __post_init__(self) -> None:
        _int_at_least("--batch", self.batch, 1, "give at least 1 tile per task")
        _optional_int_at_least("--halo", self.halo, 0, "give a halo >= 0 px")
        _optional_int_at_least("--partition", self.partition, 1, "give at least 1 task")
        _int_at_least("--torch-threads", self.threads, 1, "give at least 1 torch thread per task")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(
                f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"
            )


@dataclass(frozen=True)
class DiffConfig:
    """What to compare and how strictly (see :mod:`planetseg.diff`).

    Attributes:
        out: Output folder, written as a whole when the run succeeds (an earlier diff's only
            with ``overwrite``).
        before: First epoch: a date prefix or an index of the store.
        after: Second epoch (of ``other`` if given).
        other: A second labels store on the same grid holding ``after``; None for the same.
        min_confidence: Ignore changes where either epoch's confidence is below this (0..1).
        min_area_m2: Ignore change regions smaller than this many square metres on the body.
        overwrite: Replace an earlier diff's output folder (never anything else).
        block: Side (px) of the blocks computed at once (rounded up to whole chunks of the
            labels store): a task's memory, whatever the scene's size.
    """

    out: str
    before: str
    after: str
    other: str | None = None
    min_confidence: float = 0.0
    min_area_m2: float = 0.0
    overwrite: bool = False
    block: int = PRODUCT_BLOCK

    def __post_init__(self) -> None:
        _require(self.block >= 1, "--block", self.block, "give a block side >= 1 px")
        _number_in(
            "--min-confidence", self.min_confidence, "give a confidence in 0..1", low=0, high=1
        )
        _number_in("--min-area", self.min_area_m2, "give an area >= 0 m^2", low=0)


@dataclass(frozen=True)
class CratersConfig:
    """How to extract craters from a labels store (see :mod:`planetseg.craters`).

    Attributes:
        out: Output table, ``.parquet`` (GeoParquet, points in body lon/lat) or ``.csv``.
        times: Time steps (date prefixes or indices); empty for all.
        crater_classes: Class names that are craters; empty for every class whose name
            contains "crater".
        min_diameter_px: Drop regions smaller than this equivalent diameter (pixels); in the
            scores, reference craters below it are not misses either.
        min_confidence: Drop craters whose mean crater probability (mean confidence in stores
            without one) is below this (0..1).
        reference: A crater catalog to score against (planetseg's or craterpy's columns).
        reference_min_km: The reference's completeness limit (km): in the scores, neither a
            reference crater nor an unmatched detection smaller than this counts.
        craterstats: Also write the catalog with its counting area as a craterstats ``.scc``
            file here (one time step).
        overwrite: Replace an earlier craters catalog at ``out`` (never anything else).
        block: Side (px) of the blocks computed at once (rounded up to whole chunks of the
            labels store); a crater larger than a block is measured whole, in a task of its own.
    """

    out: str
    times: tuple[str, ...] = ()
    crater_classes: tuple[str, ...] = ()
    min_diameter_px: float = 3.0
    min_confidence: float = 0.0
    reference: str | None = None
    reference_min_km: float = 0.0
    craterstats: str | None = None
    overwrite: bool = False
    block: int = PRODUCT_BLOCK

    def __post_init__(self) -> None:
        _require(self.block >= 1, "--block", self.block, "give a block side >= 1 px")
        _number_in("--min-diameter", self.min_diameter_px, "give a diameter >= 0 px", low=0)
        _number_in(
            "--min-confidence", self.min_confidence, "give a probability in 0..1", low=0, high=1
        )
        _number_in("--reference-min-km", self.reference_min_km, "give a diameter >= 0 km", low=0)
        if self.craterstats is not None:
            _require(
                str(self.craterstats).lower().endswith(".scc"),
                "--craterstats",
                self.craterstats,
                "the craterstats file must end in .scc",
            )


@dataclass(frozen=True)
class TrainConfig:
    """How to train the DSRL network (defaults: the paper's loss weights, a small model).

    Attributes:
        out: Run directory (checkpoint, metrics.jsonl, exported model).
        scale: Output/input resolution ratio, 2 or 4 (1: the HR-input baseline, no SR).
        steps: Optimiser steps.
        batch_size: Windows per step, over all processes.
        crop: HR window size in pixels (a multiple of ``scale * 2**(depth-1)``).
        lr: Peak learning rate (AdamW, linear warm-up, cosine decay).
        no_sr: Train the segmentation-only baseline (no SR branch, no FA loss).
        w_sr: Weight of the SR MSE loss.
        w_fa: Weight of the feature-affinity loss.
        fa_subsample: Average-pooling factor before the affinity matrices (paper: 8).
        class_weights: ``balanced`` weighs the cross-entropy by median-frequency balancing
            of the training strip's labels, ``sqrt`` by the square root of those weights
            (between the two), ``none`` leaves it unweighted.
        loss: ``ce`` (cross-entropy) or ``ce+dice`` (plus the soft Dice loss of the
            foreground classes, which rewards overlap of small rare objects).
        foreground_windows: Share of the training windows centred on a random foreground
            (non-zero label) pixel instead of anywhere (0..1).
        augment: ``photometric`` jitters each HR window's brightness, contrast and gamma
            before the degradation (real imagery differs in stretch); ``none`` does not.
        width: Channels of the first encoder level.
        depth: Encoder levels.
        head_channels: Channels of the decoders' HR features.
        psf_sigma: Degradation PSF sigma in LR pixels.
        noise: Degradation noise (normalised units).
        val_fraction: Share of columns held out for validation.
        val_every: Steps between validations.
        checkpoint_every: Steps between checkpoints.
        nproc: Processes (DDP ranks) on this node.
        threads: Torch threads per process (``--torch-threads``).
        loader_workers: DataLoader processes per rank that read the training windows from the
            cubes ahead of the step (``--loader-workers``; 0 reads them in the rank itself).
            The batches do not depend on it.
        amp: Mixed precision of the training step's forward pass: ``off`` (float32),
            ``bf16`` (bfloat16 autocast, on CUDA with bfloat16 support or any CPU), ``fp16``
            (float16 autocast with gradient scaling, CUDA only), ``auto`` (bf16 on a GPU or
            CPU with AMX or AVX-512 BF16, fp16 on an older GPU, else off). Validation stays
            float32.
        channels_last: Keep weights and activations in the channels-last memory format
            (faster convolutions on tensor cores and oneDNN; the same function, other rounding).
        seed: Seed of weights, windows and noise.
        resume: Continue from the run directory's checkpoint.
    """

    out: str
    scale: int = 2
    steps: int = 900
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    no_sr: bool = False
    w_sr: float = 0.1
    w_fa: float = 1.0
    fa_subsample: int = 8
    class_weights: str = "sqrt"
    loss: str = "ce"
    foreground_windows: float = 0.0
    augment: str = "photometric"
    width: int = 16
    depth: int = 3
    head_channels: int = 16
    psf_sigma: float = 0.5
    noise: float = 0.0
    val_fraction: float = 0.25
    val_every: int = 100
    checkpoint_every: int = 50
    nproc: int = 1
    threads: int = 1
    loader_workers: int = 2
    amp: str = "off"
    channels_last: bool = False
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        # The scale first: the crop's rule below depends on it.
        _one_of("--scale", self.scale, SCALES)
        _int_at_least("--steps", self.steps, 1, "give a positive number of steps")
        _int_at_least("--batch-size", self.batch_size, 1, "give at least 1 window per step")
        _int_at_least("--width", self.width, 4, "give at least 4 channels")
        _int_at_least("--depth", self.depth, 1, "give at least 1 encoder level")
        _int_at_least("head_channels", self.head_channels, 4, "give at least 4 channels")
        divisor = self.scale * 2 ** (self.depth - 1)
        _require(
            _is_int(self.crop) and self.crop >= divisor and self.crop % divisor == 0,
            "--crop",
            self.crop,
            f"use a positive multiple of --scale x 2**(--depth - 1) = {divisor} px",
        )
        _number_in("--lr", self.lr, "give a positive learning rate", low=0, low_open=True)
        _number_in("--w-sr", self.w_sr, "give a loss weight >= 0", low=0)
        _number_in("--w-fa", self.w_fa, "give a loss weight >= 0", low=0)
        _int_at_least("fa_subsample", self.fa_subsample, 1, "give a pooling factor >= 1")
        _one_of("--class-weights", self.class_weights, CLASS_WEIGHTS)
        _one_of("--loss", self.loss, LOSSES)
        _number_in(
            "--foreground-windows",
            self.foreground_windows,
            "give a share of the windows in 0..1",
            low=0,
            high=1,
        )
        _one_of("--augment", self.augment, AUGMENTS)
        _number_in("--psf-sigma", self.psf_sigma, "give a sigma >= 0 LR pixels", low=0)
        _number_in("--noise", self.noise, "give a noise level >= 0", low=0)
        _number_in(
            "val_fraction",
            self.val_fraction,
            "give a share of the columns in (0, 1)",
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
        _int_at_least("--val-every", self.val_every, 1, "give a positive number of steps")
        _int_at_least(
            "--checkpoint-every", self.checkpoint_every, 1, "give a positive number of steps"
        )
        _int_at_least("--nproc", self.nproc, 1, "give at least 1 process")
        _require(
            self.batch_size % self.nproc == 0,
            "--batch-size",
            self.batch_size,
            f"must be divisible by --nproc {self.nproc}",
        )
        _int_at_least("--torch-threads", self.threads, 1, "give at least 1 torch thread")
        _int_at_least(
            "--loader-workers", self.loader_workers, 0, "give 0 (read in process) or more"
        )
        _one_of("--amp", self.amp, AMPS)
        _int_at_least("--seed", self.seed, 0, "give a seed >= 0")


@dataclass(frozen=True)
class DemoConfig:
    """The offline demo's settings (see :func:`planetseg.demo.run_demo`).

    Attributes:
        out: Directory for every output.
        seed: Seed of the synthetic world.
        size: Scene side in pixels: at least two training windows (``TrainConfig.crop``) wide,
            for the training and validation strips.
        steps: Training steps.
    """

    out: str
    seed: int = 0
    size: int = 1024
    steps: int = 300

    def __post_init__(self) -> None:
        _int_at_least("--seed", self.seed, 0, "give a seed >= 0")
        smallest = 2 * TrainConfig.crop
        _int_at_least(
            "--size",
            self.size,
            smallest,
            f"the demo needs at least {smallest} px (training and validation strips of "
            f"{TrainConfig.crop} px windows)",
        )
        _int_at_least("--steps", self.steps, 1, "give a positive number of training steps")


@dataclass(frozen=True)
class ScheduleConfig:
    """How ``planetseg schedule`` installs a workflow's recurring run (:mod:`planetseg.schedule`).

    Attributes:
        every: Cron expression of the run times (5 fields, or ``@daily`` and the like).
        backend: ``auto``, ``scrontab``, ``sbatch`` or ``crontab``.
        walltime: Time limit of each run's SLURM job, ``[D-]HH:MM:SS`` (scrontab, sbatch).
    """

    every: str
    backend: str = "auto"
    walltime: str = "12:00:00"

    def __post_init__(self) -> None:
        from datetime import datetime

        from planetseg.schedule import BACKENDS, Cron

        Cron.parse(self.every).next_after(datetime.now())  # one that never matches is refused
        _require(self.backend in BACKENDS, "--backend", self.backend,
                 f"use one of {', '.join(BACKENDS)}")  # fmt: skip
        _require(
            bool(re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", self.walltime)),
            "--walltime",
            self.walltime,
            "give [D-]HH:MM:SS, e.g. 12:00:00",
        )
