"""The model runner's batch size over a service's life, found by an audit (round 10): each test failed before its
fix."""

from __future__ import annotations

from workers.batch_size import BatchSizer


def test_the_record_of_limit_changes_stays_bounded_while_the_count_goes_on():
    """16 faster than 8 on trial and slower as the limit: the step up is tried and undone every ~1000 full batches
    at the longest backoff, for the service's life, and every change was kept in a list that grew with it (~1900
    entries a million batches, ~1 MB a day at 100 batches/s). The count in the stats still counts them all."""
    sizer = BatchSizer(ceiling=16)
    for _ in range(80_000):
        size = sizer.allowed()
        cost = 8.0 if size == 8 else (7.0 if sizer.limit == 8 else 9.0)
        sizer.record(size, size * cost / 1000, full=True)
    assert len(sizer.changes) <= 64  # batch_size.KEPT_CHANGES
    assert sizer.stats()["batch_limit_changes"] > 128
    assert sizer.changes[-2:] in ([(8, 16), (16, 8)], [(16, 8), (8, 16)])  # the latest, in order
