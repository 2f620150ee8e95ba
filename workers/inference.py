"""Batched HydraNet inference: a plain ModelRunner and Batcher, and the thin InferenceActor around them.

The actor holds no per-camera state, so any replica can serve any camera and a restarted
replica loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

import numpy as np
import ray
import torch

from models.checkpoint import load_checkpoint
from models.fuse import fuse_conv_bn
from workers.frames import FrameRequest, HeadArrays

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA by default (tensor cores); full precision on CPU, where half is slower."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16


class ModelRunner:
    """Loads a checkpoint once and runs batches: backbone once, each head on the frames that want it."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, score_threshold: float | None = None, max_batch: int = 8,
                 fuse_bn: bool = True, compile: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        self.autocast = pick_autocast(precision, self.device)
        self.model, _ = load_checkpoint(checkpoint, device=self.device)
        if fuse_bn:  # serving copy only: one conv instead of conv + BatchNorm, same numbers
            fuse_conv_bn(self.model.backbone)
        self.model.to(memory_format=torch.channels_last)  # NHWC convs are faster on oneDNN and cuDNN
        if compile:  # optional: minutes of compilation at start, then fewer kernel launches (mostly a GPU win)
            self.model.backbone = torch.compile(self.model.backbone, dynamic=True)
            self.model.neck = torch.compile(self.model.neck, dynamic=True)
        self.score_threshold = score_threshold
        self.input_size = tuple(self.model.config.input_size)
        self.heads = {name: self.model.head_classes(name) for name in self.model.head_names}
        # Page-locked staging buffer: host->GPU copies can then run asynchronously (non_blocking).
        self._staging = None
        if self.device.type == "cuda":
            self._staging = torch.empty((max_batch, 3, *self.input_size), dtype=torch.uint8).pin_memory()
        self.stats = {"batches": 0, "frames": 0, "backbone_frames": 0, "head_frames": collections.Counter(),
                      "seconds": 0.0, "cpu_seconds": 0.0, "batch_sizes": collections.Counter()}

    def info(self) -> dict:
        return {"input_size": list(self.input_size), "heads": self.heads, "device": str(self.device),
                "autocast": str(self.autocast) if self.autocast else "fp32"}

    def _to_device(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        n = len(images)
        if self._staging is not None and n <= self._staging.shape[0]:
            staged = self._staging[:n]
            for i, img in enumerate(images):
                staged[i].copy_(torch.from_numpy(img))
            return staged.to(self.device, non_blocking=True)
        return torch.from_numpy(np.stack(images)).to(self.device)

    def run(self, images: Sequence[np.ndarray], heads: Sequence[Sequence[str] | None]) -> list[dict[str, HeadArrays]]:
        """images: (3, H, W) uint8 letterboxed; heads: per image (None = all). Per image {head: arrays}."""
        t0, c0 = time.perf_counter(), time.process_time()
        x = self._to_device(images).contiguous(memory_format=torch.channels_last)
        results = self.model.detect(x, heads, score_threshold=self.score_threshold, autocast_dtype=self.autocast)
        out = [{name: det.numpy() for name, det in r.items()} for r in results]
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["cpu_seconds"] += time.process_time() - c0  # all threads of this process, torch's included
        self.stats["batches"] += 1
        self.stats["frames"] += len(images)
        self.stats["backbone_frames"] += int(x.shape[0])
        self.stats["batch_sizes"][len(images)] += 1
        for r in results:
            self.stats["head_frames"].update(r.keys())
        return out


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Collects items from concurrent callers into batches of up to ``max_batch``, waiting at most
    ``max_wait_ms`` after the oldest arrival, and runs ``handler`` on a worker thread.

    Written by hand because Ray Serve's ``@serve.batch`` only works inside a Serve deployment.
    Every caller gets exactly one result or the batch's exception; none hangs. While a batch
    runs, the next one fills, so the model is never idle when work is waiting.
    """

    def __init__(self, handler: Callable[[list[T]], list[R]], max_batch: int = 8, max_wait_ms: float = 5.0):
        self.handler, self.max_batch, self.max_wait = handler, max_batch, max_wait_ms / 1000
        self._pending: collections.deque[_Pending[T]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")

    async def submit(self, item: T) -> R:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._collect())
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, fut))
        self._wake.set()
        return await fut

    async def _collect(self) -> None:
        assert self._wake is not None
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._pending[0].arrived + self.max_wait
            while len(self._pending) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            await self._run(batch)

    async def _run(self, batch: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
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
        self.runner = ModelRunner(checkpoint, device, precision, threads, score_threshold, max_batch, compile=compile)
        self.batcher: Batcher[FrameRequest, dict[str, HeadArrays]] = Batcher(self._run_batch, max_batch, max_wait_ms)

    def _run_batch(self, requests: list[FrameRequest]) -> list[dict[str, HeadArrays]]:
        return self.runner.run([r.image for r in requests], [r.heads for r in requests])

    async def infer(self, request: FrameRequest) -> dict[str, HeadArrays]:
        return await self.batcher.submit(request)

    def info(self) -> dict:
        return self.runner.info()

    def stats(self) -> dict:
        s = dict(self.runner.stats)
        s["head_frames"] = dict(s["head_frames"])
        s["batch_sizes"] = {int(k): v for k, v in s["batch_sizes"].items()}
        s["pid"] = os.getpid()
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
    return lambda request: service.infer.remote(request)
