"""The message contract against what the service really publishes (workers/schemas/*.json, examples/node-consumer):
fields the service sends that event-v1.json did not declare (so any value passed, e.g. stream_down's `final` as
"yes"), zone_left's reason left open, a message without `type` answered with every type's required fields, and the
Node example counting the JSON `null` invalid without saying which entry it was."""

from __future__ import annotations

import json
import subprocess

import jsonschema
import numpy as np
import pytest
import supervision as sv

from test_consumer_recovery import node_example
from test_sources_edges import run_capture
from workers.analytics import LineCounter, ZoneCounter
from workers.analytics_settings import LineConfig, ZoneConfig
from workers.budget import BudgetAction
from workers.publish import encode, event_message, keys, load_schema, validate
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker

pytestmark = pytest.mark.timeout(60)
SIZE = (640, 360)
FPS = 10.0


def _people(boxes: list[list[float]]) -> sv.Detections:
    xyxy = np.asarray(boxes, np.float64).reshape(-1, 4)
    return sv.Detections(xyxy=xyxy, confidence=np.full(len(xyxy), 0.9), class_id=np.zeros(len(xyxy), int),
                         data={"class_name": np.array(["person"] * len(xyxy))})


def _walk() -> list[tuple[str, dict]]:
    """A person walks left to right through a zone and over a line, then is gone: the real tracker's and
    analytics' events (track_started, zone_entered, line_crossed, zone_left, track_ended)."""
    tracker = CameraTracker(["people"], TrackerConfig(), frame_rate=FPS)
    zone = ZoneCounter(ZoneConfig(name="crossing", polygon=[[0.3, 0.3], [0.7, 0.3], [0.7, 0.9], [0.3, 0.9]]),
                       SIZE, {"people": ["person"]})
    line = LineCounter(LineConfig(name="gate", start=[0.5, 0.1], end=[0.5, 1.0]), SIZE, {"people": ["person"]},
                       {"people": ["person"]})
    events: list[dict] = []
    for f in range(80):
        x = 60 + 8 * f
        det = _people([[x - 10, 200, x + 10, 260]] if x < 620 else [])
        tracked, evs = tracker.update("people", det, f, f / FPS)
        events += evs + zone.update("people", tracked, f, f / FPS) + line.update("people", tracked, f, f / FPS)
    events += tracker.finish()
    return [(e.pop("type"), e) for e in events]


def _published() -> list[dict]:
    """One message per kind of fields the service sends, from its real producers where they run without Ray."""
    out = _walk()
    for camera in (dict(url="/nonexistent/clip.mp4"), dict(url="rtsp://127.0.0.1:9/cam"),
                   dict(url="synthetic://street?frames=2&fps=25", realtime=False)):
        out += run_capture(camera, 10, until=lambda e: any(t == "stream_reconnecting" for t, _ in e))[2]
    out.append(("stream_up", {"attempt": 3}))  # workers/capture.py:334, after reconnecting
    for action, event in (("fps", "budget_exceeded"), ("restored", "budget_recovered")):
        out.append((event, BudgetAction(action, event, 12.5, None, 0.41).event_fields(0.3, None)))
    # as pipeline/live_control.py:169,211,264, pipeline/app.py:707 and pipeline/cluster.py:459 send them
    audit = {"by": "api:ops", "url": "rtsp://***@cam/x"}
    out += [("camera_added", {**audit, "heads": ["people"], "fps": None}),
            ("camera_removed", {**audit, "published": 120}),
            ("camera_updated", {**audit, "changes": ["fps", "zones"]}),
            ("worker_restarted", {"worker": "stream", "reason": "stream actor of camera lobby crashed and was "
                                  "restarted", "node": "a" * 56, "from_node": "b" * 56}),
            ("node_lost", {"node": "b" * 56, "ip": "10.0.0.7", "cameras": ["lobby"], "inference": [0]}),
            ("publisher_dropped", {"dropped": 3}),
            ("publisher_error", {"reason": "ConnectionError: refused", "duration_s": 2.5, "retries": 4})]
    return [json.loads(encode(event_message(t, "lobby", **fields))) for t, fields in out]


@pytest.fixture(scope="module")
def published() -> list[dict]:
    return _published()


def test_every_field_the_service_publishes_is_declared_in_the_event_schema(published):
    """stream_down's `final`, track_ended's `first_frame`/`last_frame`, camera_added's `heads`, camera_removed's
    `published`, worker_restarted's `worker` and node_lost's `ip` were sent but not in event-v1.json: a consumer
    that reads the contract from the schema did not know them, and any value of them validated."""
    declared = set(load_schema("event")["properties"])
    types = {m["type"] for m in published}
    assert {"track_started", "track_ended", "zone_entered", "zone_left", "line_crossed", "stream_up", "stream_down",
            "stream_reconnecting", "budget_exceeded", "budget_recovered"} <= types, types
    for m in published:
        validate(m, "event")
        assert not set(m) - declared, (m["type"], sorted(set(m) - declared))
    assert any(m.get("final") is True for m in published)  # the failed file said so


