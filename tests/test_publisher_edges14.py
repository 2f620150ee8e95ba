"""workers/publish.py, redis_writer.py and stream.publisher_for, defects an operator run found (round 14): the log
lines of cameras sharing their process's writer named no camera, stats()["queued"] counted the publisher's own
events that "sent" leaves out, and a resend after Redis restarted empty was logged as a refusal that may have
written messages twice; then (the review) a state evicted was taken for Redis's data lost once INFO's evicted_keys
was back to 0. Sends are changed through hooks on WriterThread._execute, never by racing a sleep."""
from __future__ import annotations

import logging
import threading
from typing import Any, NamedTuple

import pytest
import redis

from pipeline.run_commands import _undelivered
from servers import RedisServer
from test_publish import FAST, det, frames_of, stream_json, wait_until
from test_writer_edges4 import AfterSend
from workers.publish import Publisher, WriterThread, keys
from workers.redis_writer import BatchWriter, StateGone
from workers.settings import RedisConfig
from workers.stream import publisher_for

pytestmark = pytest.mark.timeout(60)


def test_cameras_sharing_their_process_writer_each_name_themselves_in_the_outage_lines(redis_server: RedisServer,
                                                                                     caplog) -> None:
    """Two cameras of one process: "writes to Redis again after 119.2 s ...; 829 messages dropped meanwhile" and
    another such line with 353 said "publisher hydravision" both, and "cannot write to Redis" named no publisher:
    publisher_for left the camera's name out where the camera shares the process's WriterThread."""
    settings = RedisConfig(url=redis_server.url, buffer=10)
    writer = WriterThread(redis_server.url, name="hydravision-cameras-1", connect_timeout_s=0.5, socket_timeout_s=0.5)
    pubs = {c: publisher_for(settings, f"hydravision-{c}", writer).start() for c in ("cam-a", "cam-b")}
    try:
        assert {c: p.name for c, p in pubs.items()} == {c: f"hydravision-{c}" for c in pubs}
        for camera, pub in pubs.items():
            pub.publish_detections(det(camera=camera, frame=0))
            assert pub.flush(10)
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="workers.publish"):
            for camera, pub in pubs.items():
                pub.publish_detections(det(camera=camera, frame=1))
            wait_until(lambda: all(p.stats()["retries"] >= 1 for p in pubs.values()), timeout=10)
            for camera, frames in (("cam-a", 15), ("cam-b", 12)):  # 10 kept: 5 and 2 dropped
                for frame in range(2, frames + 1):
                    pubs[camera].publish_detections(det(camera=camera, frame=frame))
            redis_server.start()
            assert all(p.flush(20) for p in pubs.values())
        lines = [r.getMessage() for r in caplog.records]
        for camera, dropped in (("cam-a", 5), ("cam-b", 2)):
            assert pubs[camera].stats()["dropped"] == dropped
            assert [m for m in lines if "cannot write to Redis" in m and f"hydravision-{camera} " in m], lines
            again = [m for m in lines if "writes to Redis again" in m and f"hydravision-{camera} " in m]
            assert len(again) == 1 and f"; {dropped} messages dropped meanwhile" in again[0], lines
        assert not [m for m in lines if "publisher hydravision " in m or m.startswith("publisher cannot")], lines
    finally:
        for pub in pubs.values():
            pub.close(1.0)
        writer.close(1.0)


