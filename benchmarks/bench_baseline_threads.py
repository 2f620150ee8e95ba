"""The threaded design with its model on 2 threads (its frameworks' default on 2 cores) and on 1, and hydravision,
8 unpaced file cameras, in alternating rounds (benchmarks/README.md, "The threaded design's model threads").

    .venv/bin/python benchmarks/bench_baseline_threads.py --rounds 3 --json out.json    # ~5 min, 20 s windows
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

from bench_pipeline import bench_threaded, file_cameras, run_hydravision
from measure import DEMO, make_clips, save_json, with_ray

from pipeline.embedded_redis import EmbeddedRedis

KEPT = ("fps", "cpu_ms_per_frame_total", "latency_ms_p50", "model_thread_busy", "cores_used", "machine_busy_cores")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    server = EmbeddedRedis().start()
    rounds: list[dict] = []
    try:
        for k in range(args.rounds):
            row = {}
            # the order turns every round: a machine whose speed drifts favours no one
            order = [("t2", 2), ("t1", 1), ("hv", None)] if k % 2 == 0 else [("hv", None), ("t1", 1), ("t2", 2)]
            for name, threads in order:
                if threads is None:
                    r = with_ray({}, lambda: run_hydravision(DEMO, file_cameras(clips, 8), server.url, 6.0,
                                                             args.seconds))
                else:
                    r = bench_threaded(DEMO, clips, 8, server.url, args.seconds, model_threads=threads)
                row[name] = {key: r.get(key) for key in KEPT}
                print(f"round {k + 1} {name}: {row[name]}", flush=True)
            rounds.append(row)
            print(f"round {k + 1}: hydravision / threaded on 2 threads {row['hv']['fps'] / row['t2']['fps']:.3f}, "
                  f"/ on 1 thread {row['hv']['fps'] / row['t1']['fps']:.3f}", flush=True)
    finally:
        server.stop()
    medians = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("fps", "cpu_ms_per_frame_total")}
               for name in ("t2", "t1", "hv")}
    print(f"medians: {medians}")
    save_json(args.json, {"rounds": rounds, "medians": medians})


if __name__ == "__main__":
    main()
