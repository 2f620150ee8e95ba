"""Batches that follow the load (issue 18, item 2): fixed batch limits against the adaptive one, in ONE run.

    python benchmarks/bench_batches.py --json results-batches-2core.json    # ~8 min on 2 cores

Settings (``inference`` config): ``fixed8`` (max_batch 8, adapt_batch off: the old default), ``fixed32``
(max_batch 32, adapt_batch off: every batch takes all that waits, up to 32) and ``adaptive`` (max_batch 32,
adapt_batch on: the default now, workers/batch_size.py). Loads:
- heavy: 16 file cameras unpaced, two frames in flight each (up to 32 waiting): frames/s, latency, the mean
  batch and the limit the replica settled on, with its measured milliseconds per frame by batch size;
- light: the demo's three synthetic cameras at 10 fps: latency (batches stay small; the limit must not move).
The settings alternate within each round (``--rounds``), so the machine's drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from bench_pipeline import file_cameras, run_hydravision
from measure import DEMO, make_clips, save_json, start_ray
from pipeline.embedded_redis import EmbeddedRedis

SETTINGS = {"fixed8": {"max_batch": 8, "adapt_batch": False},
            "fixed32": {"max_batch": 32, "adapt_batch": False},
            "adaptive": {"max_batch": 32, "adapt_batch": True}}


def light_cameras() -> list[dict]:
    return [{"id": f"street-{i}", "url": f"synthetic://street?seed={i}&fps=10"} for i in range(1, 4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--heavy-cameras", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loads", default="heavy,light")
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window per run")
    p.add_argument("--warmup", type=float, default=10.0, help="before the window: start-up and the limit's search")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    names = args.settings.split(",")
    results: dict = {"machine": {"cpus": os.cpu_count()}, "settings": {n: SETTINGS[n] for n in names}, "runs": []}
    keep = ("fps", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "mean_batch", "batch_limit",
            "ms_per_frame_by_batch", "drop_rate", "cpu_ms_per_frame_total")
    redis_server = EmbeddedRedis().start()
    start_ray()
    try:
        for r in range(args.rounds):
            loads = {"heavy": file_cameras(clips, args.heavy_cameras), "light": light_cameras()}
            for load, cameras in ((name, loads[name]) for name in args.loads.split(",")):
                for name in names:
                    print(f"round {r + 1}: {load} load, {name} ...", flush=True)
                    out = run_hydravision(args.checkpoint, cameras, redis_server.url, args.warmup, args.seconds,
                                          max_wait_ms=10, **SETTINGS[name])
                    row = {"round": r + 1, "load": load, "setting": name, **{k: out.get(k) for k in keep}}
                    results["runs"].append(row)
                    print(f"  {row['fps']:.1f} frames/s, latency p50/p95/p99 {row['latency_ms_p50']}/"
                          f"{row['latency_ms_p95']}/{row['latency_ms_p99']} ms, mean batch {row['mean_batch']}, "
                          f"limit {row['batch_limit']}, ms/frame by batch {row['ms_per_frame_by_batch']}", flush=True)
                    save_json(args.json, results)
    finally:
        redis_server.stop()
    print("\nload   setting      fps     p50     p95     p99  batch limit")
    for row in results["runs"]:
        print(f"{row['load']:6} {row['setting']:9} {row['fps']:6.1f} {row['latency_ms_p50']:7} "
              f"{row['latency_ms_p95']:7} {row['latency_ms_p99']:7} {row['mean_batch']:6} {row['batch_limit']}")


if __name__ == "__main__":
    main()
