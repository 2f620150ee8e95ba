"""Edge cases of the inference worker found by an audit (round 12): each test failed before its fix."""

from __future__ import annotations

import pytest

from workers.inference import Batcher


@pytest.mark.parametrize("max_batch", [0, -1])
def test_a_batcher_whose_batches_could_take_nothing_is_refused_naming_max_batch(max_batch):
    """Batcher(max_batch=0) was accepted (its queue bounds were checked, not the batch's): its first request then
    sent the collector round a loop that took empty batches without ever awaiting, so the event loop froze for
    good, every other task on it (a camera process's cameras, the caller's own timeout) with it."""
    with pytest.raises(ValueError, match=rf"max_batch must be >= 1, got {max_batch}"):
        Batcher(lambda items: items, max_batch=max_batch)
