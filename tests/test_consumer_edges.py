"""GroupConsumer (pipeline/consumer.py) at its edges, where it lost, duplicated or held back messages, crashed,
or refused a bad setting without naming it: a stream deleted under a blocked reader, stream names as bytes, a
message nested too deep for the JSON decoder, a poison message behind the consumer's own pending entries, a loop
left early. And pipeline/scoring.py on a start past the last frame."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipeline.consumer import GroupConsumer
from running import wait_for

STREAM = "edges:events"


def _fill(client, n: int, stream: str = STREAM) -> list[str]:
    return [client.xadd(stream, {"data": json.dumps({"i": i})}).decode() for i in range(n)]


def _pending(client, stream: str = STREAM) -> dict[str, tuple[str, int]]:
    rows = client.xpending_range(stream, "g", min="-", max="+", count=1000)
    return {r["message_id"].decode(): (r["consumer"].decode(), int(r["times_delivered"])) for r in rows}


def test_a_stream_deleted_under_a_blocked_reader_does_not_stop_the_consumer(redis_server):
    """Redis 7 wakes an XREADGROUP blocked on a stream that is deleted with "UNBLOCKED the stream key no longer
    exists", not NOGROUP: read() raised it, and run() stopped. The group went with the stream: it is created
    again, and what is published next is read."""
    client = redis_server.client()
    _fill(client, 1)  # before the group, which starts at "$": not read
    consumer = GroupConsumer(client, STREAM, "g", "w", block_ms=1000, claim_idle_ms=60_000)

    def delete_once_blocked() -> None:
        wait_for(lambda: any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
                             for c in client.client_list()), 5, "the consumer to block in XREADGROUP", poll=0.02)
        client.delete(STREAM)

    helper = threading.Thread(target=delete_once_blocked)
    helper.start()
    try:
        assert consumer.read() == []
    finally:
        helper.join()
    ids = _fill(client, 2)
    seen: list[str] = []
    deadline = time.monotonic() + 5
    consumer.run(lambda m: seen.append(m.id), stop=lambda: len(seen) >= 2 or time.monotonic() > deadline)
    assert seen == ids
    assert client.xpending(STREAM, "g")["pending"] == 0


@pytest.mark.parametrize("streams", [STREAM.encode(), [STREAM.encode()]], ids=["bytes", "list-of-bytes"])
def test_stream_names_as_bytes_are_read(any_redis, streams):
    """redis-py's SCAN and KEYS give names as bytes. list(b"edges:events") was a list of ints (streams named
    "101", "100", ...), and a bytes name in a list never matched XREADGROUP's decoded reply: its entries went
    pending under the consumer's name, unseen until claimed claim_idle_ms later."""
    client = any_redis.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, streams, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    got = consumer.read()
    assert [(m.stream, m.id) for m in got] == [(STREAM, i) for i in ids]
    assert consumer.streams == [STREAM]


