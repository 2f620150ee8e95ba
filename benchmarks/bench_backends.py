"""Which runtime should run the model on a CPU: torch eager or ONNX Runtime, alone, beside a busy core, and in
the pipeline.

    .venv/bin/python benchmarks/bench_backends.py --json benchmarks/results-backends-2core.json   # ~6 min

1. the model alone (backbone, neck, both heads, decoding and NMS: ModelRunner.run) at batch 1, 4, 8 and 16,
   backends alternating round by round so that a noisy machine shifts both alike; then the same with another
   process keeping one core busy (`python -c "while True: pass"`), the case where torch's threads collapsed;
2. the outputs of both on the same frames: detections, boxes and scores compared (the tolerance check);
3. hydravision with 8 unpaced file cameras on each backend, alternating, twice.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from bench_pipeline import decoded_inputs, file_cameras, run_hydravision
from measure import DEMO, make_clips, save_json, start_ray
from pipeline.embedded_redis import EmbeddedRedis
from workers.model_runner import BACKENDS, ModelRunner


def model_alone(runners: dict, images: list[np.ndarray], batches: tuple[int, ...], rounds: int, seconds: float) -> dict:
    rates: dict = {b: {k: [] for k in runners} for b in batches}
    for _ in range(rounds):
        for b in batches:
            batch = [images[i % len(images)] for i in range(b)]
            for name, runner in runners.items():
                runner.run(batch, [None] * b)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    runner.run(batch, [None] * b)
                    n += b
                rates[b][name].append(n / (time.perf_counter() - t0))
    return {b: {name: round(float(np.median(v)), 1) for name, v in per.items()} for b, per in rates.items()}


def agreement(runners: dict, images: list[np.ndarray]) -> dict:
    out = {name: runner.run(images, [None] * len(images)) for name, runner in runners.items()}
    ref, other = out["torch"], out["onnxruntime"]
    worst = {"box_px": 0.0, "score": 0.0, "count_mismatches": 0, "detections": 0}
    for a, b in zip(ref, other):
        for head in a:
            if len(a[head]["boxes"]) != len(b[head]["boxes"]):
                worst["count_mismatches"] += 1
                continue
            worst["detections"] += len(a[head]["boxes"])
            if len(a[head]["boxes"]):
                worst["box_px"] = max(worst["box_px"], float(np.abs(a[head]["boxes"] - b[head]["boxes"]).max()))
                worst["score"] = max(worst["score"], float(np.abs(a[head]["scores"] - b[head]["scores"]).max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per backend, batch size and round")
    p.add_argument("--pipeline-seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="model-alone threads (1: what each of the two replicas a CPU runs by default gets)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    runners = {name: ModelRunner(args.checkpoint, device="cpu", threads=args.threads, max_batch=16, backend=name)
               for name in BACKENDS}
    images = decoded_inputs(clips, runners["torch"].input_size)
    results: dict = {"machine": {"cpus": os.cpu_count()}, "model_threads": args.threads,
                     "agreement": agreement(runners, images[:16])}
    print(f"agreement: {results['agreement']}", flush=True)
    batches = (1, 4, 8, 16)
    results["model_alone"] = model_alone(runners, images, batches, args.rounds, args.seconds)
    print(f"model alone, frames/s: {results['model_alone']}", flush=True)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        results["model_alone_one_core_busy"] = model_alone(runners, images, batches, args.rounds, args.seconds)
    finally:
        busy.kill()
    print(f"model alone, one core busy, frames/s: {results['model_alone_one_core_busy']}", flush=True)
    del runners
    redis_server = EmbeddedRedis().start()
    try:
        start_ray()
        runs: dict = {name: [] for name in BACKENDS}
        for _ in range(2):
            for name in BACKENDS:
                r = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url, 8.0,
                                    args.pipeline_seconds, model={"backend": name})
                runs[name].append(r)
                print(f"hydravision, 8 file cameras, {name}: {r['fps']} frames/s, p50 {r['latency_ms_p50']} ms, "
                      f"model CPU {r['cpu_ms_per_frame_model']} ms/frame", flush=True)
        ray.shutdown()
    finally:
        redis_server.stop()
    results["pipeline_8_files"] = {name: {"fps": [r["fps"] for r in rs],
                                          "cpu_ms_per_frame_model": [r["cpu_ms_per_frame_model"] for r in rs],
                                          "cpu_ms_per_frame_total": [r["cpu_ms_per_frame_total"] for r in rs],
                                          "latency_ms_p50": [r["latency_ms_p50"] for r in rs]}
                                   for name, rs in runs.items()}
    save_json(args.json, results)


if __name__ == "__main__":
    main()
