"""Workflow files: the shipped examples load; a bad file is one error naming key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from planetseg.config import PRODUCT_BLOCK
from planetseg.errors import WorkflowError
from planetseg.workflow import load_workflow, shipped_workflow

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"

GOOD = """\
catalog:
  catalog: world
  collections: [synthetic-moon]
cube:
  store: cube.zarr
  tile: 256
steps:
  ingest: {}
  segment:
    model: run/model
  diff:
    compare: baseline
    min_confidence: 0.7
  craters:
    reference: world/craters.csv
outputs: out
"""


@pytest.mark.parametrize("name", ["demo", "hirise", "sentinel-2"])
def test_shipped_workflows_load(name: str) -> None:
    flow = load_workflow(WORKFLOWS / f"{name}.yaml")
    assert flow.steps[:2] == ("ingest", "segment")
    assert Path(flow.segment.model).is_absolute() and Path(flow.ingest.out).is_absolute()


def test_paths_resolve_against_the_file_and_configs_are_the_stages(tmp_path: Path) -> None:
    (tmp_path / "world").mkdir()
    path = tmp_path / "flow.yaml"
    path.write_text(GOOD)
    flow = load_workflow(path)
    assert flow.name == "flow" and flow.steps == ("ingest", "segment", "diff", "craters")
    assert flow.search.catalog == str(tmp_path / "world")
    assert flow.search.collections == ("synthetic-moon",)
    assert flow.ingest.out == str(tmp_path / "cube.zarr") and flow.ingest.tile == 256
    assert flow.segment.model == str(tmp_path / "run" / "model")
    assert flow.segment.out == str(tmp_path / "out" / "labels.zarr")
    assert flow.diff.compare == "baseline" and flow.diff.min_confidence == 0.7
    assert flow.craters.reference == str(tmp_path / "world" / "craters.csv")
    assert flow.cluster.kind == "local"
    assert flow.diff.block == flow.craters.block == PRODUCT_BLOCK
    path.write_text(GOOD.replace("  craters:\n", "  craters:\n    block: 512\n").replace(
        "    compare: baseline\n", "    compare: baseline\n    block: 256\n"))  # fmt: skip
    flow = load_workflow(path)
    assert (flow.diff.block, flow.craters.block) == (256, 512)


def test_a_root_moves_every_relative_path_and_the_caller_can_set_it(tmp_path: Path) -> None:
    path = tmp_path / "flows" / "flow.yaml"
    path.parent.mkdir()
    (tmp_path / "data" / "world").mkdir(parents=True)
    path.write_text("root: ../data\n" + GOOD)
    flow = load_workflow(path)
    data = tmp_path / "data"
    assert flow.search.catalog == str(data / "world") and flow.ingest.out == str(data / "cube.zarr")
    assert flow.outputs == data / "out" and flow.path == path
    # The caller's root wins over the file's (the demo runs the shipped file in its own folder).
    other = load_workflow(path, root=tmp_path / "elsewhere")
    assert other.ingest.out == str(tmp_path / "elsewhere" / "cube.zarr")
    assert other.craters.reference == str(tmp_path / "elsewhere" / "world" / "craters.csv")


def test_the_shipped_demo_workflow_is_found_and_rooted_where_the_demo_runs(tmp_path: Path) -> None:
    assert shipped_workflow("demo") == WORKFLOWS / "demo.yaml"
    flow = load_workflow(shipped_workflow("demo"), root=tmp_path)
    assert flow.search.catalog == str(tmp_path / "unseen-world")
    assert flow.segment.model == str(tmp_path / "run" / "model")
    assert flow.outputs == tmp_path / "products"
    with pytest.raises(WorkflowError, match="nothing.yaml is missing"):
        shipped_workflow("nothing")


@pytest.mark.parametrize(
    ("old", "new", "line", "words"),
    [
        ("  tile: 256\n", "  tile: 256\n  tiles: 3\n", 7, ["cube.tiles", "unknown key"]),
        ("  tile: 256\n", "  tile: big\n", 6, ["cube.tile", "must be an integer", "'big'"]),
        ("  tile: 256\n", "  tile: 100\n", 4, ["cube", "--tile 100"]),
        ("    model: run/model\n", "    batch: 2\n", 9, ["steps.segment.model", "required"]),
        ("  ingest: {}\n", "  ingest: {}\n  train: {}\n", 9, ["steps.train", "unknown key"]),
        ("    compare: baseline\n", "    compare: last\n", 12, ["steps.diff.compare", "'last'"]),
        ("  collections: [synthetic-moon]\n", "  bbox: 10,20\n", 1, ["catalog", "bbox"]),
        ("outputs: out\n", "outputs: out\ncluster:\n  workers: 0\n", 17, ["cluster", "--workers"]),
        ("    min_confidence: 0.7\n", "    min_confidence: 2\n", 11, ["steps.diff", "0..1"]),
        ("    min_confidence: 0.7\n", "    block: 0\n", 11, ["steps.diff", "--block"]),
    ],
)
def test_bad_workflow_is_one_error_naming_file_line_and_key(
    tmp_path: Path, old: str, new: str, line: int, words: list[str]
) -> None:
    assert old in GOOD
    path = tmp_path / "flow.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(WorkflowError) as caught:
        load_workflow(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_diff_without_segment_and_broken_yaml_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(GOOD.replace("  segment:\n    model: run/model\n", ""))
    with pytest.raises(WorkflowError, match="steps.diff: needs the segment step"):
        load_workflow(path)
    path.write_text("catalog: [unclosed\n")
    with pytest.raises(WorkflowError, match="fix the YAML syntax"):
        load_workflow(path)
    with pytest.raises(WorkflowError, match="cannot be read"):
        load_workflow(tmp_path / "missing.yaml")
