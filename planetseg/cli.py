"""The ``planetseg`` command line: parse, build a config, call the library, print, exit.

No stage logic lives here. A :class:`~planetseg.errors.PlanetsegError` becomes one line on
stderr and a non-zero exit; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from planetseg import __version__
from planetseg.config import PRODUCT_BLOCK
from planetseg.errors import (
    CatalogReadError,
    InvalidArgumentError,
    PlanetsegError,
    PlanetsegWarning,
    TrainingInterrupted,
)

#: Metavars of option types, as mature CLIs print them (typer 0.29 shows ``<int>``, ``<bool>``).
_METAVARS = {"<int>": "N", "<float>": "FLOAT", "<str>": "TEXT", "<path>": "PATH"}


def _conventional_metavars(ctx: Any, params: list[Any]) -> None:
    """Flags take no value, typed options show N/FLOAT/TEXT/PATH, arguments their name.

    Repeatable options show their element's metavar (their help says "repeatable"). Explicit
    metavars are kept.
    """
    for param in params:
        if param.metavar is not None:
            continue
        if isinstance(param, typer.core.TyperArgument):
            param.metavar = param.name.upper()
            if param.nargs != 1:  # a repeatable argument: its element's type, not list[...]
                element = param.display_type(ctx).removeprefix("<list[").removesuffix("]>")
                shown = f"<{element.lower()}>..."
                param.display_type_rich = lambda ctx, shown=shown: shown
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif isinstance(param, typer.core.TyperOption):
            shown = param.display_type(ctx)
            element = shown.removeprefix("<list[").removesuffix("]>")
            param.metavar = _METAVARS.get(shown) or _METAVARS.get(f"<{element}>") or shown


class _ConventionalMetavars:
    """Mixed into typer's command and group classes: their parameters get conventional metavars."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        _conventional_metavars(ctx, params)
        return params


class _Command(_ConventionalMetavars, typer.core.TyperCommand):
    pass


class _Group(_ConventionalMetavars, typer.core.TyperGroup):
    pass


