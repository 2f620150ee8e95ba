"""Calls shared by a process's cameras (``inference.merge_window_ms``, workers/inference.py:CallMerger) against
a call per camera (0), alternating in one session: frames/s, CPU per frame of every process, frames per call.

    .venv/bin/python benchmarks/bench_merge.py                       # 8 unpaced file cameras, 4 rounds (~6 min)
    .venv/bin/python benchmarks/bench_merge.py --windows 1,0 --rounds 6 --json out.json
    .venv/bin/python benchmarks/bench_merge.py --cli            # the real command instead (~9 min)

Each round runs every setting once (``run_hydravision`` of bench_pipeline.py: the service in this process,
warm-up, then a window), so slow and fast moments of a shared machine fall on both settings alike. CPU per
frame is the steadier figure: on a CPU-bound machine frames/s follow it, but with more noise. With ``--cli``
each run is `hydravision run` on a config of its own, watched from outside as bench_start.py does (60 s, the
last 25 s measured; CPU of every process of the command): what a user runs, controller loop included.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

import ray
import yaml

from bench_pipeline import file_cameras, run_hydravision
from bench_start import files_config, one_run
from measure import DEMO, ROOT, make_clips, save_json, start_ray
from pipeline.embedded_redis import EmbeddedRedis

KEYS = ("fps", "cpu_ms_per_frame_total", "frames_per_call", "mean_batch", "fairness", "latency_ms_p50")
CLI_KEYS = ("fps", "cpu_ms_per_frame_total", "fairness", "first_message_s")


def cli_run(config: Path, cameras: list[dict], url: str) -> dict:
    r = one_run(ROOT, config, cameras, "hv", url, seconds=60, window=25)
    return {"fps": r["fps_last_window"], "cpu_ms_per_frame_total": r["cpu_ms_per_frame_last_window"],
            "fairness": r["fairness_last_window"], "first_message_s": r["all_first_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--windows", default="1,0", help="merge_window_ms settings to alternate (0: a call per camera)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=6.0)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--cli", action="store_true", help="run the real command (hydravision run) instead")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    windows = [float(w) for w in args.windows.split(",")]
    cameras = file_cameras(make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips"), args.cameras)
    runs: dict[float, list[dict]] = {w: [] for w in windows}
    keys = CLI_KEYS if args.cli else KEYS
    configs = {}
    if args.cli:  # a config per setting: the cameras as bench_start.py --files writes them, the window set
        folder = Path(tempfile.mkdtemp(prefix="bench-merge-"))
        raw = yaml.safe_load(files_config(folder, args.cameras, args.checkpoint).read_text())
        for w in windows:
            configs[w] = folder / f"merge-{w:g}.yaml"
            configs[w].write_text(yaml.safe_dump({**raw, "inference": {"merge_window_ms": w}}))
    server = EmbeddedRedis().start()
    if not args.cli:
        start_ray()
    try:
        for i in range(args.rounds):
            for w in windows:
                if args.cli:
                    r = cli_run(configs[w], cameras, server.url)
                else:  # the service's inference defaults, as the real command has them
                    r = run_hydravision(args.checkpoint, cameras, server.url, args.warmup, args.seconds,
                                        max_batch=32, max_wait_ms=5, adapt_batch=True, merge_window_ms=w)
                runs[w].append({k: r[k] for k in keys})
                print(f"round {i + 1}, merge_window_ms {w:g}: " + ", ".join(f"{k} {r[k]}" for k in keys), flush=True)
    finally:
        if not args.cli:
            ray.shutdown()
        server.stop()
    summary = {w: {k: statistics.median(r[k] for r in rs if r[k] is not None) for k in keys} for w, rs in runs.items()}
    for w, s in summary.items():
        print(f"median, merge_window_ms {w:g}: " + ", ".join(f"{k} {v:g}" for k, v in s.items()))
    if len(windows) == 2:
        a, b = (summary[w] for w in windows)
        print(f"{windows[0]:g} / {windows[1]:g}: {a['fps'] / b['fps']:.2f}x frames/s, CPU per frame "
              f"{a['cpu_ms_per_frame_total'] / b['cpu_ms_per_frame_total']:.2f}x")
    save_json(args.json, {"machine": {"cpus": os.cpu_count()}, "cameras": args.cameras, "cli": args.cli,
                          "seconds": 60 if args.cli else args.seconds,
                          "runs": {str(w): rs for w, rs in runs.items()},
                          "median": {str(w): s for w, s in summary.items()}})


if __name__ == "__main__":
    main()
