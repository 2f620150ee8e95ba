"""workers/publish.py at close: a send that close() gave up on (a frozen Redis) writes nothing after close returns
(after the camera's camera_removed), and a clean close deletes the Publisher's dedup state instead of leaving it
a day."""
from __future__ import annotations

import time

import pytest

from servers import RedisServer
from test_publish import BACKOFF, det, frames_of, stream_json, wait_until
from workers.publish import Publisher, WriterThread, keys

pytestmark = pytest.mark.timeout(30)
SLOW_REPLY = dict(connect_timeout_s=2.0, socket_timeout_s=30.0)  # a send waits out the freeze, as on a long one


def unread_by(server: RedisServer) -> int:
    """Bytes unread in the server's TCP sockets (Linux's /proc/net/tcp): what reached a frozen Redis."""
    total = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            local, queues = line.split()[1], line.split()[4]
            if int(local.rsplit(":", 1)[1], 16) == server.port:
                total += int(queues.split(":")[1], 16)
    return total


@pytest.mark.parametrize("shared", [False, True], ids=["own-writer", "shared-writer"])
def test_a_send_close_gave_up_on_never_leaves_after_it(redis_server: RedisServer, shared: bool) -> None:
    """Redis froze (SIGSTOP) while a send was reconnecting (its connection had been killed): close() returned at
    its deadline, the caller wrote camera_removed, and once Redis woke the send went on and wrote the frame
    after the removal. What a frozen Redis had already received is no matter: it runs first when it wakes. A
    Publisher sharing the writer still delivers everything once."""
    admin = redis_server.client()
    writer = WriterThread(redis_server.url, **SLOW_REPLY) if shared else None
    pub = (writer.publisher(**BACKOFF) if writer else Publisher(redis_server.url, **SLOW_REPLY, **BACKOFF)).start()
    other = writer.publisher(**BACKOFF).start() if writer else None
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        admin.client_kill_filter(_type="normal", skipme=True)  # the writer's connection: its next send reconnects
        redis_server.pause()
        try:
            pub.publish_detections(det(frame=1))
            if other:
                other.publish_detections(det(camera="hall", frame=0))
            wait_until(lambda: unread_by(redis_server) > 0)  # the new connection's handshake waits in the kernel
            began = time.monotonic()
            pub.close(timeout=0.5)
            assert time.monotonic() - began < 3
        finally:
            redis_server.resume()
        admin.xadd(keys("hv").events, {"data": '{"type": "camera_removed"}'})
        if other:  # the next send of the shared thread follows the one close gave up on
            assert other.flush(timeout=10)
            assert frames_of(admin, "hall") == [0] and other.stats()["sent"] == 1
        else:  # the writer's thread ends once that send is answered or failed: nothing of it can come later
            wait_until(lambda: not pub._writer.alive, timeout=10)
        assert frames_of(admin) == [0]  # frame 1 left after close returned: after camera_removed
        assert pub.stats()["queued"] == 1 and pub.stats()["sent"] == 1  # reported not delivered
        assert admin.exists(pub.keys.publisher(pub.id))  # an unclean close keeps the dedup state
    finally:
        pub.close(timeout=1.0)
        if other:
            other.close(timeout=1.0)
        if writer:
            writer.close(timeout=1.0)


def test_a_clean_close_deletes_the_dedup_state(redis_server: RedisServer) -> None:
    """Every Publisher's `{prefix}:publisher:{id}` stayed a day after close although nothing could resend
    against it: a service adding and removing cameras piled them up. Sharing a writer, a close deletes only
    its own; the others keep writing exactly once."""
    admin = redis_server.client()
    writer = WriterThread(redis_server.url, connect_timeout_s=2.0, socket_timeout_s=5.0)
    try:
        a, b = writer.publisher(**BACKOFF).start(), writer.publisher(**BACKOFF).start()
        own = Publisher(redis_server.url, connect_timeout_s=2.0, socket_timeout_s=5.0, **BACKOFF).start()
        for pub, camera in ((a, "a"), (b, "b"), (own, "c")):
            pub.publish_detections(det(camera=camera))
            pub.set_status(camera, {"state": "up"})
            assert pub.flush()
        state = {pub: pub.keys.publisher(pub.id) for pub in (a, b, own)}
        assert all(admin.ttl(key) > 0 for key in state.values())
        a.close()
        own.close()
        assert admin.exists(state[a], state[own]) == 0 and admin.exists(state[b]) == 1
        b.publish_detections(det(camera="b", frame=1))
        assert b.flush()
        b.close()
        assert admin.exists(state[b]) == 0
        assert [frames_of(admin, c) for c in "abc"] == [[0], [0, 1], [0]]
        assert [p.stats()["sent"] for p in (a, b, own)] == [1, 2, 1]
        assert writer.alive  # the closes left the shared thread to its other Publishers
    finally:
        writer.close(timeout=1.0)


def test_a_close_after_an_unanswered_send_keeps_the_dedup_state(redis_server: RedisServer) -> None:
    """A send whose reply timed out may still reach Redis later (its socket closed, a frozen Redis runs it
    when it wakes): without the state it would be applied again, so that close keeps it to its TTL."""
    admin = redis_server.client()
    pub = Publisher(redis_server.url, connect_timeout_s=2.0, socket_timeout_s=0.3, **BACKOFF).start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        redis_server.pause()
        try:
            pub.publish_detections(det(frame=1))
            wait_until(lambda: pub.stats()["retries"] >= 1, timeout=10)
        finally:
            redis_server.resume()
        assert pub.flush(timeout=10)
    finally:
        pub.close()
    assert frames_of(admin) == [0, 1]
    assert admin.ttl(pub.keys.publisher(pub.id)) > 0
    assert [e["type"] for e in stream_json(admin, keys("hv").events)] == ["publisher_error"]

