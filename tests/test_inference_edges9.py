"""Edge cases of the inference replica, its model runner and its adaptive batch size found by an audit
(round 9): each test failed before its fix."""

from __future__ import annotations

import asyncio

import pytest

from workers.batch_size import BatchSizer
from workers.inference import Batcher


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError (a RuntimeError, named so), without a GPU."""


def serve(handler, sizer: BatchSizer, cameras: int = 24, frames: int = 12) -> list[bool]:
    """Runs ``cameras`` callers of ``frames`` requests each, one in flight per camera, through a Batcher with
    ``sizer``; whether each request got its own result back."""
    async def main() -> list[bool]:
        b: Batcher = Batcher(handler, max_batch=32, max_wait_ms=2, sizer=sizer)

        async def camera(cid: str) -> list[bool]:
            ok = []
            for i in range(frames):
                try:
                    ok.append(await b.submit(i, cid) == i)
                except Exception:
                    ok.append(False)
            return ok

        results = await asyncio.gather(*(camera(f"cam{c}") for c in range(cameras)))
        b.close()
        return [r for rs in results for r in rs]

    return asyncio.run(main())


def torch_out_of_memory() -> None:
    """torch's own error where the CPU's memory runs out (a RuntimeError, not torch.OutOfMemoryError)."""
    import torch

    torch.empty(2**60, dtype=torch.uint8)


def raise_error(error: Exception) -> None:
    raise error


@pytest.mark.parametrize("out_of_memory", [
    lambda: raise_error(OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (a test's)")),
    lambda: raise_error(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for "
                                     "requested buffer of size 123456 (a test's)")),
    torch_out_of_memory,
], ids=["torch-cuda", "onnxruntime", "torch-cpu"])
def test_an_adopted_batch_size_that_runs_out_of_memory_steps_down_instead_of_failing_every_batch(out_of_memory,
                                                                                                   caplog):
    """The limit (8) fitted until another process took the GPU's memory: from then on every batch of 8 ran out
    of memory, and failed() only acted on a probe's larger size, so every camera's frames failed for good."""
    sizer = BatchSizer(ceiling=32, probe_after=1000)
    calls: list[int] = []

    def handler(items: list) -> list:
        calls.append(len(items))
        if len(items) > 4:
            out_of_memory()
        return items

    ok = serve(handler, sizer)
    assert sizer.limit <= 4 and sizer.ceiling <= 4, sizer.stats()
    assert sum(1 for n in calls if n > 4) == 1, calls  # one batch failed, then it stepped down
    assert ok.count(False) <= 8, calls
    assert "batches take at most 4 from now on" in caplog.text  # the operator is told, once


def test_a_probe_batch_that_fails_without_running_out_of_memory_keeps_the_ceiling():
    """Any error in a probe's batch (a bad frame, a passing fault) lowered the ceiling to the limit for the rest
    of the run, so a GPU never tried the larger batches that would have served it faster."""
    sizer = BatchSizer(ceiling=32, probe_after=2, samples=2)
    failures = [0]

    def handler(items: list) -> list:
        if len(items) > 8 and not failures[0]:
            failures[0] += 1
            raise ValueError("one camera's odd frame (a test's)")
        return items

    serve(handler, sizer, frames=40)
    assert failures[0] == 1 and sizer.ceiling == 32, sizer.stats()


def test_a_failed_batch_lets_go_of_its_tensors_while_its_callers_still_hold_the_error():
    """A batch that raised (a GPU out of memory) kept everything its frames had made (the batch on the device, its
    features) alive through the error's traceback, as long as any caller held the error; the next batch, started
    at once, then ran out of memory too (PyTorch's FAQ: "My out of memory exception handler can't allocate
    memory")."""
    import weakref

    class Features:
        """Stands in for the device tensors of the failed call."""

    made: list[weakref.ref] = []

    def handler(items: list) -> list:
        features = Features()
        made.append(weakref.ref(features))
        raise OutOfMemoryError("CUDA out of memory (a test's)")

    async def main() -> BaseException:
        b: Batcher = Batcher(handler, max_batch=2, max_wait_ms=1)
        try:
            await b.submit(0, "cam0")
        except OutOfMemoryError as e:
            return e
        finally:
            b.close()
        raise AssertionError("the batch did not fail")

    error = asyncio.run(main())
    assert "out of memory" in str(error) and error.__traceback__ is not None  # the error and where it came from
    assert made and made[0]() is None, "the failed call's objects are still alive"


def test_out_of_memory_in_batches_that_never_fill_the_limit_steps_it_down():
    """Six cameras against an adopted limit of 8: the batches leave part-full, and once another process took the
    GPU's memory every batch of 6 ran out of it; the step-down looked only at batches of the limit or more."""
    sizer = BatchSizer(ceiling=32, start=8)
    sizer.failed(6, RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert sizer.limit == 4 and sizer.ceiling == 4, sizer.stats()
