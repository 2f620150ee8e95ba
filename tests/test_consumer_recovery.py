"""The consumer-group readers (pipeline/consumer.py, examples/node-consumer) where they lost messages, buried
them or stopped: own pending entries trimmed away (MAXLEN), claims of trimmed entries on Redis 6.2, a Redis
restarted without persistence, a message limit over several streams."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.consumer import GroupConsumer
from servers import require_binary, skip_or_fail

STREAM = "audit:events"


def _fill(client, n: int, stream: str = STREAM) -> list[str]:
    return [client.xadd(stream, {"data": json.dumps({"i": i})}).decode() for i in range(n)]


def test_own_pending_entries_trimmed_away_are_acknowledged_not_buried(any_redis):
    """A consumer restarting under its name re-reads its pending entries (XREADGROUP id 0); those the stream's
    MAXLEN trimmed away come back without fields: they are counted as trimmed and acknowledged, not moved to
    {stream}:dead as 'not a JSON message'."""
    client = any_redis.client()
    ids = _fill(client, 10)
    first = GroupConsumer(client, STREAM, "g", "w1", start="0", count=5, block_ms=100)
    assert [m.id for m in first.read()] == ids[:5]  # taken, never handled: the process "died"
    client.xtrim(STREAM, maxlen=3, approximate=False)  # the 5 pending entries are gone
    again = GroupConsumer(client, STREAM, "g", "w1", block_ms=100, claim_idle_ms=60_000)
    again._next_claim = float("inf")  # the restart's own history read, not the claim, meets them first
    got = again.read() + again.read()
    assert [m.id for m in got] == ids[7:]
    assert again.stats["trimmed"] == 5 and again.stats["dead"] == 0
    assert client.exists(f"{STREAM}:dead") == 0
    assert client.xpending(STREAM, "g")["pending"] == 3  # only the 3 just delivered


def test_claiming_entries_trimmed_while_pending_does_not_crash(any_redis):
    """Another consumer's pending entries trimmed away: on Redis 6.2 XAUTOCLAIM claims them and returns nil in
    their place (no id); the consumer acknowledges them instead of failing on every read."""
    client = any_redis.client()
    ids = _fill(client, 10)
    dead = GroupConsumer(client, STREAM, "g", "dead", start="0", count=5, block_ms=100)
    assert len(dead.read()) == 5
    client.xtrim(STREAM, maxlen=3, approximate=False)
    time.sleep(0.25)
    rescuer = GroupConsumer(client, STREAM, "g", "rescuer", block_ms=100, claim_idle_ms=200)
    seen = []
    for _ in range(4):
        for m in rescuer.read():
            seen.append(m.id)
            rescuer.ack(m)
    assert seen == ids[7:]
    assert rescuer.stats["trimmed"] == 5
    assert client.xpending(STREAM, "g")["pending"] == 0


def test_a_redis_restarted_empty_does_not_stop_the_consumer(redis_server):
    """Redis restarted without persistence (the embedded one always is): the stream and the group are gone,
    redis-py reconnects on its own, and XREADGROUP answers NOGROUP. The consumer creates the group again,
    from the start of the new stream, and loses nothing published since."""
    client = redis_server.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", block_ms=100, claim_idle_ms=60_000)
    assert consumer.read() == []
    client.flushall()  # what the restart leaves
    ids = _fill(client, 3)  # published before the consumer's next read
    seen = []
    deadline = time.monotonic() + 5
    consumer.run(lambda m: seen.append(m.id), stop=lambda: len(seen) >= 3 or time.monotonic() > deadline)
    assert seen == ids
    assert client.xpending(STREAM, "g")["pending"] == 0


def test_max_messages_over_several_streams_leaves_nothing_pending(redis_server):
    """run(max_messages=N) on two streams takes at most N entries in all, not N per stream: what it took and
    did not handle would wait claim_idle_ms for another consumer."""
    client = redis_server.client()
    a, b = f"{STREAM}:a", f"{STREAM}:b"
    _fill(client, 5, a)
    _fill(client, 5, b)
    consumer = GroupConsumer(client, [a, b], "g", "w", start="0", block_ms=100)
    assert consumer.run(lambda m: None, max_messages=3) == 3
    assert client.xpending(a, "g")["pending"] + client.xpending(b, "g")["pending"] == 0
    rest = GroupConsumer(client, [a, b], "g", "w2", block_ms=100, claim_idle_ms=60_000)
    seen = []
    rest.run(lambda m: seen.append(m.id), max_messages=7)
    assert len(seen) == 7  # the other 7, none lost


@pytest.mark.parametrize("limit", [1, 2])
def test_read_with_a_limit_returns_at_most_that_many(redis_server, limit):
    client = redis_server.client()
    streams = [f"{STREAM}:{k}" for k in "xyz"]
    for s in streams:
        _fill(client, 4, s)
    consumer = GroupConsumer(client, streams, "g", "w", start="0", block_ms=100)
    got = consumer.read(limit)
    assert 1 <= len(got) <= limit
    pending = sum(client.xpending(s, "g")["pending"] for s in streams)
    assert pending == len(got)


def test_released_messages_are_claimable_at_once(any_redis):
    """What read(limit) took beyond the limit (a race over several streams) is handed back: another consumer
    claims it at once, not after claim_idle_ms, and its delivery count did not grow."""
    client = any_redis.client()
    ids = _fill(client, 3)
    taker = GroupConsumer(client, STREAM, "g", "taker", start="0", block_ms=100, claim_idle_ms=60_000)
    taken = taker.read()
    assert [m.id for m in taken] == ids
    taker._release(taken[1:])
    other = GroupConsumer(client, STREAM, "g", "other", block_ms=100, claim_idle_ms=60_000)
    assert [(m.id, m.claimed) for m in other.claim()] == [(i, True) for i in ids[1:]]
    rows = client.xpending_range(STREAM, "g", min="-", max="+", count=10)
    assert {r["message_id"].decode(): int(r["times_delivered"]) for r in rows} == {ids[0]: 1, ids[1]: 2, ids[2]: 2}


NODE_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node-consumer"


def node_example() -> Path:
    """The Node example with its packages (npm ci, as tests/test_analytics_e2e.py does, when not there yet)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            require_binary(tool)  # skips, or fails under CI=true
    if not (NODE_EXAMPLE / "node_modules" / "redis").exists():
        install = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_EXAMPLE, capture_output=True,
                                 encoding="utf-8", timeout=150)
        if install.returncode != 0:
            skip_or_fail(f"npm ci failed in {NODE_EXAMPLE} (no access to the npm registry?): {install.stderr[-500:]}")
    return NODE_EXAMPLE