def test_a_stream_named_twice_hands_each_entry_out_once(any_redis):
    client = any_redis.client()
    ids = _fill(client, 2)
    consumer = GroupConsumer(client, [STREAM, STREAM], "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    assert [m.id for m in consumer.read()] == ids


@pytest.mark.parametrize("setting", [{"block_ms": None}, {"count": 2.5}, {"claim_idle_ms": None},
                                     {"max_deliveries": "3"}, {"block_ms": 1.5}])
def test_settings_of_the_wrong_type_are_refused_by_name(redis_server, setting):
    """None or a float failed later (``None < 1``, ``None / 2000``, redis-py's "XREADGROUP count must be a
    positive integer" on the first read), without naming the setting."""
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        GroupConsumer(redis_server.client(), STREAM, "g", **setting)


def test_no_streams_is_refused_by_name(redis_server):
    """It used to be accepted, and every read failed in redis-py: "XREADGROUP streams must be a non empty dict"."""
    with pytest.raises(ValueError, match="^streams must name at least one stream"):
        GroupConsumer(redis_server.client(), [], "g")


def test_a_bad_start_is_refused_by_name(redis_server):
    """Redis answers only "Invalid stream ID specified as stream command argument"."""
    with pytest.raises(ValueError, match=r"^start must be .*'now'"):
        GroupConsumer(redis_server.client(), STREAM, "g", start="now")


def test_a_message_nested_too_deep_for_json_is_buried(any_redis):
    """json.loads raises RecursionError (not ValueError) on deep nesting: it escaped read(), on every read, and
    the entry, pending, came back at every claim: one message stopped the consumer for good."""
    client = any_redis.client()
    client.xadd(STREAM, {"data": "[" * 100_000})
    ids = _fill(client, 1)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    assert [m.id for m in consumer.read()] == ids
    assert consumer.stats["dead"] == 1
    [(_, dead)] = client.xrange(f"{STREAM}:dead")
    assert dead[b"reason"].startswith(b"not a JSON message: RecursionError")
    assert set(_pending(client)) == set(ids)


def test_a_poison_message_is_buried_even_behind_many_of_its_own_entries_not_yet_idle(any_redis):
    """Delivery counts were looked up over the claimed range in one XPENDING with COUNT claimed + 100: the
    consumer's own entries pending in that range (its handler failed on them a moment ago, so not idle enough to
    be claimed) used up the count, and a poison message's count read as 1: it was handed out again, forever."""
    client = any_redis.client()
    client.xgroup_create(STREAM, "g", id="0", mkstream=True)

    def deliver(n: int) -> list[str]:
        ids = [client.xadd(STREAM, {"data": "{}"}).decode() for _ in range(n)]
        client.xreadgroup("g", "me", {STREAM: ">"}, count=n)
        return ids

    [first] = deliver(1)
    deliver(150)  # its own, delivered just now
    [poison] = deliver(1)
    client.xclaim(STREAM, "g", "me", 0, [first], idle=60_000)  # idle long enough to be claimed
    client.xclaim(STREAM, "g", "me", 0, [poison], idle=60_000, retrycount=10)  # as if its handler failed 10 times
    consumer = GroupConsumer(client, STREAM, "g", "me", block_ms=100, claim_idle_ms=30_000, max_deliveries=5)
    assert [m.id for m in consumer.claim()] == [first]
    assert [f[b"source_id"].decode() for _, f in client.xrange(f"{STREAM}:dead")] == [poison]


def test_leaving_the_loop_early_hands_back_the_rest_of_the_batch(any_redis):
    """``for m in consumer: ... break`` left the whole batch pending under the consumer's name: another consumer
    got it only after claim_idle_ms (30 s by default). The rest is now claimable at once, its delivery count
    unchanged; the message the loop was on stays pending (its body may not have finished)."""
    client = any_redis.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    for m in consumer:
        assert m.id == ids[0]
        break
    other = GroupConsumer(client, STREAM, "g", "other", block_ms=100, claim_idle_ms=60_000)
    assert [m.id for m in other.claim()] == ids[1:]
    assert _pending(client) == {ids[0]: ("w", 1), ids[1]: ("other", 2), ids[2]: ("other", 2)}


def test_the_loop_acknowledges_each_message_when_it_asks_for_the_next(any_redis):
    """Normal-path guard (passes before and after): what the loop finished is acknowledged, nothing else."""
    client = any_redis.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)
    seen = []
    for m in consumer:
        seen.append(m.id)
        if len(seen) == 3:
            break
    assert seen == ids
    assert set(_pending(client)) == {ids[2]}


def test_mot_scores_with_start_past_the_last_frame_scores_no_frames():
    """"frames" was len(truths) - start: negative when start is past the last frame."""
    from pipeline.scoring import mot_scores, scene_truth

    scores = mot_scores([], scene_truth(0, 2), start=5)
    assert scores["frames"] == 0 and scores["frames_without_message"] == 0


def test_a_handler_interrupted_mid_batch_hands_back_the_rest(any_redis):
    """Ctrl-C (KeyboardInterrupt) in ``run``'s handler, as in `hydravision tail --group`, left the rest of the
    batch pending under a name that never comes back: another consumer got it only after claim_idle_ms."""
    client = any_redis.client()
    ids = _fill(client, 3)
    consumer = GroupConsumer(client, STREAM, "g", "w", start="0", block_ms=100, claim_idle_ms=60_000)

    def interrupted(m) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consumer.run(interrupted)
    other = GroupConsumer(client, STREAM, "g", "other", block_ms=100, claim_idle_ms=60_000)
    assert [m.id for m in other.claim()] == ids[1:]
    assert _pending(client)[ids[0]] == ("w", 1)  # the one being handled stays pending, as any failed one
