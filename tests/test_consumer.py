"""Consumer groups: a consumer SIGKILLed mid-batch loses nothing, a restarted one resumes its own pending
messages, poison messages are set aside, and `hydravision tail --group` reads through the same code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from pipeline.cli import main
from pipeline.consumer import GroupConsumer
from pipeline.errors import UserError
from pipeline.testbed import RedisServer
from running import wait_for
from servers import require_binary
from workers.publish import Publisher, event_message, keys

ROOT = Path(__file__).resolve().parent.parent
STREAM = keys("hv").events

# A consumer in its own process: handles one message at a time, slowly, writing each id it handled to a
# file BEFORE acknowledging it (so the file lists everything it may have handled).
VICTIM = """
import sys, time, redis
from pipeline.consumer import GroupConsumer
client = redis.Redis.from_url(sys.argv[1], socket_timeout=10)
log = open(sys.argv[2], "a", buffering=1)
consumer = GroupConsumer(client, "hv:events", "workers", "victim", start="0", count=50, claim_idle_ms=60_000)
def handle(m):
    log.write(m.id + "\\n")
    time.sleep(0.05)
consumer.run(handle)
"""


def fill(url: str, n: int) -> list[str]:
    """n real line_crossed events through the Publisher; returns their stream ids."""
    with Publisher(url) as pub:
        for i in range(n):
            pub.publish_event(event_message("line_crossed", "cam", head="vehicles", track_id=i, class_="car",
                                            line="gate", direction="in", frame=i, pts=i / 10, count=i + 1))
        assert pub.flush(10)
    return [i.decode() for i, _ in redis.Redis.from_url(url).xrange(STREAM)]


@pytest.mark.timeout(60)
def test_consumer_killed_mid_batch_loses_nothing(any_redis, tmp_path):
    ids = fill(any_redis.url, 200)
    handled_log = tmp_path / "victim.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, any_redis.url, str(handled_log)], env=env)
    try:
        wait_for(lambda: handled_log.exists() and len(handled_log.read_text().split()) >= 20, 30,
                 "the victim to handle 20 messages")
        victim.send_signal(signal.SIGKILL)  # mid-batch: it had taken 50, handled ~20
        victim.wait(10)
    finally:
        victim.kill()
    client = any_redis.client()
    by_victim = handled_log.read_text().split()
    pending = client.xpending(STREAM, "workers")["pending"]
    assert 0 < pending < 200 - len(by_victim) + 1  # its unacknowledged batch, and what it never read

    rescuer = GroupConsumer(client, STREAM, "workers", "rescuer", count=50, claim_idle_ms=300, block_ms=200)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    rescuer.run(lambda m: seen.append(m.id), stop=lambda: time.monotonic() > deadline or (
        client.xpending(STREAM, "workers")["pending"] == 0 and set(seen) | set(by_victim) >= set(ids)))
    assert set(seen) | set(by_victim) == set(ids)  # every message handled by someone
    assert rescuer.stats["claimed"] >= 1  # the victim's batch was taken over, not re-read from the stream
    assert len(set(seen) & set(by_victim)) <= 1  # at most the one it handled but had not acknowledged yet
    assert client.xpending(STREAM, "workers")["pending"] == 0


def test_restart_under_the_same_name_resumes_its_own_pending_first(any_redis):
    ids = fill(any_redis.url, 10)
    client = any_redis.client()
    first = GroupConsumer(client, STREAM, "g", "worker-1", start="0", count=4, block_ms=100)
    assert [m.id for m in first.read()] == ids[:4]  # taken, never acknowledged: the process "died"
    again = GroupConsumer(client, STREAM, "g", "worker-1", count=4, block_ms=100, claim_idle_ms=60_000)
    assert [(m.id, m.claimed) for m in again.read()] == [(i, True) for i in ids[:4]]
    assert [m.id for m in again.read()] == ids[4:8]


def test_poison_messages_go_to_the_dead_letter_stream(any_redis):
    client = any_redis.client()
    fill(any_redis.url, 1)
    client.xadd(STREAM, {"data": "{not json"})
    consumer = GroupConsumer(client, STREAM, "g", "c", start="0", block_ms=100, claim_idle_ms=1, claim_every_s=0,
                             max_deliveries=3)
    for _ in range(100):  # a handler that always fails: nothing is ever acknowledged
        consumer.read()
        if consumer.stats["dead"] == 2:
            break
        time.sleep(0.005)  # let the entries idle past claim_idle_ms
    dead = {f[b"reason"].decode().split(":")[0]: f for _, f in client.xrange(f"{STREAM}:dead")}
    assert set(dead) == {"not a JSON message", "delivered 4 times without being acknowledged"}
    assert json.loads(dead["delivered 4 times without being acknowledged"][b"data"])["type"] == "line_crossed"
    assert client.xpending(STREAM, "g")["pending"] == 0


def test_a_poison_message_is_buried_even_behind_many_entries_another_consumer_holds(redis_server):
    """Its delivery count is looked up among this consumer's own pending entries: 150 entries pending at
    another consumer between two of its own do not hide the second one's count."""
    client = redis_server.client()
    client.xgroup_create(STREAM, "g", id="0", mkstream=True)

    def deliver(consumer: str, n: int) -> list[str]:
        ids = [client.xadd(STREAM, {"data": "{}"}).decode() for _ in range(n)]
        client.xreadgroup("g", consumer, {STREAM: ">"}, count=n)
        return ids

    [first] = deliver("me", 1)
    deliver("other", 150)
    [poison] = deliver("me", 1)
    client.xclaim(STREAM, "g", "me", 0, [poison], retrycount=10)  # as if its handler had failed 10 times
    consumer = GroupConsumer(client, STREAM, "g", "me", block_ms=100, max_deliveries=5)
    assert [m.id for m in consumer.read()] == [first]
    assert [f[b"source_id"].decode() for _, f in client.xrange(f"{STREAM}:dead")] == [poison]


