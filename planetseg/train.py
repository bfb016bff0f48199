"""The ``train`` stage: the DSRL network on a cube, with torch DDP, checkpoints and export.

One process per device (gloo on CPU, NCCL on GPU). ``nproc > 1`` on one node is launched here
with ``torch.multiprocessing``; under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each process
simply joins the group torchrun made, so multi-node runs work the usual way.

Reproducible by construction: every rank's batch is a pure function of (seed, step, rank)
(:class:`~planetseg.data.WindowSampler`), algorithms are deterministic on the CPU, and a
checkpoint holds model, optimiser, scheduler, step and RNG states, so ``--resume`` continues
exactly where the run stopped. Rank 0 writes ``metrics.jsonl`` (losses per step, per-class
metrics per validation), ``checkpoint.pt``, and at the end the exported model
(:mod:`planetseg.export`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from planetseg.config import TrainConfig
from planetseg.data import CubeData, Degradation, Split, WindowSampler, open_cube, spatial_split
from planetseg.errors import CheckpointError, InvalidArgumentError
from planetseg.metrics import confusion_matrix, scores
from planetseg.model import DSRLNet, LossWeights, NetConfig, dsrl_loss
from planetseg.store import create_owned_dir, prepare_output

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(cube: str | Path, config: TrainConfig) -> Path:
    """Train on ``cube`` into ``config.out``; return the exported model's directory.

    Raises:
        PlanetsegError: bad cube (no labels, unfinished), bad settings (scale vs crop),
            unreadable checkpoint on ``resume``; an ``out`` that is a file, the cube, not
            writable, or a folder that train did not write (OutputPathError).
    """
    data = open_cube(cube)
    _validate(data, config)
    run = Path(config.out)
    prepare_output(run, "train", inputs=(cube,))
    if config.resume:
        _read_checkpoint(run / CHECKPOINT)  # fail here, in one line, before any process starts
    elif (run / CHECKPOINT).exists():
        raise InvalidArgumentError(
            f"{run} already holds a run: pass --resume to continue it, or choose another --out"
        )
    create_owned_dir(run, "train")
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), str(cube), config, None)
    elif config.nproc == 1:
        _worker(0, 1, str(cube), config, None)
    else:
        import torch.multiprocessing as mp

        port = _free_port()
        mp.spawn(
            _worker, args=(config.nproc, str(cube), config, port), nprocs=config.nproc, join=True
        )
    return run / "model"


def _validate(data: CubeData, config: TrainConfig) -> None:
    divisor = config.scale * 2 ** (config.depth - 1)
    if config.crop % divisor:
        raise InvalidArgumentError(
            f"--crop {config.crop} must be a multiple of scale x 2**(depth-1) = {divisor}"
        )
    if config.class_weights not in ("balanced", "none"):
        raise InvalidArgumentError(
            f"--class-weights must be balanced or none, got {config.class_weights!r}"
        )
    if config.nproc < 1:
        raise InvalidArgumentError(f"--nproc must be at least 1, got {config.nproc}")
    if config.batch_size % max(config.nproc, 1):
        raise InvalidArgumentError(
            f"--batch-size {config.batch_size} must be divisible by --nproc {config.nproc}"
        )


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} to resume from: drop --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}): delete it and restart "
            "without --resume"
        ) from exc


def _device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _worker(rank: int, world: int, cube: str, config: TrainConfig, port: int | None) -> None:
    """One training process (rank ``rank`` of ``world``)."""
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    device = _device(rank)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        init = f"tcp://127.0.0.1:{port}" if port is not None else "env://"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        train_loop(rank, world, open_cube(cube), config, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _build(data: CubeData, config: TrainConfig) -> tuple[DSRLNet, NetConfig]:
    net_config = NetConfig(
        in_bands=len(data.bands),
        num_classes=data.num_classes,
        scale=config.scale,
        width=config.width,
        depth=config.depth,
        head_channels=config.head_channels,
    )
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    return DSRLNet(net_config, with_sr=not config.no_sr), net_config


def train_loop(
    rank: int, world: int, data: CubeData, config: TrainConfig, device: torch.device
) -> DSRLNet:
    """The loop each rank runs (the process group, if any, is already initialised).

    Returns:
        The trained network (identical on every rank: DDP keeps them in step).
    """
    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    model, net_config = _build(data, config)
    split = spatial_split(data.image.shape[-1], config.val_fraction, multiple=config.crop)
    mean, std = data.band_stats(split.train)
    norm = (torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1))
    model.to(device)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    warmup = max(1, config.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
        ),
    )
    start = 0
    if config.resume:
        state = _read_checkpoint(run / CHECKPOINT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        if rank == 0:
            _truncate_metrics(run / METRICS, start)
    sampler = WindowSampler(data, split, crop=config.crop, seed=config.seed)
    degrade = Degradation(config.scale, config.psf_sigma, config.noise)
    weights = LossWeights(config.w_sr, config.w_fa, config.fa_subsample)
    class_weights = (
        torch.from_numpy(data.class_weights(split.train)).to(device)
        if config.class_weights == "balanced"
        else None
    )
    per_rank = config.batch_size // world
    log = (run / METRICS).open("a") if rank == 0 else None
    t0 = time.perf_counter()
    for step in range(start, config.steps):
        model.train()
        hr_np, labels_np = sampler.batch(step, rank, per_rank)
        hr = (torch.from_numpy(hr_np) - norm[0]) / norm[1]
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 101 + rank)
        lr = degrade(hr, gen)
        out = ddp(lr.to(device))
        losses = dsrl_loss(
            out, torch.from_numpy(labels_np).to(device), hr.to(device), weights, class_weights
        )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if log is not None:
            record = {
                "step": done,
                **{k: v.item() for k, v in losses.items()},
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": config.batch_size * (done - start) / (time.perf_counter() - t0),
            }
            if done % config.val_every == 0 or done == config.steps:
                record["val"] = validate(model, data, split, norm, degrade, device)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if done % config.checkpoint_every == 0 or done == config.steps:
            if rank == 0:
                _save_checkpoint(run / CHECKPOINT, model, optimizer, scheduler, done)
            if world > 1:
                dist.barrier()
    if log is not None:
        log.close()
    if rank == 0:
        from planetseg.export import export_model

        final = validate(model, data, split, norm, degrade, device)
        export_model(
            model,
            net_config,
            run / "model",
            data=data,
            mean=mean,
            std=std,
            degradation=degrade,
            train_config=config,
            metrics=final,
        )
    return model


def _save_checkpoint(path: Path, model: DSRLNet, optimizer: Any, scheduler: Any, step: int) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].tolist(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def validate(
    model: DSRLNet,
    data: CubeData,
    split: Split,
    norm: tuple[torch.Tensor, torch.Tensor],
    degrade: Degradation,
    device: torch.device,
) -> dict[str, Any]:
    """Per-class scores of ``model`` on the held-out strip (LR input, HR labels)."""
    from planetseg.evaluate import predict_logits

    model.eval()
    seg = model.seg.to("cpu")
    s = model.config.scale
    n = data.num_classes
    cm = np.zeros((n, n), np.int64)
    for t in range(data.image.shape[0]):
        hr = torch.from_numpy(data.image[t : t + 1, :, :, split.val])
        h, w = hr.shape[-2] - hr.shape[-2] % s, hr.shape[-1] - hr.shape[-1] % s
        pred = predict_logits(seg, degrade((hr[..., :h, :w] - norm[0]) / norm[1])).argmax(1)
        cm += confusion_matrix(data.labels[t, :h, split.val][:, :w], pred[0].numpy(), n)
    model.to(device)
    return scores(cm, data.classes)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint a resumed run restarts from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
