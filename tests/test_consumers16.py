"""The Redis readers where operators lost messages, or the reader itself, without a word:

1. a plain `hydravision tail` stopped past MAXLEN (kill -STOP) said only that entries "may have been trimmed": the
   reply Redis had sent before the stop, processed after it, began before the stream's oldest entry now;
2. entries trimmed while pending (delivered to a consumer that died before acknowledging them) were acknowledged
   and counted, never said;
3. a group consumer whose stream was deleted twice in a row died on the second loss (one retry, not a loop)."""

from __future__ import annotations

import json
import logging
import threading

import pytest

import pipeline.run_commands as run_commands
from pipeline.cli import main
from pipeline.consumer import GroupConsumer
from running import wait_for
from test_tail import K, frame_message, tail, xadd

STREAM = "c16:events"


def _fill(client, n: int, stream: str = STREAM, maxlen: int | None = None) -> list[str]:
    return [client.xadd(stream, {"data": json.dumps({"i": i})}, maxlen=maxlen, approximate=False).decode()
            for i in range(n)]


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# --- 1. plain tail: a reply that waited in the socket while the stream was trimmed past it --------------------

def _trim_after_reply(monkeypatch, client, key: str, nth: int, frames: range, maxlen: int) -> None:
    """After the ``nth`` reply with entries has come back to tail, and before tail looks at the stream, ``frames``
    arrive and the stream is trimmed to ``maxlen``: what happens to a reply Redis sent before tail was stopped."""
    entries_of, replies = run_commands._stream_entries, []

    def late(reply):
        got = entries_of(reply)
        if got:
            replies.append(reply)
            if len(replies) == nth:
                _xadd_frames(client, key, frames, maxlen)
        return got

    monkeypatch.setattr(run_commands, "_stream_entries", late)


def _xadd_frames(client, key: str, frames: range, maxlen: int) -> None:
    for f in frames:
        client.xadd(key, {"data": json.dumps(frame_message(f))}, maxlen=maxlen, approximate=False)


def _hold_first_print(monkeypatch, client, key: str, frames: range, maxlen: int | None) -> None:
    """While tail prints its first line, ``frames`` arrive (the stream trimmed to ``maxlen``, exactly)."""
    printed, calls = run_commands._print_line, []

    def held(line, as_json):
        calls.append(line)
        if len(calls) == 1:
            for f in frames:
                client.xadd(key, {"data": json.dumps(frame_message(f))}, maxlen=maxlen, approximate=False)
        printed(line, as_json)

    monkeypatch.setattr(run_commands, "_print_line", held)


def _frames(lines: list[str]) -> list[int]:
    return [int(line.split()[2]) for line in lines]


@pytest.mark.timeout(60)
def test_tail_counts_the_gap_after_a_reply_trimmed_away_while_it_was_stopped(redis_server, capsys, monkeypatch):
    """The operator's kill -STOP: the reply with frames 1..5 was sent before the stop; by the time tail looked at the
    stream, all of it had been trimmed (the stream holds 300..499). The count of what was never printed (100..299)
    is still known: said at the next read, which begins at the stream's oldest entry."""
    client = redis_server.client()
    key = K.detections("lobby")
    xadd(client, key, [frame_message(0)])
    first_id = client.xrange(key)[0][0].decode()
    _hold_first_print(monkeypatch, client, key, range(1, 6), maxlen=None)
    _trim_after_reply(monkeypatch, client, key, nth=2, frames=range(100, 500), maxlen=200)
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "106", "--redis-url", redis_server.url)
    assert code == 0, err
    assert _frames(lines) == [0, 1, 2, 3, 4, 5, *range(300, 400)]
    assert f"note: 200 entries of {key} after {first_id} were trimmed (MAXLEN) before tail read them" in err, err
    assert "may have been trimmed" not in err, err


@pytest.mark.timeout(60)
def test_tail_counts_the_gap_before_a_reply_partly_trimmed_before_it_looked(redis_server, capsys, monkeypatch):
    """The read began at the stream's oldest entry then (frames 100..249 trimmed unread), and 20 entries of its reply
    were trimmed before tail looked: the stream's oldest entry is the reply's 21st, which numbers the reply."""
    client = redis_server.client()
    key = K.detections("lobby")
    xadd(client, key, [frame_message(0)])
    first_id = client.xrange(key)[0][0].decode()
    _hold_first_print(monkeypatch, client, key, range(100, 400), maxlen=150)  # 250..399 left
    _trim_after_reply(monkeypatch, client, key, nth=2, frames=range(400, 420), maxlen=150)  # 270..419 left
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "101", "--redis-url", redis_server.url)
    assert code == 0, err
    assert _frames(lines) == [0, *range(250, 350)]
    assert f"note: 150 entries of {key} after {first_id} were trimmed (MAXLEN) before tail read them" in err, err
    assert "may have been trimmed" not in err, err


@pytest.mark.timeout(60)
def test_tail_says_nothing_of_a_reply_partly_trimmed_after_it_was_read_whole(redis_server, capsys, monkeypatch):
    """Everything was read (0..49, then 100..199): that the stream then let go of 0..19 while tail held the reply
    lost nothing, and said "may have been trimmed" all the same."""
    client = redis_server.client()
    key = K.detections("lobby")
    xadd(client, key, [frame_message(f) for f in range(50)])
    _trim_after_reply(monkeypatch, client, key, nth=1, frames=range(100, 270), maxlen=200)
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "150", "--redis-url", redis_server.url)
    assert code == 0, err
    assert _frames(lines) == [*range(50), *range(100, 200)]
    assert "trimmed" not in err, err


