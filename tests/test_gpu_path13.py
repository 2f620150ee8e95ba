"""The GPU path audited again (round 13) for what only a GPU would have shown, checked on the CPU with torch's own
words and fakes: each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.batch_size import out_of_memory

ROOT = Path(__file__).resolve().parent.parent

# What torch's C10_CUDA_CHECK raises (c10/cuda/CUDAException.cpp): CUDA's words, then the same suffix for every error.
SUFFIX = ("\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
          "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with "
          "`TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")


def test_a_cuda_out_of_memory_error_is_not_a_lost_context(monkeypatch):
    """A kernel launch or a library's workspace that finds the GPU full raises "CUDA error: out of memory" with
    torch's usual suffix, which ends "...to enable device-side assertions.": taken for a device-side assert, the
    replica exited (and Ray restarted it into the same batch size, to fail again) instead of the BatchSizer
    stepping the batches down. A real device-side assert still ends the process."""
    from workers import inference
    from workers.inference import DEVICE_LOST_EXIT, InferenceService, device_lost

    oom = RuntimeError("CUDA error: out of memory" + SUFFIX)
    assert out_of_memory(oom) and not device_lost(oom)
    assert not device_lost(RuntimeError("CUDA error: invalid configuration argument" + SUFFIX))
    assert device_lost(RuntimeError("CUDA error: device-side assert triggered" + SUFFIX))
    assert device_lost(RuntimeError("CUDA error: an illegal memory access was encountered" + SUFFIX))

    class Runner:
        def run(self, images, heads):
            raise oom

    exited = []
    monkeypatch.setattr(inference.os, "_exit", lambda code: (exited.append(code), (_ for _ in ()).throw(SystemExit)))
    service = InferenceService.__new__(InferenceService)
    service.exit_on_device_loss, service.runner = True, Runner()
    with pytest.raises(RuntimeError, match="out of memory"):  # to the Batcher, whose sizer steps down
        service._run_batch([(None, None)])
    assert exited == [] and DEVICE_LOST_EXIT == 75


def test_a_kit_for_another_python_is_refused_before_the_check_imports_any_of_it(tmp_path):
    """benchmarks/gpu_kit.py's packages are compiled for one CPython; on another the first import of one (PyAV, which
    the check's helper module imported at the script's own import) failed with a traceback and no JSON, before the
    kit check could refuse it (exit 3) saying which Python to build the kit for."""
    kit = tmp_path / "site"
    (kit / "av").mkdir(parents=True)  # PyAV as its wheel for another Python imports: its extension is not found
    (kit / "av" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'av._core'\")\n")
    (kit / "KIT_PYTHON").write_text("3.9.1\n")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": f"{kit}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--steps", "model", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "built for CPython 3.9.1" in done.stderr and "Traceback" not in done.stderr
    assert "gpu_kit.py --python" in json.loads(out.read_text())["error"]


def test_tensorrt_engines_are_built_under_the_cache_folders_lock(tiny_checkpoint, tmp_path, monkeypatch):
    """TensorRT writes the engines it builds at a session's start into the export's cache folder, in place: replicas
    sharing a GPU and a fresh cache built them at once, and one could load another's half-written engine. The
    session is made under the folder's lock (as OpenVINO's compiles): here another process holds it meanwhile."""
    import fcntl

    import onnxruntime as ort
    import torch

    from models.checkpoint import load_checkpoint
    from workers import model_runner

    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_runner, "load_checkpoint", lambda p, device: load_checkpoint(p, device="cpu"))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    held = []
    real = ort.InferenceSession

    def session(path, options, providers):
        (_, trt), _, _ = providers
        lock = open(Path(trt["trt_engine_cache_path"]) / "lock", "a")
        try:  # another process (a replica) trying the lock now: it must wait
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            lock.close()
        return real(path, options)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(ValueError, match="onnxruntime-gpu"):  # it fell back to the CPU provider: refused, as before
        model_runner.ModelRunner(tiny_checkpoint, device="auto", backend="onnxruntime", threads=1, max_batch=8)
    assert held == [True]
