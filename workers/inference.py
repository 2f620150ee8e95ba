"""Batched HydraNet inference: the Batcher, InferenceService (ModelRunner + Batcher) and the thin InferenceActor.

The Batcher's queue is bounded and fair across cameras; a request is never computed once its caller has
given up. Requests it answers without computing raise an ``InferenceRejected`` subclass, counted in stats().

The actor holds no per-camera state, so any replica can serve any camera and a restarted
replica loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, TypeVar

import numpy as np
import ray

from models.files import STALE_ASIDE_S, written_aside
from models.metadata import read_metadata
from workers.batch_size import BatchSizer
from workers.cores import usable_cores
from workers.frames import FrameRequest, HeadArrays
from workers.histograms import BATCH_WAIT_BUCKETS, Histogram
from workers.redact import log_to_stderr
from workers.thread_names import worker_thread

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class InferenceRejected(Exception):
    """A request the batcher answered without computing it; ``camera`` is the caller's camera id."""

    def __init__(self, camera: str, message: str) -> None:
        super().__init__(message)
        self.camera = camera

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions across actors; the default would call __init__(message) without camera.
        return (type(self), (self.camera, self.args[0]))


class InferenceOverloaded(InferenceRejected):
    """Shed to keep the queue within its bound: the oldest request of the camera holding the most."""


class InferenceExpired(InferenceRejected, TimeoutError):
    """Its caller's timeout passed before a batch could take it; a TimeoutError, as the caller's own would be."""


class BatcherClosed(InferenceRejected):
    """The batcher was closed while the request waited or ran."""


@dataclass(eq=False)  # identity, not field equality: requests are removed from queues by identity
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    camera: str
    deadline: float | None  # time.monotonic() of this process; None: the caller waits forever
    arrived: float = field(default_factory=time.monotonic)
    queued: bool = True
    timer: asyncio.TimerHandle | None = None
    max_wait: float | None = None  # the caller's own bound on the wait for a batch to fill (seconds)


