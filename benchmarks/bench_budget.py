"""The per-camera frame-age budget, acted on: N RTSP cameras at 25 fps, ``max_frame_age_ms`` on and off.

    python benchmarks/bench_budget.py                        # 4 cameras, 300 ms, 60 s per run (~3 min)
    python benchmarks/bench_budget.py --seconds 90 --json budget.json

Each run starts the whole service (Ray, one StreamActor per camera, the demo model) against a GStreamer RTSP
server that serves the synthetic street clips at their real 25 fps. A frame's age is measured twice, from
the messages in Redis: at publish (``latency_ms``, the age the budget watches) and at XADD (the stream entry
id is Redis' own clock when it stored the message; same host, same clock as the capture time ``ts``).

Three runs: budget off; budget on; and the floor, every camera analysing 2.5 frames/s (the budget's lowest
rate) from the start: the youngest frames this machine delivers right now, which no policy can beat (on a
machine shared with other programs it moves with their load, which is printed too).

Printed: per run and time window, the analysed frames/s (all cameras), the p50/p95/p99 age at XADD, the share
of frames over the budget, and the per-camera p95 and analysed fps (fairness); then the budget events.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import redis

from measure import DEMO, make_clips, pct, save_json, start_ray
from pipeline.app import App
from pipeline.config import parse_config
from pipeline.embedded_redis import EmbeddedRedis
from pipeline.testbed import RtspServer
from workers.publish import keys

SETTLE_S = 20.0  # the budget's first actions come within seconds; give its probes time to back off


def run_service(checkpoint: Path, server: RtspServer, n: int, redis_url: str, seconds: float,
                budget_ms: float | None, fps: float | None = None) -> dict:
    cameras = [{"id": f"cam{i}", "url": server.url_for(f"/cam{i}"), "read_timeout_s": 5, "fps": fps,
                "max_frame_age_ms": budget_ms} for i in range(n)]
    config = parse_config({"redis": {"url": redis_url}, "model": {"checkpoint": str(checkpoint)},
                           "inference": {"max_batch": 8, "max_wait_ms": 10}, "cameras": cameras})
    app = App(config, say=lambda m: None)
    app.start()
    client = redis.Redis.from_url(redis_url)
    deadline = time.time() + 60
    while not all(client.xlen(keys("hv").detections(c["id"])) for c in cameras):  # every camera delivering
        assert time.time() < deadline, "cameras did not start delivering within 60 s"
        time.sleep(0.2)
    t0, load0 = time.time(), os.getloadavg()[0]
    targets: list[tuple[float, dict]] = []
    app.run(duration=seconds, on_tick=lambda stats: targets.append(
        (time.time() - t0, {s["camera"]: s.get("target_fps") for s in stats})))
    t1, load1 = time.time(), os.getloadavg()[0]
    finals = app.shutdown()
    frames: dict[str, list[tuple[float, float, float]]] = {}  # camera -> (t since t0, age at publish, at XADD)
    for c in cameras:
        rows = []
        for entry_id, fields in client.xrange(keys("hv").detections(c["id"]), min=f"{int(t0 * 1000)}-0",
                                              max=f"{int(t1 * 1000)}-0"):
            m = json.loads(fields[b"data"])
            stored = int(entry_id.split(b"-")[0]) / 1000
            rows.append((m["ts"] - t0, m["latency_ms"] / 1000, max(0.0, stored - m["ts"])))
        frames[c["id"]] = rows
    events = [json.loads(f[b"data"]) for _, f in client.xrange(keys("hv").events)]
    events = [{**e, "t": round(e["ts"] - t0, 1)} for e in events if e["type"].startswith("budget_")]
    client.flushall()
    label = f"budget {budget_ms:.0f} ms" if budget_ms else f"off, {fps:g} fps" if fps else "budget off"
    return {"label": label, "budget_ms": budget_ms, "seconds": round(t1 - t0, 1), "frames": frames, "events": events,
            "load_average": [round(load0, 1), round(load1, 1)],
            "targets": targets, "dropped": {f["camera"]: f.get("dropped") for f in finals}}


def window(run: dict, start: float, end: float, budget_ms: float) -> dict:
    per_cam = {c: [r for r in rows if start <= r[0] < end] for c, rows in run["frames"].items()}
    ages = [r[2] * 1000 for rows in per_cam.values() for r in rows]
    fps = {c: len(rows) / (end - start) for c, rows in per_cam.items()}
    return {"window": f"{start:.0f}-{end:.0f} s", "fps": round(sum(fps.values()), 1),
            "p50": pct(ages, 50), "p95": pct(ages, 95), "p99": pct(ages, 99),
            "over_budget": round(float(np.mean([a > budget_ms for a in ages])), 3) if ages else None,
            "p95_by_camera": {c: pct([r[2] * 1000 for r in rows], 95) for c, rows in per_cam.items()},
            "fps_by_camera": {c: round(v, 1) for c, v in fps.items()},
            "fairness": round(min(fps.values()) / max(max(fps.values()), 1e-9), 2)}


def report(runs: list[dict], budget_ms: float, seconds: float) -> list[dict]:
    rows = []
    for run in runs:
        spans = ((0, 10), (10, SETTLE_S), (SETTLE_S, run["seconds"])) if run["seconds"] > SETTLE_S else \
            ((0, run["seconds"]),)
        for start, end in spans:
            rows.append({"run": run["label"], **window(run, start, end, budget_ms)})
    print(f"\nframe age at XADD (capture to Redis), ms; over = share of frames older than {budget_ms:.0f} ms")
    print(f"{'run':<17}{'window':>10}{'fps':>7}{'p50':>7}{'p95':>7}{'p99':>7}{'over':>7}{'fair':>6}  "
          f"p95 by camera / analysed fps by camera")
    for r in rows:
        print(f"{r['run']:<17}{r['window']:>10}{r['fps']:>7}{r['p50']:>7}{r['p95']:>7}{r['p99']:>7}"
              f"{r['over_budget']:>7}{r['fairness']:>6}  {list(r['p95_by_camera'].values())} / "
              f"{list(r['fps_by_camera'].values())}")
    for run in runs:
        print(f"\n{run['label']}: 1-min load average at start / end {run['load_average']} (other programs on the "
              f"machine count too); dropped by reason at the end:")
        for camera, dropped in run["dropped"].items():
            print(f"  {camera}: {dropped}")
        if run["events"]:
            print("events, t in s from the start of the window:")
            for e in run["events"]:
                print(f"  {e['t']:>6}  {e['camera']:<6}{e['type']:<18}{e['action']:<12}fps {e['fps']:<7} "
                      f"p95 {e['p95_ms']} ms")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--budget-ms", type=float, default=300.0)
    p.add_argument("--seconds", type=float, default=60.0, help="measurement window per run")
    p.add_argument("--runs", default="off,budget,floor", help="which of the three runs (comma-separated)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    redis_server = EmbeddedRedis().start()
    runs = []
    try:
        start_ray()
        mounts = {f"/cam{i}": clips[i % len(clips)] for i in range(1, args.cameras)}
        # Budget off, budget on, and the floor: every camera at the budget's lowest rate from the start, which
        # is the youngest the frames can be on this machine now (no policy can do better).
        plan = {"off": (None, None, args.seconds), "budget": (args.budget_ms, None, args.seconds),
                "floor": (None, 2.5, min(args.seconds, 30.0))}
        for budget, fps, seconds in (plan[r] for r in args.runs.split(",")):
            print(f"{args.cameras} RTSP cameras at 25 fps, budget {budget or 'off'}, analysing "
                  f"{fps or 'every'} frame(s)/s, {seconds:.0f} s ...", flush=True)
            with RtspServer(clips[0], mount="/cam0", loop=True, extra_mounts=mounts) as server:
                runs.append(run_service(args.checkpoint, server, args.cameras, redis_server.url, seconds, budget,
                                        fps))
        ray.shutdown()
    finally:
        redis_server.stop()
    rows = report(runs, args.budget_ms, args.seconds)
    save_json(args.json, {"machine": {"cpus": os.cpu_count()}, "rows": rows,
                          "runs": {r["label"]: {k: r[k] for k in ("events", "targets", "dropped", "load_average")}
                                   for r in runs}})


if __name__ == "__main__":
    main()
