"""Throughput, latency and memory of hydravision against the baselines a user would pick, in ONE run.

    python benchmarks/bench_pipeline.py                 # full run, ~10 min on 2 cores; prints a table
    python benchmarks/bench_pipeline.py --json out.json # also write every figure
    python benchmarks/bench_pipeline.py --quick         # shorter windows, fewer configurations

1. ceiling: the model alone (HydraNet + post-processing on pre-decoded frames) at each batch size, and
   decode alone (PyAV + letterbox) in one process;
2. naive: the loop a user writes by hand in one process: for each camera in turn decode a frame, run
   the model at batch 1, track, XADD to Redis; and threaded: the design one-process pipeline libraries use,
   a decoder thread per camera and one model thread batching across them (same model, tracker, messages);
3. hydravision with N file cameras unpaced (throughput), and RTSP cameras at their real rate: at ~80% of
   the sustainable load (latency, drops, fairness) and overloaded at ~150%.
Ratios (efficiency = hydravision / ceiling, speedup = hydravision / naive) are what to compare across
machines; absolute numbers depend on the box and what else runs on it.
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
import torch

from measure import (DEMO, busy_cores, machine_cpu, make_clips, own_thread_cpu, pct, ray_processes, save_json,
                     start_ray, thread_cpu, usage, with_ray)
from pipeline.app import App
from pipeline.config import parse_config
from pipeline.embedded_redis import EmbeddedRedis
from pipeline.testbed import RtspServer
from workers.frames import detection_records, to_detections
from workers.model_runner import ModelRunner
from workers.publish import encode, keys, records_message
from workers.sources import open_source
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker

log = logging.getLogger("bench")


# -- 1. ceilings -------------------------------------------------------------------------------------
def decoded_inputs(clips: list[Path], input_size: tuple[int, int], per_clip: int = 16) -> list[np.ndarray]:
    """Letterboxed frames decoded up front, so the model ceiling measures the model only."""
    out = []
    for clip in clips:
        src = open_source(str(clip), realtime=False)
        src.open()
        for _ in range(per_clip):
            frame = src.read()
            if frame is None:
                break
            out.append(frame.to_model_input(input_size)[0])
        src.close()
    return out


def bench_model(checkpoint: Path, clips: list[Path], seconds: float) -> dict:
    runner = ModelRunner(checkpoint, device="auto", threads=os.cpu_count(), max_batch=32)
    images = decoded_inputs(clips, runner.input_size)
    heads = list(runner.heads)
    fps, latency = {}, {}
    for b in (1, 2, 4, 8, 16):
        batch = [images[i % len(images)] for i in range(b)]
        runner.warm(batch, [None] * b)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            runner.run(batch, [None] * b)
            n += b
        dt = time.perf_counter() - t0
        fps[b], latency[b] = round(n / dt, 1), round(dt / (n / b) * 1000, 1)
    best = max(fps, key=fps.get)
    return {"backend": runner.backend, "fps_by_batch": fps, "batch_latency_ms": latency, "best_batch": best,
            "best_fps": fps[best], "split": split_times(runner, images[:8], heads)}


def split_times(runner: ModelRunner, images: list[np.ndarray], heads: list[str], reps: int = 10) -> dict:
    """Milliseconds of a batch of 8 in torch eager, whatever backend ``runner`` has: backbone+neck, each head
    (forward only), and the whole detect call."""
    model = runner.model
    x = torch.from_numpy(np.stack(images)).to(runner.device).contiguous(memory_format=torch.channels_last)
    out = {}
    with torch.inference_mode():
        xn = model.normalize(x)
        feats = model.features(xn)

        def timed(fn) -> float:
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t0) / reps * 1000

        out["backbone+neck"] = round(timed(lambda: model.features(xn)), 2)
        for h in heads:
            out[f"head {h}"] = round(timed(lambda h=h: model.heads[h](feats)), 2)
        out["detect (all, incl. NMS)"] = round(timed(lambda: model.detect(x)), 2)
    return out


def bench_decode(clips: list[Path], seconds: float, input_size: tuple[int, int]) -> dict:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        src = open_source(str(clips[n % len(clips)]), realtime=False)
        src.open()
        while (f := src.read()) is not None and time.perf_counter() - t0 < seconds:
            f.to_model_input(input_size)
            n += 1
        src.close()
    return {"fps_one_process": round(n / (time.perf_counter() - t0), 1)}


# -- 2. the naive loop ------------------------------------------------------------------------------
def tracked_message(heads: dict[str, list[str]], tracker: CameraTracker, camera: str, frame, lb, arrays: dict) -> dict:
    """The baselines' per-frame work after the model, as a StreamActor does it: each head's detections
    tracked, then the detection message hydravision publishes."""
    records = []
    for head, classes in heads.items():
        det, _ = tracker.update(head, to_detections(arrays[head], lb, classes), frame.index, frame.pts)
        records += detection_records(head, det, det.tracker_id)
    return records_message(camera, frame.index, frame.pts, frame.wall, (time.time() - frame.wall) * 1000,
                           (frame.size[1], frame.size[0]), records, list(heads))


def bench_naive(checkpoint: Path, clips: list[Path], cameras: int, redis_url: str, seconds: float) -> dict:
    """Also each stage's time per frame: here they run one after the other in one thread, so a stage's wall
    time is its cost (decoding may use FFmpeg's threads inside it)."""
    runner = ModelRunner(checkpoint, device="auto", threads=os.cpu_count())
    sources = [open_source(str(clips[i % len(clips)]), realtime=False, loop=True) for i in range(cameras)]
    for s in sources:
        s.open()
    trackers = [CameraTracker(list(runner.heads), TrackerConfig(), 25.0) for _ in sources]
    client = redis.Redis.from_url(redis_url)
    k = keys("naive")
    # batch 1 as in steady state before the window: the first calls cost ~2x, and OpenVINO compiles a model for
    # the size in the background after 16 calls (it fell inside the window, a few % of frames/s)
    runner.warm([sources[0].read().to_model_input(runner.input_size)[0]], [None])
    stages = dict.fromkeys(("decode", "letterbox", "model_batch1", "track", "publish"), 0.0)
    n, latencies, t0 = 0, [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i, src in enumerate(sources):
            t = [time.perf_counter()]
            frame = src.read()
            t.append(time.perf_counter())
            image, lb = frame.to_model_input(runner.input_size)
            t.append(time.perf_counter())
            arrays = runner.run([image], [None])[0]
            t.append(time.perf_counter())
            msg = tracked_message(runner.heads, trackers[i], f"cam{i}", frame, lb, arrays)
            t.append(time.perf_counter())
            client.xadd(k.detections(f"cam{i}"), {"data": encode(msg)}, maxlen=10_000, approximate=True)
            t.append(time.perf_counter())
            for stage, a, b in zip(stages, t, t[1:]):
                stages[stage] += b - a
            latencies.append(msg["latency_ms"])
            n += 1
    for s in sources:
        s.close()
    return {"cameras": cameras, "fps": round(n / (time.perf_counter() - t0), 1), "latency_ms_p50": pct(latencies, 50),
            "stage_ms_per_frame": {k: round(v / max(1, n) * 1000, 2) for k, v in stages.items()}}


# -- 2b. the threaded design of one-process pipeline libraries ---------------------------------------
def bench_threaded(checkpoint: Path, clips: list[Path], cameras: int, redis_url: str, seconds: float,
                   max_batch: int = 8, warmup: float = 3.0, precision: str = "auto",
                   model_threads: int | None = None) -> dict:
    """One process: a decoder thread per camera (decode + letterbox into a queue of 2, blocking: lossless like
    hydravision's unpaced files), one model thread taking batches of up to ``max_batch`` from the cameras in
    turn, one sink thread tracking and writing each batch to Redis in one pipeline. The same model, tracker
    and messages as hydravision; what differs is the transport (threads and queues, one interpreter). Also
    reported: the share of the window the model thread spent in its calls, and the cores the process used."""
    import queue
    import threading

    runner = ModelRunner(checkpoint, device="auto", threads=model_threads or os.cpu_count(), max_batch=max_batch,
                         precision=precision)
    heads = list(runner.heads)
    stop = threading.Event()
    queues = [queue.Queue(maxsize=2) for _ in range(cameras)]
    ready = threading.Semaphore(0)  # one release per frame queued: the model thread sleeps on it, no polling
    results: queue.Queue = queue.Queue(maxsize=4)
    counted = {"frames": 0, "latencies": [], "since": None, "model_busy": 0.0}

    def decode(i: int) -> None:
        src = open_source(str(clips[i % len(clips)]), realtime=False, loop=True)
        src.open()
        while not stop.is_set():
            frame = src.read()
            image, lb = frame.to_model_input(runner.input_size)
            while not stop.is_set():
                try:
                    queues[i].put((frame, image, lb), timeout=0.1)
                    ready.release()
                    break
                except queue.Full:
                    continue
        src.close()

    def model() -> None:
        turn = 0
        while not stop.is_set():
            if not ready.acquire(timeout=0.1):
                continue
            batch = []
            for k in range(cameras):  # cameras in turn from where the last batch stopped
                i = (turn + k) % cameras
                try:
                    item = queues[i].get_nowait()
                except queue.Empty:
                    continue
                if batch:  # the first frame's release was taken by acquire() above
                    ready.acquire()
                batch.append((i, *item))
                if len(batch) == max_batch:
                    break
            turn = (turn + 1) % cameras
            if not batch:
                ready.release()  # a frame counted but not found yet (put raced the scan): look again
                continue
            t0 = time.perf_counter()
            arrays = runner.run([image for _, _, image, _ in batch], [None] * len(batch))
            if counted["since"] is not None:  # how much of the window the model thread spent in its calls
                counted["model_busy"] += time.perf_counter() - max(t0, counted["since"])
            results.put((batch, arrays))

    def sink() -> None:
        client = redis.Redis.from_url(redis_url)
        k = keys("threaded")
        trackers = [CameraTracker(heads, TrackerConfig(), 25.0) for _ in range(cameras)]
        while not stop.is_set():
            try:
                batch, arrays = results.get(timeout=0.1)
            except queue.Empty:
                continue
            pipe = client.pipeline(transaction=False)
            for (i, frame, _, lb), out in zip(batch, arrays):
                msg = tracked_message(runner.heads, trackers[i], f"cam{i}", frame, lb, out)
                pipe.xadd(k.detections(f"cam{i}"), {"data": encode(msg)}, maxlen=10_000, approximate=True)
                if counted["since"] is not None:
                    counted["frames"] += 1
                    counted["latencies"].append(msg["latency_ms"])
            pipe.execute()

    threads = [threading.Thread(target=decode, args=(i,), name=f"decode-{i}", daemon=True) for i in range(cameras)]
    threads += [threading.Thread(target=model, name="model", daemon=True),
                threading.Thread(target=sink, name="sink", daemon=True)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    c0, t0, m0, th0 = time.process_time(), time.perf_counter(), machine_cpu(), own_thread_cpu()
    counted["since"] = t0
    time.sleep(seconds)
    frames, cpu, dt, m1 = counted["frames"], time.process_time() - c0, time.perf_counter() - t0, machine_cpu()
    th1 = own_thread_cpu()
    busy = counted["model_busy"]
    latencies = list(counted["latencies"])
    stop.set()
    for t in threads:
        t.join(5)
    return {"cameras": cameras, "fps": round(frames / dt, 1), "latency_ms_p50": pct(latencies, 50),
            "latency_ms_p95": pct(latencies, 95), "latency_ms_p99": pct(latencies, 99),
            "cpu_ms_per_frame_total": round(cpu / max(1, frames) * 1000, 2),
            "model_thread_busy": round(busy / dt, 3), "cores_used": round(cpu / dt, 2),
            "machine_busy_cores": busy_cores(m0, m1),
            # the model thread; the decoders (decode + letterbox); the sink (tracking, messages, Redis writes);
            # the rest (the main thread, native pools): to set beside hydravision's threads, STAGE_PAIRS
            "cpu_ms_per_frame_by_thread": {k: round((v - th0.get(k, 0.0)) / max(1, frames) * 1000, 3)
                                           for k, v in sorted(th1.items()) if v > th0.get(k, 0.0)}}


# -- 3. hydravision ---------------------------------------------------------------------------------
def run_hydravision(checkpoint: Path, cameras: list[dict], redis_url: str, warmup: float, seconds: float,
                    max_batch: int = 8, max_wait_ms: float = 10, model: dict | None = None, ray_cfg: dict | None = None,
                    **inference) -> dict:
    config = parse_config({"redis": {"url": redis_url}, "model": {"checkpoint": str(checkpoint), **(model or {})},
                           "inference": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, **inference},
                           "ray": ray_cfg or {}, "cameras": cameras})
    app = App(config, say=lambda m: None)
    app.start()
    time.sleep(warmup)
    procs = ray_processes()
    u0, s0, th0 = usage(procs), {s["camera"]: s for s in app.stats()}, thread_cpu(procs)
    holders = list(app.model_holders().values())  # every replica (two on a CPU by default), or camera process
    i0 = ray.get([a.model_stats.remote() for a in holders])
    t0, m0 = time.time(), machine_cpu()
    time.sleep(seconds)
    m1 = machine_cpu()
    u1, s1, th1 = usage(procs), {s["camera"]: s for s in app.stats()}, thread_cpu(procs)
    i1 = ray.get([a.model_stats.remote() for a in holders])
    t1 = time.time()
    app.shutdown()
    dt = t1 - t0
    per_cam = {c: (s1[c]["published"] - s0[c]["published"]) / dt for c in s1}
    def lost(s: dict) -> int:  # frames lost to overload or errors; "rate" skips are the camera's fps setting
        return sum(v for k, v in s["dropped"].items() if k != "rate")

    def wanted(c: str) -> int:  # frames the camera meant to analyse in the window
        return (s1[c]["decoded"] - s0[c]["decoded"]) - (s1[c]["dropped"]["rate"] - s0[c]["dropped"]["rate"])

    dropped = sum(lost(s1[c]) - lost(s0[c]) for c in s1)
    decoded = sum(wanted(c) for c in s1)
    drop_rate_cam = {c: (lost(s1[c]) - lost(s0[c])) / max(1, wanted(c)) for c in s1}
    frames = sum(per_cam.values()) * dt
    client = redis.Redis.from_url(redis_url)
    lat, lat_first, lat_last = [], [], []
    for c in s1:
        for _, f in client.xrange(keys("hv").detections(c), min=f"{int(t0 * 1000)}-0", max=f"{int(t1 * 1000)}-0"):
            m = json.loads(f[b"data"])
            lat.append(m["latency_ms"])
            (lat_first if m["ts"] < t0 + dt / 3 else lat_last if m["ts"] > t1 - dt / 3 else []).append(m["latency_ms"])
    cpu = {r: u1.cpu.get(r, 0) - u0.cpu.get(r, 0) for r in u1.cpu}
    def added(key: str) -> float:
        return sum(b[key] - a[key] for a, b in zip(i0, i1))

    model_cpu, batches = added("cpu_seconds"), added("batches")
    client.flushall()
    return {
        "cameras": len(cameras), "fps": round(sum(per_cam.values()), 1),
        "fps_per_camera_min": round(min(per_cam.values()), 1), "fps_per_camera_max": round(max(per_cam.values()), 1),
        "fairness": round(min(per_cam.values()) / max(max(per_cam.values()), 1e-9), 3),
        "drop_rate": round(dropped / max(1, decoded), 4),
        "drop_rate_per_camera_min_max": [round(min(drop_rate_cam.values()), 3), round(max(drop_rate_cam.values()), 3)],
        "latency_ms_p50": pct(lat, 50), "latency_ms_p95": pct(lat, 95), "latency_ms_p99": pct(lat, 99),
        "latency_ms_p50_first_third": pct(lat_first, 50), "latency_ms_p50_last_third": pct(lat_last, 50),
        "replicas": len(app.inference), "models": len(holders), "backend": app.model_info.get("backend"),
        "precision": app.model_info.get("autocast"), "mean_batch": round(added("frames") / max(1, batches), 2),
        "frames_per_call": round(added("frames") / max(1, added("calls")), 2),
        "batch_limit": i1[0].get("batch_limit"), "ms_per_frame_by_batch": i1[0].get("ms_per_frame"),
        "exact_shapes": [i.get("exact_shapes") for i in i1],
        "cpu_ms_per_frame_total": round(sum(cpu.values()) / max(1, frames) * 1000, 2),
        # the whole machine, not only the service: what is left idle is what the service could still use
        "machine_busy_cores": busy_cores(m0, m1),
        "cpu_ms_per_frame_model": round(model_cpu / max(1, frames) * 1000, 2),
        "cpu_ms_per_frame_outside_model": round((sum(cpu.values()) - model_cpu) / max(1, frames) * 1000, 2),
        "cpu_ms_per_frame_by_role": {r: round(v / max(1, frames) * 1000, 2) for r, v in cpu.items()},
        # the same CPU by thread: each stage measured inside the service (decode + letterbox in hv-cap, the model
        # and its post-processing in hv-model, tracking and messages in hv-loop, Redis writes in hv-publisher)
        "cpu_ms_per_frame_by_thread": {k: round((th1[k] - th0.get(k, 0.0)) / max(1, frames) * 1000, 3)
                                       for k in sorted(th1, key=lambda k: th0.get(k, 0.0) - th1[k])
                                       if th1[k] > th0.get(k, 0.0)},
        "pss_mb": {r: round(v, 1) for r, v in u1.pss_mb.items()}, "rss_mb": {r: round(v, 1) for r, v in u1.rss_mb.items()},
        "pss_mb_total": round(sum(u1.pss_mb.values()), 1), "rss_mb_total": round(sum(u1.rss_mb.values()), 1),
    }


def file_cameras(clips: list[Path], n: int) -> list[dict]:
    return [{"id": f"file{i}", "url": str(clips[i % len(clips)]), "realtime": False, "loop": True} for i in range(n)]


def rtsp_cameras(server: RtspServer, n: int, fps: float | None = None) -> list[dict]:
    return [{"id": f"rtsp{i}", "url": server.url_for(f"/cam{i}"), "read_timeout_s": 5, "fps": fps} for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--cameras", default="1,4,8,16", help="file-camera counts to run")
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window per run")
    p.add_argument("--warmup", type=float, default=6.0)
    p.add_argument("--quick", action="store_true", help="short windows, cameras 1,8")
    p.add_argument("--skip-rtsp", action="store_true")
    p.add_argument("--model-only", action="store_true", help="only the model ceiling and its split (~1 min)")
    p.add_argument("--pairs", type=int, default=3,
                   help="threaded and hydravision with 8 cameras run this many times, alternating: the ratio is "
                        "the medians'. This machine's speed swings by 15%% within minutes")
    p.add_argument("--int8-pairs", type=int, default=3,
                   help="the same pairs with model.precision int8, in the same rounds (0: none)")
    p.add_argument("--threaded-threads", type=int, default=1,
                   help="the threaded design's model threads (its frameworks' default is every core: 2 here). 1 is "
                        "its stronger setting on 2 cores, as fast and ~12%% less CPU per frame (benchmarks/README.md, "
                        "'The threaded design's model threads'); the pairs use it, one more run every core")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.cameras, args.pairs, args.int8_pairs = 8.0, 4.0, "1,8", 1, 0
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    counts = [int(c) for c in args.cameras.split(",")]
    clips = make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips")
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                     "threaded_threads": args.threaded_threads}
    redis_server = EmbeddedRedis().start()
    try:
        print("ceiling: model alone ...", flush=True)
        results["model"] = bench_model(args.checkpoint, clips, seconds=args.seconds / 4)
        if args.model_only:
            print(json.dumps(results["model"], indent=2))
            save_json(args.json, results)
            return
        input_size = tuple(ModelRunner(args.checkpoint, device="cpu").input_size)
        print("ceiling: decode alone ...", flush=True)
        results["decode"] = bench_decode(clips, args.seconds / 4, input_size)
        print("naive loop, 8 cameras ...", flush=True)
        results["naive"] = bench_naive(args.checkpoint, clips, 8, redis_server.url, args.seconds / 2)
        if 8 in counts:  # threaded and hydravision alternating, each hydravision run in a Ray of its own
            # (and the same two with model.precision int8, in the same rounds: --int8-pairs)
            runs = {"auto": [], "int8": []}
            for k in range(max(args.pairs, args.int8_pairs)):
                for precision, n in (("auto", args.pairs), ("int8", args.int8_pairs)):
                    if k >= n:
                        continue
                    print(f"threaded one-process pipeline / hydravision, 8 cameras, precision {precision}, pair "
                          f"{k + 1} of {n} ...", flush=True)
                    threaded = bench_threaded(args.checkpoint, clips, 8, redis_server.url, args.seconds,
                                              precision=precision, model_threads=args.threaded_threads)
                    runs[precision].append((threaded, with_ray({}, lambda: run_hydravision(
                        args.checkpoint, file_cameras(clips, 8), redis_server.url, args.warmup, args.seconds,
                        model={"precision": precision}))))
            for precision, pairs in runs.items():
                if not pairs:
                    continue
                tag = "" if precision == "auto" else f"_{precision}"
                results[f"pairs_8{tag}"] = [{"threaded": t, "hydravision": h, "ratio": round(h["fps"] / t["fps"], 3)}
                                            for t, h in pairs]
                # the median run of each (by frames/s) stands for it in every comparison below
                results[f"threaded{tag}"] = median_run([t for t, _ in pairs])
                if precision == "auto":
                    results["files"] = {8: median_run([h for _, h in pairs])}
                else:
                    results[f"files{tag}"] = median_run([h for _, h in pairs])
        else:
            print("threaded one-process pipeline, 8 cameras ...", flush=True)
            results["threaded"] = bench_threaded(args.checkpoint, clips, 8, redis_server.url, args.seconds,
                                                 model_threads=args.threaded_threads)
            results["files"] = {}
        if 8 in counts and args.threaded_threads != os.cpu_count():  # the frameworks' default, for comparison
            print("threaded one-process pipeline, 8 cameras, the model on every core ...", flush=True)
            results["threaded_all_cores"] = bench_threaded(args.checkpoint, clips, 8, redis_server.url, args.seconds)
        if 8 in counts:  # the same in fp32 (ONNX Runtime), as both ran before OpenVINO bf16 became the CPU default
            print("threaded one-process pipeline, 8 cameras, fp32 ...", flush=True)
            results["threaded_fp32"] = bench_threaded(args.checkpoint, clips, 8, redis_server.url, args.seconds,
                                                      precision="fp32")
        start_ray()
        for n in (n for n in counts if n not in results["files"]):
            print(f"hydravision, {n} file cameras unpaced ...", flush=True)
            results["files"][n] = run_hydravision(args.checkpoint, file_cameras(clips, n), redis_server.url,
                                                  args.warmup, args.seconds)
        if 8 in counts:
            # The default before inference.in_camera_process (unset: true on one machine's CPUs): two replicas.
            # The one-replica, process-per-camera and merged-calls rows below vary this setting.
            print("hydravision, 8 file cameras unpaced, the model in replicas ...", flush=True)
            results["files_replicas"] = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url,
                                                        args.warmup, args.seconds, in_camera_process=False)
            # The default before replicas were counted by device (one replica, every core).
            print("hydravision, 8 file cameras unpaced, one replica ...", flush=True)
            results["files_one_replica"] = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url,
                                                           args.warmup, args.seconds, replicas=1,
                                                           in_camera_process=False)
            # The default before model.backend: auto (ONNX Runtime on a CPU): torch eager, same replicas.
            print("hydravision, 8 file cameras unpaced, torch eager ...", flush=True)
            results["files_torch"] = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url,
                                                     args.warmup, args.seconds, model={"backend": "torch"})
            # The default before OpenVINO bf16 (model.backend auto where the CPU runs bf16): ONNX Runtime, fp32.
            print("hydravision, 8 file cameras unpaced, fp32 ...", flush=True)
            results["files_fp32"] = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url,
                                                    args.warmup, args.seconds, model={"precision": "fp32"})
            # The default before ray.cameras_per_process (unset: the cameras spread over the cores): a process each.
            print("hydravision, 8 file cameras unpaced, a process per camera ...", flush=True)
            results["files_process_each"] = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url,
                                                            args.warmup, args.seconds, ray_cfg={"cameras_per_process": 1},
                                                            in_camera_process=False)
            # inference.merge_window_ms (off by default): a process's cameras share their calls to a replica.
            print("hydravision, 8 file cameras unpaced, calls shared by a process's cameras ...", flush=True)
            results["files_merged"] = run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url,
                                                      args.warmup, args.seconds, merge_window_ms=1,
                                                      in_camera_process=False)
            if results["files"][8].get("backend") == "openvino":
                # Before ExactShapes: OpenVINO's dynamic batch only. A Ray of its own: the camera processes read
                # the setting from their environment.
                print("hydravision, 8 file cameras unpaced, OpenVINO's dynamic batch only ...", flush=True)
                ray.shutdown()
                results["files_dynamic_shape"] = with_ray(
                    {"HYDRAVISION_OPENVINO_EXACT_SHAPES": "0"},
                    lambda: run_hydravision(args.checkpoint, file_cameras(clips, 8), redis_server.url, args.warmup,
                                            args.seconds))
                start_ray()
        if not args.skip_rtsp:
            ref = results["files"].get(8) or results["files"][max(results["files"])]
            sustainable = ref["fps"]
            # 80%: four 25 fps RTSP cameras, each analysed at a fifth of the sustainable rate; overloaded:
            # six cameras analysing every frame (150 frames/s offered).
            for label, n, fps in (("rtsp_80", 4, min(25.0, round(0.8 * sustainable / 4, 1))),
                                  ("rtsp_overload", 6, None)):
                print(f"hydravision, {n} RTSP cameras of 25 fps, analysed at {fps or 25} fps ({label}) ...", flush=True)
                mounts = {f"/cam{i}": clips[i % len(clips)] for i in range(1, n)}
                with RtspServer(clips[0], mount="/cam0", loop=True, extra_mounts=mounts) as server:
                    results[label] = run_hydravision(args.checkpoint, rtsp_cameras(server, n, fps), redis_server.url,
                                                     args.warmup, args.seconds)
                results[label]["offered_fps"] = n * (fps or 25)
        ray.shutdown()
    finally:
        redis_server.stop()
    summarize(results)
    save_json(args.json, results)


