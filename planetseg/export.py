"""The exported model: segmentation weights (safetensors) and a model card (JSON).

What leaves training is the detached :class:`~planetseg.model.SegmentationNet` only (encoder +
segmentation branch: no SR weights), stored so that loading never executes pickled code. The
card says what the model expects and what it was trained on (the cubes, ``training.cubes``;
``training.cube`` is the first of them); its ``digest`` (SHA-256 of the
weights file) is what later stages record as the model that made a product.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from planetseg import __version__
from planetseg.errors import CheckpointError
from planetseg.model import DSRLNet, NetConfig, SegmentationNet

WEIGHTS = "model.safetensors"
CARD = "model.json"


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def export_model(
    model: DSRLNet,
    net_config: NetConfig,
    out_dir: str | Path,
    *,
    data: Any,
    mean: list[float],
    std: list[float],
    degradation: Any,
    train_config: Any,
    metrics: dict[str, Any],
    runtime: dict[str, Any],
) -> Path:
    """Write the detached segmentation model and its card into ``out_dir``.

    ``runtime`` is how the training ran (device, precision, backend, world size), recorded
    under ``training.runtime``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seg = model.detach()
    weights = out / WEIGHTS
    save_file({k: v.contiguous() for k, v in seg.state_dict().items()}, str(weights))
    card = {
        "format": "planetseg-model/1",
        "planetseg": __version__,
        "digest": _digest(weights),
        "net": net_config.to_dict(),
        "bands": data.bands,
        "normalisation": {"mean": mean, "std": std},
        "classes": {str(k): v for k, v in sorted(data.classes.items())},
        "scale": net_config.scale,
        "input_resolution": data.resolution * net_config.scale,
        "output_resolution": data.resolution,
        "body": data.body,
        "degradation": dataclasses.asdict(degradation),
        "training": {
            "cube": data.stores[0],
            "cubes": data.stores,
            "git_commit": _git_commit(),
            "config": dataclasses.asdict(train_config),
            "runtime": runtime,
        },
        "metrics": {k: v for k, v in metrics.items() if k != "confusion"},
    }
    (out / CARD).write_text(json.dumps(card, indent=1))
    return out


def _files(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    card_path, weights = folder / CARD, folder / WEIGHTS
    if not card_path.exists() or not weights.exists():
        raise CheckpointError(f"{folder} is not an exported model (needs {CARD} and {WEIGHTS})")
    return card_path, weights


def read_card(path: str | Path) -> dict[str, Any]:
    """An exported model's card, checked for the keys later stages rely on (weights unread).

    Raises:
        CheckpointError: missing files or a damaged card.
    """
    card_path, _ = _files(path)
    try:
        card = json.loads(card_path.read_text())
        NetConfig(**card["net"])
        for key in ("digest", "bands", "classes", "scale", "normalisation"):
            card[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"model card {card_path} is damaged: {exc}") from exc
    return card


def load_model(path: str | Path) -> tuple[SegmentationNet, dict[str, Any]]:
    """Load an exported model (its directory or its card) without unpickling anything.

    Raises:
        CheckpointError: missing files, a digest that does not match the weights, or weights
            that do not fit the card's network.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card = read_card(path)
    card_path, weights = _files(path)
    net = SegmentationNet(NetConfig(**card["net"]))
    if _digest(weights) != card["digest"]:
        raise CheckpointError(f"{weights} does not match the digest in {card_path}: re-export it")
    try:
        net.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"weights {weights} do not fit the card's network: {exc}") from exc
    return net.eval(), card
