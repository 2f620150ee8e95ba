"""workers/publish.py and workers/snapshots.py: a Publisher that met Redis down at its start, class names that
cv2's font cannot draw on a snapshot."""
from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from servers import RedisServer
from test_publish import FAST, det, frames_of, wait_until
from workers.analytics_settings import SnapshotConfig
from workers.publish import Publisher, keys
from workers.snapshots import Snapshotter, labelled

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("queued_before_start", [False, True])
def test_a_publisher_that_met_redis_down_at_start_deletes_its_dedup_state_at_close(redis_server: RedisServer,
                                                                                   queued_before_start: bool) -> None:
    """Redis down when a camera starts (compose starting both at once): the first PING, or the first batch, that
    failed to connect was taken for a send that may still reach Redis, so close kept the dedup state of every
    camera started so (one key a day per camera). Neither carried anything to Redis."""
    redis_server.kill()
    pub = Publisher(redis_server.url, **{**FAST, "max_backoff_s": 0.05})
    try:
        if queued_before_start:
            pub.publish_detections(det(frame=0))
        pub.start()
        wait_until(lambda: pub.stats()["retries"] >= 2, timeout=10)
        redis_server.start()
        pub.publish_detections(det(frame=1))
        assert pub.flush(10)
        pub.close(5.0)
        client = redis_server.client()
        assert frames_of(client) == ([0, 1] if queued_before_start else [1])
        assert not client.exists(keys("hv").publisher(pub.id))
    finally:
        pub.close(1.0)


def test_a_class_name_the_font_cannot_draw_is_drawn_as_its_class_id() -> None:
    """cv2's font draws '?' for a character it has no glyph for: every class of a model with Chinese names was
    labelled "??" on the snapshot, pedestrians and vehicles alike."""
    det = sv.Detections(xyxy=np.array([[10, 30, 60, 80], [70, 30, 120, 80], [130, 30, 180, 80]], float),
                        confidence=np.ones(3), class_id=np.array([0, 1, 2]), tracker_id=np.array([5, 6, -1]),
                        data={"class_name": np.array(["行人", "车辆", "car"])})
    assert list(labelled(det, 1.0).data["label"]) == ["#5 class 0", "#6 class 1", "car"]
    fields = Snapshotter(SnapshotConfig()).render(np.zeros((100, 200, 3), np.uint8), (200, 100), [det], None,
                                                  1, 0.1, 0.0)
    assert fields is not None and fields["bytes"] > 0


def test_a_long_outage_backs_off_without_overflowing_redis_py_5_0s_backoff(redis_server: RedisServer,
                                                                             monkeypatch) -> None:
    """redis-py 5.0 (pyproject allows it) computed FullJitterBackoff as base * 2**failures, which no float holds past
    ~1024 failures in a row: the writer thread raised OverflowError on every later failure of the outage."""
    import random

    from redis.backoff import FullJitterBackoff

    monkeypatch.setattr(FullJitterBackoff, "compute",  # redis-py 5.0's, unbounded
                        lambda self, failures: random.uniform(0, min(self._cap, self._base * 2 ** failures)))
    redis_server.kill()
    pub = Publisher(redis_server.url, **{**FAST, "max_backoff_s": 0.01})
    try:
        pub.start()
        pub._failures = 5000  # an outage of hours, without waiting for it
        wait_until(lambda: pub.stats()["retries"] >= 3, timeout=10)
        redis_server.start()
        pub.publish_detections(det(frame=1))
        assert pub.flush(10), pub.stats()
        assert frames_of(redis_server.client()) == [1]
    finally:
        pub.close(1.0)


def test_the_recovery_line_says_the_messages_dropped_during_the_outage(redis_server: RedisServer, caplog) -> None:
    """A buffer that overflowed during an outage was counted (stats, publisher_dropped events, /metrics) but no log
    line said so: the operator read "writes to Redis again" as a clean recovery."""
    import logging

    redis_server.kill()
    pub = Publisher(redis_server.url, **{**FAST, "max_backoff_s": 0.05, "buffer": 5}, name="hydravision-cam7")
    try:
        pub.start()
        pub.publish_detections(det(frame=0))
        wait_until(lambda: pub.stats()["retries"] >= 1, timeout=10)  # the outage has begun
        for frame in range(1, 20):
            pub.publish_detections(det(frame=frame))
        redis_server.start()
        with caplog.at_level(logging.WARNING, logger="workers.publish"):
            assert pub.flush(10)
        recovered = [r.getMessage() for r in caplog.records if "writes to Redis again" in r.getMessage()]
        assert len(recovered) == 1 and "hydravision-cam7" in recovered[0], recovered
        assert f"{pub.stats()['dropped']} messages dropped meanwhile" in recovered[0], recovered
        assert pub.stats()["dropped"] == 15
    finally:
        pub.close(1.0)
