"""``planetseg info``: what a store, a model or a product folder is, from its metadata.

:func:`describe` recognises a cube (``ingest``), a labels store (``segment``), an exported
model (``train``) and a change folder (``diff``), and returns a JSON-able dict: the kind, the
shape and grid (resolution, bounds), the CRS and body, the times, the bands or classes,
whether it is complete (and, for an unfinished store, the work without a marker), its
provenance and the model digest. Only metadata is read; ``verify=True`` also lists every
array's chunks (a full listing) and reports the ones missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from planetseg.bodies import body_of_crs, parse_crs
from planetseg.errors import CatalogReadError
from planetseg.store import EVERY_CHUNK, done_markers, missing_chunks, transform_from_cf

#: Missing tiles, tasks or chunks listed by name (the rest are counted).
SHOWN = 10
#: Fields :func:`summary` prints on one line (other dicts get a line per key).
_ONE_LINE = ("shape", "classes", "items", "search")


def describe(path: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """What ``path`` is: a cube, a labels store, an exported model or a change folder.

    Args:
        path: The store or folder.
        verify: Also list every chunk of a store and report the missing ones.

    Raises:
        CatalogReadError: ``path`` is none of these.
    """
    path = Path(path)
    if (path / "zarr.json").is_file():
        import zarr

        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except (OSError, ValueError, KeyError) as exc:
            raise CatalogReadError(f"{path}: unreadable zarr store ({exc})") from exc
        if "planetseg:plan" in attrs:
            return _cube(path, attrs, verify)
        if attrs.get("planetseg:product") == "labels":
            return _labels(path, attrs, verify)
    elif (path / "model.json").is_file():
        return _model(path)
    elif (path / "items.ndjson").is_file():
        change = _change(path)
        if change is not None:
            return change
    raise CatalogReadError(
        f"{path} is not a planetseg store: give a cube (ingest), a labels store (segment), "
        "a model folder (train) or a change folder (diff)"
    )


def _grid(path: Path, array: str) -> dict[str, Any]:
    """Shape, CRS, body, resolution and bounds of a store's ``array`` on its ``spatial_ref``."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    sref = dict(group["spatial_ref"].attrs)
    node = group[array]
    crs = parse_crs(str(sref["crs_wkt"]))
    a, _, c, _, e, f = transform_from_cf(sref)
    h, w = node.shape[-2:]
    auth = crs.to_authority(min_confidence=90)
    return {
        "shape": dict(zip(_dims(node), node.shape, strict=True)),
        "dtype": str(node.dtype),
        "crs": crs.name,
        "crs_code": f"{auth[0]}:{auth[1]}" if auth else None,
        "body": body_of_crs(crs).name,
        "resolution": [abs(a), abs(e)],
        "bounds": [c, f + e * h, c + a * w, f],
        "tile": int(node.chunks[-1]),
    }


def _dims(node: Any) -> list[str]:
    return list(node.metadata.dimension_names or [f"dim_{i}" for i in range(node.ndim)])


def _missing(names: list[str]) -> dict[str, Any]:
    return {"count": len(names), "first": names[:SHOWN]}


def _verify(path: Path, attrs: dict[str, Any], arrays: list[str]) -> dict[str, Any]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    report: dict[str, Any] = {"every_chunk_written": bool(attrs.get(EVERY_CHUNK))}
    for name in arrays:
        encode = group[name].metadata.encode_chunk_key
        report[name] = _missing([f"{name}/{encode(c)}" for c in missing_chunks(path, name)])
    return report


def _cube(path: Path, attrs: dict[str, Any], verify: bool) -> dict[str, Any]:
    from planetseg.ingest import CubePlan, tile_marker, unfinished_tiles

    plan = CubePlan.from_json(attrs["planetseg:plan"])
    complete = bool(attrs.get("planetseg:complete"))
    info: dict[str, Any] = {
        "kind": "cube",
        "path": str(path),
        "complete": complete,
        **_grid(path, "image"),
        "times": [t.datetime for t in plan.times],
        "bands": plan.band_names,
        "labels": bool(plan.label_asset or plan.label_source),
        "classes": json.loads(attrs.get("planetseg:classes") or "{}"),
        "provenance": {
            "items": attrs.get("planetseg:items", {}),
            "search": json.loads(attrs.get("planetseg:provenance") or "{}"),
            "engine": attrs.get("planetseg:engine"),
            "version": attrs.get("planetseg:version"),
        },
    }
    if not complete:
        done = done_markers(path)
        todo = unfinished_tiles(
            plan,
            int(attrs.get("planetseg:times_done", 0)),
            bool(attrs.get("planetseg:static_done", True)),
        )
        names = [tile_marker(*k) for k in todo]
        info["missing_tiles"] = _missing([n for n in names if n not in done])
    if verify:
        info["verify"] = _verify(path, attrs, ["image", *(["labels"] if info["labels"] else [])])
    return info