class Batcher(Generic[T, R]):
    """Collects items from concurrent callers into batches of up to ``max_batch``, waiting at most
    ``max_wait_ms`` after the oldest arrival, and runs ``handler`` on a worker thread.

    Cameras with a backlog (several requests in the batch that just ended) send their next frames as soon as
    they have its results: until each of them is back, or ``max_wait_ms`` after that batch ended, the next
    batch waits for them, however long the requests already waiting have waited. Without that a split such
    as 6 + 2 repeated itself (the 2 that waited left alone while the 6 were being answered, and so on): each
    size got a model compiled for it, and the BatchSizer's probes of a larger size ended on such batches
    unmeasured (docs/architecture.md, "Batches that follow the load"). A camera with one request in the batch
    (a live camera under a light load) is not waited for: its next frame comes when the camera takes it.

    Written by hand because Ray Serve's ``@serve.batch`` only works inside a Serve deployment.
    Every caller gets exactly one result or exception; none hangs. While a batch runs, the next one
    fills, so the model is never idle when work is waiting. A caller may bound its own wait below
    ``max_wait_ms`` (``submit(..., max_wait_s=)``): the batch then leaves when the most impatient request
    waiting in it is due (a camera over its frame-age budget uses 0).

    Fair and bounded across cameras (``submit``'s ``camera``): a batch takes requests round-robin by
    camera, cameras in order of their oldest waiting request, oldest first within a camera, so one
    chatty camera cannot fill batches while others wait. At most ``max_pending`` requests wait, at most
    ``max_pending_per_camera`` of one camera; beyond that the oldest request of the camera holding the
    most is shed (``InferenceOverloaded``), so a camera with few waiting is never the one shed. A request
    whose caller's timeout has passed (``InferenceExpired``) or whose caller cancelled is dropped
    without being computed. Everything runs on the event loop's thread except ``handler``.

    With a ``sizer`` (workers/batch_size.py) a batch grows only up to the size it finds fastest per frame,
    ``max_batch`` being its ceiling; without one, up to ``max_batch``.
    """

    def __init__(self, handler: Callable[[list[T]], list[R]], max_batch: int = 8, max_wait_ms: float = 5.0,
                 max_pending: int | None = None, max_pending_per_camera: int | None = None,
                 sizer: BatchSizer | None = None):
        if max_batch < 1:  # a batch could take nothing: the collector would spin on the event loop, never yielding
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.handler, self.max_batch, self.max_wait, self.sizer = handler, max_batch, max_wait_ms / 1000, sizer
        # Defaults: a camera may have up to 16 frames in flight (the config's max_inflight ceiling), so a
        # well-behaved camera never hits its own cap; the total stays within a few batches of work.
        self.max_pending_per_camera = max(16, max_batch) if max_pending_per_camera is None else max_pending_per_camera
        self.max_pending = max(8 * max_batch, self.max_pending_per_camera) if max_pending is None else max_pending
        if self.max_pending < 1 or self.max_pending_per_camera < 1:
            raise ValueError(f"max_pending and max_pending_per_camera must be >= 1, got "
                             f"{self.max_pending} and {self.max_pending_per_camera}")
        self._queues: dict[str, collections.deque[_Pending[T]]] = {}  # only cameras with requests waiting
        self.depth = self.depth_max = 0
        self.counts = {"shed": 0, "expired": 0, "cancelled": 0}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher",
                                            initializer=worker_thread, initargs=("hv-model",))
        self.waits = Histogram(BATCH_WAIT_BUCKETS)  # arrival to the start of its batch, per request
        self._free_since = 0.0  # time.monotonic() when the last batch ended
        self._backlogged: set[str] = set()  # cameras with several requests in that batch

    async def submit(self, item: T, camera: str = "", timeout_s: float | None = None,
                     max_wait_s: float | None = None) -> R:
        """``item``'s result. ``timeout_s``: how long the caller waits, from now; after that the request
        is dropped unless its batch has already started. ``max_wait_s``: the longest this request may wait
        for its batch to fill (capped by ``max_wait_ms``). Raises InferenceOverloaded / InferenceExpired."""
        return await self.enqueue(item, camera, timeout_s, max_wait_s)

    def enqueue(self, item: T, camera: str = "", timeout_s: float | None = None,
                max_wait_s: float | None = None) -> asyncio.Future:
        """``submit`` without a coroutine: queues ``item`` now and returns the future of its result (cancel it to
        withdraw the request). What a camera's frames go through (InferenceService._submit_each): a coroutine
        per frame put into ``asyncio.gather`` cost a Task, its steps and its callbacks per frame."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._collect())
            self._task.add_done_callback(self._collector_ended)
        if len(self._queues.get(camera, ())) >= self.max_pending_per_camera:
            self._shed(camera)
        elif self.depth >= self.max_pending:
            self._shed(self._fullest(camera))
        now = time.monotonic()
        p = _Pending(item, loop.create_future(), camera, None if timeout_s is None else now + timeout_s, now,
                     max_wait=max_wait_s)
        if timeout_s is not None:
            p.timer = loop.call_later(max(0.0, timeout_s), self._expire, p)
        p.future.add_done_callback(lambda _, p=p: self._cancelled(p))
        self._queues.setdefault(camera, collections.deque()).append(p)
        self.depth += 1
        self.depth_max = max(self.depth_max, self.depth)
        assert self._wake is not None
        self._wake.set()
        return p.future

    def stats(self) -> dict:
        """Counters for metrics: requests shed (queue full), expired (caller's timeout passed while waiting),
        cancelled (by the caller while waiting); none of them was computed. The queue's depth now / max, and
        how large a batch may grow now (``batch_limit``; with a sizer, what it measured)."""
        sized = self.sizer.stats() if self.sizer else {"batch_limit": self.max_batch}
        return {**self.counts, "queue_depth": self.depth, "queue_depth_max": self.depth_max,
                "queue_limit": self.max_pending, "queue_limit_per_camera": self.max_pending_per_camera, **sized}

    def limit(self) -> int:
        """The largest batch to take now."""
        return min(self.max_batch, self.sizer.allowed()) if self.sizer else self.max_batch

    # -- the queue: every removal goes through _unqueue ----------------------------------------
    def _unqueue(self, p: _Pending[T]) -> None:
        queue = self._queues[p.camera]
        if queue[0] is p:
            queue.popleft()
        else:
            queue.remove(p)
        if not queue:
            del self._queues[p.camera]
        p.queued = False
        self.depth -= 1
        if p.timer:
            p.timer.cancel()

    def _drop(self, p: _Pending[T], counter: str, error: InferenceRejected | None) -> None:
        self._unqueue(p)
        self.counts[counter] += 1
        if error is not None and not p.future.done():
            p.future.set_exception(error)

    def _fullest(self, arriving: str) -> str:
        """The camera to shed from: the most requests waiting; on a tie the arriving camera, then the
        camera whose oldest request is oldest."""
        return max(self._queues, key=lambda c: (len(self._queues[c]), c == arriving, -self._queues[c][0].arrived))

    def _shed(self, camera: str) -> None:
        p = self._queues[camera][0]
        self._drop(p, "shed", InferenceOverloaded(camera, (
            f"inference queue full ({self.depth} waiting, limits {self.max_pending} in all and "
            f"{self.max_pending_per_camera} per camera): dropped the oldest of camera {camera!r}'s "
            f"{len(self._queues[camera])} waiting requests")))

    def _expire(self, p: _Pending[T]) -> None:
        if p.queued:
            self._drop(p, "expired", InferenceExpired(p.camera, (
                f"camera {p.camera!r}: the caller's timeout passed after "
                f"{time.monotonic() - p.arrived:.3f} s in the inference queue; not computed")))

    def _cancelled(self, p: _Pending[T]) -> None:
        if p.queued and p.future.cancelled():
            self._drop(p, "cancelled", None)

    # -- batches ---------------------------------------------------------------------------------
    def _take_batch(self, limit: int) -> list[_Pending[T]]:
        """Up to ``limit`` requests, round-robin by camera (cameras in order of their oldest request), oldest
        first within each."""
        now = time.monotonic()
        for queue in list(self._queues.values()):  # callbacks not run yet must not let such a request run
            for p in list(queue):
                if p.future.cancelled():
                    self._drop(p, "cancelled", None)
                elif p.deadline is not None and p.deadline <= now:
                    self._expire(p)
        batch: list[_Pending[T]] = []
        while self._queues and len(batch) < limit:  # one round: each camera's oldest request
            in_turn = sorted(self._queues, key=lambda c: self._queues[c][0].arrived)
            for camera in in_turn[:limit - len(batch)]:
                p = self._queues[camera][0]
                self._unqueue(p)
                batch.append(p)
        return batch

    async def _collect(self) -> None:
        assert self._wake is not None
        while True:
            while not self.depth:
                self._wake.clear()
                await self._wake.wait()
            # Recomputed on every arrival: an impatient request (max_wait_s) can move the batch's departure earlier.
            while 0 < self.depth < self.limit() and (remaining := self._deadline() - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            limit = self.limit()
            batch = self._take_batch(limit)
            if batch:
                await self._run(batch, full=len(batch) == limit)
                self._free_since = time.monotonic()
                per_camera = collections.Counter(p.camera for p in batch)
                self._backlogged = {camera for camera, n in per_camera.items() if n > 1}

    def _deadline(self) -> float:
        """When the batch being filled must leave: the earliest due time of the requests waiting, each due its
        wait after it arrived, or after the last batch ended while a backlogged camera of that batch has not
        sent again. Only asked while fewer than the limit wait, so every waiting request goes into that batch."""
        start = self._free_since if not self._backlogged.issubset(self._queues) else 0.0
        return min(max(p.arrived, start) + (self.max_wait if p.max_wait is None else min(p.max_wait, self.max_wait))
                   for queue in self._queues.values() for p in queue)

    async def _run(self, batch: list[_Pending[T]], full: bool = False) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.waits.observe_many(started - p.arrived for p in batch)
        try:
            results, seconds = await loop.run_in_executor(self._executor, _timed, self.handler,
                                                          [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:  # close() while the batch ran: its callers must not hang
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed(p.camera, "inference service closed while the batch ran"))
            raise
        except Exception as e:  # every waiting caller gets the error; none is left hanging
            # The failed call's frames held its tensors (a GPU's memory: the batch, its features) for as long as a
            # caller kept the error, while the next batch started at once and could run out of memory in turn.
            traceback.clear_frames(e.__traceback__)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            if self.sizer:  # a probe that fails must end; a size out of memory must not be tried again
                limit = self.sizer.limit
                self.sizer.failed(len(batch), e)
                if self.sizer.limit < limit:
                    log.warning("a batch of %d ran out of memory (%s: %s); batches take at most %d from now on",
                                len(batch), type(e).__name__, e, self.sizer.limit)
            return
        if self.sizer:
            self.sizer.record(len(batch), seconds, full)
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)

    def _fail_waiting(self, why: str) -> None:
        for queue in list(self._queues.values()):
            for p in list(queue):
                self._unqueue(p)
                if not p.future.done():
                    p.future.set_exception(BatcherClosed(p.camera, why))

    def _collector_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug here must not leave callers hanging
            log.error("batcher stopped: %r", task.exception())
            self._fail_waiting(f"inference batcher failed: {task.exception()!r}")

    def close(self) -> None:
        """Stops batching; every request still waiting gets BatcherClosed."""
        if self._task:
            self._task.cancel()
        self._fail_waiting("inference service closed")
        self._executor.shutdown(wait=False, cancel_futures=True)


def _timed(handler: Callable[[list[T]], list[R]], items: list[T]) -> tuple[list[R], float]:
    """The handler's results and its own seconds, taken on the worker thread (not the event loop's delay)."""
    t0 = time.perf_counter()
    results = handler(items)
    return results, time.perf_counter() - t0


def model_changes(checkpoint: str | Path, expect: dict) -> list[str]:
    """How the checkpoint's input size and heads differ from ``expect`` (the controller's ``model_info``, what
    the cameras were configured with); empty when they agree. Its metadata only: no torch, no weights."""
    config = read_metadata(checkpoint)["config"]
    heads = {name: spec["classes"] for name, spec in config["heads"].items()}
    changes = [] if list(config["input_size"]) == list(expect["input_size"]) else [
        f"input size {list(config['input_size'])}, not {list(expect['input_size'])}"]
    for name in [*expect["heads"], *(h for h in heads if h not in expect["heads"])]:
        if name not in heads:
            changes.append(f"no head {name!r}")
        elif name not in expect["heads"]:
            changes.append(f"a new head {name!r}")
        elif list(heads[name]) != list(expect["heads"][name]):
            changes.append(f"head {name!r} has classes {heads[name]}, not {expect['heads'][name]}")
    return changes


# CUDA errors after which the process's CUDA context cannot run anything again: every later batch failed the same
# way while the process, still alive, was never restarted. Matched in the error's text (torch raises them as
# RuntimeError or AcceleratorError with CUDA's own words). "device-side assert triggered" whole: every CUDA error
# torch raises ends "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.", and "device-side
# assert" alone took a recoverable "CUDA error: out of memory" for a lost context (the process exited, and
# restarted into the same batch size, instead of the BatchSizer stepping down).
DEVICE_LOST = ("illegal memory access", "device-side assert triggered", "unspecified launch failure",
               "misaligned address", "illegal instruction", "CUBLAS_STATUS_EXECUTION_FAILED")
DEVICE_LOST_EXIT = 75  # EX_TEMPFAIL: Ray restarts the process (max_restarts=-1) with a fresh CUDA context


def device_lost(e: BaseException) -> bool:
    """Whether ``e`` is a CUDA error that leaves the process's context unusable (DEVICE_LOST)."""
    text = str(e)
    return "CUDA" in text.upper() and any(words in text for words in DEVICE_LOST)


