"""How many intra-op threads the inference replica should use on a small CPU machine, by measurement (torch by
default; --backend onnxruntime for ONNX Runtime, the CPU default since 2026-12-03).

    python benchmarks/bench_threads.py                      # ~8 min on 2 cores
    python benchmarks/bench_threads.py --json threads.json

First the model alone (batch 1, demo checkpoint, in a fresh process per setting): p50 and max of 30 calls.
Then for each setting (1 thread; every core; every core with ``OMP_WAIT_POLICY=PASSIVE``, torch's threads
waiting passively; every core with ONNX Runtime's pool spinning, its own default; the service's defaults with
its threads as SCHED_BATCH or under the normal policy, ``service`` / ``service+normal``; ...), quiet and beside one
competing process (a busy loop, as any other program on a shared machine), two loads through the whole
service:
- demo: the demo's three synthetic cameras at 10 fps, with a fourth camera added and removed at run time
  halfway through (a new process starting: what live control does); figures: p50/p95/p99 frame age at
  publish, and the longest gap between two messages of one camera;
- files: 8 file cameras unpaced (throughput, frames/s).
Each setting runs in its own Ray (the OpenMP wait policy is read when the inference process loads libgomp; a
setting's environment reaches the workers through the raylet).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench_pipeline import file_cameras, run_hydravision
from measure import DEMO, make_clips, pct, save_json, with_ray
from pipeline.app import App
from pipeline.config import parse_config
from pipeline.embedded_redis import EmbeddedRedis
from workers.publish import keys

# One model unless a setting says otherwise ("2x": two replicas splitting the cores, the CPU default before the model
# moved into the camera processes)
SETTINGS = {"1": {"threads": 1}, "all": {"threads": os.cpu_count()},
            "all+passive": {"threads": os.cpu_count(), "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
            # ONNX Runtime's own default, its pool spinning while it waits (the service turns that off)
            "all+spin": {"threads": os.cpu_count(), "env": {"HYDRAVISION_ORT_SPIN": "1"}},
            # Ray's own default: worker processes at nice 15 (the service sets 0, pipeline/app.py RAY_SYSTEM_CONFIG)
            "1+nice15": {"threads": 1, "worker_niceness": 15}, "all+nice15": {"threads": os.cpu_count(),
                                                                               "worker_niceness": 15},
            "2x": {"threads": max(1, (os.cpu_count() or 1) // 2), "replicas": 2, "in_camera_process": False},
            # the service's defaults (the model in the camera processes, threads = cores / camera processes), its
            # threads as SCHED_BATCH (workers/thread_names.py); "+normal": the same under the normal policy
            # (and Ray's own CPU count, from which the cameras per process follow)
            "service": {"threads": None, "replicas": None, "in_camera_process": None, "ray_cpus": None},
            "service+normal": {"threads": None, "replicas": None, "in_camera_process": None, "ray_cpus": None,
                               "env": {"HYDRAVISION_SCHED_BATCH": "0"}}}


def synthetic(cid: str, seed: int) -> dict:
    return {"id": cid, "url": f"synthetic://street?seed={seed}&fps=10"}


def run_demo(redis_url: str, threads: int | None, seconds: float, replicas: int | None = 1, backend: str = "auto",
             in_camera_process: bool | None = None) -> dict:
    """Three 10 fps cameras; a fourth added at 1/3 of the window and removed at 2/3."""
    cams = [synthetic(f"street-{i}", 10 + i) for i in range(1, 4)]
    config = parse_config({"redis": {"url": redis_url}, "model": {"checkpoint": str(DEMO), "backend": backend},
                           "inference": {"max_batch": 8, "max_wait_ms": 10, "threads": threads, "replicas": replicas,
                                         "in_camera_process": in_camera_process},
                           "cameras": cams})
    app = App(config, say=lambda m: None)
    app.start()
    client = redis.Redis.from_url(redis_url)
    try:
        while not all(client.xlen(keys("hv").detections(c["id"])) > 20 for c in cams):
            time.sleep(0.2)
        t0 = time.time()
        time.sleep(seconds / 3)
        app.add_camera(synthetic("extra", 99), by="bench")
        time.sleep(seconds / 3)
        app.remove_camera("extra", by="bench")
        time.sleep(seconds / 3)
        t1 = time.time()
    finally:
        app.shutdown()
    ages, gaps = [], []
    for c in cams:
        entries = client.xrange(keys("hv").detections(c["id"]), min=f"{int(t0 * 1000)}-0", max=f"{int(t1 * 1000)}-0")
        arrivals = [int(eid.split(b"-")[0]) / 1000 for eid, _ in entries]
        ages += [json.loads(f[b"data"])["latency_ms"] for _, f in entries]
        edges = [t0, *arrivals, t1]
        gaps.append(max(b - a for a, b in zip(edges, edges[1:])))
    client.flushall()
    return {"age_ms_p50": pct(ages, 50), "age_ms_p95": pct(ages, 95), "age_ms_p99": pct(ages, 99),
            "longest_gap_s": round(max(gaps), 3), "messages": len(ages)}


MODEL_ALONE = """
import sys, time, numpy as np
from measure import DEMO
from workers.model_runner import ModelRunner
runner = ModelRunner(DEMO, device="cpu", threads=int(sys.argv[1]) or None, backend=sys.argv[2])
image = np.full((3, *runner.input_size), 114, np.uint8)
runner.warm([image], [None])
times = []
for _ in range(30):
    t = time.perf_counter(); runner.run([image], [None]); times.append(1000 * (time.perf_counter() - t))
