"""Workflow files: the whole pipeline declared in YAML, checked on load.

A workflow names the catalog query, the cube, the steps with their settings, the cluster and
where outputs go. :func:`load_workflow` reads one into a :class:`Workflow` that holds the same
config dataclasses the CLI builds (:mod:`planetseg.config`), so a workflow's values are checked
exactly as the command line's are. Every problem is one
:class:`~planetseg.errors.WorkflowError` naming the file, the line and the key: an unknown key,
a value of the wrong type, a missing required key, a step planetseg does not know, or a value
its stage's config refuses. Relative paths resolve against the workflow's *root*: the file's
folder, or the folder its ``root`` key names (itself relative to the file), which
:func:`load_workflow` can also be given (``planetseg demo --out D`` runs the shipped demo workflow
with root ``D``).

::

    catalog:   {catalog, collections, bbox, datetime}       what to search
    cube:      {store, crs, resolution, tile, resampling, labels, ...}
    steps:     {ingest: {}, segment: {model, ...}, diff: {compare, ...}, craters: {...}}
    cluster:   {kind, workers, threads, jobs, config_file, host}
    outputs:   folder of the products (change maps, catalogs, run records)
    root:      folder the relative paths resolve against (default: the file's)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planetseg.config import (
    PRODUCT_BLOCK,
    ClusterConfig,
    CratersConfig,
    DiffConfig,
    IngestConfig,
    SearchConfig,
    SegmentConfig,
)
from planetseg.errors import PlanetsegError, WorkflowError

#: ``diff.compare``: each new epoch against the one before it, or against the first.
COMPARE = ("previous", "baseline")

_PATH = "path"  # a string resolved against the workflow's folder
_ANY = object()  # a value whose type the stage's config checks

#: Allowed keys of each section: key -> (type, required). Types are Python types, tuples of
#: them, ``_PATH`` or ``list``/``str`` lists; values are converted to the configs' fields below.
SCHEMA: dict[str, dict[str, tuple[Any, bool]]] = {
    "catalog": {
        "catalog": (_PATH, True),
        "collections": (list, False),
        "bbox": ((str, list), False),
        "datetime": (str, False),
        "max_items": (int, False),
    },
    "cube": {
        "store": (_PATH, True),
        "crs": (str, False),
        "resolution": ((int, float), False),
        "tile": (int, False),
        "bands": (list, False),
        "groupby": (str, False),
        "resampling": (str, False),
        "engine": (str, False),
        "labels": (_PATH, False),
        "fill_missing": (bool, False),
        "nodata": ((int, float), False),
    },
    "ingest": {},
    "segment": {
        "model": (_PATH, True),
        "batch": (int, False),
        "halo": (int, False),
        "torch_threads": (int, False),
        "cog": (bool, False),
        "any_body": (bool, False),
        "precision": (str, False),
    },
    "diff": {
        "compare": (str, False),
        "min_confidence": ((int, float), False),
        "min_area": ((int, float), False),
        "block": (int, False),
    },
    "craters": {
        "reference": (_PATH, False),
        "reference_min_km": ((int, float), False),
        "min_diameter": ((int, float), False),
        "min_confidence": ((int, float), False),
        "crater_class": (list, False),
        "craterstats": (bool, False),
        "block": (int, False),
    },
    "cluster": {
        "kind": (str, False),
        "workers": (int, False),
        "threads": (int, False),
        "jobs": (int, False),
        "config_file": (_PATH, False),
        "host": (str, False),
    },
}
TOP = {"name": (str, False), "root": (_PATH, False), "catalog": (dict, True),
       "cube": (dict, True), "steps": (dict, True), "cluster": (dict, False),
       "outputs": (_PATH, True)}  # fmt: skip
STEPS = ("ingest", "segment", "diff", "craters")


@dataclass(frozen=True)
class DiffStep:
    """The ``diff`` step: which epochs to compare, and the change filters.

    Attributes:
        compare: ``previous`` (each new epoch against the one before) or ``baseline`` (against
            the first epoch).
        min_confidence: As ``diff --min-confidence``.
        min_area_m2: As ``diff --min-area``.
        block: As ``diff --block``: how the map is computed, not what it holds.
    """

    compare: str = "previous"
    min_confidence: float = 0.0
    min_area_m2: float = 0.0
    block: int = PRODUCT_BLOCK


@dataclass(frozen=True)
class Workflow:
    """A checked workflow: the configs of its steps, paths absolute.

    Attributes:
        path: The workflow file.
        name: Its name (default: the file's stem).
        search: The catalog query.
        ingest: The cube (``out`` is the cube's store).
        segment: The segment step (``out`` is the labels store in ``outputs``), or None.
        diff: The diff step, or None.
        craters: The craters step (``out`` is the catalog in ``outputs``), or None.
        cluster: The cluster the run computes on.
        outputs: Folder of the labels store, the products and the run records.
        lines: Line of each dotted key in the file, for messages about its values.
    """

    path: Path
    name: str
    search: SearchConfig
    ingest: IngestConfig | None
    segment: SegmentConfig | None
    diff: DiffStep | None
    craters: CratersConfig | None
    cluster: ClusterConfig
    outputs: Path
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def error(self, key: str, message: str) -> WorkflowError:
        """A one-line error about ``key``'s value, naming the file and its line."""
        return WorkflowError(f"{self.path}:{self.lines.get(key, 1)}: {key}: {message}")

    def check_inputs(self) -> None:
        """Check what the workflow reads before a run writes anything (the model, for now).

        Raises:
            WorkflowError: the segment model is missing or damaged.
        """
        from planetseg.export import load_model

        if self.segment is None:
            return
        try:
            load_model(self.segment.model)
        except PlanetsegError as exc:
            raise self.error("steps.segment.model", str(exc)) from exc

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps the workflow runs, in order."""
        return tuple(s for s in STEPS if getattr(self, s) is not None)


def shipped_workflow(name: str) -> Path:
    """The workflow ``name`` shipped with planetseg (``demo``, ``hirise``, ``sentinel-2``).

    In a source checkout (an editable install) it is the checkout's ``workflows/NAME.yaml``; a
    wheel carries the same files as ``planetseg/workflows/``.

    Raises:
        WorkflowError: there is no such shipped workflow.
    """
    here = Path(__file__).resolve().parent
    for folder in (here.parent / "workflows", here / "workflows"):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise WorkflowError(
        f"the shipped workflow {name}.yaml is missing beside planetseg ({here}): reinstall "
        "planetseg from its source (pip install -e .)"
    )


def load_workflow(path: str | Path, *, root: str | Path | None = None) -> Workflow:
    """Read and check a workflow file.

    Args:
        path: The workflow file.
        root: Folder its relative paths resolve against, instead of its ``root`` key's (or,
            without one, the file's folder).

    Raises:
        WorkflowError: the file is missing or not YAML, or a key is unknown, of the wrong type,
            missing, or refused by its stage's config; the message names the file, line and key.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise WorkflowError(f"workflow {path} cannot be read: {exc.strerror}") from exc
    try:
        tree = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "not YAML"
        raise WorkflowError(f"{where}: {problem}: fix the YAML syntax") from exc
    return _Reader(path, root).workflow(tree)


class _Reader:
    """Turns the YAML node tree into a :class:`Workflow`, remembering lines for messages."""

    def __init__(self, path: Path, root: str | Path | None = None) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.root = None if root is None else Path(root).resolve()
        self.keys: dict[str, Any] = {}  # dotted key -> its YAML key node (for line numbers)

    def fail(self, node: Any, key: str, message: str) -> WorkflowError:
        """An error at ``key``'s own line if it was read, else at ``node``'s."""
        node = self.keys.get(key, node)
        line = node.start_mark.line + 1 if node is not None else 1
        return WorkflowError(f"{self.path}:{line}: {key}: {message}")

    def mapping(self, node: Any, key: str, allowed: dict[str, tuple[Any, bool]]) -> dict:
        """A mapping's values by key (nodes kept), unknown and missing keys refused."""
        import yaml

        if node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "~")):
            node_map: dict[str, tuple[Any, Any]] = {}
        elif not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, "must be a mapping of keys to values")
        else:
            node_map = {k.value: (k, v) for k, v in node.value}
            self.keys.update({_join(key, k.value): k for k, _ in node.value})
        for name, (knode, _) in node_map.items():
            if name not in allowed:
                known = ", ".join(allowed) or "none"
                raise self.fail(knode, _join(key, name), f"unknown key (known: {known})")
        for name, (_, required) in allowed.items():
            if required and name not in node_map:
                raise self.fail(self.keys.get(key, node), _join(key, name), "is required")
        return {
            name: (v, self.value(v, _join(key, name), allowed[name][0]))
            for name, (_, v) in node_map.items()
        }

    def value(self, node: Any, key: str, kind: Any) -> Any:
        import yaml

        if kind is dict:
            return node
        if kind is list:
            if isinstance(node, yaml.ScalarNode):
                return (self.scalar(node),)
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, key, "must be a list")
            return tuple(str(self.scalar(n)) for n in node.value)
        if isinstance(kind, tuple) and list in kind and isinstance(node, yaml.SequenceNode):
            return tuple(self.scalar(n) for n in node.value)
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, "must be a single value")
        value = self.scalar(node)
        if value is None:
            return None
        if kind is _PATH:
            if not isinstance(value, str):
                raise self.fail(node, key, "must be a path or name")
            return value
        types = kind if isinstance(kind, tuple) else (kind,)
        types = tuple(t for t in types if t is not list)
        if isinstance(value, bool) and bool not in types:
            raise self.fail(node, key, f"must be {_type_names(types)}, not {value}")
        if not isinstance(value, types):
            raise self.fail(node, key, f"must be {_type_names(types)}, not {node.value!r}")
        return value

    def scalar(self, node: Any) -> Any:
        import yaml

        return yaml.safe_load(yaml.serialize(node)) if node.tag else node.value

    def resolve(self, value: str | None, *, may_be_name: bool = False) -> str | None:
        """A path relative to the workflow's folder made absolute; URLs stay as they are.

        With ``may_be_name`` (a catalog), a bare word that is not a file beside the workflow
        stays a catalog name or data-set alias (``hirise``).
        """
        if value is None or "://" in value:
            return value
        candidate = Path(value).expanduser()
        if candidate.is_absolute():
            return str(candidate)
        bare = not any(c in value for c in "/\\.")
        if may_be_name and bare and not (self.base / value).exists():
            return value
        return os.path.normpath(self.base / candidate)

    def build(self, node: Any, key: str, make: Any, **fields: Any) -> Any:
        """``make(**fields)``, a config's refusal turned into a message naming ``key``."""
        try:
            return make(**{k: v for k, v in fields.items() if v is not None})
        except PlanetsegError as exc:
            raise self.fail(node, key, str(exc)) from exc

    def workflow(self, root: Any) -> Workflow:
        top = self.mapping(root, "", TOP)
        if self.root is not None:
            self.base = self.root
        elif "root" in top:
            self.base = Path(self.resolve(top["root"][1]) or self.base)
        sections = {name: self.mapping(top[name][1], name, SCHEMA[name])
                    for name in ("catalog", "cube") if name in top}  # fmt: skip
        steps_node = top["steps"][0]
        steps = self.mapping(steps_node, "steps", {s: (dict, False) for s in STEPS})
        if not steps:
            raise self.fail(steps_node, "steps", f"name at least one of {', '.join(STEPS)}")
        outputs = Path(self.resolve(top["outputs"][1]) or "")
        cat = sections["catalog"]
        cube = sections["cube"]
        get = _getter

        search = self.build(
            top["catalog"][0], "catalog", _search_config,
            catalog=self.resolve(get(cat, "catalog"), may_be_name=True),
            collections=get(cat, "collections") or (),
            bbox=_bbox(get(cat, "bbox")),
            datetime=get(cat, "datetime"),
            max_items=get(cat, "max_items"),
        )  # fmt: skip
        store = self.resolve(get(cube, "store"))
        ingest = None
        if "ingest" in steps:
            self.mapping(steps["ingest"][0], "steps.ingest", SCHEMA["ingest"])
            ingest = self.build(
                top["cube"][0], "cube", IngestConfig,
                out=store, bbox=search.bbox, crs=get(cube, "crs"),
                resolution=_float(get(cube, "resolution")), tile=get(cube, "tile"),
                bands=get(cube, "bands"), groupby=get(cube, "groupby"),
                resampling=get(cube, "resampling"), engine=get(cube, "engine"),
                labels=self.resolve(get(cube, "labels")), fill_missing=get(cube, "fill_missing"),
                nodata=_float(get(cube, "nodata")),
            )  # fmt: skip
        segment = None
        if "segment" in steps:
            seg_node = steps["segment"][0]
            seg = self.mapping(seg_node, "steps.segment", SCHEMA["segment"])
            segment = self.build(
                seg_node, "steps.segment", SegmentConfig,
                out=str(outputs / "labels.zarr"), model=self.resolve(get(seg, "model")),
                batch=get(seg, "batch"), halo=get(seg, "halo"),
                threads=get(seg, "torch_threads"),
                cog=str(outputs / "cogs") if get(seg, "cog") else None,
                any_body=get(seg, "any_body"), precision=get(seg, "precision"),
            )  # fmt: skip
        diff = None
        if "diff" in steps:
            diff_node = steps["diff"][0]
            d = self.mapping(diff_node, "steps.diff", SCHEMA["diff"])
            compare = get(d, "compare") or "previous"
            if compare not in COMPARE:
                raise self.fail(d["compare"][0], "steps.diff.compare",
                                f"{compare!r}: use {' or '.join(COMPARE)}")  # fmt: skip
            check = self.build(
                diff_node, "steps.diff", DiffConfig,
                out=str(outputs / "change"), before="0", after="1",
                min_confidence=_float(get(d, "min_confidence")),
                min_area_m2=_float(get(d, "min_area")), block=get(d, "block"),
            )  # fmt: skip
            diff = DiffStep(compare, check.min_confidence, check.min_area_m2, check.block)
        craters = None
        if "craters" in steps:
            cr_node = steps["craters"][0]
            cr = self.mapping(cr_node, "steps.craters", SCHEMA["craters"])
            craters = self.build(
                cr_node, "steps.craters", CratersConfig,
                out=str(outputs / "craters.parquet"),
                reference=self.resolve(get(cr, "reference")),
                min_diameter_px=_float(get(cr, "min_diameter")),
                min_confidence=_float(get(cr, "min_confidence")),
                reference_min_km=_float(get(cr, "reference_min_km")),
                crater_classes=get(cr, "crater_class"),
                craterstats=str(outputs / "craters.scc") if get(cr, "craterstats") else None,
                block=get(cr, "block"),
            )  # fmt: skip
        for name in ("diff", "craters"):
            if name in steps and segment is None:
                raise self.fail(steps[name][0], f"steps.{name}",
                                "needs the segment step, whose labels it reads")  # fmt: skip
        cluster_node = top.get("cluster", (None, None))[0]
        cl = self.mapping(cluster_node, "cluster", SCHEMA["cluster"])
        cluster = self.build(
            cluster_node, "cluster", _cluster_config,
            kind=get(cl, "kind"), workers=get(cl, "workers"), threads=get(cl, "threads"),
            jobs=get(cl, "jobs"), config_file=self.resolve(get(cl, "config_file")),
            host=get(cl, "host"),
        )  # fmt: skip
        name = get(top, "name") or self.path.stem
        lines = {key: node.start_mark.line + 1 for key, node in self.keys.items()}
        return Workflow(
            self.path, name, search, ingest, segment, diff, craters, cluster, outputs, lines
        )


def _search_config(**fields: Any) -> SearchConfig:
    from planetseg.search import parse_bbox

    parse_bbox(fields.get("bbox"))  # refused here, at load, rather than at run time
    return SearchConfig(**fields)


def _cluster_config(**fields: Any) -> ClusterConfig:
    from planetseg.cluster import check_kind

    config = ClusterConfig(**fields)
    check_kind(config.kind)
    return config


def _getter(section: dict[str, tuple[Any, Any]], key: str) -> Any:
    return section[key][1] if key in section else None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _bbox(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return value


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))
