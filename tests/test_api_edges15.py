"""Edges of the HTTP API and the camera's validation an operator found against a running service (round 15):
true taken for a number, a 405 without its methods, a bad id echoed whole and twice, a 404 naming nothing,
uvicorn's own log lines, and /readyz during a drain. A real App without Ray (as tests/test_removal_ids11.py)
or a stand-in controller, behind the real API."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import httpx
import pytest
import ray
from fastapi.testclient import TestClient

from pipeline.api import CUT_SHORT, ApiServer, bind, build_api
from pipeline.app import App, CameraHandle
from pipeline.cli import main
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.metrics import include_metrics, ready
from workers.settings import CameraConfig


@pytest.fixture
def app() -> App:
    return App(parse_config({}), say=lambda text: None)


@pytest.fixture
def client(app: App) -> TestClient:
    return TestClient(build_api(app, {}, extensions=[include_metrics]), raise_server_exceptions=False)


# -- 1. true is no number ----------------------------------------------------------------------------------------

def test_true_for_a_cameras_number_is_refused_by_the_api(app, client):
    """`POST /cameras` with `"fps": true` answered 201 with fps 1.0, and `cameras update --json '{"fps":true}'`
    said "updated": pydantic's lax mode read true as 1. A 422 naming the field now, for an update too."""
    added = client.post("/cameras", json={"id": "u1", "url": "synthetic://street", "fps": True})
    assert (added.status_code, added.json()["reason"]) == (422, "camera.fps: must be a number, not true or false "
                                                                "(got True)")
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"), None, "hv-camera-cam")
    for changes, field in [({"fps": True}, "camera.fps"), ({"max_inflight": False}, "camera.max_inflight"),
                           ({"tracker": {"appearance": {"weight": True}}}, "camera.tracker.appearance.weight"),
                           ({"snapshot": {"fps": True}}, "camera.snapshot.fps"),
                           ({"placement": {"resources": {"zone-a": True}}}, "camera.placement.resources.zone-a")]:
        updated = client.patch("/cameras/cam", json=changes)
        assert (updated.status_code, updated.json()["reason"]) == (
            422, f"{field}: must be a number, not true or false (got {next(iter(_leaves(changes)))})")
    assert app.cameras["cam"].config.fps is None and not app._busy


def _leaves(changes: dict):
    for value in changes.values():
        yield from _leaves(value) if isinstance(value, dict) else [value]


def test_yes_for_a_number_in_a_yaml_config_is_refused_and_whole_numbers_still_read(tmp_path):
    """YAML reads an unquoted yes, on, no or off as true or false: `fps: yes` ran the camera at 1 fps. Every model
    on the settings' base (the camera's, its nested ones, Redis's, the config's own) refuses it; 5 for a float still
    reads, and so does a number in a string (lax mode's other readings stay)."""
    path = tmp_path / "hv.yaml"
    for camera, field in [("fps: yes", "cameras[0].fps"), ("motion: {threshold: on}", "cameras[0].motion.threshold"),
                          ("zones: [{name: z, polygon: [[0, 0], [1, no], [0, 1]]}]",
                           "cameras[0].zones[0].polygon[1][1]")]:
        path.write_text(f"cameras:\n  - {{id: lobby, url: 'synthetic://street', {camera}}}\n")
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert f"{field}: must be a number, not true or false (got " in str(refused.value)
    path.write_text("redis: {maxlen: yes}\n")
    with pytest.raises(ConfigError, match=r"redis\.maxlen: must be a number, not true or false"):
        load_config(path)
    path.write_text("cameras:\n  - {id: lobby, url: 'synthetic://street', fps: 5, max_inflight: '3', loop: yes}\n")
    camera = load_config(path).cameras[0]
    assert (camera.fps, camera.max_inflight, camera.loop) == (5.0, 3, True)


# -- 2. a 405's Allow on the included routes ----------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allowed", [("POST", "/healthz", "GET, HEAD"),
                                                   ("DELETE", "/readyz", "GET, HEAD"), ("PUT", "/metrics", "GET, HEAD"),
                                                   ("PUT", "/cameras/lobby", "DELETE, GET, HEAD, PATCH")])
def test_a_405_on_the_probes_and_metrics_names_their_methods(client, method, path, allowed):
    """`curl -X POST .../healthz` got `allow: ` (empty): include_router puts one entry in the app's routes for the
    whole router, with no methods, so the routes of include_metrics were never looked at."""
    got = client.request(method, path)
    assert (got.status_code, got.headers["allow"]) == (405, allowed)
    assert got.json()["reason"] == f"{method} {path}: method not allowed (allowed: {allowed})"


# -- 3. a bad camera id: once, and cut -----------------------------------------------------------------------------

