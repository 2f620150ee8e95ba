"""Consumers of the Redis streams (pipeline/consumer.py, examples/node-consumer) where they hung or lost sight of
messages: the Node example stopped by SIGTERM while Redis was away (a container being stopped during an outage)
waited for Redis for ever; GroupConsumer on a redis-py client speaking RESP3 (``protocol=3``) or with
``legacy_responses=False`` took entries into its pending list and never handed them out; a failover behind one
address woke the read blocked on the old master with "UNBLOCKED ... instance state changed", which ended both
GroupConsumer.run and the Node example (which also ended on the READONLY that followed)."""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.consumer import GroupConsumer
from running import wait_for
from servers import HOST, RedisServer
from test_consumer_edges9 import STREAM as FAILOVER_STREAM
from test_consumer_edges9 import _FailOver
from test_consumer_recovery import node_example
from workers.publish import encode, event_message

STREAM = "edges12:events"


def _fill(client, n: int, stream: str = STREAM) -> list[str]:
    return [_text(client.xadd(stream, {"data": json.dumps({"i": i})})) for i in range(n)]


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


@pytest.mark.timeout(60)
def test_node_example_stops_on_sigterm_while_redis_is_away(redis_server, tmp_path):
    """node-redis holds every command while it reconnects, and the read loop waited in one: SIGTERM said "stopping
    after the message in hand" and the process then waited for Redis for ever (a container's stop ended in SIGKILL).
    It now ends at once, exit status 0 with its summary; whatever it held stays pending (at least once)."""
    client = redis_server.client()
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        node = subprocess.Popen(["node", "index.js", "--redis-url", redis_server.url, "--group", "g"],
                                cwd=node_example(), stdout=subprocess.PIPE, stderr=stderr, encoding="utf-8")
    try:
        wait_for(lambda: any(c.get("cmd") == "xreadgroup" for c in client.client_list()), 20, "the consumer to read",
                 poll=0.02)
        redis_server.stop()
        # Its read failed, it waits 200 ms, then the loop's next command waits for Redis. Reconnect attempts back
        # off 50, 100, 200 ms...: on Node's own clock the fourth comes at least 350 ms after the read failed.
        wait_for(lambda: err.read_text().count("ECONNREFUSED") >= 4, 20, "the consumer to try to reconnect",
                 poll=0.02)
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 15 s after SIGTERM: {err.read_text()[-400:]!r}")
    finally:
        node.kill()
        node.communicate()
    text = err.read_text()
    assert node.returncode == 0, text
    assert "SIGTERM: stopping" in text and "handled 0 events" in text, text


REPLY_SHAPES = [{"protocol": 3}, {"protocol": 3, "decode_responses": True}, {"legacy_responses": False}]


@pytest.mark.parametrize("shape", REPLY_SHAPES, ids=["resp3", "resp3-decoded", "unified"])
def test_a_client_whose_stream_reads_come_as_a_dict_is_read(redis_server, shape):
    """redis-py gives XREADGROUP's reply as a dict with RESP3 (stream -> [entries]) and with legacy_responses=False
    (stream -> entries): the consumer took it for a list of pairs and unpacked each stream's name, so a read that had
    just handed entries to it raised ValueError (every restart again: own pending entries come first) or, for a name
    of two characters, returned nothing while they stayed pending under its name. Both shapes are read now."""
    if "legacy_responses" in shape and "legacy_responses" not in inspect.signature(redis.Redis).parameters:
        pytest.skip("this redis-py has no legacy_responses")
    client = redis.Redis(host=HOST, port=redis_server.port, retry=Retry(NoBackoff(), 0), **shape)
    ids = _fill(client, 3)
    other = _fill(client, 2, "ab")  # a name of two characters: unpacked into two "values" without an error
    consumer = GroupConsumer(client, [STREAM, "ab"], "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    assert sorted(m.id for m in consumer.read()) == sorted(ids + other)
    restarted = GroupConsumer(client, [STREAM, "ab"], "g", "w", block_ms=100, claim_idle_ms=60_000)
    seen: list[str] = []
    deadline = time.monotonic() + 10
    assert restarted.run(lambda m: seen.append(m.id), stop=lambda: time.monotonic() > deadline, max_messages=5) == 5
    assert sorted(seen) == sorted(ids + other)  # its own pending entries, read again after the "restart"
    assert client.xpending(STREAM, "g")["pending"] == 0 and client.xpending("ab", "g")["pending"] == 0


@pytest.fixture
def fail_over(redis_server):
    """Redis behind one address fails over (test_consumer_edges9's _FailOver: the old master becomes a replica)."""
    with RedisServer(binary=redis_server.binary) as second:
        f = _FailOver(redis_server, second)
        yield f
        f.proxy.close()


def _blocked_in_xreadgroup(client) -> bool:
    return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in client.client_list())


