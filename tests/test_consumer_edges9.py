"""GroupConsumer (pipeline/consumer.py) where its loop died: on a foreign entry whose field name is not UTF-8 (burying
it decoded the name), and on a failover behind one address (the old master, a replica now, answered READONLY to
the read or the acknowledgement); where a wrong key named no stream; and `tail --group` leaving its host-pid
consumer name behind."""

from __future__ import annotations

import json
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.consumer import GroupConsumer
from running import wait_for
from servers import HOST, RedisServer
from test_consumer_retry import LosingProxy

STREAM = "edges9:events"


def _fill(client, n: int, first: int = 0) -> list[str]:
    return [client.xadd(STREAM, {"data": json.dumps({"i": i})}).decode() for i in range(first, first + n)]


def test_a_foreign_entry_whose_field_name_is_not_utf8_is_buried_and_the_loop_goes_on(any_redis):
    """Another tool wrote an entry with a binary field name and no ``data``: burying it decoded its field names,
    the UnicodeDecodeError ended run(), and a restart read it back first and died again. The entry goes to
    ``{stream}:dead`` under its own field names; the next message is handled."""
    client = any_redis.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100)
    foreign = client.xadd(STREAM, {b"\xff\xfe": b"\x00\x01"}).decode()
    ids = _fill(client, 1)
    handled: list[str] = []
    deadline = time.monotonic() + 10
    assert consumer.run(lambda m: handled.append(m.id), stop=lambda: time.monotonic() > deadline,
                        max_messages=1) == 1
    assert handled == ids
    [(_, dead)] = client.xrange(f"{STREAM}:dead")
    assert dead[b"\xff\xfe"] == b"\x00\x01" and dead[b"source_id"].decode() == foreign
    assert client.xpending(STREAM, "g")["pending"] == 0


def test_a_stream_name_that_holds_another_type_is_named(redis_server):
    """WRONGTYPE does not say which key: among several streams, the user could not tell which name was wrong."""
    client = redis_server.client()
    client.hset("edges9:cameras", "lobby", "{}")
    with pytest.raises(redis.ResponseError, match="edges9:cameras: WRONGTYPE"):
        GroupConsumer(client, [STREAM, "edges9:cameras"], "g", "w", block_ms=100)


class _FailOver:
    """Redis behind one address (a proxy, a DNS name) fails over: ``second`` takes over the data, new connections
    reach it, and the old master becomes its replica (it answers READONLY to writes)."""

    def __init__(self, first: RedisServer, second: RedisServer) -> None:
        self.first, self.second = first, second
        self.proxy = LosingProxy(first.port)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.proxy.url(), socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def __call__(self) -> None:
        old, new = self.first.client(), self.second.client()
        for c in (old, new):  # no 5 s wait before a full sync (Redis 7's default)
            c.config_set("repl-diskless-sync-delay", "0")
        new.replicaof(HOST, self.first.port)
        wait_for(lambda: new.info("replication")["master_link_status"] == "up", 20, "the replica's sync")
        wait_for(lambda: new.xlen(STREAM) == old.xlen(STREAM), 20, "the stream's copy")
        new.replicaof("NO", "ONE")
        self.proxy.upstream_port = self.second.port
        old.replicaof(HOST, self.second.port)
        wait_for(lambda: old.info("replication")["master_link_status"] == "up", 20, "the old master's sync")


@pytest.fixture
def fail_over(redis_server):
    with RedisServer(binary=redis_server.binary) as second:
        f = _FailOver(redis_server, second)
        yield f
        f.proxy.close()


def test_a_consumer_reads_on_from_the_new_master_after_a_failover(fail_over):
    """The consumer kept its connection to the old master, a replica now: READONLY is no ConnectionError, so
    run() died on it (and waiting it out on that connection would have been refused for ever). The connection
    is dropped, the next one reaches the new master."""
    client = fail_over.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_every_s=0)
    ids = _fill(client, 1)
    consumer.ack(*consumer.read())  # its connection stays in the pool, to the old master
    fail_over()
    ids += _fill(fail_over.second.client(), 1, first=1)
    handled: list[str] = []
    deadline = time.monotonic() + 10
    assert consumer.run(lambda m: handled.append(m.id), stop=lambda: time.monotonic() > deadline,
                        max_messages=1) == 1
    assert handled == ids[1:]


def test_a_failover_while_a_handler_runs_hands_its_message_out_again(fail_over):
    """The acknowledgement met the old master, a replica now: ReadOnlyError ended run(). The message stays
    pending (at least once) and is handled again from the new master, then the next one."""
    client = fail_over.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100)
    ids = _fill(client, 1)
    handled: list[str] = []

    def handle(m) -> None:
        handled.append(m.id)
        if len(handled) == 1:
            fail_over()
            ids.extend(_fill(fail_over.second.client(), 1, first=1))

    deadline = time.monotonic() + 10
    assert consumer.run(handle, stop=lambda: time.monotonic() > deadline, max_messages=2) == 2
    assert handled == [ids[0], ids[0], ids[1]]
    assert fail_over.second.client().xpending(STREAM, "g")["pending"] == 0


@pytest.mark.parametrize("named", [False, True])
def test_tail_group_without_a_consumer_name_leaves_none_behind(redis_server, named, capsys):
    """Each `tail --group` run without --consumer added a host-pid consumer to the group that nothing used again
    (XINFO CONSUMERS grew by one per run); a name the user gave is theirs to keep."""
    from pipeline.cli import main

    client = redis_server.client()
    for i in range(2):
        client.xadd("hv:events", {"data": json.dumps({"v": 1, "type": "stream_up", "camera": "c1", "ts": i})})
    extra = ["--consumer", "mine"] if named else []
    assert main(["tail", "--events", "--group", "g", "--from-start", "--count", "2", *extra,
                 "--redis-url", redis_server.url]) == 0
    assert capsys.readouterr().out.count("stream_up") == 2
    names = [c["name"].decode() for c in client.xinfo_consumers("hv:events", "g")]
    assert names == (["mine"] if named else [])


def test_a_consumer_holding_entries_does_not_leave(redis_server):
    """leave() must not destroy what the consumer holds: DELCONSUMER drops its pending entries from the group."""
    client = redis_server.client()
    _fill(client, 2)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100)
    assert len(consumer.read(1)) == 1  # read, not acknowledged
    assert consumer.leave() is False
    assert client.xpending(STREAM, "g")["pending"] == 1