class InferenceService:
    """ModelRunner + Batcher: what the InferenceActor serves, usable in-process by tests and benchmarks."""

    def __init__(self, checkpoint: str | Path | bytes, device: str = "auto", precision: str = "auto",
                 max_batch: int = 8, max_wait_ms: float = 5.0, threads: int | None = None,
                 score_threshold: float | None = None, compile: bool = False, max_pending: int | None = None,
                 max_pending_per_camera: int | None = None, backend: str = "auto", adapt_batch: bool = False,
                 expect: dict | None = None, exit_on_device_loss: bool = False):
        """``checkpoint``: a path, or the file's bytes (what the controller puts in Ray's object store for other
        nodes: written to this node's temp dir first, ``local_copy``). ``adapt_batch``: batches grow only up to
        the size measured fastest per frame (workers/batch_size.py), ``max_batch`` being the ceiling; otherwise
        up to ``max_batch``. ``expect``: the input size and heads the service started with; a checkpoint that
        differs is refused (a ValueError, as workers/ refuse a setting): a file replaced under a running service
        was loaded by a restarted replica or a new camera process, and every frame then failed ("publishing
        failed: IndexError"). ``exit_on_device_loss``: a lost CUDA context ends the process (a Ray actor's, which
        Ray restarts) instead of failing every batch after it (``device_lost``)."""
        self.exit_on_device_loss = exit_on_device_loss
        if isinstance(checkpoint, bytes):
            checkpoint = local_copy(checkpoint)
        if expect is not None and (changes := model_changes(checkpoint, expect)):  # before torch's imports
            raise ValueError(f"model.checkpoint {checkpoint}: replaced since the service started, refused "
                             f"(restart the service to use it): {'; '.join(changes)}")
        from workers.model_runner import ModelRunner  # torch: only in the process that runs the model

        self.runner: ModelRunner = ModelRunner(checkpoint, device, precision, threads, score_threshold, max_batch,
                                               compile=compile, backend=backend)
        self.batcher: Batcher[tuple[np.ndarray, list[str] | None], dict[str, HeadArrays]] = Batcher(
            self._run_batch, max_batch, max_wait_ms, max_pending, max_pending_per_camera,
            BatchSizer(max_batch, steady=self.runner.steady) if adapt_batch else None)
        self.calls = 0  # infer calls received (one may carry several frames of a camera: infer_images)

    def _run_batch(self, items: list[tuple[np.ndarray, list[str] | None]]) -> list[dict[str, HeadArrays]]:
        try:
            return self.runner.run([image for image, _ in items], [heads for _, heads in items])
        except Exception as e:
            if self.exit_on_device_loss and device_lost(e):
                log.critical("the GPU's CUDA context is lost (%s: %s): every batch would fail the same way; this "
                             "process exits so that Ray starts it afresh", type(e).__name__, e)
                logging.shutdown()
                os._exit(DEVICE_LOST_EXIT)
            raise

    async def infer(self, request: FrameRequest) -> dict[str, HeadArrays]:
        self.calls += 1
        return await self.batcher.submit((request.image, request.heads), request.camera, request.timeout_s,
                                         request.max_wait_s)

    async def infer_image(self, image: np.ndarray, heads: list[str] | None, camera: str = "",
                          timeout_s: float | None = None, max_wait_s: float | None = None) -> dict[str, HeadArrays]:
        self.calls += 1
        return await self.batcher.submit((image, heads), camera, timeout_s, max_wait_s)

    async def infer_images(self, images: list[np.ndarray], heads: list[str] | None, camera: str = "",
                           timeout_s: float | None = None,
                           max_wait_s: float | None = None) -> list[dict[str, HeadArrays] | BaseException]:
        """Several frames of one camera: each is its own request to the batcher (batched with other cameras'
        frames as usual); each frame's result or exception, in order."""
        self.calls += 1
        return await self._submit_each(images, heads, camera, timeout_s, max_wait_s)

    async def infer_groups(self, groups: list[tuple]) -> list[list[dict[str, HeadArrays] | BaseException]]:
        """``infer_images`` for several cameras at once (what a CallMerger sends): ``groups`` of (images,
        heads, camera, timeout_s, max_wait_s); each group's list of results or exceptions, in order."""
        self.calls += 1
        return list(await asyncio.gather(*(self._submit_each(*group) for group in groups)))

    def _submit_each(self, images: list[np.ndarray], heads: list[str] | None, camera: str, timeout_s: float | None,
                     max_wait_s: float | None) -> Awaitable[list]:
        """Each image its own request to the batcher; their results or exceptions, in order."""
        return asyncio.gather(*(self.batcher.enqueue((image, heads), camera, timeout_s, max_wait_s)
                                for image in images), return_exceptions=True)

    def info(self) -> dict:
        return self.runner.info()

    def stats(self) -> dict:
        s = dict(self.runner.stats)
        s["head_frames"] = dict(s["head_frames"])
        # dict(): one step under the GIL; iterating the live Counter raced the model thread adding a new size
        s["batch_sizes"] = {int(k): v for k, v in dict(s["batch_sizes"]).items()}
        s["pid"] = os.getpid()
        s["calls"] = self.calls
        s["exact_shapes"] = self.runner.exact_shapes()
        s.update(self.batcher.stats())  # shed / expired / cancelled requests, queue_depth(_max)
        s.update(self.runner.histograms())  # head_seconds, batch_seconds
        s["batch_wait"] = self.batcher.waits.snapshot()
        return s


