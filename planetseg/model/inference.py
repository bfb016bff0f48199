"""How the exported network runs at scale: the device, the precision and the memory it needs.

* :func:`choose_path` turns ``--precision`` and the hardware found into an
  :class:`InferencePath` (numeric precision and memory format). ``fp32`` is the reference:
  eager float32 in torch's default memory format, exactly today's labels. ``auto`` takes the
  fastest path known to be correct on the hardware:

  - on a CPU, channels-last float32 (oneDNN's native NHWC convolutions: measured 1.8-4x
    faster than NCHW on a 2-core AMD EPYC, 1.8x on an AVX-512 Intel Xeon, labels equal), and
    bf16 autocast where the CPU has bfloat16 instructions: AMX (``amx_bf16``: 3.5x measured
    on the Xeon) or ``avx512_bf16`` (this project's AMD EPYC, Zen 4: 2.4x channels-last
    float32 on a quiet machine, ``benchmarks/bench_segment.py`` part 6; on real CTX imagery
    with a trained model 99.96 % of labels equal to float32's and crater F1 unchanged,
    ``benchmarks/bench_craters_real.py --precision fp32 bf16``). Without them (AVX2 only)
    bf16 is emulated and slow: float32;
  - on a CUDA GPU, channels-last with bf16 autocast (Ampere and later) or fp16 (older);
  - on a CPU where OpenVINO is installed (``pip install 'planetseg[openvino]'``), the same
    precision compiled by OpenVINO instead of run by torch: on one task's window of this
    project's AMD EPYC it reaches 90-99 % of dense float32 matmul FLOP/s in float32 (torch
    37-60 %) and 80 % of bf16 matmul in bf16 (torch 53 %), 1.5x torch's fastest float32 and
    bf16, with 99.96 % of eager float32's labels on real CTX imagery
    (``benchmarks/bench_segment.py`` part 6, ``bench_craters_real.py``).

  ``--precision fp32`` always runs eager torch (the reference); ``bf16`` / ``fp16`` run torch's
  autocast.

* :class:`InferenceNet` wraps the network so that it runs on that path and still takes and
  returns contiguous float32 tensors (every caller stays the same).
  An OpenVINO path converts the network once (about 2 s; kept in :func:`openvino_cache`
  for the next process) and takes any window size (dynamic batch, height and width).
  :meth:`InferenceNet.products` gives segment's uint8 maps (:func:`pixel_products`); on
  OpenVINO they are computed inside the compiled graph, no float logits copied out.
* :func:`worker_device` picks the GPU of a Dask worker: dask-cuda and SLURM both give a worker
  ``CUDA_VISIBLE_DEVICES``; a worker claims the first device of its list that no other worker
  process of the same job on the node holds (a lock file each), so N workers of an N-GPU job
  use the N GPUs, and a dask-cuda worker (whose list starts with its own GPU) its own.
* :func:`keep_freed_memory` stops glibc from returning every freed activation to the kernel
  (Dask's workers start with ``MALLOC_TRIM_THRESHOLD_=65536``, which makes each forward pass
  page-fault its tensors in anew: measured 1.5x slower on this project's AMD EPYC).
* :func:`activation_bytes` measures the peak bytes of live tensors of one forward pass (the
  memory estimate of ``segment --dry-run`` is built from it).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from planetseg.config import PRECISIONS
from planetseg.errors import InvalidArgumentError

#: The recipe of :func:`_openvino_model`'s conversion, part of its cache key: bump it when
#: the recipe changes, so that no process reads a model converted the old way.
_CONVERSION = 2
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU flags (``/proc/cpuinfo``) printed by the benchmark and read by :func:`choose_path`.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Hardware:
    """What :func:`choose_path` decides on.

    Attributes:
        cuda: A CUDA GPU is the device.
        cuda_bf16: That GPU computes in bf16 natively (compute capability 8.0 or later).
        cpu_flags: The CPU's feature flags (of :data:`CPU_FLAGS`).
        openvino: OpenVINO is installed (the ``openvino`` extra).
    """

    cuda: bool = False
    cuda_bf16: bool = False
    cpu_flags: frozenset[str] = frozenset()
    openvino: bool = False


@dataclass(frozen=True)
class InferencePath:
    """How the network runs: its numeric precision and its activations' memory format.

    Attributes:
        precision: ``fp32``, or the autocast dtype ``bf16`` / ``fp16``.
        channels_last: Activations in NHWC (channels-last) rather than NCHW.
        device: ``cpu`` or ``cuda``: the kind of device it was chosen for.
        backend: ``torch``, or ``openvino`` (CPU only; it picks its own memory layout).
    """

    precision: str = "fp32"
    channels_last: bool = False
    device: str = "cpu"
    backend: str = "torch"

    @property
    def name(self) -> str:
        """A short description (``cpu fp32 channels-last``), as printed and recorded."""
        if self.backend != "torch":
            return f"{self.device} {self.precision} {self.backend}"
        layout = "channels-last" if self.channels_last else "contiguous"
        return f"{self.device} {self.precision} {layout}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (recorded in the plan and the labels store)."""
        return asdict(self)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's flags of :data:`CPU_FLAGS`, from ``/proc/cpuinfo`` text (read if None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags known, so the reference path
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(CPU_FLAGS)
    return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    """Whether a CPU with ``flags`` runs bfloat16 matmuls natively: AMX tiles or AVX-512 BF16.

    Measured on our network (segment and train alike): AMX 3.5x fp32 on a Xeon; avx512_bf16
    (AMD Zen 4) 2.4x fp32 in inference and 1.3x in training samples/s.
    """
    return "amx_bf16" in flags or "avx512_bf16" in flags


