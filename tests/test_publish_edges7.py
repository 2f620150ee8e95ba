"""workers/publish.py against a real redis-server that answers but refuses writes (not enough replicas, a
read-only replica), a failover that turns the server a Publisher is connected to into a replica, close() right
after an outage, and a flushed script cache."""
from __future__ import annotations

import pytest

from servers import HOST, RedisServer
from test_consumer_retry import LosingProxy
from test_publish import FAST, det, frames_of, wait_until
from test_writer_edges4 import publish_in_bursts
from workers.publish import Publisher, WriterThread

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("refusal", ["min-replicas-to-write", "replicaof"])
def test_messages_dropped_while_redis_refuses_writes_are_counted_and_not_kept(redis_server: RedisServer,
                                                                              refusal: str) -> None:
    """Redis answered every retry with NOREPLICAS (or READONLY, or MISCONF), which refuse the script whole:
    only out of memory was taken for "applied nothing", so each message that left the full buffer was kept
    (with its JSON) as maybe in Redis until writes came back: memory grew with the episode (115 held with a
    buffer of 5) and `dropped` said 0 meanwhile."""
    admin = redis_server.client()
    pub = Publisher(redis_server.url, buffer=5, **{**FAST, "max_backoff_s": 0.05}).start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        if refusal == "replicaof":  # a master that is not there: a read-only replica that keeps its data
            admin.replicaof(HOST, 1)
        else:
            admin.config_set("min-replicas-to-write", "1")
        publish_in_bursts(pub)
        stats = pub.stats()
        assert ("read only replica" if refusal == "replicaof" else "NOREPLICAS") in stats["last_error"]
        assert stats["queued"] == 5 and stats["dropped"] == 120 - 5 and not pub._undecided
        if refusal == "replicaof":
            admin.replicaof("NO", "ONE")
        else:
            admin.config_set("min-replicas-to-write", "0")
        assert pub.flush(10)
        stats = pub.stats()
        assert (stats["sent"], stats["dropped"], stats["rejected"], stats["queued"]) == (6, 115, 0, 0)
        assert frames_of(admin) == [0, *range(116, 121)]
    finally:
        pub.close(1.0)


def test_a_failover_that_demotes_the_connected_server_reaches_the_new_master(any_redis: RedisServer) -> None:
    """Behind one address (a proxy, a DNS name), the master fails over: the old one becomes a replica of the
    new one, and new connections reach the new master. The Publisher kept its connection to the old one and
    got READONLY on every retry, forever: the camera published nothing more until its process restarted. Now
    a READONLY reply drops the connection, and the next send connects anew (redis-py's Sentinel client does
    the same)."""
    with RedisServer(binary=any_redis.binary) as second_redis:
        _fail_over(any_redis, second_redis)


def _fail_over(redis_server: RedisServer, second_redis: RedisServer) -> None:
    old, new = redis_server.client(), second_redis.client()
    proxy = LosingProxy(redis_server.port)
    pub = Publisher(proxy.url(), **FAST).start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        for client in (old, new):  # no 5 s wait before a full sync (Redis 7's default)
            client.config_set("repl-diskless-sync-delay", "0")
        new.replicaof(HOST, redis_server.port)
        wait_until(lambda: frames_of(new) == [0], timeout=10)  # replicated, as a failover's replica would be
        new.replicaof("NO", "ONE")  # the failover: new connections reach the new master, the old one follows it
        proxy.upstream_port = second_redis.port
        old.replicaof(HOST, second_redis.port)
        # synced: the old master answers READONLY, not LOADING (an error that drops the connection anyway)
        wait_until(lambda: old.info("replication")["master_link_status"] == "up", timeout=10)
        for frame in (1, 2, 3):
            pub.publish_detections(det(frame=frame))
        assert pub.flush(10), pub.stats()
        assert frames_of(new) == [0, 1, 2, 3]
        assert pub.stats()["sent"] == 4 and "ReadOnlyError" in pub.stats()["last_error"]
    finally:
        pub.close(1.0)
        proxy.close()


def test_closing_after_an_outage_does_not_wait_out_the_backoff(redis_server: RedisServer, monkeypatch) -> None:
    """Redis is back, but the retry after the outage is due later than close() waits (backoff up to
    max_backoff_s, 5 s by default, and a shutdown gives close() 5 s): the tail was dropped with "publisher
    closed with 3 messages not delivered" while Redis answered. Now close() tries once more at once."""
    pub = Publisher(redis_server.url, **FAST).start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        monkeypatch.setattr(pub._backoff, "compute", lambda failures: 60.0)  # the next retry: in a minute
        redis_server.kill()
        for frame in (1, 2, 3):
            pub.publish_detections(det(frame=frame))
        wait_until(lambda: pub.stats()["retries"] >= 1, timeout=10)
        redis_server.start()
        pub.close(timeout=3.0)
        assert frames_of(redis_server.client()) == [1, 2, 3]  # a restarted Redis without persistence
        assert pub.stats()["sent"] == 4 and pub.stats()["queued"] == 0
    finally:
        pub.close(1.0)


def test_guard_a_flushed_script_cache_is_loaded_again_for_every_publisher(any_redis: RedisServer) -> None:
    """Normal-path guard (passes on the original code too): SCRIPT FLUSH (or a restarted Redis) before each
    send; the pipelined calls of two Publishers sharing a writer, and a Publisher's lone call, get NOSCRIPT,
    load the script and are sent again, once."""
    client = any_redis.client()
    w = WriterThread(any_redis.url, connect_timeout_s=0.5, socket_timeout_s=0.5)
    a, b = w.publisher(max_backoff_s=0.05).start(), w.publisher(max_backoff_s=0.05).start()
    solo = Publisher(any_redis.url, **FAST).start()
    try:
        for frame in (0, 1):
            client.script_flush()
            with w.work:  # one send for both
                a.publish_detections(det(camera="a", frame=frame))
                b.publish_detections(det(camera="b", frame=frame))
            solo.publish_detections(det(camera="s", frame=frame))
            assert a.flush() and b.flush() and solo.flush()
        assert frames_of(client, "a") == frames_of(client, "b") == frames_of(client, "s") == [0, 1]
        assert all(p.stats()["retries"] == 0 and p.stats()["sent"] == 2 for p in (a, b, solo))
    finally:
        for p in (a, b, solo):
            p.close(1.0)
        w.close(1.0)
