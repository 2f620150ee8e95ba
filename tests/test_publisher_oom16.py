"""workers/publish.py, a defect an operator run found (round 16): with Redis out of memory (maxmemory reached,
noeviction or volatile-lru), each camera's publisher said "cannot write to Redis", then within 0.5 s
"reconnected to Redis" and "writes to Redis again after 0.5 s and 1 failed attempts", then "cannot write" again,
although Redis refused every write and the connection never dropped: a round of camera statuses alone was refused,
the statuses were written anyway (allow-oom), and the PING that followed (a refusal marked the publisher
disconnected) ended the episode. Two publisher_error events for one outage, and a reconnect counted for each.
Redis answering a write with a refusal is no disconnection, and only a write taken again ends an episode."""
from __future__ import annotations

import json
import logging

import pytest

import workers.publish as publish
from servers import RedisServer
from test_publish import BACKOFF, FAST, det, frames_of, stream_json, wait_until
from workers.publish import Publisher, WriterThread, event_message, keys

pytestmark = pytest.mark.timeout(60)


def lines_of(caplog, name: str) -> dict[str, int]:
    """How many of the outage lines the publisher ``name`` logged, by kind."""
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"publisher {name} ")]
    return {kind: sum(kind in m for m in said) for kind in ("cannot write", "reconnected", "writes to Redis again")}


def errors_of(client, camera: str) -> list[dict]:
    return [e for e in stream_json(client, keys("hv").events)
            if e["type"] == "publisher_error" and e["camera"] == camera]


def answered_pings(writer: WriterThread, count: int = 2) -> None:
    """Waits for ``count`` more round trips: with IDLE_PING_S short, PINGs Redis answers while it refuses writes
    (the thread looks for due PINGs at least once a second)."""
    start = writer.round_trips
    wait_until(lambda: writer.round_trips >= start + count, timeout=15)


@pytest.mark.parametrize("policy", ["noeviction", "volatile-lru"])
def test_statuses_written_despite_out_of_memory_neither_end_the_episode_nor_count_a_reconnect(
        redis_server: RedisServer, policy: str, monkeypatch, caplog) -> None:
    monkeypatch.setattr(publish, "IDLE_PING_S", 0.05)  # PINGs whenever nothing waits: each one ended the episode
    client = redis_server.client()
    caplog.set_level(logging.WARNING, logger="workers.publish")
    with Publisher(redis_server.url, name="cam-a", **FAST) as pub:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        client.config_set("maxmemory-policy", policy)
        client.config_set("maxmemory", 1)  # every write is refused from now on
        pub.set_status("lobby", {"state": "up"})  # a round of statuses alone: refused, then written alone
        wait_until(lambda: client.hget(keys("hv").cameras, "lobby") and pub.stats()["failing"])
        since = pub.stats()["failing_since"]
        answered_pings(pub._writer)
        stats = pub.stats()
        assert stats["failing"] and stats["failing_since"] == since and stats["connected"], stats
        assert stats["reconnects"] == 0 and errors_of(client, "lobby") == [], stats
        assert lines_of(caplog, "cam-a") == {"cannot write": 1, "reconnected": 0, "writes to Redis again": 0}
        client.config_set("maxmemory", 0)  # memory again: the next write ends the episode
        pub.publish_detections(det(frame=1))
        assert pub.flush()
        stats = pub.stats()
    assert frames_of(client) == [0, 1] and json.loads(client.hget(keys("hv").cameras, "lobby")) == {"state": "up"}
    errors = errors_of(client, "lobby")
    assert len(errors) == 1 and errors[0]["retries"] == stats["retries"], (errors, stats)
    assert errors[0]["reason"].startswith("OutOfMemoryError") and stats["reconnects"] == 0, stats
    assert lines_of(caplog, "cam-a") == {"cannot write": 1, "reconnected": 0, "writes to Redis again": 1}


def test_a_camera_added_while_redis_is_out_of_memory_has_one_episode_and_no_reconnect(
        redis_server: RedisServer, monkeypatch, caplog) -> None:
    """A camera added during the outage to a process's WriterThread: its first round, its status, is refused; it
    had never been connected, and the PING after it said "reconnected" and ended its episode."""
    monkeypatch.setattr(publish, "IDLE_PING_S", 0.05)
    client = redis_server.client()
    caplog.set_level(logging.WARNING, logger="workers.publish")
    writer = WriterThread(redis_server.url, name="hydravision-cameras-1", connect_timeout_s=0.5, socket_timeout_s=0.5)
    a = writer.publisher(name="cam-a", **BACKOFF).start()
    b = writer.publisher(name="cam-c", **BACKOFF)
    try:
        a.publish_detections(det(camera="a", frame=0))
        assert a.flush()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
        a.publish_detections(det(camera="a", frame=1))  # refused and kept
        wait_until(lambda: a.stats()["failing"])
        b.set_status("c", {"state": "starting"})
        b.start()
        wait_until(lambda: client.hget(keys("hv").cameras, "c") and b.stats()["failing"])
        since = b.stats()["failing_since"]
        answered_pings(writer)
        assert b.stats()["failing_since"] == since and b.stats()["reconnects"] == 0, b.stats()
        assert lines_of(caplog, "cam-c") == {"cannot write": 1, "reconnected": 0, "writes to Redis again": 0}
        client.config_set("maxmemory", 0)
        b.publish_event(event_message("camera_added", "c"))
        assert a.flush() and b.flush()
        for pub, name, camera in ((a, "cam-a", "a"), (b, "cam-c", "c")):
            stats = pub.stats()
            errors = errors_of(client, camera)
            assert len(errors) == 1 and errors[0]["retries"] == stats["retries"], (name, errors, stats)
            assert stats["reconnects"] == 0 and not stats["failing"], (name, stats)
            assert lines_of(caplog, name) == {"cannot write": 1, "reconnected": 0, "writes to Redis again": 1}
        assert frames_of(client, "a") == [0, 1]
    finally:
        a.close(1.0)
        b.close(1.0)
        writer.close(1.0)


def test_a_lost_connection_is_still_a_reconnect(redis_server: RedisServer, caplog) -> None:
    """The other side: a connection Redis cut is a disconnection, said and counted once it is back."""
    caplog.set_level(logging.WARNING, logger="workers.publish")
    with Publisher(redis_server.url, name="cam-a", **FAST) as pub:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        redis_server.kill()
        pub.publish_detections(det(frame=1))
        wait_until(lambda: pub.stats()["retries"] >= 1)
        assert not pub.stats()["connected"]
        redis_server.start()
        assert pub.flush(10)
        stats = pub.stats()
    assert stats["reconnects"] == 1 and stats["connected"] and frames_of(redis_server.client()) == [1], stats
    assert lines_of(caplog, "cam-a") == {"cannot write": 1, "reconnected": 1, "writes to Redis again": 1}
