"""Edges of the service's HTTP surface and its metrics, found in an audit (2026-12-06): what a control channel
reads (pipeline/admission.py), /readyz (pipeline/metrics.py) and a camera's staleness on /metrics
(pipeline/telemetry.py). No Ray, no Redis: stand-ins for the controller, as tests/test_api.py and
tests/test_metrics.py use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.admission import Admission, parse_camera, strict_json
from pipeline.api import build_api
from pipeline.config import ApiConfig, parse_config
from pipeline.metrics import include_metrics
from pipeline.telemetry import Telemetry
from test_metrics import Clock, camera_stats, scrape, service, tick, value

JSON = {"Content-Type": "application/json"}


class Controller:
    """What the API calls to add a camera, with the real run-time checks (App.add_camera's first two steps)."""

    def __init__(self, admission: Admission) -> None:
        self.admission, self.added = admission, []

    def add_camera(self, camera: dict, by: str) -> dict:
        cam = self.admission.check(parse_camera(camera))
        self.added.append(cam)
        return {"id": cam.id, "url": cam.url}


def api_client(tmp_path: Path) -> TestClient:
    root = tmp_path / "media"
    root.mkdir()
    (root / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    admission = Admission(ApiConfig(media_roots=[str(root)]), {"people": ["person"]}, {})
    client = TestClient(build_api(Controller(admission), {}), raise_server_exceptions=False)
    client.root = root  # type: ignore[attr-defined]
    return client


def test_a_file_url_with_an_encoded_nul_is_refused_naming_the_url(tmp_path):
    """file:// URLs are percent-decoded before the media-root check; a %00 reached os.path.realpath, whose
    ValueError ("embedded null byte") went up unhandled: the HTTP API answered 500 "internal error" (the Redis
    control stream the same), no "control: rejected" line, where every refusal names the field at fault."""
    client = api_client(tmp_path)
    reply = client.post("/cameras", json={"id": "a", "url": f"file://{client.root}/clip.mp4%00.txt"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["reason"].startswith("camera.url: a file path cannot hold a NUL byte")
    # the normal path: the same file without it is accepted, and read by its resolved path
    ok = client.post("/cameras", json={"id": "b", "url": f"file://{client.root}/clip.mp4"})
    assert ok.status_code == 201 and ok.json()["result"]["url"] == str(client.root / "clip.mp4")


@pytest.mark.parametrize("number", ["1e999", "-1e999", "2E400"])
def test_a_number_too_large_for_a_float_is_refused_as_infinity_is(tmp_path, number):
    """strict_json refuses Infinity (JSON has none), but read 1e999, valid JSON, as Infinity all the same: a
    camera added with "stall_timeout_s": 1e999 was accepted (the answer showed it as null) and /readyz failed
    with 500 from then on (below)."""
    with pytest.raises(ValueError, match=f"{number} is out of range"):
        strict_json(f'{{"stall_timeout_s": {number}}}')
    client = api_client(tmp_path)
    body = f'{{"id": "a", "url": "synthetic://street", "stall_timeout_s": {number}}}'.encode()
    reply = client.post("/cameras", content=body, headers=JSON)
    assert reply.status_code == 422 and reply.json()["reason"].startswith(f"body: {number} is out of range"), reply.text
    # the normal path: large and small finite numbers still read as themselves
    assert strict_json('{"a": 1e308, "b": -2.5e-300, "c": 12345678901234567890}') == \
        {"a": 1e308, "b": -2.5e-300, "c": 12345678901234567890}


def test_readyz_answers_for_a_camera_whose_stall_timeout_is_infinite():
    """stall_timeout_s: .inf is a valid config (a watchdog that never restarts the decoder). /readyz put the
    camera's grace, inf, in its JSON answer, which Starlette refuses to encode: every probe got 500 (no body
    saying which check failed) for the service's whole life."""
    config = parse_config({"cameras": [{"id": "a", "url": "rtsp://cam/a", "stall_timeout_s": float("inf")},
                                       {"id": "b", "url": "rtsp://cam/b", "read_timeout_s": 2, "open_timeout_s": 2}]})
    clock = Clock()
    app = service(clock, {c.id: c for c in config.cameras})
    tick(app, clock, {"a": "reconnecting", "b": "running"})
    api = FastAPI()
    include_metrics(api, app)
    with TestClient(api, raise_server_exceptions=False) as client:
        reply = client.get("/readyz")
        assert reply.status_code == 503, reply.text  # no Redis configured: not ready, and it says so
        cameras = reply.json()["checks"]["cameras"]["cameras"]
        assert cameras["a"] == {"ok": True, "state": "reconnecting", "down_for_s": 0.0, "grace_s": None}
        assert cameras["b"]["grace_s"] == 8.0 and reply.json()["checks"]["redis"]["ok"] is False
        json.dumps(reply.json(), allow_nan=False)


def test_the_last_frame_timestamp_stays_while_a_camera_is_unavailable_or_its_decoder_replaced():
    """hydravision_camera_last_frame_timestamp_seconds is what staleness alerts read (time() - it > N). It
    vanished when it mattered: while the camera's actor did not answer (crashed, hung: its stats are then only
    "unavailable") and after the watchdog replaced a stalled decoder (a new decoder has no frame yet). An
    absent series fires no alert, and resolves one that fired."""
    t = Telemetry()
    t.record_cameras([camera_stats("lobby", last_frame_ts=1.7e9)], present=["lobby"])
    assert value(scrape(t), "hydravision_camera_last_frame_timestamp_seconds", camera="lobby") == 1.7e9
    t.record_cameras([{"camera": "lobby", "state": "unavailable", "last_error": "GetTimeoutError"}], present=["lobby"])
    m = scrape(t)
    assert value(m, "hydravision_camera_up", camera="lobby") == 0
    assert value(m, "hydravision_camera_last_frame_timestamp_seconds", camera="lobby") == 1.7e9
    t.record_cameras([camera_stats("lobby", state="reconnecting", last_frame_ts=None)], present=["lobby"])
    assert value(scrape(t), "hydravision_camera_last_frame_timestamp_seconds", camera="lobby") == 1.7e9
    # the normal path: a new frame moves it on; a removed camera's series goes
    t.record_cameras([camera_stats("lobby", last_frame_ts=1.7e9 + 60)], present=["lobby"])
    assert value(scrape(t), "hydravision_camera_last_frame_timestamp_seconds", camera="lobby") == 1.7e9 + 60
    t.record_cameras([], present=[])
    assert "hydravision_camera_last_frame_timestamp_seconds" not in scrape(t)


def test_a_service_with_no_camera_yet_is_ready_to_be_given_one():
    """A service may start empty and take its cameras through its API; /readyz said "not ready" while it had none
    (or only disabled ones), so an orchestrator's readiness gate in front of that API kept it unreachable."""
    from pipeline.metrics import ready
    from test_metrics import FakeProbe

    clock = Clock()
    app = service(clock, {})
    tick(app, clock, {})
    ok, body = ready(app, FakeProbe())
    assert ok and body["checks"]["cameras"] == {"ok": True, "cameras": {}}, body
    # the normal path: a camera that failed still makes it not ready
    config = parse_config({"cameras": [{"id": "a", "url": "rtsp://cam/a"}]})
    app = service(clock, {c.id: c for c in config.cameras})
    tick(app, clock, {"a": "failed"})
    assert not ready(app, FakeProbe())[0]


def test_a_config_file_url_with_an_encoded_nul_is_refused_at_load():
    """The config's cameras are not checked by Admission: a %00 there reached the decoder as a bare ValueError."""
    with pytest.raises(Exception, match=r"cameras\[0\]\.url.*cannot hold a NUL byte"):
        parse_config({"cameras": [{"id": "a", "url": "file:///media/clip.mp4%00.txt"}]})