def this_hardware() -> Hardware:
    """The hardware of this process: its GPU if torch sees one, and the CPU's flags."""
    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.get_device_capability()[0] >= 8,
        cpu_flags=cpu_flags(),
        openvino=importlib.util.find_spec("openvino") is not None,
    )


def choose_path(precision: str, hardware: Hardware) -> InferencePath:
    """The path ``--precision`` asks for on ``hardware`` (see the module's rules).

    Raises:
        InvalidArgumentError: an unknown precision, or fp16 on a CPU (torch has no fast CPU
            fp16 convolutions: measured 300x slower than float32).
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    device = "cuda" if hardware.cuda else "cpu"
    if precision == "fp32":
        return InferencePath("fp32", False, device)
    if precision == "fp16" and not hardware.cuda:
        raise InvalidArgumentError(
            "--precision fp16 needs a CUDA GPU (on a CPU it is far slower than fp32): use "
            "--precision auto, bf16 or fp32"
        )
    if precision == "auto":
        if hardware.cuda:
            precision = "bf16" if hardware.cuda_bf16 else "fp16"
        else:
            precision = "bf16" if native_bf16(hardware.cpu_flags) else "fp32"
            if hardware.openvino:
                return InferencePath(precision, False, device, "openvino")
    return InferencePath(precision, True, device)


def pixel_products(
    logits: torch.Tensor, crater_channels: tuple[int, ...], steps: int
) -> tuple[torch.Tensor, ...]:
    """What segment keeps of each pixel's logits, as uint8 maps.

    Args:
        logits: (B, classes, H, W) float logits.
        crater_channels: Classes whose softmax probabilities are summed into a crater
            probability (none: no such map).
        steps: Probabilities are stored as round(p * steps), 0..steps.

    Returns:
        (B, H, W) uint8 each: the winning class, its softmax probability (the confidence)
        and, with ``crater_channels``, their summed probability.
    """
    prob = torch.softmax(logits, dim=1)
    confidence, labels = prob.max(dim=1)
    out = (labels.to(torch.uint8), _quantise(confidence, steps))
    if crater_channels:
        out += (_quantise(prob[:, list(crater_channels)].sum(dim=1), steps),)
    return out


def _quantise(probability: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.round(probability.clamp(0, 1) * steps).to(torch.uint8)


class _WithProducts(nn.Module):
    """A network followed by :func:`pixel_products`: one graph for a compiler to fuse."""

    def __init__(self, net: nn.Module, crater_channels: tuple[int, ...], steps: int) -> None:
        super().__init__()
        self.config = net.config
        self.net = net
        self.head = (crater_channels, steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return pixel_products(self.net(x), *self.head)


class InferenceNet(nn.Module):
    """A segmentation network run on an :class:`InferencePath`, float32 in.

    Called, it returns float32 logits; :meth:`products` returns segment's uint8 maps, which an
    OpenVINO path computes inside the compiled graph (no float logits leave it).

    Attributes:
        config: The wrapped network's :class:`~planetseg.model.NetConfig`.
        path: The path it runs on.
    """

    def __init__(self, net: nn.Module, path: InferencePath, device: str = "cpu") -> None:
        super().__init__()
        self.config = net.config
        self.path = path
        net = net.to(device)
        self.net = net.to(memory_format=torch.channels_last) if path.channels_last else net
        # OpenVINO: one compiled model per head (None: the logits), compiled when first used.
        self._compiled: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._requests = threading.local()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, bands, h, w) float32 -> (B, classes, s*h, s*w) float32 logits (contiguous)."""
        if self.path.backend == "openvino":
            return torch.from_numpy(self._infer(None, x)[0])
        device = next(self.net.parameters()).device
        x = x.to(device)
        if self.path.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.path.precision == "fp32":
            out = self.net(x)
        else:
            with torch.autocast(device.type, dtype=_DTYPES[self.path.precision]):
                out = self.net(x)
        return out.float().contiguous()

    def products(
        self, x: torch.Tensor, crater_channels: tuple[int, ...], steps: int
    ) -> tuple[torch.Tensor, ...]:
        """(B, bands, h, w) float32 -> :func:`pixel_products` of the logits (CPU tensors)."""
        if self.path.backend == "openvino":
            head = (tuple(crater_channels), steps)
            return tuple(torch.from_numpy(a) for a in self._infer(head, x))
        with torch.no_grad():
            return tuple(t.cpu() for t in pixel_products(self(x), tuple(crater_channels), steps))

    def _infer(self, head: Any, x: torch.Tensor) -> list[Any]:
        """The OpenVINO model of ``head`` on ``x``: its outputs, as numpy arrays of their own."""
        with self._lock:
            if head not in self._compiled:
                net = self.net if head is None else _WithProducts(self.net, *head)
                self._compiled[head] = _openvino(net, self.path)
        # One infer request per thread and head: a worker's threads may run tasks at once.
        requests = self._requests.__dict__.setdefault("by_head", {})
        if head not in requests:
            requests[head] = self._compiled[head].create_infer_request()
        result = requests[head].infer({0: x.float().contiguous().numpy()})
        return [result[k].copy() for k in range(len(result))]  # the request reuses its buffers


