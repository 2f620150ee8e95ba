"""workers/publish.py: a Publisher's dedup state `{prefix}:publisher:{id}` after a Redis restart. The operator's run
(Redis restarted once, 20 s down, back empty) left two publishers' states a day after their clean closes: the
first send after the restart failed at connecting (its connection closed, nothing listening), which counted as a
send whose reply was lost, and nothing settled it. A send that never left is not one; one whose reply was lost to a
restart is settled once the next write finds that Redis lost its data. A reply lost on a Redis that lives on keeps
the state (tests/test_publish_edges9.py), and so does a close with messages undelivered."""
from __future__ import annotations

import logging

import pytest

from servers import RedisServer
from test_publish import BACKOFF, det, frames_of, wait_until
from workers.publish import Publisher

pytestmark = pytest.mark.timeout(60)
LOST = "Redis lost its data"
FROZEN_REPLY = dict(connect_timeout_s=2.0, socket_timeout_s=1.0)  # a frozen Redis's reply is lost in 1 s


def delivered(pub: Publisher, frame: int) -> None:
    pub.publish_detections(det(frame=frame))
    assert pub.flush(timeout=10)


def test_a_send_that_could_not_connect_after_a_restart_leaves_no_state(redis_server: RedisServer, caplog) -> None:
    """Redis stopped (SIGTERM) after frame 0: the next send found its connection closed and the reconnect refused,
    so nothing of it left; it counted as a send whose reply was lost ("Redis lost its data ... with what the send
    whose reply was lost wrote" once Redis was back) and the clean close kept the state a day."""
    caplog.set_level(logging.WARNING, logger="workers.publish")
    pub = Publisher(redis_server.url, connect_timeout_s=2.0, socket_timeout_s=2.0, **BACKOFF).start()
    try:
        delivered(pub, 0)
        redis_server.stop()
        pub.publish_detections(det(frame=1))
        wait_until(lambda: pub.stats()["retries"] >= 1, timeout=10)
        redis_server.start()  # the same port, empty
        assert pub.flush(timeout=10)
        delivered(pub, 2)
    finally:
        pub.close()
    admin = redis_server.client()
    assert frames_of(admin) == [1, 2] and pub.stats()["sent"] == 3
    assert not admin.exists(pub.keys.publisher(pub.id))
    assert LOST not in caplog.text  # no send of it was lost with Redis's data


def lose_a_reply_to_a_restart(server: RedisServer, pub: Publisher) -> None:
    """Frame 0 delivered; frame 1's send leaves for a frozen Redis and its reply times out; that Redis dies with
    the send unread and comes back empty; the resend delivers frame 1, and the write finds the state lost."""
    delivered(pub, 0)
    server.pause()
    pub.publish_detections(det(frame=1))
    wait_until(lambda: pub.stats()["retries"] >= 1, timeout=10)  # sent, and no reply
    server.kill()
    server.start()
    assert pub.flush(timeout=10)
    delivered(pub, 2)


def test_a_reply_lost_to_a_restart_is_settled_once_redis_says_it_lost_its_data(redis_server: RedisServer,
                                                                              caplog) -> None:
    """The send whose reply was lost went with the Redis that had it: none can still apply, so a clean close
    deletes the state as it does after any clean run."""
    caplog.set_level(logging.WARNING, logger="workers.publish")
    pub = Publisher(redis_server.url, **FROZEN_REPLY, **BACKOFF).start()
    try:
        lose_a_reply_to_a_restart(redis_server, pub)
        assert LOST in caplog.text
    finally:
        pub.close()
    admin = redis_server.client()
    assert frames_of(admin) == [1, 2] and pub.stats()["sent"] == 3
    assert not admin.exists(pub.keys.publisher(pub.id))


def test_a_close_with_messages_undelivered_keeps_the_state_with_its_ttl(redis_server: RedisServer) -> None:
    """Guard: the same publisher, settled after the restart, closes while Redis refuses its writes (out of
    memory): its state stays, to expire a day after its last write."""
    pub = Publisher(redis_server.url, **FROZEN_REPLY, **BACKOFF).start()
    admin = redis_server.client()
    try:
        lose_a_reply_to_a_restart(redis_server, pub)
        admin.config_set("maxmemory", 1)
        pub.publish_detections(det(frame=3))
        wait_until(lambda: pub.stats()["failing"], timeout=10)
    finally:
        pub.close(timeout=1.0)
    assert pub.stats()["queued"] == 1
    admin.config_set("maxmemory", 0)
    assert frames_of(admin) == [1, 2]
    assert 86_000 < admin.ttl(pub.keys.publisher(pub.id)) <= 86_400
