"""Edge cases of the inference worker, its adaptive batch size and the frame-age budget found by an audit
(round 6): each test failed before its fix."""

from __future__ import annotations

from workers.batch_size import BatchSizer


def test_a_step_up_that_is_undone_is_retried_less_and_less_often():
    """16 measured faster than 8 while it was probed and confirmed, slower once it was the limit (what the
    probe saw was not what the limit gets): the limit went back to 8 and 16 was probed again 16 batches later,
    adopted and undone again, for ever (a change every ~29 batches, each a new compiled shape). An undone step
    is a refused probe: the next one waits twice as long."""
    sizer = BatchSizer(ceiling=16)
    changes_by = []  # the number of changes so far, after each batch
    for _ in range(3000):
        size = sizer.allowed()
        cost = 8.0 if size == 8 else (7.0 if sizer.limit == 8 else 9.0)
        sizer.record(size, size * cost / 1000, full=True)
        changes_by.append(len(sizer.changes))
    assert changes_by[1499] >= 4, sizer.changes  # it is tried, and undone
    assert changes_by[-1] <= 16 and changes_by[-1] - changes_by[1499] <= 4, sizer.changes
