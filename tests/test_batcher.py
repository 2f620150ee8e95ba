"""The dynamic batcher: batch limits, waiting, one result per caller, errors reach every caller; a bounded
queue that sheds fairly across cameras, takes cameras in turn, and never computes a request whose caller
has given up (expired or cancelled)."""

import asyncio
import pickle
import random
import threading
import time

import pytest

from workers.inference import Batcher, BatcherClosed, InferenceExpired, InferenceOverloaded


def run(coro):
    return asyncio.run(coro)


async def until(predicate, timeout: float = 10.0) -> None:
    """Waits for a state, with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("state not reached before the deadline")
        await asyncio.sleep(0.002)


class GatedHandler:
    """A handler whose first batch blocks until ``release()``: the queue builds up behind it meanwhile.
    Records every batch it computes."""

    def __init__(self):
        self.batches: list[list] = []
        self.started, self.released = threading.Event(), threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        assert self.released.wait(30), "the test never released the first batch"
        return items

    def release(self):
        self.released.set()

    @property
    def seen(self) -> list:
        return [i for b in self.batches for i in b]


async def hold_first_batch(b: Batcher, handler: GatedHandler, item="first", camera="") -> asyncio.Future:
    """Submits ``item`` and returns once its batch is running (and blocked)."""
    fut = asyncio.ensure_future(b.submit(item, camera))
    await until(handler.started.is_set)
    return fut


def test_full_batches_when_many_callers_wait():
    sizes = []

    def handler(items):
        sizes.append(len(items))
        time.sleep(0.01)
        return [i * 10 for i in items]

    async def main():
        b = Batcher(handler, max_batch=4, max_wait_ms=50)
        results = await asyncio.gather(*[b.submit(i) for i in range(10)])
        b.close()
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert sizes == [4, 4, 2]


def test_a_lone_request_waits_at_most_max_wait():
    async def main():
        b = Batcher(lambda items: items, max_batch=8, max_wait_ms=30)
        t0 = time.perf_counter()
        r = await b.submit("x")
        b.close()
        return r, time.perf_counter() - t0

    result, elapsed = run(main())
    assert result == "x"
    assert 0.025 <= elapsed < 0.5


def test_next_batch_fills_while_one_runs():
    """Requests arriving during a slow batch are served together right after it, not one by one."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=8, max_wait_ms=0)
        first = await hold_first_batch(b, handler, 0)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await until(lambda: b.stats()["queue_depth"] == 5)
        handler.release()
        await asyncio.gather(first, *rest)
        b.close()

    run(main())
    assert [len(batch) for batch in handler.batches] == [1, 5]


def gate_again(handler: GatedHandler) -> threading.Event:
    """Makes the handler's next batch block again until the returned event is set."""
    handler.released, handler.started = threading.Event(), threading.Event()
    return handler.released


def test_a_backlogged_camera_just_answered_is_waited_for():
    """When a batch ends, a camera that had several requests in it (a backlog) sends its next frames at once:
    the next batch waits for them, however long the requests already waiting have waited (before, a split
    such as 6 + 2 repeated itself: the 2 that waited left alone while the 6 were being answered)."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=4, max_wait_ms=300)

        async def backlogged():  # two frames at a time; the next two as soon as it has the results
            await asyncio.gather(b.submit("a1", "A"), b.submit("a2", "A"))
            return await asyncio.gather(b.submit("a3", "A"), b.submit("a4", "A"))

        a = asyncio.ensure_future(backlogged())
        await until(handler.started.is_set)
        waiting = asyncio.ensure_future(b.submit("b", "B"))
        await until(lambda: b.stats()["queue_depth"] == 1)
        await asyncio.sleep(0.4)  # longer than max_wait
        handler.release()
        await asyncio.gather(a, waiting)
        b.close()

    run(main())
    assert [sorted(batch) for batch in handler.batches] == [["a1", "a2"], ["a3", "a4", "b"]]


def test_a_camera_with_one_frame_in_the_batch_and_an_impatient_request_are_not_waited_for():
    """A live camera under a light load has one frame in a batch and its next comes when the camera takes it:
    a request that waited behind that batch leaves when it ends. A request that may not wait (max_wait_s 0: a
    camera over its frame-age budget) leaves at once even while a backlogged camera is expected back."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=4, max_wait_ms=300)
        first = await hold_first_batch(b, handler, "c", camera="C")
        behind = asyncio.ensure_future(b.submit("d", "D"))
        await until(lambda: b.stats()["queue_depth"] == 1)
        await asyncio.sleep(0.4)
        t0 = time.monotonic()
        handler.release()
        await asyncio.gather(first, behind)
        light = time.monotonic() - t0

        release = gate_again(handler)
        pair = asyncio.ensure_future(asyncio.gather(b.submit("e1", "E"), b.submit("e2", "E")))
        await until(handler.started.is_set)  # [e1, e2] runs (after its 300 ms wait for company)
        impatient = asyncio.ensure_future(b.submit("f", "F", max_wait_s=0))
        await until(lambda: b.stats()["queue_depth"] == 1)
        t0 = time.monotonic()
        release.set()
        await asyncio.gather(pair, impatient)
        urgent = time.monotonic() - t0
        b.close()
        return light, urgent

    light, urgent = run(main())
    assert [sorted(batch) for batch in handler.batches] == [["c"], ["d"], ["e1", "e2"], ["f"]]
    assert light < 0.25 and urgent < 0.25, (light, urgent)  # waited for: 0.3 s


