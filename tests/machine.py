"""How fast this machine runs the models the tests use, measured when the tests start (issue 12, defect 0).

Tests size their load (a camera's frame rate) and their deadlines from these figures instead of from the
machine they were written on: a fast machine runs a short test, a slow or busy one a longer test with the
same assertions. The model is timed as the InferenceActor runs it: ``ModelRunner`` on the CPU, BatchNorm
fused, called from a worker thread as the actor's Batcher calls it, on a real synthetic street frame. The
figure includes whatever else the machine is busy with at the time.

Under pytest-xdist (``./dev.sh test`` runs three workers) each worker measures alone at some moment but then runs
its tests beside the others', so the figures are divided by the number of workers: a test sized from them
gets the share of the machine it has when all are busy (the regime the suite already passes in beside another
busy process), not the whole machine it happened to see.

The thread matters: beside a busy process, torch's OpenMP threads wait very differently when the model is
called from a process's main thread. The demo model measured ~1.4 s per frame at batch 1 from the main
thread against ~30 ms from a worker thread (and in the InferenceActor), on the same machine at the same time.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Batch-1 frames/s of the demo checkpoint on the quiet 2-core machine the tests' fixed figures (deadlines,
# rates) were first written for. A machine that measures slower stretches those deadlines by the ratio.
REFERENCE_DEMO_FPS = 30.0
# A machine more than this many times slower than the reference gets no longer deadlines: past it the tests
# fail saying how slow the machine measured, instead of running for ever.
MAX_SLOWNESS = 8.0


@dataclass(frozen=True)
class ModelSpeed:
    """Frames/s of one checkpoint at batch 1 and at ``max_batch`` (medians of timed calls)."""

    name: str
    batch1_fps: float
    batch_fps: float
    max_batch: int

    def __str__(self) -> str:
        return (f"{self.name}: {self.batch1_fps:.1f} frames/s at batch 1, "
                f"{self.batch_fps:.1f} frames/s at batch {self.max_batch}")


@dataclass(frozen=True)
class Machine:
    cores: int
    demo: ModelSpeed
    tiny: ModelSpeed
    shared_by: int = 1  # pytest-xdist workers sharing the machine; the speeds above are already divided by it

    @property
    def slowness(self) -> float:
        """How many times slower than the reference machine (at least 1, at most MAX_SLOWNESS)."""
        return min(MAX_SLOWNESS, max(1.0, REFERENCE_DEMO_FPS / self.demo.batch1_fps))

    def deadline(self, seconds: float) -> float:
        """A deadline written for the reference machine, stretched to this one."""
        return seconds * self.slowness

    def live_fps(self, speed: ModelSpeed, share: float = 0.4, cap: float = 25.0, floor: float = 2.0) -> int:
        """A whole frame rate a live camera can be served at with headroom: ``share`` of the batch-1 rate,
        at most ``cap``. Never under ``floor``: a machine slower than that is too slow for the test, and
        the test's own assertions say so."""
        return int(max(floor, min(cap, math.floor(share * speed.batch1_fps))))

    def __str__(self) -> str:
        shared = f" (each of {self.shared_by} test workers' share)" if self.shared_by > 1 else ""
        return f"{self.cores} cores; {self.demo}; {self.tiny}; slowness {self.slowness:.2f}{shared}"


def model_input(size: tuple[int, int]):
    """A letterboxed synthetic street frame: what a camera hands the model (random noise would make the
    score threshold and NMS see a different number of boxes)."""
    from workers.sources import open_source

    source = open_source("synthetic://street?seed=5&frames=1", realtime=False)
    source.open()
    try:
        image, _ = source.read().to_model_input(size)
    finally:
        source.close()
    return image


def _median_seconds(call, min_calls: int, budget_s: float, max_calls: int = 50) -> float:
    """Median of timed calls: at least ``min_calls``, then more until ``budget_s`` has passed."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_model(checkpoint: Path, name: str, max_batch: int = 8, budget_s: float = 0.8) -> ModelSpeed:
    """Times ``checkpoint`` at batch 1 and ``max_batch``: one warm-up call each, then about ``budget_s``
    seconds of calls (at least 3 and 2, so a very slow machine is not timed for minutes)."""
    from workers.model_runner import ModelRunner

    runner = ModelRunner(checkpoint, device="cpu")  # the default backend and threads, as a replica runs it
    image = model_input(runner.input_size)
    one, many = [image], [image] * max_batch
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure") as thread:  # as the Batcher runs it
        def run(images: list) -> None:
            thread.submit(runner.run, images, [None] * len(images)).result()

        run(one)
        run(many)
        t1 = _median_seconds(lambda: run(one), 3, budget_s)
        tb = _median_seconds(lambda: run(many), 2, budget_s)
    return ModelSpeed(name, 1 / t1, max_batch / tb, max_batch)


def share(speed: ModelSpeed, workers: int) -> ModelSpeed:
    return ModelSpeed(speed.name, speed.batch1_fps / workers, speed.batch_fps / workers, speed.max_batch)


def measure(demo: Path, tiny: Path, workers: int = 1) -> Machine:
    """The machine's figures; with ``workers`` > 1 test processes sharing it, each one's share (see above)."""
    workers = max(1, workers)
    return Machine(os.cpu_count() or 1, share(measure_model(demo, "demo"), workers),
                   share(measure_model(tiny, "tiny"), workers), workers)