def test_the_publishers_own_events_are_in_none_of_its_counts(redis_server: RedisServer, monkeypatch) -> None:
    """After an outage Redis held sent + 10 entries of a camera: its publisher_error and publisher_dropped events,
    which "sent" leaves out (as "dropped" does when one is lost). "queued" counted them, so while they waited the
    counts of the camera's messages did not add up, and the end of a run called them messages "left in its
    buffer at the stop" (exit 3 when every message of the camera had reached Redis)."""
    gone_again, tried = threading.Event(), threading.Event()
    plain = WriterThread._execute

    def execute(writer: WriterThread, commands: list[tuple]) -> list[Any]:
        if gone_again.is_set() and any("publisher_error" in str(command) for command in commands):
            tried.set()  # Redis went away again right after the outage: the own events wait
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return plain(writer, commands)

    monkeypatch.setattr(WriterThread, "_execute", execute)
    pub = Publisher(redis_server.url, buffer=10, **{**FAST, "max_backoff_s": 0.05}, name="hydravision-lobby").start()
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        redis_server.kill()
        pub.publish_detections(det(frame=1))
        wait_until(lambda: pub.stats()["retries"] >= 1, timeout=10)
        for frame in range(2, 16):
            pub.publish_detections(det(frame=frame))
        gone_again.set()
        redis_server.start()
        wait_until(tried.is_set, timeout=20)
        wait_until(lambda: pub.stats()["failing"], timeout=10)  # that send failed: the own events are queued again
        stats = pub.stats()
        assert stats["sent"] + stats["rejected"] + stats["dropped"] + stats["queued"] == 16, stats
        assert (stats["sent"], stats["dropped"], stats["queued"]) == (11, 5, 0), stats  # frames 0 and 6-15
        assert _undelivered([{"camera": "lobby", "publisher": stats}], None) == {"lobby": {"dropped": 5}}
        gone_again.clear()
        assert pub.flush(20)
        client = redis_server.client()
        assert frames_of(client) == list(range(6, 16)) and pub.stats()["sent"] == 11  # frame 0 went with the kill
        own = [e["type"] for e in stream_json(client, keys("hv").events)]
        assert "publisher_error" in own and "publisher_dropped" in own, own
    finally:
        pub.close(1.0)


@pytest.mark.parametrize("lost", ["restart", "eviction"])
def test_a_dedup_state_lost_with_a_restart_is_no_refusal_and_no_double(any_redis: RedisServer, monkeypatch, caplog,
                                                                      lost: str) -> None:
    """Redis restarted EMPTY between a send whose reply was lost and its resend: the log said at ERROR "Redis
    rejected 0 message(s) and 1 other write(s) of a batch: publisher state ... was gone (...): ... may now be in
    Redis twice", while nothing was doubled: what the lost send wrote went with the state. Now a WARNING says Redis
    lost its data; a state evicted alone (volatile-*) is still the ERROR about possible doubles. Neither is a
    refusal, and both name the publisher."""
    admin = any_redis.client()
    if lost == "eviction":
        admin.config_set("maxmemory-policy", "volatile-lru")
    pub = Publisher(any_redis.url, **FAST, name="hydravision-lobby").start()
    state = keys("hv").publisher(pub.id)
    try:
        def restart_empty() -> None:  # the send was applied; Redis dies and comes back without its data
            any_redis.kill()
            any_redis.start()

        def memory_full() -> None:  # the send was applied; Redis goes over maxmemory (evicting the state) and back
            admin.config_set("maxmemory", "1")
            admin.config_set("maxmemory", "0")

        records = _lost_reply(pub, monkeypatch, caplog, restart_empty if lost == "restart" else memory_full)
        admin = any_redis.client()
        errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        assert not [m for m in errors if "rejected" in m], errors
        if lost == "restart":
            assert frames_of(admin) == [1, 2]  # frame 0 went with the restart; none twice
            assert errors == []
            said = [r.getMessage() for r in records if "lost its data" in r.getMessage()]
            assert len(said) == 1 and said[0].startswith("publisher hydravision-lobby: Redis lost its data: "
                                                         f"publisher state {state} was gone"), said
            assert "restarted empty" in said[0] and "nothing was written twice" in said[0], said
            assert "twice" not in (pub.stats()["last_error"] or "")
        else:
            assert frames_of(admin) == [0, 1, 2, 1, 2]  # the resend wrote them again: nothing tells what was applied
            _said_evicted(errors, pub, state)
    finally:
        any_redis.client().config_set("maxmemory", "0")
        pub.close(1.0)


