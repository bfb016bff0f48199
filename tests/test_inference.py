"""Inference paths (``--precision``), GPU placement per worker, and the measured activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from planetseg.config import SegmentConfig
from planetseg.errors import InvalidArgumentError, StoreMismatchError
from planetseg.model import NetConfig, SegmentationNet, fuse_for_inference
from planetseg.model.inference import (
    Hardware,
    InferenceNet,
    InferencePath,
    activation_bytes,
    choose_path,
    claim_gpu,
    cpu_flags,
    keep_freed_memory,
    openvino_cache,
    pixel_products,
    this_hardware,
    visible_gpus,
)
from planetseg.segment import INFERENCE_ATTR, plan_segment, segment
from tests.test_cli import assert_one_line_error, planetseg

ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_tile"}


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\nbogomips : 1\n"
    assert cpu_flags(text) == {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu_flags("processor : 0\n") == frozenset()


def test_auto_takes_bf16_only_where_the_hardware_has_it() -> None:
    cpu = choose_path("auto", Hardware(cpu_flags=frozenset({"avx2"})))
    assert cpu == InferencePath("fp32", True, "cpu")
    assert choose_path("auto", Hardware(cpu_flags=ZEN4)).precision == "bf16"  # AVX-512 BF16
    assert choose_path("auto", Hardware(cpu_flags=SAPPHIRE_RAPIDS)).precision == "bf16"
    assert choose_path("auto", Hardware(cuda=True, cuda_bf16=True)) == InferencePath(
        "bf16", True, "cuda"
    )
    assert choose_path("auto", Hardware(cuda=True)).precision == "fp16"
    # fp32 is the reference whatever the hardware: torch's default layout, no autocast
    for hw in (Hardware(cpu_flags=SAPPHIRE_RAPIDS), Hardware(cuda=True, cuda_bf16=True)):
        assert choose_path("fp32", hw) in (InferencePath(), InferencePath(device="cuda"))
    assert choose_path("bf16", Hardware()).precision == "bf16"
    with pytest.raises(InvalidArgumentError, match="fp16 needs a CUDA GPU"):
        choose_path("fp16", Hardware(cpu_flags=SAPPHIRE_RAPIDS))
    with pytest.raises(InvalidArgumentError, match="--precision"):
        SegmentConfig(out="x", model="m", precision="int8")


def test_auto_takes_openvino_on_a_cpu_where_it_is_installed() -> None:
    with_openvino = Hardware(cpu_flags=ZEN4, openvino=True)
    assert choose_path("auto", with_openvino) == InferencePath("bf16", False, "cpu", "openvino")
    avx2 = choose_path("auto", Hardware(cpu_flags=frozenset({"avx2"}), openvino=True))
    assert (avx2.precision, avx2.backend, avx2.name) == ("fp32", "openvino", "cpu fp32 openvino")
    # a GPU stays on torch; explicit precisions are torch's (fp32: the eager reference)
    gpu = Hardware(cuda=True, cuda_bf16=True, openvino=True)
    assert choose_path("auto", gpu).backend == "torch"
    assert choose_path("fp32", with_openvino) == InferencePath()
    assert choose_path("bf16", with_openvino) == InferencePath("bf16", True, "cpu")
    assert this_hardware().openvino  # the test extra installs it


def test_workers_keep_freed_memory_for_the_next_pass() -> None:
    # glibc (this project's Linux) has mallopt; set once per process, whatever Dask's nanny set
    assert keep_freed_memory()


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({}, 2) == ["0", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 2) == ["2", "3"]
    # dask-cuda: each worker's own GPU first
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,0,1,2"}, 4)[0] == "3"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a1, GPU-b2"}, 2) == ["GPU-a1", "GPU-b2"]


def test_worker_processes_of_one_job_claim_one_gpu_each(tmp_path: Path) -> None:
    # Three workers of a 2-GPU job (flock locks conflict between open files, as between
    # processes): one GPU each, then the third shares the first.
    first, a = claim_gpu(["0", "1"], tmp_path)
    second, b = claim_gpu(["0", "1"], tmp_path)
    third, c = claim_gpu(["0", "1"], tmp_path)
    assert (first, second, third) == (0, 1, 0) and c is None
    a.close()  # a worker that exits frees its GPU for the next one
    assert claim_gpu(["0", "1"], tmp_path)[0] == 0
    # dask-cuda workers, each listing its own GPU first, each get their own
    assert claim_gpu(["5", "4"], tmp_path / "cuda")[0] == 0
    assert claim_gpu(["4", "5"], tmp_path / "cuda")[0] == 0
    b.close()


_DEVICE_OF_A_PROCESS = """
import json, os, sys
os.environ["CUDA_VISIBLE_DEVICES"] = sys.argv[1]
import torch
from planetseg.model.inference import worker_device
print(json.dumps(worker_device()))
"""


@pytest.mark.cuda
def test_two_processes_on_a_gpu_node_take_different_gpus(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    env = os.environ | {"SLURM_JOB_ID": f"test-{tmp_path.name}"}  # a job of its own
    cmd = [sys.executable, "-c", _DEVICE_OF_A_PROCESS, "0,1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    devices = {json.loads(p.communicate()[0]) for p in procs}
    assert devices == {"cuda:0", "cuda:1"}


def test_paths_compute_the_same_function() -> None:
    torch.manual_seed(0)
    net = fuse_for_inference(SegmentationNet(NetConfig(1, 3, 2, 8, 2, 8)).eval())
    x = torch.randn(1, 1, 48, 64)
    with torch.inference_mode():
        ref = InferenceNet(net, InferencePath())(x)
        cl = InferenceNet(net, InferencePath("fp32", True))(x)
        bf = InferenceNet(net, InferencePath("bf16", True))(x)
    assert cl.dtype == bf.dtype == torch.float32 and cl.is_contiguous()
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bf, ref, rtol=0.1, atol=0.1)


def test_openvino_computes_the_same_function_at_any_window_size() -> None:
    torch.manual_seed(0)
    net = fuse_for_inference(SegmentationNet(NetConfig(2, 3, 2, 8, 2, 8)).eval())
    fp32 = InferenceNet(net, InferencePath("fp32", backend="openvino"))
    bf16 = InferenceNet(net, InferencePath("bf16", backend="openvino"))
    # one compiled model for every window a run meets (interior, edges, corners) and batches
    for shape in ((1, 2, 48, 64), (1, 2, 40, 72), (2, 2, 16, 16)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            ref = InferenceNet(net, InferencePath())(x)
            out = fp32(x)
            assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bf16(x), ref, rtol=0.1, atol=0.1)
            kept = out.clone()
            fp32(torch.randn(*shape))  # the request's output buffer is reused: out is a copy
            assert torch.equal(out, kept)


def test_products_are_those_of_the_logits_on_every_path() -> None:
    """segment's uint8 maps: torch computes them from its logits; OpenVINO inside its graph
    (no float logits leave it), the same maps but for float rounding."""
    torch.manual_seed(2)
    net = fuse_for_inference(SegmentationNet(NetConfig(2, 4, 2, 8, 2, 8)).eval())
    x = torch.randn(2, 2, 40, 72)
    with torch.inference_mode():
        reference = InferenceNet(net, InferencePath())
        want = pixel_products(reference(x), (1, 3), 254)
        assert [m.dtype for m in want] == [torch.uint8] * 3 and want[0].shape == (2, 80, 144)
        prob = torch.softmax(reference(x), 1)
        assert torch.equal(want[0], prob.argmax(1).to(torch.uint8))
        assert torch.equal(want[2], torch.round((prob[:, 1] + prob[:, 3]) * 254).to(torch.uint8))
        for m, w in zip(reference.products(x, (1, 3), 254), want, strict=True):
            assert torch.equal(m, w)
        openvino = InferenceNet(net, InferencePath("fp32", backend="openvino"))
        labels, confidence, craters = openvino.products(x, (1, 3), 254)
        assert labels.dtype == torch.uint8 and labels.shape == want[0].shape
        assert (labels == want[0]).float().mean() > 0.999
        for got, w in ((confidence, want[1]), (craters, want[2])):
            assert (got.int() - w.int()).abs().max() <= 1
        # without crater classes, two maps; a second head is a model of its own
        assert len(openvino.products(x, (), 254)) == 2
        torch.testing.assert_close(openvino(x), reference(x), rtol=1e-4, atol=1e-4)


def test_openvino_conversions_are_kept_and_a_read_only_cache_only_costs_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLANETSEG_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    net = fuse_for_inference(SegmentationNet(NetConfig(1, 3, 2, 8, 2, 8)).eval())
    x = torch.randn(1, 1, 32, 48)
    with torch.inference_mode():
        first = InferenceNet(net, InferencePath("fp32", backend="openvino"))(x)
        kept = sorted(p.name for p in openvino_cache().iterdir())
        assert len(kept) == 2 and {Path(k).suffix for k in kept} == {".xml", ".bin"}
        # the next process (here: the next model) reads the conversion back: same function
        again = InferenceNet(net, InferencePath("bf16", backend="openvino"))(x)
        torch.testing.assert_close(again, first, rtol=0.1, atol=0.1)
        assert sorted(p.name for p in openvino_cache().iterdir()) == kept
        # other weights are another entry
        other = fuse_for_inference(SegmentationNet(NetConfig(1, 3, 2, 8, 2, 8)).eval())
        InferenceNet(other, InferencePath("fp32", backend="openvino"))(x)
        assert len(list(openvino_cache().iterdir())) == 4
        # a cache folder that cannot be made: converted anyway
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        monkeypatch.setenv("PLANETSEG_CACHE", str(blocker))
        out = InferenceNet(net, InferencePath("fp32", backend="openvino"))(x)
        torch.testing.assert_close(out, first)


def test_activations_follow_the_architecture_and_precision() -> None:
    config = NetConfig(1, 3, 2, 8, 2, 8)
    net = fuse_for_inference(SegmentationNet(config).eval())
    fp32 = InferenceNet(net, InferencePath("fp32", True))
    small, large = activation_bytes(fp32, 1, 32, 32), activation_bytes(fp32, 1, 64, 64)
    assert large == 4 * small  # in proportion to the window's pixels
    # at least the logits (3 classes x 2^2 output px per input px, float32) and the HR head
    assert small / 32**2 > 4 * 3 * 4 + 4 * 8 * 4
    bf16 = activation_bytes(InferenceNet(net, InferencePath("bf16", True)), 1, 32, 32)
    assert bf16 < 0.75 * small
    wider = fuse_for_inference(SegmentationNet(NetConfig(1, 3, 2, 16, 2, 16)).eval())
    assert activation_bytes(InferenceNet(wider, InferencePath("fp32", True)), 1, 32, 32) > (
        1.5 * small
    )
    # NCHW on a CPU: oneDNN's copies of the largest convolution's source and destination
    assert activation_bytes(InferenceNet(net, InferencePath()), 1, 32, 32) > small


@pytest.fixture(scope="module")
def fp32_labels(world: dict[str, Path]) -> Path:
    out = world["root"] / "fp32.zarr"
    if not out.exists():
        segment(
            world["lr"], SegmentConfig(out=str(out), model=str(world["model"]), precision="fp32")
        )
    return out


def _labels(store: Path) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")["labels"][:]


def test_fp32_is_todays_path_and_auto_gives_its_labels_here(
    world: dict[str, Path], fp32_labels: Path, tmp_path: Path
) -> None:
    attrs = zarr.open_group(str(fp32_labels), mode="r").attrs
    assert json.loads(attrs[INFERENCE_ATTR])["name"] == "cpu fp32 contiguous"
    out = tmp_path / "auto.zarr"
    proc = planetseg(
        "segment", str(world["lr"]), "--model", str(world["model"]), "--out", str(out),
        "--cluster", "none",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    path = choose_path("auto", this_hardware())
    recorded = json.loads(zarr.open_group(str(out), mode="r").attrs[INFERENCE_ATTR])
    assert recorded["name"] == path.name and path.name in " ".join(proc.stdout.split())
    if path == InferencePath("fp32", True):  # AVX2 only, torch: the same labels as the reference
        np.testing.assert_array_equal(_labels(out), _labels(fp32_labels))
    else:  # bf16 where the CPU has bfloat16 instructions, or compiled by OpenVINO
        assert (_labels(out) == _labels(fp32_labels)).mean() >= 0.999
    # resuming with another explicit precision is refused, naming the path it ran
    other = "bf16" if path.precision == "fp32" else "fp32"
    proc = planetseg(
        "segment", str(world["lr"]), "--model", str(world["model"]), "--out", str(out),
        "--cluster", "none", "--precision", other,
    )  # fmt: skip
    assert_one_line_error(proc, "--precision", path.name)


def test_forced_bf16_agrees_with_fp32(
    world: dict[str, Path], fp32_labels: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bf16.zarr"
    segment(world["lr"], SegmentConfig(out=str(out), model=str(world["model"]), precision="bf16"))
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert json.loads(attrs[INFERENCE_ATTR])["precision"] == "bf16"
    agree = float(np.mean(_labels(out) == _labels(fp32_labels)))
    assert agree >= 0.999, agree


def test_a_store_without_a_recorded_path_resumes_on_fp32(
    world: dict[str, Path], fp32_labels: Path, tmp_path: Path
) -> None:
    import shutil

    from planetseg.segment import SegmentPlan
    from planetseg.store import set_attrs

    # A store of before paths were recorded: its plan has no "inference", it is complete.
    store = tmp_path / "old.zarr"
    shutil.copytree(fp32_labels, store)
    old = json.loads(zarr.open_group(str(store), mode="r").attrs["planetseg:segment"])
    del old["inference"]
    set_attrs(store, **{"planetseg:segment": json.dumps(old)})
    assert SegmentPlan.from_json(json.dumps(old)).path == InferencePath()
    result = segment(world["lr"], SegmentConfig(out=str(store), model=str(world["model"])))
    assert result.computed == 0 and result.plan.path == InferencePath()
    with pytest.raises(StoreMismatchError, match="cpu fp32 contiguous"):
        segment(
            world["lr"],
            SegmentConfig(out=str(store), model=str(world["model"]), precision="bf16"),
        )


def test_plan_records_path_and_measured_activation(world: dict[str, Path], tmp_path: Path) -> None:
    config = SegmentConfig(out=str(tmp_path / "x"), model=str(world["model"]), precision="bf16")
    plan = plan_segment(world["lr"], config)
    fp32 = SegmentConfig(out="x", model=str(world["model"]), precision="fp32")
    reference = plan_segment(world["lr"], fp32)
    assert plan.path == InferencePath("bf16", True, "cpu")
    assert 0 < plan.activation < reference.activation


def test_a_workflow_sets_the_precision(tmp_path: Path) -> None:
    from planetseg.errors import WorkflowError
    from planetseg.workflow import load_workflow
    from tests.test_workflow import GOOD

    path = tmp_path / "flow.yaml"
    path.write_text(GOOD.replace("model: run/model", "model: run/model\n    precision: bf16"))
    assert load_workflow(path).segment.precision == "bf16"
    path.write_text(GOOD.replace("model: run/model", "model: run/model\n    precision: int8"))
    with pytest.raises(WorkflowError, match="steps.segment.*--precision 'int8'"):
        load_workflow(path)
