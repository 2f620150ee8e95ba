"""What an operator watches, found in an audit (2026-12-07): /readyz of a service started with no camera where the
camera processes run the model (pipeline/metrics.py), the /metrics HELP of the Redis error counter, and
`hydravision status --json` for an entry holding a number too large for a float (pipeline/status.py). No Ray:
the real App before its start, and stand-ins where test_metrics.py uses them."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app import CONTROLLER_PUBLISHER, App
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.metrics import metrics_registry, ready
from pipeline.telemetry import Telemetry
from test_metrics import FakeProbe, camera_stats
from workers.settings import CameraConfig


def test_a_service_started_empty_with_the_model_in_its_camera_processes_is_ready_for_its_first_camera():
    """On the CPUs of one machine the camera processes run the model (the default there), and a service started
    with no camera has none of them: /readyz said the model was not ready (0 replicas answering) until a first
    camera came, which an orchestrator's readiness gate in front of the API kept from coming."""
    app = App(parse_config({"api": {"port": 0}}), say=lambda text: None)
    app.model_info = {"input_size": [320, 320], "heads": {"people": ["person"]}}
    app.placement = SimpleNamespace(in_camera_process=True)  # what cluster.Placement resolves on CPUs
    app.telemetry.record_cameras([], present=[])
    ok, body = ready(app, FakeProbe())
    assert ok, body
    assert body["checks"]["model"] == {"ok": True, "replicas": 0, "answering": 0}
    # the normal path: a camera whose process has not answered with its model yet is not ready
    app.cameras["a"] = SimpleNamespace(name="hv-stream-0", process=object(),
                                       config=CameraConfig(id="a", url="rtsp://cam/a"))
    ok, body = ready(app, FakeProbe())
    assert not ok and body["checks"]["model"] == {"ok": False, "replicas": 1, "answering": 0}, body
    # and with replicas (a GPU), none answering is not ready, as before
    app.cameras.clear()
    app.placement = SimpleNamespace(in_camera_process=False)
    app.inference = [object()]
    assert not ready(app, FakeProbe())[1]["checks"]["model"]["ok"]


def test_the_help_of_the_redis_error_counter_names_the_label_the_controller_really_has():
    """The HELP said the controller's series is publisher="controller": a valid camera id, so a query written
    from it read that camera's errors (or nothing), never the controller's, labelled "_controller"."""
    t = Telemetry()
    t.record_cameras([camera_stats("lobby")])
    t.record_publisher(CONTROLLER_PUBLISHER, {"retries": 7, "dropped": 2})
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics_registry(t)).decode())}
    errors = families["hydravision_redis_errors"]
    assert {s.labels["publisher"]: s.value for s in errors.samples} == {"lobby": 3, CONTROLLER_PUBLISHER: 7}
    assert f"'{CONTROLLER_PUBLISHER}'" in errors.documentation, errors.documentation


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_status_json_stays_json_when_an_entry_holds_a_number_too_large_for_a_float(
        redis_server, capsys: pytest.CaptureFixture) -> None:
    """1e999 is valid JSON, which Python reads as inf; `hydravision status --json` then printed Infinity, which
    Node's JSON.parse, Go and most other readers refuse: one entry written by another program broke the whole
    output. Such a number now reads as null (as the dashboard already shows it), and the entry stays readable."""
    good = {"state": "running", "heartbeat_ts": time.time(), "fps": 9.5, "published": 7}
    redis_server.client().hset("hv:cameras", mapping={
        "good": json.dumps(good),
        "huge": '{"state": "running", "heartbeat_ts": %r, "fps": 1e999, "latency_ms_p95": -1e999}' % time.time(),
    })
    assert main(["status", "--redis-url", redis_server.url, "--json"]) == 0
    statuses = {s["camera"]: s for s in _strict_json(capsys.readouterr().out)}
    assert statuses["good"]["fps"] == 9.5
    assert statuses["huge"]["state"] == "running" and statuses["huge"]["fps"] is None
    assert statuses["huge"]["latency_ms_p95"] is None
    assert main(["status", "--redis-url", redis_server.url]) == 0
    assert "huge" in capsys.readouterr().out