def _said_evicted(errors: list[str], pub: Publisher, state: str) -> None:
    """The ERROR about doubles of a dedup state evicted alone, said once, and the publisher's last_error with it."""
    assert len(errors) == 1 and errors[0].startswith(f"publisher hydravision-lobby: publisher state {state} "
                                                     "was gone (evicted under a volatile-*"), errors
    assert "may now be in Redis twice" in errors[0] and "was gone" in pub.stats()["last_error"]


def _lost_reply(pub: Publisher, monkeypatch, caplog, then) -> list[logging.LogRecord]:
    """Frame 0 was delivered; the send of frames 1 and 2 reaches Redis, then ``then()`` runs and its reply is lost:
    the log records of the resend."""
    pub.publish_detections(det(frame=0))
    assert pub.flush()
    AfterSend(monkeypatch, then)
    with caplog.at_level(logging.WARNING, logger="workers.publish"):
        with pub._lock:  # one send
            for frame in (1, 2):
                pub.publish_detections(det(frame=frame))
        assert pub.flush(20)
    return list(caplog.records)


@pytest.mark.parametrize("reset", ["CONFIG RESETSTAT", "restart with persistence"])
def test_a_dedup_state_evicted_is_the_error_about_doubles_after_the_eviction_count_was_reset(
        any_redis: RedisServer, monkeypatch, caplog, reset: str) -> None:
    """The review: volatile-lru evicted the state, then CONFIG RESETSTAT (or a restart that kept the data: RDB, AOF)
    set INFO's evicted_keys back to 0, and the script took the state for gone with all of Redis's data. Redis held
    frames [0, 1, 2, 1, 2] while the log said at WARNING "nothing was written twice", no ERROR. The batch's stream
    still ends with frame 2, which the resend carried again: that is the eviction's ERROR about doubles."""
    admin = any_redis.client()
    admin.config_set("maxmemory-policy", "volatile-lru")
    pub = Publisher(any_redis.url, **FAST, name="hydravision-lobby").start()
    state = keys("hv").publisher(pub.id)

    def evicted_then_reset() -> None:  # the send was applied; the state is evicted, then the count goes back to 0
        admin.config_set("maxmemory", "1")
        admin.config_set("maxmemory", "0")
        assert not admin.exists(state) and admin.info("stats")["evicted_keys"] >= 1
        if reset == "CONFIG RESETSTAT":
            admin.config_resetstat()
        else:
            admin.save()  # what a restart with persistence loads: the streams, no state
            any_redis.kill()
            any_redis.start()

    try:
        records = _lost_reply(pub, monkeypatch, caplog, evicted_then_reset)
        admin = any_redis.client()
        assert admin.info("stats")["evicted_keys"] == 0 and frames_of(admin) == [0, 1, 2, 1, 2]
        assert not [r for r in records if "nothing was written twice" in r.getMessage()], records
        _said_evicted([r.getMessage() for r in records if r.levelno >= logging.ERROR], pub, state)
    finally:
        any_redis.client().config_set("maxmemory", "0")
        pub.close(1.0)


