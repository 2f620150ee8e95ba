"""workers/publish.py and workers/redis_writer.py against a real redis-server: a refusal whose report was lost
with an entry that left the buffer, hash values redis-py cannot send, the dedup state evicted by a volatile-*
maxmemory policy. Sends are changed through hooks on WriterThread._execute, never by racing a sleep."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import redis

from servers import RedisServer
from test_publish import FAST, det, frames_of, wait_until
from workers.publish import Publisher, WriterThread, keys

pytestmark = pytest.mark.timeout(30)


class AfterSend:
    """The next send that carries commands reaches Redis, then ``then()`` runs (in the writer thread) and its
    reply is lost (a socket timeout)."""

    def __init__(self, monkeypatch, then: Callable[[], None]) -> None:
        self.left = 1
        plain = WriterThread._execute

        def execute(writer: WriterThread, commands: list[tuple]) -> list[Any]:
            replies = plain(writer, commands)
            if self.left and commands:
                self.left -= 1
                then()
                raise redis.exceptions.TimeoutError("Timeout reading from socket")
            return replies

        monkeypatch.setattr(WriterThread, "_execute", execute)


def test_a_refused_message_that_left_the_buffer_after_a_lost_reply_counts_as_rejected(any_redis: RedisServer,
                                                                                      monkeypatch, caplog) -> None:
    """Frame 1 of camera "bad" (WRONGTYPE) is refused in a send whose reply is lost; before the resend the buffer
    overflows and it leaves the queue. The resend starts after it, the script forgot the refusal, and frame 1
    was counted sent: the counters over-reported and nothing said it never reached Redis."""
    client = any_redis.client()
    client.set(keys("hv").detections("bad"), "not a stream")
    pub = Publisher(any_redis.url, buffer=3, **FAST).start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()  # scripts loaded, connected

        def overflow() -> None:  # lobby 1, bad 1, lobby 2 leave the queue of 3, their send's reply not yet read
            for frame in (3, 4, 5):
                pub.publish_detections(det(frame=frame))

        AfterSend(monkeypatch, overflow)
        with pub._lock:  # one send
            for camera, frame in (("lobby", 1), ("bad", 1), ("lobby", 2)):
                pub.publish_detections(det(camera=camera, frame=frame))
        assert pub.flush()
        stats = pub.stats()
        assert frames_of(client) == [0, 1, 2, 3, 4, 5] and stats["retries"] == 1
        assert (stats["sent"], stats["rejected"], stats["dropped"], stats["queued"]) == (6, 1, 0, 0)
        assert "WRONGTYPE" in stats["last_error"] and "Redis rejected 1 message" in caplog.text
        pub.publish_detections(det(frame=6))  # now heard of: the refusal is forgotten
        assert pub.flush() and client.hget(keys("hv").publisher(pub.id), "rejected") is None
        assert (pub.stats()["sent"], pub.stats()["rejected"]) == (7, 1)
    finally:
        pub.close(1.0)


def test_set_hash_refuses_or_converts_what_redis_py_cannot_send(redis_server: RedisServer) -> None:
    """A None, bool or numpy value failed the whole pipelined send of the process (redis-py's DataError at
    packing): the other camera sharing the writer lost that round, and camera a wrote nothing more (its hash is
    put back for every retry); a numpy float64 was written as 'np.float64(1.5)'. Now a value redis-py cannot
    send is refused at the call, naming key and field, and numpy numbers are written as numbers."""
    client = redis_server.client()
    w = WriterThread(redis_server.url, connect_timeout_s=0.5, socket_timeout_s=0.5)
    a, b = w.publisher(max_backoff_s=0.05).start(), w.publisher(max_backoff_s=0.05).start()
    try:
        with w.work:  # one send for both
            a.set_hash("hv:cam:a:counts", {"v": np.int64(1), "f64": np.float64(1.5), "f32": np.float32(0.25),
                                           "i": 7, "s": "x", "b": b"\xff"})
            b.publish_detections(det(camera="b", frame=0))
            b.set_hash("hv:cam:b:counts", {"v": 1})
        assert b.flush(3) and a.flush(3)  # camera a's numpy numbers no longer fail camera b's send
        assert frames_of(client, "b") == [0] and client.hgetall("hv:cam:b:counts") == {b"v": b"1"}
        assert client.hgetall("hv:cam:a:counts") == {b"v": b"1", b"f64": b"1.5", b"f32": b"0.25", b"i": b"7",
                                                     b"s": b"x", b"b": b"\xff"}
        for value in (None, True, np.bool_(False), [1, 2]):
            with pytest.raises(TypeError, match=r"hv:cam:a:counts: field 'zone:door' is "):
                a.set_hash("hv:cam:a:counts", {"v": 1, "zone:door": value})
        with pytest.raises(TypeError, match=r"hv:cam:a:counts: field name is NoneType"):
            a.set_hash("hv:cam:a:counts", {None: 1})
        b.publish_detections(det(camera="b", frame=1))
        assert b.flush(3) and a.flush(3) and frames_of(client, "b") == [0, 1]
        assert client.hgetall("hv:cam:a:counts")[b"f64"] == b"1.5"  # the refused values replaced nothing
        assert a.stats()["retries"] == b.stats()["retries"] == 0
    finally:
        a.close(1.0)
        b.close(1.0)
        w.close(1.0)


def test_a_dedup_state_evicted_by_a_volatile_policy_is_reported(any_redis: RedisServer, monkeypatch,
                                                                caplog) -> None:
    """Under maxmemory-policy volatile-lru the Publisher's state (the one key with a TTL) is evicted between a
    send whose reply was lost and its resend: the resend wrote frames 1 and 2 again, and nothing said so. It
    cannot be told afterwards what the lost send wrote; the Publisher now says it in its log and last_error."""
    admin = any_redis.client()
    admin.config_set("maxmemory-policy", "volatile-lru")
    pub = Publisher(any_redis.url, **FAST).start()
    state = keys("hv").publisher(pub.id)
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush() and admin.ttl(state) > 0

        def memory_full() -> None:  # the send was applied; Redis goes over maxmemory (evicting the state) and back
            admin.config_set("maxmemory", "1")
            admin.config_set("maxmemory", "0")

        AfterSend(monkeypatch, memory_full)
        with pub._lock:  # one send
            for frame in (1, 2):
                pub.publish_detections(det(frame=frame))
        assert pub.flush(10)
        assert admin.info("stats")["evicted_keys"] == 1
        assert frames_of(admin) == [0, 1, 2, 1, 2]  # the resend wrote them again: nothing tells what was applied
        error = pub.stats()["last_error"]
        assert f"publisher state {state} was gone" in error and "volatile-*" in error
        assert f"{state} was gone" in caplog.text
    finally:
        admin.config_set("maxmemory", "0")
        pub.close(1.0)


def publish_in_bursts(pub: Publisher) -> None:
    """Frames 1-120 while writes fail, 4 at a time: a retry carries each before it leaves the buffer."""
    for burst in range(30):
        retries = pub.stats()["retries"]
        for i in range(4):
            pub.publish_detections(det(frame=1 + burst * 4 + i))
        wait_until(lambda: pub.stats()["retries"] > retries, timeout=10)


def test_messages_dropped_while_redis_is_unreachable_are_counted_and_not_kept(redis_server: RedisServer) -> None:
    """Every retry while Redis was down raised the highest seq "a send may have carried", so each message that
    left the full buffer was kept (with its JSON) as maybe in Redis until Redis answered again: memory grew with
    the outage (4900 messages held with a buffer of 100 in a probe) and `dropped` said 0 until Redis was back.
    Now a retry PINGs first, and what no send could have carried is counted dropped at once."""
    pub = Publisher(redis_server.url, buffer=5, **{**FAST, "max_backoff_s": 0.05}).start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        redis_server.kill()
        publish_in_bursts(pub)
        stats = pub.stats()
        assert stats["queued"] == 5 and stats["dropped"] >= 120 - 5 - 5  # the first failed send carried <= 5
        assert len(pub._undecided) <= 5
        redis_server.start()
        assert pub.flush(10)
        stats = pub.stats()
        assert stats["sent"] + stats["dropped"] + stats["rejected"] == 121 and stats["queued"] == 0
        assert frames_of(redis_server.client()) == list(range(116, 121))
    finally:
        pub.close(1.0)