def _labels(path: Path, attrs: dict[str, Any], verify: bool) -> dict[str, Any]:
    from planetseg.segment import SegmentPlan, task_marker

    plan = SegmentPlan.from_json(attrs["planetseg:segment"])
    complete = bool(attrs.get("planetseg:complete"))
    info: dict[str, Any] = {
        "kind": "labels",
        "path": str(path),
        "complete": complete,
        **_grid(path, "labels"),
        "times": list(plan.time_values),
        "classes": plan.classes,
        "scale": plan.scale,
        "model_digest": attrs.get("planetseg:model"),
        "provenance": {
            "cube": attrs.get("planetseg:cube"),
            "model": plan.model,
            "items": json.loads(attrs.get("planetseg:cube_items") or "{}"),
            "version": attrs.get("planetseg:version"),
        },
    }
    if not complete:
        done = done_markers(path)
        info["missing_tasks"] = _missing(
            [task_marker(i) for i in range(plan.n_tasks) if task_marker(i) not in done]
        )
    if verify:
        written = [name for name in plan.output_arrays if (path / name).is_dir()]
        info["verify"] = _verify(path, attrs, written)
    return info


def _model(path: Path) -> dict[str, Any]:
    from planetseg.export import read_card

    card = read_card(path)
    metrics = card.get("metrics") or {}
    return {
        "kind": "model",
        "path": str(path),
        "complete": (path / "model.safetensors").is_file(),
        "model_digest": card["digest"],
        "body": card.get("body"),
        "bands": card["bands"],
        "classes": card["classes"],
        "scale": card["scale"],
        "resolution": [card.get("input_resolution"), card.get("output_resolution")],
        "miou": metrics.get("miou"),
        "provenance": {
            "cube": card.get("training", {}).get("cube"),
            "cubes": card.get("training", {}).get("cubes"),
            "git_commit": card.get("training", {}).get("git_commit"),
            "version": card.get("planetseg"),
        },
    }


def _change(path: Path) -> dict[str, Any] | None:
    from planetseg.items import read_items

    items = [
        it
        for it in read_items(path / "items.ndjson")
        if it["properties"].get("planetseg:product") == "change"
    ]
    if not items:
        return None
    props = items[0]["properties"]
    crs = parse_crs(props["proj:wkt2"]) if props.get("proj:wkt2") else None
    missing = [
        k for k, a in items[0]["assets"].items() if not (path / Path(a["href"]).name).is_file()
    ]
    return {
        "kind": "change",
        "path": str(path),
        "complete": not missing,
        "missing_files": missing,
        "crs": crs.name if crs else None,
        "crs_code": props.get("proj:code"),
        "body": props.get("planetseg:body"),
        "shape": props.get("proj:shape"),
        "bounds": props.get("proj:bbox"),
        "times": [props.get("start_datetime"), props.get("end_datetime")],
        "changed_km2": props.get("planetseg:changed_km2"),
        "model_digest": props.get("planetseg:models"),
        "provenance": {"labels": props.get("planetseg:labels")},
    }


def summary(info: dict[str, Any]) -> list[str]:
    """Lines for people: the fields of :func:`describe`, one a line, nested ones indented."""
    lines = [f"{info['path']}: planetseg {info['kind']}"]
    fields = {k: v for k, v in info.items() if k not in ("path", "kind")}
    lines += _lines(fields, "  ")
    return lines


def _lines(fields: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for key, value in fields.items():
        if key == "bounds" and value:
            value = ", ".join(f"{v:.6g}" for v in value)
        elif key == "resolution" and value:
            value = " x ".join("-" if v is None else f"{v:.6g}" for v in value)
        elif key == "miou" and isinstance(value, float) and not math.isnan(value):
            value = f"{100 * value:.1f} %"
        elif isinstance(value, dict) and key not in _ONE_LINE:
            lines.append(f"{indent}{key}:")
            lines += _lines(value, indent + "  ")
            continue
        if isinstance(value, (dict, list)):
            text = json.dumps(value)
            value = text if len(text) <= 200 else text[:197] + "..."
        lines.append(f"{indent}{key}: {value}")
    return lines