print(round(float(np.median(times)), 1), round(max(times), 1))
"""


def model_alone(threads: int | None, env: dict[str, str], backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MODEL_ALONE, str(threads or 0), backend], env={**os.environ, **env},
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.split()
    return {"batch1_ms_p50": float(out[-2]), "batch1_ms_max": float(out[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=24.0, help="measurement window of each run")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--model-only", action="store_true", help="only the model-alone part (~1 min)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "auto"],
                   help="model.backend of every run (the results files before 2026-12-03 are torch's)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    results: dict = {"machine": {"cpus": os.cpu_count()}, "backend": args.backend, "runs": {}}
    redis_server = EmbeddedRedis().start()
    try:
        for contention in ("quiet", "one busy core"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contention != "quiet" else None
            try:
                for name in args.settings.split(","):
                    s = SETTINGS[name]
                    alone = model_alone(s["threads"], s.get("env", {}), args.backend)
                    results["runs"][f"{contention} | {name}"] = {"model_alone": alone}
                    print(f"{contention}, threads {name}: model alone {alone}", flush=True)
                    if args.model_only:
                        continue
                    print(f"{contention}, threads {name}: demo + live add/remove ...", flush=True)
                    replicas = s.get("replicas", 1)
                    ray_options = {"num_cpus": s.get("ray_cpus", max(os.cpu_count(), 8))}
                    if s.get("worker_niceness") is not None:
                        ray_options["worker_niceness"] = s["worker_niceness"]
                    demo = with_ray(s.get("env", {}), lambda: run_demo(redis_server.url, s["threads"],
                                                                       args.seconds, replicas, args.backend,
                                                                       s.get("in_camera_process")),
                                    **ray_options)
                    print(f"{contention}, threads {name}: 8 file cameras ...", flush=True)
                    files = with_ray(s.get("env", {}), lambda: run_hydravision(
                        DEMO, file_cameras(clips, 8), redis_server.url, 6.0, args.seconds / 2, threads=s["threads"],
                        replicas=replicas, in_camera_process=s.get("in_camera_process"),
                        model={"backend": args.backend}), **ray_options)
                    results["runs"][f"{contention} | {name}"].update(
                        {"demo": demo, "files_fps": files["fps"], "files_latency_ms_p50": files["latency_ms_p50"]})
                    print(f"  {json.dumps(results['runs'][f'{contention} | {name}'])}", flush=True)
            finally:
                if hog:
                    hog.kill()
    finally:
        redis_server.stop()
    print(f"\n{'contention | threads':32} {'alone p50':>9} {'max':>5} | demo {'p50':>5} {'p95':>5} {'p99':>5} "
          f"{'gap s':>5} | {'files fps':>9}")
    for key, r in results["runs"].items():
        a, d = r["model_alone"], r.get("demo")
        row = f"{key:32} {a['batch1_ms_p50']:9.0f} {a['batch1_ms_max']:5.0f}"
        if d:
            row += (f" | {d['age_ms_p50']:9.0f} {d['age_ms_p95']:5.0f} {d['age_ms_p99']:5.0f} "
                    f"{d['longest_gap_s']:5.2f} | {r['files_fps']:9.1f}")
        print(row)
    if args.json:
        save_json(args.json, results)


if __name__ == "__main__":
    main()
