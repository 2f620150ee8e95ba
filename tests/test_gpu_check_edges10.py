"""benchmarks/gpu_check.py audited again for its first run on a GPU machine, checked on the CPU with fakes:
nvidia-smi on a MIG-partitioned GPU or failing, a hang in the environment step, a step past its share of the
time, the model ceiling fed noise, an interrupt in the pipeline's teardown; and pipeline/analytics_eval.py given a
tracker switched off."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling measure.py, as when run directly

import gpu_check  # noqa: E402

from pipeline.analytics_eval import STREET_LINES, STREET_ZONES, run_frames  # noqa: E402
from synthetic.scene import FrameTruth  # noqa: E402
from workers.settings import TrackerConfig  # noqa: E402

UUID = "GPU-5ab1c0de-1234-5678-9abc-def012345678"


def _fake_smi(tmp_path: Path, monkeypatch, script: str) -> None:
    """An nvidia-smi on PATH that runs ``script`` (sh) whatever it is asked."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def _no_sampler() -> gpu_check.GpuSampler:
    sampler = gpu_check.GpuSampler.__new__(gpu_check.GpuSampler)
    sampler.samples, sampler.proc = [], None
    return sampler


def _processes_with(token: str) -> list[int]:
    """The processes whose environment holds ``token``: what a fake started, its children included."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or another user's
            pass
    return found


def _wait(condition, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)


def test_a_mig_gpu_s_memory_is_sampled_though_its_utilisation_reads_n_a(tmp_path, monkeypatch):
    """With MIG on, nvidia-smi reads the GPU's utilisation as [N/A] and its memory still: every line was dropped,
    and every result's "gpu" was null. The fake ends with close() (a `sleep` it forked ran on for 30 s after)."""
    token = uuid.uuid4().hex
    monkeypatch.setenv("HV_FAKE_SMI_RUN", token)  # marks the fake's processes
    # exec: the sleep is the process close() terminates, as the real nvidia-smi (stdbuf execs it) is
    _fake_smi(tmp_path, monkeypatch, "echo '[N/A], 30000'\necho '[N/A], 31000 MiB'\nexec sleep 30")
    since = time.time() - 1
    sampler = gpu_check.GpuSampler(UUID)
    try:
        _wait(lambda: len(sampler.samples) >= 2)
        assert sampler.window(since) == {"util_mean": None, "util_max": None, "mem_max_mib": 31000.0, "samples": 2}
        assert sampler.problem is None
        assert _processes_with(token)
    finally:
        sampler.close()
    _wait(lambda: not _processes_with(token), 10.0)
    assert not _processes_with(token)


def test_why_nvidia_smi_gave_no_samples_is_in_the_json(tmp_path, monkeypatch):
    """nvidia-smi that cannot find the GPU (a MIG instance's UUID, a driver mismatch) prints why and exits: its
    stderr went nowhere and its lines were skipped, so the JSON's "gpu" fields were all null with no word why."""
    _fake_smi(tmp_path, monkeypatch, "echo 'No devices were found'\nexit 6")
    env = {"torch": "2.11.0", "torch_cuda": "13.0", "cuda_available": True, "gpu": {"uuid": UUID}}
    monkeypatch.setattr(gpu_check, "environment", lambda dry_run: env)

    def model_ceiling(*args):  # no GPU here: the step only waits for nvidia-smi to have ended
        sampler = args[5]
        _wait(lambda: "exited" in (sampler.problem or ""))
        return []

    monkeypatch.setattr(gpu_check, "model_ceiling", model_ceiling)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--steps", "model", "--minutes", "1", "--json", str(out)]) == 0
    said = json.loads(out.read_text())["gpu_sampler"]
    assert "No devices were found" in said and "exited with status 6" in said
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.GpuSampler(UUID).problem == "nvidia-smi is not on PATH"


