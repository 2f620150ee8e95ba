"""Runtime edges (workers/model_runner.py, workers/stream.py): TensorRT's optimisation profile for the export's
batch sizes, and the text a camera shows when its inference replica refused to start. No GPU and no Ray here:
the providers ONNX Runtime is asked for are read, and the camera runs with a fake infer and source."""

from __future__ import annotations

import asyncio
import traceback

import numpy as np
import onnxruntime as ort
import pytest
import ray
import torch

import workers.capture
from models.checkpoint import load_checkpoint
from test_capture_recovery import RecordingPublisher
from workers import model_runner
from workers.model_runner import ModelRunner, gpu_providers
from workers.sources import Source, SourceFrame
from workers.stream import CameraPipeline


def test_tensorrt_gets_one_profile_from_batch_1_to_max_batch(tmp_path):
    """Without a profile ONNX Runtime's TensorRT provider built its engine again (minutes) each time a batch
    outgrew the sizes it had seen: a load growing 1 -> 64 paid up to 7 builds while serving."""
    export = tmp_path / "model.onnx"
    export.write_bytes(b"x")
    (_, options), (_, cuda) = gpu_providers(export, 0, "images", (192, 320), 16)
    assert options["trt_profile_min_shapes"] == "images:1x3x192x320"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "images:16x3x192x320"
    assert not any(k.startswith("trt_") for k in cuda)  # the CUDA provider has no such options


def test_the_runner_asks_tensorrt_for_its_max_batch_on_the_exports_own_input(tiny_checkpoint, tmp_path, monkeypatch):
    """What ModelRunner's ONNX Runtime session is asked for on a GPU machine (the session itself falls back to the
    CPU here): the profile names the export's input and its (H, W), and reaches the runner's max_batch."""
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_runner, "load_checkpoint", lambda p, device: load_checkpoint(p, device="cpu"))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    asked, sessions = [], []
    real = ort.InferenceSession

    def session(path, options, providers):
        asked.append(providers)
        sessions.append(real(path, options))
        return sessions[-1]

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        ModelRunner(tiny_checkpoint, device="auto", backend="onnxruntime", threads=1, max_batch=24)
    (trt, options), _, _ = asked[0]
    assert trt == "TensorrtExecutionProvider"
    (graph_input,) = sessions[0].get_inputs()  # the export's real input: its name, and dynamic in batch only
    assert isinstance(graph_input.shape[0], str) and all(isinstance(d, int) for d in graph_input.shape[1:])
    shape = "x".join(str(d) for d in graph_input.shape[1:])
    assert options["trt_profile_min_shapes"] == f"{graph_input.name}:1x{shape}" == "images:1x3x192x320"
    assert options["trt_profile_max_shapes"] == options["trt_profile_opt_shapes"] == f"images:24x{shape}"


class ThreeFrames(Source):
    """An unpaced file of three black frames."""

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps, self._index = url, False, 10.0, 0

    def open(self) -> None:
        pass

    def read(self) -> SourceFrame | None:
        if self._index >= 3:
            return None
        self._index += 1
        return SourceFrame(self._index - 1, self._index / 10, 0.0, (72, 128), np.zeros((72, 128, 3), np.uint8))

    def close(self) -> None:
        pass


def replica_refused(error: Exception) -> Exception:
    """Ray's error for a call to an actor whose constructor raised ``error``: its text carries the traceback."""
    try:
        raise error
    except Exception as e:
        cause = ray.exceptions.RayTaskError("__init__", traceback.format_exc(), e, proctitle="ray::InferenceActor",
                                            pid=4242, ip="10.0.0.7")
    return ray.exceptions.ActorDiedError(cause)


def last_error(monkeypatch, error: Exception) -> str:
    """A camera whose every inference call fails with ``error``: its last_error once the file ended."""
    async def infer(request):
        raise error

    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: ThreeFrames(url))
    camera = {"id": "door", "url": "/clips/door.mp4", "realtime": False, "heads": ["people"],
              "snapshot": {"enabled": False}}
    model = {"input_size": [96, 160], "heads": {"people": ["person"]}}
    stats = asyncio.run(asyncio.wait_for(CameraPipeline(camera, infer, model, RecordingPublisher()).run(), 60))
    assert stats["state"] == "ended" and stats["dropped"]["error"] >= 1
    return stats["last_error"]


@pytest.mark.timeout(120)
def test_a_replica_that_refused_to_start_is_one_line_naming_why(monkeypatch):
    """inference.in_camera_process false, the checkpoint replaced under the service: the replica's constructor
    refuses it, and the camera's last_error was Ray's whole traceback after "ActorDiedError: The actor died...".
    Any other error keeps its text."""
    refusal = ValueError("model.checkpoint /m/demo.safetensors: replaced since the service started, refused "
                         "(restart the service to use it): input_size [96, 160] -> [128, 128]")
    assert last_error(monkeypatch, replica_refused(refusal)) == f"inference failed: inference replica could not " \
                                                                 f"start: {refusal}"
    bug = replica_refused(KeyError("people"))  # a bug in a constructor: its traceback is wanted
    assert last_error(monkeypatch, bug) == f"inference failed: ActorDiedError: {bug}" and "\n" in str(bug)
    assert last_error(monkeypatch, RuntimeError("shed")) == "inference failed: RuntimeError: shed"
