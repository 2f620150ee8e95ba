"""How long `hydravision run` takes to deliver: to each camera's first message, and to its steady rate.

    .venv/bin/python benchmarks/bench_start.py                      # configs/demo.yaml, 3 runs (~2 min)
    .venv/bin/python benchmarks/bench_start.py --config my.yaml --runs 5 --json start.json
    .venv/bin/python benchmarks/bench_start.py --against /tmp/old-checkout     # A/B, runs alternate
    .venv/bin/python benchmarks/bench_start.py --files 8 --seconds 75 --window 25 --against /tmp/old-checkout

Each run launches the real command (`hydravision run CONFIG --redis-url ...`, a fresh process, as a user
would) against a redis-server of its own, and watches Redis from outside: the time from launch to the first
message of every camera, and to the moment every camera's rate over the last 3 s reaches 90% of what it
asks for (its `fps`, else its stream's rate: taken from the config, so only cameras with `fps` or synthetic
scenes with `fps=` in the URL are judged). The command's own output lines are timed too, to show where the
time goes (Ray, the model, the cameras). Times are from launch, in seconds.

With ``--window W`` each run also reports the frames per second all cameras published over its last W
seconds (entries in their detection streams, by the stream ids' timestamps): with ``--files N`` (N unpaced,
looping file cameras on the pipeline benchmark's clips, a config written for the run) and ``--against``, that
is one commit's throughput against another's, each run as a user runs it, alternating, in the same session.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil
import redis
import yaml

from bench_pipeline import file_cameras
from measure import ROOT, make_clips, save_json, usage
from pipeline.embedded_redis import EmbeddedRedis
from workers.publish import keys

WINDOW_S, STEADY = 3.0, 0.9


def wanted_fps(camera: dict) -> float | None:
    if camera.get("fps"):
        return float(camera["fps"])
    q = parse_qs(urlsplit(camera["url"]).query)
    return float(q["fps"][0]) if "fps" in q else None


def files_config(folder: Path, n: int, checkpoint: Path | None = None) -> Path:
    """A config of ``n`` unpaced, looping file cameras (the clips bench_pipeline.py uses), the rest defaults
    (each checkout's own demo model unless ``checkpoint``)."""
    cameras = file_cameras(make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips"), n)
    path = folder / f"files{n}.yaml"
    model = {"model": {"checkpoint": str(checkpoint.resolve())}} if checkpoint else {}
    path.write_text(yaml.safe_dump({"cameras": cameras, **model}))
    return path


def published_fps(client: redis.Redis, prefix: str, cameras: list[dict], t0: float, t1: float) -> dict[str, float]:
    """Messages each camera published between t0 and t1 (stream ids are Redis's clock, in ms), per second."""
    lo, hi = f"{int(t0 * 1000)}-0", f"{int(t1 * 1000)}-0"
    return {c["id"]: len(client.xrange(keys(prefix).detections(c["id"]), min=lo, max=hi)) / (t1 - t0) for c in cameras}


def one_run(repo: Path, config: Path, cameras: list[dict], prefix: str, url: str, seconds: float,
            window: float = 0.0) -> dict:
    client = redis.Redis.from_url(url)
    client.flushall()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--redis-url", url],
                            cwd=repo, env={**env, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: [lines.append((round(time.time() - t0, 2), ln.rstrip())) for ln in proc.stdout],
                     daemon=True).start()
    first: dict[str, float] = {}
    steady: dict[str, float] = {}
    cpu_from = None  # CPU seconds of the command's processes when the window began
    try:
        while time.time() - t0 < seconds and proc.poll() is None:
            now = time.time()
            if window and cpu_from is None and now - t0 >= seconds - window:
                cpu_from = tree_cpu_s(proc.pid)
            for cam in cameras:
                cid, fps = cam["id"], wanted_fps(cam)
                stream = keys(prefix).detections(cid)
                if cid not in first and client.xlen(stream):
                    stored = int(client.xrange(stream, count=1)[0][0].split(b"-")[0]) / 1000
                    first[cid] = round(stored - t0, 2)
                if cid in first and cid not in steady and fps:
                    recent = client.xrange(stream, min=f"{int((now - WINDOW_S) * 1000)}-0")
                    if now - t0 - first[cid] >= WINDOW_S and len(recent) >= STEADY * fps * WINDOW_S:
                        steady[cid] = round(now - t0, 2)
            time.sleep(0.05)
        end = time.time()
        fps = published_fps(client, prefix, cameras, end - window, end) if window and proc.poll() is None else None
        cpu_s = tree_cpu_s(proc.pid) - cpu_from if fps is not None and cpu_from is not None else None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    judged = [c["id"] for c in cameras if wanted_fps(c)]
    return {"first_message_s": first, "all_first_s": max(first.values()) if len(first) == len(cameras) else None,
            "steady_s": steady, "all_steady_s": max(steady.values()) if judged and len(steady) == len(judged) else None,
            "fps_last_window": round(sum(fps.values()), 1) if fps is not None else None,
            # the slowest camera's rate over the fastest's in that window (1: every camera got the same share)
            "fairness_last_window": round(min(fps.values()) / max(max(fps.values()), 1e-9), 2) if fps else None,
            # every process of the command (controller, Ray, actors; not Redis) per frame published in that window
            "cpu_ms_per_frame_last_window": round(cpu_s * 1000 / max(1.0, sum(fps.values()) * window), 2)
            if fps and cpu_s is not None else None,
            "output": [ln for ln in lines if ln[1] and not ln[1].startswith(" ")][:40], "exit_code": proc.returncode}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants alive now."""
    try:
        root = psutil.Process(pid)
        return sum(usage([root, *root.children(recursive=True)]).cpu.values())  # skips processes gone meanwhile
    except psutil.Error:
        return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=40.0, help="watch each run this long")
    p.add_argument("--against", type=Path, help="another checkout (e.g. an older commit): its runs alternate with "
                   "this one's, same config, same Redis")
    p.add_argument("--window", type=float, default=0.0, help="also report frames/s over each run's last WINDOW s")
    p.add_argument("--files", type=int, help="instead of --config: this many unpaced looping file cameras")
    p.add_argument("--checkpoint", type=Path, help="with --files: this model for every checkout")
    p.add_argument("--json")
    args = p.parse_args()
    if args.window >= args.seconds:
        p.error("--window must be shorter than --seconds")
    if args.checkpoint and not args.files:
        p.error("--checkpoint goes with --files (a config names its own model)")
    if args.files:
        args.config = files_config(Path(tempfile.mkdtemp(prefix="bench-start-")), args.files, args.checkpoint)
    raw = yaml.safe_load(args.config.read_text())
    cameras, prefix = raw["cameras"], (raw.get("redis") or {}).get("prefix", "hv")
    server = EmbeddedRedis().start()
    repos = {"this": ROOT, **({"against": args.against.resolve()} if args.against else {})}
    runs: dict[str, list[dict]] = {name: [] for name in repos}
    try:
        for i in range(args.runs):
            for name, repo in repos.items():
                r = one_run(repo, args.config, cameras, prefix, server.url, args.seconds, args.window)
                runs[name].append(r)
                print(f"{name} ({repo}) run {i + 1}: first message of every camera {r['all_first_s']} s "
                      f"{r['first_message_s']}; every camera steady {r['all_steady_s']} s {r['steady_s']}"
                      + (f"; {r['fps_last_window']} frames/s over the last {args.window:g} s, fairness "
                         f"{r['fairness_last_window']}, {r['cpu_ms_per_frame_last_window']} ms CPU per frame"
                         if args.window else ""), flush=True)
                for t, line in r["output"]:
                    print(f"  {t:>6.2f}  {line[:150]}")
    finally:
        server.stop()
    for name, rs in runs.items():
        firsts = [r["all_first_s"] for r in rs if r["all_first_s"] is not None]
        steadies = [r["all_steady_s"] for r in rs if r["all_steady_s"] is not None]
        print(f"{name}: first message of every camera {firsts} s; steady {steadies} s"
              + (f"; frames/s over the last {args.window:g} s {[r['fps_last_window'] for r in rs]}, fairness "
                 f"{[r['fairness_last_window'] for r in rs]}, CPU ms per frame "
                 f"{[r['cpu_ms_per_frame_last_window'] for r in rs]}" if args.window else ""))
    save_json(args.json, {"config": str(args.config), "config_text": args.config.read_text(), "cpus": os.cpu_count(),
                          "repos": {k: str(v) for k, v in repos.items()}, "runs": runs})


if __name__ == "__main__":
    main()
