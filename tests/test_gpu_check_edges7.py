"""benchmarks/gpu_check.py read once more for what only the first GPU machine would show, checked on the CPU with
fakes: why torch sees no GPU, said in the JSON and not only in a warning."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling measure.py, as when run directly

import gpu_check  # noqa: E402

TOO_OLD = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). Please update "
           "your GPU driver")


def test_why_cuda_did_not_start_is_in_the_reason_not_only_in_a_warning(tmp_path, monkeypatch, capsys):
    """A driver older than torch's CUDA: torch warns once and reports no device, and the JSON (all that comes back
    from a lent machine) said only "sees no CUDA device"."""
    def is_available():  # what torch._C._cuda_getDeviceCount does when cuInit fails: TORCH_WARN, then 0
        warnings.warn(TOO_OLD, UserWarning)
        return False

    monkeypatch.setattr("torch.cuda.is_available", is_available)
    monkeypatch.setattr("torch.version.cuda", "12.8")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--json", str(out)]) == gpu_check.NO_GPU_EXIT
    result = json.loads(out.read_text())
    assert "sees no CUDA device" in result["error"] and "driver on your system is too old" in result["error"]
    assert "driver on your system is too old" in capsys.readouterr().err


def test_the_decode_rows_carry_the_gpu_samples_of_their_window(tmp_path, monkeypatch):
    """The docstring promised nvidia-smi's mean and max per result in steps 2-4; the decode step's rows (NVDEC's
    among them) had none."""
    busy = {"util_mean": 12.0, "util_max": 20.0, "mem_max_mib": 900.0, "samples": 4}
    monkeypatch.setattr(gpu_check.GpuSampler, "window", lambda self, since, until=None: busy)
    monkeypatch.setattr(gpu_check, "make_clip", lambda folder, size, seconds: tmp_path / "clip.mp4")
    monkeypatch.setattr(gpu_check, "decode_rate", lambda clip, hw, size, deadline: {"hwaccel_asked": hw, "frames": 1})
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run-cpu", "--steps", "decode", "--minutes", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["decode"]
    assert rows and all(r["gpu"] == busy for r in rows)
