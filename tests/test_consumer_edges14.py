"""GroupConsumer (pipeline/consumer.py) as an operator's run found it: a member stopped (SIGSTOP, a long GC pause) with
its read blocked in Redis while MAXLEN trimmed past its group jumped the trimmed entries without the WARNING, and
counted them into the next gap it said; a group destroyed (XGROUP DESTROY) under its members was created again from
the start of the stream, which handed out all the stream held once more, and one member said nothing."""

from __future__ import annotations

import json
import logging
import time

import redis

import pipeline.consumer as consumer_module
from pipeline.consumer import GroupConsumer

STREAM = "edges14:events"


def _fill(client, n: int, stream: str = STREAM) -> list[str]:
    return [client.xadd(stream, {"data": json.dumps({"i": i})}).decode() for i in range(n)]


def _trim(client, keep: int, stream: str = STREAM) -> None:
    client.xtrim(stream, maxlen=keep, approximate=False)


def _counted(client) -> bool:
    """Whether Redis counts what was trimmed unread (7 and newer)."""
    return int(client.info("server")["redis_version"].split(".")[0]) >= 7


class _Clock:
    """The consumer module's clock, moved by the test alone: a pause lasts what the test says, whatever the machine."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleep = time.sleep

    def monotonic(self) -> float:
        return self.now


def _clock(monkeypatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(consumer_module, "time", clock)
    return clock


def _stopping_client(server, command: str, stops: list):
    """A client whose process is stopped (SIGSTOP) after Redis answered a ``command`` it sent and before it reads the
    answer, once per function the test puts in ``stops``: that function is what happens meanwhile."""

    class Stopped(redis.Connection):
        sent = ""

        def send_command(self, *args, **kwargs):
            self.sent = str(args[0]).upper()
            return super().send_command(*args, **kwargs)

        def read_response(self, *args, **kwargs):
            if stops and self.sent == command:
                assert self.can_read(timeout=10), f"Redis did not answer {command}"
                stops.pop(0)()
            return super().read_response(*args, **kwargs)

    return server.client(connection_class=Stopped, socket_timeout=10)


def _said(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if what in r.getMessage()]


def _gaps(caplog, group: str) -> list[str]:
    return _said(caplog, f"before group {group!r} read them")


# --- 1. entries trimmed while the process was stopped ----------------------------------------------------------

def test_entries_trimmed_while_the_member_was_stopped_under_its_blocked_read_are_said_and_counted(
        any_redis, caplog, monkeypatch):
    """The operator's repro: `tail x --group R --consumer r1` stopped for 3 s with its read blocked in Redis, entries
    6-60 added, XTRIM MAXLEN 5, SIGCONT: it received [1..5, 56..62] and no warning (the pause was timed from when the
    blocked read returned, at SIGCONT), and the next gap was said as 83 entries where 33 were. Now both are said, each
    with its own count where Redis keeps one (7+)."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin, clock, stops = any_redis.client(), _clock(monkeypatch), []
    counted = _counted(admin)
    consumer = GroupConsumer(_stopping_client(any_redis, "XREADGROUP", stops), STREAM, "R", "r1", block_ms=100,
                             claim_idle_ms=60_000)
    ids = _fill(admin, 5)
    got = consumer.read()
    assert [m.id for m in got] == ids
    consumer.ack(*got)
    kept: list[str] = []

    def stopped_3_s() -> None:  # Redis answered the blocked read (nothing new) before anything below was added
        kept.extend(_fill(admin, 55)[-5:])  # 6..60
        _trim(admin, 5)  # 6..55 trimmed unread
        clock.now += 3

    stops.append(stopped_3_s)
    assert consumer.read() == []
    assert not stops and kept  # stopped under that read
    kept += _fill(admin, 2)  # 61, 62: after SIGCONT
    got = consumer.read()
    assert [m.id for m in got] == kept
    [said] = _gaps(caplog, "R")
    assert STREAM in said and ids[-1] in said and kept[0] in said
    if counted:
        assert "50 entries were trimmed" in said and consumer.stats["skipped"] == 50
    consumer.ack(*got)
    left = _fill(admin, 38)[-5:]  # 63..100: 63..95 trimmed unread
    _trim(admin, 5)
    clock.now += 3  # a slow handler this time
    assert [m.id for m in consumer.read()] == left
    gaps = _gaps(caplog, "R")
    assert len(gaps) == 2
    if counted:
        assert "33 entries were trimmed" in gaps[1] and consumer.stats["skipped"] == 83


