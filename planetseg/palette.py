"""The one definition of the colours planetseg's label products are drawn in.

Label COGs (``segment --cog``), the change COGs of ``diff`` and the change quick look all take
their colours from here, so a class looks the same in QGIS as in ``quicklook.png``. Colours are
8-bit RGBA tuples, as a GDAL colour table holds them; :func:`as_float` gives matplotlib's form.

Classes get the tab10 palette by value (class ``k`` is entry ``k % 10``); the change colours are
chosen outside it: magenta for a change, two greys for what is not one.
"""

from __future__ import annotations

from collections.abc import Mapping

RGBA = tuple[int, int, int, int]

#: matplotlib's tab10, as 8-bit RGBA (written out so the COG writer needs no matplotlib).
TAB10: tuple[RGBA, ...] = (
    (31, 119, 180, 255),
    (255, 127, 14, 255),
    (44, 160, 44, 255),
    (214, 39, 40, 255),
    (148, 103, 189, 255),
    (140, 86, 75, 255),
    (227, 119, 194, 255),
    (127, 127, 127, 255),
    (188, 189, 34, 255),
    (23, 190, 207, 255),
)

#: A pixel whose class changed (kept by the filters).
CHANGED: RGBA = (255, 0, 255, 255)
#: A pixel whose class is the same in both epochs.
UNCHANGED: RGBA = (224, 224, 224, 255)
#: A pixel whose class differs but whose change the confidence or area filter dropped.
DROPPED: RGBA = (64, 64, 64, 255)
#: No data: fully transparent.
NODATA: RGBA = (0, 0, 0, 0)

CHANGE_LABELS: dict[RGBA, str] = {
    CHANGED: "changed",
    UNCHANGED: "unchanged",
    DROPPED: "differs, dropped by --min-confidence / --min-area",
}


def class_color(value: int) -> RGBA:
    """The colour of class ``value``."""
    return TAB10[value % len(TAB10)]


def class_colormap(classes: Mapping[int, str]) -> dict[int, RGBA]:
    """Class value -> colour, for every class of ``classes``."""
    return {int(k): class_color(int(k)) for k in classes}


def as_float(color: RGBA) -> tuple[float, float, float, float]:
    """An 8-bit RGBA colour as matplotlib's 0..1 floats."""
    r, g, b, a = color
    return r / 255, g / 255, b / 255, a / 255


def class_tags(names: Mapping[int, str]) -> dict[str, str]:
    """GeoTIFF metadata naming the values of a label raster.

    ``CLASS_NAMES`` lists ``value:name`` pairs (comma-separated, by value) and ``CLASS_<v>``
    names each value on its own, so both ``gdalinfo`` readers and scripts find them.
    """
    order = sorted(int(k) for k in names)
    tags = {"CLASS_NAMES": ",".join(f"{v}:{names[v]}" for v in order)}
    tags.update({f"CLASS_{v}": names[v] for v in order})
    return tags
