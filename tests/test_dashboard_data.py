"""The dashboard's reading of Redis (pipeline/dashboard_data.py, pipeline/dashboard.py's Hub), without a browser:
snapshot layouts, counts, tiles, what is scrubbed, cameras coming and going, and Redis going away."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.dashboard_hub import Hub
from pipeline.dashboard_data import (Board, event_group, make_tile, parse_counts, read_snapshot, scrub,
                                     snapshot_version, tracks_by_head)
from pipeline.testbed_dashboard import write_snapshot
from servers import RedisServer, require_binary
from workers.publish import detection_message, encode, event_message, keys

JPEG = b"\xff\xd8\xff\xe0fake-jpeg\xff\xd9"


@pytest.mark.parametrize("layout, expected", [
    ("hash", (JPEG, 42, 1764000000.5)),
    ("string", (JPEG, None, None)),
    ("hash-without-jpeg", None),
    ("absent", None),
])
def test_read_snapshot_takes_a_hash_or_a_plain_string(redis_server, layout, expected):
    client = redis_server.client()
    key = keys("hv").snapshot("cam")
    if layout == "hash":
        write_snapshot(client, "hv", "cam", JPEG, 42, 1764000000.5)
    elif layout == "string":
        client.set(key, JPEG)
    elif layout == "hash-without-jpeg":
        client.hset(key, mapping={"frame": 1, "ts": 2})
    assert read_snapshot(client, "hv", "cam") == expected


def test_snapshot_version_names_the_frame_or_the_bytes():
    assert snapshot_version(JPEG, 7) == "f7"
    assert snapshot_version(JPEG, None) == snapshot_version(JPEG, None) != snapshot_version(JPEG + b"x", None)


@pytest.mark.parametrize("fields, expected", [
    ({b"v": b"1", b"frame": b"9"}, None),
    ({b"zone:door:people:person": b"2", b"zone:door:vehicles:car": b"0", b"line:kerb:people:person:in": b"5",
      b"line:kerb:people:person:out": b"1", b"zone:bad": b"3", b"line:x:people:person:sideways": b"1",
      b"zone:door:people:dog": b"not a number"},
     {"zones": [{"zone": "door", "head": "people", "class": "person", "inside": 2},
                {"zone": "door", "head": "vehicles", "class": "car", "inside": 0}],
      "lines": [{"line": "kerb", "head": "people", "class": "person", "in": 5, "out": 1}]}),
])
def test_parse_counts(fields, expected):
    assert parse_counts(fields) == expected


def test_tracks_by_head_counts_confirmed_tracks_and_heads_that_found_nothing():
    msg = detection_message("cam", 1, 0.0, 0.0, 1.0, (640, 360), [
        {"head": "people", "track_id": 3, "class": "person", "class_id": 0, "conf": 0.9, "box": [0, 0, 1, 1]},
        {"head": "people", "track_id": -1, "class": "person", "class_id": 0, "conf": 0.9, "box": [0, 0, 1, 1]},
    ], ["people", "vehicles"])
    assert tracks_by_head(msg) == {"people": 1, "vehicles": 0}
    assert tracks_by_head(None) is None


@pytest.mark.parametrize("state, shown", [("running", "up"), ("reconnecting", "reconnecting"),
                                          ("starting", "reconnecting"), ("failed", "down"), ("stale", "down"),
                                          ("ended", "down"), ("unavailable", "down"), (None, "down")])
def test_tile_state(state, shown):
    assert make_tile({"camera": "c", "state": state}, None, None, None)["state"] == shown


def test_event_groups():
    assert [event_group(t) for t in ("track_started", "zone_left", "line_crossed", "stream_down",
                                     "budget_exceeded", "publisher_error")] == \
        ["track", "zone", "line", "stream", "budget", "other"]


def test_scrub_hides_credentials_string_by_string():
    redis_url = "redis://:rpw-S3cr3t@db:6379/0"
    value = {"error": "cannot open rtsp://admin:cam-pw@10.0.0.2/s: refused", "n": 3,
             "nested": ["talking to rpw-S3cr3t failed", {"k@x": "fine"}]}
    out = json.dumps(scrub(value, [redis_url]))
    assert "cam-pw" not in out and "rpw-S3cr3t" not in out
    assert json.loads(out)["n"] == 3 and "rtsp://***@10.0.0.2/s" in out


def test_board_keeps_a_vanished_camera_a_while_and_drops_a_removed_one():
    board = Board(history_s=60, gone_after_s=10)
    tile = lambda cam: make_tile({"camera": cam, "state": "running", "fps": 5.0}, None, None, None)  # noqa: E731
    board.update([tile("a"), tile("b")], now=100)
    assert [t["camera"] for t in board.update([tile("a")], now=105)] == ["a", "b"]
    assert board.tiles["b"]["missing"]
    assert [t["camera"] for t in board.update([tile("a")], now=111)] == ["a", "b"]  # missing for 6 s of 10
    assert [t["camera"] for t in board.update([tile("a")], now=116)] == ["a"]
    board.update([tile("a"), tile("b")], now=117)
    assert "missing" not in board.tiles["b"]
    board.remove("b")
    assert [t["camera"] for t in board.all()] == ["a"]
    for now in range(118, 200):
        board.update([tile("a")], now=now)
    points = board.histories()["a"]
    assert points[0][0] >= 199 - 60 and points[-1] == (199, 5.0, None, None)


def test_a_redis_outage_longer_than_the_grace_does_not_wipe_the_board():
    """The grace was counted from the last poll that read a camera: after 10 s without Redis, the first poll
    back (before any camera had written its status again) removed every tile and its chart."""
    board = Board(history_s=60, gone_after_s=10)
    tile = lambda cam: make_tile({"camera": cam, "state": "running", "fps": 5.0}, None, None, None)  # noqa: E731
    board.update([tile("a"), tile("b")], now=100)
    assert [t["camera"] for t in board.update([], now=112)] == ["a", "b"]  # Redis back, statuses not yet
    board.update([tile("a")], now=113)
    assert len(board.histories()["a"]) == 2 and board.tiles["b"]["missing"]
    assert [t["camera"] for t in board.update([tile("a")], now=123)] == ["a"]  # b gone for good


def test_a_stale_cameras_tile_shows_no_rate_age_or_tracks():
    """A camera whose service died kept showing its last fps and frame age under 'down, stale', and its chart
    kept plotting them for minutes."""
    status = {"camera": "c", "state": "stale", "reported_state": "running", "stale": True, "fps": 10.0,
              "decode_fps": 25.0, "latency_ms_p50": 45, "latency_ms_p95": 90}
    detection = {"heads": ["people"], "detections": [{"head": "people", "track_id": 3}]}
    t = make_tile(status, detection, None, None)
    assert (t["state"], t["fps"], t["decode_fps"], t["age_p50"], t["age_p95"], t["tracks"]) == \
        ("down", 0.0, 0.0, None, None, {})


def _status(state: str = "running", **extra) -> str:
    return json.dumps({"state": state, "fps": 5.0, "heads": ["people"], "heartbeat_ts": time.time(), **extra})


def test_hub_poll_builds_tiles_from_what_redis_holds():
    """Statuses, the latest detection, counts and a snapshot become one tile; a camera with only a status gets
    a tile without them (the page shows a placeholder and hides the counts row); credentials are scrubbed,
    the Redis password even where it stands alone."""
    require_binary("redis-server")
    with RedisServer(password="rpw-Hub7x") as server:
        _poll_and_check(server.url, server.client())


def _poll_and_check(url: str, client) -> None:
    k = keys("hv")
    client.hset(k.cameras, mapping={
        "full": _status(last_error="rtsp://admin:cam-pw@10.1.1.1/x refused"),
        "bare": _status("reconnecting", last_error="AUTH rpw-Hub7x rejected"),
        "broken": "{not json"})
    msg = detection_message("full", 12, 0.5, time.time(), 30.0, (640, 360), [
        {"head": "people", "track_id": 4, "class": "person", "class_id": 0, "conf": 0.8, "box": [1, 2, 3, 4]}],
        ["people"])
    client.xadd(k.detections("full"), {"data": encode(msg)})
    client.hset(keys("hv").counts("full"), mapping={"v": 1, "zone:door:people:person": 1})
    write_snapshot(client, "hv", "full", JPEG, 12, time.time())
    hub = Hub(url)
    tiles = {t["camera"]: t for t in hub.poll(client)}
    assert set(tiles) == {"full", "bare", "broken"}
    full, bare = tiles["full"], tiles["bare"]
    assert full["state"] == "up" and full["tracks"] == {"people": 1} and full["size"] == [640, 360]
    assert full["counts"]["zones"][0]["inside"] == 1 and full["snapshot"]["frame"] == 12
    assert hub.snapshot("full") == ("f12", JPEG)
    assert bare["state"] == "reconnecting" and bare["counts"] is None and bare["snapshot"] is None
    assert tiles["broken"]["state"] == "down" and "not valid JSON" in tiles["broken"]["error"]
    text = hub.hello_text()
    assert "cam-pw" not in text and "rpw-Hub7x" not in text and "AUTH *** rejected" in text


def test_hub_pushes_events_and_says_when_redis_goes_and_comes_back(redis_server):
    """The Hub's threads against a Redis that is stopped and started on the same port: the pages are told
    (redis ok false, then true), and events published after the restart reach them."""
    import asyncio

    url = redis_server.url
    client = redis_server.client()
    client.xadd(keys("hv").events, {"data": encode(event_message("stream_up", "old"))})
    hub = Hub(url, interval_s=0.2)
    loop = asyncio.new_event_loop()
    got: list[str] = []

    async def collect(deadline: float, want) -> bool:
        q, hello = hub.subscribe()
        got.append("hello " + hello)
        try:
            while not want() and time.monotonic() < deadline:
                try:
                    item = await asyncio.wait_for(q.get(), max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                got.append(item or "")
            return want()
        finally:
            hub.unsubscribe(q)

    def run_until(want, timeout: float, what: str) -> None:
        got.clear()  # what this page is sent: an earlier page's "ok":true is no news of Redis back
        assert loop.run_until_complete(collect(time.monotonic() + timeout, want)), \
            f"timed out waiting for {what}; got {got[-3:]}"

    def redis_said(ok: str) -> bool:
        # pushed, or in the hello: the loop runs only inside run_until, and a change the poller saw before the page
        # subscribed (Redis stopping takes a while on a busy machine) went to no page then; its hello says it
        return any(g.startswith("event: redis") and f'"ok":{ok}' in g or
                   g.startswith("hello ") and f'"redis":{{"ok":{ok}' in g for g in got)

    hub.start(loop)
    try:
        run_until(lambda: any('"type":"stream_up"' in g for g in got), 10, "the backlog event")
        redis_server.stop()
        run_until(lambda: redis_said("false"), 10, "redis down")
        redis_server.start()
        run_until(lambda: redis_said("true"), 15, "redis back")
        client = redis_server.client()
        client.xadd(keys("hv").events, {"data": encode(event_message("camera_added", "new-cam"))})
        run_until(lambda: any('"camera":"new-cam"' in g for g in got), 10, "an event after the restart")
        # Its events reader is back in a blocking read (given 0.1 s to get there): stopping does not wait that
        # read out (with a 1 s block it did, ~1 s).
        time.sleep(0.1)
        began = time.monotonic()
        hub.stop()
        assert time.monotonic() - began < 0.6
    finally:
        hub.stop()
        loop.close()


def test_control_commands_round_trip_through_the_redis_control_stream(redis_server):
    """The dashboard's side of the control protocol against the service's own reader (ControlConsumer, in
    front of a stand-in App): reachable only while it reads; each command gets its own answer; with nobody
    answering, a timeout, and the command is taken back, so a controller starting later never sees it."""
    from pipeline.dashboard_control import control_reachable, send_command
    from pipeline.testbed_dashboard import FakeController

    client = redis_server.client()
    assert not control_reachable(client, "hv")
    late = send_command(client, "hv", {"op": "remove", "id": "x"}, timeout_s=0.5)
    assert late["status"] == "timeout" and "no service read the command: it expires unapplied" in late["reason"]
    assert client.xlen("hv:control") == 0  # taken back at its timeout: no controller started later sees it
    with FakeController(redis_server.url) as controller:
        deadline = time.monotonic() + 10
        while not control_reachable(client, "hv") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert control_reachable(client, "hv")
        added = send_command(client, "hv", {"op": "add", "camera": {"id": "lobby", "url": "synthetic://street"}})
        again = send_command(client, "hv", {"op": "add", "camera": {"id": "lobby", "url": "synthetic://street"}})
        assert (added["status"], again["status"]) == ("accepted", "rejected")
        assert added["request_id"] != again["request_id"] and "exists" in again["reason"]
        assert controller.received[0] == ("add", {"id": "lobby", "url": "synthetic://street"}, "redis:dashboard")
        assert not any("expired" in r for r in controller.rejected)  # the late remove was not there to read
        # The reader is back in a blocking read (given 0.1 s to get there): stopping it, a shutdown's first step,
        # does not wait that read out (with a 1 s block it did, ~1 s).
        time.sleep(0.1)
        began = time.monotonic()
        controller.consumer.stop()
        assert time.monotonic() - began < 0.6
    assert not control_reachable(client, "hv")


def test_dashboard_command_serves_and_says_where_without_the_password(tmp_path):
    """`hydravision dashboard` as users run it: it serves the page and its API against a Redis with a
    password, prints where without that password, and a port already taken is a one-line error, exit 2."""
    import subprocess
    import sys
    import urllib.request

    from pipeline.testbed_dashboard import DashboardProcess

    require_binary("redis-server")
    with RedisServer(password="rpw-Cli5Zk") as server, DashboardProcess(server.url) as dashboard:
        for path in ("", "api/state", "healthz", "static/app.js"):
            with urllib.request.urlopen(dashboard.url + path, timeout=10) as resp:
                assert resp.status == 200 and b"rpw-Cli5Zk" not in resp.read()
        log = dashboard.log_tail()
        assert f"redis://***@127.0.0.1:{server.port}/0" in log and "rpw-Cli5Zk" not in log
        taken = subprocess.run([sys.executable, "-m", "pipeline.cli", "dashboard", "--redis-url", server.url,
                                "--port", str(dashboard.port)], capture_output=True, encoding="utf-8", timeout=60)
    assert taken.returncode == 2 and taken.stderr.strip().splitlines()[-1].startswith("error: cannot serve")
    assert "rpw-Cli5Zk" not in taken.stderr


def test_an_unanswered_command_that_a_service_read_is_said_to_be_read(redis_server):
    """The wait for the answer reused the command's id as its loop variable over other answers: the check of
    whether a service had read the command compared with the last answer's id and said it had not."""
    import threading

    from pipeline.dashboard_control import send_command

    client = redis_server.client()
    client.xgroup_create("hv:control", "hydravision", id="$", mkstream=True)
    # a controller that takes the command and is still applying it; meanwhile another command is answered
    reader = threading.Thread(target=client.xreadgroup, args=("hydravision", "busy", {"hv:control": ">"}),
                              kwargs={"count": 1, "block": 10_000})
    reader.start()
    threading.Timer(0.3, lambda: client.xadd("hv:control:results", {"data": json.dumps({"request_id": "x"})})).start()
    late = send_command(client, "hv", {"op": "remove", "id": "x"}, timeout_s=1.0)
    reader.join()
    assert late["status"] == "timeout" and "a service read the command and may still apply it" in late["reason"]


