"""The ``train`` stage: the DSRL network on a cube, with torch DDP, checkpoints and export.

One process per device (gloo on CPU, NCCL on GPU: rank ``r`` of ``--nproc`` on ``cuda:r``, under
torchrun ``cuda:LOCAL_RANK``). ``nproc > 1`` on one node is launched here:
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
(:mod:`planetseg.export`). Every rank validates its share of the held-out strip
(:func:`validate`), so none waits for the others toward the collectives' timeout.

``--amp`` autocasts the training step's forward pass (bf16, or fp16 with a gradient scaler);
the losses, the optimiser and validation stay float32. Off by default: float32 results are
exact and reproducible, which a precision chosen by the hardware would not be.
"""

from __future__ import annotations

import dataclasses
import itertools
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
from planetseg.model import DSRLNet, DSRLOutput, LossWeights, NetConfig, dsrl_loss
from planetseg.model.inference import native_bf16
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


#: Autocast dtypes of ``--amp``'s precisions (``fp32``: no autocast).
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(local_rank: int, cuda_devices: int, *, processes: str) -> torch.device:
    """One process per GPU: ``cuda:local_rank`` when the node has GPUs, else the CPU.

    Args:
        local_rank: The process's rank on its node (``LOCAL_RANK`` under torchrun).
        cuda_devices: CUDA devices this process sees.
        processes: How the processes were asked for, to name in the error (``--nproc 4``).

    Raises:
        InvalidArgumentError: more processes on the node than GPUs.
    """
    if cuda_devices == 0:
        return torch.device("cpu")
    if local_rank >= cuda_devices:
        raise InvalidArgumentError(
            f"{processes}: this node has {cuda_devices} CUDA device(s) and train runs one "
            f"process per GPU: start at most {cuda_devices} processes per node"
        )
    return torch.device("cuda", local_rank)


def choose_backend(device: torch.device) -> str:
    """The process group's backend for ranks on ``device``: NCCL between GPUs, else gloo."""
    return "nccl" if device.type == "cuda" else "gloo"


def choose_precision(
    amp: str, device_type: str, *, cuda_bf16: bool, cpu_flags: frozenset[str]
) -> str:
    """The training step's precision (``fp32``, ``bf16`` or ``fp16``) for ``--amp amp``.

    Args:
        amp: ``off``, ``bf16``, ``fp16`` or ``auto``.
        device_type: ``cuda`` or ``cpu``.
        cuda_bf16: Whether the GPU computes in bfloat16 (``torch.cuda.is_bf16_supported``).
        cpu_flags: The CPU's flags (``/proc/cpuinfo``).

    Raises:
        InvalidArgumentError: fp16 on the CPU, or bf16 on a GPU without it.
    """
    if amp == "off":
        return "fp32"
    if device_type == "cuda":
        if amp == "auto":
            return "bf16" if cuda_bf16 else "fp16"
        if amp == "bf16" and not cuda_bf16:
            raise InvalidArgumentError(
                "--amp bf16: this GPU has no bfloat16 support: use --amp fp16 (or auto)"
            )
        return amp
    if amp == "fp16":
        raise InvalidArgumentError(
            "--amp fp16 needs a CUDA device (float16 with gradient scaling): on the CPU use "
            "--amp bf16 or off"
        )
    if amp == "auto":
        return "bf16" if native_bf16(cpu_flags) else "fp32"
    return "bf16"


def _precision(amp: str, device_type: str) -> str:
    """:func:`choose_precision` on this machine."""
    from planetseg.model.inference import cpu_flags

    cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_precision(amp, device_type, cuda_bf16=cuda_bf16, cpu_flags=cpu_flags())


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
    # Fail here, in one line, before any process starts: too many processes for the GPUs, or
    # an --amp this device cannot run.
    device = _rank_device(config.nproc - 1, config)  # the last rank's (torchrun: this one's)
    _precision(config.amp, device.type)
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


