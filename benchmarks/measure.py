"""Measurement helpers for the benchmarks: clips, CPU and memory of the processes involved, percentiles."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import psutil

from models.files import written_aside
from synthetic.clips import encode_mp4
from synthetic.scene import StreetScene

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "checkpoints" / "demo.safetensors"


def start_ray(num_cpus: int | None = None, **system_config) -> None:
    """The benchmarks' private local Ray: loopback only, quiet, the service's own system config (a copy:
    ray.init adds its own keys to the dict it is given), with ``system_config`` overriding it."""
    import logging

    import ray

    from pipeline.app import RAY_SYSTEM_CONFIG  # here, not at the top: bench_threads' model-only child imports us

    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=512 * 2**20, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
             log_to_driver=False, _system_config={**RAY_SYSTEM_CONFIG, **system_config})


def with_ray(env: dict[str, str], fn, num_cpus: int | None = None, **system_config):
    """``fn()`` in a Ray of its own started with ``env`` set: a setting the workers read from their
    environment at start reaches them only through the raylet, which copies the driver's when it starts."""
    import ray

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    start_ray(num_cpus, **system_config)
    try:
        return fn()
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_clips(folder: Path, count: int = 4, seconds: float = 8.0, fps: float = 25.0) -> list[Path]:
    """Synthetic street clips (640x360 H.264), one per seed; cached in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for seed in range(count):
        path = folder / f"street-{seed}.mp4"
        if not path.is_file():
            scene = StreetScene(100 + seed, fps=fps)
            encode_mp4(path, (scene.step()[0] for _ in range(int(seconds * fps))), fps=fps, crf=20)
        clips.append(path)
    return clips


def _ray_among(candidates: Iterable[psutil.Process]) -> list[tuple[psutil.Process, str]]:
    """Those of ``candidates`` that are Ray's (raylet, GCS, workers, its agents), with their names; not this one."""
    found = []
    for p in candidates:
        try:
            cmd, name = " ".join(p.cmdline()), p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid != os.getpid() and ("ray::" in cmd or "ray::" in name or name in ("raylet", "gcs_server")
                                     or "ray/_private" in cmd or "ray/dashboard" in cmd):
            found.append((p, name))
    return found


def ray_processes() -> list[psutil.Process]:
    """The Ray processes this process started (raylet, GCS, workers: its descendants) plus this process. Not the
    machine's: another session's `hydravision run` beside a benchmark had its CPU counted as the benchmark's. A Ray
    this process joined ($RAY_ADDRESS) has no raylet among them: then the machine's, with a warning (its workers
    counted for nothing made the CPU per frame far too low)."""
    me = psutil.Process()
    found = _ray_among(me.children(recursive=True))
    if not any(name == "raylet" for _, name in found):
        print("warning: no Ray started by this process (a joined cluster?): counting every Ray process of this "
              "machine, other runs' too", file=sys.stderr)
        found = _ray_among(psutil.process_iter())
    return [me, *(p for p, _ in found)]


def role(p: psutil.Process) -> str:
    try:
        title = " ".join(p.cmdline()) + " " + p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if p.pid == os.getpid():
        return "driver"
    if "StreamActor" in title:
        return "stream"
    if "InferenceActor" in title:
        return "inference"
    return "ray-core"


def cpu_seconds(*procs: psutil.Process) -> float:
    """User + system CPU seconds of these processes so far."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


@dataclass
class Usage:
    cpu: dict[str, float]  # cpu seconds by role
    pss_mb: dict[str, float]
    rss_mb: dict[str, float]
    count: dict[str, int]


def usage(procs: list[psutil.Process]) -> Usage:
    cpu: dict[str, float] = {}
    pss: dict[str, float] = {}
    rss: dict[str, float] = {}
    count: dict[str, int] = {}
    for p in procs:
        try:
            r = role(p)
            t = p.cpu_times()
            mem = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        cpu[r] = cpu.get(r, 0.0) + t.user + t.system
        pss[r] = pss.get(r, 0.0) + mem.pss / 2**20
        rss[r] = rss.get(r, 0.0) + mem.rss / 2**20
        count[r] = count.get(r, 0) + 1
    return Usage(cpu, pss, rss, count)


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, summed over cores: every process (Redis, Ray's own,
    anything else running) and the kernel. Between two readings it tells how much of the machine was left idle."""
    fields = psutil.cpu_times()._asdict()
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))  # Linux counts guest in user
    return total - fields["idle"] - fields.get("iowait", 0.0), total


def busy_cores(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Cores the whole machine kept busy between two ``machine_cpu()`` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(busy / total * (os.cpu_count() or 1), 3) if total > 0 else 0.0


TICKS = os.sysconf("SC_CLK_TCK")


def task_cpu(pid: int | str) -> Iterator[tuple[int, str, float]]:
    """(thread id, the thread's OS name, CPU seconds so far) for each thread of a process ("self": this one);
    none for a process gone, a thread gone meanwhile is left out."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        yield int(tid), name, (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def thread_cpu(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds so far by thread, named as hydravision names its threads for the OS (workers/thread_names.py:
    hv-cap per camera, hv-loop, hv-model, hv-publisher, hv-compile; each kind summed over cameras and
    processes); any other thread counts as '<process role>: other' (Ray's own, ONNX/OpenVINO pools, ...)."""
    out: dict[str, float] = {}
    for p in procs:
        r = role(p)
        for _, name, seconds in task_cpu(p.pid):
            key = name.split()[0] if name.startswith("hv-") else f"{r}: other"
            out[key] = out.get(key, 0.0) + seconds
    return out


def own_thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's Python threads, by the part of their name before the first '-'
    (``decode-3`` counts as ``decode``); threads Python did not start (native pools) as 'other'."""
    import threading
    names = {t.native_id: t.name.split("-")[0] for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid, _, seconds in task_cpu("self"):
        key = names.get(tid, "other")
        out[key] = out.get(key, 0.0) + seconds
    return out


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after one untimed call (oneDNN picks its kernels then)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def cpu_facts() -> dict:
    """The CPU model and the instruction sets the runtimes' kernels choose by: hosts of one machine kind differ
    (the same benchmark ran the model 2x slower on one than another), and the figures only compare within one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu_model": model, "cpu_flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni",
                                                                                        "amx", "avx_vnni")))}


def save_json(path: str | None, data: dict) -> None:
    """Writes the figures, with the machine's CPU facts added under ``machine``."""
    if path:
        data = {**data, "machine": {"cpus": os.cpu_count(), **cpu_facts(), **data.get("machine", {})}}
        # Aside, then renamed: gpu_check saves after every point, and a kill (or its watchdog's hard stop, racing the
        # main thread's save) mid-write left a cut-short file in place of what had been measured.
        with written_aside(Path(path), Path(f"{path}.{os.getpid()}.{threading.get_ident()}.tmp")) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str))
        print(f"wrote {path}")
