"""GroupConsumer (pipeline/consumer.py) where it lost messages or left them pending for good: a consumer forgotten
while it came back (XGROUP DELCONSUMER destroyed the entries it had just taken), and Redis 6.2's nil claims
past the XPENDING cap of a claim() asked for more than the consumer's count. And where run() and the iterator
stopped: a Redis restart met by the acknowledgement, not by the read."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Iterator

import pytest

from pipeline.consumer import GroupConsumer
from pipeline.testbed import RedisServer
from servers import require_binary

STREAM = "edges5:events"


def _fill(client, n: int, stream: str = STREAM) -> list[str]:
    return [client.xadd(stream, {"data": json.dumps({"i": i})}).decode() for i in range(n)]


def test_a_consumer_that_comes_back_while_it_is_forgotten_keeps_what_it_took(any_redis):
    """forget_idle_consumers read XINFO CONSUMERS, then deleted: a consumer that read new entries in between was
    deleted with them pending (DELCONSUMER drops a consumer's pending entries: never handled, never claimed). The
    check is made again, atomically with the delete; a consumer that stayed idle with nothing pending still goes."""
    client = any_redis.client()
    keeper = GroupConsumer(client, STREAM, "g", "keeper", start="0", block_ms=100, claim_idle_ms=60_000)
    client.xgroup_createconsumer(STREAM, "g", "back")
    client.xgroup_createconsumer(STREAM, "g", "gone")
    ids = _fill(client, 3)
    xinfo, came_back = client.xinfo_consumers, []

    def back_between_the_check_and_the_delete(*args, **kwargs):
        rows = xinfo(*args, **kwargs)
        came_back.extend(e[0].decode() for _, entries in client.xreadgroup("g", "back", {STREAM: ">"}) for e in entries)
        return rows

    client.xinfo_consumers = back_between_the_check_and_the_delete
    assert sorted(keeper.forget_idle_consumers(idle_ms=0)) == ["gone"]
    assert came_back == ids
    assert {r["message_id"].decode(): r["consumer"].decode()
            for r in client.xpending_range(STREAM, "g", min="-", max="+", count=10)} == dict.fromkeys(ids, "back")
    assert sorted(c["name"].decode() for c in xinfo(STREAM, "g")) == ["back"]


def test_claimed_deleted_entries_past_the_cap_of_a_larger_claim_are_acknowledged_on_6_2(redis6):
    """Redis 6.2's XAUTOCLAIM gives an entry deleted while pending as nil and keeps it pending, now this
    consumer's; the consumer finds its id with XPENDING, capped from self.count. claim(count) above that scanned
    further (10 * COUNT entries): nils beyond the cap stayed pending, claimed again as nil at every pass."""
    client = redis6.client()
    ids = _fill(client, 200)
    w = GroupConsumer(client, STREAM, "g", "w", start="0", count=1, block_ms=100, claim_idle_ms=60_000)
    client.xreadgroup("g", "dead", {STREAM: ">"}, count=200)
    client.xclaim(STREAM, "g", "w", 0, ids[:150], justid=True)  # w's own, fresh: not claimed, but in the range
    client.xclaim(STREAM, "g", "dead", 0, ids[150:], idle=100_000, justid=True)  # dead's, idle for long
    client.xdel(STREAM, *ids[150:])  # trimmed while pending
    assert w.claim(count=50) == []
    assert w.stats["trimmed"] == 50
    pending = client.xpending_range(STREAM, "g", min="-", max="+", count=1000)
    assert [r["message_id"].decode() for r in pending] == ids[:150]  # the 50 deleted ones acknowledged



@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    """A redis-server that saves on shutdown: a restart keeps the stream, the group and its pending entries."""
    require_binary("redis-server")
    with RedisServer(extra_args=["--save", "3600 1"]) as server:
        yield server


def test_run_goes_on_after_a_redis_restart_while_a_handler_runs(restartable_redis):
    """A Redis restart met by the read is waited out, but one met by the acknowledgement (the handler ran
    meanwhile) ended run() with ConnectionError: the service's consumer stopped. Now the message stays pending and
    is handled again (at least once), and the rest of its batch is read back at once, not after claim_idle_ms."""
    server = restartable_redis
    client = server.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    handled: list[str] = []
    deadline = time.monotonic() + 20

    def handle(m) -> None:
        handled.append(m.id)
        if len(handled) == 1:
            server.stop()  # saves, then exits: the acknowledgement meets no server

    def stop() -> bool:
        if not server.running:
            server.start()
        return set(handled) == set(ids) or time.monotonic() > deadline

    assert consumer.run(handle, stop=stop) == 3
    assert handled == [ids[0], ids[0], ids[1], ids[2]]
    assert client.xpending(STREAM, "g")["pending"] == 0


def test_the_iterator_goes_on_after_a_redis_restart_while_the_loop_body_runs(restartable_redis):
    """The same for ``for message in consumer``: the acknowledgement that failed ended the loop."""
    server = restartable_redis
    client = server.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    waiting, abandoned = threading.Event(), threading.Event()

    class _Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "lost Redis" in record.getMessage():  # the loop waits for Redis: bring it back
                waiting.set()

    def restart_once_waited_for() -> None:
        if waiting.wait(20) and not abandoned.is_set():
            server.start()

    seen, restarter = _Seen(), threading.Thread(target=restart_once_waited_for, daemon=True)
    logging.getLogger("pipeline.consumer").addHandler(seen)
    handled: list[str] = []
    try:
        for m in consumer:
            handled.append(m.id)
            if len(handled) == 1:
                server.stop()
                restarter.start()
            if set(handled) == set(ids) or len(handled) > 10:
                consumer.ack(m)
                break
    finally:
        logging.getLogger("pipeline.consumer").removeHandler(seen)
        abandoned.set()
        waiting.set()
        if restarter.is_alive():
            restarter.join(30)
    assert handled == [ids[0], ids[0], ids[1], ids[2]]
    assert server.client().xpending(STREAM, "g")["pending"] == 0
