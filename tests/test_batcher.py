"""The dynamic batcher: batch limits, waiting, one result per caller, errors reach every caller."""

import asyncio
import time

import pytest

from workers.inference import Batcher


def run(coro):
    return asyncio.run(coro)


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
    sizes = []

    def handler(items):
        sizes.append(len(items))
        time.sleep(0.1)
        return items

    async def main():
        b = Batcher(handler, max_batch=8, max_wait_ms=0)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.02)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await asyncio.gather(first, *rest)
        b.close()

    run(main())
    assert sizes == [1, 5]


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