@pytest.mark.timeout(60)
def test_node_consumer_survives_a_redis_restart(redis_server):
    """examples/node-consumer across a Redis restart without persistence: it used to print the error and then
    hang forever (the client kept reconnecting, nothing read); it now re-creates its group and goes on."""
    from workers.publish import Publisher, event_message, keys

    node = subprocess.Popen(["node", "index.js", "--redis-url", redis_server.url, "--group", "lines", "--count", "2",
                             "--idle-exit-ms", "15000"], cwd=node_example(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8")
    try:
        time.sleep(1.5)  # connected, blocked in XREADGROUP
        redis_server.stop()
        time.sleep(0.3)
        redis_server.start()
        time.sleep(1.0)  # reconnected
        with Publisher(redis_server.url) as pub:
            for i in range(2):
                pub.publish_event(event_message("line_crossed", "cam", head="vehicles", track_id=i, class_="car",
                                                line="gate", direction="in", frame=i, pts=i / 10, count=i + 1))
            assert pub.flush(10)
        out, err = node.communicate(timeout=20)
    finally:
        node.kill()
    assert node.returncode == 0, err
    assert [json.loads(line)["track_id"] for line in out.splitlines()] == [0, 1]
    assert redis_server.client().xpending(keys("hv").events, "lines")["pending"] == 0
