"""How large the Batcher lets a batch grow: the smallest size that gives the best measured frames/s.

A batch always takes what is waiting, up to a limit. A larger limit only pays while the model's time per
frame falls with the batch (a GPU: 16 -> 32 can halve it); beyond that it adds latency for nothing (this
project's 2-core CPU: 8.1 ms per frame at 8, 7.1 at 16, 8.3 at 32). Where that point lies depends on the
device, the model, the heads asked for and what else runs on the machine, so the limit is found by measuring
the live batches rather than configured:

- the limit starts at ``start`` (8) and stays a power of two within ``[1, ceiling]`` (``ceiling`` itself
  when that is not one);
- a **probe** happens only under load: after ``probe_after`` batches in a row that were full at the limit,
  the next batches may take twice as many. Once ``samples`` of those full larger batches have run, the larger
  size is kept if its median time per frame beats the limit's by more than ``gain``, both before the probe
  and in ``samples`` batches at the limit after it (a load that passed may have slowed the earlier); if not,
  the next probe waits twice as long (up to 64x). A probe that the backlog does not fill within ``samples``
  batches ends;
- the limit goes back to the size it was raised from (half of it, bar a ceiling that is not a power of two)
  when the recent batches at that size ran faster per frame by more than ``gain`` (a wrong step up, or a
  machine whose load changed); a step up undone is a refused probe: the next probe waits twice as long as
  the one that made it did;
- a probe's batch that fails ends the probe; out of memory at any size also brings the ceiling, and the
  limit where it is not yet, below the size that failed (a limit that fitted can stop fitting on a
  GPU: more heads asked for, another process took memory);
- the first batch of each size is not counted: oneDNN and cuDNN build their kernels for a new shape on its
  first call (0.2-1 s on this CPU), which says nothing about the steady cost;
- a probe's batches count only once ``steady(size)`` says that size runs at its steady cost: OpenVINO runs
  the sizes it runs most compiled for their exact shape (``ExactShapes``), 11-20% cheaper than its dynamic
  shape, and the probed size, new, would otherwise be timed at the dynamic shape against the limit's exact
  one. Asking starts the compile; after ``4 * samples`` probe batches the probe counts anyway.

Only batches that were full at the size asked for count: a batch of 5 taken because only 5 waited says how
fast 5 frames run, not whether a limit of 8 is right.
"""

from __future__ import annotations

import collections
import statistics
from typing import Callable

MAX_BACKOFF = 64  # the longest wait between probes, in multiples of probe_after
KEPT_CHANGES = 64  # the latest changes of the limit kept in ``changes``; ``changed`` counts them all