@pytest.mark.timeout(90)
def test_a_consumer_blocked_in_its_read_reads_on_after_a_failover(fail_over):
    """An idle consumer waits in XREADGROUP BLOCK. When the old master became a replica, Redis woke that read with
    "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)": neither NOGROUP
    nor READONLY, so read() raised it and run() ended (only a consumer not blocked at that moment met READONLY and
    waited). It is now waited out as READONLY is: its connections go, the next reach the new master."""
    client = redis.Redis.from_url(fail_over.proxy.url(), socket_timeout=30, retry=Retry(NoBackoff(), 0))
    ids = [client.xadd(FAILOVER_STREAM, {"data": "{}"}).decode()]
    consumer = GroupConsumer(client, FAILOVER_STREAM, "g", "w", start="0", block_ms=20_000, claim_every_s=0)
    consumer.ack(*consumer.read())

    def fail_over_once_blocked() -> None:
        old = fail_over.first.client()
        wait_for(lambda: _blocked_in_xreadgroup(old), 20, "the consumer to block in XREADGROUP", poll=0.02)
        fail_over()  # within the 20 s the read blocks: it is woken by the failover, not by its timeout
        ids.append(fail_over.second.client().xadd(FAILOVER_STREAM, {"data": "{}"}).decode())

    helper = threading.Thread(target=fail_over_once_blocked)
    helper.start()
    handled: list[str] = []
    deadline = time.monotonic() + 60
    try:
        assert consumer.run(lambda m: handled.append(m.id), stop=lambda: time.monotonic() > deadline,
                            max_messages=1) == 1
    finally:
        helper.join()
    assert handled == ids[1:]


@pytest.mark.timeout(90)
def test_node_example_reads_on_after_a_failover(fail_over):
    """The Node example ended with status 2 on a failover behind one address: woken by "UNBLOCKED ... instance state
    changed" in its blocked read, or refused READONLY by the old master on its next command. It now connects
    again, as pipeline/consumer.py does, and reads on from the new master."""
    def crossing(i: int) -> dict:
        return {"data": encode(event_message("line_crossed", "cam", head="people", track_id=i, class_="person",
                                             line="gate", direction="in", frame=i, pts=i / 10, count=i + 1))}

    events = "hv:events"
    ids = [fail_over.first.client().xadd(events, crossing(0)).decode()]
    node = subprocess.Popen(["node", "index.js", "--redis-url", fail_over.proxy.url(), "--group", "g", "--from-start",
                             "--count", "2", "--idle-exit-ms", "30000"], cwd=node_example(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8")
    try:
        first = node.stdout.readline()
        assert json.loads(first)["id"] == ids[0], node.stderr.read()
        # acknowledged before the new master copies the data (it would be handed out again: at least once)
        wait_for(lambda: fail_over.first.client().xpending(events, "g")["pending"] == 0, 20, "the acknowledgement",
                 poll=0.02)
        fail_over()
        ids.append(fail_over.second.client().xadd(events, crossing(1)).decode())
        out, err = node.communicate(timeout=40)
    finally:
        node.kill()
    assert node.returncode == 0, err
    assert [json.loads(line)["id"] for line in (first + out).splitlines()] == ids