def test_a_huge_bad_camera_id_is_said_once_and_cut_in_the_answer_and_the_log(client, caplog):
    """A POST with an id of 100,000 characters was answered `camera.id: must be ...; got 'aaaa…' (got 'aaaa…')`, the
    log line was 101,112 bytes (the refusal named the camera whole besides its reason), and a DELETE's id of 5000
    characters made a 10 KB log line. The id is shown once, cut as every error line of the config is."""
    with caplog.at_level(logging.WARNING, logger="pipeline.live_control"):
        added = client.post("/cameras", json={"id": "a" * 100_000, "url": "synthetic://street"})
        removed = client.delete("/cameras/" + "b" * 5000)
        client.delete("/cameras/lobby")
    reason = added.json()["reason"]
    said = "camera.id: must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit (got '"
    assert added.status_code == 422 and reason.startswith(said + "aaaa") and reason.count("got") == 1
    assert reason == said + "a" * (1000 - len(said)) + f"... ({len(said) + 100_000 + 2} characters)"
    assert removed.status_code == 404 and removed.json()["reason"].startswith("camera.id: no camera 'bbbb")
    assert len(removed.json()["reason"]) < 1100
    lines = [r.getMessage() for r in caplog.records if "control: rejected" in r.getMessage()]
    assert len(lines) == 3 and all(len(line) < 1200 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith("control: rejected add from api:anonymous: camera.id: must be")
    assert lines[1].startswith("control: rejected remove from api:anonymous: camera.id: no camera 'bbbb")
    assert lines[2] == "control: rejected remove of camera 'lobby' from api:anonymous: camera.id: no camera " \
                       "'lobby' is running"  # a valid id is still named


# -- 4. a 404 names what was not found -----------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, reason", [
    ("GET", "//cameras", "GET //cameras: no such path; with single slashes: GET /cameras"),
    ("GET", "/cameras//base-1", "GET /cameras//base-1: no such path; with single slashes: GET /cameras/base-1"),
    ("PATCH", "/cameras/a%2Fb", "camera.id: no camera 'a/b' is running"),
    ("DELETE", "/cameras/a/b", "camera.id: no camera 'a/b' is running"),
])
def test_a_404_names_the_path_or_the_camera_id(client, method, path, reason):
    """`GET //cameras` and `GET /cameras//base-1` answered just "Not Found"."""
    got = client.request(method, "http://testserver" + path, json={"fps": 2})
    assert (got.status_code, got.json()["reason"]) == (404, reason)


def test_cameras_remove_of_an_id_holding_a_slash_over_the_api_names_it(app, capsys):
    """`hydravision cameras remove a/b --api ...` printed `error: rejected: Not Found`, where the control stream
    said `camera.id: no camera 'a/b' is running`."""
    server = ApiServer(build_api(app, {})).start(bind("127.0.0.1", 0))
    try:
        code = main(["cameras", "remove", "a/b", "--api", server.url, "--timeout", "30"])
    finally:
        server.stop()
    assert code == 2
    assert "rejected: camera.id: no camera 'a/b' is running" in capsys.readouterr().err


# -- 5. uvicorn's records through the service's logging --------------------------------------------------------

class _SlowAdd:
    """A controller whose add waits until let go: still running when the server stops."""

    def __init__(self) -> None:
        self.entered, self.go = threading.Event(), threading.Event()

    def add_camera(self, camera: dict, by: str) -> dict:
        self.entered.set()
        self.go.wait(60)
        return {"id": camera["id"]}


def test_uvicorns_records_go_through_the_services_handlers_and_a_cut_request_is_no_error(caplog):
    """A SIGINT while an add was starting wrote `ERROR:    Cancel 1 running task(s), timeout graceful shutdown
    exceeded` in uvicorn's own format on stderr (beside the JSON lines of --log-format json): uvicorn's logger had
    handlers of its own, not propagated. Its records reach the service's (root) handlers now, also where a server
    made later (the dashboard's) configured uvicorn's logging again; a request cut short by a stop is a warning."""
    import uvicorn

    controller = _SlowAdd()
    server = ApiServer(build_api(controller, {})).start(bind("127.0.0.1", 0))
    server._server.config.timeout_graceful_shutdown = 0.3  # the stop's grace period: not the 5 s of a service
    uvicorn.Config(lambda scope, receive, send: None, log_level="warning")  # the dashboard's: its default logging
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(
        httpx.post(server.url + "/cameras", json={"id": "cut", "url": "synthetic://street"}, timeout=30)))
    try:
        with caplog.at_level(logging.INFO):
            sender.start()
            assert controller.entered.wait(30)
            server.stop()
    finally:
        controller.go.set()
        sender.join(30)
    assert answers and (answers[0].status_code, answers[0].json()["reason"]) == (503, CUT_SHORT)
    cut = [r for r in caplog.records if "timeout graceful shutdown exceeded" in r.getMessage()]
    assert [(r.name, r.levelname) for r in cut] == [("uvicorn.error", "WARNING")]


# -- 6. /readyz during the drain ---------------------------------------------------------------------------------

def test_the_docs_say_readyz_is_gone_during_the_drain_as_the_shutdown_closes_the_api_first(app, monkeypatch):
    """architecture.md said a service shutting down answers /readyz 503; the operator saw connection refused during
    the drain after a SIGINT: the shutdown closes the API first. The docs say so now; this pins the order they
    describe, and the 503 with "stopping" of the moment before."""
    import re
    from pathlib import Path

    arch = re.sub(r"\s+", " ", (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text())
    assert "failed camera, or a service shutting down, is not ready" not in arch
    assert "during the drain a probe finds the port closed (connection refused)" in arch

    app._stop.set()
    ok, details = ready(app, SimpleNamespace(check=lambda: (True, None)))
    assert not ok and details["stopping"] is True
    order: list[str] = []
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(app, "stop_control", lambda: order.append("the API closes"))
    monkeypatch.setattr(app, "_kill", lambda processes: list(processes))
    stop = SimpleNamespace(remote=lambda camera_id, drain=True: order.append("the camera drains") or {
        "camera": camera_id, "state": "stopped"})
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"),
                                      SimpleNamespace(stop=stop), "hv-camera-cam")
    app.shutdown(drain=True, timeout=5.0)
    assert order == ["the API closes", "the camera drains"]