@functools.cache
def _openvino_core(ov: Any) -> Any:
    """The process's one OpenVINO runtime (of the module ``ov``), kept for its life.

    Two ``Core`` objects, one of them freed, crashed the process later in unrelated code (seen
    with openvino 2026.4 under pytest).
    """
    return ov.Core()


def openvino_cache() -> Path:
    """Where converted networks are kept.

    ``$PLANETSEG_CACHE/openvino``, else ``planetseg/openvino`` in the user's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache``).
    """
    root = os.environ.get("PLANETSEG_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "planetseg"
    )
    return Path(root) / "openvino"


def _openvino_model(ov: Any, net: nn.Module) -> Any:
    """``net`` as an OpenVINO model (dynamic batch, height and width), converted once.

    torch's ``pixel_shuffle`` becomes OpenVINO's ``DepthToSpace`` (the same permutation, one
    kernel: the converter's own reshape-transpose-reshape, with the layout changes around it,
    took 20 % of a window's time on an AVX-512 Xeon). The conversion (about 2 s) is kept in
    :func:`openvino_cache` under a digest of the network's shape, head and weights, written
    whole or not at all, and read back by the next worker process. A cache that cannot be
    written only costs the conversion.
    """
    try:
        from openvino.frontend.pytorch import ConversionExtension
    except ImportError as exc:  # an OpenVINO built without its PyTorch frontend
        raise InvalidArgumentError(
            "this OpenVINO cannot convert PyTorch models: pip install 'planetseg[openvino]', "
            "or use --precision fp32"
        ) from exc
    head = getattr(net, "head", None)
    digest = hashlib.sha256(f"{_CONVERSION} {net.config!r} {head!r}".encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    xml = openvino_cache() / f"{digest.hexdigest()}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return _openvino_core(ov).read_model(str(xml))
    bands = net.config.in_bands
    side = 4 * net.config.divisor  # a small example: the model takes any h and w

    def depth_to_space(node: Any) -> list[Any]:
        factor = int(node.get_values_from_const_input(1))
        return [ov.opset13.depth_to_space(node.get_input(0), "depth_first", factor).output(0)]

    with torch.no_grad():
        model = ov.convert_model(
            net.eval(),
            example_input=torch.zeros(1, bands, side, side),
            input=[ov.PartialShape([-1, bands, -1, -1])],
            extension=[ConversionExtension("aten::pixel_shuffle", depth_to_space)],
        )
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
            # The .bin first, then the .xml: a reader that finds the .xml finds both.
            ov.save_model(model, str(Path(tmp) / xml.name), compress_to_fp16=False)
            os.replace(Path(tmp) / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
            os.replace(Path(tmp) / xml.name, xml)
    except OSError:
        pass  # a read-only or full cache folder: convert again next time
    return model


def _openvino(net: nn.Module, path: InferencePath) -> Any:
    """``net`` (eval mode) compiled by OpenVINO for the CPU, on ``path``'s precision.

    Compiled for this process's torch thread count (the task's ``--threads``, set before the
    model is loaded), one stream, and without pinning threads to cores: the worker processes
    of one machine would otherwise pin to the same cores.

    Raises:
        InvalidArgumentError: OpenVINO is not installed.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise InvalidArgumentError(
            "this run's inference path is OpenVINO, which is not installed on this worker: "
            "pip install 'planetseg[openvino]', or use --precision fp32"
        ) from exc
    if path.device != "cpu" or path.precision not in ("fp32", "bf16"):
        raise InvalidArgumentError(f"OpenVINO runs fp32 or bf16 on a CPU, not {path.name}")
    return _openvino_core(ov).compile_model(
        _openvino_model(ov, net),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16" if path.precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": "NO",
        },
    )


# --------------------------------------------------------------------------- GPU placement


def visible_gpus(env: Mapping[str, str], count: int) -> list[str]:
    """The GPUs a process may use, as named by ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs).

    ``count`` is how many devices torch sees; without the variable they are ``0..count-1``.
    """
    listed = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def _lock_dir(env: Mapping[str, str]) -> Path:
    job = env.get("SLURM_JOB_ID") or env.get("PBS_JOBID") or "local"
    return Path(tempfile.gettempdir()) / f"planetseg-gpus-{os.getuid()}-{job}"


def claim_gpu(gpus: list[str], lock_dir: Path) -> tuple[int, IO[str] | None]:
    """The index in ``gpus`` of the first GPU no other process holds, and its held lock.

    Each GPU has a lock file in ``lock_dir``; the lock is held for as long as the returned
    file stays open (a worker keeps it for its life; the system drops it when it exits). When
    every GPU is held (more workers than GPUs) the first is shared: index 0, no lock.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i, gpu in enumerate(gpus):
        handle = (lock_dir / f"gpu-{gpu.replace('/', '_')}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return i, handle
    return 0, None


_CLAIMED: list[IO[str]] = []  # the locks this process holds (for its whole life)


@functools.cache
def worker_device() -> str:
    """The torch device of this process: ``cuda:i`` for the GPU it claimed, else ``cpu``.

    dask-cuda lists each worker's own GPU first in its ``CUDA_VISIBLE_DEVICES``, so it claims
    that one; the worker processes of a multi-GPU batch job share one list and claim one GPU
    each (see :func:`claim_gpu`).
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "cpu"
    index, lock = claim_gpu(visible_gpus(os.environ, count), _lock_dir(os.environ))
    if lock is not None:
        _CLAIMED.append(lock)
    return f"cuda:{index}"


# --------------------------------------------------------------------------- memory

#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest mmap threshold glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``), and the
#: trim threshold glibc's own dynamic rule pairs with it (twice as much).
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process's allocator keep freed tensors for the next forward pass (once).

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, so that workers
    holding data give memory back. Setting it also switches off glibc's dynamic mmap
    threshold: every tensor above 128 KiB is then a fresh ``mmap`` and every forward pass
    page-faults (and zeroes) all of its activations again. Measured on one task's window
    (1 thread, bf16 channels-last, AMD EPYC): 444 ms per pass with Dask's setting, 285-340 ms
    without it or with this function's thresholds.

    The thresholds set here are glibc's dynamic rule at its ceiling (tensors up to 32 MiB come
    from the heap, up to 64 MiB of free heap top is kept): the memory a worker keeps is bounded
    by one task's, which it needs again for the next task anyway.

    Returns:
        Whether the thresholds were set (False where the C library has no ``mallopt``).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (or no C library to load): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


_CONVOLUTIONS = (
    torch.ops.aten.conv2d.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.conv_transpose2d.input,
)


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensor storages created while active and alive; keeps the peak.

    Also keeps the largest source + destination bytes of one convolution (``conv_io``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.conv_io = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        if func in _CONVOLUTIONS:
            io = args[0].untyped_storage().nbytes() + out.untyped_storage().nbytes()
            self.conv_io = max(self.conv_io, io)
        return out

    def _count(self, storage: Any) -> None:
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def activation_bytes(net: InferenceNet, bands: int, height: int, width: int) -> int:
    """Peak bytes a forward pass of ``net`` holds on a window, input excluded.

    Measured by running the pass (CPU, no gradients) and counting every tensor it creates
    while alive, so it follows the architecture, the precision and the memory format. On a
    CPU in torch's default (NCHW) format, oneDNN also copies a convolution's source and
    destination into its blocked layout, outside any tensor: the largest convolution's
    source + destination is added (measured: peak RSS of a 4 x 256 px task 655 MiB in NCHW,
    425 MiB channels-last, the same tensors in both).
    """
    x = torch.zeros(1, bands, height, width)
    with torch.inference_mode(), _LiveBytes() as counter:
        out = net(x)
    del out
    reordered = net.path.device == "cpu" and not net.path.channels_last
    return counter.peak + (counter.conv_io if reordered else 0)
