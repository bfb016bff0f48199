"""The ``segment`` stage: the detached model over every tile of a cube, on a Dask cluster.

The cube's imagery is the model's low-resolution input; the labels come out on the cube's
grid refined by the model's ``scale``. Like ``ingest``, the stage plans first and then executes:

* :func:`plan_segment` reads metadata only (the cube's shape, grid and attributes, the model
  card) and returns a small picklable :class:`SegmentPlan`. Tasks are never listed: task ``i``
  is computed from ``i`` (a run of ``batch`` tiles along one tile row of one time step), so
  planning a cube of a terabyte costs the same as planning a small one.
* :func:`segment` creates the output store from metadata, then runs the tasks on
  :func:`planetseg.executor.execute`: at most ``--partition`` tasks on the cluster at a time
  (by default 4 per worker thread, following the threads as workers join or leave), the next
  submitted as each finishes, so the scheduler's graph and the client's memory stay bounded
  whatever the size of the area.
* A task reads its tiles in one window widened by ``halo`` input pixels on every side, runs
  the network once on it, and keeps the centre. With a halo of at least the network's
  receptive radius (the default, measured by :func:`planetseg.model.receptive_radius`) and
  windows aligned to the encoder's pooling grid, the mosaic equals segmenting the whole image
  at once: no seams.
* Workers load the model once, from its directory, keyed and checked by the weights' digest,
  and fold its BatchNorms into the convolutions (:func:`planetseg.model.fuse_for_inference`,
  10 % faster on a CPU); tasks carry only the path and the digest. The network runs on the
  plan's inference path (``--precision``: precision and memory format, chosen for the
  hardware, see :mod:`planetseg.model.inference`), on the worker's own GPU where it has one;
  the path is recorded in the store's ``planetseg:inference`` attribute.
* Each task touches a marker after writing its chunks; ``planetseg:complete`` is set at the
  end. A killed run resumes with the missing tasks only; a task that a dying worker lost is
  re-run by Dask, and re-writing a chunk is harmless.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from planetseg import __version__
from planetseg.config import SegmentConfig
from planetseg.errors import (
    CheckpointError,
    InvalidArgumentError,
    MixedBodiesError,
    PlanetsegWarning,
    StoreMismatchError,
)
from planetseg.executor import InFlight, execute, pending
from planetseg.store import (
    EVERY_CHUNK,
    PROGRESS_SUFFIX,
    STAGE_ATTR,
    ChunkGuard,
    Output,
    cf_attrs,
    consolidate,
    create_owned_dir,
    done_markers,
    drop_partial_writes,
    get_attr,
    missing_chunks,
    open_for_writing,
    pixel_centres,
    prepare_output,
    progress_dir,
    remove_owned,
    set_attrs,
    transform_from_cf,
)

if TYPE_CHECKING:
    from planetseg.model.inference import InferencePath

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

#: Confidence (the winning class's softmax probability) is stored as uint8 steps of 1/254.
CONFIDENCE_STEPS = 254
#: Confidence (and crater probability) of pixels not yet written, or whose input is missing.
NO_DATA = 255
#: The crater probability (the summed softmax of the crater classes: every class whose name
#: contains "crater") is stored beside ``confidence``, quantised the same way, in stores of
#: models that have crater classes; the attribute lists the classes summed.
CRATER_PROBABILITY = "crater_probability"
CRATER_PROBABILITY_ATTR = "planetseg:crater_probability_classes"
#: The inference path the labels were computed on (precision, memory format, device kind).
INFERENCE_ATTR = "planetseg:inference"


def is_crater_class(name: str) -> bool:
    """Whether a class is a crater by default: its name contains "crater".

    The rule of the crater probability here and of ``craters`` without ``--crater-class``.
    """
    return "crater" in name.lower()


@dataclass(frozen=True)
class SegmentPlan:
    """Everything a segmentation task needs, derived from metadata only.

    Attributes:
        cube: Path of the input cube.
        model: Directory of the exported model.
        digest: The model's weights digest (what workers load and products record).
        times: Cube time indices to segment.
        time_values: Their datetimes (ISO 8601).
        shape: Input height and width (cube pixels).
        tile: Input tile side (the cube's chunk), in cube pixels.
        scale: Output pixels per input pixel (the model's scale).
        halo: Input pixels of context read around each run of tiles.
        batch: Tiles per task (a run along one tile row).
        bands: Input band count.
        dtype: Input dtype.
        crs_wkt: CRS of the cube and of the output.
        transform: Affine of the input grid ``(a, b, c, d, e, f)``.
        classes: Class value -> name (from the model card).
        threads: Torch threads per task.
        net: The network's shape (the model card's ``net``: width, depth, head channels).
        inference: How the network runs (an :class:`~planetseg.model.inference.InferencePath`
            as a dict: precision, memory format, device kind); empty for the fp32 reference
            path of plans recorded before it was chosen.
        nodata: The cube's declared nodata value (from its items), None without one: pixels
            with it in every band are missing, as NaN ones are.
    """

    cube: str
    model: str
    digest: str
    times: tuple[int, ...]
    time_values: tuple[str, ...]
    shape: tuple[int, int]
    tile: int
    scale: int
    halo: int
    batch: int
    bands: int
    dtype: str
    crs_wkt: str
    transform: tuple[float, ...]
    classes: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    net: dict[str, int] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    nodata: float | None = None

    @property
    def activation(self) -> float:
        """Peak bytes of the network's tensors per input pixel of a window, on :attr:`path`.

        Measured when first asked (only ``--dry-run``'s estimate needs it), on the path the
        tasks run: after a cluster's worker chose it, not the driver (see
        :func:`~planetseg.model.inference.activation_bytes`).
        """
        return _activation_per_pixel(self.model, self.digest, self.path)

    @property
    def path(self) -> InferencePath:
        """The inference path the tasks run (the fp32 reference for older plans)."""
        from planetseg.model.inference import InferencePath

        return InferencePath(**self.inference)

    @property
    def crater_values(self) -> list[int]:
        """Class values whose softmax is summed into the crater probability (may be none)."""
        return sorted(int(v) for v, name in self.classes.items() if is_crater_class(name))

    @property
    def tiles_yx(self) -> tuple[int, int]:
        """Tile rows and columns of the input grid."""
        return math.ceil(self.shape[0] / self.tile), math.ceil(self.shape[1] / self.tile)

    @property
    def runs_per_row(self) -> int:
        """Tasks per tile row."""
        return math.ceil(self.tiles_yx[1] / self.batch)

    @property
    def n_tiles(self) -> int:
        """Input tiles to segment, over all selected times."""
        ny, nx = self.tiles_yx
        return len(self.times) * ny * nx

    @property
    def n_tasks(self) -> int:
        """Tasks (runs of up to ``batch`` tiles) over all selected times."""
        return len(self.times) * self.tiles_yx[0] * self.runs_per_row

    @property
    def out_shape(self) -> tuple[int, int]:
        """Output height and width (``scale`` x the input)."""
        return self.shape[0] * self.scale, self.shape[1] * self.scale

    @property
    def out_transform(self) -> tuple[float, ...]:
        """Affine of the output grid: the input's, with pixels ``scale`` x smaller."""
        a, b, c, d, e, f = self.transform
        s = self.scale
        return (a / s, b / s, c, d / s, e / s, f)

    @property
    def output_arrays(self) -> tuple[str, ...]:
        """The arrays a task writes (one uint8 chunk per output tile each)."""
        extra = (CRATER_PROBABILITY,) if self.crater_values else ()
        return ("labels", "confidence", *extra)

    def task(self, index: int) -> tuple[int, int, int, int]:
        """Task ``index`` -> (position in ``times``, tile row, first and end tile column)."""
        per_time = self.tiles_yx[0] * self.runs_per_row
        t, rest = divmod(index, per_time)
        iy, run = divmod(rest, self.runs_per_row)
        ix0 = run * self.batch
        return t, iy, ix0, min(ix0 + self.batch, self.tiles_yx[1])

    def tiles_of(self, index: int) -> int:
        """Tiles task ``index`` segments."""
        _, _, ix0, ix1 = self.task(index)
        return ix1 - ix0

    def markers(self, index: int) -> tuple[str]:
        """The marker task ``index`` leaves once done (see :class:`planetseg.executor.TaskPlan`)."""
        return (task_marker(index),)

    def task_bytes(self) -> dict[str, int]:
        """Peak memory of one task (a full run of ``batch`` tiles with the halo), by term.

        ``input``: the window read, as float32 and normalised; ``network``: the tensors of the
        forward pass at their peak (:attr:`activation` x the window's pixels: the layers'
        outputs, the decoder's concatenations, the float32 logits); ``output``: the uint8
        maps of the window and, on torch, the softmax probabilities, the confidence, the
        int64 labels and the crater probability before them (OpenVINO computes those in its
        graph). Measured against the peak RSS of a task within 2x (``tests/test_segment.py``,
        ``benchmarks/bench_segment.py``).
        """
        itemsize = np.dtype(self.dtype).itemsize
        t, s, n = self.tile, self.scale, max(len(self.classes), 2)
        window = (t + 2 * self.halo) * (self.batch * t + 2 * self.halo)  # input pixels
        maps = len(self.output_arrays)
        floats = 0 if self.path.backend == "openvino" else 4 * n + 4 + 8 + 4
        return {
            "input": window * self.bands * (itemsize + 4 + 4),
            "network": int(self.activation * window),
            "output": window * s * s * (maps + floats),
        }

    def estimate(self, partition: int) -> dict[str, Any]:
        """The figures ``--dry-run`` prints: counts and bytes, computed, not enumerated."""
        itemsize = np.dtype(self.dtype).itemsize
        return {
            "tiles": self.n_tiles,
            "tasks": self.n_tasks,
            "partitions": math.ceil(self.n_tasks / partition),
            "tasks_in_flight": min(partition, self.n_tasks),
            "bytes_read": len(self.times) * self.bands * self.shape[0] * self.shape[1] * itemsize,
            "bytes_written": len(self.output_arrays)
            * len(self.times)
            * self.out_shape[0]
            * self.out_shape[1],
            "bytes_per_task": sum(self.task_bytes().values()),
        }

    def to_json(self) -> str:
        """JSON form (stored in the output's attributes)."""
        return json.dumps(asdict(self))

    def same_work(self, other: SegmentPlan) -> bool:
        """Whether ``other`` writes exactly what this plan writes (``threads`` aside).

        ``net`` is the model's (the digest already compares the model), so it is not
        compared: stores planned before it was recorded resume too. ``inference`` is: another
        precision or layout writes other labels.
        """
        mine, theirs = asdict(self), asdict(other)
        mine["inference"] = self.path.to_dict()
        theirs["inference"] = other.path.to_dict()
        for key in ("threads", "net"):
            mine.pop(key, None)
            theirs.pop(key, None)
        return json.loads(json.dumps(mine)) == json.loads(json.dumps(theirs))

    @classmethod
    def from_json(cls, text: str) -> SegmentPlan:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        for key in ("times", "time_values", "shape", "transform"):
            d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class SegmentResult:
    """What a :func:`segment` run did.

    Attributes:
        store: The labels store.
        plan: The plan executed.
        computed: Tiles segmented by this run.
        kept: Tiles already done by an earlier, interrupted run.
        cogs: COG files written (``--cog``).
    """

    store: Path
    plan: SegmentPlan
    computed: int
    kept: int
    cogs: tuple[Path, ...] = ()


# --------------------------------------------------------------------------- planning


def select_times(values: Sequence[str], wanted: Sequence[str], flag: str = "--time") -> list[int]:
    """Indices of the wanted times: an index (``0``, ``-1``) or a date/time prefix (``2020-02``).

    Numbers of up to three digits are indices; ``2014`` is a year. ``flag`` is the option the
    times came from, named in the errors.

    Raises:
        InvalidArgumentError: a time that matches none, or several, of ``values``.
    """
    if not wanted:
        return list(range(len(values)))
    picked: list[int] = []
    for w in wanted:
        w = w.strip()
        matches = [i for i, v in enumerate(values) if v.startswith(w)]
        if w.lstrip("-").isdigit() and len(w.lstrip("-")) < 4:  # an index (4 digits: a year)
            i = int(w)
            if not -len(values) <= i < len(values):
                raise InvalidArgumentError(
                    f"{flag} {w}: time index {i} is out of range: the store has {len(values)} "
                    "time steps"
                )
            matches = [i % len(values)]
        if len(matches) != 1:
            what = "matches no" if not matches else "matches several"
            raise InvalidArgumentError(
                f"{flag} {w} {what} time step (the store has {', '.join(values)}): "
                "give a date that picks one, or an index"
            )
        if matches[0] not in picked:
            picked.append(matches[0])
    return sorted(picked)


def plan_segment(cube: str | Path, config: SegmentConfig) -> SegmentPlan:
    """Check the cube against the model card and plan the work (metadata only).

    Raises:
        CatalogReadError / StoreMismatchError: not a complete cube.
        CheckpointError: the model is damaged (its weights do not match the card's digest),
            or was trained on other bands.
        MixedBodiesError: the cube is of another body than the model's (unless
            ``config.any_body``, which warns instead).
        InvalidArgumentError: bad times, or a tile size the model cannot take.
    """
    from planetseg.data import open_cube_dataset
    from planetseg.export import load_model
    from planetseg.model import NetConfig, receptive_radius
    from planetseg.model.inference import choose_path, this_hardware

    cube = Path(cube)
    ds = open_cube_dataset(cube)
    # The whole model, weights checked against the card's digest, before any store or worker.
    _, card = load_model(config.model)
    bands = [str(b) for b in ds["band"].values]
    if bands != card["bands"]:
        raise CheckpointError(
            f"the model was trained on bands {card['bands']} but the cube has {bands}: ingest "
            "the cube with the model's bands (--bands), or use a model trained on these"
        )
    body, model_body = ds.attrs.get("planetseg:body", ""), card.get("body", "")
    if body and model_body and body != model_body:
        message = f"the model was trained on the {model_body} and the cube is of the {body}"
        if not config.any_body:
            raise MixedBodiesError(message + ": pass --any-body to segment it all the same")
        warnings.warn(message + " (--any-body)", PlanetsegWarning, stacklevel=2)
    transform = transform_from_cf(dict(ds["spatial_ref"].attrs))
    expected = card.get("input_resolution")
    if expected and not math.isclose(abs(transform[0]), expected, rel_tol=0.05):
        warnings.warn(
            f"the cube's pixels are {abs(transform[0]):g} units and the model expects "
            f"{expected:g}: ingest the cube with --resolution {expected:g} for the model's "
            "best results",
            PlanetsegWarning,
            stacklevel=2,
        )
    net = NetConfig(**card["net"])
    tile = int(ds["image"].encoding.get("chunks", ds["image"].shape)[-1])
    if tile % net.divisor:
        raise InvalidArgumentError(
            f"the cube's tiles ({tile} px) are not a multiple of the model's {net.divisor}: "
            "re-ingest with a --tile that is"
        )
    radius = receptive_radius(net)
    halo = config.halo if config.halo is not None else radius
    halo = math.ceil(halo / net.divisor) * net.divisor  # keep windows on the pooling grid
    if halo < radius:
        warnings.warn(
            f"--halo {halo} is less than the model's receptive radius {radius}: tile edges "
            "may show seams",
            PlanetsegWarning,
            stacklevel=2,
        )
    values = [np.datetime_as_string(v, unit="s") for v in ds["time"].values]
    times = select_times(values, config.times)
    path = choose_path(config.precision, this_hardware())
    return SegmentPlan(
        cube=str(cube.resolve()),
        model=str(Path(config.model).resolve()),
        digest=card["digest"],
        times=tuple(times),
        time_values=tuple(values[t] for t in times),
        shape=(int(ds.sizes["y"]), int(ds.sizes["x"])),
        tile=tile,
        scale=int(card["scale"]),
        halo=halo,
        batch=config.batch,
        bands=len(bands),
        dtype=str(ds["image"].dtype),
        crs_wkt=str(ds["spatial_ref"].attrs["crs_wkt"]),
        transform=transform,
        classes=dict(card["classes"]),
        threads=config.threads,
        net=net.to_dict(),
        inference=path.to_dict(),
        nodata=json.loads(ds.attrs.get("planetseg:plan") or "{}").get("nodata"),
    )


#: OpenVINO's buffers over torch's channels-last tensors of the same precision, per window
#: pixel. Measured (bf16, AMD EPYC, 2-tile tasks of 64, 128 and 256 px): a task's peak RSS
#: 48, 99 and 324 MiB on OpenVINO against 22, 57 and 185 MiB on torch, i.e. 0.8-1.2 KiB more
#: per window pixel where torch's tensors are 476 B.
OPENVINO_MEMORY = 3.5


@functools.lru_cache(maxsize=16)
def _activation_per_pixel(model: str, digest: str, path: InferencePath) -> float:
    """Bytes of the network's tensors at their peak, per input pixel of a window (measured).

    One forward pass of the model as the workers run it, on a window of 16 x 16 pooling cells
    (activations grow with the pixels: the same figure per pixel at every window size, see
    ``tests/test_inference.py``).
    """
    from planetseg.model.inference import InferencePath, activation_bytes

    # Measured on this process's CPU: a GPU path's fp16 as bf16 (the same bytes per value;
    # torch's CPU fp16 convolutions are far too slow to measure with).
    precision = "bf16" if path.precision == "fp16" else path.precision
    on_cpu = replace(path, precision=precision, device="cpu")
    factor = 1.0
    if path.backend == "openvino":
        # OpenVINO's buffers are not torch tensors (nor do they show reliably in the RSS of a
        # process that reuses its freed heap): they are measured as torch's channels-last
        # tensors of the same precision, times OPENVINO_MEMORY.
        on_cpu, factor = InferencePath(precision, True, "cpu"), OPENVINO_MEMORY
    net, _ = worker_model(model, digest, on_cpu, device="cpu")
    side = 16 * net.config.divisor
    return factor * activation_bytes(net, net.config.in_bands, side, side) / side**2


# --------------------------------------------------------------------------- the worker side

_MODELS: dict[tuple[str, InferencePath, str, int], tuple[Any, dict[str, Any]]] = {}
_MODELS_LOCK = threading.Lock()


def worker_model(
    path: str, digest: str, inference: InferencePath | None = None, *, device: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """The model of ``digest`` on ``inference``'s path, loaded once per process (a cache).

    The network has its BatchNorms folded into the convolutions and is wrapped in an
    :class:`~planetseg.model.inference.InferenceNet` (float32 in and out) on ``device``: by
    default the GPU this worker claimed for a CUDA path (see
    :func:`~planetseg.model.inference.worker_device`), else the CPU.

    Raises:
        CheckpointError: the directory now holds other weights than the plan's.
    """
    import torch

    from planetseg.export import load_model
    from planetseg.model import fuse_for_inference
    from planetseg.model.inference import (
        InferenceNet,
        InferencePath,
        keep_freed_memory,
        worker_device,
    )

    keep_freed_memory()  # once per process: see its docstring (Dask workers trim every free)
    inference = inference or InferencePath()
    if device is None:
        device = worker_device() if inference.device == "cuda" else "cpu"
    # An OpenVINO model is compiled for the process's thread count (the task's --threads).
    key = (digest, inference, device, torch.get_num_threads())
    with _MODELS_LOCK:
        if key not in _MODELS:
            net, card = load_model(path)
            if card["digest"] != digest:
                raise CheckpointError(
                    f"{path} now holds model {card['digest'][:19]}..., not the planned "
                    f"{digest[:19]}...: it changed during the run"
                )
            # BatchNorm folded into the convolutions, then placed on the path's device/format.
            _MODELS[key] = (InferenceNet(fuse_for_inference(net), inference, device), card)
        return _MODELS[key]


@functools.cache
def _cube_guard(cube: str) -> ChunkGuard:
    """The chunk guard of a cube, built once per worker process rather than once per task.

    What it checks comes from the cube's attributes, which do not change once it is written.
    """
    import zarr

    return ChunkGuard.of(cube, dict(zarr.open_group(cube, mode="r").attrs))


def task_marker(index: int) -> str:
    """Name of the marker a finished task leaves in the progress folder."""
    return f"task-{index}"


def segment_task(plan: SegmentPlan, index: int, out: str) -> int:
    """Segment task ``index`` of ``plan`` into the store ``out``; return its tile count.

    Runs on a worker: reads one window of the cube (the task's tiles plus the halo), runs the
    network on it once, writes the centre's labels, confidence and (for a model with crater
    classes, into a store that has the array) crater probability chunk by chunk, then touches
    the task's marker.
    """
    import torch

    from planetseg.evaluate import padded_to_divisor

    torch.set_num_threads(plan.threads)
    net, card = worker_model(plan.model, plan.digest, plan.path)
    t_pos, iy, ix0, ix1 = plan.task(index)
    h, w = plan.shape
    tile, halo, s = plan.tile, plan.halo, plan.scale
    y0, y1 = iy * tile, min((iy + 1) * tile, h)
    x0, x1 = ix0 * tile, min(ix1 * tile, w)
    ya, yb = max(y0 - halo, 0), min(y1 + halo, h)
    xa, xb = max(x0 - halo, 0), min(x1 + halo, w)
    # The chunks read are checked (a stat each): a lost one is an error, not zeros.
    region = _cube_guard(plan.cube).read(
        "image", (plan.times[t_pos], slice(None), slice(ya, yb), slice(xa, xb))
    )
    covered = _coverage(plan.cube, (plan.times[t_pos], slice(ya, yb), slice(xa, xb)))
    region, missing = _fill_missing(region, card["normalisation"]["mean"], plan.nodata, covered)
    window = torch.from_numpy(region[None])
    mean = torch.tensor(card["normalisation"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["normalisation"]["std"]).view(1, -1, 1, 1)
    # The crater probability is left out of a store made before it existed (resumed as is).
    craters = plan.crater_values
    if craters and not (Path(out) / CRATER_PROBABILITY).is_dir():
        craters = []
    window = padded_to_divisor((window - mean) / std, net.config.divisor)
    maps = net.products(window, tuple(craters), CONFIDENCE_STEPS)
    cy, cx = slice((y0 - ya) * s, (y1 - ya) * s), slice((x0 - xa) * s, (x1 - xa) * s)
    names = ("labels", "confidence", CRATER_PROBABILITY)
    outputs = {name: m[0, cy, cx] for name, m in zip(names, maps, strict=False)}
    arrays = {name: open_for_writing(out, name) for name in outputs}
    values = {name: v.numpy() for name, v in outputs.items()}
    if missing is not None:
        unknown = missing[y0 - ya : y1 - ya, x0 - xa : x1 - xa].repeat(s, 0).repeat(s, 1)
        for name, array in values.items():
            array[unknown] = 0 if name == "labels" else NO_DATA
    ys = slice(y0 * s, y1 * s)
    # One chunk per output tile: write tile by tile so every write is a whole chunk.
    for ix in range(ix0, ix1):
        cx0, cx1 = ix * tile * s, min((ix + 1) * tile, w) * s
        lx = slice(cx0 - x0 * s, cx1 - x0 * s)
        for name, array in arrays.items():
            array[t_pos, ys, cx0:cx1] = values[name][:, lx]
    (progress_dir(Path(out)) / task_marker(index)).touch()
    return ix1 - ix0


def _coverage(cube: str, where: tuple[Any, ...]) -> np.ndarray | None:
    """Which pixels of ``where`` an item covers, for a cube that keeps it (else None).

    See :data:`planetseg.ingest.COVERAGE`: an integer cube without nodata, whose fill (0)
    is a pixel value.
    """
    import zarr

    from planetseg.ingest import COVERAGE

    if not (Path(cube) / COVERAGE).is_dir():
        return None
    return zarr.open_array(cube, path=COVERAGE, mode="r")[where].astype(bool)


def _fill_missing(
    region: Any,
    mean: Sequence[float],
    nodata: float | None = None,
    covered: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The window as float32 with its missing values filled, and which pixels miss one.

    A value is missing where it is NaN (a float cube's nodata, e.g. outside the footprint of an
    epoch appended onto the cube's grid), and a pixel where it holds the cube's declared
    ``nodata`` in every band (compared as stored) or where ``covered`` (an integer cube's
    coverage, without nodata) is False. Fed to the network they would spread through every
    convolution into the valid pixels around them: they get their band's normalisation mean
    (0 once normalised), and the pixels are marked (``NO_DATA`` confidence) in the output.

    Returns:
        ``(bands, y, x)`` float32, and the ``(y, x)`` mask of pixels with a value missing
        (None when there is none).
    """
    region = np.asarray(region)
    declared = nodata is not None and not math.isnan(nodata)
    unset = (region == nodata).all(axis=0) if declared else None
    region = region.astype(np.float32, copy=False)
    valid = np.isfinite(region)
    if unset is not None:
        valid &= ~unset
    if covered is not None:
        valid &= covered
    if valid.all():
        return region, None
    filled = np.where(valid, region, np.asarray(mean, np.float32)[:, None, None])
    return filled, ~valid.all(axis=0)


# --------------------------------------------------------------------------- the driver side


def _template(plan: SegmentPlan) -> Any:
    import dask.array as da
    import xarray as xr

    h, w = plan.out_shape
    c = plan.tile * plan.scale
    n = len(plan.times)
    coords = {
        "time": np.array(plan.time_values, dtype="datetime64[ns]"),
        **pixel_centres(plan.out_transform, plan.out_shape),
        "spatial_ref": xr.Variable(
            (), np.int32(0), attrs=cf_attrs(plan.crs_wkt, plan.out_transform)
        ),
    }
    labels = da.zeros((n, h, w), dtype="uint8", chunks=(1, c, c))
    confidence = da.zeros((n, h, w), dtype="float32", chunks=(1, c, c))
    order = sorted(plan.classes, key=int)
    flags = {
        "flag_values": [int(k) for k in order],
        "flag_meanings": " ".join(plan.classes[k] for k in order),
    }
    crater = {}
    if plan.crater_values:
        names = ", ".join(plan.classes[str(v)] for v in plan.crater_values)
        crater[CRATER_PROBABILITY] = (
            ("time", "y", "x"),
            da.zeros((n, h, w), dtype="float32", chunks=(1, c, c)),
            {"grid_mapping": "spatial_ref", "long_name": f"summed softmax of {names}"},
        )
    ds = xr.Dataset(
        {
            "labels": (
                ("time", "y", "x"),
                labels,
                {"grid_mapping": "spatial_ref", "long_name": "class", **flags},
            ),
            "confidence": (
                ("time", "y", "x"),
                confidence,
                {"grid_mapping": "spatial_ref", "long_name": "softmax probability of the class"},
            ),
            **crater,
        },
        coords=coords,
    )
    ds["x"].attrs.update(standard_name="projection_x_coordinate", axis="X")
    ds["y"].attrs.update(standard_name="projection_y_coordinate", axis="Y")
    return ds


def _create_store(
    output: Output, plan: SegmentPlan, card: dict[str, Any], cube_attrs: dict
) -> None:
    ds = _template(plan)
    ds.attrs.update(
        {
            STAGE_ATTR: "segment",
            "planetseg:complete": False,
            EVERY_CHUNK: True,
            "planetseg:product": "labels",
            "planetseg:version": __version__,
            "planetseg:segment": plan.to_json(),
            "planetseg:model": plan.digest,
            "planetseg:model_card": json.dumps({k: v for k, v in card.items() if k != "metrics"}),
            "planetseg:cube": plan.cube,
            "planetseg:cube_items": json.dumps(cube_attrs.get("planetseg:items", {})),
            "planetseg:body": cube_attrs.get("planetseg:body", ""),
            "planetseg:classes": json.dumps(plan.classes),
            INFERENCE_ATTR: json.dumps(plan.path.to_dict() | {"name": plan.path.name}),
            "planetseg:scale": plan.scale,
        }
    )
    if plan.crater_values:
        names = [plan.classes[str(v)] for v in plan.crater_values]
        ds.attrs[CRATER_PROBABILITY_ATTR] = json.dumps(names)
    c = plan.tile * plan.scale
    quantised = {
        "chunks": (1, c, c),
        "dtype": "uint8",
        "scale_factor": 1.0 / CONFIDENCE_STEPS,
        "add_offset": 0.0,
        "_FillValue": NO_DATA,
    }
    encoding = {
        "labels": {"chunks": (1, c, c), "fill_value": 0},
        **{name: dict(quantised) for name in plan.output_arrays[1:]},
    }
    try:
        ds.to_zarr(
            str(output.path),
            mode="w",
            compute=False,
            zarr_format=3,
            consolidated=False,
            encoding=encoding,
        )
    except BaseException:
        output.discard()
        raise
    consolidate(output.path)


def _existing(store: Path, plan: SegmentPlan) -> tuple[bool, set[str]]:
    """(complete, markers) of an earlier run into ``store``, or (False, empty) if none.

    ``store`` has passed :func:`~planetseg.store.prepare_output`: absent, empty or segment's.

    Raises:
        StoreMismatchError: the store holds a run with other settings.
    """
    if not (store / "zarr.json").exists():
        return False, set()
    old = get_attr(store, "planetseg:segment")
    if old is None:
        raise StoreMismatchError(f"{store} is not a planetseg labels store: choose another --out")
    if not SegmentPlan.from_json(old).same_work(plan):
        raise StoreMismatchError(
            f"{store} holds a segmentation with other settings (model, cube, times, tile, halo, "
            f"batch or --precision: it ran {SegmentPlan.from_json(old).path.name}): choose "
            "another --out, or delete it"
        )
    return bool(get_attr(store, "planetseg:complete")), done_markers(store)


def _inference_path(
    store: Path, plan: SegmentPlan, config: SegmentConfig, client: Any
) -> SegmentPlan:
    """``plan`` on the inference path its tasks run, when ``--precision`` is auto.

    A store is computed on one path throughout: ``auto`` continues an earlier run's path (the
    fp32 reference for stores made before paths were recorded); a new store takes the path
    for the hardware of the cluster's first worker (a batch job's GPU node, not the login
    node the plan was made on). A precision given explicitly must match an earlier run's
    (see :meth:`SegmentPlan.same_work`).
    """
    if config.precision != "auto":
        return plan
    from planetseg.model.inference import choose_path, this_hardware

    old = get_attr(store, "planetseg:segment") if (store / "zarr.json").exists() else None
    if old is not None:
        path = SegmentPlan.from_json(old).path
    elif client is not None and client.scheduler_info()["workers"]:
        first = sorted(client.scheduler_info()["workers"])[0]
        path = choose_path("auto", client.run(this_hardware, workers=[first])[first])
    else:
        return plan
    return replace(plan, inference=path.to_dict())


def segment(
    cube: str | Path,
    config: SegmentConfig,
    *,
    client: Any = None,
    progress: Progress | None = None,
    plan: SegmentPlan | None = None,
) -> SegmentResult:
    """Segment every selected tile of ``cube`` into ``config.out`` (resumes an unfinished run).

    Args:
        cube: A complete cube made by ``ingest``.
        config: What to segment and how.
        client: Dask client to compute on; None runs the tasks in this process.
        progress: Called with (tiles done, tiles total).
        plan: A plan made by :func:`plan_segment` for ``cube`` and ``config`` (made if None).

    Raises:
        PlanetsegError: see :func:`plan_segment`; StoreMismatchError if ``config.out`` holds
            a run with other settings; OutputPathError if ``config.out`` or ``config.cog`` is
            an input, a file, not writable or holds what segment did not write (see
            :func:`planetseg.store.prepare_output`).
    """
    from planetseg.export import read_card

    store = Path(config.out)
    output = prepare_output(
        store,
        "segment",
        kind="store",
        inputs=(cube, config.model, config.cog),
        scratch=(PROGRESS_SUFFIX,),
    )
    if config.cog:
        prepare_output(config.cog, "segment", inputs=(cube, config.model, store), flag="--cog")
    plan = _inference_path(store, plan or plan_segment(cube, config), config, client)
    complete, done = _existing(store, plan)
    kept = sum(plan.tiles_of(int(m.split("-")[1])) for m in done if m.startswith("task-"))
    lost = _lost_tasks(store, plan) if complete else set()
    if complete and not lost:
        logger.info("%s is complete: nothing to do", store)
        return SegmentResult(store, plan, 0, plan.n_tiles, _export_cogs(store, plan, config))
    if lost:
        # A complete store that lost chunks: redo their tasks, marked unfinished meanwhile.
        logger.warning("%s: %d task(s) lost chunks: segmenting them again", store, len(lost))
        set_attrs(store, **{"planetseg:complete": False})
        kept = plan.n_tiles - sum(plan.tiles_of(i) for i in lost)
    if not (store / "zarr.json").exists():
        remove_owned(progress_dir(store), "segment")  # markers of a store that is gone
        _create_store(output, plan, read_card(config.model), _cube_attrs(plan.cube))
    else:
        drop_partial_writes(store)
    create_owned_dir(progress_dir(store), "segment")
    total = plan.n_tiles
    if progress:
        progress(kept, total)
    indices = iter(sorted(lost)) if lost else pending(plan, done)
    computed = _run(plan, str(store), indices, client, config, progress, kept, total)
    set_attrs(store, **{"planetseg:complete": True})
    consolidate(store)
    remove_owned(progress_dir(store), "segment")
    logger.info("%s: %d tiles segmented, %d kept", store, computed, kept)
    return SegmentResult(store, plan, computed, kept, _export_cogs(store, plan, config))


def _lost_tasks(store: Path, plan: SegmentPlan) -> set[int]:
    """Tasks of a complete store (that writes every chunk) whose output chunks are missing."""
    if not get_attr(store, EVERY_CHUNK):
        return set()
    per_time = plan.tiles_yx[0] * plan.runs_per_row
    return {
        t * per_time + iy * plan.runs_per_row + ix // plan.batch
        for name in plan.output_arrays
        if (store / name).is_dir()
        for t, iy, ix in missing_chunks(store, name)
    }


def _cube_attrs(cube: str) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(cube, mode="r").attrs)


def in_flight(config: SegmentConfig, client: Any) -> InFlight:
    """Tasks kept on the cluster at once: ``config.partition``, or 4 per worker thread (>= 8).

    Without ``--partition`` the limit follows the cluster's current thread count, so workers
    that join an adaptive cluster get work; in this process the tasks run one after the other.
    """
    return InFlight(client, fixed=config.partition, per_thread=4, minimum=8)


def _run(
    plan: SegmentPlan,
    store: str,
    indices: Iterator[int],
    client: Any,
    config: SegmentConfig,
    progress: Progress | None,
    done: int,
    total: int,
) -> int:
    # The plan is a few hundred bytes: each task carries it, so any worker (a replacement for a
    # killed one too) can run any task. The model is never sent: see worker_model.
    return execute(
        segment_task,
        plan,
        indices,
        store,
        client=client,
        in_flight=in_flight(config, client),
        progress=progress,
        done=done,
        total=total,
        name=f"segment-{plan.digest[-12:]}",
    )


# --------------------------------------------------------------------------- COGs


def _export_cogs(store: Path, plan: SegmentPlan, config: SegmentConfig) -> tuple[Path, ...]:
    if not config.cog:
        return ()
    import zarr

    from planetseg.cog import write_cog
    from planetseg.palette import class_colormap

    folder = create_owned_dir(Path(config.cog), "segment")
    classes = {int(k): v for k, v in plan.classes.items()}
    # Labels: every pixel is segmented, so no nodata; one colour and one name per class.
    # Confidence: 255 is the store's fill value of pixels never written.
    kinds = {
        "labels": {
            "categorical": True,
            "description": "class",
            "classes": classes,
            "colormap": class_colormap(classes),
        },
        "confidence": {
            "categorical": False,
            "nodata": 255,
            "description": f"confidence x {CONFIDENCE_STEPS}",
        },
    }
    written = []
    for t_pos, when in enumerate(plan.time_values):
        stamp = when.replace(":", "").replace("-", "")
        for name, kind in kinds.items():
            array = zarr.open_array(str(store), path=name, mode="r")
            path = folder / f"{name}-{stamp}.tif"
            write_cog(
                path,
                lambda ys, xs, a=array, t=t_pos: a[t, ys, xs],
                shape=plan.out_shape,
                dtype="uint8",
                crs_wkt=plan.crs_wkt,
                transform=plan.out_transform,
                block=plan.tile * plan.scale,
                tags={"planetseg_model": plan.digest, "planetseg_time": when},
                **kind,
            )
            written.append(path)
    return tuple(written)
