"""Training: DDP really synchronises, resume is exact, the export is safe and detached."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from planetseg.config import IngestConfig, TrainConfig
from planetseg.errors import CheckpointError, InvalidArgumentError
from planetseg.export import WEIGHTS, load_model
from planetseg.ingest import ingest
from planetseg.store import create_owned_dir
from planetseg.synthetic import SynthConfig, synthesize
from planetseg.train import train
from tests.test_cli import assert_one_line_error, planetseg, start_planetseg

TINY = dict(width=8, depth=2, crop=32, batch_size=4, val_every=1000, checkpoint_every=1000)


@pytest.fixture(scope="module")
def small_cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    world = synthesize(root / "world", config=SynthConfig(size=256, seed=3))
    ingest(world.items, IngestConfig(out=str(root / "cube.zarr"), labels="labels", tile=128))
    return root / "cube.zarr"


def _rank_main(rank: int, port: int, cube: str, out: str, world: int) -> None:
    """One rank of a real gloo group, running planetseg's own training loop."""
    import torch.distributed as dist

    from planetseg.data import open_training_data
    from planetseg.train import train_loop

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    config = TrainConfig(out=f"{out}/run{world}", steps=1, **TINY)
    data = open_training_data([cube], crop=config.crop, val_fraction=config.val_fraction)
    model = train_loop(rank, world, data, config, torch.device("cpu"))
    torch.save(model.state_dict(), f"{out}/world{world}-rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def test_ddp_synchronises_gradients(small_cube: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from planetseg.train import _free_port

    mp.spawn(_rank_main, args=(_free_port(), str(small_cube), str(tmp_path), 2), nprocs=2)
    _rank_main(0, 0, str(small_cube), str(tmp_path), 1)  # rank 0's batch alone, no sync
    r0 = torch.load(tmp_path / "world2-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "world2-rank1.pt", weights_only=True)
    alone = torch.load(tmp_path / "world1-rank0.pt", weights_only=True)
    weights = [k for k in r0 if k.endswith("weight")]
    assert all(torch.equal(r0[k], r1[k]) for k in weights)
    # and the step really used rank 1's gradients: rank 0 alone ends elsewhere
    assert any(not torch.equal(r0[k], alone[k]) for k in weights)


def _losses(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_learn_like_one(small_cube: Path, tmp_path: Path) -> None:
    curves = {}
    for n in (1, 2):
        # Unweighted CE: its level is comparable across runs and falls fast enough in 80 steps
        # (the weighted default emphasises the rare crater classes and falls more slowly).
        config = TrainConfig(
            out=str(tmp_path / f"n{n}"), steps=80, nproc=n, class_weights="none", **TINY
        )
        train(small_cube, config)
        curves[n] = _losses(tmp_path / f"n{n}", "ce")
    # Same shape: both fall by a similar factor and end at a similar level (the ranks see
    # different windows, so the curves are not identical).
    drops = {}
    for n, ce in curves.items():
        start, end = sum(ce[:10]) / 10, sum(ce[-10:]) / 10
        drops[n] = end / start
        assert drops[n] < 0.75, (n, start, end)
    assert abs(drops[1] - drops[2]) < 0.2, drops
    end1, end2 = sum(curves[1][-10:]) / 10, sum(curves[2][-10:]) / 10
    assert abs(end1 - end2) / end1 < 0.3


@pytest.mark.slow  # 22-37 s: the default run stays under 15 min
def test_kill_and_resume_equals_uninterrupted(small_cube: Path, tmp_path: Path) -> None:
    args = [
        "train",
        str(small_cube),
        "--steps",
        "200",
        "--width",
        "8",
        "--depth",
        "2",
        "--crop",
        "32",
        "--batch-size",
        "4",
        "--val-every",
        "1000",
        "--checkpoint-every",
        "4",
    ]
    # Windows streamed in this process for the clean run, by 2 loader workers for the killed
    # one: the weights agree only if the batches depend on neither the workers nor the kill.
    clean = planetseg(*args, "--out", str(tmp_path / "clean"), "--loader-workers", "0", timeout=300)
    assert clean.returncode == 0, clean.stderr
    args += ["--loader-workers", "2"]
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "planetseg.cli", *args, "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ckpt = run / "checkpoint.pt"
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 8:
            break
        time.sleep(0.05)
    helpers = psutil.Process(proc.pid).children(recursive=True)  # the loader's processes
    assert helpers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(helpers, timeout=30)
    assert not alive, "a loader worker outlived the killed run"
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 8 <= step < 200, "the kill must land mid-run"
    assert not (run / "model").exists()
    resumed = planetseg(*args, "--out", str(run), "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = (tmp_path / "clean" / "model" / WEIGHTS).read_bytes()
    b = (run / "model" / WEIGHTS).read_bytes()
    assert a == b
    assert _losses(run) == _losses(tmp_path / "clean")


def test_export_is_detached_and_loads_without_pickle(small_cube: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model_dir = train(small_cube, TrainConfig(out=str(tmp_path / "run"), steps=2, **TINY))
    tensors = load_file(str(model_dir / WEIGHTS))
    assert not any(k.startswith(("sr_", "feature_transform")) for k in tensors)
    net, card = load_model(model_dir)
    assert card["bands"] == ["image"] and card["scale"] == 2
    assert card["digest"].startswith("sha256:")
    assert set(card["normalisation"]) == {"mean", "std"}
    assert card["classes"]["2"] == "fresh_crater"
    recipe = {k: card["training"]["config"][k] for k in ("class_weights", "loss", "augment")}
    assert recipe == {"class_weights": "sqrt", "loss": "ce", "augment": "photometric"}
    assert card["training"]["config"]["foreground_windows"] == 0.0
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (1, card["net"]["num_classes"], 64, 64)
    # the checkpoint, too, loads with weights_only=True (no code execution)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2


def test_evaluate_reports_per_class_scores(small_cube: Path, tmp_path: Path) -> None:
    model_dir = train(small_cube, TrainConfig(out=str(tmp_path / "run"), steps=2, **TINY))
    out = tmp_path / "scores.json"
    proc = planetseg("evaluate", str(model_dir), str(small_cube), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert set(scores["per_class"]) == {"plains", "highlands", "fresh_crater", "degraded_crater"}
    assert 0 <= scores["miou"] <= 1
    cm = scores["confusion"]
    assert sum(map(sum, cm)) == 3 * 256 * 256  # every HR pixel of every epoch, once
    assert "mIoU" in proc.stdout
    # Tile by tile (32 px LR tiles: 16 a step, each reading its own window) equals one pass
    # over each whole time step (argmax ties of float rounding aside: at most 1e-4).
    from planetseg.data import Degradation, open_cube
    from planetseg.evaluate import evaluate, predict_logits
    from planetseg.metrics import confusion_matrix

    tiled = np.array(evaluate(model_dir, small_cube, tile=32)["confusion"])
    net, card = load_model(model_dir)
    cube, degrade = open_cube(small_cube), Degradation(**card["degradation"])
    mean, std = (torch.tensor(card["normalisation"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    whole = np.zeros_like(tiled)
    for t in range(3):
        hr = torch.from_numpy(cube.read("image", (t, slice(None))).astype(np.float32)[None])
        pred = predict_logits(net, degrade((hr - mean) / std), tile=None).argmax(1)[0].numpy()
        whole += confusion_matrix(cube.labels_at(t, slice(None), slice(None)), pred, len(whole))
    for other in (whole, np.array(cm)):  # one pass, and the CLI's 512 px tiles
        assert np.abs(tiled - other).sum() / 2 <= 1e-4 * other.sum(), (tiled, other)


@pytest.mark.slow
def test_bad_training_input(small_cube: Path, tmp_path: Path) -> None:
    nolabels = tmp_path / "nolabels.zarr"
    world = synthesize(tmp_path / "w", config=SynthConfig(size=128))
    ingest(world.items, IngestConfig(out=str(nolabels), tile=64))
    assert_one_line_error(
        planetseg("train", str(nolabels), "--out", str(tmp_path / "a")), "no labels", "--labels"
    )
    assert_one_line_error(
        planetseg("train", str(small_cube), "--out", str(tmp_path / "b"), "--crop", "36"),
        "--crop 36",
    )
    run = create_owned_dir(tmp_path / "c", "train")  # a run folder whose checkpoint broke
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(
        planetseg("train", str(small_cube), "--out", str(run), "--resume"), "unreadable"
    )
    with pytest.raises(InvalidArgumentError, match="batch-size"):
        train(small_cube, TrainConfig(out=str(tmp_path / "d"), nproc=3, batch_size=4))


def test_band_mismatch_between_model_and_cube(small_cube: Path, tmp_path: Path) -> None:
    model_dir = train(small_cube, TrainConfig(out=str(tmp_path / "run"), steps=1, **TINY))
    world = synthesize(tmp_path / "w", config=SynthConfig(size=128))
    two_bands = tmp_path / "two.zarr"
    ingest(
        world.items,
        IngestConfig(out=str(two_bands), bands=("image", "labels"), labels="labels", tile=64),
    )
    assert_one_line_error(planetseg("evaluate", str(model_dir), str(two_bands)), "bands", "--bands")
    with pytest.raises(CheckpointError):
        load_model(tmp_path)


# The same short run, launched three ways: --nproc 2, torchrun, and interrupted then resumed.
DDP_ARGS = (
    "--steps", "40", "--width", "8", "--depth", "2", "--crop", "32", "--batch-size", "4",
    "--val-every", "1000", "--checkpoint-every", "4",
)  # fmt: skip


@pytest.fixture(scope="module")
def two_process_run(small_cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("nproc2") / "run"
    proc = planetseg("train", str(small_cube), "--out", str(run), "--nproc", "2", *DDP_ARGS)
    assert proc.returncode == 0, proc.stderr
    # not a terminal: progress comes as log lines, from rank 0 only
    assert proc.stderr.count("planetseg: train step 40/40 loss ") == 1, proc.stderr
    return run


@pytest.mark.slow
def test_torchrun_equals_nproc(small_cube: Path, two_process_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "torchrun"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "planetseg.cli", "train", str(small_cube), "--out", str(run), *DDP_ARGS],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model -> ") == 1 and "mIoU" in proc.stdout  # rank 0 speaks
    assert proc.stderr.count("planetseg: train step 40/40 loss ") == 1, proc.stderr
    a = (two_process_run / "model" / WEIGHTS).read_bytes()
    assert (run / "model" / WEIGHTS).read_bytes() == a


def test_batch_size_is_checked_against_torchruns_world(
    small_cube: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InvalidArgumentError, match="--batch-size 4 .* WORLD_SIZE 3"):
        train(small_cube, TrainConfig(out=str(tmp_path / "a"), batch_size=4))
    with pytest.raises(InvalidArgumentError, match="--nproc 3 under torchrun"):
        train(small_cube, TrainConfig(out=str(tmp_path / "b"), batch_size=3, nproc=3))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow  # 22-37 s: the default run stays under 15 min
def test_ctrl_c_stops_at_a_checkpoint_and_resume_finishes(
    small_cube: Path, two_process_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = start_planetseg("train", str(small_cube), "--out", str(run), "--nproc", "2", *DDP_ARGS)
    ckpt = run / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("planetseg: interrupted at step "), stderr
    assert "Traceback" not in stderr
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 4 <= step < 40, "the interrupt must land mid-run"
    command = lines[-1].split("resume with: ", 1)[1]
    assert lines[-1].startswith(f"planetseg: interrupted at step {step}; resume with: planetseg ")
    assert command.endswith(" --resume") and f"--out {run}" in command
    assert not (run / "model").exists()  # nothing a later run could take for finished
    assert len(_losses(run)) == step
    resumed = planetseg(*shlex.split(command)[1:], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = (two_process_run / "model" / WEIGHTS).read_bytes()
    assert (run / "model" / WEIGHTS).read_bytes() == a


@pytest.mark.slow
def test_sigkill_of_two_ranks_and_resume_equals_uninterrupted(
    small_cube: Path, two_process_run: Path, tmp_path: Path
) -> None:
    # What a scheduler does at a job's time limit or on preemption: SIGKILL to every process of
    # the job (the parent, both ranks, their loader workers), with no chance to checkpoint.
    run = tmp_path / "run"
    args = ["train", str(small_cube), "--out", str(run), "--nproc", "2", *DDP_ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "planetseg.cli", *args, "--loader-workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = run / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 8:
            break
        time.sleep(0.05)
    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 8 <= step < 40, "the kill must land mid-run"
    assert not (run / "model").exists()
    resumed = planetseg(*args, "--loader-workers", "2", "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = (two_process_run / "model" / WEIGHTS).read_bytes()
    assert (run / "model" / WEIGHTS).read_bytes() == a
    assert _losses(run) == _losses(two_process_run)


# Streaming: windows read by index from one or several cubes, in DataLoader workers.


def test_streamed_statistics_equal_the_in_memory_ones(small_cube: Path) -> None:
    import numpy as np
    import xarray as xr

    from planetseg.data import open_training_data

    data = open_training_data([small_cube], crop=32, val_fraction=0.25)
    train = data.splits[0].train
    ds = xr.open_zarr(small_cube)
    image = ds["image"].values.astype(np.float32)[..., train]  # what train read before
    labels = ds["labels"].values.astype(np.int64)
    np.testing.assert_allclose(data.stats.mean, image.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(data.stats.std, image.std(axis=(0, 2, 3)), rtol=1e-5)
    counts = np.bincount(labels[..., train].ravel(), minlength=data.num_classes)
    freq = counts / counts.sum()
    want = np.where(freq > 0, np.median(freq[freq > 0]) / np.maximum(freq, 1e-12), 0)
    np.testing.assert_allclose(data.loss_weights("balanced"), want, rtol=1e-6)
    assert data.num_classes == int(labels.max()) + 1 == 4
    assert data.label_dtype == np.uint8


def test_loader_workers_do_not_change_the_batches(small_cube: Path) -> None:
    import numpy as np

    from planetseg.data import WindowSampler, open_training_data, streamed_batches

    data = open_training_data([small_cube], crop=32, val_fraction=0.25)
    sampler = WindowSampler(data, crop=32, seed=5, foreground=0.5)
    batches = {
        workers: list(streamed_batches(sampler, 1, 4, range(3, 9), workers)) for workers in (0, 2)
    }
    assert len(batches[0]) == len(batches[2]) == 6
    for (hr0, lab0), (hr2, lab2) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(hr0, hr2) and torch.equal(lab0, lab2)
        assert lab0.dtype == torch.uint8 and hr0.shape == (4, 1, 32, 32)
    # a batch is the function of its step: the same whatever range it was read in
    hr, labels = sampler.batch(5, 1, 4)
    np.testing.assert_array_equal(batches[0][2][0].numpy(), hr)
    np.testing.assert_array_equal(batches[0][2][1].numpy(), labels)


@pytest.fixture(scope="module")
def other_cubes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Moon cube of another world's seed, and a Mars cube (128 px each)."""
    root = tmp_path_factory.mktemp("others")
    cubes = {}
    for name, crs in (("moon", "IAU_2015:30110"), ("mars", "IAU_2015:49910")):
        world = synthesize(root / name, config=SynthConfig(size=128, seed=11, crs=crs))
        cubes[name] = root / f"{name}.zarr"
        ingest(world.items, IngestConfig(out=str(cubes[name]), labels="labels", tile=64))
    return cubes


@pytest.mark.slow
def test_training_on_two_cubes_of_one_body(
    small_cube: Path, other_cubes: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "scenes"  # a folder of cubes is its cubes
    folder.mkdir()
    (folder / "b.zarr").symlink_to(other_cubes["moon"], target_is_directory=True)
    (folder / "a.zarr").symlink_to(small_cube, target_is_directory=True)
    args = ["--steps", "3", "--width", "8", "--depth", "2", "--crop", "32", "--batch-size", "4"]
    proc = planetseg("train", str(folder), "--out", str(tmp_path / "run"), *args)
    assert proc.returncode == 0, proc.stderr
    _, card = load_model(tmp_path / "run" / "model")
    assert card["training"]["cubes"] == [
        str((folder / "a.zarr").resolve()),
        str((folder / "b.zarr").resolve()),
    ]
    # validation scored both cubes' strips: 3 + 3 time steps of 256 x 64 and 128 x 32 px
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(map(sum, last["val"]["confusion"])) == 3 * (256 * 64 + 128 * 32)

    mixed = planetseg("train", str(small_cube), str(other_cubes["mars"]), "--out",
                      str(tmp_path / "mixed"), *args)  # fmt: skip
    assert_one_line_error(mixed, "mix bodies", "moon", "mars", str(other_cubes["mars"]))
    assert not (tmp_path / "mixed").exists()


def test_validation_shared_by_two_ranks_equals_one_process(
    small_cube: Path, two_process_run: Path, tmp_path: Path
) -> None:
    # The last validation of the --nproc 2 run, scored half by each rank and all-reduced, is
    # the single-process evaluation of the exported weights on the held-out strip, pixel for
    # pixel (rank 1's tiles with rank 0's BatchNorm statistics).
    records = [json.loads(line) for line in (two_process_run / "metrics.jsonl").open()]
    shared = records[-1]["val"]
    out = tmp_path / "val.json"
    proc = planetseg(
        "evaluate", str(two_process_run / "model"), str(small_cube), "--region", "val",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    alone = json.loads(out.read_text())
    assert shared["confusion"] == alone["confusion"]
    assert shared["miou"] == alone["miou"]
    assert sum(map(sum, shared["confusion"])) == 3 * 256 * 64  # 3 epochs x the 64 px strip
    card = json.loads((two_process_run / "model" / "model.json").read_text())
    assert card["metrics"]["miou"] == alone["miou"]
    assert card["training"]["runtime"] == {
        "device": "cpu", "precision": "fp32", "backend": "gloo", "world_size": 2,
    }  # fmt: skip


def test_device_backend_and_precision_choice() -> None:
    from planetseg.train import choose_backend, choose_device, choose_precision

    assert choose_device(3, 0, processes="--nproc 4") == torch.device("cpu")
    assert choose_device(1, 2, processes="--nproc 2") == torch.device("cuda", 1)
    with pytest.raises(InvalidArgumentError, match=r"--nproc 4: this node has 2 CUDA device"):
        choose_device(3, 2, processes="--nproc 4")
    assert choose_backend(torch.device("cuda", 1)) == "nccl"
    assert choose_backend(torch.device("cpu")) == "gloo"

    avx2 = frozenset({"avx2", "fma"})
    avx512_bf16 = avx2 | {"avx512f", "avx512_bf16"}
    amx = avx2 | {"amx_bf16", "amx_tile"}

    def choose(amp: str, device: str, *, cuda_bf16: bool = False, flags=avx2) -> str:
        return choose_precision(amp, device, cuda_bf16=cuda_bf16, cpu_flags=flags)

    for device in ("cpu", "cuda"):
        assert choose("off", device, cuda_bf16=True, flags=amx) == "fp32"
    assert choose("auto", "cpu") == "fp32"  # AVX2 only: no native bfloat16
    assert choose("auto", "cpu", flags=avx512_bf16) == "bf16"  # as segment's auto
    assert choose("auto", "cpu", flags=amx) == "bf16"
    assert choose("bf16", "cpu") == "bf16"  # emulated on AVX2: slow, but it works
    with pytest.raises(InvalidArgumentError, match="--amp fp16 needs a CUDA device"):
        choose("fp16", "cpu", flags=amx)
    assert choose("auto", "cuda", cuda_bf16=True) == "bf16"
    assert choose("auto", "cuda", cuda_bf16=False) == "fp16"
    assert choose("fp16", "cuda", cuda_bf16=True) == "fp16"
    with pytest.raises(InvalidArgumentError, match="--amp bf16: this GPU has no bfloat16"):
        choose("bf16", "cuda", cuda_bf16=False)


def test_bf16_autocast_on_the_cpu_trains_and_exports(small_cube: Path, tmp_path: Path) -> None:
    runs = {}
    for amp in ("off", "bf16"):
        config = TrainConfig(out=str(tmp_path / amp), steps=2, amp=amp, channels_last=True, **TINY)
        model_dir = train(small_cube, config)
        runs[amp] = _losses(tmp_path / amp)
        card = json.loads((model_dir / "model.json").read_text())
        assert card["training"]["config"]["amp"] == amp
        assert card["training"]["config"]["channels_last"] is True
        expected = "bf16" if amp == "bf16" else "fp32"
        assert card["training"]["runtime"]["precision"] == expected
        net, _ = load_model(model_dir)  # float32 weights, contiguous: loads as any model
        assert all(p.dtype == torch.float32 for p in net.parameters())
    # the first step starts from the same weights and batch: only the forward's precision
    # differs, so bf16's loss is close to float32's but not equal
    assert runs["bf16"][0] != runs["off"][0]
    assert abs(runs["bf16"][0] - runs["off"][0]) < 0.05 * runs["off"][0]
    assert all(math.isfinite(v) for v in runs["bf16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_the_gpu_trains_with_a_loss_scale(small_cube: Path, tmp_path: Path) -> None:
    config = TrainConfig(out=str(tmp_path / "run"), steps=4, amp="fp16", channels_last=True, **TINY)
    card = json.loads((train(small_cube, config) / "model.json").read_text())
    assert card["training"]["runtime"]["device"] == "cuda"
    assert card["training"]["runtime"]["precision"] == "fp16"
    assert "scaler" in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on this machine's GPU")
def test_fp16_without_a_gpu_is_one_line(small_cube: Path, tmp_path: Path) -> None:
    proc = planetseg("train", str(small_cube), "--out", str(tmp_path / "run"), "--amp", "fp16")
    assert_one_line_error(proc, "--amp fp16 needs a CUDA device", "--amp bf16")
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()  # refused before anything was written