# Ray records every call for its dashboard and state API (`ray list tasks`, `ray timeline`): off for the calls made
# per frame, whose records cost a call 4-26% of its CPU on both sides (benchmarks/README.md, "Ray task events"),
# and for the controller's polls every tick (stats, where), whose records grew the GCS's memory by ~4 KB a call
# (+12 MB in a 33-minute soak, until Ray's cap of task events kept in the GCS).
# HYDRAVISION_RAY_TASK_EVENTS=1 in the driver's environment records them again (to debug with Ray's tools).
TASK_EVENTS = os.environ.get("HYDRAVISION_RAY_TASK_EVENTS") == "1"


@ray.remote(max_restarts=-1)
class InferenceActor:
    """Ray shell around InferenceService. Async, so many cameras' calls wait in one batch at once."""

    def __init__(self, checkpoint: str | bytes, device: str = "auto", precision: str = "auto", max_batch: int = 8,
                 max_wait_ms: float = 5.0, threads: int | None = None, score_threshold: float | None = None,
                 compile: bool = False, max_pending: int | None = None, max_pending_per_camera: int | None = None,
                 backend: str = "auto", adapt_batch: bool = False, per_node: int = 1, expect: dict | None = None):
        """``checkpoint``: a path this node can read, or the checkpoint's bytes (the controller put them in
        Ray's object store, which copies them to whichever node runs this replica, also after a restart).
        ``threads`` unset: this node's cores shared by the ``per_node`` replicas placed on it. ``expect``: see
        InferenceService."""
        log_to_stderr(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.service = InferenceService(checkpoint, device, precision, max_batch, max_wait_ms,
                                        threads or max(1, usable_cores() // per_node), score_threshold, compile,
                                        max_pending, max_pending_per_camera, backend, adapt_batch, expect,
                                        exit_on_device_loss=True)

    @ray.method(enable_task_events=TASK_EVENTS)
    async def infer(self, request: FrameRequest) -> dict[str, HeadArrays]:
        return await self.service.infer(request)

    @ray.method(enable_task_events=TASK_EVENTS)
    async def infer_image(self, image: np.ndarray, heads: list[str] | None, camera: str = "",
                          timeout_s: float | None = None, max_wait_s: float | None = None) -> dict[str, HeadArrays]:
        """What StreamActors call: only the image (a Ray-serialized array, no pickled objects), the heads and
        three scalars cross the process boundary; a round trip is ~1.6 ms shorter than with the whole
        FrameRequest. ``timeout_s`` is relative: the deadline is taken on this process's monotonic clock on
        arrival, never compared with another machine's clock. ``max_wait_s``: this frame's bound on the
        wait for its batch to fill (a camera over its frame-age budget sends 0)."""
        return await self.service.infer_image(image, heads, camera, timeout_s, max_wait_s)

    @ray.method(enable_task_events=TASK_EVENTS)
    async def infer_images(self, images: list[np.ndarray], heads: list[str] | None, camera: str = "",
                           timeout_s: float | None = None,
                           max_wait_s: float | None = None) -> list[dict[str, HeadArrays] | BaseException]:
        """``infer_image`` for the frames a camera has ready at once (a lossless camera's backlog): one call
        instead of one per frame; a call costs ~1.5 ms of CPU on each side whatever it carries."""
        return await self.service.infer_images(images, heads, camera, timeout_s, max_wait_s)

    @ray.method(enable_task_events=TASK_EVENTS)
    async def infer_groups(self, groups: list[tuple]) -> list[list[dict[str, HeadArrays] | BaseException]]:
        """``infer_images`` of several cameras in one call (a CallMerger's: the cameras of one process)."""
        return await self.service.infer_groups(groups)

    async def info(self) -> dict:
        return self.service.info()

    @ray.method(enable_task_events=TASK_EVENTS)
    async def stats(self) -> dict:
        return self.service.stats()

    @ray.method(enable_task_events=TASK_EVENTS)
    async def model_stats(self) -> dict:
        """``stats``, under the name a camera process that runs its own model answers it too (App.model_holders)."""
        return self.service.stats()

    async def ping(self) -> int:
        return os.getpid()

    @ray.method(enable_task_events=TASK_EVENTS)
    async def where(self) -> dict:
        """The node and process this replica runs in (it moves when its node dies)."""
        return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}


def local_copy(data: bytes) -> Path:
    """The checkpoint's bytes as a file of this node's temp dir (or its cache: _own_folder), named by content:
    replicas and restarts on one node share it, and a half-written file is never read (written aside, then
    renamed). In a folder of this user's own (``_own_folder``), and taken only when it holds exactly these bytes:
    in the shared temp dir another user's copy (mode 0600) of the same checkpoint made every start fail to read it,
    and a file of the same size planted there by anyone was loaded as the model."""
    path = _own_folder() / f"hydravision-{hashlib.sha256(data).hexdigest()[:20]}.safetensors"
    if not _holds(path, data):
        _prune_copies(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        # removed when the write fails (a full disk): Ray restarts the replica, and each try left one behind
        with written_aside(path, Path(tmp)), os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        with contextlib.suppress(OSError):  # its use, beside it (see COPY_MAX_AGE_DAYS)
            _used_mark(path).touch()
    return path


def _used_mark(copy: Path) -> Path:
    return copy.with_name(copy.name + ".used")


# A copy neither written nor taken for this long is removed when another is written: each checkpoint a service ran
# left its copy on every node for good (a model retrained weekly: one more copy a week), and each write killed
# half-way (an OOM kill, a lost node) its part. A copy taken is marked in a file beside it (``.used``), not by its own
# mtime: a replica loading it compares it with what it loaded (cached_export), and a neighbour's touch read as the
# file replaced; by its mtime alone, a copy a restart was loading after 30 days of use was removed under it. A copy
# removed that a later restart wants is written again from the object store. The ONNX cache's age (models/export.py;
# not imported here: torch).
COPY_MAX_AGE_DAYS = 30


def _prune_copies(folder: Path) -> None:
    """Removes the checkpoint copies in ``folder`` neither written nor taken for COPY_MAX_AGE_DAYS (with their
    ``.used`` mark, and marks left without a copy), and parts of copies (``.part``: a write that died) older than
    STALE_ASIDE_S (a day)."""
    now = time.time()

    def age(path: Path) -> float:  # since it was written, or last taken
        mark = _used_mark(path)
        return now - max(path.lstat().st_mtime, mark.lstat().st_mtime if mark.exists() else 0.0)

    for path in folder.glob("*.part"):
        with contextlib.suppress(OSError):  # removed meanwhile by another replica's start
            if now - path.lstat().st_mtime > STALE_ASIDE_S:
                path.unlink()
    for path in folder.glob("hydravision-*.safetensors"):
        with contextlib.suppress(OSError):
            if age(path) > COPY_MAX_AGE_DAYS * 86400.0:
                path.unlink()
                _used_mark(path).unlink(missing_ok=True)
    for mark in folder.glob("hydravision-*.safetensors.used"):
        if not mark.with_name(mark.name.removesuffix(".used")).exists():
            mark.unlink(missing_ok=True)


def _own_folder() -> Path:
    """``hydravision-<uid>`` in the temp dir, mode 0700 (made so if this user's and open to others). Where that name
    is another user's, or no plain folder (a symlink, a file), ``checkpoints`` in the cache ($HYDRAVISION_CACHE,
    default ~/.cache/hydravision) instead: anyone on the node can take the name first, and refusing then stopped
    every replica start (a fresh temp folder per start left a copy of the checkpoint behind at each restart of a
    crash-looping replica)."""
    uid = os.getuid()
    tmp = Path(tempfile.gettempdir()) / f"hydravision-{uid}"
    if _usable(tmp, uid):
        return tmp
    try:  # only now: Path.home() raises where HOME is unset and the uid has no passwd entry
        cache = Path(os.environ.get("HYDRAVISION_CACHE", "~/.cache/hydravision")).expanduser() / "checkpoints"
    except RuntimeError:
        cache = None
    if cache is not None and _usable(cache, uid):
        return cache
    raise RuntimeError(f"{tmp}, where replicas keep their copy of the checkpoint, is not a folder of this user "
                       f"(uid {uid}), and the cache ({cache or '$HYDRAVISION_CACHE'}) cannot be used either: remove "
                       "it, or give the service another temp dir ($TMPDIR)")


def _usable(folder: Path, uid: int) -> bool:
    """Whether ``folder`` is (made) a plain folder of ``uid``'s, closed to others."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            return False
        if st.st_mode & 0o077:
            folder.chmod(0o700)
        return True
    except OSError:  # FileExistsError of a file by that name, a folder that cannot be written
        return False


def _holds(path: Path, data: bytes, chunk: int = 2**20) -> bool:
    """Whether the file holds exactly ``data``, read a MiB at a time (a whole read doubled a large model in memory)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            # this user's own file and no other name of it (a hard link planted while the folder was open to others
            # could change under the model's load)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1 or st.st_size != len(data):
                return False
            view = memoryview(data)
            return all(f.read(chunk) == view[at:at + chunk] for at in range(0, len(data), chunk))
    except OSError:
        return False


# The most image bytes one call carries: what Ray sends inside the call rather than through the object store
# (pipeline/app.py sets max_direct_call_object_size to it); a camera's group of ready frames stays below it.
CALL_BYTES = 2 * 2**20

InferMany = Callable[[list[FrameRequest]], Awaitable[list["dict[str, HeadArrays] | BaseException"]]]


def service_call(service: Any) -> InferMany:
    """An awaitable infer function for either an actor handle or an in-process InferenceService: the frames
    of one camera (same heads and timeouts) in one call; each frame's result or exception, in order."""
    def call(requests: list[FrameRequest]) -> Awaitable:
        r = requests[0]
        if isinstance(service, InferenceService):
            return service.infer_images([q.image for q in requests], r.heads, r.camera, r.timeout_s, r.max_wait_s)
        if len(requests) == 1:  # the common case of a live camera: a list of one back, not a Ray call of a list
            return _listed(service.infer_image.remote(r.image, r.heads, r.camera, r.timeout_s, r.max_wait_s))
        return service.infer_images.remote([q.image for q in requests], r.heads, r.camera, r.timeout_s, r.max_wait_s)
    return call


async def _listed(result: Awaitable) -> list:
    return [await result]


class CallMerger:
    """The frames that the cameras of one process send to the same replica at about the same moment go in one
    Ray call (``infer_groups``): a call costs ~1.5 ms of CPU on each side whatever it carries. A call waits
    until every camera using this merger has frames in it, or ``window_s`` at most; a frame that may not wait
    for its batch (``max_wait_s`` 0: its camera is over its frame-age budget) goes at once, with what waits."""

    def __init__(self, replica: Any, window_s: float = 0.001):
        self.replica, self.window_s = replica, window_s
        self.cameras: set[str] = set()  # cameras sending through this merger
        self.waiting: list[tuple[list[FrameRequest], asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.calls = self.frames = 0
        self._single = service_call(replica)

    def call(self, requests: list[FrameRequest]) -> Awaitable[list]:
        """InferMany for one camera's frames: each frame's result or exception, in order."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((requests, future))
        waiting = {r[0].camera for r, _ in self.waiting}
        if waiting >= self.cameras or any(r.max_wait_s == 0 for r in requests):
            self._flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.window_s, self._flush)
        return future

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        groups, self.waiting = self.waiting, []
        if not groups:
            return
        self.calls += 1
        self.frames += sum(len(r) for r, _ in groups)
        if len(groups) == 1:  # the call of before: one camera's list, listed like a group's
            result = _listed(self._single(groups[0][0]))
        else:
            result = self.replica.infer_groups.remote([([q.image for q in r], r[0].heads, r[0].camera, r[0].timeout_s,
                                                         r[0].max_wait_s) for r, _ in groups])
        asyncio.ensure_future(self._deliver(result, [f for _, f in groups]))

    @staticmethod
    async def _deliver(result: Awaitable, futures: list[asyncio.Future]) -> None:
        try:
            lists = await result
        except BaseException as e:  # the whole call failed (replica died, cancelled): every camera hears it
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for f, results in zip(futures, lists):
            if not f.done():  # a camera that stopped waiting (timeout) has cancelled its future
                f.set_result(results)