def test_entries_trimmed_while_the_member_was_stopped_under_the_check_are_said_too(redis_server, caplog,
                                                                                   monkeypatch):
    """The check before a read after a pause is a round trip of its own: a stop under it let MAXLEN trim more, which
    the read then jumped without a word. A check that took that long is made again."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin, clock, stops = redis_server.client(), _clock(monkeypatch), []
    consumer = GroupConsumer(_stopping_client(redis_server, "EVALSHA", stops), STREAM, "g", "w", block_ms=100,
                             claim_idle_ms=60_000)
    _fill(admin, 5)
    consumer.ack(*consumer.read())  # the first read checks too (Redis learns the script)
    _fill(admin, 15)  # 6..20
    _trim(admin, 5)  # 6..15 trimmed unread
    clock.now += 3
    left: list[str] = []

    def stopped_3_s() -> None:  # the check has run (10 trimmed, from 16 on)
        left.extend(_fill(admin, 20)[-5:])  # 21..40
        _trim(admin, 5)  # 16..35 trimmed unread
        clock.now += 3

    stops.append(stopped_3_s)
    assert [m.id for m in consumer.read()] == left
    assert not stops
    gaps = _gaps(caplog, "g")
    assert len(gaps) == 2 and "10 entries were trimmed" in gaps[0] and "20 entries were trimmed" in gaps[1], gaps
    assert consumer.stats["skipped"] == 30


def test_a_read_with_a_limit_after_a_pause_checks_every_stream(redis_server, caplog, monkeypatch):
    """read(limit) over several streams reads one stream at a time; the pause was timed for all of them together, so
    the first stream's read ended it and the others' gaps went unsaid. Each stream is timed on its own now."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin, clock = redis_server.client(), _clock(monkeypatch)
    streams = [f"{STREAM}:a", f"{STREAM}:b"]
    consumer = GroupConsumer(admin, streams, "g", "w", block_ms=100, claim_idle_ms=60_000)
    for s in streams:
        _fill(admin, 2, s)
    got = consumer.read(limit=10)
    assert len(got) == 4
    consumer.ack(*got)
    clock.now += 3
    for s in streams:
        _fill(admin, 20, s)
        _trim(admin, 5, s)  # 15 trimmed unread
    got = consumer.read(limit=10)
    assert sorted({m.stream for m in got}) == streams and len(got) == 10
    gaps = _gaps(caplog, "g")
    assert sorted(s for s in streams for g in gaps if g.startswith(f"{s}: ")) == streams, gaps
    assert all("15 entries were trimmed" in g for g in gaps), gaps


# --- 2. a group destroyed under its members --------------------------------------------------------------------

