"""Planetary bodies and the CRSs that belong to them.

planetseg never assumes the Earth: every CRS is tied to a :class:`Body`, areas and distances use
that body's radius, and combining data from two bodies is refused. PROJ's IAU_2015 authority
codes are ``NAIF_ID * 100 + variant`` (``30110`` is the Moon's equirectangular projection,
``49910`` Mars's), which is how a code is mapped back to its body.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from pyproj import CRS
from pyproj.exceptions import CRSError as PyprojCRSError

from planetseg.errors import CRSError, MixedBodiesError


@dataclass(frozen=True)
class Body:
    """A solid body with its reference sphere/ellipsoid.

    Attributes:
        name: Lower-case common name (``"moon"``).
        naif_id: NAIF integer id (Earth 399, Moon 301, Mars 499).
        radius_m: Mean radius in metres used for areas on a sphere.
        geographic_crs: Authority code of the body's geographic (lon/lat, degrees) CRS.
    """

    name: str
    naif_id: int
    radius_m: float
    geographic_crs: str

    @property
    def crs(self) -> CRS:
        """The body's geographic CRS."""
        return _crs(self.geographic_crs)


BODIES: dict[str, Body] = {
    b.name: b
    for b in (
        Body("earth", 399, 6_371_008.8, "EPSG:4326"),
        Body("moon", 301, 1_737_400.0, "IAU_2015:30100"),
        Body("mars", 499, 3_396_190.0, "IAU_2015:49900"),
        Body("mercury", 199, 2_440_530.0, "IAU_2015:19900"),
        Body("ceres", 2_000_001, 470_000.0, "IAU_2015:200000100"),
        Body("vesta", 2_000_004, 255_000.0, "IAU_2015:200000400"),
    )
}
_BY_NAIF = {b.naif_id: b for b in BODIES.values()}


@lru_cache(maxsize=256)
def _crs(text: str) -> CRS:
    return CRS.from_user_input(text)


def parse_crs(value: str | CRS) -> CRS:
    """Parse a CRS given as an authority code, WKT, PROJ string or :class:`pyproj.CRS`.

    Raises:
        CRSError: ``value`` is not a CRS PROJ knows.
    """
    if isinstance(value, CRS):
        return value
    try:
        return _crs(str(value).strip())
    except PyprojCRSError as exc:
        raise CRSError(
            f"unknown CRS {str(value)[:80]!r}: give an authority code such as EPSG:32633 or "
            "IAU_2015:30110, or a WKT2 string"
        ) from exc


def get_body(name: str) -> Body:
    """Look a body up by name (case-insensitive).

    Raises:
        CRSError: the name is not one of :data:`BODIES`.
    """
    try:
        return BODIES[name.lower()]
    except KeyError:
        raise CRSError(f"unknown body {name!r}: choose one of {', '.join(BODIES)}") from None


def body_of_crs(crs: str | CRS) -> Body:
    """Return the body a CRS refers to.

    The IAU_2015 authority code decides where there is one; otherwise the datum's ellipsoid
    is matched by semi-major axis against the known bodies (WKT from GDAL often lacks the
    authority). EPSG CRSs are Earth's.

    Raises:
        CRSError: the body cannot be told from the CRS.
    """
    # PROJ's authority lookup is slow (a database search for a WKT without an id): once per CRS.
    return _body_of_text(crs.to_wkt() if isinstance(crs, CRS) else str(crs).strip())


@lru_cache(maxsize=256)
def _body_of_text(text: str) -> Body:
    crs = parse_crs(text)
    auth = crs.to_authority(min_confidence=70) or crs.geodetic_crs.to_authority(min_confidence=70)
    if auth is not None:
        authority, code = auth
        if authority == "EPSG":
            return BODIES["earth"]
        if authority.startswith("IAU"):
            naif = int(code) // 100
            if naif in _BY_NAIF:
                return _BY_NAIF[naif]
    ellipsoid = crs.ellipsoid
    if ellipsoid is not None:
        name = (ellipsoid.name or "").lower()
        for body in BODIES.values():
            if name.startswith(body.name):
                return body
        for body in BODIES.values():
            if abs(ellipsoid.semi_major_metre - body.radius_m) / body.radius_m < 0.01:
                return body
    raise CRSError(f"cannot tell which body the CRS {crs.name!r} belongs to")


def same_body(
    crss: list[str | CRS],
    *,
    what: str = "inputs",
    names: list[str] | None = None,
    fix: str = "process each body separately",
) -> Body:
    """Return the single body shared by ``crss``.

    Args:
        crss: The CRSs.
        what: What they are, for the message.
        names: What each CRS belongs to (an item id, ...): the message names one of each body.
        fix: What the message tells the user to do.

    Raises:
        MixedBodiesError: the CRSs belong to more than one body.
    """
    first: dict[str, str] = {}
    for k, c in enumerate(crss):
        first.setdefault(body_of_crs(c).name, names[k] if names else "")
    bodies = set(first)
    if len(bodies) > 1:
        if names:
            named = ", ".join(f"{body} ({name!r})" for body, name in sorted(first.items()))
            raise MixedBodiesError(f"{what} mix bodies: {named}; {fix}")
        raise MixedBodiesError(f"{what} mix bodies ({', '.join(sorted(bodies))}): {fix}")
    if not bodies:
        raise CRSError(f"{what} carry no CRS")
    return BODIES[bodies.pop()]


_PROJ_SWITCH = "PROJ_IGNORE_CELESTIAL_BODY"
_proj_lock = threading.RLock()


@contextmanager
def celestial_proj() -> Iterator[None]:
    """Let PROJ build transformations that touch a non-Earth CRS, for the block's duration.

    odc-stac always relates a grid to EPSG:4326 (for its metadata), which PROJ refuses for a
    Moon or Mars CRS unless ``PROJ_IGNORE_CELESTIAL_BODY=YES``. That switch also disables
    PROJ's guard against mixing bodies, so planetseg checks bodies itself
    (:func:`same_body`) before entering this block, and keeps the switch scoped to it.
    """
    with _proj_lock:
        previous = os.environ.get(_PROJ_SWITCH)
        os.environ[_PROJ_SWITCH] = "YES"
        try:
            yield
        finally:
            if previous is None:
                del os.environ[_PROJ_SWITCH]
            else:
                os.environ[_PROJ_SWITCH] = previous
