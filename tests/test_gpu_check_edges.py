"""benchmarks/gpu_check.py's edges that only a GPU machine would have shown, checked on the CPU with fakes: a
device torch lists but cannot use, the GPU nvidia-smi samples, emulated bf16, a step named wrongly, a --json path
that cannot be written yet, a pipeline run that stalls or fails to start."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling measure.py, as when run directly

import gpu_check  # noqa: E402

UUID = "5ab1c0de-1234-5678-9abc-def012345678"


def _fake_gpu(monkeypatch, major: int = 9) -> None:
    """torch.cuda as on a machine with one GPU of compute capability ``major``.x (torch emulates bf16 below 8)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: SimpleNamespace(
        name="Fake GPU", total_memory=16 * 2**30, major=major, minor=0, uuid=UUID))
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr("torch.cuda.is_bf16_supported",
                        lambda including_emulation=True: including_emulation or major >= 8)
    monkeypatch.setattr(gpu_check, "_run_a_kernel", lambda: None, raising=False)


def _no_sampler() -> gpu_check.GpuSampler:
    sampler = gpu_check.GpuSampler.__new__(gpu_check.GpuSampler)
    sampler.samples, sampler.proc = [], None
    return sampler


def _fails(message: str):
    def fail(*args):
        raise RuntimeError(message)
    return fail


@pytest.mark.parametrize("where, message", [
    ("properties", "CUDA error: CUDA-capable device(s) is/are busy or unavailable"),
    ("kernel", "CUDA error: no kernel image is available for execution on the device")])
def test_a_gpu_that_is_listed_but_cannot_be_used_exits_2_naming_the_error(tmp_path, monkeypatch, capsys, where,
                                                                          message):
    """cudaGetDeviceCount finds the device, its first use fails: the check crashed with a traceback and wrote no
    JSON, or (a torch without kernels for this GPU) went on to fail every step after minutes."""
    _fake_gpu(monkeypatch)
    monkeypatch.setattr(gpu_check, "model_ceiling", lambda *args: pytest.fail("measured on an unusable GPU"))
    if where == "properties":
        monkeypatch.setattr("torch.cuda.get_device_properties", _fails(message))
    else:
        monkeypatch.setattr(gpu_check, "_run_a_kernel", _fails(message), raising=False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--steps", "model", "--json", str(out)]) == gpu_check.NO_GPU_EXIT
    assert message in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert "cannot use it" in result["error"] and message in result["error"]
    assert result["environment"]["cuda_available"] is False and "model" not in result


def test_environment_names_the_gpu_by_uuid_and_reports_native_bf16_only(monkeypatch):
    _fake_gpu(monkeypatch, major=7)  # a T4 or V100: bf16 only emulated
    gpu = gpu_check.environment(False)["gpu"]
    assert gpu["bf16"] is False and gpu["uuid"] == f"GPU-{UUID}" and gpu["capability"] == "7.0"
    _fake_gpu(monkeypatch, major=9)
    assert gpu_check.environment(False)["gpu"]["bf16"] is True


def test_the_bf16_variant_is_skipped_on_a_gpu_that_would_emulate_it(monkeypatch):
    _fake_gpu(monkeypatch, major=7)
    rows = gpu_check.model_ceiling(gpu_check.DEMO, "cuda", (1,), (("torch", "bf16", False),), time.time() + 60,
                                   _no_sampler())
    assert len(rows) == 1 and "no native bf16" in rows[0]["skipped"]


def test_nvidia_smi_samples_the_gpu_torch_uses_not_its_index_0(tmp_path, monkeypatch):
    """With CUDA_VISIBLE_DEVICES=2 (or CUDA's fastest-first order) torch's device 0 is not nvidia-smi's GPU 0."""
    argv_file = tmp_path / "argv"
    fake = tmp_path / "nvidia-smi"  # records its arguments, prints one sample, then waits
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {argv_file}.tmp && mv {argv_file}.tmp {argv_file}\n"
                    "echo '50, 512'\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"torch": "2.13.0", "torch_cuda": "12.8", "cuda_available": True, "gpu": {"uuid": f"GPU-{UUID}"}}
    monkeypatch.setattr(gpu_check, "environment", lambda dry_run: env)

    def model_ceiling(*args):  # no GPU here: the step only waits for nvidia-smi to have started
        deadline = time.time() + 10
        while not argv_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        return []

    monkeypatch.setattr(gpu_check, "model_ceiling", model_ceiling)
    assert gpu_check.main(["--steps", "model", "--minutes", "1", "--json", str(tmp_path / "gpu.json")]) == 0
    args = argv_file.read_text().split()
    assert args[args.index("-i") + 1] == f"GPU-{UUID}"


def test_an_unknown_step_is_refused_by_name(tmp_path, capsys):
    """`--steps modle` ran nothing, said nothing and exited 0: a GPU machine's minutes spent on no figure."""
    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--dry-run-cpu", "--steps", "model,modle", "--json", str(out)])
    assert stopped.value.code == 2 and "'modle'" in capsys.readouterr().err and not out.exists()


def test_steps_listed_with_spaces_all_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "model_ceiling", lambda *args: [])
    monkeypatch.setattr(gpu_check, "make_clip", lambda folder, size, seconds: tmp_path / "clip.mp4")
    monkeypatch.setattr(gpu_check, "decode_rows", lambda *args: [{"hwaccel_used": None, "frames": 1}])
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry-run-cpu", "--steps", "model, decode", "--minutes", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["decode"] == [{"hwaccel_used": None, "frames": 1}]