def test_a_destroyed_group_is_created_again_where_it_was_and_each_member_says_so_once(any_redis, caplog):
    """XGROUP DESTROY under two members: the one that found it gone created it again from the start (all 1563
    entries the stream held handed out again), and the other, handling its batch, read on in the new group without
    a word. Now it is created again after the last entry the first saw the group deliver, and each says so once:
    what the second held then may be handled twice, nothing before it."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin = any_redis.client()
    ids = _fill(admin, 30)
    a, b = (GroupConsumer(admin, STREAM, "G", name, start="0", count=10, block_ms=100, claim_idle_ms=60_000)
            for name in ("a", "b"))
    got = a.read()
    assert [m.id for m in got] == ids[:10]
    a.ack(*got)
    again: list[str] = []

    def handle(m) -> None:  # b's batch, 10..19
        if m.id == ids[10]:
            admin.xgroup_destroy(STREAM, "G")
            taken = a.read()  # a finds the group gone
            again.extend(x.id for x in taken)
            a.ack(*taken)

    assert b.run(handle, max_messages=10) == 10
    assert again == ids[10:20]  # b's batch, at least once; not 0..9 once more
    [said_a] = _said(caplog, "consumer a:")
    assert "group 'G' is gone" in said_a and f"created again on {STREAM} after {ids[9]}" in said_a, said_a
    [said_b] = _said(caplog, "consumer b:")
    assert f"group 'G' was created again on {STREAM} by another member" in said_b, said_b
    assert [m.id for m in a.read()] == ids[20:30]
    new = _fill(admin, 2)
    assert [m.id for m in b.read()] == new
    assert len(_said(caplog, "consumer a:")) == len(_said(caplog, "consumer b:")) == 1
    assert admin.xinfo_groups(STREAM)[0]["consumers"] == 2


def test_a_member_that_has_read_nothing_creates_a_destroyed_group_again_where_the_group_was(any_redis, caplog):
    """A member of a quiet stream has seen the group deliver nothing when it is destroyed: it knows where the group
    was from when it started, and creates it again there, not from the start."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin = any_redis.client()
    ids = _fill(admin, 5)
    admin.xgroup_create(STREAM, "G", id=ids[-1])
    quiet = GroupConsumer(admin, STREAM, "G", "quiet", block_ms=100, claim_idle_ms=60_000)
    admin.xgroup_destroy(STREAM, "G")
    new = _fill(admin, 2)
    assert [m.id for m in quiet.read()] == new
    [said] = _said(caplog, "consumer quiet:")
    assert f"after {ids[-1]}" in said, said


def test_a_group_lost_in_an_empty_restart_is_created_from_the_start_and_each_member_says_so_once(redis_server,
                                                                                               caplog):
    """Redis restarted empty while a member handled its batch: the first member to read creates the group again from
    the start of the new stream (its entries all after what it had seen), saying why; the other, whose connection
    came back unnoticed, says that another member created it again."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin = redis_server.client()
    ids = _fill(admin, 6)
    a, b = (GroupConsumer(redis_server.client(), STREAM, "G", name, start="0", count=3, block_ms=100,
                          claim_idle_ms=60_000) for name in ("a", "b"))
    a.ack(*a.read())
    again: list[str] = []
    new: list[str] = []

    def handle(m) -> None:  # b's batch, 3..5
        if m.id == ids[3]:
            redis_server.stop()
            redis_server.start()
            new.extend(_fill(admin, 3))
            taken = a.read()
            again.extend(x.id for x in taken)
            a.ack(*taken)

    assert b.run(handle, max_messages=3) == 3
    assert again == new
    [said_a] = _said(caplog, "consumer a:")
    assert (f"created again on {STREAM} from the start: no entry there is as old as {ids[2]}" in said_a
            and "Redis restarted empty" in said_a), said_a
    [said_b] = _said(caplog, "consumer b:")
    assert f"group 'G' was created again on {STREAM} by another member" in said_b, said_b
    more = _fill(admin, 1)
    assert [m.id for m in b.read()] == more
    assert len(_said(caplog, "consumer a:")) == len(_said(caplog, "consumer b:")) == 1


def test_a_member_whose_batch_ends_with_the_group_gone_creates_it_again_itself(redis_server, caplog):
    """Destroyed while a member handled the last message of its batch, nobody having made it again yet: its last
    acknowledgement finds the group gone, and it creates it again after that batch, so another member's next read
    cannot make it behind its back."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin = redis_server.client()
    ids = _fill(admin, 5)
    b = GroupConsumer(admin, STREAM, "G", "b", start="0", count=5, block_ms=100, claim_idle_ms=60_000)
    b.run(lambda m: m.id == ids[-1] and admin.xgroup_destroy(STREAM, "G"), max_messages=5)
    [said] = _said(caplog, "consumer b:")
    assert "group 'G' is gone" in said and f"created again on {STREAM} after {ids[-1]}" in said, said
    new = _fill(admin, 2)
    assert [m.id for m in b.read()] == new