def test_a_dashboard_interval_that_is_no_number_is_refused(capsys):
    """--interval nan passed the `<= 0` check, then busy-polled Redis and made every page request fail."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as refused:  # the parser's own type, as every duration of the CLI
        main(["dashboard", "--interval", "nan", "--redis-url", "redis://127.0.0.1:1/0"])
    assert refused.value.code == 2
    assert "argument --interval: expected a number of seconds above 0, got 'nan'" in capsys.readouterr().err


def test_after_redis_comes_back_from_disk_short_of_its_last_events_the_hub_reads_on(redis_server):
    """A Redis restored from its append-only file can lack its last second of events: their stream's top then
    lies below what the Hub had read, which it took for a new stream and replayed whole to the pages as new
    events (old camera_removed ones dropping live tiles). A stream it never saw is still read from its start."""
    client, k = redis_server.client(), keys("hv")
    for i in range(1, 6):
        client.xadd(k.events, {"data": encode(event_message("stream_up", "c"))}, id=f"{i}-0")
    hub = Hub(redis_server.url)
    hub._backlog(client)
    client.xadd(k.events, {"data": encode(event_message("stream_up", "c"))}, id="7-0")  # lost by the restore
    assert hub._resume_after(client, "7-0") == "7-0"  # nothing lost: read on
    client.xdel(k.events, "7-0")
    assert hub._resume_after(client, "7-0") in (b"5-0", "5-0")  # the restored stream: read on after its top
    client.delete(k.events)
    client.xadd(k.events, {"data": encode(event_message("stream_up", "c"))}, id="4-5")
    assert hub._resume_after(client, "7-0") == "0-0"  # another stream: from its start


def test_a_poll_that_read_a_camera_before_its_removal_does_not_bring_it_back():
    """The events reader removes a camera when its camera_removed arrives; a poll that had read the statuses
    just before committed them just after, and the tile came back for 10 s as 'no status'."""
    board = Board(history_s=60, gone_after_s=10)
    tile = lambda cam: make_tile({"camera": cam, "state": "running", "fps": 5.0}, None, None, None)  # noqa: E731
    board.update([tile("a"), tile("b")], now=100)
    board.remove("b", at=105.0)
    assert [t["camera"] for t in board.update([tile("a"), tile("b")], now=104.9)] == ["a"]
    assert [t["camera"] for t in board.update([tile("a"), tile("b")], now=106)] == ["a", "b"]  # added again


def test_the_backlog_read_after_an_outage_reaches_the_pages_marked_as_history(redis_server, monkeypatch):
    """A dashboard started while Redis was down reads the events' backlog once Redis answers, with pages already
    open: it went to them as live events, and the page dropped the tile of a camera whose old camera_removed was
    among them (one since added again)."""
    client, k = redis_server.client(), keys("hv")
    client.xadd(k.events, {"data": encode(event_message("camera_removed", "c"))})
    hub, sent = Hub(redis_server.url), []
    monkeypatch.setattr(hub, "_publish", lambda kind, payload: sent.append((kind, payload)))
    hub._backlog(client)
    [(kind, payload)] = sent
    assert kind == "events" and payload["backlog"] is True and payload["events"][0]["type"] == "camera_removed"
    from pipeline.dashboard import STATIC

    app_js = (STATIC / "app.js").read_text()
    assert "addEvents(msg.events, !msg.backlog)" in app_js  # the page's side: not live, so no tile is dropped
