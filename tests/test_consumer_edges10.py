"""GroupConsumer (pipeline/consumer.py) given a ``decode_responses=True`` client, where a foreign entry that is not
UTF-8 ended its loop; entries MAXLEN trimmed before the group read them, skipped without a word; and redact_text
(workers/redact.py) masking a short password everywhere in a line."""

from __future__ import annotations

import json
import logging
import time

import redis

from pipeline.consumer import GroupConsumer
from workers.redact import redact_text

STREAM = "edges10:events"


def _fill(client, n: int, maxlen: int | None = None) -> list[str]:
    return [client.xadd(STREAM, {"data": json.dumps({"i": i})}, maxlen=maxlen, approximate=False).decode()
            for i in range(n)]


def _decoding(server) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=10)


def test_a_decoding_client_buries_a_foreign_entry_that_is_not_utf8_and_goes_on(any_redis):
    """redis-py decoded the reply while parsing it: the UnicodeDecodeError ended run(), and a restart read the entry
    back first (own pending) and died again. The entries go to ``{stream}:dead``; the next message is handled."""
    raw = any_redis.client()
    consumer = GroupConsumer(_decoding(any_redis), STREAM, "g", "w", start="0", block_ms=100)
    foreign = [raw.xadd(STREAM, {"data": b"\xff\xfe{}"}).decode(), raw.xadd(STREAM, {b"\xc3": b"\xff"}).decode()]
    ids = _fill(raw, 1)
    handled: list[str] = []
    deadline = time.monotonic() + 10
    assert consumer.run(lambda m: handled.append(m.id), stop=lambda: time.monotonic() > deadline,
                        max_messages=1) == 1
    assert handled == ids and isinstance(handled[0], str)
    assert [f[b"source_id"].decode() for _, f in raw.xrange(f"{STREAM}:dead")] == foreign
    assert raw.xpending(STREAM, "g")["pending"] == 0


def test_a_decoding_client_claims_a_dead_members_foreign_entry(any_redis):
    """XAUTOCLAIM's reply was decoded too: the member taking over a dead one's entries died on the foreign one."""
    raw = any_redis.client()
    GroupConsumer(raw, STREAM, "g", "dead", start="0", block_ms=100)
    raw.xadd(STREAM, {"data": b"\xff"})
    ids = _fill(raw, 1)
    raw.xreadgroup("g", "dead", {STREAM: ">"})  # taken, never acknowledged: the member died
    rescuer = GroupConsumer(_decoding(any_redis), STREAM, "g", "rescuer", block_ms=100, claim_idle_ms=0)
    assert [m.id for m in rescuer.read()] == ids
    assert rescuer.stats["dead"] == 1 and rescuer.stats["claimed"] == 1


def _gaps(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "before group 'g' read them" in r.getMessage()]


def test_entries_trimmed_before_a_stopped_consumer_read_them_are_said_once(any_redis, caplog):
    """A consumer stopped while MAXLEN trimmed past where its group had read: restarted, it went on from the oldest
    entry left without a word, and a downstream count was silently short. Now it says it once, with the count where
    Redis keeps one (7+), and goes on."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    client = any_redis.client()
    counted = int(client.info("server")["redis_version"].split(".")[0]) >= 7
    first = GroupConsumer(client, STREAM, "g", "w", block_ms=100)
    _fill(client, 5, maxlen=10)
    first.ack(*first.read())
    assert not _gaps(caplog)
    kept = _fill(client, 30, maxlen=10)[-10:]  # 25 trimmed: the 5 read, and 20 the group never saw
    again = GroupConsumer(client, STREAM, "g", "w", block_ms=100)
    got = again.read()
    assert [m.id for m in got] == kept
    [said] = _gaps(caplog)
    assert STREAM in said and kept[0] in said
    if counted:
        assert "20 entries were trimmed" in said and again.stats["skipped"] == 20
    again.ack(*got)
    _fill(client, 5, maxlen=10)  # trims only entries the group read
    again.ack(*again.read())
    assert len(_gaps(caplog)) == 1  # said once per gap


def test_a_backlog_overtaken_by_trimming_is_said_per_gap_with_its_own_count(redis_server, caplog, monkeypatch):
    """A consumer behind (full batches) that MAXLEN overtakes, twice: each gap said with its own count (Redis 7.0
    counted on from the group's stale entries-read, so the second gap's count held the first's), and a consumer
    keeping up reads without checking (no extra round trip per read)."""
    import pipeline.consumer as consumer_module

    # only a full batch may trigger a check (raising=False: the original code has no such setting)
    monkeypatch.setattr(consumer_module, "_GAP_CHECK_AFTER_S", 3600.0, raising=False)
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    client = redis_server.client()
    consumer = GroupConsumer(client, STREAM, "g", "w", block_ms=100, count=5)
    for _ in range(2):
        _fill(client, 5, maxlen=10)
        consumer.ack(*consumer.read())  # a full batch: behind, maybe
        kept = _fill(client, 30, maxlen=10)[-10:]  # 20 the group never saw
        assert [m.id for m in consumer.read()] == kept[:5]
        assert [m.id for m in consumer.read()] == kept[5:]
        client.xack(STREAM, "g", *kept)
        assert consumer.read() == []  # caught up: checked once more, nothing to say
    gaps = _gaps(caplog)
    assert len(gaps) == 2 and all("20 entries were trimmed" in g for g in gaps), gaps
    assert consumer.stats["skipped"] == 40
    assert client.xinfo_groups(STREAM)[0]["lag"] == 0  # the group's lag no longer counts the gaps
    calls = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    for _ in range(3):
        _fill(client, 2, maxlen=10)
        consumer.ack(*consumer.read())
    assert client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) == calls


def test_a_short_password_is_masked_only_where_it_is_the_credential():
    """A password "1" (or "a") turned every 1 of a camera's error into ***: "40*** at frame *** of ***0". It is
    hidden where it stands as the credential (in any URL, as user:1@ without one, as pwd=1); a long one everywhere.
    Every caller of redact_text keeps what it relied on: the URLs it passes, and any URL in the text, lose their
    userinfo whatever its length."""
    url = "rtsp://admin:1@10.0.0.7:554/live"
    text = f"401 at frame 1 of 10 from {url}; retrying admin:1@10.0.0.7 and rtsp://admin:1@10.0.0.7/live"
    assert redact_text(text, [url]) == ("401 at frame 1 of 10 from rtsp://***@10.0.0.7:554/live; retrying "
                                        "admin:***@10.0.0.7 and rtsp://***@10.0.0.7/live")
    assert redact_text("a camera said bad auth", ["rtsp://admin:a@cam/x"]) == "a camera said bad auth"
    assert redact_text("token ab@cam refused, lab@2", ["https://ab@cam/x"]) == "token ***@cam refused, lab@2"
    snap = "http://cam/snap.jpg?user=admin&pwd=ab"  # a secret-looking parameter's value is a credential too
    assert (redact_text("GET /snap.jpg?user=admin&pwd=ab: 401; ab tests, pwd=abc", [snap])
            == "GET /snap.jpg?user=admin&pwd=***: 401; ab tests, pwd=abc")
    long = "rtsp://admin:hunter2@cam/x"
    assert redact_text("401 Unauthorized for password hunter2", [long]) == "401 Unauthorized for password ***"
