"""The GPU (CUDA) path's defects found by audit 16, checked without a GPU: CPU torch with torch.cuda.is_available
and friends replaced, and the model's load stopped where the device it was given is known."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import pipeline.cluster as cluster
import workers.model_runner as model_runner
from pipeline import model_commands
from pipeline.app import App
from pipeline.cluster import Placement
from pipeline.config import parse_config
from pipeline.model_commands import DEMO_CHECKPOINT
from pipeline.placement import Node

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # gpu_check imports its sibling measure.py, as when run directly

import gpu_check  # noqa: E402


class Loaded(Exception):
    """Raised by a stand-in load_checkpoint: the device the model would have been loaded onto."""

    def __init__(self, device) -> None:
        super().__init__(str(device))
        self.device = device


@pytest.fixture
def gpu_machine(monkeypatch):
    """A machine where torch sees one CUDA device; the model's load stops with the device it was given, and
    the process's TF32 settings are put back afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def load(checkpoint, device=None, **kwargs):
        raise Loaded(device)

    monkeypatch.setattr(model_runner, "load_checkpoint", load)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        yield
    finally:  # process-wide settings (monkeypatch cannot put the cuBLAS one back)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


# -- 1. `hydravision eval --backend openvino` / `--precision int8` on a GPU machine ---------------------------------

@pytest.mark.parametrize("backend, precision, device", [
    ("openvino", "bf16", "cpu"), ("openvino", "fp32", "cpu"), ("auto", "int8", "cpu"), ("torch", "fp16", "cuda")])
def test_eval_on_a_gpu_machine_runs_openvino_and_int8_on_the_cpu(gpu_machine, backend, precision, device):
    """Refused before: "backend openvino runs the model on the CPU here, not on device cuda" (README's bf16 check
    failed on every GPU host); the service's model.device auto runs them on the CPU, torch on the GPU."""
    args = argparse.Namespace(checkpoint=None, scenes=1, frames=1, backend=backend, precision=precision,
                              no_progress=True, json=True)
    with pytest.raises(Loaded) as loaded:
        model_commands.evaluate(args)
    assert loaded.value.device.type == device


# -- 2. inference.num_gpus: 0 with model.device auto on a GPU machine ----------------------------------------------

@pytest.mark.parametrize("device, expected", [("auto", "cpu"), ("cpu", "cpu")])
def test_camera_processes_running_the_model_on_a_gpu_machine_run_it_on_the_cpu(monkeypatch, device, expected):
    """Replicas reserving no GPU turn the model in the camera processes on; each got device auto, which picked
    CUDA: one unreserved CUDA context and model copy per camera process."""
    node = Node("g" * 56, "127.0.0.1", {"CPU": 4, "GPU": 1})
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [
        {"NodeID": node.id, "Alive": True, "NodeManagerAddress": node.ip, "Resources": dict(node.resources),
         "Labels": {}}])
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: dict(node.resources))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = parse_config({"redis": {"url": "redis://127.0.0.1:1/0"}, "cameras": [],
                           "model": {"device": device}, "inference": {"num_gpus": 0}})
    placement = Placement(config, say=lambda m: None)
    assert placement.in_camera_process  # the case: the camera processes run the model themselves
    app = SimpleNamespace(config=config, placement=placement, in_camera_process=True, _lock=threading.Lock(),
                          cameras={}, _joins={}, model_expected=lambda: {})
    model = App._camera_process_model(app, 2)
    assert model["device"] == expected


# -- 3. docker-compose.yml's gpu worker: NVDEC needs the driver's video capability --------------------------------

