"""The main offline job: the whole pipeline on the embedded synthetic world, no network.

Each stage is the library function the CLI also calls; the demo only chains them and says where
the outputs are. Stages join here as they land (ingest, train, segment, products).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planetseg.config import IngestConfig, SearchConfig
from planetseg.ingest import IngestResult, Progress, ingest
from planetseg.items import write_items
from planetseg.search import SearchResult, search
from planetseg.synthetic import SynthConfig, SynthWorld, synthesize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced.

    Attributes:
        world: The synthetic world (COGs, crater catalog, STAC collection).
        found: The items found by searching the world as a local catalog.
        items: The search result written as stac-geoparquet.
        cube: The ingested datacube (every epoch, with labels).
    """

    world: SynthWorld
    found: SearchResult
    items: Path
    cube: IngestResult


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: int = 1024,
    client: Any = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Run the pipeline offline on a synthetic world under ``out_dir``.

    Writes ``out_dir/world/`` (see :func:`planetseg.synthetic.synthesize`),
    ``out_dir/items.parquet`` (every epoch's item, found by a local-catalog search) and
    ``out_dir/cube.zarr`` (all epochs with their label rasters). Re-running is cheap: the world
    is rewritten byte for byte and the complete cube is left as it is.

    Args:
        out_dir: Where everything goes.
        seed: Seed of the world.
        size: Scene size in pixels.
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
    return DemoResult(world, found, items, cube)