# --- 3. the review of the above --------------------------------------------------------------------------------

def test_gap_checks_slower_in_all_than_a_pause_end_and_the_read_comes(redis_server, caplog, monkeypatch):
    """Five streams whose gap checks took 0.25 s each (a remote Redis; 25 cameras at 40 ms): a round of checks took
    over 1 s, so it was made again, and again: read() never returned. Now a stream checked over 1 s before the round
    ended is checked once more, then the read comes; a gap trimmed in that second is still said."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin, clock = redis_server.client(), _clock(monkeypatch)
    streams = [f"{STREAM}:{i}" for i in range(5)]
    consumer = GroupConsumer(admin, streams, "g", "w", block_ms=100, claim_idle_ms=60_000)
    for s in streams:
        _fill(admin, 2, s)
    consumer.ack(*consumer.read())
    clock.now += 3  # a pause: the next read checks every stream
    checks: list[str] = []
    kept: list[str] = []
    check = consumer._say_trimmed_unread

    def slow(stream: str) -> None:
        assert len(checks) < 20, f"checked {len(checks)} times, and on: {checks}"
        check(stream)
        checks.append(stream)
        if len(checks) == 1:  # checked: then 5 entries of it are trimmed before the group reads them
            kept.extend(_fill(admin, 10, streams[0])[-5:])
            _trim(admin, 5, streams[0])
        clock.now += 0.25

    monkeypatch.setattr(consumer, "_say_trimmed_unread", slow)
    assert [m.id for m in consumer.read()] == kept
    assert checks == streams + streams[:1]  # the first, checked 1.25 s before the round ended, once more
    [said] = _gaps(caplog, "g")
    assert said.startswith(f"{streams[0]}: ") and kept[0] in said, said
    if _counted(admin):
        assert "5 entries were trimmed" in said and consumer.stats["skipped"] == 5


def _waiting_out_client(server, clock: _Clock, block_s: float, stops: list):
    """A client whose every XREADGROUP that blocks in Redis waits out its block_ms on the module's clock (``block_s``),
    at once: CLIENT UNBLOCK ends it as its timeout would. A function in ``stops`` runs after Redis answered such a
    read, the process stopped before it reads the answer (one per read, while there are some)."""
    admin = server.client()

    class WaitingOut(redis.Connection):
        blocked = False

        def send_command(self, *args, **kwargs):
            words = [(a.decode() if isinstance(a, bytes) else str(a)).upper() for a in args]
            self.blocked = words[0] == "XREADGROUP" and "BLOCK" in words
            return super().send_command(*args, **kwargs)

        def read_response(self, *args, **kwargs):
            waited, deadline = False, time.monotonic() + 10
            while self.blocked and not waited and not self.can_read(timeout=0):  # else answered at once
                waited = any(admin.client_unblock(c["id"]) for c in admin.client_list()
                             if c["cmd"] == "xreadgroup" and "b" in c["flags"])
                assert waited or time.monotonic() < deadline, "Redis neither answered XREADGROUP nor blocked it"
                time.sleep(0 if waited else 0.01)
            self.blocked = False
            if waited:
                assert self.can_read(timeout=10), "Redis did not answer XREADGROUP"
                clock.now += block_s
                if stops:
                    stops.pop(0)()
            return super().read_response(*args, **kwargs)

    return server.client(connection_class=WaitingOut, socket_timeout=10)


def _evalsha_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_reads_that_waited_out_block_ms_on_quiet_streams_are_not_followed_by_gap_checks(redis_server, caplog,
                                                                                       monkeypatch):
    """Five quiet streams, block_ms 2000: each read waited out its 2 s in Redis, and a pause timed from when that
    read was sent was over 1 s, so every read after it checked each stream first (4 reads: 20 EVALSHA, none before).
    A read that returned nothing cannot have jumped anything: no check now. A stop under such a read, after Redis
    answered it, is still seen: the next read checks, and says what was trimmed meanwhile."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin, clock, stops = redis_server.client(), _clock(monkeypatch), []
    streams = [f"{STREAM}:{i}" for i in range(5)]
    consumer = GroupConsumer(_waiting_out_client(redis_server, clock, 2.0, stops), streams, "g", "w",
                             block_ms=2000, claim_idle_ms=60_000)
    for s in streams:
        _fill(admin, 1, s)
    consumer.ack(*consumer.read())  # the first read checks (nothing read before it)
    calls = _evalsha_calls(admin)
    for _ in range(4):
        assert consumer.read() == []
    assert _evalsha_calls(admin) == calls
    assert not _gaps(caplog, "g")
    kept: list[str] = []

    def stopped_3_s() -> None:  # after Redis answered the read (nothing new): 15 added, 10 trimmed unread
        kept.extend(_fill(admin, 15, streams[2])[-5:])
        _trim(admin, 5, streams[2])
        clock.now += 3

    stops.append(stopped_3_s)
    assert consumer.read() == []
    assert not stops and kept
    assert [m.id for m in consumer.read()] == kept
    [said] = _gaps(caplog, "g")
    assert said.startswith(f"{streams[2]}: "), said
    if _counted(admin):
        assert "10 entries were trimmed" in said and consumer.stats["skipped"] == 10


