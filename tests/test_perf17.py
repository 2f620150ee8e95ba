"""Round 17's cuts of a camera process's CPU per frame (benchmarks/README.md, "CPU per frame, round 17"):

- a status's latency percentiles by ``statistics.quantiles`` ("inclusive": numpy's default method), the values
  ``np.percentile`` gave;
- a camera's frames reach the Batcher through ``Batcher.enqueue`` (a future each, no coroutine and Task per frame):
  the same results in the same order, an error per frame, a withdrawn call's requests dropped uncomputed.
"""

from __future__ import annotations

import asyncio
import collections
import random

import numpy as np
import pytest

from workers.inference import Batcher, InferenceOverloaded, InferenceService
from workers.stream import CameraPipeline


def test_a_status_latencies_are_those_np_percentile_gave():
    """``CameraPipeline._latency_percentiles`` over its window: what the status said before the cut."""
    pipe = CameraPipeline.__new__(CameraPipeline)
    rng = random.Random(3)
    for n in (1, 5, 10, 11, 57, 120):
        pipe.latencies = collections.deque((100.0 + k * 0.04, rng.uniform(20, 900)) for k in range(n))
        now = 100.0 + n * 0.04
        recent = [ms for t, ms in pipe.latencies if t >= now - pipe.LATENCY_WINDOW_S]
        if len(recent) < pipe.LATENCY_MIN_SAMPLES:
            recent = [ms for t, ms in list(pipe.latencies)[-pipe.LATENCY_MIN_SAMPLES:]
                      if t >= now - pipe.LATENCY_MAX_AGE_S]
        want = np.percentile(np.array(recent), (50, 95)).tolist()
        assert pipe._latency_percentiles(now) == pytest.approx(want, rel=1e-12, abs=0)
    pipe.latencies = collections.deque([(0.0, 5.0)])
    assert pipe._latency_percentiles(1000.0) is None


def _service(handler, **batcher) -> InferenceService:
    service = InferenceService.__new__(InferenceService)  # no model: the Batcher's path alone
    service.batcher, service.calls = Batcher(handler, **batcher), 0
    return service


def test_infer_images_answers_each_frame_in_order_through_enqueue(monkeypatch):
    seen: list[list[int]] = []

    async def no_coroutine_per_frame(self, *args, **kwargs):  # review: nothing failed with a Task per frame back
        raise AssertionError("a camera's frames went through Batcher.submit (a coroutine and a Task each)")

    monkeypatch.setattr(Batcher, "submit", no_coroutine_per_frame)

    def handler(items):
        seen.append([int(image[0]) for image, _ in items])
        return [{"frame": int(image[0]), "heads": heads} for image, heads in items]

    async def main():
        service = _service(handler, max_batch=8, max_wait_ms=5)
        calls = [service.infer_images([np.array([c * 10 + k]) for k in range(3)], ["people"], f"cam{c}", 5.0, None)
                 for c in range(3)]
        calls.append(service.infer_groups([([np.array([90]), np.array([91])], None, "cam9", 5.0, None)]))
        out = await asyncio.gather(*calls)
        service.batcher.close()
        return out

    out = asyncio.run(main())
    for c in range(3):
        assert out[c] == [{"frame": c * 10 + k, "heads": ["people"]} for k in range(3)]
    assert out[3] == [[{"frame": 90, "heads": None}, {"frame": 91, "heads": None}]]
    assert sorted(f for batch in seen for f in batch) == [0, 1, 2, 10, 11, 12, 20, 21, 22, 90, 91]


def test_a_shed_frame_is_that_frames_error_and_a_withdrawn_call_is_dropped_uncomputed():
    computed: list[int] = []

    def handler(items):
        computed.extend(int(image[0]) for image, _ in items)
        return [int(image[0]) for image, _ in items]

    async def main():
        service = _service(handler, max_batch=2, max_wait_ms=1000, max_pending_per_camera=2)
        # three frames of one camera, two may wait: the oldest is shed, the call still answers the other two
        shed = await asyncio.wait_for(service.infer_images([np.array([k]) for k in range(3)], None, "a", 5.0, None),
                                      5.0)
        # a call withdrawn while its frames wait (its caller's wait_for ran out): dropped, never computed
        blocked = _service(handler, max_batch=8, max_wait_ms=10_000)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(blocked.infer_images([np.array([50]), np.array([51])], None, "b", 60.0, None), 0.05)
        await asyncio.sleep(0)
        stats = blocked.batcher.stats()
        service.batcher.close()
        blocked.batcher.close()
        return shed, stats

    shed, stats = asyncio.run(main())
    assert isinstance(shed[0], InferenceOverloaded) and shed[1:] == [1, 2]
    assert stats["cancelled"] == 2 and stats["queue_depth"] == 0
    assert 50 not in computed and 51 not in computed


def test_submit_still_answers_one_item():
    async def main():
        batcher = Batcher(lambda items: [x * 2 for x in items], max_batch=4, max_wait_ms=1)
        out = await asyncio.gather(*(batcher.submit(k, f"c{k}") for k in range(5)))
        batcher.close()
        return out

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