class _App(typer.Typer):
    """A Typer app whose commands print conventional metavars (see :class:`_Command`)."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    cls=_Group,
    name="planetseg",
    help="Segment remote-sensing imagery of the Earth, the Moon and Mars at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is read by people too (logs, CI): give tables room instead of rich's 80 columns.
out = Console(width=None if sys.stdout.isatty() else 132)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)


def _note(message: str) -> None:
    """One ``planetseg: ...`` line on stderr, printed as it is (no markup, no wrapping)."""
    err.print(f"planetseg: {message}", highlight=False, soft_wrap=True, markup=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"planetseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug")
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # urllib3 warns on every retry, distributed narrates every worker start: not news unless
    # asked for (-v).
    logging.getLogger("urllib3").setLevel(logging.ERROR if verbose == 0 else level)
    # distributed configures its own loggers on import (later, lazily), from Dask's config.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning" if verbose < 2 else "debug")


# Options shared by every command that selects items (search, ingest).
CollectionOpt = Annotated[
    list[str] | None, typer.Option("--collection", help="Collection id (repeatable).")
]
BBoxOpt = Annotated[
    str | None, typer.Option(metavar="W,S,E,N", help="Area in the body's lon/lat degrees.")
]
DatetimeOpt = Annotated[
    str | None,
    typer.Option(
        "--datetime", metavar="DATETIME", help="RFC 3339 instant or interval A/B ('..' open)."
    ),
]


# --------------------------------------------------------------------------- catalogs


@app.command()
def catalogs() -> None:
    """List the named catalogs, the worlds they serve and their useful collections."""
    from planetseg.catalogs import ALIASES, CATALOGS

    for cat in CATALOGS.values():
        table = Table(
            title=f"{cat.name}: {cat.title}\n{cat.url}", title_justify="left", show_edge=False
        )
        for col in ("world", "collection", "what"):
            table.add_column(col, overflow="fold")
        for c in cat.collections:
            table.add_row(c.world, c.id, c.description)
        out.print(table, "")
    aliases = Table(title="Data-set names for --catalog", title_justify="left", show_edge=False)
    for col in ("name", "world", "resolves to"):
        aliases.add_column(col, overflow="fold")
    for a in ALIASES.values():
        target = (
            f"{a.catalog} / {', '.join(a.collections)}" if a.catalog else f"no STAC API: {a.note}"
        )
        aliases.add_row(a.name, a.world, target)
    out.print(aliases, "")
    out.print(
        "Any STAC API URL, or a local path: a folder of image files (GeoTIFF, PDS3, PDS4, "
        "ISIS3, JPEG2000; searched recursively), a static catalog or an items file."
    )


# --------------------------------------------------------------------------- search


@app.command()
def search(
    catalog: Annotated[
        str, typer.Option("--catalog", "-c", help="Name, alias, STAC API URL or local path.")
    ],
    collection: CollectionOpt = None,
    bbox: BBoxOpt = None,
    datetime: DatetimeOpt = None,
    max_items: Annotated[int | None, typer.Option(help="Stop after this many items.")] = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write items: .json/.geojson, .ndjson or .parquet.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a FeatureCollection to stdout.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds per HTTP request before retrying.")
    ] = 30.0,
    retries: Annotated[int, typer.Option(help="Retries on timeouts and 5xx responses.")] = 5,
) -> None:
    """Search a STAC API or a local catalog for items."""
    from planetseg.config import SearchConfig
    from planetseg.items import ITEM_SUFFIXES, check_items_output, feature_collection, write_items
    from planetseg.search import search as run_search

    if out_path is not None and out_path.suffix.lower() not in ITEM_SUFFIXES:
        raise InvalidArgumentError(
            f"--out {out_path}: use a .json, .geojson, .ndjson or .parquet file name"
        )
    if out_path is not None:
        check_items_output(out_path, inputs=[catalog] if Path(catalog).exists() else [])
    config = SearchConfig(
        catalog=catalog,
        collections=tuple(collection or ()),
        bbox=bbox,
        datetime=datetime,
        max_items=max_items,
        timeout=timeout,
        retries=retries,
    )
    result = run_search(config)
    if out_path is not None:
        write_items(result.items, out_path)
    if as_json:
        sys.stdout.write(json.dumps(feature_collection(result.items)) + "\n")
        return
    _print_items(result.items)
    where = f" -> {out_path}" if out_path is not None else ""
    out.print(f"{len(result.items)} items from {result.catalog.name}{where}")


def _print_items(items: list[dict[str, Any]]) -> None:
    table = Table(show_edge=False)
    for col in ("id", "collection", "datetime", "crs"):
        table.add_column(col, no_wrap=True)
    table.add_column("bbox (lon/lat)", overflow="fold")
    for it in items[:50]:
        props = it.get("properties", {})
        body = f" ({props['planetseg:body']})" if props.get("planetseg:body") else ""
        crs = props.get("proj:code") or (
            f"EPSG:{props['proj:epsg']}"
            if props.get("proj:epsg")
            else f"wkt2{body}"
            if props.get("proj:wkt2")
            else ""
        )
        bbox = ",".join(f"{v:.4f}" for v in it.get("bbox", [])[:4])
        table.add_row(it["id"], it.get("collection", ""), props.get("datetime") or "", crs, bbox)
    if items:
        out.print(table)
    if len(items) > 50:
        out.print(f"... and {len(items) - 50} more")


# --------------------------------------------------------------------------- ingest


def _cluster(
    kind: str,
    workers: int | None,
    threads: int | None,
    jobs: int = 1,
    config_file: Path | None = None,
    host: str = "127.0.0.1",
) -> Any:
    """The ClusterConfig of the shared --cluster options (the kind is checked here, early)."""
    from planetseg.cluster import check_kind
    from planetseg.config import ClusterConfig

    check_kind(kind)
    return ClusterConfig(
        kind=kind,
        workers=workers,
        threads=threads,
        jobs=jobs,
        config_file=str(config_file) if config_file else None,
        host=host,
    )


@contextmanager
def _computing(what: str, config: Any) -> Iterator[tuple[Any, Callable[[int, int], None]]]:
    """The Dask client a command computes on (dashboard link printed) and a progress bar."""
    from planetseg.cluster import dask_client

    with (
        _progress(what) as update,
        dask_client(config, on_dashboard=lambda url: out.print(f"Dask dashboard: {url}")) as client,
    ):
        yield client, update


# The Dask cluster a command computes on, in a help panel of their own.
CLUSTER = "Dask cluster"
ClusterOpt = Annotated[
    str,
    typer.Option(
        metavar="KIND|ADDRESS",
        help="none, local, cuda, slurm, pbs, or a scheduler address tcp://HOST:PORT.",
        rich_help_panel=CLUSTER,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(help="Dask worker processes of a local/cuda cluster.", rich_help_panel=CLUSTER),
]
ThreadsOpt = Annotated[
    int | None, typer.Option(help="Dask threads per worker.", rich_help_panel=CLUSTER)
]
JobsOpt = Annotated[
    int, typer.Option(help="Batch jobs to submit (slurm, pbs).", rich_help_panel=CLUSTER)
]
ClusterFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--cluster-config",
        help="dask-jobqueue settings; default: cluster/<kind>.yaml.",
        rich_help_panel=CLUSTER,
    ),
]
HostOpt = Annotated[
    str,
    typer.Option(help="Interface the scheduler and dashboard bind to.", rich_help_panel=CLUSTER),
]


@app.command()
def ingest(
    source: Annotated[
        str, typer.Argument(help="Items file from `search`, or a catalog (name, URL, path).")
    ],
    out_path: Annotated[Path, typer.Option("--out", help="The zarr cube to write.")],
    collection: CollectionOpt = None,
    bbox: BBoxOpt = None,
    datetime: DatetimeOpt = None,
    crs: Annotated[str | None, typer.Option(help="Cube CRS; default: the items' own.")] = None,
    resolution: Annotated[
        float | None, typer.Option(help="Pixel size in CRS units; default: native.")
    ] = None,
    tile: Annotated[int, typer.Option(help="Tile/chunk size in pixels.")] = 512,
    bands: Annotated[
        str | None, typer.Option(help="Comma-separated asset keys; default: data assets.")
    ] = None,
    groupby: Annotated[str, typer.Option(help="day, time, id or solar_day (Earth).")] = "day",
    dtype: Annotated[str | None, typer.Option(help="Image dtype; default: the assets'.")] = None,
    nodata: Annotated[
        float | None,
        typer.Option(help="Image nodata value (missing to segment); default: the assets'."),
    ] = None,
    engine: Annotated[str, typer.Option(help="Loader: odc (any CRS) or stackstac (EPSG).")] = "odc",
    labels: Annotated[
        str | None,
        typer.Option(help="Label asset key, or a crater catalog / polygon file."),
    ] = None,
    label_field: Annotated[str, typer.Option(help="Class column of a polygon file.")] = "class",
    resampling: Annotated[
        str, typer.Option(help="Image resampling off the native grid (nearest, average, ...).")
    ] = "nearest",
    fill_missing: Annotated[
        bool, typer.Option(help="Fill items whose assets cannot be read with nodata.")
    ] = False,
    cluster: ClusterOpt = "local",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = 1,
    cluster_config: ClusterFileOpt = None,
    host: HostOpt = "127.0.0.1",
) -> None:
    """Ingest STAC items into a tiled zarr datacube (resumes and appends)."""
    from planetseg.config import IngestConfig, SearchConfig
    from planetseg.ingest import ingest as run_ingest
    from planetseg.search import search as run_search

    config = IngestConfig(
        out=str(out_path),
        bbox=bbox,
        crs=crs,
        resolution=resolution,
        tile=tile,
        bands=tuple(b for b in (bands or "").split(",") if b),
        groupby=groupby,  # type: ignore[arg-type]
        dtype=dtype,
        nodata=nodata,
        engine=engine,
        resampling=resampling,
        labels=labels,
        label_field=label_field,  # type: ignore[arg-type]
        fill_missing=fill_missing,
    )
    computing = _cluster(cluster, workers, threads, jobs, cluster_config, host)
    found = run_search(
        SearchConfig(
            catalog=source, collections=tuple(collection or ()), bbox=bbox, datetime=datetime
        )
    )
    if not found.items and (bbox or datetime or collection):
        raise CatalogReadError(
            f"no items of {source} match the --collection/--bbox/--datetime given: widen them"
        )
    with _computing("tiles", computing) as (client, update):
        result = run_ingest(
            found.items, config, client=client, progress=update, provenance=found.provenance()
        )
    _print_ingest(result)


def _print_ingest(result: Any) -> None:
    plan = result.plan
    shape = f"({len(plan.times)}, {len(plan.bands)}, {plan.shape[0]}, {plan.shape[1]})"
    labels = " + labels" if plan.label_asset or plan.label_source else ""
    out.print(
        f"[bold]ingest[/bold] {result.store}: image(time, band, y, x) = {shape} {plan.dtype}"
        f"{labels} on the {plan.body}; tiles: {result.written} written, {result.skipped} "
        "kept" + (f"; appended {', '.join(result.appended)}" if result.appended else "")
    )


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        f"[bold]{what}[/bold]",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# --------------------------------------------------------------------------- train, evaluate


MODEL, TRAINING, PROCESSES, RUN = "Model", "Training", "Processes", "Run directory"


@app.command()
def train(
    cubes: Annotated[
        list[Path],
        typer.Argument(
            help="Complete cubes with labels (one or more, or folders of cubes): one body, "
            "the same bands and classes.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", help="Run directory: checkpoint, metrics, model/.", rich_help_panel=RUN
        ),
    ],
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the run's checkpoint.", rich_help_panel=RUN),
    ] = False,
    scale: Annotated[
        int, typer.Option(help="Output/input resolution ratio: 2 or 4.", rich_help_panel=MODEL)
    ] = 2,
    width: Annotated[
        int, typer.Option(help="Channels of the first encoder level.", rich_help_panel=MODEL)
    ] = 16,
    depth: Annotated[int, typer.Option(help="Encoder levels.", rich_help_panel=MODEL)] = 3,
    no_sr: Annotated[
        bool,
        typer.Option(
            "--no-sr",
            help="Segmentation-only baseline (no SR branch, no FA).",
            rich_help_panel=MODEL,
        ),
    ] = False,
    steps: Annotated[int, typer.Option(help="Optimiser steps.", rich_help_panel=TRAINING)] = 900,
    batch_size: Annotated[
        int, typer.Option(help="Windows per step, over all processes.", rich_help_panel=TRAINING)
    ] = 8,
    crop: Annotated[
        int, typer.Option(help="HR window size in pixels.", rich_help_panel=TRAINING)
    ] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=TRAINING)] = 2e-3,
    w_sr: Annotated[
        float, typer.Option(help="Weight of the SR loss.", rich_help_panel=TRAINING)
    ] = 0.1,
    w_fa: Annotated[
        float,
        typer.Option(help="Weight of the feature-affinity loss.", rich_help_panel=TRAINING),
    ] = 1.0,
    class_weights: Annotated[
        str,
        typer.Option(
            metavar="balanced|sqrt|none",
            help="Cross-entropy weights: median-frequency balanced, its square root, or none.",
            rich_help_panel=TRAINING,
        ),
    ] = "sqrt",
    loss: Annotated[
        str,
        typer.Option(
            metavar="ce|ce+dice",
            help="Segmentation loss: cross-entropy, or plus the foreground classes' Dice.",
            rich_help_panel=TRAINING,
        ),
    ] = "ce",
    foreground_windows: Annotated[
        float,
        typer.Option(
            help="Share of training windows centred on a labelled (non-background) pixel.",
            rich_help_panel=TRAINING,
        ),
    ] = 0.0,
    augment: Annotated[
        str,
        typer.Option(
            metavar="none|photometric",
            help="Jitter each window's gamma, contrast and brightness (photometric).",
            rich_help_panel=TRAINING,
        ),
    ] = "photometric",
    psf_sigma: Annotated[
        float,
        typer.Option(
            help="Degradation PSF sigma in LR pixels (0: box average only).",
            rich_help_panel=TRAINING,
        ),
    ] = 0.5,
    noise: Annotated[
        float,
        typer.Option(help="Degradation noise (normalised units).", rich_help_panel=TRAINING),
    ] = 0.0,
    seed: Annotated[
        int, typer.Option(help="Seed of weights, windows and noise.", rich_help_panel=TRAINING)
    ] = 0,
    val_every: Annotated[
        int, typer.Option(help="Steps between validations.", rich_help_panel=TRAINING)
    ] = 100,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between checkpoints.", rich_help_panel=TRAINING)
    ] = 50,
    nproc: Annotated[
        int,
        typer.Option(
            help="DDP processes on this node (under torchrun: leave at 1).",
            rich_help_panel=PROCESSES,
        ),
    ] = 1,
    torch_threads: Annotated[
        int,
        typer.Option(
            "--torch-threads",
            help="Torch threads per process (train uses no Dask cluster).",
            rich_help_panel=PROCESSES,
        ),
    ] = 1,
    loader_workers: Annotated[
        int,
        typer.Option(
            help="DataLoader processes per rank reading windows from the cubes (0: in process).",
            rich_help_panel=PROCESSES,
        ),
    ] = 2,
    amp: Annotated[
        str,
        typer.Option(
            metavar="off|bf16|fp16|auto",
            help="Mixed precision of the training step: bf16 (GPU with bf16, any CPU), fp16 "
            "(GPU), auto (bf16 on a bf16 GPU or a CPU with AMX or AVX-512 BF16, fp16 on "
            "other GPUs, else off), off.",
            rich_help_panel=PROCESSES,
        ),
    ] = "off",
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last",
            help="Channels-last memory format (faster convolutions on GPUs and oneDNN).",
            rich_help_panel=PROCESSES,
        ),
    ] = False,
) -> None:
    """Train the DSRL network on cubes (torch DDP) and export the segmentation model."""
    from planetseg.config import TrainConfig
    from planetseg.train import distributed_env
    from planetseg.train import train as run_train

    config = TrainConfig(
        out=str(out_dir),
        scale=scale,
        steps=steps,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        no_sr=no_sr,
        w_sr=w_sr,
        w_fa=w_fa,
        class_weights=class_weights,
        loss=loss,
        foreground_windows=foreground_windows,
        augment=augment,
        psf_sigma=psf_sigma,
        noise=noise,
        width=width,
        depth=depth,
        nproc=nproc,
        threads=torch_threads,
        loader_workers=loader_workers,
        amp=amp,
        channels_last=channels_last,
        seed=seed,
        val_every=val_every,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    try:
        with _train_progress() as update:
            model = run_train(cubes, config, progress=update)
    except TrainingInterrupted as exc:
        again = ["planetseg", *sys.argv[1:], *([] if resume else ["--resume"])]
        _note(f"interrupted at step {exc.step}; resume with: {shlex.join(again)}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # before the loop took over the signals: nothing was trained
        _note("interrupted before the first step; run the same command again")
        raise typer.Exit(130) from None
    if (distributed_env() or (0, 1))[0] != 0:
        return  # under torchrun, rank 0 speaks for the run
    from planetseg.export import load_model

    _, card = load_model(model)
    out.print(f"model -> {model} ({card['digest'][:19]}...)")
    _print_scores(card["metrics"])


@contextmanager
def _train_progress(lines: bool = False) -> Iterator[Callable[[Any], None]]:
    """Train's progress: a bar with the loss and step rate in a terminal, else a log line.

    Off a terminal (logs, batch jobs), or with ``lines`` (beside another live bar, as in the
    demo), a line is printed after the first step, then at most every :data:`_LOG_EVERY_S`
    seconds, and after the last.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if lines or not err.is_terminal:
        last = -math.inf

        def log(p: Any) -> None:
            nonlocal last
            now = time.monotonic()
            if p.step < p.steps and now - last < _LOG_EVERY_S:
                return
            last = now
            parts = " ".join(f"{k} {v:.3g}" for k, v in p.losses.items() if k != "loss")
            _note(
                f"train step {p.step}/{p.steps} loss {p.losses['loss']:.4g} ({parts}) "
                f"{p.steps_per_s:.2f} steps/s"
            )

        yield log
        return
    with Progress(
        "[bold]train[/bold]",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} steps/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("train", total=None, loss="-", rate="-")

        def update(p: Any) -> None:
            bar.update(
                task,
                completed=p.step,
                total=p.steps,
                loss=f"{p.losses['loss']:.4f}",
                rate=f"{p.steps_per_s:.2f}",
            )

        yield update


