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
