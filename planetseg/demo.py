"""The main offline job: the whole pipeline on the embedded synthetic world, no network.

The training half chains the library functions the CLI also calls (synth, search, ingest,
train, evaluate); the products half is a workflow run (``planetseg run``) of the shipped
``workflows/demo.yaml`` with its root in the demo's folder. The model trains on one world
(seed S) and every product figure (segmentation scores, changes, craters) is measured on
another it has never seen: seed S + 1, under other suns (:data:`UNSEEN_EPOCHS`), as
``benchmarks/bench_ablation.py`` scores the ablation.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planetseg.config import DemoConfig, IngestConfig, SearchConfig, TrainConfig
from planetseg.craters import CratersResult, read_craters
from planetseg.diff import DiffResult, read_diff
from planetseg.errors import PlanetsegError
from planetseg.evaluate import evaluate
from planetseg.ingest import IngestResult, Progress, ingest
from planetseg.items import write_items
from planetseg.metrics import confusion_matrix, scores
from planetseg.products import LabelsStore
from planetseg.run import RunResult, output_of, run_workflow
from planetseg.search import SearchResult, search
from planetseg.store import create_owned_dir, prepare_output
from planetseg.synthetic import EpochSpec, SynthConfig, SynthWorld, synthesize
from planetseg.train import Progress as TrainProgress
from planetseg.train import train
from planetseg.workflow import Workflow, load_workflow, shipped_workflow

logger = logging.getLogger(__name__)

#: The epochs of the world the products are scored on: the same story as the training world's
#: (epoch 1 differs from epoch 0 only in the sun, epoch 2 adds new craters) under suns the
#: training never saw (training: azimuth 270, 90, 200 degrees).
UNSEEN_EPOCHS: tuple[EpochSpec, ...] = (
    EpochSpec(dt.datetime(2020, 1, 1, 10, 0, tzinfo=dt.UTC), 135.0, 35.0, 0),
    EpochSpec(dt.datetime(2020, 1, 15, 22, 0, tzinfo=dt.UTC), 315.0, 20.0, 0),
    EpochSpec(dt.datetime(2024, 2, 1, 4, 0, tzinfo=dt.UTC), 45.0, 30.0, 12),
)


def describe_world(config: SynthConfig) -> str:
    """``seed 1, suns 135/35, 315/20, 45/30 (azimuth/elevation, degrees)``."""
    suns = ", ".join(f"{e.sun_azimuth:g}/{e.sun_elevation:g}" for e in config.epochs)
    return f"seed {config.seed}, suns {suns} (azimuth/elevation, degrees)"


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced.

    Attributes:
        world: The training world (COGs, crater catalog, STAC collection).
        world_config: What it was made from (seed, suns).
        found: The items found by searching the training world as a local catalog.
        items: The search result written as stac-geoparquet.
        cube: The ingested datacube (every epoch, with labels).
        model: The exported segmentation model (trained with the SR branch, then detached).
        scores: The model's scores on the strip of the cube held out from training.
        unseen: The world the products are made and scored on, never seen in training.
        unseen_config: What it was made from (another seed, other suns).
        workflow: The workflow that made the products (``workflows/demo.yaml``, root ``out``).
        run: What its run did (nothing, when an earlier demo made every product already).
        labels: The labels store of each time step (on the unseen world's own grid).
        segment_scores: ``labels`` against the unseen world's true labels, whole scenes.
        changes: Change products: epoch 0 -> 1 (only the sun moved) and 0 -> 2 (new craters).
        craters: The crater catalog of each time step, scored against the unseen world's.
    """

    world: SynthWorld
    world_config: SynthConfig
    found: SearchResult
    items: Path
    cube: IngestResult
    model: Path
    scores: dict[str, Any]
    unseen: SynthWorld
    unseen_config: SynthConfig
    workflow: Workflow
    run: RunResult
    labels: tuple[Path, ...]
    segment_scores: dict[str, Any]
    changes: tuple[DiffResult, ...]
    craters: tuple[CratersResult, ...]


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: int = 1024,
    steps: int = 300,
    client: Any = None,
    progress: Progress | None = None,
    train_progress: TrainProgress | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the pipeline offline on synthetic worlds under ``out_dir``.

    Writes the training world ``out_dir/world/`` (seed ``seed``, see
    :func:`planetseg.synthetic.synthesize`), ``out_dir/items.parquet`` (every epoch's item,
    found by a local-catalog search) and ``out_dir/cube.zarr`` (all epochs with their label
    rasters), then trains the DSRL network on the cube (``out_dir/run/``, exported model in
    ``out_dir/run/model``) and scores it on the held-out strip. Then it does what a user does
    with a model, on a world the model has not seen (``out_dir/unseen-world/``: seed
    ``seed + 1``, the suns of :data:`UNSEEN_EPOCHS`), as a workflow run: the shipped
    ``workflows/demo.yaml`` with its root at ``out_dir`` finds the world's scenes, ingests them
    at the model's input resolution (``out_dir/lr.zarr``, pixels averaged ``scale`` x
    ``scale``), segments each time step on the cluster (``out_dir/products/labels/``, back on
    the world's grid, COGs in ``products/cogs/``), compares every epoch with the first
    (``products/change/``: 0 -> 1, where only the sun moved, ideally no change, and 0 -> 2,
    new craters) and catalogs each epoch's craters (``products/craters/``) against the unseen
    world's own catalog. The labels are then scored against the world's true labels.
    Re-running is cheap: the worlds are rewritten byte for byte, complete stores are left as
    they are, a finished training run is reused (interrupted ones resume) and the workflow
    run does only what is missing. ``out_dir`` must be new, empty or an earlier demo's: a
    folder holding anything else is refused.

    Args:
        out_dir: Where everything goes.
        seed: Seed of the training world (the unseen world's is ``seed + 1``).
        size: Scene size in pixels (of both worlds).
        steps: Training steps (batch 8 of 128 px windows; about 0.3 s each on 2 cores). The
            crater recipe needs them: at 120 steps its model is unsure of itself (the 0 -> 2
            change mask at the demo's filters had pixel F1 3.5, 40.5 at 300 steps).
        client: Dask client to compute on (None: threads in this process).
        progress: Tile progress callback of ingest and segment.
        train_progress: Step progress callback of training (see :func:`planetseg.train.train`).
        on_progress: Called with a line on what each workflow step is about to do.

    Raises:
        InvalidArgumentError: a bad seed, size or step count (see
            :class:`~planetseg.config.DemoConfig`), before anything is written.
        PlanetsegError: a unit of the workflow run failed (its first error).
    """
    DemoConfig(out=str(out_dir), seed=seed, size=size, steps=steps)  # before writing anything
    out = Path(out_dir)
    prepare_output(out, "demo")
    create_owned_dir(out, "demo")
    world_config = SynthConfig(seed=seed, size=size)
    world = synthesize(out / "world", config=world_config)
    logger.info("training world written to %s", world.root)
    found = search(SearchConfig(catalog=str(world.root), collections=(world.collection_id,)))
    items = write_items(found.items, out / "items.parquet")
    cube = ingest(
        found.items,
        IngestConfig(out=str(out / "cube.zarr"), labels="labels"),
        client=client,
        progress=progress,
        provenance=found.provenance(),
    )
    run = out / "run"
    model = run / "model"
    if not (model / "model.json").exists():
        resume = (run / "checkpoint.pt").exists()
        # The demo's low-resolution scenes are made by averaging 2 x 2 pixels, so the
        # training degradation is the same box average without a PSF (psf_sigma 0). With the
        # default PSF the model meets sharper input than it learnt from: measured (before the
        # crater recipe) on the training world's segmented scenes, mIoU 48.1 instead of 56.0,
        # new-crater F1 25 instead of 75.
        config = TrainConfig(out=str(run), steps=steps, threads=2, psf_sigma=0.0, resume=resume)
        train(cube.store, config, progress=train_progress)
    scores = evaluate(model, cube.store, region="val")
    # Everything from here on is on a world the model has never seen: another seed (terrain
    # and craters), other suns.
    unseen_config = SynthConfig(seed=seed + 1, size=size, epochs=UNSEEN_EPOCHS)
    unseen = synthesize(out / "unseen-world", config=unseen_config)
    logger.info("unseen world written to %s", unseen.root)
    flow = load_workflow(shipped_workflow("demo"), root=out)
    lr = abs(cube.plan.transform[0]) * TrainConfig.scale
    if flow.ingest is None or flow.ingest.resolution != lr:
        raise PlanetsegError(
            f"{flow.path}: cube.resolution must be {lr:g}, the model's input resolution"
        )
    result = run_workflow(flow, client=client, on_progress=on_progress, progress=progress)
    if result.failed:
        first = result.errors[0]
        raise PlanetsegError(
            f"the demo workflow failed: {first['step']} {first['unit']}: {first['error']}"
        )

    def outputs(step: str) -> list[Path]:
        return [output_of(flow, step, u.unit) for u in result.planned if u.step == step]

    labels = tuple(outputs("segment"))
    return DemoResult(
        world,
        world_config,
        found,
        items,
        cube,
        model,
        scores,
        unseen,
        unseen_config,
        flow,
        result,
        labels,
        _score_labels(labels, unseen.labels),
        tuple(read_diff(path) for path in outputs("diff")),
        tuple(read_craters(path) for path in outputs("craters")),
    )


def _score_labels(labels: tuple[Path, ...], truth: tuple[Path, ...]) -> dict[str, Any]:
    """Scores of labels stores (one per time step) against the true label rasters, whole scenes."""
    import rasterio

    first = LabelsStore.open(labels[0])
    n = max(first.classes) + 1
    cm = np.zeros((n, n), np.int64)
    for store, path in zip(labels, truth, strict=True):
        with rasterio.open(path) as src:
            expected = src.read(1)
        cm += confusion_matrix(expected, LabelsStore.open(store).read(0), n)
    return scores(cm, first.classes)