#: Seconds between train's progress lines when stderr is not a terminal.
_LOG_EVERY_S = 15.0


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Exported model directory.")],
    cube: Annotated[Path, typer.Argument(help="A complete cube with labels.")],
    region: Annotated[str, typer.Option(help="all, or val (the training hold-out).")] = "all",
    out_path: Annotated[Path | None, typer.Option("--out", help="Write scores as JSON.")] = None,
) -> None:
    """Score a model on a labelled cube: per-class IoU, mIoU, accuracy, confusion matrix."""
    from planetseg.evaluate import evaluate as run_evaluate

    result = run_evaluate(model, cube, region=region, out=out_path)  # type: ignore[arg-type]
    _print_scores(result)


def _print_scores(result: dict[str, Any]) -> None:
    table = Table(show_edge=False)
    for col in ("class", "IoU", "pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, v in result["per_class"].items():
        iou = "-" if v["iou"] is None else f"{100 * v['iou']:.1f}"
        table.add_row(name, iou, str(v["pixels"]))
    out.print(table)
    out.print(
        f"mIoU {100 * result['miou']:.1f}   pixel accuracy {100 * result['pixel_accuracy']:.1f}"
    )
    if "confusion" in result:
        out.print(f"confusion (rows: truth, columns: prediction): {result['confusion']}")


# --------------------------------------------------------------------------- segment


@app.command()
def segment(
    cube: Annotated[Path, typer.Argument(help="A complete cube (the model's LR input).")],
    model: Annotated[Path, typer.Option(help="Exported model directory (RUN/model).")],
    out_path: Annotated[Path, typer.Option("--out", help="Labels store to write or resume.")],
    time: Annotated[
        list[str] | None, typer.Option(help="Time step (index or date prefix); repeatable.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Tiles per task (read as one window).")] = 4,
    halo: Annotated[
        int | None, typer.Option(help="Context pixels per side; default: no seams.")
    ] = None,
    partition: Annotated[
        int | None, typer.Option(help="Tasks on the cluster at once; default 4 per thread.")
    ] = None,
    torch_threads: Annotated[
        int, typer.Option(help="Torch threads per task (one task per Dask worker thread).")
    ] = 1,
    cog: Annotated[Path | None, typer.Option(help="Also write COGs into this folder.")] = None,
    any_body: Annotated[
        bool, typer.Option("--any-body", help="Allow a cube of another body than the model's.")
    ] = False,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (fastest correct path for this hardware), fp32 (exactly reproducible), "
            "bf16 or fp16 (autocast)."
        ),
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and estimates, compute nothing.")
    ] = False,
    cluster: ClusterOpt = "local",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = 1,
    cluster_config: ClusterFileOpt = None,
    host: HostOpt = "127.0.0.1",
) -> None:
    """Segment every tile of a cube with an exported model on a Dask cluster (resumable)."""
    from planetseg.config import SegmentConfig
    from planetseg.segment import plan_segment
    from planetseg.segment import segment as run_segment

    config = SegmentConfig(
        out=str(out_path),
        model=str(model),
        times=tuple(time or ()),
        batch=batch,
        halo=halo,
        partition=partition,
        threads=torch_threads,
        cog=str(cog) if cog else None,
        any_body=any_body,
        precision=precision,
    )
    computing = _cluster(cluster, workers, threads, jobs, cluster_config, host)
    plan = plan_segment(cube, config)
    if dry_run:
        _print_plan(plan, partition)
        return
    with _computing("tiles", computing) as (client, update):
        result = run_segment(cube, config, client=client, progress=update, plan=plan)
    h, w = plan.out_shape
    out.print(
        f"[bold]segment[/bold] {result.store}: labels(time, y, x) = ({len(plan.times)}, {h}, {w}) "
        f"uint8 + confidence, x{plan.scale} of the cube; tiles: {result.computed} segmented, "
        f"{result.kept} kept; model {plan.digest[:19]}..., {result.plan.path.name}"
    )
    for path in result.cogs:
        out.print(f"  COG {path}")