def test_block_must_be_shorter_than_the_socket_timeout(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    with pytest.raises(ValueError, match="shorter than the client's socket_timeout"):
        GroupConsumer(client, STREAM, "g", block_ms=2000)


@pytest.mark.parametrize("setting", [{"block_ms": 0}, {"count": 0}, {"max_deliveries": 0}, {"claim_idle_ms": -1}])
def test_settings_out_of_range_are_refused_by_name(redis_server, setting):
    """block_ms 0 is BLOCK 0 to Redis, "wait forever": the consumer never saw stop() while the streams were idle."""
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        GroupConsumer(redis_server.client(), STREAM, "g", **setting)


def test_tail_group_prints_and_acknowledges(any_redis, capsys):
    fill(any_redis.url, 5)
    argv = ["tail", "--events", "--redis-url", any_redis.url, "--group", "cli", "--from-start", "--json"]
    assert main(argv + ["--count", "3", "--consumer", "a"]) == 0
    t0 = time.monotonic()
    assert main(argv + ["--count", "2", "--consumer", "b"]) == 0
    # a took only the 3 it printed: b gets the other 2 at once, not after a's claim_idle_ms (30 s)
    assert time.monotonic() - t0 < 10
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [m["track_id"] for m in printed] == [0, 1, 2, 3, 4]  # each message to one member, none twice
    assert any_redis.client().xpending(STREAM, "cli")["pending"] == 0


def test_a_redis_without_xautoclaim_is_a_clear_error(capsys):
    """Redis before 6.2 has no XAUTOCLAIM (Debian 11 ships 6.0, Ubuntu 20.04 5.0): a real server with the
    command renamed away answers as those do ("unknown command"), and the reader says what it needs."""
    require_binary("redis-server")
    with RedisServer(extra_args=["--rename-command", "XAUTOCLAIM", ""]) as server:
        version = server.client().info("server")["redis_version"]
        fill(server.url, 2)
        consumer = GroupConsumer(server.client(), STREAM, "g", start="0", block_ms=100)
        with pytest.raises(UserError, match=rf"{STREAM}: the Redis server \(Redis {version}\) has no XAUTOCLAIM.*"
                                            r"Redis 6\.2 or newer"):
            consumer.read()
        assert main(["tail", "--events", "--redis-url", server.url, "--group", "cli", "--count", "1"]) == 2
        assert "has no XAUTOCLAIM" in capsys.readouterr().err