class BatchSizer:
    def __init__(self, ceiling: int, start: int = 8, probe_after: int = 16, samples: int = 4,
                 gain: float = 0.07, window: int = 8, steady: Callable[[int], bool] | None = None):
        if ceiling < 1 or start < 1:
            raise ValueError(f"ceiling and start must be >= 1, got {ceiling} and {start}")
        self.ceiling, self.probe_after, self.samples, self.gain = ceiling, probe_after, samples, gain
        self.limit = min(_power_of_two_at_most(start), ceiling)
        self.probing: int | None = None  # the larger size on trial, while a probe runs
        self.changes: list[tuple[int, int]] = []  # (from, to), the latest KEPT_CHANGES changes of the limit
        self.changed = 0  # changes of the limit so far
        # the limits each adopted probe replaced (the sizes a shrink has timings of), with the probes' backoff then
        self._raised_from: list[tuple[int, int]] = []
        self._costs: dict[int, collections.deque[float]] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self._seen: set[int] = set()
        self._streak = 0  # full batches in a row at the limit
        self._backoff = 1  # the next probe waits probe_after * backoff full batches
        self._probe_misses = 0
        self._steady = steady or (lambda size: True)
        self._probe_warming = 0  # probe batches run before the probed size was steady
        self._confirming: int | None = None  # a probe's size that won, while the limit is timed again

    def allowed(self) -> int:
        """The largest batch the Batcher may take now."""
        return self.probing or self.limit

    def record(self, size: int, seconds: float, full: bool) -> None:
        """One batch ran: ``size`` frames in ``seconds``; ``full``: it was as large as ``allowed()`` was
        when it was taken (the backlog filled it)."""
        first = size not in self._seen
        self._seen.add(size)
        if size == self.probing and not self._probe_is_steady():
            self._probe_warming += 1
            return  # not yet what this size costs: neither a sample nor a miss
        if full and not first:
            self._costs[size].append(seconds / size)
        if self.probing is not None:
            self._after_probe_batch(size, full)
        elif self._confirming is not None:
            self._after_confirming_batch(size, full)
        elif full and size == self.limit:
            self._streak += 1
            self._maybe_shrink()
            if self._streak >= self.probe_after * self._backoff and self.limit < self.ceiling:
                self.probing = min(2 * self.limit, self.ceiling)
                self._costs[self.probing].clear()  # its old samples may come from another load
                self._probe_misses = self._probe_warming = 0
                self._steady(self.probing)  # asking starts getting it there (OpenVINO: its compile)
        else:
            self._streak = 0  # the load does not fill the batches: no reason to grow them

    def failed(self, size: int, error: BaseException | None = None) -> None:
        """A batch of ``size`` raised ``error``. A probe's batch (larger than the limit) ends the probe. Out of
        memory (a GPU's) brings the limit and the ceiling below ``size``, whatever size failed (batches that leave
        part-full never reach the limit), since each try of that size would fail its batch's frames: the probed
        size is not tried again, and a limit that no longer fits (more heads asked for, another process took
        memory) steps down rather than fail every batch for good.
        Another error (one bad frame) says nothing of the size: the ceiling stays."""
        if self.probing is not None and size > self.limit:
            self._end_probe(adopt=False)
        if size > 1 and out_of_memory(error):
            below = min(self.limit, _power_of_two_at_most(size - 1))
            self.ceiling = min(self.ceiling, below)
            if below < self.limit:
                self._raised_from = [(lower, b) for lower, b in self._raised_from if lower < below]
                self._set_limit(below)
            if self._confirming is not None:  # a larger size's win, being confirmed: larger than the ceiling now
                self.probing, self._confirming = self._confirming, None
            if self.probing is not None:  # the limit ran out of memory during a probe: the larger size would too
                self._end_probe(adopt=False)

    def _probe_is_steady(self) -> bool:
        assert self.probing is not None
        return self._probe_warming >= 4 * self.samples or self._steady(self.probing)

    def _after_probe_batch(self, size: int, full: bool) -> None:
        assert self.probing is not None
        if not (full and size == self.probing):
            self._probe_misses += 1
            if self._probe_misses >= self.samples:  # the backlog does not fill the larger size: stop trying
                self._end_probe(adopt=False)
            return
        probe, current = self._costs[self.probing], self._costs[self.limit]
        if len(probe) >= self.samples:
            if not (current and self._faster(probe, current)):
                self._end_probe(adopt=False)
                return
            # It won against the limit's timings from before the probe. A burst of load then (another process
            # busy) made those slow, and the halving rule compares with them later, so a wrong step up was never
            # undone: the limit is timed afresh, and the probe's size kept only if it beats those too.
            self._confirming, self.probing = self.probing, None
            current.clear()

    def _after_confirming_batch(self, size: int, full: bool) -> None:
        assert self._confirming is not None
        probe, current = self._costs[self._confirming], self._costs[self.limit]
        if full and size == self.limit and len(current) >= self.samples:
            self.probing, self._confirming = self._confirming, None
            self._end_probe(self._faster(probe, current))

    def _faster(self, a: collections.deque[float], b: collections.deque[float]) -> bool:
        """Whether the median cost per frame of ``a`` beats that of ``b`` by more than ``gain``."""
        return statistics.median(a) < (1 - self.gain) * statistics.median(b)

    def _end_probe(self, adopt: bool) -> None:
        assert self.probing is not None
        if adopt:
            self._raised_from.append((self.limit, self._backoff))
            self._set_limit(self.probing)
            self._backoff = 1
        else:
            self._backoff = min(MAX_BACKOFF, 2 * self._backoff)
        self.probing, self._streak = None, 0

    def _maybe_shrink(self) -> None:
        # Full batches run at the limit or a probe's size, so below the limit only the limits it was raised from
        # have timings (half of a ceiling of 12 is a 6 that never ran).
        if not self._raised_from:
            return
        lower, backoff = self._raised_from[-1]
        here, there = self._costs[self.limit], self._costs[lower]
        if len(here) >= self.samples and len(there) >= self.samples and \
                statistics.median(there) < (1 - self.gain) * statistics.median(here):
            self._raised_from.pop()
            self._set_limit(lower)
            self._backoff = min(MAX_BACKOFF, 2 * backoff)  # a step up undone is a refused probe: retried less often

    def _set_limit(self, limit: int) -> None:
        """Changes the limit and records it. Only the latest changes are kept: a step up that does not last
        recurs every ~1000 full batches at the longest backoff for as long as the service runs, and the list of
        every change grew with it (~1 MB a day at 100 batches/s)."""
        self.changes.append((self.limit, limit))
        del self.changes[:-KEPT_CHANGES]
        self.changed += 1
        self.limit, self._streak = limit, 0

    def stats(self) -> dict:
        """For the replica's stats(): the limit now, the probe running (0: none), the changes so far, and the
        median milliseconds per frame by batch size (full batches only)."""
        return {"batch_limit": self.limit, "batch_probe": self.probing or 0, "batch_limit_changes": self.changed,
                "ms_per_frame": {size: round(1000 * statistics.median(c), 3)
                                 for size, c in sorted(self._costs.items()) if c}}


def out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error`` is a device or host running out of memory: torch's ``OutOfMemoryError`` (CUDA, MPS) or
    its CPU allocator's, ONNX Runtime's and OpenVINO's (their messages say so; none of them imported here), cuBLAS's
    and cuDNN's (``CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)``: a RuntimeError torch raises when
    the GPU's memory is full as a library creates its handle or workspace), or Python's MemoryError."""
    if error is None:
        return False
    text = str(error).lower()
    return (isinstance(error, MemoryError) or "OutOfMemory" in type(error).__name__
            or any(words in text for words in ("out of memory", "allocate memory", "bad_alloc",
                                                "status_alloc_failed")))


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)