def test_a_backlogged_camera_that_does_not_come_back_is_waited_for_max_wait_at_most():
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=4, max_wait_ms=200)
        pair = asyncio.ensure_future(asyncio.gather(b.submit("x1", "X"), b.submit("x2", "X")))
        await until(handler.started.is_set)
        lone = asyncio.ensure_future(b.submit("lone", "L"))
        await until(lambda: b.stats()["queue_depth"] == 1)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        handler.release()
        await pair
        await lone
        took = time.monotonic() - t0
        b.close()
        return took

    took = run(main())
    assert [sorted(batch) for batch in handler.batches] == [["x1", "x2"], ["lone"]]
    assert 0.18 <= took < 2.0, took


@pytest.mark.parametrize(
    "handler, error",
    [
        (lambda items: 1 / 0, ZeroDivisionError),
        (lambda items: items[:-1], RuntimeError),  # wrong number of results
    ],
)
def test_failed_batch_fails_every_caller_and_the_batcher_goes_on(handler, error):
    calls = []

    def flaky(items):
        calls.append(len(items))
        if len(calls) == 1:
            return handler(items)
        return items

    async def main():
        b = Batcher(flaky, max_batch=3, max_wait_ms=20)
        first = await asyncio.gather(*[b.submit(i) for i in range(3)], return_exceptions=True)
        second = await b.submit("ok")
        b.close()
        return first, second

    first, second = run(main())
    assert all(isinstance(r, error) for r in first)
    assert second == "ok"


def test_bound_holds_under_a_flood_from_one_camera_and_the_other_camera_is_served():
    """One camera floods while the model is busy: the queue never exceeds its bounds, the flood sheds its
    own OLDEST requests, and the quiet camera's requests are all computed. The old batcher queued all."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=2, max_wait_ms=0, max_pending=5, max_pending_per_camera=4)
        first = await hold_first_batch(b, handler, ("flood", -1), "flood")
        flood: dict[int, asyncio.Future] = {}
        quiet: dict[int, asyncio.Future] = {}

        def send(camera, store, n):
            for _ in range(n):
                i = len(store)
                store[i] = asyncio.ensure_future(b.submit((camera, i), camera))

        send("flood", flood, 20)   # flood reaches its own cap (4), then sheds its own oldest
        send("quiet", quiet, 1)    # room left in the global cap (5)
        send("flood", flood, 20)
        send("quiet", quiet, 1)    # queue full: the fullest camera (flood) loses its oldest, not quiet
        send("flood", flood, 10)
        await until(lambda: b.stats()["shed"] + b.stats()["queue_depth"] == 52)  # all 52 submitted
        mid = b.stats()
        handler.release()
        outcomes = {**{k: v for k, v in zip(
            [("flood", i) for i in flood], await asyncio.gather(*flood.values(), return_exceptions=True))},
            **{k: v for k, v in zip(
                [("quiet", i) for i in quiet], await asyncio.gather(*quiet.values(), return_exceptions=True))}}
        await first
        final = b.stats()
        b.close()
        return mid, final, outcomes

    mid, final, outcomes = run(main())
    shed = [k for k, v in outcomes.items() if isinstance(v, InferenceOverloaded)]
    served = [k for k, v in outcomes.items() if not isinstance(v, BaseException)]
    assert len(shed) + len(served) == len(outcomes) == 52  # every caller answered, exactly once
    assert [k for k in served if k[0] == "quiet"] == [("quiet", 0), ("quiet", 1)]
    assert [k for k in served if k[0] == "flood"] == [("flood", 47), ("flood", 48), ("flood", 49)]  # the newest
    assert all(outcomes[k] == k for k in served)
    assert mid["queue_depth"] == 5 and mid["queue_depth_max"] == 5  # the first batch was running, not queued
    assert final["shed"] == len(shed) == 47 and final["queue_depth"] == 0
    assert all(isinstance(outcomes[k], InferenceOverloaded) and outcomes[k].camera == "flood" for k in shed)
    assert "queue full" in str(outcomes[shed[0]])


def test_a_batch_takes_cameras_in_turn_not_one_chatty_camera():
    """Round-robin by camera, oldest first within a camera: a chatty camera's backlog does not fill the
    next batch while three other cameras wait. The old batcher (first in, first out) did exactly that."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=4, max_wait_ms=0)
        first = await hold_first_batch(b, handler, ("chatty", -1), "chatty")
        futures = [asyncio.ensure_future(b.submit(("chatty", i), "chatty")) for i in range(10)]
        futures += [asyncio.ensure_future(b.submit((cam, 0), cam)) for cam in ("a", "b", "c")]
        await until(lambda: b.stats()["queue_depth"] == 13)
        handler.release()
        await asyncio.gather(first, *futures)
        b.close()

    run(main())
    assert handler.batches[1] == [("chatty", 0), ("a", 0), ("b", 0), ("c", 0)]
    assert handler.batches[2:] == [[("chatty", i) for i in range(1, 5)], [("chatty", i) for i in range(5, 9)],
                                   [("chatty", 9)]]