def test_a_restart_from_a_save_older_than_the_lost_send_is_no_double(any_redis: RedisServer, monkeypatch,
                                                                     caplog) -> None:
    """The other way: Redis restarted from a save taken before the send whose reply was lost (and without the
    state, evicted then). The camera's stream is there but ends with frame 0, which the resend does not carry: what
    that send wrote is gone, the resend writes frames 1 and 2 once, and the WARNING says so; no ERROR."""
    admin = any_redis.client()
    admin.config_set("maxmemory-policy", "volatile-lru")
    pub = Publisher(any_redis.url, **FAST, name="hydravision-lobby").start()
    state = keys("hv").publisher(pub.id)
    try:
        pub.publish_detections(det(frame=0))
        assert pub.flush()
        admin.config_set("maxmemory", "1")  # the state is evicted, then the save is taken: frame 0, no state
        admin.config_set("maxmemory", "0")
        assert not admin.exists(state)
        admin.save()

        def restart_from_the_save() -> None:
            any_redis.kill()
            any_redis.start()

        records = _lost_reply(pub, monkeypatch, caplog, restart_from_the_save)
        assert frames_of(any_redis.client()) == [0, 1, 2]
        assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
        said = [r.getMessage() for r in records if "lost its data" in r.getMessage()]
        assert len(said) == 1 and "nothing was written twice" in said[0], said
    finally:
        any_redis.client().config_set("maxmemory", "0")
        pub.close(1.0)


class _Msg(NamedTuple):
    seq: int
    stream: str
    live: str | None
    data: str


def test_the_batch_script_says_emptied_only_where_the_batchs_streams_show_the_lost_writes_gone(
        any_redis: RedisServer) -> None:
    """The state is gone and evicted_keys is 0 in each case (the state deleted, as evicted with the count reset
    since). 'emptied' (StateGone.doubled False) needs the batch's own streams to show that what earlier sends
    carried is not in Redis; else 'evicted', the worse case. The shared events stream, which other Publishers
    write, tells nothing by not ending with an entry of ours."""
    client = any_redis.client()
    writer, state = BatchWriter(client, "hv:publisher:t", "hv:cameras", maxlen=100), "hv:publisher:t"
    det_ = [_Msg(seq, "hv:cam:a:detections", "hv:live:a", f"d{seq}") for seq in range(1, 5)]
    event = [_Msg(seq, "hv:events", None, f"e{seq}") for seq in range(1, 5)]
    trip = iter(range(1, 100))

    def gone(entries: list[_Msg], expected: int) -> bool:
        """Writes ``entries`` again with the state deleted: the StateGone's ``doubled``."""
        client.delete(state)
        found = [e for e in writer.write(next(trip), entries, {}, expected=expected).errors
                 if isinstance(e, StateGone)]
        assert len(found) == 1, found
        return found[0].doubled

    def fresh() -> None:
        client.flushall()
        client.config_resetstat()

    fresh()  # a detections stream that ends with an entry the resend carries again: written twice
    writer.write(next(trip), det_[:2], {})
    assert gone(det_[:3], expected=2) is True
    fresh()  # ... or only with older ones (Redis restarted from an older save): nothing of the batch is there
    writer.write(next(trip), det_[:1], {})
    assert gone(det_[1:3], expected=2) is False
    fresh()  # Redis restarted empty, and another Publisher wrote an event since: the detections stream is missing
    client.xadd("hv:events", {"data": "other"})
    assert gone([event[0], det_[1]], expected=2) is False
    fresh()  # only an event carried again, another Publisher's event after ours: it may be there, hidden
    writer.write(next(trip), det_[:1], {})
    writer.write(next(trip), event[1:2], {})
    client.xadd("hv:events", {"data": "other"})
    assert gone(event[1:2], expected=2) is True
    client.xadd("hv:events", {"data": "other"})  # ... and a detections entry that no send carried yet shows nothing
    assert gone([event[1], det_[2]], expected=2) is True
    fresh()  # the events stream itself missing: what was carried to it is gone
    assert gone(event[:2], expected=2) is False
    client.xadd("hv:events", {"data": "e1"})  # ... or ending with an entry the resend carries again
    assert gone(event[:2], expected=2) is True
    fresh()  # an eviction counted: a stream may have been evicted whole (allkeys-*), whatever the streams show
    client.config_set("maxmemory-policy", "volatile-lru")
    client.set("some:key", "x", ex=600)
    client.config_set("maxmemory", "1")
    client.config_set("maxmemory", "0")
    assert client.info("stats")["evicted_keys"] >= 1
    assert gone(det_[1:3], expected=2) is True
