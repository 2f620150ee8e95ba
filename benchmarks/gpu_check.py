"""The GPU check: one command, at most ~8 minutes, one JSON file, for the first time a machine with a GPU is at hand.

    python benchmarks/gpu_check.py --json benchmarks/results-gpu.json          # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --dry-run-cpu --json /tmp/dry.json          # checks the script itself on a CPU

Steps, in order; each has its share of the time limit (``--minutes``), records its own error instead of
stopping the others, and prints one line per result as it goes:
1. environment: torch and its CUDA, the GPU (name, memory, driver), ONNX Runtime's providers, PyAV's hardware
   devices. Without a CUDA GPU, or with one torch lists but cannot run a kernel on, the check stops here with
   exit status 2 and says why (``--dry-run-cpu`` runs
   every step on the CPU at toy sizes instead: it checks the code paths and measures nothing about a GPU).
2. model ceiling: the demo checkpoint (or ``--checkpoint``) at batch 1..64 through ModelRunner, the serving
   path (host uint8 batch of synthetic street frames -> device, forward, decode + NMS, results back on the
   host), for each backend and precision: torch eager fp16 / bf16 / fp32, torch.compile fp16, ONNX Runtime fp32
   (the provider it got) and fp16 (TensorRT's ``trt_fp16_enable``; skipped, and said, where TensorRT is not active).
3. decode: a 1080p30 H.264 clip (made here from the synthetic street, upscaled) decoded by the project's
   file source, on the CPU and with ``hwaccel: cuda`` (NVDEC), with and without conversion to the model input.
4. pipeline: the whole service with N 1080p30 file cameras (paced, looping, NVDEC when step 3 found it works),
   N = 1, 4, 16, 64 (x4: a run costs its window plus ~30 s, and doubling ran out of the step's ~225 s at N=8-16)
   until the p95 frame age at XADD exceeds ``--budget-ms`` or frames are dropped.
GPU utilisation and memory are sampled every 500 ms by ``nvidia-smi`` in steps 2-4 (mean and max per result;
utilisation null where it reads "[N/A]", as on a MIG-partitioned GPU; why nvidia-smi gave nothing under
``gpu_sampler``). The JSON is written after every model point, step and pipeline run. A step still running 5 s
past its share of the time is interrupted, its error recorded, and the next step runs; past ``--minutes`` (the
environment step included) the check is interrupted, as on SIGTERM, and the JSON keeps what was measured (exit
status 4 at the limit).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import functools
import gc
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

# measure (pct, save_json) is imported only after kit_mismatch: it imports PyAV, a compiled package of the kit, which
# on another Python failed at this script's import with a traceback instead of the refusal (exit 3) naming why.
DEMO = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"  # measure.DEMO

NO_GPU_EXIT = 2
KIT_EXIT = 3  # the packages on sys.path (benchmarks/gpu_kit.py) were built for another Python
TIME_EXIT = 4  # stopped at the time limit (a step overran it): the JSON holds what was measured
# Past --minutes a step that overran it (a compile, an engine build, a hung call) is interrupted, and past
# OVERRUN_S + HARD_S the process leaves; the steps' own deadlines normally end it before either.
OVERRUN_S, HARD_S = 5.0, 10.0
BATCHES = (1, 2, 4, 8, 16, 32, 64)
# (backend, precision, compile): what step 2 measures, in this order (the cheap ones first).
MODEL_VARIANTS = (("torch", "fp16", False), ("torch", "bf16", False), ("torch", "fp32", False),
                  ("onnxruntime", "fp32", False), ("onnxruntime", "fp16", False), ("torch", "fp16", True))
# Shares of --minutes per step; what a step leaves unused goes to the next.
SHARES = {"model": 0.35, "decode": 0.15, "pipeline": 0.5}


class GpuSampler:
    """nvidia-smi in loop mode (-lms), parsed as it prints; ``window()`` summarises the samples since a mark."""

    def __init__(self, gpu: str = "0") -> None:
        """``gpu``: nvidia-smi's ``-i``; its index 0 is the first in PCI order, whatever CUDA_VISIBLE_DEVICES and
        CUDA_DEVICE_ORDER made torch's device 0, so the check passes that device's UUID (``environment``)."""
        # (time, utilisation %, memory used MiB); either may be None: "[N/A]"
        self.samples: list[tuple[float, float | None, float | None]] = []
        self.proc, self.closed = None, False
        # Why there are no samples, or fewer, for the JSON: else every "gpu" in it was null, with no word why.
        self.problem: str | None = None
        exe = shutil.which("nvidia-smi")
        if not exe:
            self.problem = "nvidia-smi is not on PATH"
        else:
            # Line-buffered: a C program writing to a pipe may hold its lines in a 4 KiB buffer (minutes of
            # samples here), and each sample is timestamped when it is read.
            line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            self.proc = subprocess.Popen([*line_buffered, exe, "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "500", "-i", gpu],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (_reading(v) for v in line.split(","))
            except ValueError:  # not a sample: its error ("No devices were found"), another driver's format
                self.problem = self.problem or f"nvidia-smi printed {line.strip()[:200]!r}"
                continue
            if util is not None or mem is not None:
                self.samples.append((time.time(), util, mem))
        if not self.closed:
            self.problem = f"{self.problem or 'nvidia-smi'}; it exited with status {self.proc.wait()}"

    def window(self, since: float, until: float | None = None) -> dict | None:
        got = [s for s in self.samples if s[0] >= since and (until is None or s[0] <= until)]
        if not got:
            return None
        util = [s[1] for s in got if s[1] is not None]
        return {"util_mean": round(statistics.fmean(util), 1) if util else None, "util_max": max(util, default=None),
                "mem_max_mib": max((s[2] for s in got if s[2] is not None), default=None), "samples": len(got)}

    def close(self) -> None:
        self.closed = True
        if self.proc:
            self.proc.terminate()
            try:  # reaped, not left a zombie for the rest of the check
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _reading(value: str) -> float | None:
    """One field of nvidia-smi's CSV: None for "[N/A]" or "[Not Supported]" (utilisation on a MIG-partitioned
    or virtual GPU, whose memory is still read), a unit after the number ignored."""
    value = value.strip()
    return None if value.startswith("[") else float(value.partition(" ")[0])


def _run_a_kernel() -> None:
    """One tiny kernel on device 0, waited for: what tells a usable GPU from one torch merely lists."""
    import torch

    torch.ones(1, device="cuda").add_(1).item()


def kit_mismatch(path: list[str] | None = None) -> str | None:
    """Why the kit on ``sys.path`` cannot load here, if it cannot: gpu_kit.py builds its compiled wheels (PyAV,
    Ray, pydantic-core, ...) for one CPython, and on another the first import of one would stop the check."""
    for entry in sys.path if path is None else path:
        marker = Path(entry or ".") / "KIT_PYTHON"
        if marker.is_file():
            built = marker.read_text().strip()
            if built.split(".")[:2] != platform.python_version().split(".")[:2]:
                return (f"the packages in {entry} were built for CPython {built}, this is {platform.python_version()}: "
                        f"build the kit again with `gpu_kit.py --python {platform.python_version()}`")
    return None


def environment(dry_run: bool) -> dict:
    import av
    import torch
    from av.codec.hwaccel import hwdevices_available

    # Why CUDA did not start (a driver older than torch's CUDA, a container without the device) torch says only
    # in a warning, once: kept for the reason, which is all the JSON would say ("sees no CUDA device").
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": available, "pyav": av.__version__,
           "pyav_hwdevices": list(hwdevices_available()), "cpus": os.cpu_count(), "dry_run_cpu": dry_run,
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
           # NVDEC needs the driver's libnvcuvid, which a container gets only with the "video" capability
           "NVIDIA_DRIVER_CAPABILITIES": os.environ.get("NVIDIA_DRIVER_CAPABILITIES"),
           "libnvcuvid": ctypes.util.find_library("nvcuvid")}
    if said:
        env["cuda_warning"] = "; ".join(str(w.message) for w in said)[:500]
    try:
        import onnxruntime as ort

        env["onnxruntime"], env["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError as e:
        env["onnxruntime"] = f"not importable: {e}"
    if available:
        # A device torch lists can still be unusable (a driver fault, busy in exclusive mode, its memory full, a
        # torch without kernels for its architecture): that stops the check here, named, not every step later.
        try:
            p = torch.cuda.get_device_properties(0)
            _run_a_kernel()
        except Exception as e:  # noqa: BLE001 - recorded, and the check stops with exit status 2 naming it
            env["cuda_available"], env["cuda_error"] = False, f"{type(e).__name__}: {e}"[:500]
        else:
            uuid = str(getattr(p, "uuid", "") or "")
            env["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                          "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count(),
                          "bf16": _native_bf16(),
                          # nvidia-smi's form of the device's name, for GpuSampler
                          "uuid": (uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}") if uuid else None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:  # a driver in a bad state can hang it: the check goes on, and says so
            out = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"{type(e).__name__}: {e}"
    return env


# The watchdog's interrupt. Not SIGINT: a job started in the background from a script (`cmd &`, nohup) begins
# with SIGINT ignored, and Python then never installs its handler, so the interrupt did nothing there.
WATCHDOG_SIGNAL = signal.SIGUSR1


class StepOverran(Exception):
    """A step still running ``OVERRUN_S`` past its share of the time: its error, and the next step runs."""


def watchdog(at: float, on_hard_stop, done: threading.Event) -> None:
    """Enforces the time limit on a step that overruns its own deadline: at ``at`` WATCHDOG_SIGNAL to the main
    thread, whose handler raises there (past the time limit a KeyboardInterrupt: its finally blocks save the JSON
    and stop Redis and Ray); if the main thread is stuck in native code ``HARD_S`` later, ``on_hard_stop()``
    (save) and exit, unless it is None (a step's share of the time). Setting ``done`` calls it off."""
    def watch() -> None:
        if done.wait(max(0.0, at - time.time())):
            return
        # A real signal to the main thread: it also wakes a sleep or a blocking read (_thread.interrupt_main
        # only runs the handler at the next bytecode, after a time.sleep(60) has run out).
        signal.pthread_kill(threading.main_thread().ident, WATCHDOG_SIGNAL)
        if on_hard_stop is None or done.wait(HARD_S):
            return
        on_hard_stop()
        os._exit(TIME_EXIT)

    threading.Thread(target=watch, name="gpu-check-watchdog", daemon=True).start()


def no_gpu_reason(env: dict) -> str:
    if env.get("cuda_error"):
        return (f"torch {env['torch']} (CUDA {env['torch_cuda']}) lists a CUDA device but cannot use it: "
                f"{env['cuda_error']}")
    if env["torch_cuda"] is None:
        return (f"torch {env['torch']} is a CPU-only build (torch.version.cuda is None); install a CUDA build of "
                "torch on the GPU machine")
    hint = "" if env.get("nvidia_smi") else "; nvidia-smi is not on PATH either (no driver?)"
    if env["CUDA_VISIBLE_DEVICES"] is not None:
        hint += f"; CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}"
    if env.get("cuda_warning"):
        hint += f"; torch said: {env['cuda_warning']}"
    return f"torch {env['torch']} (CUDA {env['torch_cuda']}) sees no CUDA device{hint}"


def model_ceiling(checkpoint: Path, device: str, batches: tuple[int, ...], variants, deadline: float,
                  sampler: GpuSampler, seconds_per_point: float = 1.5, rows: list[dict] | None = None,
                  save=lambda: None) -> list[dict]:
    """Frames/s of ModelRunner.run on a full batch, per backend / precision / batch (frames of the synthetic
    street, ``street_batch``: decode + NMS and the per-box heads see the few boxes of a quiet street). Each row
    goes into ``rows`` as it is measured, and ``save()`` is called: an error or a stop keeps what was measured."""
    from workers.model_runner import ModelRunner

    rows = [] if rows is None else rows
    streets: dict[tuple[int, int], list[np.ndarray]] = {}  # per input size: built once, not in every variant's time
    for backend, precision, compiled in variants:
        name = f"{backend}{' compile' if compiled else ''} {precision}"
        if time.time() > deadline:
            rows.append({"variant": name, "skipped": "out of time"})
            continue
        if precision == "bf16" and device == "cuda" and not _native_bf16():
            rows.append({"variant": name, "skipped": "this GPU has no native bf16 (compute capability < 8.0): torch "
                                                     "would emulate it"})
            print(f"  {name}: {rows[-1]['skipped']}", flush=True)
            continue
        if backend == "onnxruntime" and device == "cuda" and not _ort_has_cuda():
            rows.append({"variant": name, "skipped": "no onnxruntime with a CUDA provider here (the GPU build is "
                                                     "the onnxruntime-gpu package)"})
            print(f"  {name}: {rows[-1]['skipped']}", flush=True)
            continue
        t0 = time.time()
        ort_fp16 = backend == "onnxruntime" and precision == "fp16"  # the service runs ONNX Runtime in fp32 only
        try:
            with _trt_fp16(ort_fp16):
                runner = ModelRunner(checkpoint, device=device, precision="fp32" if ort_fp16 else precision,
                                     max_batch=max(batches), compile=compiled, backend=backend)
        except Exception as e:  # e.g. an ONNX Runtime without the CUDA provider: recorded, the others go on
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            print(f"  {name}: {rows[-1]['error']}", flush=True)
            continue
        provider = runner.session.session.get_providers()[0] if runner.session else None
        if ort_fp16 and provider != "TensorrtExecutionProvider":  # its CUDA and CPU providers would run fp32
            rows.append({"variant": name, "skipped": f"fp16 in ONNX Runtime is TensorRT's, and the session runs on "
                                                     f"{provider}, not TensorrtExecutionProvider"})
            print(f"  {name}: {rows[-1]['skipped']}", flush=True)
            del runner
            free_gpu_memory()
            continue
        if runner.input_size not in streets:
            streets[runner.input_size] = street_batch(runner.input_size, max(batches))
        street = streets[runner.input_size]
        for batch in batches:
            if time.time() > deadline:
                rows.append({"variant": name, "batch": batch, "skipped": "out of time"})
                break
            images = street[:batch]
            try:
                start = time.time()
                for _ in range(3):  # warm-up: kernel selection, allocator growth, compilation for this shape
                    runner.run(images, [None] * batch)
                warm_s = time.time() - start
                mark, times = time.time(), []
                while sum(times) < seconds_per_point and len(times) < 200:
                    t = time.perf_counter()
                    runner.run(images, [None] * batch)  # returns numpy: the device is synchronised
                    times.append(time.perf_counter() - t)
            except Exception as e:  # out of memory at a large batch is a result, not a crash
                rows.append({"variant": name, "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"  {name} batch {batch}: {rows[-1]['error']}", flush=True)
                break
            ms = statistics.median(times) * 1000
            rows.append({"variant": name, "backend": backend, "precision": precision, "compile": compiled,
                         "provider": provider, "batch": batch, "ms_per_batch": round(ms, 2),
                         "frames_per_s": round(batch * 1000 / ms, 1), "iterations": len(times),
                         "warmup_s": round(warm_s, 2), "gpu": sampler.window(mark)})
            print(f"  {name:<22} batch {batch:>3}: {rows[-1]['frames_per_s']:>8} frames/s "
                  f"({rows[-1]['ms_per_batch']} ms per batch){'' if not provider else ', ' + provider}", flush=True)
            save()
        rows.append({"variant": name, "setup_and_run_s": round(time.time() - t0, 1)})
        del runner
        free_gpu_memory()  # else the next variant's memory figures start from this one's cached blocks
        save()
    return rows


@contextlib.contextmanager
def _trt_fp16(on: bool):
    """While ``on``, ModelRunner's ONNX Runtime sessions ask TensorRT for fp16 (``trt_fp16_enable``; its engine
    cache keeps fp16 engines apart from the fp32 ones). Only the TensorRT provider reads it."""
    from workers import model_runner

    if not on:
        yield
        return
    providers = model_runner.gpu_providers
    model_runner.gpu_providers = functools.partial(providers, fp16=True)
    try:
        yield
    finally:
        model_runner.gpu_providers = providers


def street_batch(input_size: tuple[int, int], n: int) -> list[np.ndarray]:
    """``n`` letterboxed frames of the synthetic street the other steps decode: what cameras hand the model. Not
    random pixels: the model's cost does not depend on them, but its box decoding, NMS and per-box heads do, and
    noise gave the demo model ~20 boxes per head and image against a street's ~5."""
    from models.letterbox import letterbox
    from synthetic.scene import StreetScene

    scene = StreetScene(7, width=640, height=360, fps=30.0)
    return [letterbox(scene.step()[0], input_size)[0] for _ in range(n)]


def _native_bf16() -> bool:
    """Whether device 0 runs bf16 natively (Ampere on): before, torch emulates it, and its figures would be the
    emulation's. The one rule for the environment's report and the model step's bf16 variant."""
    import torch

    return torch.cuda.get_device_capability()[0] >= 8


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # not on the machine: the variant is skipped, the others still run
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_clip(folder: Path, size: tuple[int, int], seconds: float, fps: float = 30.0) -> Path:
    """A synthetic street rendered at 640x360 and upscaled to ``size`` (rendering at 1080p costs more than the
    check has); cached."""
    import cv2

    from synthetic.clips import encode_mp4
    from synthetic.scene import StreetScene

    path = folder / f"street-{size[0]}x{size[1]}-{fps:g}fps-{seconds:g}s.mp4"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        scene = StreetScene(7, width=640, height=360, fps=fps)
        frames = (cv2.resize(scene.step()[0], size, interpolation=cv2.INTER_LINEAR)
                  for _ in range(round(seconds * fps)))
        encode_mp4(path, frames, fps)  # written aside under a name of its own, renamed whole
    return path


def decode_rate(clip: Path, hwaccel: str | None, input_size: tuple[int, int] | None, deadline: float) -> dict:
    """Frames/s of the project's file source on ``clip`` (unpaced, looping) until ``deadline``, optionally with
    the letterbox to the model input (what a StreamActor does per analysed frame). The clock starts at the
    first frame: opening the decoder (NVDEC's set-up) is not in the rate. What decoded is read off the frames:
    FFmpeg hands NVDEC's frames over as nv12 and falls back to the CPU (this clip: yuv420p) without a word when
    the driver's decoder library is missing, so the source's own ``hwaccel`` is not proof."""
    from workers.sources import open_source

    source = open_source(str(clip), realtime=False, loop=True, hwaccel=hwaccel)
    source.open()
    frames, t0, pixels = 0, None, None
    try:
        while time.time() < deadline:
            frame = source.read()
            if frame is None:
                break
            if t0 is None:
                t0, pixels = time.perf_counter(), getattr(getattr(frame.image, "format", None), "name", None)
                continue
            if input_size:
                frame.to_model_input(input_size)
            frames += 1
    finally:
        source.close()
    seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    used = "cuda" if hwaccel and pixels not in (None, "yuv420p", "yuvj420p") else None
    return {"hwaccel_asked": hwaccel, "hwaccel_used": used, "pixel_format": pixels,
            "to_model_input": bool(input_size), "frames": frames,
            "frames_per_s": round(frames / seconds, 1) if seconds else None}


def decode_rows(checkpoint: Path, clip: Path, dry: bool, end: float, sampler: GpuSampler | None = None) -> list[dict]:
    """decode_rate on the CPU and with NVDEC, each with and without the letterbox: a window each, with the GPU's
    samples over it."""
    from models.checkpoint import read_metadata

    input_size = tuple(read_metadata(checkpoint)["config"]["input_size"])
    kinds = [(hw, model_input) for hw in ((None,) if dry else (None, "cuda")) for model_input in (None, input_size)]
    rows = []
    for k, (hw, model_input) in enumerate(kinds):
        window = (end - time.time()) / (len(kinds) - k)  # what is left, shared by the rows still to run
        mark = time.time()
        try:
            rows.append(decode_rate(clip, hw, model_input, time.time() + max(0.5, min(window, 2.0 if dry else 10.0))))
        except Exception as e:
            rows.append({"hwaccel_asked": hw, "error": f"{type(e).__name__}: {e}"})
        rows[-1]["gpu"] = sampler.window(mark) if sampler else None
        print(f"  {rows[-1]}", flush=True)
    return rows


def free_gpu_memory() -> None:
    gc.collect()  # the runners' head-timing hooks hold them in reference cycles
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - only tidying up between steps
        pass


def pipeline_run(checkpoint: Path, clip: Path, n: int, device: str, hwaccel: str | None, redis_url: str,
                 seconds: float, sampler: GpuSampler, max_batch: int, end: float | None = None) -> dict:
    """The service with ``n`` paced, looping file cameras; frame age at XADD (capture to Redis) from the messages.
    The wait for every camera's first message ends in time for the window to end by ``end`` (the step's)."""
    import redis

    from measure import pct
    from pipeline.app import App
    from pipeline.config import parse_config
    from workers.publish import keys

    cameras = [{"id": f"cam{i}", "url": str(clip), "realtime": True, "loop": True, "hwaccel": hwaccel,
                "read_timeout_s": 10} for i in range(n)]
    config = parse_config({"redis": {"url": redis_url}, "model": {"checkpoint": str(checkpoint), "device": device},
                           "inference": {"max_batch": max_batch, "max_wait_ms": 10}, "cameras": cameras,
                           "ray": {"placement_timeout_s": 30}})  # a run that cannot start must not eat the rest
    app = App(config, say=lambda m: None)
    started = time.time()
    try:
        app.start()
    except BaseException:  # what had started stops (as `hydravision run` does); the start's error is the run's
        try:
            app.shutdown(drain=False)
        except Exception:  # noqa: BLE001 - the start's error is the one to report
            logging.warning("stopping after a failed start failed too", exc_info=True)
        raise
    client = redis.Redis.from_url(redis_url)
    settle = min(5.0, seconds / 3)  # the first batches pay allocation and autotuning
    try:
        wait = 90.0 if end is None else min(90.0, end - time.time() - settle - seconds - 10)  # 10 s: the shutdown
        deadline = time.time() + wait
        while not all(client.xlen(keys("hv").detections(c["id"])) for c in cameras):
            if time.time() > deadline:
                raise TimeoutError(f"{n} cameras: not every camera delivered within {max(wait, 0):.0f} s"
                                   f"{' (the step ran out of time)' if wait < 90 else ''}")
            time.sleep(0.2)
        first_message_s = time.time() - started
        time.sleep(settle)
        t0, ticks = time.time(), []
        app.run(duration=seconds, on_tick=ticks.append)  # per-camera stats once a second
        t1 = time.time()
    finally:
        finals = app.shutdown()
    # Frames lost in the window (overload, errors; not the skips of a camera's fps, nor the drain at shutdown):
    # the last tick's counters minus the first's, so that a slow first batch at start-up does not count.
    first = {s["camera"]: s.get("dropped") or {} for s in (ticks[0] if ticks else [])}
    last = {s["camera"]: s.get("dropped") or {} for s in (ticks[-1] if ticks else [])}
    lost = sum(last[c].get(k, 0) - first.get(c, {}).get(k, 0) for c in last for k in ("overload", "error"))
    ages, per_cam = [], {}
    for c in cameras:
        entries = client.xrange(keys("hv").detections(c["id"]), min=f"{int(t0 * 1000)}-0", max=f"{int(t1 * 1000)}-0")
        per_cam[c["id"]] = len(entries) / (t1 - t0)
        for entry_id, fields in entries:
            stored = int(entry_id.split(b"-")[0]) / 1000
            ages.append(max(0.0, stored - json.loads(fields[b"data"])["ts"]) * 1000)
    client.flushall()
    dropped = {f["camera"]: f.get("dropped") for f in finals}
    return {"cameras": n, "hwaccel": hwaccel, "first_message_s": round(first_message_s, 1),
            "frames_per_s": round(sum(per_cam.values()), 1),
            "fairness": round(min(per_cam.values()) / max(max(per_cam.values()), 1e-9), 2),
            "age_p50_ms": pct(ages, 50), "age_p95_ms": pct(ages, 95), "age_p99_ms": pct(ages, 99),
            "dropped_at_end": dropped, "lost_in_window": lost, "gpu": sampler.window(t0, t1),  # not the shutdown's
            "seconds": round(t1 - t0, 1)}


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a finite number above 0."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--minutes", type=positive(float), default=7.5, help="time limit for the whole check")
    p.add_argument("--budget-ms", type=positive(float), default=300.0,
                   help="frame age (p95 at XADD) the pipeline must keep")
    p.add_argument("--max-cameras", type=positive(int), default=64)
    # 0 was "no limit" to the run (until the watchdog stopped it), NaN a budget never passed
    p.add_argument("--seconds", type=positive(float), default=10.0, help="measurement window per camera count")
    p.add_argument("--steps", default="model,decode,pipeline", help="which steps after the environment")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="no GPU needed: every step on the CPU at toy sizes, to check this script (measures nothing)")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := [s for s in steps if s not in SHARES]:  # else the check measured nothing and said nothing
        p.error(f"--steps: no step {', '.join(map(repr, unknown))} (the steps: {','.join(SHARES)})")
    if args.json:  # a path that cannot be written fails now, not at the first save with minutes of figures lost
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a"):
                pass
        except OSError as e:
            p.error(f"--json {args.json}: cannot write there ({e.strerror or e})")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t_start = time.time()
    limit = t_start + args.minutes * 60
    if problem := kit_mismatch():
        if args.json:
            Path(args.json).write_text(json.dumps({"error": problem}, indent=2))
        print(f"gpu_check: {problem}", file=sys.stderr)
        return KIT_EXIT
    from measure import save_json
    env: dict = {}
    result: dict = {"environment": env, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    dry = args.dry_run_cpu
    device = "cpu" if dry else "cuda"
    sampler: GpuSampler | None = None
    running: dict = {}  # the step running now and when it overruns its share of the time

    def deadline(step: str) -> float:  # this step's share of what is left, the later steps' shares kept back
        later = [s for s in SHARES if s in steps and list(SHARES).index(s) > list(SHARES).index(step)]
        left = limit - time.time()
        return time.time() + left * SHARES[step] / (SHARES[step] + sum(SHARES[s] for s in later))

    def save() -> None:  # after every step, model point and pipeline run: a check cut short keeps what it measured
        result["seconds"] = round(time.time() - t_start, 1)
        if sampler and sampler.problem:
            result["gpu_sampler"] = sampler.problem
        for _ in range(3):  # from the watchdog's thread the main one may be adding a row meanwhile
            try:
                return save_json(args.json, result)
            except RuntimeError:
                time.sleep(0.1)

    def hard_stop() -> None:
        result["error"] = f"stopped at the time limit ({args.minutes:g} min): a step was stuck past it"
        save()

    def interrupt(signum, frame) -> None:  # the watchdogs' signal
        if time.time() > limit:
            raise KeyboardInterrupt("time limit")
        if running and time.time() >= running["until"]:
            share = running.pop("share")
            running.clear()  # once: what the step records, and the steps after it, are not interrupted
            raise StepOverran(f"still running {OVERRUN_S:g} s past its share of the time ({share:.0f} s)")

    def step(name: str, run) -> None:  # a step that fails or overruns its share records why; the later steps run
        end = deadline(name)
        finished = threading.Event()
        if end + OVERRUN_S < limit:  # the last step's end is the time limit, which the check's watchdog keeps
            running.update(until=end + OVERRUN_S, share=end - time.time())
            watchdog(end + OVERRUN_S, None, finished)
        try:
            try:
                result[name] = run(end)
            finally:
                running.clear()
                finished.set()
        except Exception as e:
            error = {"error": f"{type(e).__name__}: {e}"[:500]}
            if isinstance(result.get(name), list):  # the pipeline's runs so far stay
                result[name].append(error)
            else:
                result[name] = error
            print(f"  {name}: {error['error']}", flush=True)
        save()

    code, on_time = 0, threading.Event()
    sigterm, overrun = signal.getsignal(signal.SIGTERM), signal.getsignal(WATCHDOG_SIGNAL)
    try:  # from here on an interrupt lands in the except below
        # SIGTERM (a `timeout` around the check) as Ctrl-C: the finally blocks save what was measured
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(WATCHDOG_SIGNAL, interrupt)
        # from the start: a CUDA driver or a first kernel that hangs in the environment step is stopped too
        watchdog(limit + OVERRUN_S, hard_stop, on_time)
        env.update(environment(dry))
        print(f"environment: {json.dumps(env)}", flush=True)
        if not env["cuda_available"] and not dry:
            reason = no_gpu_reason(env)
            result["error"] = f"no CUDA GPU: {reason}"
            print(f"gpu_check: no CUDA GPU: {reason}. Nothing measured; run it on a machine with an NVIDIA GPU "
                  f"(or pass --dry-run-cpu to check the script on a CPU).", file=sys.stderr)
            return NO_GPU_EXIT  # the finally below saves
        sampler = GpuSampler(env.get("gpu", {}).get("uuid") or "0")
        if "model" in steps:
            print("model ceiling (ModelRunner.run, host batch in, results out):", flush=True)
            variants = ((("torch", "fp32", False), ("onnxruntime", "fp32", False), ("onnxruntime", "fp16", False))
                        if dry else MODEL_VARIANTS)
            result["model"] = model_rows = []  # filled point by point, saved after each
            step("model", lambda end: model_ceiling(args.checkpoint, device, (1, 2) if dry else BATCHES, variants,
                                                    end, sampler, 0.2 if dry else 1.5, model_rows, save))
            free_gpu_memory()  # what the model step cached is not the pipeline's
        clip = None
        if "decode" in steps or "pipeline" in steps:
            size = (320, 180) if dry else (1920, 1080)
            try:
                clip = make_clip(Path(tempfile.gettempdir()) / "hydravision-gpu-check", size, 2.0 if dry else 10.0)
            except Exception as e:  # nothing to decode: both steps are skipped, the reason recorded
                result["clip"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(f"clip: {result['clip']['error']}", flush=True)
                steps = [s for s in steps if s not in ("decode", "pipeline")]
        if "decode" in steps:
            print(f"decode {clip.name}:", flush=True)
            step("decode", lambda end: decode_rows(args.checkpoint, clip, dry, end, sampler))
        decoded = result.get("decode") if isinstance(result.get("decode"), list) else []
        hwaccel = "cuda" if any(r.get("hwaccel_used") == "cuda" for r in decoded) else None  # NVDEC where it works
        if "pipeline" in steps:
            rows: list[dict] = []
            result["pipeline"] = rows  # filled run by run, saved after each
            step("pipeline", lambda end: pipeline_ladder(args, clip, device, hwaccel, end, sampler, dry, rows, save))
    except (KeyboardInterrupt, SystemExit):  # the watchdog's, Ctrl-C, SIGTERM (ours; once Ray is up, its sys.exit)
        late = time.time() > limit
        result["error"] = (f"stopped at the time limit ({args.minutes:g} min): a step overran it" if late
                           else "interrupted")
        print(f"gpu_check: {result['error']}", file=sys.stderr, flush=True)
        code = TIME_EXIT if late else 130
    finally:
        on_time.set()
        signal.signal(signal.SIGTERM, sigterm)
        signal.signal(WATCHDOG_SIGNAL, overrun)
        if sampler:
            sampler.close()
        save()
    print(f"done in {result['seconds']} s{f'; results in {args.json}' if args.json else ''}", flush=True)
    return code


def pipeline_ladder(args, clip: Path, device: str, hwaccel: str | None, end: float, sampler: GpuSampler,
                    dry: bool, rows: list[dict] | None = None, save=lambda: None) -> list[dict]:
    """N = 1, 4, 16, ... cameras until the frame age budget is broken, frames are lost, or time runs out. Each
    run's row goes into ``rows`` as it ends, and ``save()`` is called."""
    import ray

    from measure import start_ray
    from pipeline.embedded_redis import EmbeddedRedis

    seconds = 3.0 if dry else args.seconds
    rows = [] if rows is None else rows
    server = EmbeddedRedis().start()
    ours = not ray.is_initialized()  # a caller's Ray (a test session's) is used and left running
    try:
        if ours:
            start_ray()
        n = 1
        while n <= (1 if dry else args.max_cameras):
            if time.time() + seconds + 40 > end:  # a run costs its window plus ~30 s of start and stop
                rows.append({"cameras": n, "skipped": "out of time"})
                break
            print(f"pipeline, {n} x {clip.name} (hwaccel {hwaccel}) for {seconds:g} s ...", flush=True)
            try:
                rows.append(pipeline_run(args.checkpoint, clip, n, device, hwaccel, server.url, seconds, sampler,
                                         max_batch=8 if dry else 32, end=end))
            except Exception as e:
                rows.append({"cameras": n, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"  {rows[-1]['error']}", flush=True)
                save()
                break
            save()
            r = rows[-1]
            print(f"  {r['frames_per_s']} frames/s, age p50/p95/p99 {r['age_p50_ms']}/{r['age_p95_ms']}/"
                  f"{r['age_p99_ms']} ms, lost {r['lost_in_window']}, GPU {r['gpu']}", flush=True)
            # no message in the window (age None): the service stalled, which is not keeping the budget
            if r["age_p95_ms"] is None or r["age_p95_ms"] > args.budget_ms or r["lost_in_window"]:
                r["over_budget"] = True
                break
            if n >= args.max_cameras:
                break
            n = min(n * 4, args.max_cameras)  # x4: doubling ran out of the step's time at N=8-16 (a lower bound only)
    finally:  # also when the time limit interrupts a run
        try:
            if ours:
                ray.shutdown()
        finally:  # the time limit or a SIGTERM landing in Ray's shutdown still stops Redis
            server.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())
