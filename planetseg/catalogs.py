"""Named STAC catalogs for the three worlds, and how a ``--catalog`` argument resolves.

A catalog argument is one of:

* a **name** from :data:`CATALOGS` (``earth-search``, ``planetary-computer``, ``usgs-astro``);
* a **data-set alias** from :data:`ALIASES` (``hirise``, ``kaguya``, ``sentinel-2``, ...) that
  names a catalog *and* its collection; aliases for data with no STAC collection (``lroc``)
  raise :class:`~planetseg.errors.NoStacCollectionError` with a pointer to local catalogs;
* an ``http(s)://`` URL of any STAC API;
* a **local path**: a folder (of item JSON files, a static catalog, or image files: see
  :mod:`planetseg.formats`), a ``catalog.json``
  / ``collection.json``, or an items file (``.json``/``.geojson``/``.ndjson``/``.parquet``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from planetseg.errors import CatalogNotFoundError, NoStacCollectionError

World = Literal["earth", "moon", "mars"]


@dataclass(frozen=True)
class CollectionInfo:
    """A collection worth knowing in a named catalog.

    Attributes:
        id: Collection id as the API spells it.
        world: Body the collection images.
        description: One line for ``planetseg catalogs``.
    """

    id: str
    world: World
    description: str


@dataclass(frozen=True)
class NamedCatalog:
    """A public STAC API planetseg knows by name.

    Attributes:
        name: Short name used on the command line.
        url: Root URL of the STAC API.
        title: Human-readable title.
        collections: Useful collections, not an exhaustive list.
        signing: ``"planetary-computer"`` when asset hrefs must be signed before reading.
    """

    name: str
    url: str
    title: str
    collections: tuple[CollectionInfo, ...]
    signing: Literal["planetary-computer"] | None = None

    @property
    def worlds(self) -> tuple[World, ...]:
        """Worlds served, in order of first appearance."""
        return tuple(dict.fromkeys(c.world for c in self.collections))


CATALOGS: dict[str, NamedCatalog] = {
    c.name: c
    for c in (
        NamedCatalog(
            "earth-search",
            "https://earth-search.aws.element84.com/v1",
            "Earth Search v1 (Element 84, AWS open data)",
            (
                CollectionInfo(
                    "sentinel-2-l2a", "earth", "Sentinel-2 L2A surface reflectance, 10-60 m"
                ),
                CollectionInfo("landsat-c2-l2", "earth", "Landsat Collection 2 Level-2, 30 m"),
                CollectionInfo("naip", "earth", "NAIP aerial imagery (USA), 0.6-1 m RGBN"),
                CollectionInfo("cop-dem-glo-30", "earth", "Copernicus DEM GLO-30"),
            ),
        ),
        NamedCatalog(
            "planetary-computer",
            "https://planetarycomputer.microsoft.com/api/stac/v1",
            "Microsoft Planetary Computer (assets signed with `planetary-computer`)",
            (
                CollectionInfo("sentinel-2-l2a", "earth", "Sentinel-2 L2A surface reflectance"),
                CollectionInfo("landsat-c2-l2", "earth", "Landsat Collection 2 Level-2"),
                CollectionInfo("naip", "earth", "NAIP aerial imagery (USA)"),
                CollectionInfo("cop-dem-glo-30", "earth", "Copernicus DEM GLO-30"),
            ),
            signing="planetary-computer",
        ),
        NamedCatalog(
            "usgs-astro",
            "https://stac.astrogeology.usgs.gov/api",
            "USGS Astrogeology analysis-ready data (Moon, Mars)",
            (
                CollectionInfo(
                    "kaguya_terrain_camera_monoscopic_uncontrolled_observations",
                    "moon",
                    "Kaguya/SELENE Terrain Camera monoscopic observations, ~10 m",
                ),
                CollectionInfo(
                    "kaguya_terrain_camera_stereoscopic_uncontrolled_observations",
                    "moon",
                    "Kaguya/SELENE Terrain Camera stereo observations, ~10 m",
                ),
                CollectionInfo("kaguya_terrain_camera_usgs_dtms", "moon", "Kaguya TC DTMs"),
                CollectionInfo(
                    "mro_hirise_uncontrolled_observations",
                    "mars",
                    "MRO HiRISE observations, ~0.25-0.5 m (IAU_2015:49910/49930/49935)",
                ),
                CollectionInfo(
                    "mro_hirise_socet_dtms", "mars", "HiRISE DTMs and orthoimages (USGS)"
                ),
                CollectionInfo("mro_ctx_controlled_usgs_dtms", "mars", "MRO CTX DTMs, 20 m"),
                CollectionInfo(
                    "mo_themis_controlled_mosaics",
                    "mars",
                    "Mars Odyssey THEMIS IR controlled mosaics",
                ),
            ),
        ),
    )
}


@dataclass(frozen=True)
class Alias:
    """A data-set name that resolves to a catalog and collection, or explains why it cannot.

    Attributes:
        name: What the user types (``hirise``).
        world: Body the data set images.
        catalog: Name in :data:`CATALOGS`, or ``None`` where no STAC API serves the data.
        collections: Collections the alias selects.
        note: Why there is no STAC collection, and what to do instead.
    """

    name: str
    world: World
    catalog: str | None
    collections: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("sentinel-2", "earth", "earth-search", ("sentinel-2-l2a",)),
        Alias("landsat", "earth", "earth-search", ("landsat-c2-l2",)),
        Alias("naip", "earth", "earth-search", ("naip",)),
        Alias(
            "kaguya",
            "moon",
            "usgs-astro",
            ("kaguya_terrain_camera_monoscopic_uncontrolled_observations",),
        ),
        Alias("kaguya-dtm", "moon", "usgs-astro", ("kaguya_terrain_camera_usgs_dtms",)),
        Alias("hirise", "mars", "usgs-astro", ("mro_hirise_uncontrolled_observations",)),
        Alias("hirise-dtm", "mars", "usgs-astro", ("mro_hirise_socet_dtms",)),
        Alias("ctx-dtm", "mars", "usgs-astro", ("mro_ctx_controlled_usgs_dtms",)),
        Alias("themis", "mars", "usgs-astro", ("mo_themis_controlled_mosaics",)),
        Alias(
            "lroc",
            "moon",
            None,
            note=(
                "LROC NAC/WAC images are served through the PDS (LROC data node), not a STAC API; "
                "download them and search them as a local catalog: --catalog PATH (a folder of "
                "its PDS3 .IMG/.LBL files or GeoTIFFs, a static STAC catalog, or an items file)"
            ),
        ),
    )
}


@dataclass(frozen=True)
class ResolvedCatalog:
    """Where a search goes.

    Attributes:
        kind: ``"api"`` for a STAC API, ``"local"`` for files searched without a server.
        location: API root URL or local path.
        name: Catalog name where it was named, else the location.
        collections: Collections implied by an alias (added to the user's own).
        signing: Signing scheme for asset hrefs, if any.
    """

    kind: Literal["api", "local"]
    location: str
    name: str
    collections: tuple[str, ...] = ()
    signing: Literal["planetary-computer"] | None = None


def resolve_catalog(value: str) -> ResolvedCatalog:
    """Resolve a ``--catalog`` argument (name, alias, URL or local path).

    Raises:
        NoStacCollectionError: the alias names data no STAC API serves (LROC).
        CatalogNotFoundError: the value is none of the accepted forms.
    """
    text = value.strip()
    key = text.lower()
    if key in CATALOGS:
        cat = CATALOGS[key]
        return ResolvedCatalog("api", cat.url, cat.name, signing=cat.signing)
    if key in ALIASES:
        alias = ALIASES[key]
        if alias.catalog is None:
            raise NoStacCollectionError(f"{alias.name}: {alias.note}")
        cat = CATALOGS[alias.catalog]
        return ResolvedCatalog("api", cat.url, cat.name, alias.collections, cat.signing)
    if key.startswith(("http://", "https://")):
        return ResolvedCatalog("api", text.rstrip("/"), text)
    path = Path(text).expanduser()
    if path.exists():
        return ResolvedCatalog("local", str(path), str(path))
    known = ", ".join([*CATALOGS, *ALIASES])
    raise CatalogNotFoundError(
        f"unknown catalog {value!r}: give a name ({known}), an http(s) URL of a STAC API, "
        "or an existing local path"
    )
