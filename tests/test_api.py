"""The HTTP API's own contract, on a stand-in controller (no Ray): how requests are authenticated, how
errors are answered, and the hook through which other modules (metrics, health) add routes."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from pipeline.admission import CommandRejected
from pipeline.api import build_api

TOKEN = "t0k-" + "x" * 20


class Controller:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def list_cameras(self) -> list[dict]:
        return [{"id": "a", "url": "rtsp://***@cam/x"}]

    def add_camera(self, camera: dict, by: str) -> dict:
        self.calls.append(("add", camera, by))
        if camera.get("id") == "bug":
            raise RuntimeError("failed on rtsp://admin:pw-4471@cam/x")
        if camera.get("id") == "dup":
            raise CommandRejected("camera.id: camera 'dup' already exists", 409)
        return {"id": camera["id"]}

    def update_camera(self, camera_id: str, changes: dict, by: str) -> dict:
        self.calls.append(("update", camera_id, by))
        return {"id": camera_id, "changed": sorted(changes)}

    def remove_camera(self, camera_id: str, by: str) -> dict:
        self.calls.append(("remove", camera_id, by))
        return {"id": camera_id}

    def export_cameras(self) -> dict:
        return {"cameras": [], "variables": [], "yaml": "cameras: []\n"}


def metrics_routes(api, controller) -> None:
    """What an extension looks like: an open route and one behind the API's token."""
    open_router, guarded = APIRouter(), APIRouter(dependencies=[Depends(api.state.auth)])
    open_router.add_api_route("/healthz", lambda: {"ok": True, "cameras": len(controller.list_cameras())})
    guarded.add_api_route("/guarded", lambda: {"ok": True})
    api.include_router(open_router)
    api.include_router(guarded)


@pytest.fixture
def client() -> TestClient:
    controller = Controller()
    api = build_api(controller, {"ops": TOKEN}, extensions=[metrics_routes])
    c = TestClient(api, raise_server_exceptions=False)
    c.controller = controller  # type: ignore[attr-defined]
    return c


@pytest.mark.parametrize("headers, status, reason", [
    ({}, 401, "Authorization: missing bearer token"),
    ({"Authorization": "Basic b3BzOng="}, 401, "Authorization: expected 'Bearer <token>'"),
    ({"Authorization": "Bearer "}, 401, "Authorization: expected 'Bearer <token>'"),
    ({"Authorization": f"Bearer {TOKEN}x"}, 401, "Authorization: invalid token"),
    ({"Authorization": f"Bearer {TOKEN}"}, 200, None),
])
def test_every_camera_route_needs_the_token(client, headers, status, reason):
    reply = client.get("/cameras", headers=headers)
    assert reply.status_code == status
    if reason:
        assert reply.json() == {"status": "rejected", "reason": reason}
        assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert client.post("/cameras", json={"id": "a"}, headers=headers).status_code == 401
        assert client.controller.calls == []  # refused before the controller heard of it
    else:
        assert reply.json()["by"] == "api:ops" and reply.json()["result"][0]["id"] == "a"


def test_answers_are_json_with_a_reason_and_never_a_credential(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    dup = client.post("/cameras", json={"id": "dup"}, headers=auth)
    assert (dup.status_code, dup.json()["reason"]) == (409, "camera.id: camera 'dup' already exists")
    bug = client.post("/cameras", json={"id": "bug"}, headers=auth)
    assert bug.status_code == 500 and bug.json()["reason"].startswith("internal error: RuntimeError")
    assert "pw-4471" not in bug.text
    bad = client.post("/cameras", content=b"[1, 2", headers={**auth, "Content-Type": "application/json"})
    assert bad.status_code == 422 and bad.json()["reason"].startswith("body: not valid JSON")
    assert client.get("/nothing-here", headers=auth).json() == {"status": "rejected", "reason": "Not Found"}
    ok = client.post("/cameras", json={"id": "new"}, headers=auth)
    assert ok.status_code == 201 and ok.json() == {"status": "accepted", "op": "add", "camera": "new",
                                                   "by": "api:ops", "result": {"id": "new"}}


def test_extensions_add_routes_open_or_behind_the_token(client):
    assert client.get("/healthz").json() == {"ok": True, "cameras": 1}
    assert client.get("/guarded").status_code == 401
    assert client.get("/guarded", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {"ok": True}
    assert "/cameras" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_a_camera_named_export_is_managed_at_its_path_and_the_docs_say_get_there_is_the_export(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client.controller.list_cameras = lambda: [{"id": "export", "url": "synthetic://street"}]
    exported = client.get("/cameras/export", headers=auth).json()
    assert exported["op"] == "export" and exported["result"]["yaml"] == "cameras: []\n"  # what the CLI calls
    assert client.get("/cameras", headers=auth).json()["result"][0]["id"] == "export"
    assert client.patch("/cameras/export", json={"fps": 5}, headers=auth).json()["op"] == "update"
    assert client.delete("/cameras/export", headers=auth).json()["op"] == "remove"
    assert client.controller.calls == [("update", "export", "api:ops"), ("remove", "export", "api:ops")]
    docs = client.get("/openapi.json").json()
    for text in (docs["info"]["description"], docs["paths"]["/cameras/{camera_id}"]["get"]["description"]):
        assert "a camera with the id `export` is listed by `GET /cameras`" in text


def stand_in_app():
    """What pipeline/metrics.py reads of an App, before anything ran: no Redis, no replica, no camera."""
    from types import SimpleNamespace

    from pipeline.telemetry import Telemetry

    return SimpleNamespace(telemetry=Telemetry(), config=SimpleNamespace(status=SimpleNamespace(interval_s=1.0)),
                           redis_settings=None, model_holders=dict, model_info={}, cameras={}, stopping=False)


@pytest.mark.parametrize("tokens, path, headers, status", [
    ({"ops": TOKEN}, "/metrics", {}, 401),  # names every camera and its load: the token rule of /cameras
    ({"ops": TOKEN}, "/metrics", {"Authorization": f"Bearer {TOKEN}x"}, 401),
    ({"ops": TOKEN}, "/metrics", {"Authorization": f"Bearer {TOKEN}"}, 200),
    ({}, "/metrics", {}, 200),  # loopback without tokens: open, like /cameras
    ({"ops": TOKEN}, "/healthz", {}, 200),  # probes carry no token
    ({"ops": TOKEN}, "/readyz", {}, 503),  # answered (not ready: nothing runs), not refused
])
def test_metrics_routes_follow_the_token_rule_probes_stay_open(tokens, path, headers, status):
    from pipeline.app import metrics_routes

    # build_api hands its controller to the extensions: in a service that is the App itself
    client = TestClient(build_api(stand_in_app(), tokens, extensions=[metrics_routes]), raise_server_exceptions=False)
    reply = client.get(path, headers=headers)
    assert reply.status_code == status, reply.text
    if path == "/metrics" and status == 200:
        assert "process_cpu_seconds_total" in reply.text  # the exposition itself, not an error page
