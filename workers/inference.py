"""Batched HydraNet inference: the Batcher, InferenceService (ModelRunner + Batcher) and the thin InferenceActor.

The actor holds no per-camera state, so any replica can serve any camera and a restarted
replica loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, TypeVar

import numpy as np
import ray

from workers.frames import FrameRequest, HeadArrays
from workers.histograms import BATCH_WAIT_BUCKETS, Histogram

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    max_wait: float | None = None  # the caller's own bound on the wait for a batch to fill (seconds)


class Batcher(Generic[T, R]):
    """Collects items from concurrent callers into batches of up to ``max_batch``, waiting at most
    ``max_wait_ms`` after the oldest arrival, and runs ``handler`` on a worker thread.

    Written by hand because Ray Serve's ``@serve.batch`` only works inside a Serve deployment.
    Every caller gets exactly one result or the batch's exception; none hangs. While a batch
    runs, the next one fills, so the model is never idle when work is waiting. A caller may bound its
    own wait below ``max_wait_ms`` (``submit(..., max_wait_s=)``): the batch then leaves when the most
    impatient request waiting in it is due (a camera over its frame-age budget uses 0).
    """

    def __init__(self, handler: Callable[[list[T]], list[R]], max_batch: int = 8, max_wait_ms: float = 5.0):
        self.handler, self.max_batch, self.max_wait = handler, max_batch, max_wait_ms / 1000
        self._pending: collections.deque[_Pending[T]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self.waits = Histogram(BATCH_WAIT_BUCKETS)  # arrival to the start of its batch, per request

    async def submit(self, item: T, max_wait_s: float | None = None) -> R:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._collect())
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, fut, max_wait=max_wait_s))
        self._wake.set()
        return await fut

    async def _collect(self) -> None:
        assert self._wake is not None
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            # Recomputed on every arrival: an impatient request (max_wait_s) can move the batch's departure earlier.
            while len(self._pending) < self.max_batch and (remaining := self._deadline() - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            await self._run(batch)

    def _deadline(self) -> float:
        """When the batch being filled must leave: the earliest due time of the requests waiting in it."""
        return min(p.arrived + (self.max_wait if p.max_wait is None else min(p.max_wait, self.max_wait))
                   for p in itertools.islice(self._pending, self.max_batch))

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch running now)."""
        return len(self._pending)

    async def _run(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.waits.observe_many(started - p.arrived for p in batch)
        try:
            results = await loop.run_in_executor(self._executor, self.handler, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # every waiting caller gets the error; none is left hanging
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class InferenceService:
    """ModelRunner + Batcher: what the InferenceActor serves, usable in-process by tests and benchmarks."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 max_batch: int = 8, max_wait_ms: float = 5.0, threads: int | None = None,
                 score_threshold: float | None = None, compile: bool = False):
        from workers.model_runner import ModelRunner  # torch: only in the process that runs the model

        self.runner: ModelRunner = ModelRunner(checkpoint, device, precision, threads, score_threshold, max_batch, compile=compile)
        self.batcher: Batcher[tuple[np.ndarray, list[str] | None], dict[str, HeadArrays]] = Batcher(
            self._run_batch, max_batch, max_wait_ms)

    def _run_batch(self, items: list[tuple[np.ndarray, list[str] | None]]) -> list[dict[str, HeadArrays]]:
        return self.runner.run([image for image, _ in items], [heads for _, heads in items])

    async def infer(self, request: FrameRequest) -> dict[str, HeadArrays]:
        return await self.batcher.submit((request.image, request.heads), max_wait_s=request.max_wait_s)

    async def infer_image(self, image: np.ndarray, heads: list[str] | None,
                          max_wait_s: float | None = None) -> dict[str, HeadArrays]:
        return await self.batcher.submit((image, heads), max_wait_s=max_wait_s)

    def info(self) -> dict:
        return self.runner.info()

    def stats(self) -> dict:
        s = dict(self.runner.stats)
        s["head_frames"] = dict(s["head_frames"])
        s["batch_sizes"] = {int(k): v for k, v in s["batch_sizes"].items()}
        s["pid"] = os.getpid()
        s.update(self.runner.histograms())  # head_seconds, batch_seconds
        s["batch_wait"] = self.batcher.waits.snapshot()
        s.setdefault("queue_depth", self.batcher.queue_depth)
        return s


@ray.remote(max_restarts=-1)
class InferenceActor:
    """Ray shell around InferenceService. Async, so many cameras' calls wait in one batch at once."""

    def __init__(self, checkpoint: str, device: str = "auto", precision: str = "auto", max_batch: int = 8,
                 max_wait_ms: float = 5.0, threads: int | None = None, score_threshold: float | None = None,
                 compile: bool = False):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.service = InferenceService(checkpoint, device, precision, max_batch, max_wait_ms,
                                        threads or os.cpu_count(), score_threshold, compile)

    async def infer(self, request: FrameRequest) -> dict[str, HeadArrays]:
        return await self.service.infer(request)

    async def infer_image(self, image: np.ndarray, heads: list[str] | None,
                          max_wait_s: float | None = None) -> dict[str, HeadArrays]:
        """What StreamActors call: only the image (a Ray-serialized array, no pickled objects), the heads and a
        number cross the process boundary; a round trip is ~1.6 ms shorter than with the whole FrameRequest."""
        return await self.service.infer_image(image, heads, max_wait_s)

    async def info(self) -> dict:
        return self.service.info()

    async def stats(self) -> dict:
        return self.service.stats()

    async def ping(self) -> int:
        return os.getpid()


def service_call(service: Any) -> Callable[[FrameRequest], Awaitable[dict[str, HeadArrays]]]:
    """An awaitable infer function for either an actor handle or an in-process InferenceService."""
    if isinstance(service, InferenceService):
        return service.infer
    return lambda request: service.infer_image.remote(request.image, request.heads, request.max_wait_s)
