"""Model runners at their edges: the cores a systemd service may use, torch.compile's work at start, ONNX Runtime
asked for on an Apple GPU, int8 with LoRA adapters, and OpenVINO running fp32 where bf16 was asked."""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import pytest
import torch

from models.hydranet import HydraNet, HydraNetConfig
from workers import cores, model_runner
from workers.model_runner import ModelRunner, pick_backend


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRAVISION_CACHE", str(tmp_path_factory.mktemp("runner-cache")))
        yield


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def own_cgroup(folder, monkeypatch, lines: str):
    """An empty cgroup mount, and ``lines`` as this process's /proc/self/cgroup."""
    folder.mkdir(exist_ok=True)
    (folder / "self").write_text(lines)
    monkeypatch.setattr(cores, "SELF", folder / "self", raising=False)
    (folder / "fs").mkdir()
    return folder / "fs"


def test_a_service_in_the_hosts_cgroup_namespace_is_sized_by_its_own_cgroups_quota(tmp_path, monkeypatch,
                                                                                    eight_cores):
    """A systemd service with CPUQuota=200% (or `docker --cgroupns=host`): its quota is in its own cgroup below the
    mount's root, which has none; usable_cores read the root only and sized the model by every core."""
    root = own_cgroup(tmp_path, monkeypatch, "0::/system.slice/hv.service\n")
    (root / "system.slice" / "hv.service").mkdir(parents=True)
    (root / "system.slice" / "hv.service" / "cpu.max").write_text("200000 100000\n")
    assert cores.usable_cores(root) == 2
    (root / "system.slice" / "hv.service" / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.max").write_text("300000 100000\n")  # a slice above it limits it too
    assert cores.usable_cores(root) == 3


def test_a_v1_hierarchy_names_the_cpu_controllers_cgroup_and_a_path_not_under_the_mount_is_skipped(
        tmp_path, monkeypatch, eight_cores):
    root = own_cgroup(tmp_path, monkeypatch, "5:memory:/other\n4:cpu,cpuacct:/system.slice/hv.service\n0::/\n")
    own = root / "cpu" / "system.slice" / "hv.service"
    own.mkdir(parents=True)
    (own / "cpu.cfs_quota_us").write_text("150000\n")
    (own / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.usable_cores(root) == 2
    # v1 Docker: /proc/self/cgroup names the host's path, the mount's root is the container's own cgroup
    root = own_cgroup(tmp_path / "docker", monkeypatch, "4:cpu,cpuacct:/docker/0123abcd\n")
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.usable_cores(root) == 1


def counting_compile(compiled: list):
    """torch.compile with a backend that counts the graphs it is given and runs them as they are (no inductor)."""
    def backend(graph, example_inputs):
        compiled.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)][:1])
        return graph.forward

    return functools.partial(torch.compile, backend=backend)


def test_torch_compile_does_its_work_at_start_not_in_the_cameras_batches(tiny_checkpoint, monkeypatch):
    """torch.compile compiles at a model's first call and again at its first batch of more than one (size 1 is
    specialised): the first camera batches waited for it (22 s and 16 s for a ResNet-10 on 2 CPU cores, minutes
    for a large one on a GPU), and their frames expired meanwhile."""
    torch._dynamo.reset()
    compiled: list = []
    monkeypatch.setattr(torch, "compile", counting_compile(compiled))
    runner = ModelRunner(tiny_checkpoint, device="cpu", backend="torch", compile=True, max_batch=4, threads=1)
    at_start = len(compiled)
    for n in (1, 3, 4, 2, 1):
        images = [np.random.default_rng(i).integers(0, 255, (3, *runner.input_size), dtype=np.uint8)
                  for i in range(n)]
        assert len(runner.run(images, [None] * n)) == n
    assert len(compiled) == at_start, f"compiled in the batches: {compiled[at_start:]}"
    assert at_start > 0
    assert runner.stats["batches"] == 5 and runner.stats["frames"] == 11  # the warm-up is not counted as work
    torch._dynamo.reset()


def test_onnxruntime_asked_for_on_an_apple_gpu_refuses_to_run_on_the_cpu(cache, tiny_checkpoint, monkeypatch):
    """model.device mps with backend onnxruntime: ONNX Runtime has no provider for it and ran the model on the
    CPU without a word, while the user had asked for the GPU (CUDA was refused so already)."""
    from models.checkpoint import load_checkpoint

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # as on a Mac
    monkeypatch.setattr(model_runner, "load_checkpoint", lambda p, device: load_checkpoint(p, device="cpu"))
    with pytest.raises(ValueError, match=r"backend onnxruntime runs on the CPU or a CUDA device, not on device mps"):
        ModelRunner(tiny_checkpoint, device="mps", backend="onnxruntime", threads=1)
    assert ModelRunner(tiny_checkpoint, device="cpu", backend="onnxruntime", threads=1).info()["device"] == "cpu"


def adapted_model() -> HydraNet:
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}}))
    model.add_adapter("night", heads=["people"], rank=2)
    return model


def test_int8_of_a_model_with_lora_adapters_is_refused_naming_the_precision():
    """The export's refusal told the user to use the torch backend, which refuses int8 in turn."""
    model = adapted_model()
    with pytest.raises(ValueError, match=r"precision int8 runs the ONNX export in OpenVINO, which does not carry "
                                         r"LoRA adapters \(night\); set model.precision auto, bf16 or fp32"):
        pick_backend("auto", torch.device("cpu"), None, False, model, "int8")
    assert pick_backend("auto", torch.device("cpu"), None, False, model, "auto") == "torch"


@pytest.mark.parametrize("precision, warned", [("bf16", True), ("fp32", False)])
def test_openvino_says_so_when_it_runs_fp32_where_bf16_was_asked(cache, tiny_checkpoint, monkeypatch, caplog,
                                                                 precision, warned):
    """OpenVINO's CPU plugin ignores a bf16 hint on a CPU without bf16 and runs f32 (this machine's CPU has no
    AVX512-BF16): info() and the start-up line said bf16, at fp32's speed. The hint is forced to f32 here, so the
    case is the same on a CPU that has bf16."""
    real = model_runner.openvino_config
    monkeypatch.setattr(model_runner, "openvino_config", lambda hint, threads: real("f32", threads))
    with caplog.at_level(logging.WARNING, logger="workers.model_runner"):
        runner = ModelRunner(tiny_checkpoint, device="cpu", backend="openvino", precision=precision, threads=1)
    ran = runner.session.dynamic[2].get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert ran == "f32"
    said = [r.getMessage() for r in caplog.records if "does not run bf16" in r.getMessage()]
    if warned:
        assert len(said) == 1 and "model.precision bf16" in said[0] and "in f32" in said[0], said
    else:
        assert not said
