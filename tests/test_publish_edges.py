"""workers/publish.py's edges against a real redis-server: a Publisher closed while its send is held mid-round,
a reply lost after Redis applied the send. Sends are held or failed through hooks on WriterThread._execute,
never by racing a sleep."""
from __future__ import annotations

import threading
from typing import Any, NamedTuple

import pytest
import redis

from servers import RedisServer
from test_publish import FAST, det, frames_of, stream_json
from workers.publish import Publisher, WriterThread, keys
from workers.redis_writer import BatchWriter

pytestmark = pytest.mark.timeout(20)


class HeldSend:
    """Holds every send of WriterThreads at its start until released; ``entered`` is set once one waits."""

    def __init__(self, monkeypatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        plain = WriterThread._execute

        def execute(writer: WriterThread, commands: list[tuple]) -> list[Any]:
            self.entered.set()
            assert self.release.wait(10), "the test never released the send"
            return plain(writer, commands)

        monkeypatch.setattr(WriterThread, "_execute", execute)


def test_closing_while_a_send_is_held_counts_its_overflowed_messages_once(redis_server: RedisServer,
                                                                         monkeypatch) -> None:
    """A send carries frames 1-3; while it is held they overflow the buffer (undecided: did the send reach
    Redis?). close() gives up waiting for the send and detaches; the send then lands. The frames were counted
    dropped at detach and sent when the send settled: counted twice."""
    pub = Publisher(redis_server.url, buffer=3, **FAST).start()
    pub.publish_detections(det(frame=0))
    assert pub.flush()  # scripts loaded, connected
    held = HeldSend(monkeypatch)
    with pub._lock:  # frames 1-3 in one round
        for frame in (1, 2, 3):
            pub.publish_detections(det(frame=frame))
    assert held.entered.wait(5)
    for frame in (4, 5, 6):  # the buffer of 3 overflows: 1-3 leave the queue, their send still held
        pub.publish_detections(det(frame=frame))
    pub.close(timeout=0.2)  # gives up on the held send
    held.release.set()
    pub._writer._thread.join(5)
    assert not pub._writer.alive
    stats = pub.stats()
    assert frames_of(redis_server.client()) == [0, 1, 2, 3]
    print(stats)
    assert stats["sent"] + stats["dropped"] + stats["rejected"] + stats["queued"] == 7
    assert (stats["sent"], stats["dropped"], stats["queued"]) == (4, 0, 3)


def test_a_publisher_closed_during_a_send_queues_no_report_that_pushes_a_message_out(redis_server: RedisServer,
                                                                                     monkeypatch) -> None:
    """Frames overflow the buffer while a send is held and the Publisher is closed: when the send lands, its
    publisher_dropped report went into the closed Publisher's queue (never to be sent), pushing out a frame
    and counting itself as a queued message."""
    pub = Publisher(redis_server.url, buffer=3, **FAST).start()
    pub.publish_detections(det(frame=0))
    assert pub.flush()
    held = HeldSend(monkeypatch)
    pub.publish_detections(det(frame=1))
    assert held.entered.wait(5)
    for frame in (2, 3, 4, 5):  # 1 (carried by the held send) and 2 (never sent) leave the buffer
        pub.publish_detections(det(frame=frame))
    pub.close(timeout=0.2)
    held.release.set()
    pub._writer._thread.join(5)
    assert not pub._writer.alive
    stats = pub.stats()
    assert frames_of(redis_server.client()) == [0, 1]
    assert (stats["sent"], stats["dropped"], stats["queued"]) == (2, 1, 3)  # frame 2; frames 3, 4, 5 wait


class LostReply:
    """The next ``times`` sends of WriterThreads reach Redis, and their replies are lost (a socket timeout)."""

    def __init__(self, monkeypatch, times: int = 1) -> None:
        self.left = times
        plain = WriterThread._execute

        def execute(writer: WriterThread, commands: list[tuple]) -> list[Any]:
            replies = plain(writer, commands)
            if self.left and commands:
                self.left -= 1
                raise redis.exceptions.TimeoutError("Timeout reading from socket")
            return replies

        monkeypatch.setattr(WriterThread, "_execute", execute)


def test_a_message_redis_refused_in_a_send_whose_reply_was_lost_counts_as_rejected(any_redis: RedisServer,
                                                                                   monkeypatch, caplog) -> None:
    """The resend skips what the lost send applied, and the refusal of frame 1 (WRONGTYPE) went with the lost
    reply: frame 1 was counted sent, and nothing said it never reached Redis."""
    client = any_redis.client()
    client.set(keys("hv").detections("bad"), "not a stream")
    pub = Publisher(any_redis.url, **FAST).start()
    pub.publish_detections(det(frame=0))
    assert pub.flush()  # scripts loaded, connected
    LostReply(monkeypatch)
    with pub._lock:  # one send
        for camera, frame in (("lobby", 1), ("bad", 1), ("lobby", 2)):
            pub.publish_detections(det(camera=camera, frame=frame))
    assert pub.flush()
    stats = pub.stats()
    assert frames_of(client) == [0, 1, 2] and stats["retries"] == 1
    assert (stats["sent"], stats["rejected"]) == (3, 1)
    assert "WRONGTYPE" in stats["last_error"] and "Redis rejected 1 message" in caplog.text
    pub.publish_detections(det(frame=3))  # a batch that starts after frame 1: its refusal is no longer kept
    assert pub.flush() and client.hget(keys("hv").publisher(pub.id), "rejected") is None
    assert pub.stats()["sent"] == 4 and frames_of(client) == [0, 1, 2, 3]


def test_guard_a_lost_reply_of_a_shared_send_writes_nothing_twice(redis_server: RedisServer, monkeypatch) -> None:
    """Normal-path guard (passes on the original code too): two Publishers' calls pipelined in one send, its
    reply lost twice after Redis applied it; each Publisher sends again from its queue's head."""
    client = redis_server.client()
    w = WriterThread(redis_server.url, connect_timeout_s=0.5, socket_timeout_s=0.5)
    a, b = w.publisher(max_backoff_s=0.05), w.publisher(max_backoff_s=0.05)
    with w.work:
        for p, camera in ((a, "a"), (b, "b")):
            p.publish_detections(det(camera=camera, frame=0))
            p.start()
    assert a.flush() and b.flush()
    LostReply(monkeypatch, times=2)
    with w.work:  # one send for both
        for frame in (1, 2, 3):
            a.publish_detections(det(camera="a", frame=frame))
            b.publish_detections(det(camera="b", frame=frame))
        a.set_status("a", {"state": "up"})
        b.set_hash("hv:cam:b:counts", {"v": 1})
    assert a.flush() and b.flush()
    try:
        assert frames_of(client, "a") == frames_of(client, "b") == [0, 1, 2, 3]
        assert a.stats()["sent"] == b.stats()["sent"] == 4
        assert client.hget(keys("hv").cameras, "a") == b'{"state":"up"}' and client.hgetall("hv:cam:b:counts")
        errors = [e for e in stream_json(client, keys("hv").events) if e["type"] == "publisher_error"]
        assert sorted(e["camera"] for e in errors) == ["a", "b"]
        assert all(e["retries"] >= 1 for e in errors)
    finally:
        w.close(1.0)


class _Msg(NamedTuple):
    seq: int
    stream: str
    live: str | None
    data: str


def test_the_batch_script_reports_a_refusal_again_to_a_resend(any_redis: RedisServer) -> None:
    """A resend of entries Redis refused (its reply lost) skips them and said nothing: now it reports them
    refused again, until a batch starts after them."""
    client = any_redis.client()
    client.set("hv:bad", "not a stream")
    writer, state = BatchWriter(client, "hv:publisher:test", "hv:cameras", maxlen=100), "hv:publisher:test"
    msgs = [_Msg(1, "hv:s", None, "m1"), _Msg(2, "hv:bad", None, "m2"), _Msg(3, "hv:s", None, "m3")]
    first = writer.write(trip=1, entries=msgs, statuses={})
    assert [i for i, _ in first.rejected] == [1] and "WRONGTYPE" in first.rejected[0][1]
    assert writer.write(trip=2, entries=msgs, statuses={}).rejected == first.rejected  # trip 1's reply lost
    assert writer.write(trip=3, entries=[], statuses={"c": "up"}) == (3, [], [])  # statuses only: kept
    assert writer.write(trip=4, entries=msgs[1:], statuses={}).rejected == [(0, first.rejected[0][1])]
    assert client.hexists(state, "rejected")
    assert writer.write(trip=6, entries=[_Msg(4, "hv:s", None, "m4")], statuses={}) == (3, [], [])
    assert not client.hexists(state, "rejected")  # no batch can carry it again
    assert [f[b"data"] for _, f in client.xrange("hv:s")] == [b"m1", b"m3", b"m4"]
