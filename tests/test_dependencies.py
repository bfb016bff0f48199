"""Every third-party module the package imports is a declared dependency, or behind an extra.

A module only the ``test`` extra pulls in works under ``pip install -e '.[test]'`` and fails a
user's ``pip install -e .`` minutes into a run: this reads the imports from the source, so it
fails as soon as one is added without being declared.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "planetseg"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[(]", spec.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_requirement_name(s) for s in project["dependencies"]}
    extras = {
        extra: {_requirement_name(s) for s in specs}
        for extra, specs in project.get("optional-dependencies", {}).items()
        if extra != "test"
    }
    return required, extras


def _guarded(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside ``try: ... except ImportError`` (an optional import)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        catches = {
            getattr(h.type, "id", None) or getattr(h.type, "attr", None) for h in node.handlers
        }
        if catches & {"ImportError", "ModuleNotFoundError"}:
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        lines.add(sub.lineno)
    return lines


def _imports() -> list[tuple[str, Path, int, bool]]:
    """(dotted module, file, line, guarded) of every absolute third-party import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "planetseg" or top == "__future__":
                    continue
                found.append((name, path, node.lineno, node.lineno in guarded))
    return found


@functools.cache
def _packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@functools.cache
def _distributions(module: str) -> set[str]:
    """The installed distributions that provide ``module`` (namespace packages: the subpackage)."""
    top = module.split(".")[0]
    candidates = _packages().get(top, [])
    if len(candidates) > 1 and "." in module:
        # A namespace package (odc.stac, odc.geo, ...): the distribution holding the subpackage.
        sub = "/".join(module.split(".")[:2]) + "/"
        holders = [
            d for d in candidates if any(str(f).startswith(sub) for f in metadata.files(d) or [])
        ]
        candidates = holders or candidates
    # Not installed (an extra's module): its import name, which is the distribution's here.
    return {_normalise(d) for d in candidates} or {_normalise(top)}


def test_every_third_party_import_is_declared() -> None:
    required, extras = _declared()
    optional = set().union(*extras.values())
    problems = []
    for module, path, line, guarded in _imports():
        where = f"{path.relative_to(ROOT)}:{line} imports {module}"
        dists = _distributions(module)
        if dists & required:
            continue
        if dists & optional:
            # An extra's module (maybe not installed here): it must sit behind a guarded import
            # that tells the user which extra to install.
            if not guarded:
                problems.append(f"{where}: optional module imported without an ImportError guard")
            continue
        problems.append(f"{where}: distribution {sorted(dists)} is not in [project.dependencies]")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "extra"), [("dask_cuda", "cuda"), ("planetary_computer", "planetary-computer")]
)
def test_optional_imports_name_their_extra(module: str, extra: str) -> None:
    """The guard around an extra's import tells the user the pip command that brings it."""
    _, extras = _declared()
    assert extra in extras
    users = [path for name, path, _, guarded in _imports() if name.split(".")[0] == module]
    assert users, f"no import of {module} left: drop the extra {extra}"
    for path in users:
        assert f"planetseg[{extra}]" in path.read_text(), f"{path} does not name the extra"


def test_benchmarks_import_only_names_the_package_has() -> None:
    """A benchmark is run by hand, so a name it imports that a refactor moved goes unnoticed.

    Every ``from planetseg... import name`` of ``benchmarks/`` must resolve (a name of the
    module, or a submodule), as its first run would find.
    """
    import importlib

    problems = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                "planetseg"
            ):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    problems.append(f"{path.name}:{node.lineno}: {node.module} has no {alias.name}")
    assert not problems, "\n".join(problems)
