"""Configuration of every stage, one frozen dataclass each.

The CLI and workflow files build these; the library functions take them. Values are validated
where they are used (e.g. :func:`planetseg.search.parse_bbox`), so a config built in Python and
one built from the command line are checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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


@dataclass(frozen=True)
class IngestConfig:
    """How to turn items into a datacube.

    Attributes:
        out: Path of the zarr store to create, resume or append to.
        bbox: Area to ingest, ``"W,S,E,N"`` in body lon/lat; None for the items' union.
        crs: Cube CRS (authority code or WKT2); None for the items' own (they must agree).
        resolution: Pixel size in CRS units; None for the items' finest native resolution.
        tile: Tile and chunk size in pixels (a multiple of 16).
        bands: Asset keys to read; empty for the assets with role ``data``.
        groupby: Time steps: ``day`` (UTC day), ``time`` (exact datetime), ``id`` (one step per
            item) or ``solar_day`` (Earth only). Items of one step are mosaicked.
        dtype: Image dtype; None for the assets' own.
        engine: Loader: ``odc`` (any CRS) or ``stackstac`` (EPSG Earth items).
        resampling: Image resampling when the grid differs from the native one.
        labels: Label source: an asset key holding label rasters, or a crater catalog
            (``.csv``/``.parquet``) or polygon file (``.geojson``/``.gpkg``/``.parquet``).
        label_field: Class column of a polygon file.
        fill_missing: Fill items whose assets cannot be read with nodata (with a warning)
            instead of failing.
        batch_tiles: Tiles per submitted partition; bounds the graph and memory.
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
    engine: Literal["odc", "stackstac"] = "odc"
    resampling: str = "nearest"
    labels: str | None = None
    label_field: str = "class"
    fill_missing: bool = False
    batch_tiles: int = 64
    read_block: int = 1024


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
        threads: Torch threads per task.
        cog: Folder to also write Cloud-Optimized GeoTIFFs into (labels and confidence per
            time step), or None.
        any_body: Segment a cube of another body than the model's (with a warning) instead of
            refusing.
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
    """

    out: str
    before: str
    after: str
    other: str | None = None
    min_confidence: float = 0.0
    min_area_m2: float = 0.0
    overwrite: bool = False


@dataclass(frozen=True)
class CratersConfig:
    """How to extract craters from a labels store (see :mod:`planetseg.craters`).

    Attributes:
        out: Output table, ``.parquet`` (GeoParquet, points in body lon/lat) or ``.csv``.
        times: Time steps (date prefixes or indices); empty for all.
        crater_classes: Class names that are craters; empty for every class whose name
            contains "crater".
        min_diameter_px: Drop regions smaller than this equivalent diameter (pixels).
        reference: A crater catalog to score against (planetseg's or craterpy's columns).
        overwrite: Replace an earlier craters catalog at ``out`` (never anything else).
    """

    out: str
    times: tuple[str, ...] = ()
    crater_classes: tuple[str, ...] = ()
    min_diameter_px: float = 3.0
    reference: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """How to train the DSRL network (defaults: the paper's loss weights, a small model).

    Attributes:
        out: Run directory (checkpoint, metrics.jsonl, exported model).
        scale: Output/input resolution ratio, 2 or 4.
        steps: Optimiser steps.
        batch_size: Windows per step, over all processes.
        crop: HR window size in pixels (a multiple of ``scale * 2**(depth-1)``).
        lr: Peak learning rate (AdamW, linear warm-up, cosine decay).
        no_sr: Train the segmentation-only baseline (no SR branch, no FA loss).
        w_sr: Weight of the SR MSE loss.
        w_fa: Weight of the feature-affinity loss.
        fa_subsample: Average-pooling factor before the affinity matrices (paper: 8).
        class_weights: ``balanced`` weighs the cross-entropy by median-frequency balancing
            of the training strip's labels; ``none`` leaves it unweighted.
        width: Channels of the first encoder level.
        depth: Encoder levels.
        head_channels: Channels of the decoders' HR features.
        psf_sigma: Degradation PSF sigma in LR pixels.
        noise: Degradation noise (normalised units).
        val_fraction: Share of columns held out for validation.
        val_every: Steps between validations.
        checkpoint_every: Steps between checkpoints.
        nproc: Processes (DDP ranks) on this node.
        threads: Torch threads per process.
        seed: Seed of weights, windows and noise.
        resume: Continue from the run directory's checkpoint.
    """

    out: str
    scale: int = 2
    steps: int = 300
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    no_sr: bool = False
    w_sr: float = 0.1
    w_fa: float = 1.0
    fa_subsample: int = 8
    class_weights: str = "balanced"
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
    seed: int = 0
    resume: bool = False
