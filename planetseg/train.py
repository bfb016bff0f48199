"""The ``train`` stage: the DSRL network on a cube, with torch DDP, checkpoints and export.

One process per device (gloo on CPU, NCCL on GPU). ``nproc > 1`` on one node is launched here:
rank 0 runs in the calling process (so progress callbacks and signals need no plumbing), ranks
1.. in processes started with ``torch.multiprocessing``. Under ``torchrun`` (``RANK``/
``WORLD_SIZE`` set) each process simply joins the group torchrun made, so multi-node runs work
the usual way; only rank 0 reports progress, and every rank returns once the model is exported.

SIGINT and SIGTERM stop a run cleanly: the ranks agree on the signal at the next step boundary,
rank 0 checkpoints that step, and :class:`~planetseg.errors.TrainingInterrupted` says where
``--resume`` continues.

Reproducible by construction: every rank's batch is a pure function of (seed, step, rank)
(:class:`~planetseg.data.WindowSampler`), algorithms are deterministic on the CPU, and a
checkpoint holds model, optimiser, scheduler, step and RNG states, so ``--resume`` continues
exactly where the run stopped. Rank 0 writes ``metrics.jsonl`` (losses per step, per-class
metrics per validation), ``checkpoint.pt``, and at the end the exported model
(:mod:`planetseg.export`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from planetseg.config import TrainConfig
from planetseg.data import (
    Degradation,
    Photometric,
    TrainingData,
    WindowSampler,
    open_training_data,
    streamed_batches,
)
from planetseg.errors import CheckpointError, InvalidArgumentError, TrainingInterrupted
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


@dataclass(frozen=True)
class TrainProgress:
    """What rank 0 reports after every optimiser step.

    Attributes:
        step: Steps done.
        steps: Steps of the whole run.
        losses: This step's losses: ``loss`` and ``ce``, plus ``mse`` and ``fa`` with the SR
            branch.
        steps_per_s: Steps per second since this process started (or resumed) training.
    """

    step: int
    steps: int
    losses: dict[str, float]
    steps_per_s: float


Progress = Callable[[TrainProgress], None]


def distributed_env() -> tuple[int, int] | None:
    """``(rank, world size)`` of this process when torchrun launched it, else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def train(
    cubes: str | Path | Sequence[str | Path], config: TrainConfig, progress: Progress | None = None
) -> Path:
    """Train on ``cubes`` into ``config.out``; return the exported model's directory.

    Windows are streamed from the cubes' stores (:func:`~planetseg.data.streamed_batches`);
    their statistics are read once, chunk by chunk, before any rank starts.

    Args:
        cubes: A complete cube with labels, or several (or folders of them) of one body with
            the same bands and classes.
        config: The run's settings.
        progress: Called by rank 0 after every step (in this process, whichever the rank
            layout); None for silence.

    Raises:
        PlanetsegError: bad cube (no labels, unfinished, of another body, bands or classes
            than the first), bad settings (scale vs crop),
            unreadable checkpoint on ``resume``; an ``out`` that is a file, the cube, not
            writable, or a folder that train did not write (OutputPathError).
        TrainingInterrupted: SIGINT or SIGTERM stopped the run (after a checkpoint).
    """
    paths = [cubes] if isinstance(cubes, str | Path) else list(cubes)
    data = open_training_data(paths, crop=config.crop, val_fraction=config.val_fraction)
    torchrun = distributed_env()
    _validate(data, config, torchrun[1] if torchrun else config.nproc)
    if torchrun and config.nproc != 1:
        raise InvalidArgumentError(
            f"--nproc {config.nproc} under torchrun: torchrun starts the processes "
            "(--nproc-per-node), drop --nproc"
        )
    run = Path(config.out)
    prepare_output(run, "train", inputs=tuple(paths))
    if config.resume:
        # Fail here, in one line, before any process starts.
        _check_resume(_read_checkpoint(run / CHECKPOINT), data, config)
    elif (run / CHECKPOINT).exists():
        raise InvalidArgumentError(
            f"{run} already holds a run: pass --resume to continue it, or choose another --out"
        )
    create_owned_dir(run, "train")
    if torchrun or config.nproc == 1:  # this process is one rank: torchrun's, or the only one
        rank, world = torchrun or (0, 1)
        with _stop_on_signals() as stop:
            _worker(rank, world, data, config, None, progress, stop)
    else:
        _run_ranks(data, config, progress)
    return run / "model"


