"""`planetseg search` on local catalogs: filters, formats, and bad input.

The items form a known design (item ``i`` covers longitudes ``[i, i+0.5]`` and was acquired on
day ``i`` of 2024), so the expected answer of each query is written down from the design, not
recomputed with the code under test.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from planetseg.config import SearchConfig
from planetseg.errors import (
    CatalogNotFoundError,
    CatalogReadError,
    CollectionNotFoundError,
    InvalidArgumentError,
    NoStacCollectionError,
)
from planetseg.items import read_items, write_items
from planetseg.search import parse_bbox, parse_datetime, search

N = 30


def grid_item(i: int, collection: str = "grid") -> dict:
    w, s = float(i) - 15.0, 10.0
    when = dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC) + dt.timedelta(days=i)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/projection/v2.0.0/schema.json"],
        "id": f"{collection}-{i:03d}",
        "collection": collection,
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[w, s], [w + 0.5, s], [w + 0.5, s + 0.5], [w, s + 0.5], [w, s]]],
        },
        "bbox": [w, s, w + 0.5, s + 0.5],
        "properties": {
            "datetime": when.isoformat().replace("+00:00", "Z"),
            "proj:code": "IAU_2015:30110",
            "proj:epsg": None,
        },
        "links": [],
        "assets": {"image": {"href": f"images/{i}.tif", "roles": ["data"]}},
    }


def grid_items(collection: str = "grid") -> list[dict]:
    return [grid_item(i, collection) for i in range(N)]


# Longitudes -10..-3 cover items 5..12 (item i spans [i-15, i-14.5]); days 8..20 of 2024 are
# items 7..19. Both together: 7..12.
BBOX = "-10,9,-2.8,11"
DATETIME = "2024-01-08/2024-01-20"
EXPECTED = [f"grid-{i:03d}" for i in range(7, 13)]


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    return write_items(grid_items(), tmp_path / "items.ndjson")


def test_local_search_filters_bbox_and_datetime(items_file: Path) -> None:
    result = search(SearchConfig(catalog=str(items_file), bbox=BBOX, datetime=DATETIME))
    assert result.ids == EXPECTED
    assert result.query["datetime"] == "2024-01-08T00:00:00Z/2024-01-20T23:59:59.999999Z"


def test_open_ended_interval_and_max_items(items_file: Path) -> None:
    after = search(SearchConfig(catalog=str(items_file), datetime="2024-01-26/.."))
    assert after.ids == [f"grid-{i:03d}" for i in range(25, N)]
    before = search(SearchConfig(catalog=str(items_file), datetime="../2024-01-02"))
    assert before.ids == ["grid-000", "grid-001"]
    capped = search(SearchConfig(catalog=str(items_file), max_items=4))
    assert capped.ids == [f"grid-{i:03d}" for i in range(4)]


def test_antimeridian_and_0_360_longitudes(tmp_path: Path) -> None:
    items = [grid_item(0), grid_item(29)]  # lon -15 and +14
    items[0]["geometry"]["coordinates"] = [[[179.6, 0], [180, 0], [180, 1], [179.6, 1], [179.6, 0]]]
    items[1]["geometry"]["coordinates"] = [
        [[-180, 0], [-179.5, 0], [-179.5, 1], [-180, 1], [-180, 0]]
    ]
    path = write_items(items, tmp_path / "items.json")
    # 179.5 .. -179.8 crosses the antimeridian; 179.5..180.2 east is the same box in 0..360.
    for bbox in ("179.5,0,-179.8,1", "179.5,0,180.2,1"):
        assert search(SearchConfig(catalog=str(path), bbox=bbox)).ids == ["grid-000", "grid-029"]


def test_formats_round_trip_projection_metadata(tmp_path: Path, items_file: Path) -> None:
    result = search(SearchConfig(catalog=str(items_file), bbox=BBOX, datetime=DATETIME))
    for suffix in (".json", ".geojson", ".ndjson", ".parquet"):
        out = write_items(result.items, tmp_path / f"out{suffix}")
        back = read_items(out)
        assert [it["id"] for it in back] == EXPECTED
        assert all(it["properties"]["proj:code"] == "IAU_2015:30110" for it in back)
        # and searching the written file as a catalog gives the same answer
        again = search(SearchConfig(catalog=str(out), bbox=BBOX, datetime=DATETIME))
        assert again.ids == EXPECTED


def test_relative_asset_hrefs_become_absolute(items_file: Path) -> None:
    item = search(SearchConfig(catalog=str(items_file), max_items=1)).items[0]
    assert item["assets"]["image"]["href"] == str(items_file.parent / "images" / "0.tif")


def test_static_catalog(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    coll_dir = root / "grid"
    coll_dir.mkdir(parents=True)
    (root / "catalog.json").write_text(
        json.dumps(
            {
                "type": "Catalog",
                "id": "root",
                "stac_version": "1.1.0",
                "description": "d",
                "links": [{"rel": "child", "href": "./grid/collection.json"}],
            }
        )
    )
    links = []
    for it in grid_items():
        it.pop("collection")
        (coll_dir / f"{it['id']}.json").write_text(json.dumps(it))
        links.append({"rel": "item", "href": f"./{it['id']}.json"})
    (coll_dir / "collection.json").write_text(
        json.dumps({"type": "Collection", "id": "grid", "stac_version": "1.1.0", "links": links})
    )
    for catalog in (root, root / "catalog.json"):
        result = search(
            SearchConfig(catalog=str(catalog), collections=("grid",), bbox=BBOX, datetime=DATETIME)
        )
        assert result.ids == EXPECTED
        assert {it["collection"] for it in result.items} == {"grid"}


def test_folder_of_items_and_collections(tmp_path: Path) -> None:
    write_items(grid_items("a"), tmp_path / "a.ndjson")
    write_items(grid_items("b"), tmp_path / "b.parquet")
    both = search(SearchConfig(catalog=str(tmp_path), bbox=BBOX, datetime=DATETIME))
    assert sorted(both.ids) == sorted([i.replace("grid", c) for c in "ab" for i in EXPECTED])
    only_b = search(SearchConfig(catalog=str(tmp_path), collections=("b",), max_items=3))
    assert only_b.ids == ["b-000", "b-001", "b-002"]


def test_folder_of_cogs(tmp_path: Path) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    folder = tmp_path / "lroc"
    folder.mkdir()
    profile = dict(
        driver="GTiff",
        width=64,
        height=64,
        count=1,
        dtype="uint8",
        crs="IAU_2015:30110",
        transform=from_origin(0.0, 30_000.0, 10.0, 10.0),
    )
    with rasterio.open(folder / "M123.tif", "w", **profile) as dst:
        dst.write(np.ones((1, 64, 64), "uint8"))
        dst.update_tags(TIFFTAG_DATETIME="2010:05:01 10:00:00")
    result = search(SearchConfig(catalog=str(folder), collections=("lroc",), bbox="-1,0,1,2"))
    assert result.ids == ["M123"]
    props = result.items[0]["properties"]
    assert props["datetime"] == "2010-05-01T10:00:00Z"
    assert props["proj:code"] == "IAU_2015:30110"
    assert props["planetseg:body"] == "moon"
    # 30 km north of the equator on a 1737.4 km sphere is about 0.99 degrees of latitude
    assert result.items[0]["bbox"][3] == pytest.approx(np.degrees(30_000 / 1_737_400), rel=1e-6)


@pytest.mark.parametrize(
    ("bbox", "message"),
    [
        ("1,2,3", "malformed"),
        ("a,b,c,d", "malformed"),
        ("0,-95,1,1", "outside the body's range -90..90"),
        ("-200,0,1,1", "outside the body's range"),
        ("0,5,1,1", "south"),
        ("10,0,10,1", "zero width"),
    ],
)
def test_bad_bbox(bbox: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        parse_bbox(bbox)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2024-02-01/2024-01-01", "reversed"),
        ("yesterday", "not RFC 3339"),
        ("../..", "open at both ends"),
        ("2024-13", "month must be"),
    ],
)
def test_bad_datetime(value: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        parse_datetime(value)


def test_partial_dates_cover_their_period() -> None:
    start, stop = parse_datetime("2024-02")
    assert (start.isoformat(), stop.isoformat()) == (
        "2024-02-01T00:00:00+00:00",
        "2024-02-29T23:59:59.999999+00:00",
    )


def test_bad_catalogs(tmp_path: Path, items_file: Path) -> None:
    with pytest.raises(CatalogNotFoundError, match="unknown catalog"):
        search(SearchConfig(catalog=str(tmp_path / "nowhere")))
    with pytest.raises(NoStacCollectionError, match="PDS"):
        search(SearchConfig(catalog="lroc"))
    with pytest.raises(CollectionNotFoundError, match="it has: grid"):
        search(SearchConfig(catalog=str(items_file), collections=("sentinel-2-l2a",)))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CatalogReadError, match="broken.json"):
        search(SearchConfig(catalog=str(broken)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatalogReadError, match="holds no STAC items"):
        search(SearchConfig(catalog=str(empty)))