def test_a_stop_under_a_read_answered_at_once_is_seen_however_long_block_ms_is(redis_server, caplog, monkeypatch):
    """A read that returned entries may have been answered at once: a stop after that, shorter than block_ms, is a
    pause all the same, and what MAXLEN trimmed in it is said."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin, clock, stops = redis_server.client(), _clock(monkeypatch), []
    consumer = GroupConsumer(_stopping_client(redis_server, "XREADGROUP", stops), STREAM, "g", "w", block_ms=5000,
                             claim_idle_ms=60_000)
    ids = _fill(admin, 3)
    kept: list[str] = []

    def stopped_1_5_s() -> None:  # Redis answered with 3 entries; meanwhile 20 more, 15 trimmed unread
        kept.extend(_fill(admin, 20)[-5:])
        _trim(admin, 5)
        clock.now += 1.5

    stops.extend([lambda: None, stopped_1_5_s])  # the first read is of its own pending entries (none)
    got = consumer.read()
    assert [m.id for m in got] == ids and not stops
    consumer.ack(*got)
    assert [m.id for m in consumer.read()] == kept
    [said] = _gaps(caplog, "g")
    assert ids[-1] in said and kept[0] in said, said
    if _counted(admin):
        assert "15 entries were trimmed" in said


def test_a_destroyed_group_hands_out_again_all_other_members_read_after_where_it_is_made_and_says_so(any_redis,
                                                                                                    caplog):
    """The docs and the warnings said that the batch another member held may be handled twice; all that other members
    read after the entry where the group is created again comes again, what they handled and acknowledged too."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    admin = any_redis.client()
    ids = _fill(admin, 30)
    a, b = (GroupConsumer(admin, STREAM, "G", name, start="0", count=10, block_ms=100, claim_idle_ms=60_000)
            for name in ("a", "b"))
    a.ack(*a.read())  # 0..9
    b.ack(*b.read())  # 10..19, handled and acknowledged
    again: list[str] = []

    def handle(m) -> None:  # b's next batch, 20..29
        if m.id == ids[20]:
            admin.xgroup_destroy(STREAM, "G")
            while taken := a.read():  # a finds the group gone
                again.extend(x.id for x in taken)
                a.ack(*taken)

    assert b.run(handle, max_messages=10) == 10
    assert again == ids[10:30]
    [said_a] = _said(caplog, "consumer a:")
    assert (f"created again on {STREAM} after {ids[9]}" in said_a
            and "all after it is handed out again, what other members read since too" in said_a), said_a
    [said_b] = _said(caplog, "consumer b:")
    assert ("all after the last entry that member had seen it deliver is handed out again, so what this one held "
            "then, or handled since that entry, may be handled twice" in said_b), said_b