def _run_ranks(data: TrainingData, config: TrainConfig, progress: Progress | None) -> None:
    """``config.nproc`` ranks on this node: rank 0 here, the others in new processes."""
    import torch.multiprocessing as mp

    port = _free_port()
    # The new processes ignore SIGINT and SIGTERM until their own handlers are in place, so a
    # Ctrl-C while they start cannot kill one outside the step boundaries the ranks agree on.
    with _signals_ignored():
        ranks = mp.start_processes(
            _spawned, args=(config.nproc, data, config, port), nprocs=config.nproc - 1, join=False
        )
    try:
        with _stop_on_signals() as stop:
            _worker(0, config.nproc, data, config, port, progress, stop)
    except TrainingInterrupted:
        _join(ranks)  # they stop at the same step
        raise
    except BaseException:
        # A failed rank breaks rank 0's collectives: its own error is the one to report.
        ranks.join(timeout=10)
        for process in ranks.processes:
            process.kill()
        raise
    _join(ranks)


def _join(ranks: Any) -> None:
    while not ranks.join():
        pass


def _spawned(index: int, world: int, data: TrainingData, config: TrainConfig, port: int) -> None:
    """Rank ``index + 1`` in a process of its own; a clean stop is not a failure."""
    with _stop_on_signals() as stop:
        try:
            _worker(index + 1, world, data, config, port, None, stop)
        except TrainingInterrupted:
            pass