def _print_plan(plan: Any, partition: int | None) -> None:
    est = plan.estimate(partition or 16)
    h, w = plan.shape

    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if n < 1024 or unit == "PiB":
                return f"{n:.1f} {unit}"
            n /= 1024
        return ""

    out.print(
        f"[bold]plan[/bold] {plan.cube}: {len(plan.times)} time step(s) x {plan.bands} band(s) x "
        f"{h} x {w} {plan.dtype} -> labels x{plan.scale}\n"
        f"  tiles {est['tiles']:,} of {plan.tile} px, tasks {est['tasks']:,} of up to "
        f"{plan.batch} tiles, halo {plan.halo} px\n"
        f"  partitions {est['partitions']:,} of {est['tasks_in_flight']:,} tasks in flight"
        + ("" if partition else " (per 4 worker threads x 4; 16 assumed)")
        + f"\n  reads {size(est['bytes_read'])}, writes {size(est['bytes_written'])}, "
        f"memory about {size(est['bytes_per_task'])} per task ("
        + ", ".join(f"{k} {size(v)}" for k, v in plan.task_bytes().items())
        + ")\n"
        f"  model {plan.digest[:19]}..., inference {plan.path.name}"
    )


# --------------------------------------------------------------------------- diff, craters

OverwriteOpt = Annotated[
    bool,
    typer.Option(help="Replace this command's own earlier output at --out (nothing else)."),
]
BlockOpt = Annotated[
    int,
    typer.Option(
        help="Side (px) of the blocks a task computes (whole chunks of the store); the "
        "products compute on threads here unless --cluster names a cluster.",
        rich_help_panel=CLUSTER,
    ),
]


