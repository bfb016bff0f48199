"""Configuration of every stage, one frozen dataclass each.

The CLI and workflow files build these; the library functions take them. Values are validated
where they are used (e.g. :func:`planetseg.search.parse_bbox`), so a config built in Python and
one built from the command line are checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchConfig:
    """What to search and how patiently.

    Attributes:
        catalog: Catalog name, data-set alias, STAC API URL or local path
            (see :func:`planetseg.catalogs.resolve_catalog`).
        collections: Collection ids; empty means all (an alias adds its own).
        bbox: ``"W,S,E,N"`` or four numbers in the body's longitude/latitude (degrees), or None.
        datetime: RFC 3339 instant or interval (``A/B``, ``../B``, ``A/..``), or None.
        max_items: Stop after this many items; None for all.
        page_size: Items per page requested from an API.
        timeout: Seconds to wait for each HTTP connect/read before retrying.
        retries: Retries per request on timeouts, connection errors, 429 and 5xx.
        backoff: Backoff factor in seconds; retry ``k`` waits ``backoff * 2**(k-1)``.
    """

    catalog: str
    collections: tuple[str, ...] = ()
    bbox: str | tuple[float, float, float, float] | None = None
    datetime: str | None = None
    max_items: int | None = None
    page_size: int = 100
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5
