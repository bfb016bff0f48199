"""The main offline job: the whole pipeline on the embedded synthetic world, no network.

Each stage is the library function the CLI also calls; the demo only chains them and says where
the outputs are. Stages join here as they land (ingest, train, segment, products).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planetseg.config import IngestConfig, SearchConfig, TrainConfig
from planetseg.evaluate import evaluate
from planetseg.ingest import IngestResult, Progress, ingest
from planetseg.items import write_items
from planetseg.search import SearchResult, search
from planetseg.synthetic import SynthConfig, SynthWorld, synthesize
from planetseg.train import train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced.

    Attributes:
        world: The synthetic world (COGs, crater catalog, STAC collection).
        found: The items found by searching the world as a local catalog.
        items: The search result written as stac-geoparquet.
        cube: The ingested datacube (every epoch, with labels).
        model: The exported segmentation model (trained with the SR branch, then detached).
        scores: The model's scores on the strip of the cube held out from training.
    """

    world: SynthWorld
    found: SearchResult
    items: Path
    cube: IngestResult
    model: Path
    scores: dict[str, Any]


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: int = 1024,
    steps: int = 120,
    client: Any = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Run the pipeline offline on a synthetic world under ``out_dir``.

    Writes ``out_dir/world/`` (see :func:`planetseg.synthetic.synthesize`),
    ``out_dir/items.parquet`` (every epoch's item, found by a local-catalog search) and
    ``out_dir/cube.zarr`` (all epochs with their label rasters), then trains the DSRL network
    on the cube (``out_dir/run/``, exported model in ``out_dir/run/model``) and scores it on the
    held-out strip. Re-running is cheap: the world is rewritten byte for byte, the complete cube
    is left as it is, and a finished training run is reused (an interrupted one resumes).

    Args:
        out_dir: Where everything goes.
        seed: Seed of the world.
        size: Scene size in pixels.
        steps: Training steps (batch 8 of 128 px windows; about a second each on 2 cores).
        client: Dask client to compute on (None: threads in this process).
        progress: Tile progress callback for the ingest.
    """
    out = Path(out_dir)
    world = synthesize(out / "world", config=SynthConfig(seed=seed, size=size))
    logger.info("synthetic world written to %s", world.root)
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
        train(cube.store, TrainConfig(out=str(run), steps=steps, threads=2, resume=resume))
    scores = evaluate(model, cube.store, region="val")
    return DemoResult(world, found, items, cube, model, scores)
