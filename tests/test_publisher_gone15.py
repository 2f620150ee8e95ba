"""workers/redis_writer.py's batch script, a defect an operator run found (round 15): a plain Redis restart (no
persistence, no maxmemory) while a live-control command waited made the controller's publisher log an ERROR that its
state was "evicted under a volatile-* maxmemory-policy", while the cameras' publishers said, rightly, that Redis lost
its data. The controller writes only to the shared events stream, the cameras had written to it since the restart,
and the script read "our entry is not the stream's last" as "ours may be hidden there": an eviction. Sends are
changed through hooks on WriterThread._execute, never by racing a sleep."""
from __future__ import annotations

import logging
from typing import NamedTuple

import pytest

from servers import RedisServer
from test_publish import FAST, stream_json
from test_writer_edges4 import AfterSend
from workers.publish import Publisher, event_message, keys
from workers.redis_writer import BatchWriter, StateGone

pytestmark = pytest.mark.timeout(60)


def test_the_controller_says_redis_lost_its_data_after_a_restart_the_cameras_wrote_events_since(
        any_redis: RedisServer, monkeypatch, caplog) -> None:
    """Redis dies after applying a send of the controller's publisher (events only) and comes back empty; a camera's
    publisher writes an event before the controller's resend. The log said at ERROR "publisher state ... was gone
    (evicted under a volatile-* maxmemory-policy): ... may now be in Redis twice"; now the WARNING the cameras give,
    "Redis lost its data", and each event is in Redis once."""
    events = keys("hv").events
    ctl = Publisher(any_redis.url, **FAST, name="hydravision-controller").start()
    cam = Publisher(any_redis.url, **FAST, name="hydravision-lobby").start()
    state = keys("hv").publisher(ctl.id)
    try:
        ctl.publish_event(event_message("camera_added", "lobby", n=0))
        cam.publish_event(event_message("stream_up", "lobby", n=0))
        assert ctl.flush() and cam.flush()

        def restart_empty_then_a_camera_writes() -> None:  # the controller's send was applied, its reply is lost
            any_redis.kill()
            any_redis.start()
            cam.publish_event(event_message("stream_up", "lobby", n=1))
            assert cam.flush(20)

        AfterSend(monkeypatch, restart_empty_then_a_camera_writes)
        with caplog.at_level(logging.WARNING, logger="workers.publish"):
            with ctl._lock:  # one send
                for n in (1, 2):
                    ctl.publish_event(event_message("camera_updated", "lobby", n=n))
            assert ctl.flush(20)
        said = [r for r in caplog.records if r.getMessage().startswith("publisher hydravision-controller: ")]
        assert [r.levelno for r in said] == [logging.WARNING], [r.getMessage() for r in said]
        assert said[0].getMessage().startswith("publisher hydravision-controller: Redis lost its data: "
                                               f"publisher state {state} was gone with what the send"), said
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "was gone" not in (ctl.stats()["last_error"] or "")
        sent = [(e["type"], e["n"]) for e in stream_json(any_redis.client(), events) if "n" in e]  # no publisher_*
        assert sent == [("stream_up", 1), ("camera_updated", 1), ("camera_updated", 2)]  # the rest: the restart's
    finally:
        cam.close(1.0)
        ctl.close(1.0)


class _Event(NamedTuple):
    seq: int
    stream: str
    live: str | None
    data: str


@pytest.mark.parametrize("ours_at, total, maxlen, how", [
    (None, 3, 100, "emptied"),  # the operator's restart: the others' events since, none of ours
    (None, 999, 5000, "emptied"), (None, 1000, 5000, "emptied"), (None, 1001, 5000, "emptied"),  # to the end
    (2, 3, 100, "evicted"), (500, 600, 5000, "evicted"), (501, 600, 5000, "evicted"),  # ours, pages back
    (1000, 1200, 5000, "evicted"),
    (None, 20, 20, "unknown"),  # at maxlen: ours may have been trimmed away as well as never written
    (6, 20, 20, "evicted"),  # ... and where ours is still there, it is
    (None, 21000, 10**6, "unknown"),  # searched 20,000 deep at most: a script that read a 1M stream blocked Redis 4 s
    (19900, 21000, 10**6, "evicted"),
])
def test_the_batch_script_searches_the_shared_events_stream_for_what_a_resend_carries_again(
        any_redis: RedisServer, ours_at: int | None, total: int, maxlen: int, how: str) -> None:
    """The state is gone (evicted_keys 0) and the resend carries only events. The script looked at the last entry
    of the events stream alone, and where another Publisher's came last it said 'evicted', whether ours was there
    or not. It now searches the stream: ours there, 'evicted' (it is written twice); not there, and the stream
    never trimmed (shorter than maxlen), 'emptied'; not there in a stream at maxlen, 'unknown', said as such.
    ``ours_at``: where the entry an earlier send carried is, counted from the newest (None: not in the stream);
    ``total``: the stream's length."""
    client = any_redis.client()
    state, events = "hv:publisher:t", keys("hv").events
    writer = BatchWriter(client, state, "hv:cameras", maxlen=maxlen)
    ours = [_Event(seq, events, None, f"ours {seq}") for seq in (2, 3)]
    pipe = client.pipeline()
    for i in range(total, 0, -1):
        pipe.xadd(events, {"data": ours[0].data if i == ours_at else f"another publisher's {i}"})
    pipe.execute()
    assert client.xlen(events) == total and not client.exists(state)
    assert client.info("stats")["evicted_keys"] == 0

    gone = [e for e in writer.write(1, ours, {}, expected=2).errors if isinstance(e, StateGone)]
    assert len(gone) == 1, gone
    assert gone[0].doubled is (how != "emptied")
    said = {"emptied": "was gone with what the send whose reply was lost wrote (Redis restarted empty",
            "evicted": "was gone (evicted under a volatile-* maxmemory-policy)",
            "unknown": "was gone and nothing tells whether alone (evicted under a volatile-* maxmemory-policy) or "
                       "with what the send whose reply was lost wrote (Redis lost its data)"}[how]
    assert gone[0].startswith(f"publisher state {state} {said}"), gone[0]


def test_a_shared_stream_is_not_searched_where_the_publishers_own_stream_told_already(any_redis: RedisServer) -> None:
    """Its own detections stream is gone, so Redis lost what it held, the batch's entries in the events stream too:
    'emptied' without reading the events stream (which, long, cost the script seconds), though an entry of the same
    data is there (another's, or one the loss left: the own stream decides)."""
    client = any_redis.client()
    state, events, detections = "hv:publisher:t", keys("hv").events, keys("hv").detections("cam")
    writer = BatchWriter(client, state, "hv:cameras", maxlen=10**6)
    ours = [_Event(2, detections, "hv:live:cam", "frame 2"), _Event(3, events, None, "ours 3")]
    pipe = client.pipeline()
    for i in range(2000, 0, -1):
        pipe.xadd(events, {"data": ours[1].data if i == 1900 else f"another publisher's {i}"})
    pipe.execute()
    assert not client.exists(detections) and not client.exists(state)
    gone = [e for e in writer.write(1, ours, {}, expected=3).errors if isinstance(e, StateGone)]
    assert len(gone) == 1 and not gone[0].doubled, gone