class _StopSignal:
    """The first SIGINT/SIGTERM this process received (0: none); set by a signal handler."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_on_signals() -> Iterator[_StopSignal]:
    """Turn SIGINT/SIGTERM into a stop request for the training loop, for the block's span.

    Signal handlers can only be set from the main thread; elsewhere the request never comes.
    """
    stop = _StopSignal()
    with _handling_signals(stop):
        yield stop


@contextmanager
def _signals_ignored() -> Iterator[None]:
    with _handling_signals(signal.SIG_IGN):
        yield


@contextmanager
def _handling_signals(handler: Any) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM in the block (main thread only), then the previous."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _agreed_stop(stop: _StopSignal | None, world: int, device: torch.device) -> int:
    """The signal any rank received (0: none): every rank calls this at every step boundary."""
    signum = stop.signum if stop is not None else 0
    if world == 1:
        return signum
    flag = torch.tensor([signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _validate(data: TrainingData, config: TrainConfig, world: int) -> None:
    """The checks that need the process count (the config and the cubes checked their own)."""
    if config.batch_size % world:
        processes = f"--nproc {world}" if world == config.nproc else f"WORLD_SIZE {world}"
        raise InvalidArgumentError(
            f"--batch-size {config.batch_size} must be divisible by the {processes} processes"
        )


#: The settings a checkpoint's weights depend on, and their flags: a resumed run keeps them.
ARCHITECTURE = {
    "scale": "--scale",
    "width": "--width",
    "depth": "--depth",
    "head_channels": "head_channels",
    "no_sr": "--no-sr",
}


def _setting(flag: str, value: Any) -> str:
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def _check_resume(state: dict[str, Any], data: TrainingData, config: TrainConfig) -> None:
    """Refuse to resume a checkpoint with settings or a cube its weights do not fit.

    Raises:
        InvalidArgumentError: a network setting (``--scale``, ``--width``, ...) differs from
            the run's.
        CheckpointError: the cube's bands differ from the run's, or the checkpoint's weights
            do not fit the network these settings build.
    """
    run = Path(config.out)
    saved = state.get("config") or {}
    for name, flag in ARCHITECTURE.items():
        if name in saved and saved[name] != getattr(config, name):
            raise InvalidArgumentError(
                f"--resume: the run in {run} used {_setting(flag, saved[name])}, not "
                f"{_setting(flag, getattr(config, name))}: resume with the run's settings, or "
                "choose another --out for a new run"
            )
    bands = state.get("bands")
    if bands is not None and list(bands) != data.bands:
        raise CheckpointError(
            f"--resume: the run in {run} was trained on bands {list(bands)} and this cube has "
            f"{data.bands}: resume on the run's cubes, or choose another --out for a new run"
        )
    model, _ = _build(data, config)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.get("model", {}).items()}
    if wanted != found:
        raise CheckpointError(
            f"--resume: the checkpoint in {run} holds a network that these settings and this "
            "cube do not build (--scale, --width, --depth, --no-sr, bands or classes differ): "
            "resume with the run's settings and cube, or choose another --out"
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


def _worker(
    rank: int,
    world: int,
    data: TrainingData,
    config: TrainConfig,
    port: int | None,
    progress: Progress | None = None,
    stop: _StopSignal | None = None,
) -> None:
    """One training process (rank ``rank`` of ``world``)."""
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    device = _device(rank)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        init = f"tcp://127.0.0.1:{port}" if port is not None else "env://"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        train_loop(rank, world, data, config, device, progress=progress, stop=stop)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _build(data: TrainingData, config: TrainConfig) -> tuple[DSRLNet, NetConfig]:
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
    rank: int,
    world: int,
    data: TrainingData,
    config: TrainConfig,
    device: torch.device,
    progress: Progress | None = None,
    stop: _StopSignal | None = None,
) -> DSRLNet:
    """The loop each rank runs (the process group, if any, is already initialised).

    Args:
        rank: This process's rank.
        world: Number of ranks.
        data: The training cubes (windows are read from their stores).
        config: The run's settings.
        device: This rank's device.
        progress: Called on rank 0 after every step.
        stop: This process's stop request; at each step boundary the ranks agree on whether
            any of them received one.

    Returns:
        The trained network (identical on every rank: DDP keeps them in step), once rank 0
        has exported it.

    Raises:
        TrainingInterrupted: a rank received SIGINT/SIGTERM; the step reached is checkpointed.
    """
    run = Path(config.out)
    run.mkdir(parents=True, exist_ok=True)
    model, net_config = _build(data, config)
    mean, std = data.stats.mean, data.stats.std
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
    sampler = WindowSampler(
        data, crop=config.crop, seed=config.seed, foreground=config.foreground_windows
    )
    degrade = Degradation(config.scale, config.psf_sigma, config.noise)
    jitter = Photometric() if config.augment == "photometric" else None
    weights = LossWeights(
        config.w_sr, config.w_fa, config.fa_subsample, dice=1.0 if config.loss == "ce+dice" else 0.0
    )
    class_weights = data.loss_weights(config.class_weights)
    if class_weights is not None:
        class_weights = torch.from_numpy(class_weights).to(device)
    per_rank = config.batch_size // world
    batches = streamed_batches(
        sampler, rank, per_rank, range(start, config.steps), config.loader_workers
    )
    log = (run / METRICS).open("a") if rank == 0 else None
    t0 = time.perf_counter()
    saved = start if config.resume else None
    for step in range(start, config.steps):
        signum = _agreed_stop(stop, world, device)
        if signum:
            if rank == 0 and saved != step:
                _save_checkpoint(
                    run / CHECKPOINT, model, optimizer, scheduler, step, config, data.bands
                )
            if world > 1:
                dist.barrier()  # nobody leaves before the checkpoint is on disk
            if log is not None:
                log.close()
            batches.close()
            raise TrainingInterrupted(
                f"interrupted at step {step} of {config.steps} ({signal.Signals(signum).name}); "
                f"{run / CHECKPOINT} holds that step to resume from",
                step,
                signum,
            )
        model.train()
        hr_raw, labels = next(batches)
        hr = (hr_raw - norm[0]) / norm[1]
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 101 + rank)
        if jitter is not None:
            hr = jitter(hr, gen)  # input and SR target alike: the window as another sensor saw it
        lr = degrade(hr, gen)
        out = ddp(lr.to(device))
        losses = dsrl_loss(
            out, labels.to(device, torch.int64), hr.to(device), weights, class_weights
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
                record["val"] = validate(model, data, norm, degrade, device)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress is not None:
                rate = (done - start) / (time.perf_counter() - t0)
                losses_now = {k: v for k, v in record.items() if k in losses}
                progress(TrainProgress(done, config.steps, losses_now, rate))
        if done % config.checkpoint_every == 0 or done == config.steps:
            if rank == 0:
                _save_checkpoint(
                    run / CHECKPOINT, model, optimizer, scheduler, done, config, data.bands
                )
            saved = done
            if world > 1:
                dist.barrier()
    if log is not None:
        log.close()
    batches.close()
    if rank == 0:
        from planetseg.export import export_model

        final = validate(model, data, norm, degrade, device)
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
    if world > 1:
        dist.barrier()  # under torchrun every rank's caller may read the export next
    return model


def _save_checkpoint(
    path: Path,
    model: DSRLNet,
    optimizer: Any,
    scheduler: Any,
    step: int,
    config: TrainConfig,
    bands: list[str],
) -> None:
    """Write the run's state, with the settings and bands a resumed run is checked against."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].tolist(),
        "config": dataclasses.asdict(config),
        "bands": list(bands),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def validate(
    model: DSRLNet,
    data: TrainingData,
    norm: tuple[torch.Tensor, torch.Tensor],
    degrade: Degradation,
    device: torch.device,
) -> dict[str, Any]:
    """Per-class scores of ``model`` on the held-out strips (LR input, HR labels)."""
    from planetseg.evaluate import predict_logits

    model.eval()
    seg = model.seg.to("cpu")
    s = model.config.scale
    n = data.num_classes
    cm = np.zeros((n, n), np.int64)
    for part in data.validation_parts():
        image, labels = data.validation_strip(part)
        hr = torch.from_numpy(image)
        h, w = hr.shape[-2] - hr.shape[-2] % s, hr.shape[-1] - hr.shape[-1] % s
        pred = predict_logits(seg, degrade((hr[..., :h, :w] - norm[0]) / norm[1])).argmax(1)
        cm += confusion_matrix(labels[:h, :w], pred[0].numpy(), n)
    model.to(device)
    return scores(cm, data.classes)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint a resumed run restarts from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