# --- 2. entries trimmed while pending ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_own_pending_entries_trimmed_away_are_said_once(any_redis, caplog):
    """A consumer killed with 5 entries in hand, restarted under its name: the 5 were trimmed meanwhile. They were
    acknowledged and counted in stats["trimmed"], and nothing said they were gone unhandled."""
    client = any_redis.client()
    ids = _fill(client, 10)
    first = GroupConsumer(client, STREAM, "g", "w1", start="0", count=5, block_ms=100)
    assert [m.id for m in first.read()] == ids[:5]  # taken, never handled: the process "died"
    client.xtrim(STREAM, maxlen=3, approximate=False)
    again = GroupConsumer(client, STREAM, "g", "w1", block_ms=100, claim_idle_ms=60_000)
    again._next_claim = float("inf")  # the restart's own history read, not the claim, meets them
    with caplog.at_level(logging.WARNING, logger="pipeline.consumer"):
        assert [m.id for m in again.read() + again.read()] == ids[7:]
    said = _warnings(caplog, "never acknowledged")
    assert len(said) == 1 and said[0].startswith(f"{STREAM}: 5 entries delivered to group 'g' but never "), said
    assert "trimmed (MAXLEN) or deleted while pending: they are gone" in said[0], said
    assert again.stats["trimmed"] == 5


@pytest.mark.timeout(60)
def test_claimed_entries_trimmed_while_pending_are_said_once(any_redis, caplog):
    """A dead member's pending entries trimmed away, claimed by another: Redis 7 lists them apart, 6.2 gives nil.
    Acknowledged and counted, never said."""
    client = any_redis.client()
    ids = _fill(client, 10)
    GroupConsumer(client, STREAM, "g", "dead", start="0", count=5, block_ms=100).read()
    client.xclaim(STREAM, "g", "dead", 0, ids[:5], idle=100_000, justid=True)  # idle for long
    client.xtrim(STREAM, maxlen=3, approximate=False)
    rescuer = GroupConsumer(client, STREAM, "g", "rescuer", block_ms=100, claim_idle_ms=60_000)
    with caplog.at_level(logging.WARNING, logger="pipeline.consumer"):
        assert rescuer.claim() == []
    said = _warnings(caplog, "never acknowledged")
    assert len(said) == 1 and said[0].startswith(f"{STREAM}: 5 entries delivered to group 'g' but never "), said
    assert rescuer.stats["trimmed"] == 5 and client.xpending(STREAM, "g")["pending"] == 0


@pytest.mark.timeout(60)
def test_tail_group_restarted_says_the_entries_it_held_were_trimmed(redis_server, caplog, capsys):
    """`tail --events --group tg --consumer t1` killed -9 with 3 pending, restarted after MAXLEN trimmed them: its
    only warning was for the entries the group never read; the 3 it had been handed vanished without a word."""
    client = redis_server.client()
    _fill(client, 3, K.events)
    held = GroupConsumer(client, K.events, "tg", "t1", start="0", block_ms=100)
    assert len(held.read()) == 3  # then killed -9: never acknowledged
    _fill(client, 300, K.events, maxlen=200)  # the 3, and 100 the group never read, trimmed
    with caplog.at_level(logging.WARNING, logger="pipeline.consumer"):
        code = main(["tail", "--events", "--group", "tg", "--consumer", "t1", "--json", "--count", "200",
                     "--redis-url", redis_server.url])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and [json.loads(line)["i"] for line in out] == list(range(100, 300))
    said = _warnings(caplog, "never acknowledged")
    assert len(said) == 1 and said[0].startswith(f"{K.events}: 3 entries delivered to group 'tg' "), said
    assert len(_warnings(caplog, "100 entries were trimmed (MAXLEN) before group 'tg' read them")) == 1


# --- 3. a group lost again during the read after it was created again -------------------------------------------

@pytest.mark.timeout(60)
def test_a_stream_deleted_three_times_in_a_row_under_a_blocked_reader(redis_server, caplog):
    """`DEL hv:events`, then again as soon as the consumer had created it again and blocked in its read: the second
    "UNBLOCKED the stream key no longer exists" came out of read() (tail: exit 2). Each loss is said and handled."""
    client, admin = redis_server.client(), redis_server.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", block_ms=5000, claim_idle_ms=60_000)
    published: list[str] = []

    def blocked() -> bool:
        return admin.exists(STREAM) and any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
                                            for c in admin.client_list())

    def delete_each_time_it_blocks() -> None:
        for _ in range(3):
            wait_for(blocked, 20, "the consumer to block in XREADGROUP", poll=0.02)
            admin.delete(STREAM)  # Redis answers the blocked read at once
        wait_for(blocked, 20, "the consumer to block in XREADGROUP again", poll=0.02)
        published.extend(_fill(admin, 1))

    helper = threading.Thread(target=delete_each_time_it_blocks, daemon=True)
    helper.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.consumer"):
            got = consumer.read()
    finally:
        helper.join(30)
    assert [m.id for m in got] == published
    gone = _warnings(caplog, "group 'g' is gone (UNBLOCKED the stream key no longer exists)")
    assert len(gone) == 3, gone