def test_expired_requests_are_not_computed_and_are_counted():
    """A request whose caller's timeout passes while it waits is answered with InferenceExpired (a
    TimeoutError) at its deadline, even while the model is busy, and the handler never sees it."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=8, max_wait_ms=0)
        first = await hold_first_batch(b, handler)
        t0 = time.monotonic()
        short = asyncio.ensure_future(b.submit("short", "cam", timeout_s=0.05))
        patient = asyncio.ensure_future(b.submit("patient", "cam", timeout_s=30))
        forever = asyncio.ensure_future(b.submit("forever", "cam"))
        with pytest.raises(InferenceExpired) as info:
            await asyncio.wait_for(short, 10)
        waited = time.monotonic() - t0
        assert not handler.released.is_set()  # answered while the first batch still ran
        handler.release()
        results = await asyncio.gather(first, patient, forever)
        stats = b.stats()
        b.close()
        return info.value, waited, results, stats

    error, waited, results, stats = run(main())
    assert isinstance(error, TimeoutError) and error.camera == "cam"
    assert 0.04 <= waited < 5
    assert results == ["first", "patient", "forever"]
    assert "short" not in handler.seen
    assert stats["expired"] == 1 and stats["queue_depth"] == 0


def test_a_request_already_past_its_deadline_when_the_batch_forms_is_not_computed():
    """The loop was too busy to run the expiry timer: the batch itself checks deadlines."""
    handler = GatedHandler()
    handler.release()

    async def main():
        b = Batcher(handler, max_batch=8, max_wait_ms=0)
        late = asyncio.ensure_future(b.submit("late", "cam", timeout_s=0.01))
        ok = asyncio.ensure_future(b.submit("ok", "cam"))
        await asyncio.sleep(0)  # both queued
        time.sleep(0.05)  # blocks the event loop on purpose: the timer and the batcher wake up together
        results = await asyncio.gather(late, ok, return_exceptions=True)
        stats = b.stats()
        b.close()
        return results, stats

    (late, ok), stats = run(main())
    assert isinstance(late, InferenceExpired) and ok == "ok"
    assert handler.seen == ["ok"]
    assert stats["expired"] == 1


def test_cancelled_requests_are_not_computed_and_are_counted():
    """In-process callers time out with asyncio.wait_for, which cancels the request: it leaves the queue
    at once (freeing its place in the bound) and is never computed."""
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=8, max_wait_ms=0)
        first = await hold_first_batch(b, handler)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit("timed-out", "cam"), 0.05)
        cancelled = asyncio.ensure_future(b.submit("cancelled", "cam"))
        kept = asyncio.ensure_future(b.submit("kept", "cam"))
        await until(lambda: b.stats()["queue_depth"] == 2)
        cancelled.cancel()
        await until(lambda: b.stats()["queue_depth"] == 1)
        stats_before = b.stats()
        handler.release()
        results = await asyncio.gather(first, kept)
        b.close()
        return stats_before, results

    stats, results = run(main())
    assert results == ["first", "kept"]
    assert handler.seen == ["first", "kept"]
    assert stats["cancelled"] == 2


def test_close_answers_every_waiting_and_running_caller():
    handler = GatedHandler()

    async def main():
        b = Batcher(handler, max_batch=8, max_wait_ms=0)
        running = await hold_first_batch(b, handler)
        waiting = [asyncio.ensure_future(b.submit(i, "cam")) for i in range(3)]
        await until(lambda: b.stats()["queue_depth"] == 3)
        b.close()
        results = await asyncio.wait_for(asyncio.gather(running, *waiting, return_exceptions=True), 10)
        handler.release()  # lets the worker thread finish
        return results

    assert all(isinstance(r, BatcherClosed) for r in run(main()))


def test_every_request_is_computed_or_counted_exactly_once_under_random_load():
    """Many cameras, a slow model, random timeouts and cancellations: each request is either computed or
    counted in exactly one of shed / expired / cancelled, every caller is answered, and the bounds hold."""
    rng = random.Random(12)
    computed = []

    def handler(items):
        computed.extend(items)
        time.sleep(0.002)
        return items

    async def main():
        b = Batcher(handler, max_batch=4, max_wait_ms=1, max_pending=12, max_pending_per_camera=5)
        futures = []
        for i in range(600):
            camera = f"cam-{rng.randrange(6) if rng.random() < 0.5 else 0}"  # cam-0 is chatty
            timeout = rng.choice([None, 0.0, 0.005, 0.05, 1.0])
            f = asyncio.ensure_future(b.submit(i, camera, timeout))
            futures.append(f)
            if rng.random() < 0.1:  # after the request is queued: waiting, running or answered by then
                asyncio.get_running_loop().call_later(rng.choice([0, 0.001, 0.004]), f.cancel)
                cancelling.add(i)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)
        stats = b.stats()
        b.close()
        return outcomes, stats

    cancelling: set[int] = set()
    outcomes, stats = run(main())
    assert len(computed) == len(set(computed))
    assert len(computed) + stats["shed"] + stats["expired"] + stats["cancelled"] == 600
    # A caller cancelled after its answer was set sees CancelledError instead: only those may differ.
    assert not any(isinstance(o, asyncio.CancelledError) for i, o in enumerate(outcomes) if i not in cancelling)
    for cls, counted in ((InferenceOverloaded, stats["shed"]), (InferenceExpired, stats["expired"])):
        answered = sum(isinstance(o, cls) for o in outcomes)
        assert counted > 0 and counted - len(cancelling) <= answered <= counted
    assert stats["cancelled"] > 0
    assert stats["queue_depth"] == 0 and stats["queue_depth_max"] <= 12
    for i, o in enumerate(outcomes):  # a result is the caller's own item, never another's
        assert o == i or isinstance(o, (InferenceOverloaded, InferenceExpired, asyncio.CancelledError))


@pytest.mark.parametrize("cls", [InferenceOverloaded, InferenceExpired, BatcherClosed])
def test_rejections_pickle_with_their_camera(cls):
    """They cross Ray from the InferenceActor to the StreamActor."""
    e = pickle.loads(pickle.dumps(cls("lobby", "why it was not computed")))
    assert type(e) is cls and e.camera == "lobby" and str(e) == "why it was not computed"


@pytest.mark.parametrize("kwargs, error", [
    ({"max_pending": -1}, "max_pending"),
    ({"max_pending_per_camera": -2}, "max_pending"),
    ({"max_pending": 0}, "max_pending"),
])
def test_bad_bounds_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        Batcher(lambda items: items, **kwargs)


def test_a_failing_batcher_answers_its_waiting_callers(monkeypatch):
    """A bug in the batching loop itself must not leave callers waiting forever."""
    async def main():
        b = Batcher(lambda items: items, max_batch=8, max_wait_ms=0)
        monkeypatch.setattr(b, "_take_batch", lambda limit: 1 / 0)
        return await asyncio.wait_for(asyncio.gather(*[b.submit(i, "cam") for i in range(3)],
                                                     return_exceptions=True), 10)

    results = run(main())
    assert all(isinstance(r, BatcherClosed) and "ZeroDivisionError" in str(r) for r in results)
