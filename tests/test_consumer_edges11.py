"""GroupConsumer (pipeline/consumer.py) where a live member's messages were handled twice at once: the tail of a
batch waiting its turn behind slow handlers (each well under claim_idle_ms) went idle for claim_idle_ms, and
another member claimed and handled it while this one handled it too; and examples/node-consumer, whose default
name stayed in the group after every run."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from pipeline.consumer import GroupConsumer
from test_consumer_recovery import node_example

STREAM = "edges11:events"


def _fill(client, n: int) -> list[str]:
    return [client.xadd(STREAM, {"data": json.dumps({"i": i})}).decode() for i in range(n)]


@pytest.mark.parametrize("loop", ["run", "iterator"])
def test_the_tail_of_a_slow_batch_is_not_claimed_and_handled_twice(any_redis, loop):
    """Each handler takes 0.25 s, a quarter of claim_idle_ms (1 s), but eight of them take 2 s: the last entries of
    the batch had been idle a second when the other member claimed, and both members handled them. The rest of a
    batch is renewed while it waits; a message another member did take is left to it. (A message in hand is at
    most ~0.5 s idle now: half a second of margin on a slow machine.)"""
    client = any_redis.client()
    ids = _fill(client, 8)
    slow = GroupConsumer(client, STREAM, "g", "slow", start="0", count=8, block_ms=100, claim_idle_ms=1000)
    other = GroupConsumer(any_redis.client(), STREAM, "g", "other", block_ms=100, claim_idle_ms=1000)
    by_slow: list[str] = []
    by_other: list[str] = []

    def handle(m) -> None:
        by_slow.append(m.id)
        time.sleep(0.25)
        for taken in other.claim():  # the other member's periodic claim, while this handler runs
            by_other.append(taken.id)
            other.ack(taken)

    deadline = time.monotonic() + 20  # were some taken by the other member (a slow machine), the rest is read on
    done = lambda: len({*by_slow, *by_other}) >= 8 or time.monotonic() > deadline  # noqa: E731
    if loop == "run":
        slow.run(handle, stop=done, max_messages=8)
    else:
        for m in slow:
            handle(m)
            if done():
                slow.ack(m)  # leaving the loop leaves the message in hand pending, on purpose
                break
    assert not set(by_slow) & set(by_other), "handled by both members"
    assert sorted(by_slow + by_other) == ids
    assert client.xpending(STREAM, "g")["pending"] == 0
    assert slow.stats["delivered"] == len(by_slow)


def test_normal_path_guard_a_message_trimmed_while_its_batch_waits_is_still_handled(redis_server):
    """Redis 7's XCLAIM drops an entry trimmed while pending from the pending list: the renewal of a waiting batch
    must not take that for another member's claim and skip a message the consumer already holds."""
    client = redis_server.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", count=3, block_ms=100, claim_idle_ms=200)
    handled: list[str] = []

    def handle(m) -> None:
        handled.append(m.id)
        if len(handled) == 1:
            client.xtrim(STREAM, maxlen=0, approximate=False)  # all three gone from the stream, still pending
            time.sleep(0.15)  # past claim_idle_ms / 2: the next message renews the rest first

    consumer.run(handle, max_messages=3)
    assert handled == ids
    assert client.xpending(STREAM, "g")["pending"] == 0


def _crossings(client, n: int) -> list[str]:
    from workers.publish import event_message, keys

    return [client.xadd(keys("hv").events, {"data": json.dumps(event_message(
        "line_crossed", "cam", head="vehicles", track_id=i, class_="car", line="gate", direction="in", frame=i,
        pts=i / 10, count=i + 1))}).decode() for i in range(n)]


def _node(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", "index.js", "--redis-url", url, "--group", "g", "--from-start", *args],
                          cwd=node_example(), capture_output=True, encoding="utf-8", timeout=30)


@pytest.mark.timeout(90)
def test_the_node_example_leaves_no_host_pid_name_behind(redis_server):
    """examples/node-consumer's default name (host-pid) never comes back, and each run left it in the group for
    good (`hydravision tail --group` takes its own out). It now goes at exit where it holds nothing; a name given
    with --consumer stays, and so does one still holding a message (XGROUP DELCONSUMER would destroy it)."""
    client = redis_server.client()
    ids = _crossings(client, 3)

    def consumers() -> dict[str, int]:
        return {c["name"].decode(): int(c["pending"]) for c in client.xinfo_consumers("hv:events", "g")}

    run = _node(redis_server.url, "--count", "1")
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in run.stdout.splitlines()] == ids[:1]
    assert list(consumers().values()) == [2], consumers()  # the rest of its batch handed back: still its own
    run = _node(redis_server.url, "--count", "2", "--claim-idle-ms", "0")
    assert run.returncode == 0, run.stderr
    assert sorted(json.loads(line)["id"] for line in run.stdout.splitlines()) == ids[1:]
    assert list(consumers().values()) == [0], consumers()  # the first run's, empty now; this run's is gone
    _crossings(client, 1)
    run = _node(redis_server.url, "--count", "1", "--consumer", "kept")
    assert run.returncode == 0, run.stderr
    assert "kept" in consumers()
