"""`planetseg search` against real STAC APIs on 127.0.0.1 (rustac), flaky and silent ones."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from planetseg.config import SearchConfig
from planetseg.errors import CatalogUnavailableError, CollectionNotFoundError
from planetseg.items import read_items, write_items
from planetseg.search import search
from tests.servers import FlakyProxy, SilentServer, collection_for
from tests.test_cli import assert_one_line_error, planetseg
from tests.test_search import BBOX, DATETIME, EXPECTED, grid_items


@pytest.fixture
def grid_api(rustac_server):
    """Two collections of 30 items each; the query's answer is EXPECTED (see test_search)."""
    pairs = [(collection_for(c, grid_items(c)), grid_items(c)) for c in ("grid", "other")]
    return rustac_server(pairs)


def test_api_returns_exactly_the_matching_items_across_pages(grid_api, tmp_path: Path) -> None:
    # page_size 2 makes the 6 matches span three pages (and the last page is partial at 4)
    for page_size in (2, 4, 100):
        config = SearchConfig(
            catalog=grid_api.url,
            collections=("grid",),
            bbox=BBOX,
            datetime=DATETIME,
            page_size=page_size,
        )
        assert sorted(search(config).ids) == EXPECTED
    everything = search(SearchConfig(catalog=grid_api.url, collections=("grid",), page_size=7))
    assert sorted(everything.ids) == sorted(it["id"] for it in grid_items())
    capped = search(
        SearchConfig(catalog=grid_api.url, collections=("grid",), page_size=3, max_items=5)
    )
    assert len(capped.ids) == 5


def test_cli_api_search_equals_local_search(grid_api, tmp_path: Path) -> None:
    out = tmp_path / "items.parquet"
    proc = planetseg(
        "search",
        "--catalog",
        grid_api.url,
        "--collection",
        "grid",
        "--bbox",
        BBOX,
        "--datetime",
        DATETIME,
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    api_ids = sorted(it["id"] for it in read_items(out))
    assert api_ids == EXPECTED
    local = write_items(grid_items(), tmp_path / "local" / "items.ndjson")
    local_out = tmp_path / "local.parquet"
    proc = planetseg(
        "search",
        "--catalog",
        str(local),
        "--collection",
        "grid",
        "--bbox",
        BBOX,
        "--datetime",
        DATETIME,
        "--out",
        str(local_out),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(it["id"] for it in read_items(local_out)) == api_ids


def test_projection_metadata_survives_the_api(grid_api) -> None:
    items = search(SearchConfig(catalog=grid_api.url, collections=("grid",), max_items=3)).items
    assert all(it["properties"]["proj:code"] == "IAU_2015:30110" for it in items)


def test_unknown_collection_on_api(grid_api) -> None:
    with pytest.raises(CollectionNotFoundError, match="'nope'"):
        search(SearchConfig(catalog=grid_api.url, collections=("nope",)))


def test_synthetic_world_api_matches_local_catalog(synthetic_world, synthetic_api) -> None:
    api, files = synthetic_api
    query = dict(
        collections=(synthetic_world.collection_id,),
        bbox="23.46,0.66,23.48,0.68",
        datetime="2010-03-01/2010-03-31",
    )
    remote = search(SearchConfig(catalog=api.url, **query))
    local = search(SearchConfig(catalog=str(synthetic_world.root), **query))
    assert sorted(remote.ids) == sorted(local.ids) == list(synthetic_world.item_ids[:2])
    assert all(it["assets"]["image"]["href"].startswith(files.url) for it in remote.items)


def test_503_twice_then_full_result(grid_api) -> None:
    with FlakyProxy(grid_api.url, fail_first=2, status=503) as proxy:
        config = SearchConfig(
            catalog=proxy.url,
            collections=("grid",),
            bbox=BBOX,
            datetime=DATETIME,
            page_size=2,
            backoff=0.05,
        )
        assert sorted(search(config).ids) == EXPECTED
        assert proxy.failed == 2


def test_503_on_search_pages_is_retried(grid_api) -> None:
    with FlakyProxy(grid_api.url, fail_first=2, status=503, path="/search") as proxy:
        config = SearchConfig(catalog=proxy.url, collections=("grid",), page_size=5, backoff=0.05)
        assert len(search(config).ids) == 30
        assert proxy.failed == 2


def test_persistent_503_gives_up(grid_api) -> None:
    with FlakyProxy(grid_api.url, fail_first=1000, status=503) as proxy:
        with pytest.raises(CatalogUnavailableError, match="failed after 2 retries"):
            search(SearchConfig(catalog=proxy.url, retries=2, backoff=0.01))


def test_silent_server_is_a_bounded_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "items.json"
    with SilentServer() as silent:
        url = silent.url
        start = time.monotonic()
        proc = planetseg(
            "search",
            "--catalog",
            url,
            "--timeout",
            "1",
            "--retries",
            "1",
            "--out",
            str(out),
            timeout=60,
        )
        elapsed = time.monotonic() - start
    assert_one_line_error(proc, url, "failed after 1 retries")
    assert elapsed < 20
    assert not out.exists()
