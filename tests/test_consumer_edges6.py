"""GroupConsumer (pipeline/consumer.py) where messages came late or its memory only grew: the entries of a read
whose reply was lost waited claim_idle_ms for a claim, and ``_tried`` kept the ids of failed messages that
another consumer took over and settled."""

from __future__ import annotations

import json
import time

import pytest
import redis

from pipeline.consumer import GroupConsumer

STREAM = "edges6:events"


def _fill(client, n: int, first: int = 0) -> list[str]:
    return [client.xadd(STREAM, {"data": json.dumps({"i": i})}).decode() for i in range(first, first + n)]


def _lose_one_reply(client) -> list:
    """Makes the next XREADGROUP that hands out entries lose its reply after Redis ran it (a socket timeout)."""
    real, lost = client.xreadgroup, []

    def reply_lost(*args, **kwargs):
        reply = real(*args, **kwargs)
        if reply and reply[0][1] and not lost:
            lost.append(reply)
            raise redis.TimeoutError("Timeout reading from socket")
        return reply

    client.xreadgroup = reply_lost
    return lost


def test_the_entries_of_a_read_whose_reply_was_lost_are_handled_at_once_and_in_order(redis_server):
    """XREADGROUP ... > hands its entries to the consumer when Redis runs it: with the reply lost, run() read on
    from ">" and the entries stayed pending, unhandled, until the consumer's own claim after claim_idle_ms (a
    minute here), then out of order. After a failed read own pending entries are read first."""
    client = redis_server.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    ids = _fill(client, 3)
    lost = _lose_one_reply(client)
    handled: list[str] = []
    deadline = time.monotonic() + 10
    assert consumer.run(lambda m: handled.append(m.id), stop=lambda: time.monotonic() > deadline,
                        max_messages=3) == 3
    assert lost and handled == ids
    assert client.xpending(STREAM, "g")["pending"] == 0


def test_read_after_a_lost_reply_hands_out_its_entries_before_newer_ones(redis_server):
    """The same through ``read``, for a caller that retries it itself: the next read gave only newer entries."""
    client = redis_server.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    ids = _fill(client, 2)
    _lose_one_reply(client)
    with pytest.raises(redis.TimeoutError):
        consumer.read()
    ids += _fill(client, 1, first=2)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        got += consumer.read()
    assert [m.id for m in got] == ids


def test_tried_forgets_failed_messages_another_consumer_settled(any_redis):
    """``_tried`` (the poison rule's "seen to fail here") kept the ids of messages this consumer failed on that
    another consumer then claimed and acknowledged or buried: a long-running consumer's set only grew. It keeps
    what may still come back to this consumer: its own pending entries."""
    client = any_redis.client()
    failing = GroupConsumer(client, STREAM, "g", "failing", start="0", block_ms=100, claim_idle_ms=60_000,
                            claim_every_s=0)
    ids = _fill(client, 3)
    assert [m.id for m in failing.read()] == ids  # handled without success: left pending
    other = GroupConsumer(client, STREAM, "g", "other", block_ms=100, claim_idle_ms=0, max_deliveries=2)
    taken = other.claim()
    assert [m.id for m in taken] == ids
    other.ack(*taken[:2])
    other.read()  # read again from its own pending entries: past max_deliveries, buried
    assert other.stats["dead"] == 1 and client.xpending(STREAM, "g")["pending"] == 0
    held = _fill(client, 1, first=3)
    rounds = 0
    while rounds < 3:  # a claim pass (every read here) drops what left this consumer; one held stays
        assert [m.id for m in failing.read()] == (held if rounds == 0 else [])
        rounds += 1
    assert failing._tried == {(STREAM, held[0])}
