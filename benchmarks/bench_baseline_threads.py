"""The threaded design with its model on 2 threads (its frameworks' default on 2 cores) and on 1, and hydravision,
8 unpaced file cameras, in alternating rounds (benchmarks/README.md, "The threaded design's model threads").

    .venv/bin/python benchmarks/bench_baseline_threads.py --rounds 3 --json out.json    # ~5 min, 20 s windows
    .venv/bin/python benchmarks/bench_baseline_threads.py --model-threads 1 --rounds 6  # one thread only, ~6 min

Each round also prints the CPU per frame of each stage in both designs (the threaded design's model, decoder
and sink threads against hydravision's hv-model, hv-cap, hv-loop + hv-publisher threads, and the rest).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

from bench_pipeline import bench_threaded, file_cameras, run_hydravision, stage_split
from measure import DEMO, make_clips, save_json, with_ray

from pipeline.embedded_redis import EmbeddedRedis

KEPT = ("fps", "cpu_ms_per_frame_total", "latency_ms_p50", "model_thread_busy", "cores_used", "machine_busy_cores",
        "cpu_ms_per_frame_by_thread")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--model-threads", default="2,1", help="the threaded design's model threads, one run each a round")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    counts = [int(n) for n in args.model_threads.split(",")]
    names = [f"t{n}" for n in counts]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    server = EmbeddedRedis().start()
    rounds: list[dict] = []
    try:
        for k in range(args.rounds):
            row = {}
            # the order turns every round: a machine whose speed drifts favours no one
            order = [*zip(names, counts), ("hv", None)]
            order = order if k % 2 == 0 else order[::-1]
            for name, threads in order:
                if threads is None:
                    r = with_ray({}, lambda: run_hydravision(DEMO, file_cameras(clips, 8), server.url, 6.0,
                                                             args.seconds))
                else:
                    r = bench_threaded(DEMO, clips, 8, server.url, args.seconds, model_threads=threads)
                row[name] = {key: r.get(key) for key in KEPT}
                print(f"round {k + 1} {name}: {row[name]}", flush=True)
            rounds.append(row)
            ratios = ", ".join(f"/ on {n} thread(s) {row['hv']['fps'] / row[name]['fps']:.3f}"
                               for name, n in zip(names, counts))
            print(f"round {k + 1}: hydravision {ratios}", flush=True)
            for name, n in zip(names, counts):
                split = stage_split(row[name], row["hv"])
                print(f"  CPU ms per frame, threaded on {n} thread(s) vs hydravision: {split}")
    finally:
        server.stop()
    medians = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("fps", "cpu_ms_per_frame_total")}
               for name in (*names, "hv")}
    print(f"medians: {medians}")
    save_json(args.json, {"rounds": rounds, "medians": medians})


if __name__ == "__main__":
    main()
