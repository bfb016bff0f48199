"""The main offline job: the whole pipeline on the embedded synthetic world, no network.

Each stage is the library function the CLI also calls; the demo only chains them and says where
the outputs are. Stages join here as they land (ingest, train, segment, products).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from planetseg.config import SearchConfig
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
    """

    world: SynthWorld
    found: SearchResult
    items: Path


def run_demo(out_dir: str | Path, *, seed: int = 0, size: int = 1024) -> DemoResult:
    """Synthesise the default world under ``out_dir`` and search it offline.

    Writes ``out_dir/world/`` (see :func:`planetseg.synthetic.synthesize`) and
    ``out_dir/items.parquet`` (every epoch's item, found by a local-catalog search).
    """
    out = Path(out_dir)
    world = synthesize(out / "world", config=SynthConfig(seed=seed, size=size))
    logger.info("synthetic world written to %s", world.root)
    found = search(SearchConfig(catalog=str(world.root), collections=(world.collection_id,)))
    items = write_items(found.items, out / "items.parquet")
    return DemoResult(world, found, items)