def test_the_gpu_worker_gets_the_drivers_video_capability_for_nvdec():
    """`capabilities: [gpu]` gives the container NVIDIA_DRIVER_CAPABILITIES=compute,utility (Docker sets the
    variable from the capabilities that are the driver's, else the image's default): no libnvcuvid, and
    `hwaccel: cuda` decoded on the CPU."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    device = services["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"][0] == "gpu"  # what selects the GPU
    assert {"compute", "utility", "video"} <= set(device["capabilities"])


# -- 4. NVDEC: one CUDA context per decoder ------------------------------------------------------------------------

def test_nvdec_decoders_share_the_devices_primary_context(bikes_mp4: Path, monkeypatch):
    import av

    from workers.sources import open_source

    real_open, asked = av.open, []

    def no_device(*args, **kwargs):  # no GPU here: record what was asked, then fail as a missing device does
        if kwargs.get("hwaccel") is not None:
            asked.append(kwargs["hwaccel"])
            raise av.error.ExternalError(0, "Generic error in an external library")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", no_device)
    source = open_source(str(bikes_mp4), realtime=False, hwaccel="cuda")
    try:
        source.open()
    finally:
        source.close()
    assert asked and all(h.options == {"primary_ctx": "1"} for h in asked)


# -- 5. "fp32" on CUDA was TF32 in cuDNN's convolutions ------------------------------------------------------------

@pytest.mark.parametrize("device, precision, exact", [("cuda", "fp32", True), ("cuda", "fp16", False),
                                                      ("cpu", "fp32", False)])
def test_fp32_on_cuda_turns_tf32_off(gpu_machine, device, precision, exact):
    torch.backends.cudnn.allow_tf32 = True  # torch's default (put back by the fixture)
    with pytest.raises(Loaded):
        model_runner.ModelRunner(DEMO_CHECKPOINT, device=device, precision=precision, backend="torch")
    assert torch.backends.cudnn.allow_tf32 is not exact
    if exact:
        assert torch.backends.cuda.matmul.allow_tf32 is False


# -- 6. gpu_check's pipeline ladder within its share of the time ---------------------------------------------------

def test_gpu_checks_pipeline_ladder_reaches_64_cameras_in_its_share_of_the_time(tmp_path, monkeypatch):
    """The pipeline step gets ~225 s of the default 7.5 minutes and a run costs its window plus ~30 s of start,
    settle and stop: doubling from 1 with 20 s windows stopped at N=8-16, a lower bound only."""
    import pipeline.embedded_redis
    import ray

    seen = {}

    def ladder(args, *rest, **kwargs):
        seen["seconds"] = args.seconds
        return []

    monkeypatch.setattr(gpu_check, "environment", lambda dry: {"cuda_available": True})
    monkeypatch.setattr(gpu_check, "make_clip", lambda folder, size, seconds: tmp_path / "clip.mp4")
    monkeypatch.setattr(gpu_check, "pipeline_ladder", ladder)
    monkeypatch.setattr(gpu_check.GpuSampler, "__init__", lambda self, gpu="0": setattr(self, "problem", None))
    monkeypatch.setattr(gpu_check.GpuSampler, "close", lambda self: None)
    assert gpu_check.main(["--steps", "pipeline", "--json", str(tmp_path / "gpu.json")]) == 0
    monkeypatch.undo()

    clock = [1000.0]
    runs = []

    class Server:
        url = "redis://127.0.0.1:1/0"

        def start(self):
            return self

        def stop(self):
            pass

    def pipeline_run(checkpoint, clip, n, device, hwaccel, url, seconds, *args, **kwargs):
        runs.append(n)
        clock[0] += seconds + 30  # start, settle, window, stop
        return {"cameras": n, "frames_per_s": 30.0 * n, "age_p50_ms": 50, "age_p95_ms": 80, "age_p99_ms": 90,
                "lost_in_window": 0, "gpu": None}

    monkeypatch.setattr(pipeline.embedded_redis, "EmbeddedRedis", Server)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a caller's Ray: none is started
    monkeypatch.setattr(gpu_check, "pipeline_run", pipeline_run)
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(time=lambda: clock[0]))
    args = argparse.Namespace(seconds=seen["seconds"], max_cameras=64, budget_ms=300.0, checkpoint=gpu_check.DEMO)
    sampler = gpu_check.GpuSampler.__new__(gpu_check.GpuSampler)
    sampler.samples, sampler.proc = [], None
    rows = gpu_check.pipeline_ladder(args, tmp_path / "clip.mp4", "cuda", "cuda", clock[0] + 225, sampler, False)
    assert runs == [1, 4, 16, 64] and not any("skipped" in r for r in rows), rows
    runs.clear()
    args.max_cameras = 10  # a ceiling asked for is the ladder's last rung
    gpu_check.pipeline_ladder(args, tmp_path / "clip.mp4", "cuda", "cuda", clock[0] + 225, sampler, False)
    assert runs == [1, 4, 10]


# -- 7. gpu_check: ONNX Runtime in fp16 (TensorRT's) ---------------------------------------------------------------

def test_gpu_providers_ask_tensorrt_alone_for_fp16(monkeypatch):
    monkeypatch.setattr(model_runner, "compiled_cache", lambda export: None)
    plain = dict(model_runner.gpu_providers(Path("m.onnx"), 0))
    half = dict(model_runner.gpu_providers(Path("m.onnx"), 0, fp16=True))
    assert "trt_fp16_enable" not in plain["TensorrtExecutionProvider"]
    assert half["TensorrtExecutionProvider"]["trt_fp16_enable"] is True
    assert half["CUDAExecutionProvider"] == plain["CUDAExecutionProvider"]


@pytest.mark.parametrize("provider", ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
def test_gpu_check_measures_onnxruntime_fp16_on_tensorrt_only(monkeypatch, provider):
    """ModelRunner refuses ONNX Runtime in fp16 (the service runs it in fp32): the check builds it in fp32 with
    TensorRT's fp16 asked for, and records a skip where the session is not on TensorRT."""
    assert ("onnxruntime", "fp16", False) in gpu_check.MODEL_VARIANTS
    monkeypatch.setattr(model_runner, "compiled_cache", lambda export: None)
    built = []

    class Runner:
        input_size = (64, 96)

        def __init__(self, checkpoint, device, precision, max_batch, compile, backend):
            trt = dict(model_runner.gpu_providers(Path("m.onnx"), 0))["TensorrtExecutionProvider"]
            built.append((backend, precision, trt.get("trt_fp16_enable")))
            self.session = SimpleNamespace(session=SimpleNamespace(get_providers=lambda: [provider]))

        def run(self, images, heads):
            return []

    monkeypatch.setattr(model_runner, "ModelRunner", Runner)
    monkeypatch.setattr(gpu_check, "_ort_has_cuda", lambda: True)
    monkeypatch.setattr(gpu_check, "free_gpu_memory", lambda: None)
    sampler = gpu_check.GpuSampler.__new__(gpu_check.GpuSampler)
    sampler.samples, sampler.proc = [], None
    rows = gpu_check.model_ceiling(DEMO_CHECKPOINT, "cuda", (1,), (("onnxruntime", "fp16", False),),
                                   gpu_check.time.time() + 60, sampler, 0.01)
    assert built == [("onnxruntime", "fp32", True)]
    assert "trt_fp16_enable" not in dict(model_runner.gpu_providers(Path("m.onnx"), 0))["TensorrtExecutionProvider"]
    if provider == "TensorrtExecutionProvider":
        assert [(r["precision"], r["provider"]) for r in rows if "frames_per_s" in r] == [("fp16", provider)]
    else:
        assert [r["variant"] for r in rows] == ["onnxruntime fp16"] and "frames_per_s" not in rows[0]
        assert "TensorRT" in rows[0]["skipped"] and provider in rows[0]["skipped"]