def test_a_hang_in_the_environment_step_is_stopped_at_the_time_limit(tmp_path, monkeypatch):
    """The watchdog started after the environment step: a CUDA driver or a first kernel that hung there held the
    check past --minutes for as long as it hung."""
    monkeypatch.setattr(gpu_check, "OVERRUN_S", 0.2)
    monkeypatch.setattr(gpu_check, "HARD_S", 10.0)  # in this process: the interrupt alone must end it

    def environment(dry_run):  # hangs, then finds no GPU
        time.sleep(6)
        return {"torch": "2.11.0", "torch_cuda": None, "cuda_available": False, "CUDA_VISIBLE_DEVICES": None}

    monkeypatch.setattr(gpu_check, "environment", environment)
    out = tmp_path / "gpu.json"
    started = time.time()
    code = gpu_check.main(["--steps", "model", "--minutes", "0.02", "--json", str(out)])
    assert code == gpu_check.TIME_EXIT and time.time() - started < 5
    assert "stopped at the time limit" in json.loads(out.read_text())["error"]


def test_a_step_past_its_share_of_the_time_is_stopped_and_the_next_step_runs(tmp_path, monkeypatch):
    """A step that overran its share (a compile, a hung call) ran on to --minutes, where the whole check stopped:
    the steps after it, the pipeline's ladder among them, measured nothing."""
    monkeypatch.setattr(gpu_check, "OVERRUN_S", 0.2)
    monkeypatch.setattr(gpu_check, "SHARES", {"model": 0.05, "decode": 0.95, "pipeline": 0.5})
    monkeypatch.setattr(gpu_check, "environment", lambda dry_run: {"cuda_available": False, "dry_run_cpu": True})

    def model_ceiling(*args):  # one point, then stuck
        rows, save = args[-2], args[-1]
        rows.append({"variant": "torch fp32", "batch": 1, "frames_per_s": 1.0})
        save()
        time.sleep(30)

    monkeypatch.setattr(gpu_check, "model_ceiling", model_ceiling)
    monkeypatch.setattr(gpu_check, "make_clip", lambda folder, size, seconds: tmp_path / "clip.mp4")
    monkeypatch.setattr(gpu_check, "decode_rows", lambda *args: [{"hwaccel_used": None, "frames": 1}])
    out = tmp_path / "gpu.json"
    started = time.time()
    code = gpu_check.main(["--dry-run-cpu", "--steps", "model,decode", "--minutes", "0.2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and "error" not in result and time.time() - started < 8, result
    assert result["model"][0]["frames_per_s"] == 1.0
    assert "StepOverran" in result["model"][-1]["error"] and "past its share" in result["model"][-1]["error"]
    assert result["decode"] == [{"hwaccel_used": None, "frames": 1}]


class NoModel:
    """A runner stand-in for checks that must fail before the model runs."""

    heads, input_size = {"people": ["person"], "vehicles": ["car", "bicycle"]}, (256, 448)

    def run(self, images, heads):
        raise AssertionError("the model ran: the bad input was not refused")


@pytest.mark.parametrize("zones, lines", [(STREET_ZONES, STREET_LINES), ([], [])])
def test_the_analytics_harness_refuses_a_tracker_switched_off(zones, lines):
    """The camera refuses zones and lines without tracking and publishes untracked detections; the harness
    tracked, counted and scored all the same, figures for a camera that does not exist."""
    empty = FrameTruth(0, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                       np.zeros(0, np.float32))
    frames = [(np.zeros((360, 640, 3), np.uint8), empty)]
    with pytest.raises(ValueError, match="tracker.enabled: false"):
        run_frames(NoModel(), frames, zones, lines, tracker=TrackerConfig(enabled=False))


def test_the_model_ceiling_runs_frames_of_a_street_not_noise(monkeypatch):
    """Random pixels gave the demo model ~20 boxes per head and image (a street ~5): the ceiling timed box
    decoding, NMS and the per-box heads (attributes, re-ID) on 4 times the boxes of a camera's frames, while its
    docstring said "few boxes, as on a quiet street"."""
    from workers.model_runner import ModelRunner

    boxes, run = [], ModelRunner.run

    def counted(self, images, heads):
        out = run(self, images, heads)
        boxes.extend(len(arrays["boxes"]) for image in out for arrays in image.values())
        return out

    monkeypatch.setattr(ModelRunner, "run", counted)
    rows = gpu_check.model_ceiling(gpu_check.DEMO, "cpu", (1, 2), (("torch", "fp32", False),), time.time() + 60,
                                   _no_sampler(), 0.05)
    assert [r["batch"] for r in rows if "frames_per_s" in r] == [1, 2]
    assert 0 < sum(boxes) / len(boxes) < 10, boxes


def test_a_save_cut_short_keeps_the_json_saved_before(tmp_path, monkeypatch):
    """gpu_check saves after every point, its watchdog's hard stop can race the main thread's save: a write cut short
    left a truncated JSON in place of what had been measured. Written aside and renamed now."""
    from pathlib import Path

    from benchmarks import measure

    out = tmp_path / "results.json"
    measure.save_json(str(out), {"points": [1]})

    def cut_short(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:len(text) // 2])
        raise KeyboardInterrupt  # the hard stop, or a second Ctrl-C, mid-write

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(KeyboardInterrupt):
        measure.save_json(str(out), {"points": [1, 2]})
    monkeypatch.undo()
    assert json.loads(out.read_text())["points"] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left beside it


def test_the_model_ceiling_builds_the_street_frames_once_per_input_size(monkeypatch):
    """Each variant rebuilt the 64 street frames (~0.3 s here) inside its own share of the model step's time."""
    from workers import model_runner

    class Runner:  # what model_ceiling uses of a ModelRunner; the input size from the variant's precision
        session = None

        def __init__(self, checkpoint, precision, **kwargs):
            self.input_size = (64, 96) if precision == "fp16" else (96, 64)

        def run(self, images, heads):
            return [{} for _ in images]

    built, street_batch = [], gpu_check.street_batch

    def counted(input_size, n):
        built.append(input_size)
        return street_batch(input_size, n)

    monkeypatch.setattr(model_runner, "ModelRunner", Runner)
    monkeypatch.setattr(gpu_check, "street_batch", counted)
    variants = (("torch", "fp32", False), ("onnxruntime", "fp32", False), ("torch", "fp16", False))
    rows = gpu_check.model_ceiling(gpu_check.DEMO, "cpu", (1, 2), variants, time.time() + 60, _no_sampler(), 0.01)
    assert len([r for r in rows if "frames_per_s" in r]) == 6, rows
    assert built == [(96, 64), (64, 96)]


def test_an_interrupt_in_ray_s_shutdown_still_stops_redis(tmp_path, monkeypatch):
    """The time limit's interrupt (or a SIGTERM) landing in the pipeline step's ray.shutdown() skipped the
    embedded Redis's stop: a redis-server ran on after the check returned (until the interpreter's exit)."""
    import measure
    import ray

    from pipeline.embedded_redis import EmbeddedRedis

    servers, start = [], EmbeddedRedis.start

    def started(self, *args, **kwargs):
        servers.append(self)
        return start(self, *args, **kwargs)

    def slow_shutdown(*args, **kwargs):  # interrupted in the middle, as a `timeout` around the check does
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    monkeypatch.setattr(EmbeddedRedis, "start", started)
    monkeypatch.setattr(measure, "start_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the check's own Ray: it shuts it down
    monkeypatch.setattr(ray, "shutdown", slow_shutdown)
    monkeypatch.setattr(gpu_check, "environment", lambda dry_run: {"cuda_available": False, "dry_run_cpu": True})
    monkeypatch.setattr(gpu_check, "make_clip", lambda folder, size, seconds: tmp_path / "clip.mp4")
    out = tmp_path / "gpu.json"
    # 30 s: too short for a pipeline run (its window and ~40 s), so the step goes straight to its teardown
    code = gpu_check.main(["--dry-run-cpu", "--steps", "pipeline", "--minutes", "0.5", "--json", str(out)])
    try:
        assert code == 130 and json.loads(out.read_text())["error"] == "interrupted"
        assert len(servers) == 1 and servers[0].proc.poll() is not None, "redis-server still running"
    finally:
        for server in servers:
            server.stop()