@app.command()
def diff(
    labels: Annotated[Path, typer.Argument(help="A labels store from `segment`.")],
    before: Annotated[str, typer.Option(help="First epoch: date prefix or index.")],
    after: Annotated[str, typer.Option(help="Second epoch: date prefix or index.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    other: Annotated[
        Path | None, typer.Option(help="Second labels store (same grid) holding --after.")
    ] = None,
    min_confidence: Annotated[
        float, typer.Option(help="Ignore changes where either epoch is less sure (0..1).")
    ] = 0.0,
    min_area: Annotated[
        float, typer.Option(help="Ignore change regions smaller than this (m^2 on the body).")
    ] = 0.0,
    overwrite: OverwriteOpt = False,
    block: BlockOpt = PRODUCT_BLOCK,
    cluster: ClusterOpt = "none",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = 1,
    cluster_config: ClusterFileOpt = None,
    host: HostOpt = "127.0.0.1",
) -> None:
    """Change between two epochs: from->to codes, mask, transition table, polygons, quick look."""
    from planetseg.config import DiffConfig
    from planetseg.diff import diff as run_diff

    config = DiffConfig(
        out=str(out_dir),
        before=before,
        after=after,
        other=str(other) if other else None,
        min_confidence=min_confidence,
        min_area_m2=min_area,
        overwrite=overwrite,
        block=block,
    )
    computing = _cluster(cluster, workers, threads, jobs, cluster_config, host)
    with _computing("blocks", computing) as (client, update):
        result = run_diff(labels, config, client=client, progress=update)
    _print_diff(result)


def _print_diff(result: Any) -> None:
    table = Table(show_edge=False)
    for col in ("from", "to", "pixels", "km^2"):
        table.add_column(col, justify="left" if col in ("from", "to") else "right")
    for row in result.transitions:
        if row["changed"]:
            table.add_row(
                row["from_class"], row["to_class"], f"{row['pixels']:,}", f"{row['area_km2']:.6g}"
            )
    out.print(f"[bold]diff[/bold] {result.before} -> {result.after}:")
    out.print(table)
    out.print(
        f"changed: {result.changed_pixels:,} px, {result.changed_km2:.6g} km^2 -> {result.out}"
    )


@app.command()
def craters(
    labels: Annotated[Path, typer.Argument(help="A labels store from `segment`.")],
    out_path: Annotated[Path, typer.Option("--out", help="Catalog: .parquet or .csv.")],
    time: Annotated[
        list[str] | None, typer.Option(help="Time step (index or date prefix); repeatable.")
    ] = None,
    crater_class: Annotated[
        list[str] | None,
        typer.Option(help="Class name that is a crater; repeatable (default: *crater*)."),
    ] = None,
    min_diameter: Annotated[
        float,
        typer.Option(
            help="Smallest crater kept, in pixels of the labels grid; in the scores, smaller "
            "reference craters are no misses."
        ),
    ] = 3.0,
    min_confidence: Annotated[
        float,
        typer.Option(help="Drop craters whose mean crater probability is below this (0..1)."),
    ] = 0.0,
    reference: Annotated[
        Path | None, typer.Option(help="Crater catalog (CSV/Parquet) to score against.")
    ] = None,
    reference_min_km: Annotated[
        float,
        typer.Option(
            help="The reference's completeness limit (km, e.g. 1 for Robbins): smaller "
            "craters count on neither side."
        ),
    ] = 0.0,
    craterstats: Annotated[
        Path | None,
        typer.Option(help="Also write the count with its area for craterstats (.scc)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    block: BlockOpt = PRODUCT_BLOCK,
    cluster: ClusterOpt = "none",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    jobs: JobsOpt = 1,
    cluster_config: ClusterFileOpt = None,
    host: HostOpt = "127.0.0.1",
) -> None:
    """Extract individual craters (lon, lat, diameter_km, class, confidence, epoch)."""
    from planetseg.config import CratersConfig
    from planetseg.craters import craters as run_craters

    config = CratersConfig(
        out=str(out_path),
        times=tuple(time or ()),
        crater_classes=tuple(crater_class or ()),
        min_diameter_px=min_diameter,
        min_confidence=min_confidence,
        reference=str(reference) if reference else None,
        reference_min_km=reference_min_km,
        craterstats=str(craterstats) if craterstats else None,
        overwrite=overwrite,
        block=block,
    )
    computing = _cluster(cluster, workers, threads, jobs, cluster_config, host)
    with _computing("blocks", computing) as (client, update):
        result = run_craters(labels, config, client=client, progress=update)
    _print_craters(result)


def _print_craters(result: Any) -> None:
    counts = result.table.groupby("class").size().to_dict() if len(result.table) else {}
    out.print(
        f"[bold]craters[/bold] {len(result.table)} craters "
        f"({', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'}, from the "
        f"{result.source.replace('_', ' ')}) -> {result.out}"
    )
    for path in result.files:
        if path.suffix == ".scc":
            out.print(f"craterstats count -> {path}")
    scores = result.scores
    if scores is None:
        return
    table = Table(show_edge=False)
    columns = ("size", "metres", "reference", "detected", "precision", "recall", "F1")
    for col in (*columns, "dD/D", "|dD/D|", "dx/R"):
        table.add_column(col, justify="left" if col in ("size", "metres") else "right")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.2f}"

    def metres(lo: float, hi: float | None) -> str:
        return f"{lo:.4g}-{hi:.4g}" if hi is not None else f">={lo:.4g}"

    limits = scores.get("limits", {})
    total = f">= {limits.get('min_diameter_px', 0):g} px"
    if limits.get("reference_min_km"):
        total += f", >= {limits['reference_min_km']:g} km"
    rows = [(name, metres(*b["m"]), b) for name, b in scores["bins"].items()]
    floor_m = max(limits.get("min_diameter_m", 0), 1000 * limits.get("reference_min_km", 0))
    rows += [(total, f">={floor_m:.4g}", scores["total"])]
    rows += [("all (no limits)", "", scores["all"])]
    for name, span, b in rows:
        table.add_row(
            name,
            span,
            str(b["reference"]),
            str(b["detected"]),
            pct(b["precision"]),
            pct(b["recall"]),
            pct(b["f1"]),
            num(b.get("median_diameter_bias"), "+"),
            num(b["median_diameter_error"]),
            num(b["median_position_error_radii"]),
        )
    out.print(
        f"against {result.reference} (DeepMoon criteria; a pair binned by the reference's "
        "diameter; medians of matched craters):"
    )
    out.print(table)


# --------------------------------------------------------------------------- info


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A cube, labels store, model or change folder.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Also list every chunk and report missing ones.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """What a store is: kind, grid, CRS and body, times, completeness, provenance, model."""
    from planetseg.info import describe, summary

    result = describe(path, verify=verify)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    for line in summary(result):
        out.print(line, highlight=False, markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- run


@app.command("run")
def run_(
    workflow: Annotated[Path, typer.Argument(help="Workflow file (workflows/*.yaml).")],
    plan: Annotated[
        bool, typer.Option("--plan", help="Print what would run and why; change nothing.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Retry quarantined units now.")
    ] = False,
    cluster: Annotated[
        str | None,
        typer.Option(
            metavar="KIND|ADDRESS",
            help="Override the workflow's cluster kind.",
            rich_help_panel=CLUSTER,
        ),
    ] = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    jobs: Annotated[
        int | None,
        typer.Option(help="Batch jobs to submit (slurm, pbs).", rich_help_panel=CLUSTER),
    ] = None,
) -> None:
    """Run a workflow: only what is new, changed or failed since the last run (resumable)."""
    from dataclasses import replace

    from planetseg.cluster import check_kind
    from planetseg.run import plan_run, run_workflow
    from planetseg.workflow import load_workflow

    flow = load_workflow(workflow)
    overrides = {"kind": cluster, "workers": workers, "threads": threads, "jobs": jobs}
    computing = replace(flow.cluster, **{k: v for k, v in overrides.items() if v is not None})
    check_kind(computing.kind)
    flow.check_inputs()  # before anything is written
    if plan:
        items, units = plan_run(flow, retry_failed=retry_failed)
        _print_units(flow, items, units)
        return
    with _computing("tiles", computing) as (client, update):
        result = run_workflow(
            flow, client=client, retry_failed=retry_failed, on_progress=_note, progress=update
        )
    _print_run(flow, result)
    if result.failed:
        raise typer.Exit(1)


def _print_units(flow: Any, items: list[Any], units: list[Any]) -> None:
    todo = [u for u in units if u.reason]
    out.print(f"[bold]plan[/bold] {flow.name}: {len(items)} item(s) in the catalog")
    if not todo:
        out.print("nothing to do: every unit is done with the current settings")
        return
    table = Table(show_edge=False)
    for col in ("step", "unit", "why"):
        table.add_column(col)
    for u in todo:
        table.add_row(u.step, u.unit, u.reason)
    out.print(table)
    later = " (segment, diff and craters of new time steps are planned once they are ingested)"
    out.print(
        f"{len(todo)} unit(s) would run" + (later if any(u.step == "ingest" for u in todo) else "")
    )


def _print_run(flow: Any, result: Any) -> None:
    table = Table(show_edge=False)
    for col in ("step", "processed", "skipped", "failed", "quarantined"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for step, c in result.counts.items():
        table.add_row(step, *(str(c[k]) for k in ("processed", "skipped", "failed", "quarantined")))
    out.print(f"[bold]run[/bold] {flow.name} {result.id}:")
    out.print(table)
    if not any(c["processed"] for c in result.counts.values()) and not result.errors:
        out.print("nothing new: every unit was already done with the current settings")
    for e in result.errors:
        out.print(f"  {e['status']}: {e['step']} {e['unit']}: {e['error']}", highlight=False)
    for e in result.held:
        out.print(
            f"  quarantined earlier, not retried (--retry-failed retries it): {e['step']} "
            f"{e['unit']}: {e['error']}",
            highlight=False,
        )
    out.print(f"record -> {result.record}")


# --------------------------------------------------------------------------- schedule


@app.command()
def schedule(
    workflow: Annotated[
        Path | None, typer.Argument(help="The workflow file (optional with --list).")
    ] = None,
    every: Annotated[
        str | None, typer.Option(metavar="CRON", help='When to run, e.g. "0 2 * * *" (02:00).')
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto, scrontab, sbatch or crontab; auto picks the first found.")
    ] = "auto",
    walltime: Annotated[
        str, typer.Option(help="Time limit of each run's SLURM job, [D-]HH:MM:SS.")
    ] = "12:00:00",
    list_: Annotated[bool, typer.Option("--list", help="Show planetseg's schedules.")] = False,
    remove: Annotated[
        bool, typer.Option("--remove", help="Remove the workflow's schedule.")
    ] = False,
) -> None:
    """Run a workflow on a schedule: scrontab, a self-resubmitting sbatch job, or crontab."""
    from planetseg import schedule as sched

    if list_:
        found = sched.entries(backend, workflow)
        for e in found:
            line = f"{e.backend:8} {e.every:15} {e.workflow}\n         {e.detail}"
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        if not found:
            out.print("no planetseg schedules", highlight=False)
        return
    if workflow is None:
        raise InvalidArgumentError("give the WORKFLOW file to schedule (or --list)")
    if remove:
        removed = sched.remove(workflow, backend)
        where = workflow.resolve()
        said = f"removed the schedule of {where} from {', '.join(removed)}" if removed else None
        out.print(said or f"{where} has no schedule", highlight=False, markup=False)
        return
    if every is None:
        raise InvalidArgumentError('give --every "CRON", e.g. --every "0 2 * * *"')
    from planetseg.config import ScheduleConfig
    from planetseg.workflow import load_workflow

    flow = load_workflow(workflow)
    entry = sched.install(flow.path, flow.name, ScheduleConfig(every, backend, walltime))
    said = f"{entry.backend}: {flow.name} every {entry.every!r}: {entry.detail}"
    logs = f"  logs in {sched.state_dir(entry.workflow)}"
    out.print(f"{said}\n{logs}", highlight=False, markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- synth, demo


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the world into.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")] = 0,
    size: Annotated[int, typer.Option(help="Scene size in pixels (square).")] = 1024,
    gsd: Annotated[float, typer.Option(help="Ground sampling distance, metres per pixel.")] = 0.5,
    crs: Annotated[str, typer.Option(help="Projected CRS, e.g. IAU_2015:30110 or EPSG:32633.")] = (
        "IAU_2015:30110"
    ),
    center: Annotated[
        str | None, typer.Option(help="LON,LAT of the scene centre on the body.")
    ] = None,
) -> None:
    """Generate the synthetic planetary world: COGs, crater catalog and STAC items."""
    from planetseg.synthetic import SynthConfig, synthesize

    where = {}
    if center is not None:
        try:
            lon, lat = (float(v) for v in center.split(","))
        except ValueError:
            raise InvalidArgumentError(f"--center {center!r}: give LON,LAT in degrees") from None
        where = {"center_lon": lon, "center_lat": lat}
    world = synthesize(out_dir, config=SynthConfig(seed=seed, size=size, gsd=gsd, crs=crs, **where))
    out.print(
        f"{world.body} world, {len(world.item_ids)} epochs -> {world.root}\n"
        f"  STAC: {world.collection.name}, {world.items.name}   craters: {world.craters.name}"
    )


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for every output.")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the synthetic world.")] = 0,
    size: Annotated[int, typer.Option(help="Scene size in pixels.")] = 1024,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    cluster: ClusterOpt = "local",
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run the main job offline on the embedded synthetic world."""
    from planetseg.config import DemoConfig
    from planetseg.demo import describe_world, run_demo

    config = DemoConfig(out=str(out_dir), seed=seed, size=size, steps=steps)  # before the cluster
    with (
        _computing("tiles", _cluster(cluster, workers, threads)) as (client, update),
        _train_progress(lines=True) as train_update,
    ):
        result = run_demo(
            config.out,
            seed=config.seed,
            size=config.size,
            steps=config.steps,
            client=client,
            progress=update,
            train_progress=train_update,
            on_progress=_note,
        )
    world, cube, unseen = result.world, result.cube, result.unseen
    trained_on = describe_world(result.world_config)
    scored_on = f"world {describe_world(result.unseen_config)}, not seen in training"
    out.print(
        f"[bold]synth[/bold]  {world.body} training world, {trained_on}, "
        f"{len(world.item_ids)} epochs -> {world.root}"
    )
    out.print(f"[bold]search[/bold] local catalog {world.root}:")
    _print_items(result.found.items)
    out.print(f"        {len(result.found.items)} items -> {result.items}")
    _print_ingest(cube)
    out.print(f"[bold]train[/bold]  DSRL (SR branch + FA loss, detached) -> {result.model}")
    out.print(
        "[bold]evaluate[/bold] on the strip of the training world held out from training "
        "(LR input, HR labels):"
    )
    _print_scores(result.scores)
    out.print(
        f"[bold]synth[/bold]  {unseen.body} {scored_on}, {len(unseen.item_ids)} epochs -> "
        f"{unseen.root}; every figure below is on it"
    )
    flow = result.workflow
    out.print(
        f"[bold]run[/bold]    workflow {flow.path} with root {Path(config.out)}: "
        f"{', '.join(flow.steps)} -> {flow.outputs}",
        soft_wrap=True,
    )
    _print_run(flow, result.run)
    out.print(
        f"[bold]segment[/bold] {len(result.labels)} time steps -> {result.labels[0].parent}; "
        f"against the true labels, whole scenes, scored on {scored_on}:"
    )
    _print_scores(result.segment_scores)
    for change in result.changes:
        _print_diff(change)
        out.print(f"        on {scored_on}")
    for catalog in result.craters:
        _print_craters(catalog)
        out.print(f"        scored on {scored_on}")


# --------------------------------------------------------------------------- entry point


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, PlanetsegWarning):
        _note(f"warning: {message}")
    else:
        _default_showwarning(message, category, *args, **kwargs)


_default_showwarning = warnings.showwarning


def main() -> None:
    """Console-script entry point: run the app; project errors and warnings print one line."""
    warnings.showwarning = _show_warning
    try:
        app()
    except PlanetsegError as exc:
        _note(f"error: {exc}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
