"""Which runtime should run the model on a CPU: torch eager, ONNX Runtime or OpenVINO (bf16 where the CPU runs
it natively, fp32, and int8: models/quantize.py), alone, beside a busy core, and in the pipeline.

    .venv/bin/python benchmarks/bench_backends.py --json benchmarks/results-backends-2core.json   # ~9 min

1. the outputs of each against torch eager fp32 on the same frames: detections matched one to one (same class,
   best IoU), the largest box and score differences and the detections left unmatched; and each one's mAP on
   held-out synthetic scenes (models/evaluate.py): the tolerance check;
2. the model alone (backbone, neck, both heads, decoding and NMS: ModelRunner.run) at batch 1, 4, 8 and 16,
   backends alternating round by round so that a noisy machine shifts all alike; then the same with another
   process keeping one core busy (`python -c "while True: pass"`), the case where torch's threads collapsed;
3. hydravision with 8 unpaced file cameras on ONNX Runtime and OpenVINO (bf16, int8), alternating, twice.
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
import torch

from bench_pipeline import decoded_inputs, file_cameras, run_hydravision
from measure import DEMO, make_clips, save_json, start_ray
from pipeline.embedded_redis import EmbeddedRedis
from models.evaluate import greedy_pairs
from models.postprocess import box_iou
from workers.model_runner import ModelRunner, native_bf16

# label: ModelRunner's backend and precision. "openvino" is what auto picks where the CPU runs bf16 natively.
VARIANTS = {"torch": {"backend": "torch"}, "onnxruntime": {"backend": "onnxruntime"},
            "openvino": {"backend": "openvino", "precision": "bf16"},
            "openvino-fp32": {"backend": "openvino", "precision": "fp32"},
            "openvino-int8": {"backend": "openvino", "precision": "int8"}}
IN_PIPELINE = ("onnxruntime", "openvino", "openvino-int8")


def model_alone(runners: dict, images: list[np.ndarray], batches: tuple[int, ...], rounds: int, seconds: float) -> dict:
    rates: dict = {b: {k: [] for k in runners} for b in batches}
    for _ in range(rounds):
        for b in batches:
            batch = [images[i % len(images)] for i in range(b)]
            for name, runner in runners.items():
                runner.warm(batch, [None] * b)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    runner.run(batch, [None] * b)
                    n += b
                rates[b][name].append(n / (time.perf_counter() - t0))
    return {b: {name: round(float(np.median(v)), 1) for name, v in per.items()} for b, per in rates.items()}


def agreement(runners: dict, images: list[np.ndarray]) -> dict:
    """Each variant's detections against torch's, matched one to one per image and head (same class, greedy by
    IoU >= 0.5): the largest box and score differences of matched pairs, and how many were left unmatched."""
    out = {name: runner.run(images, [None] * len(images)) for name, runner in runners.items()}
    report = {}
    for name in (n for n in runners if n != "torch"):
        worst = {"box_px": 0.0, "score": 0.0, "matched": 0, "unmatched_torch": 0, "unmatched_here": 0}
        for a, b in zip(out["torch"], out[name]):
            for head in a:
                x, y = a[head], b[head]
                iou = box_iou(torch.from_numpy(x["boxes"]), torch.from_numpy(y["boxes"])).numpy()
                iou[x["class_ids"][:, None] != y["class_ids"][None, :]] = 0
                pairs = greedy_pairs(iou, 0.5)
                for i, j in pairs:
                    worst["box_px"] = max(worst["box_px"], float(np.abs(x["boxes"][i] - y["boxes"][j]).max()))
                    worst["score"] = max(worst["score"], float(abs(x["scores"][i] - y["scores"][j])))
                worst["matched"] += len(pairs)
                worst["unmatched_torch"] += len(x["boxes"]) - len(pairs)
                worst["unmatched_here"] += len(y["boxes"]) - len(pairs)
        report[name] = {k: round(v, 5) if isinstance(v, float) else v for k, v in worst.items()}
    return report


def scores(runners: dict) -> dict:
    """mAP@0.5 and mAP@0.5:0.95 per head and attribute accuracy, each variant on the same held-out scenes."""
    out = {}
    for name, runner in runners.items():
        report = runner.evaluate()
        out[name] = {"heads": {h: [r["map50"], r["map50_95"]] for h, r in report["heads"].items()},
                     "attributes": {a: r["accuracy"] for a, r in report.get("attributes", {}).items()}}
    return out


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
    runners = {name: ModelRunner(args.checkpoint, device="cpu", threads=args.threads, max_batch=16, **how)
               for name, how in VARIANTS.items()}
    images = decoded_inputs(clips, runners["torch"].input_size)
    results: dict = {"machine": {"cpus": os.cpu_count(), "native_bf16": native_bf16()}, "model_threads": args.threads,
                     "precision": {name: r.info()["autocast"] for name, r in runners.items()},
                     "agreement": agreement(runners, images[:16])}
    print(f"agreement with torch fp32: {results['agreement']}", flush=True)
    results["scores"] = scores(runners)
    print(f"held-out scores: {results['scores']}", flush=True)
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
        runs: dict = {name: [] for name in IN_PIPELINE}
        for _ in range(2):
            for name in IN_PIPELINE:
                r = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url, 8.0,
                                    args.pipeline_seconds, model=VARIANTS[name])
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