def median_run(runs: list[dict]) -> dict:
    """The run with the median frames/s (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["fps"])[len(runs) // 2]


STAGE_THREADS = ("hv-model", "hv-cap", "hv-loop")  # the model; decode + letterbox; tracking and messages


def transport_ms(stages: dict, h: dict) -> float:
    """hydravision's CPU per frame beyond its stages' threads, all from the same window: Ray's threads and
    processes, serialization, the Redis writes (`hv-publisher`), the driver. (The event loop's share of a Ray
    call is in `hv-loop`, so this is a lower bound; ~0.17 ms of `hv-loop` is not tracking, benchmarks/README.md.)
    It was once the total less the naive loop's stage times: wall times of another run at batch 1, which a
    slow naive run made larger than the service's own threads (down to -1.43 ms). That way only where the
    threads were not measured (runs before they were named)."""
    threads = h.get("cpu_ms_per_frame_by_thread") or {}
    if all(t in threads for t in STAGE_THREADS):
        return round(h["cpu_ms_per_frame_total"] - sum(threads[t] for t in STAGE_THREADS), 2)
    own = stages["decode"] + stages["letterbox"] + stages["track"] + stages["publish"] + h["cpu_ms_per_frame_model"]
    return round(h["cpu_ms_per_frame_total"] - own, 2)


def compare_transport(label: str, a: dict, b: dict, stages: dict) -> str:
    """One line: setting ``a`` against ``b`` with 8 cameras, frames/s, frames per call, CPU and transport."""
    rest_a, rest_b = transport_ms(stages, a), transport_ms(stages, b)
    return (f"{label}, 8 cameras: {a['fps'] / b['fps']:.2f}x frames/s, frames per call {a['frames_per_call']} vs "
            f"{b['frames_per_call']}, CPU per frame {a['cpu_ms_per_frame_total']} vs {b['cpu_ms_per_frame_total']} "
            f"ms, transport {rest_a:.2f} ms ({rest_a / a['cpu_ms_per_frame_total']:.0%}) vs {rest_b:.2f} ms "
            f"({rest_b / b['cpu_ms_per_frame_total']:.0%})")


# The same work in the two designs: (what, the threaded design's threads, hydravision's threads); "rest" is
# everything else of each (hydravision's: Ray, the driver, Redis writes' thread is counted with the sink's work).
STAGE_PAIRS = (("model", ("model",), ("hv-model",)), ("decode + letterbox", ("decode",), ("hv-cap",)),
               ("tracking, messages, Redis writes", ("sink",), ("hv-loop", "hv-publisher")))


def stage_split(t: dict, h: dict) -> str:
    """One line: CPU ms per frame of each stage in the threaded design against hydravision, same pair."""
    tt, ht = t.get("cpu_ms_per_frame_by_thread"), h.get("cpu_ms_per_frame_by_thread")
    if not tt or not ht:
        return ""
    parts, t_left, h_left = [], t["cpu_ms_per_frame_total"], h["cpu_ms_per_frame_total"]
    for what, of_t, of_h in STAGE_PAIRS:
        a, b = sum(tt.get(k, 0.0) for k in of_t), sum(ht.get(k, 0.0) for k in of_h)
        t_left, h_left = t_left - a, h_left - b
        parts.append(f"{what} {a:.2f} vs {b:.2f}")
    return "; ".join(parts + [f"the rest {t_left:.2f} vs {h_left:.2f}"])


def print_pairs(pairs: list[dict]) -> None:
    for k, pair in enumerate(pairs):
        t, h = pair["threaded"], pair["hydravision"]
        busy = f", its model thread busy {t['model_thread_busy']:.0%}" if "model_thread_busy" in t else ""
        machine = (f"; the machine busy {t['machine_busy_cores']} / {h['machine_busy_cores']} of {os.cpu_count()} cores"
                   if "machine_busy_cores" in t and "machine_busy_cores" in h else "")
        print(f"  pair {k + 1}: threaded {t['fps']} frames/s at {t['cpu_ms_per_frame_total']} ms CPU per frame{busy}, "
              f"hydravision {h['fps']} at {h['cpu_ms_per_frame_total']}: {pair['ratio']:.2f}x{machine}")
        if split := stage_split(t, h):
            print(f"    CPU ms per frame, threaded vs hydravision: {split}")


def summarize(r: dict) -> None:
    ceiling = r["model"]["best_fps"]
    naive = r["naive"]["fps"]
    print(f"\nmodel ceiling ({r['model'].get('backend', 'torch')}): {ceiling} frames/s at batch {r['model']['best_batch']} "
          f"(by batch: {r['model']['fps_by_batch']}); one batch of 8: {r['model']['batch_latency_ms'][8]} ms")
    print(f"split of a batch of 8 in torch (ms): {r['model']['split']}")
    print(f"decode + letterbox alone, one process: {r['decode']['fps_one_process']} frames/s")
    print(f"naive loop, {r['naive']['cameras']} cameras: {naive} frames/s")
    if "threaded" in r:
        t = r["threaded"]
        print(f"threaded one-process pipeline, {t['cameras']} cameras: {t['fps']} frames/s, latency p50/p95/p99 "
              f"{t['latency_ms_p50']}/{t['latency_ms_p95']}/{t['latency_ms_p99']} ms, "
              f"{t['cpu_ms_per_frame_total']} ms CPU per frame")
        if 8 in r["files"]:
            h = r["files"][8]
            print(f"hydravision / threaded, 8 cameras: {h['fps'] / t['fps']:.2f}x frames/s, CPU per frame "
                  f"{h['cpu_ms_per_frame_total']} vs {t['cpu_ms_per_frame_total']} ms"
                  + (f" (medians of {len(r['pairs_8'])} alternating runs)" if "pairs_8" in r else ""))
        print_pairs(r.get("pairs_8", []))
    if "threaded_int8" in r:
        t, h = r["threaded_int8"], r["files_int8"]
        print(f"precision int8: hydravision / threaded, 8 cameras: {h['fps'] / t['fps']:.2f}x frames/s, CPU per frame "
              f"{h['cpu_ms_per_frame_total']} vs {t['cpu_ms_per_frame_total']} ms (medians of "
              f"{len(r['pairs_8_int8'])} alternating runs)")
        print_pairs(r["pairs_8_int8"])
        if 8 in r["files"]:
            d = r["files"][8]
            print(f"precision int8 / auto ({d.get('precision')}): hydravision, 8 cameras: {h['fps'] / d['fps']:.2f}x "
                  f"frames/s, CPU per frame {h['cpu_ms_per_frame_total']} vs {d['cpu_ms_per_frame_total']} ms (model "
                  f"{h['cpu_ms_per_frame_model']} vs {d['cpu_ms_per_frame_model']}); threaded "
                  f"{t['fps'] / r['threaded']['fps']:.2f}x")
    if "stage_ms_per_frame" in r["naive"] and 8 in r["files"]:
        st, h = r["naive"]["stage_ms_per_frame"], r["files"][8]
        rest = r["transport_ms_per_frame"] = transport_ms(st, h)
        cores = r["machine"]["cpus"]
        print(f"stages, ms per frame: {st} (naive loop); hydravision x8: model {h['cpu_ms_per_frame_model']} at "
              f"batch {h['mean_batch']}, all processes {h['cpu_ms_per_frame_total']}; transport (beyond the stages' threads) "
              f"{rest:.2f} ms = {rest / h['cpu_ms_per_frame_total']:.0%}; bound {cores} cores / "
              f"{h['cpu_ms_per_frame_total']} ms = {cores * 1000 / h['cpu_ms_per_frame_total']:.1f} frames/s, reached "
              f"{h['fps'] * h['cpu_ms_per_frame_total'] / (cores * 1000):.2f}"
              + (f"; the whole machine meanwhile {h['machine_busy_cores']} cores busy (the rest: Redis, Ray's own "
                 f"processes, the kernel, anything else running)" if "machine_busy_cores" in h else ""))
        if h.get("cpu_ms_per_frame_by_thread"):
            print(f"  hydravision x8, CPU ms per frame by thread: {h['cpu_ms_per_frame_by_thread']}")
        replicas = r.get("files_replicas", h)  # what the process-per-camera and merged rows vary
        for key, label, pair in (
                ("files_replicas", "model in the camera processes / in replicas", lambda x: (h, x)),
                ("files_process_each", "replicas: cameras sharing processes / a process each", lambda x: (replicas, x)),
                ("files_merged", "replicas: calls shared by a process's cameras / a call per camera",
                 lambda x: (x, replicas))):
            if key in r:
                r[f"transport_ms_per_frame_{key.removeprefix('files_')}"] = transport_ms(st, r[key])
                print(compare_transport(label, *pair(r[key]), st))
    if "files_replicas" in r and "files_one_replica" in r:
        h, one = r["files_replicas"], r["files_one_replica"]
        print(f"{h['replicas']} replicas / one, 8 cameras: {h['fps'] / one['fps']:.2f}x frames/s, CPU per frame "
              f"{h['cpu_ms_per_frame_total']} vs {one['cpu_ms_per_frame_total']} ms")
    if 8 in r["files"] and "files_torch" in r:
        h, old = r["files"][8], r["files_torch"]
        print(f"{h.get('backend')} / torch eager, 8 cameras: {h['fps'] / old['fps']:.2f}x frames/s, CPU per frame "
              f"{h['cpu_ms_per_frame_total']} vs {old['cpu_ms_per_frame_total']} ms (model "
              f"{h['cpu_ms_per_frame_model']} vs {old['cpu_ms_per_frame_model']})")
    if 8 in r["files"] and "files_fp32" in r:
        h, old = r["files"][8], r["files_fp32"]
        print(f"{h.get('backend')} / {old.get('backend')} fp32, 8 cameras: {h['fps'] / old['fps']:.2f}x frames/s, CPU "
              f"per frame {h['cpu_ms_per_frame_total']} vs {old['cpu_ms_per_frame_total']} ms (model "
              f"{h['cpu_ms_per_frame_model']} vs {old['cpu_ms_per_frame_model']})")
    if 8 in r["files"] and "files_dynamic_shape" in r:
        h, old = r["files"][8], r["files_dynamic_shape"]
        print(f"openvino, a model per batch size {h['exact_shapes']} / the dynamic batch only, 8 cameras: "
              f"{h['fps'] / old['fps']:.2f}x frames/s, CPU per frame {h['cpu_ms_per_frame_total']} vs "
              f"{old['cpu_ms_per_frame_total']} ms (model {h['cpu_ms_per_frame_model']} vs "
              f"{old['cpu_ms_per_frame_model']})")
    if "threaded_all_cores" in r and "threaded" in r:
        a, t = r["threaded_all_cores"], r["threaded"]
        print(f"threaded design, the model on every core / on {r.get('threaded_threads', 1)} thread(s): "
              f"{a['fps']} / {t['fps']} frames/s at {a['cpu_ms_per_frame_total']} / {t['cpu_ms_per_frame_total']} ms "
              "CPU per frame")
    if "threaded_fp32" in r and "files_fp32" in r:
        t, h = r["threaded_fp32"], r["files_fp32"]
        print(f"in fp32: hydravision / threaded, 8 cameras: {h['fps'] / t['fps']:.2f}x frames/s, CPU per frame "
              f"{h['cpu_ms_per_frame_total']} vs {t['cpu_ms_per_frame_total']} ms")
    print()
    rows = [(f"files x{n}", v) for n, v in r["files"].items()]
    rows += [("x8 replicas", r["files_replicas"])] if "files_replicas" in r else []
    rows += [("x8 one replica", r["files_one_replica"])] if "files_one_replica" in r else []
    rows += [("x8 torch eager", r["files_torch"])] if "files_torch" in r else []
    rows += [("x8 fp32", r["files_fp32"])] if "files_fp32" in r else []
    rows += [("x8 proc/camera", r["files_process_each"])] if "files_process_each" in r else []
    rows += [("x8 merged calls", r["files_merged"])] if "files_merged" in r else []
    rows += [("x8 dyn. shape", r["files_dynamic_shape"])] if "files_dynamic_shape" in r else []
    rows += [("x8 int8", r["files_int8"])] if "files_int8" in r else []
    rows += [(k, r[k]) for k in ("rtsp_80", "rtsp_overload") if k in r]
    hdr = (f"{'run':<15}{'fps':>7}{'effic.':>8}{'speedup':>8}{'p50':>7}{'p95':>7}{'p99':>7}{'drops':>7}"
           f"{'fair':>6}{'batch':>6}{'cpu/f out':>10}{'PSS MB':>8}")
    print(hdr)
    for name, v in rows:
        print(f"{name:<15}{v['fps']:>7}{v['fps'] / ceiling:>8.2f}{v['fps'] / naive:>8.2f}{v['latency_ms_p50']:>7}"
              f"{v['latency_ms_p95']:>7}{v['latency_ms_p99']:>7}{v['drop_rate']:>7.3f}{v['fairness']:>6.2f}"
              f"{v['mean_batch']:>6}{v['cpu_ms_per_frame_outside_model']:>10}{v['pss_mb_total']:>8}")
    files = r["files"]
    if len(files) >= 2:
        lo, hi = min(files), max(files)
        per_cam_pss = (files[hi]["pss_mb_total"] - files[lo]["pss_mb_total"]) / (hi - lo)
        per_cam_rss = (files[hi]["rss_mb_total"] - files[lo]["rss_mb_total"]) / (hi - lo)
        r["memory_per_added_camera_mb"] = {"pss": round(per_cam_pss, 1), "rss": round(per_cam_rss, 1)}
        print(f"\nmemory per added camera ({lo}->{hi} cameras): PSS {per_cam_pss:.0f} MB, RSS {per_cam_rss:.0f} MB")


if __name__ == "__main__":
    main()
