"""What a Ray actor process and a Ray call cost in CPU, whatever the work: the part of hydravision's
"transport" (benchmarks/README.md, "After grouping ready frames into one call") that fewer processes or
fewer calls would save.

- idle: CPU per second of async actors that do nothing (as a StreamActor between frames), read from /proc;
- calls: a caller actor sends a letterboxed frame (3x256x448 uint8, 344 KB, as ``infer_images`` carries it)
  to a callee that answers a small array, at a steady rate, with 1 and with 4 frames per call: CPU per call
  on each side, beyond the idle cost measured first; each also to a method declared with Ray's task events off
  (``@ray.method(enable_task_events=False)``: what Ray records of every call for its dashboard and state API),
  the two alternating over ``--rounds`` rounds (medians).

    .venv/bin/python benchmarks/bench_ray_overhead.py --json out.json   # ~1.5 min

Nothing of the model runs: the figures are Ray's alone. An estimate of what they add up to for N cameras at
F frames/s in all is printed last (processes x idle + calls x both sides, per frame).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import numpy as np
import psutil

from measure import cpu_seconds, save_json, start_ray

FRAME = (3, 256, 448)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=int, default=4, help="idle actors / callers")
    p.add_argument("--seconds", type=float, default=20.0, help="each measuring window")
    p.add_argument("--rate", type=float, default=8.0, help="calls per second per caller")
    p.add_argument("--cameras", type=int, default=8, help="for the estimate: camera processes")
    p.add_argument("--fps", type=float, default=62.0, help="for the estimate: frames per second in all")
    p.add_argument("--replicas", type=int, default=2, help="for the estimate: inference processes")
    p.add_argument("--rounds", type=int, default=1, help="measuring rounds, task events on and off alternating")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import ray

    start_ray(num_cpus=args.actors + 2)

    @ray.remote
    class Callee:
        async def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
            return [np.zeros((4, 6), np.float32) for _ in images]

        @ray.method(enable_task_events=False)
        async def infer_quiet(self, images: list[np.ndarray]) -> list[np.ndarray]:
            return [np.zeros((4, 6), np.float32) for _ in images]

        async def pid(self) -> int:
            return os.getpid()

    @ray.remote
    class Caller:
        def __init__(self, callee):
            self.callee = callee

        async def pid(self) -> int:
            return os.getpid()

        async def calls(self, n: int, rate: float, frames: int, quiet: bool = False) -> None:
            images = [np.zeros(FRAME, np.uint8) for _ in range(frames)]
            method = self.callee.infer_quiet if quiet else self.callee.infer
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(n):  # paced, as a camera: the idle cost between calls stays the same in each window
                await method.remote(images)
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))

    callee = Callee.remote()
    callers = [Caller.remote(callee) for _ in range(args.actors)]
    procs = [psutil.Process(pid) for pid in ray.get([a.pid.remote() for a in callers])]
    callee_proc = psutil.Process(ray.get(callee.pid.remote()))
    time.sleep(3)  # past start-up

    c0, k0 = cpu_seconds(*procs), cpu_seconds(callee_proc)
    time.sleep(args.seconds)
    idle_ms = (cpu_seconds(*procs) - c0) / args.actors / args.seconds * 1000
    callee_idle_ms = (cpu_seconds(callee_proc) - k0) / args.seconds * 1000
    print(f"idle async actor: {idle_ms:.1f} ms of CPU per second (the callee: {callee_idle_ms:.1f})", flush=True)

    out = {"machine": {"cpus": os.cpu_count()}, "idle_actor_cpu_ms_per_s": round(idle_ms, 2),
           "idle_callee_cpu_ms_per_s": round(callee_idle_ms, 2), "calls": {}}
    n = max(1, int(args.rate * args.seconds))
    rounds: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for frames in (1, 4):
            for quiet in ((False, True) if r % 2 == 0 else (True, False)):  # neither always measured first
                c0, k0, t0 = cpu_seconds(*procs), cpu_seconds(callee_proc), time.monotonic()
                ray.get([a.calls.remote(n, args.rate, frames, quiet) for a in callers])
                wall = time.monotonic() - t0
                calls = n * args.actors
                caller_ms = ((cpu_seconds(*procs) - c0) - idle_ms / 1000 * wall * args.actors) / calls * 1000
                callee_ms = ((cpu_seconds(callee_proc) - k0) - callee_idle_ms / 1000 * wall) / calls * 1000
                rounds.setdefault((frames, quiet), []).append((caller_ms, callee_ms))
                print(f"round {r + 1}, {frames} frame(s) per call, task events {'off' if quiet else 'on'}, {calls} "
                      f"calls: caller {caller_ms:.2f} ms, callee {callee_ms:.2f} ms of CPU per call beyond idle",
                      flush=True)
    out["calls_without_task_events"] = {}
    for (frames, quiet), got in sorted(rounds.items()):
        caller_ms, callee_ms = (statistics.median(g[i] for g in got) for i in (0, 1))
        out["calls_without_task_events" if quiet else "calls"][frames] = {
            "calls": n * args.actors * len(got), "caller_cpu_ms_per_call": round(caller_ms, 2),
            "callee_cpu_ms_per_call": round(callee_ms, 2), "rounds": [[round(a, 3), round(b, 3)] for a, b in got]}
    for frames in (1, 4):
        on, off = out["calls"][frames], out["calls_without_task_events"][frames]
        both = [x["caller_cpu_ms_per_call"] + x["callee_cpu_ms_per_call"] for x in (on, off)]
        print(f"{frames} frame(s) per call, medians of {args.rounds} round(s): {both[0]:.2f} ms of CPU per call with "
              f"task events, {both[1]:.2f} without ({both[1] / both[0]:.2f}x)", flush=True)

    idle_per_frame = (args.cameras * idle_ms + args.replicas * callee_idle_ms) / args.fps
    per_frame = {k: round((v["caller_cpu_ms_per_call"] + v["callee_cpu_ms_per_call"]) / k, 2)
                 for k, v in out["calls"].items()}
    out["estimate"] = {"cameras": args.cameras, "replicas": args.replicas, "fps": args.fps,
                       "idle_ms_per_frame": round(idle_per_frame, 2), "call_ms_per_frame_by_frames_per_call": per_frame}
    print(f"estimate, {args.cameras} camera processes + {args.replicas} replicas at {args.fps:g} frames/s: idle "
          f"{idle_per_frame:.2f} ms per frame; calls {per_frame[1]:.2f} ms per frame at one frame per call, "
          f"{per_frame[4]:.2f} at four")
    save_json(args.json, out)
    ray.shutdown()


if __name__ == "__main__":
    main()