def test_a_json_path_in_a_folder_not_made_yet_keeps_the_figures(tmp_path, monkeypatch):
    """The first save raised FileNotFoundError, and so did the one after the step's error and the last one: the
    check ended in a traceback with nothing kept."""
    def model_ceiling(*args):
        rows, save = args[-2], args[-1]
        rows.append({"variant": "torch fp32", "batch": 1, "frames_per_s": 1.0})
        save()
        return rows

    monkeypatch.setattr(gpu_check, "model_ceiling", model_ceiling)
    out = tmp_path / "results" / "today" / "gpu.json"
    assert gpu_check.main(["--dry-run-cpu", "--steps", "model", "--minutes", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"][0]["frames_per_s"] == 1.0


def test_a_json_path_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "model_ceiling", lambda *args: pytest.fail("measured with nowhere to save"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--dry-run-cpu", "--steps", "model", "--json", str(tmp_path / "a-file" / "gpu.json")])
    assert stopped.value.code == 2 and "--json" in capsys.readouterr().err


def test_a_pipeline_run_with_no_message_in_its_window_ends_the_ladder(tmp_path, monkeypatch):
    """A stalled service publishes nothing in the window: its age is None, which passed as within budget, and
    the ladder went on doubling the cameras."""
    import ray

    import pipeline.embedded_redis

    class Server:
        url = "redis://127.0.0.1:1/0"

        def start(self):
            return self

        def stop(self):
            pass

    runs = []

    def pipeline_run(checkpoint, clip, n, *args, **kwargs):
        runs.append(n)
        return {"cameras": n, "frames_per_s": 0.0, "age_p50_ms": None, "age_p95_ms": None, "age_p99_ms": None,
                "lost_in_window": 0, "gpu": None}

    monkeypatch.setattr(pipeline.embedded_redis, "EmbeddedRedis", Server)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a caller's Ray: none is started
    monkeypatch.setattr(gpu_check, "pipeline_run", pipeline_run)
    args = argparse.Namespace(seconds=1.0, max_cameras=64, budget_ms=300.0, checkpoint=gpu_check.DEMO)
    rows = gpu_check.pipeline_ladder(args, tmp_path / "clip.mp4", "cpu", None, time.time() + 3600, _no_sampler(),
                                     False)
    assert runs == [1] and rows[0]["over_budget"] is True


@pytest.mark.parametrize("failure", [RuntimeError("placement timed out"), KeyboardInterrupt("time limit")])
def test_a_pipeline_run_whose_start_fails_stops_what_it_started(tmp_path, monkeypatch, failure):
    """A start that fails or is interrupted half-way (the watchdog) left its replicas and cameras running."""
    import pipeline.app

    stopped = []

    class App:  # starts some actors, then fails
        def __init__(self, config, say):
            pass

        def start(self):
            raise failure

        def shutdown(self, drain=True):
            stopped.append(drain)
            return []

    monkeypatch.setattr(pipeline.app, "App", App)
    clip = tmp_path / "clip.mp4"
    clip.touch()
    with pytest.raises(type(failure)):
        gpu_check.pipeline_run(gpu_check.DEMO, clip, 1, "cpu", None, "redis://127.0.0.1:1/0", 3.0, None, 8,
                               end=time.time() + 60)
    assert stopped == [False]


@pytest.mark.parametrize("option, value", [("--seconds", "0"), ("--budget-ms", "nan"), ("--minutes", "-1"),
                                           ("--max-cameras", "0"), ("--seconds", "abc")])
def test_limits_that_never_end_or_never_pass_are_refused_by_name(option, value, capsys):
    """--seconds 0 ran each pipeline until the watchdog stopped it (0 read as "no limit"); a NaN budget never passed."""
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--dry-run-cpu", option, value])
    assert stopped.value.code == 2 and option in capsys.readouterr().err