WRONG = [("stream_down", "final", "yes"), ("track_ended", "first_frame", -1), ("track_ended", "last_frame", 1.5),
         ("camera_added", "heads", "people"), ("camera_removed", "published", "120"), ("worker_restarted", "worker", 0),
         ("node_lost", "ip", 7), ("zone_left", "reason", "gone")]


@pytest.mark.parametrize("type_, field, value", WRONG, ids=[f"{t}.{f}={v!r}" for t, f, v in WRONG])
def test_a_published_field_of_the_wrong_type_is_refused(published, type_, field, value):
    """Each of those fields, and zone_left's reason (only `exited` or `lost`), now has a type a consumer can rely on."""
    message = dict(next(m for m in published if m["type"] == type_ and field in m))
    validate(message, "event")
    message[field] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(message, "event")


def test_a_message_without_its_type_is_told_only_that():
    """Every type's `if` held for a message with no `type` at all, so a validator with all errors on (the Node
    example's ajv) listed some 40 'missing' fields of every type; the one thing wrong is the missing type."""
    schema = load_schema("event")
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors({"v": 1, "camera": "lobby", "ts": 1.0}))
    assert [e.message for e in errors] == ["'type' is a required property"]


def test_node_consumer_names_the_entry_that_holds_json_null(redis_server):
    """The JSON `null` parsed, and the Node example took its null for "already reported": it counted the entry
    invalid (exit status 1) without a word of which one or why."""
    client = redis_server.client()
    bad = client.xadd(keys("hv").events, {"data": "null"}).decode()
    client.xadd(keys("hv").events, {"data": encode(event_message(
        "line_crossed", "lobby", head="people", track_id=1, class_="person", line="gate", direction="in", frame=4,
        pts=0.4, count=1))})
    run = subprocess.run(["node", "index.js", "--redis-url", redis_server.url, "--group", "g", "--from-start",
                          "--count", "1", "--idle-exit-ms", "20000"], cwd=node_example(), capture_output=True,
                         encoding="utf-8", timeout=40)
    assert run.returncode == 1, run.stderr  # a message did not validate
    assert f"{bad}: does not match event-v1.json" in run.stderr, run.stderr
    assert "1 invalid" in run.stderr and json.loads(run.stdout)["line"] == "gate"


def _least(spec: str) -> tuple[int, ...]:
    """The version a ">= X[.Y[.Z]]" engines range starts at."""
    assert spec.replace(" ", "").startswith(">="), spec
    return tuple(int(p) for p in spec.replace(" ", "")[2:].split("."))


def test_node_example_asks_for_the_node_its_locked_packages_need():
    """package.json said Node >= 18 while the redis client it locks says >= 18.19.0: on Node 18.0-18.18 the example
    claimed support its own dependency disclaims (npm ci only warns EBADENGINE)."""
    example = node_example()
    own = json.loads((example / "package.json").read_text())["engines"]["node"]
    lock = json.loads((example / "package-lock.json").read_text())["packages"]
    assert lock[""]["engines"]["node"] == own
    needed = max(_least(p["engines"]["node"]) for p in lock.values() if "node" in p.get("engines", {}))
    assert _least(own) + (0,) * (3 - len(_least(own))) >= needed, (own, needed)


def test_a_budget_event_of_a_tiny_budget_or_rate_keeps_its_schema():
    """round() made a max_frame_age_ms of 0.04 and an fps of 0.004 (both allowed settings) 0.0 in the event,
    which event-v1.json refuses (both must be above 0): a validating consumer (the Node example) exited 1."""
    from workers.budget import BudgetAction

    fields = BudgetAction("fps", None, fps=0.004, batch_wait_s=None, p95_s=0.2).event_fields(0.00004, 25.0)
    assert fields["fps"] == 0.004 and fields["budget_ms"] == 0.04
    assert BudgetAction("fps", None, 12.345, None, 0.2).event_fields(0.3, 25.0)["fps"] == 12.35  # as before


def test_a_detection_messages_pts_carries_no_float_noise():
    """A looped file's pts are stitched by addition: consumers read 23.799999999999997 where the frame is at 23.8."""
    from workers.publish import detection_message

    msg = detection_message("cam", 595, 23.799999999999997, 1.8e9, 12.0, (640, 360), [], ["people"])
    assert msg["pts"] == 23.8
