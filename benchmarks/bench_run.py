"""What `planetseg run` costs over calling the stages directly, and how fast `--plan` is.

1. Overhead: the same work (ingest the world's epochs at 2x coarser resolution, segment every
   time step, diff each epoch against the previous one, a crater catalog per epoch) done by
   calling the stage functions directly and by `run_workflow` on a workflow saying the same,
   alternated `--repeats` times in this one process; prints the median ratio run / direct.
2. `--plan` on a catalog of `--items` items (default 10,000): seconds for a workflow that never
   ran, and for one whose ledger holds every item as done.

    python benchmarks/bench_run.py --size 512 --repeats 3 --items 10000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu  # noqa: E402

FLOW = """\
catalog:
  catalog: {catalog}
cube:
  store: {root}/cube.zarr
  resolution: {resolution}
  resampling: average
  tile: 128
steps:
  ingest: {{}}
  segment:
    model: {model}
  diff:
    compare: previous
  craters:
    min_diameter: 3
cluster:
  kind: none
outputs: {root}/out
"""


def direct(work: Path, flow) -> float:  # noqa: ANN001 - a Workflow
    from planetseg.config import DiffConfig
    from planetseg.craters import craters
    from planetseg.diff import diff
    from planetseg.ingest import ingest
    from planetseg.search import search
    from planetseg.segment import segment

    t0 = time.perf_counter()
    found = search(flow.search)
    cube = ingest(found.items, replace(flow.ingest, out=str(work / "cube.zarr")))
    stores = []
    for n in range(len(cube.plan.times)):
        out = work / f"labels-{n}.zarr"
        segment(cube.store, replace(flow.segment, out=str(out), times=(str(n),)))
        stores.append(out)
    for n in range(1, len(stores)):
        diff(stores[n - 1], DiffConfig(out=str(work / f"change-{n}"), before="0", after="0",
                                       other=str(stores[n])))  # fmt: skip
    for n, store in enumerate(stores):
        craters(store, replace(flow.craters, out=str(work / f"craters-{n}.parquet")))
    return time.perf_counter() - t0


def workflow(work: Path, catalog: Path, model: Path):  # noqa: ANN201 - a Workflow
    from planetseg.workflow import load_workflow

    path = work / "flow.yaml"
    path.write_text(FLOW.format(catalog=catalog, root=work, resolution=1.0, model=model))
    return load_workflow(path)


def via_run(flow) -> float:  # noqa: ANN001 - a Workflow
    from planetseg.run import run_workflow

    t0 = time.perf_counter()
    result = run_workflow(flow)
    assert not result.failed, result.errors
    return time.perf_counter() - t0


def plan_many(root: Path, world, model: Path, n: int) -> tuple[float, float]:  # noqa: ANN001
    from planetseg.items import read_items, write_items
    from planetseg.run import Ledger, _ingest_units, plan_run

    base = read_items(world.items)[0]
    items = []
    for k in range(n):
        it = {**base, "id": f"scene-{k:06d}", "properties": dict(base["properties"])}
        it["properties"]["datetime"] = f"{2000 + k // 8760:04d}-01-01T00:00:00Z"
        items.append(it)
    catalog = root / "many.ndjson"
    write_items(items, catalog)
    (root / "many").mkdir()
    flow = workflow(root / "many", catalog, model)
    t0 = time.perf_counter()
    _, units = plan_run(flow)
    fresh = time.perf_counter() - t0
    assert len(units) == n
    (root / "many" / "out").mkdir()
    ledger = Ledger(root / "many" / "out" / "ledger.sqlite")
    for unit in _ingest_units(flow, ledger, items, False):
        ledger.db.execute(
            "INSERT OR REPLACE INTO work VALUES (?, ?, ?, 'done', 0, NULL, '')",
            (unit.step, unit.unit, unit.fingerprint),
        )
    ledger.db.commit()
    ledger.close()
    t0 = time.perf_counter()
    _, units = plan_run(flow)
    known = time.perf_counter() - t0
    assert not any(u.reason for u in units)
    return fresh, known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from planetseg.config import IngestConfig, TrainConfig
    from planetseg.ingest import ingest
    from planetseg.synthetic import SynthConfig, synthesize
    from planetseg.train import train

    root = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        world = synthesize(root / "world", config=SynthConfig(size=args.size, seed=3))
        hr = ingest(world.items, IngestConfig(out=str(root / "hr.zarr"), labels="labels"))
        model = train(hr.store, TrainConfig(out=str(root / "train"), steps=args.steps,
                                            width=8, depth=2, crop=64, batch_size=4))  # fmt: skip
        warm = root / "warm-up"  # imports, GDAL and the model cache, counted for neither
        warm.mkdir()
        direct(warm, workflow(warm, world.items, model))
        ratios = []
        for k in range(args.repeats):
            a, b = root / f"direct-{k}", root / f"run-{k}"
            a.mkdir()
            b.mkdir()
            if k % 2:  # alternate which goes first
                t_run = via_run(workflow(b, world.items, model))
                t_direct = direct(a, workflow(a, world.items, model))
            else:
                t_direct = direct(a, workflow(a, world.items, model))
                t_run = via_run(workflow(b, world.items, model))
            ratios.append(t_run / t_direct)
            print(f"repeat {k}: direct {t_direct:.2f} s, run {t_run:.2f} s, "
                  f"ratio {t_run / t_direct:.3f}")  # fmt: skip
        print(f"CPU: {cpu()}")
        print(f"overhead of planetseg run over the stages called directly, {args.size} px world, "
              f"3 epochs: median ratio {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")  # fmt: skip
        fresh, known = plan_many(root, world, model, args.items)
        print(f"--plan over {args.items:,} items: {fresh:.2f} s for a workflow that never ran, "
              f"{known:.2f} s with every item done in the ledger")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