def _rank_device(rank: int, config: TrainConfig) -> torch.device:
    """The device of rank ``rank`` of ``--nproc``, or of this process under torchrun."""
    if distributed_env():
        local = int(os.environ.get("LOCAL_RANK", 0))
        processes = f"LOCAL_RANK {local} (torchrun --nproc-per-node)"
    else:
        local, processes = rank, f"--nproc {config.nproc}"
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_device(local, cuda, processes=processes)


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
    device = _rank_device(rank, config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        init = f"tcp://127.0.0.1:{port}" if port is not None else "env://"
        dist.init_process_group(
            choose_backend(device), init_method=init, rank=rank, world_size=world
        )
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
    precision = _precision(config.amp, device.type)
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    # float16 gradients underflow without loss scaling; disabled, the scaler is a no-op
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
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
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        if rank == 0:
            _truncate_metrics(run / METRICS, start)
    sampler = WindowSampler(
        data, crop=config.crop, seed=config.seed, foreground=config.foreground_windows
    )
    degrade = Degradation(config.scale, config.psf_sigma, config.noise)
    window = validation_window(net_config, config.batch_size, config.crop)
    scoring = {"window": window, "seed": config.seed, "rank": rank, "world": world}
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
    final = None  # the last step's validation: the exported model's metrics
    for step in range(start, config.steps):
        signum = _agreed_stop(stop, world, device)
        if signum:
            if rank == 0 and saved != step:
                _save_checkpoint(
                    run / CHECKPOINT, model, optimizer, scheduler, scaler, step, config, data.bands
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
        with torch.autocast(device.type, AUTOCAST.get(precision), enabled=precision != "fp32"):
            out = ddp(lr.to(device, memory_format=memory))
        losses = dsrl_loss(  # in float32 whatever the forward's precision
            _float32(out),
            labels.to(device, torch.int64),
            hr.to(device),
            weights,
            class_weights,
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = step + 1
        record = None
        if log is not None:
            record = {
                "step": done,
                **{k: v.item() for k, v in losses.items()},
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": config.batch_size * (done - start) / (time.perf_counter() - t0),
            }
        if done % config.val_every == 0 or done == config.steps:
            val = validate(model, data, norm, degrade, device, **scoring)
            final = val if done == config.steps else None
            if record is not None:
                record["val"] = val
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress is not None:
                rate = (done - start) / (time.perf_counter() - t0)
                losses_now = {k: v for k, v in record.items() if k in losses}
                progress(TrainProgress(done, config.steps, losses_now, rate))
        if done % config.checkpoint_every == 0 or done == config.steps:
            if rank == 0:
                _save_checkpoint(
                    run / CHECKPOINT, model, optimizer, scheduler, scaler, done, config, data.bands
                )
            saved = done
            if world > 1:
                dist.barrier()
    if log is not None:
        log.close()
    batches.close()
    if final is None:  # a resume of a finished run: no step ran
        final = validate(model, data, norm, degrade, device, **scoring)
    if rank == 0:
        from planetseg.export import export_model

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
            runtime={
                "device": device.type,
                "precision": precision,
                "backend": choose_backend(device) if world > 1 else None,
                "world_size": world,
            },
        )
    if world > 1:
        dist.barrier()  # under torchrun every rank's caller may read the export next
    return model


def _save_checkpoint(
    path: Path,
    model: DSRLNet,
    optimizer: Any,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
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
    if scaler.is_enabled():  # fp16: the loss scale reached is part of the state
        state["scaler"] = scaler.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


def _float32(out: DSRLOutput) -> DSRLOutput:
    """The network's outputs in float32 (an autocast forward leaves some in bf16/fp16)."""
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return DSRLOutput(**{k: None if v is None else v.float() for k, v in fields.items()})


def validation_window(config: Any, batch: int, crop: int) -> int:
    """LR pixels a validation tile's window may hold: a training batch's, or 6 halos squared.

    A training step runs the network forward and backward, the SR branch at HR too, on
    ``batch`` windows of ``crop`` HR px; a validation tile runs only the segmentation forward
    on its window (the tile and the halo on each side), on as many LR pixels at most. So
    validation needs no more memory than a training step, whatever the size of the strips.
    The floor keeps tiles of at least 4 halos, which spend less than half their time on the
    halo (a tiny network's tiny batches would give tiny tiles; their memory is small anyway).
    """
    from planetseg.evaluate import halo_of

    return max(batch * (crop // config.scale) ** 2, (6 * halo_of(config)) ** 2)


def validation_tile(config: Any, shape: tuple[int, int], window: int) -> int:
    """The largest tile side whose windows of an LR image of ``shape`` hold ``window`` px.

    A multiple of the divisor (at least one). A window is the tile and the halo on each side,
    clipped to the image, so a narrow strip gets tall tiles, and a small one a single tile.
    """
    from planetseg.evaluate import halo_of

    m, halo = config.divisor, halo_of(config)
    h, w = shape

    def pixels(tile: int) -> int:
        return min(tile + 2 * halo, h) * min(tile + 2 * halo, w)

    low, high = 1, max(1, math.ceil(max(h, w) / m))  # in multiples of m; low always allowed
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if pixels(mid * m) <= window else (low, mid - 1)
    return low * m


def validate(
    model: DSRLNet,
    data: TrainingData,
    norm: tuple[torch.Tensor, torch.Tensor],
    degrade: Degradation,
    device: torch.device,
    *,
    window: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Per-class scores of ``model`` on the held-out strips (LR input, HR labels), all ranks.

    The strip of every (cube, time step) part is cut into the tiles
    :func:`~planetseg.evaluate.predict_logits` would use, the largest whose windows hold at
    most ``window`` LR pixels (:func:`validation_tile`; training passes
    :func:`validation_window`; None: 512 px tiles). Numbered over all parts, tile ``i``
    is scored by rank ``i % world``, and the ranks' confusion matrices are summed
    (all-reduce). A tile reads its own window of the strip, with the blur's context
    (:meth:`Degradation.window`), so memory follows the tile, not the strip. Each tile is
    computed exactly as in one process, its degradation's noise too (drawn per tile from
    ``seed``), so every rank returns the scores a single process would, and none idles. Every
    rank must call this (it is a collective when ``world > 1``).
    """
    from planetseg.evaluate import predict_window, tiles

    model.eval()
    if world > 1:
        # DDP gives every forward rank 0's BatchNorm statistics, but each rank's last forward
        # updated its own copy: score rank 0's, the weights that are checkpointed and exported.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    s = model.config.scale
    n = data.num_classes
    cm = np.zeros((n, n), np.int64)
    numbers = itertools.count()  # of the tiles, over all parts
    for part in data.validation_parts():
        height, width = data.validation_shape(part)
        h, w = height - height % s, width - width % s

        def read(rows: slice, cols: slice, part: tuple[int, int] = part) -> torch.Tensor:
            hr = torch.from_numpy(data.validation_window(part, rows, cols))
            return (hr - norm[0]) / norm[1]

        tile = validation_tile(model.config, (h // s, w // s), window) if window else 512
        for piece in tiles(model.config, h // s, w // s, tile=tile):
            i = next(numbers)
            if i % world != rank:
                continue
            noise = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + i)
            pred = predict_window(model.seg, piece, read, (h, w), degrade, noise)
            rows, cols = slice(piece.y0 * s, piece.y1 * s), slice(piece.x0 * s, piece.x1 * s)
            cm += confusion_matrix(data.validation_labels(part, rows, cols), pred, n)
    if world > 1:
        total = torch.from_numpy(cm).to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        cm = total.cpu().numpy()
    return scores(cm, data.classes)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the checkpoint a resumed run restarts from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
