"""Edges of the HTTP API found in an audit (2026-12-06): commands that wait on Ray for seconds must not starve the
other routes, and a body whose strings are not Unicode text is refused at the door. Stand-in controllers (no Ray),
as tests/test_api.py uses."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

import pipeline.api
from pipeline.api import ApiServer, bind, build_api
from running import wait_for
from test_api import metrics_routes

JSON = {"Content-Type": "application/json"}
POOL_THREADS = 40  # FastAPI's thread pool (anyio's default limiter): where every route ran before the fix


class SlowController:
    """Adds wait for ``release``, as an add waits its turn to place a camera while Ray is slow."""

    def __init__(self) -> None:
        self.release, self.lock, self.entered, self.added = threading.Event(), threading.Lock(), 0, []

    def list_cameras(self) -> list[dict]:
        return [{"id": cid} for cid in self.added]

    def add_camera(self, camera: dict, by: str) -> dict:
        with self.lock:
            self.entered += 1
        self.release.wait(60)
        with self.lock:
            self.added.append(camera["id"])
        return {"id": camera["id"]}


@pytest.mark.timeout(60)
def test_probes_and_the_list_answer_while_many_adds_wait_on_ray():
    """Add, update and remove ran in FastAPI's thread pool (40 threads), as every other route: a script adding 45
    cameras at once while Ray placed them one at a time held all of it, and /healthz, /metrics and GET /cameras went
    unanswered until the adds were done (an orchestrator's liveness probe then restarts the service mid-adds)."""
    controller = SlowController()
    server = ApiServer(build_api(controller, {}, extensions=[metrics_routes])).start(bind("127.0.0.1", 0))
    replies: list[int] = []
    http = httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=100))

    def add(i: int) -> None:
        replies.append(http.post("/cameras", json={"id": f"cam-{i}"}).status_code)

    senders = [threading.Thread(target=add, args=(i,), daemon=True) for i in range(POOL_THREADS + 5)]
    try:
        for sender in senders:
            sender.start()
        # in the controller at once: the commands' own limit, or (before the fix) as many as the pool's threads
        held = min(getattr(pipeline.api, "COMMANDS_AT_ONCE", POOL_THREADS), POOL_THREADS)
        wait_for(lambda: controller.entered >= held, 30, f"{held} adds to reach the controller")
        for path in ("/healthz", "/cameras"):
            try:
                reply = http.get(path, timeout=10)
            except httpx.TimeoutException:
                pytest.fail(f"GET {path} went unanswered while {controller.entered} adds waited")
            assert reply.status_code == 200, reply.text
    finally:
        controller.release.set()
        for sender in senders:
            sender.join(30)
        http.close()
        server.stop()
    # the adds beyond the limit waited their turn and ran: none was refused or lost
    assert replies == [201] * len(senders) and len(controller.added) == len(senders)


class Controller:
    """Keeps what it was sent, as the App keeps a camera it started (list, export and events show its URL)."""

    def __init__(self) -> None:
        self.cameras: dict[str, dict] = {}

    def list_cameras(self) -> list[dict]:
        return list(self.cameras.values())

    def add_camera(self, camera: dict, by: str) -> dict:
        self.cameras[camera["id"]] = camera
        return camera

    def update_camera(self, camera_id: str, changes: dict, by: str) -> dict:
        self.cameras[camera_id] = {**self.cameras[camera_id], **changes}
        return self.cameras[camera_id]


@pytest.mark.parametrize("body", [
    b'{"id": "a", "url": "rtsp://10.9.8.7/cam-\\ud800"}',
    b'{"id": "a", "url": "rtsp://10.9.8.7/cam", "heads": ["\\udfff"]}',
    b'{"id": "a", "url": "rtsp://10.9.8.7/cam", "tracker": {"\\ud83d": 1}}',
])
def test_a_lone_surrogate_in_a_body_is_refused_naming_it(body):
    """JSON's "\\ud800" reads as a lone surrogate, which UTF-8 cannot encode. Such a camera URL passed every check
    (the App started the camera), its answer was 500 "internal error: PydanticSerializationError", and from then on
    every GET /cameras answered 500 too, until someone found the camera and removed it."""
    controller = Controller()
    client = TestClient(build_api(controller, {}), raise_server_exceptions=False)
    reply = client.post("/cameras", content=body, headers=JSON)
    assert reply.status_code == 422, reply.text
    assert reply.json()["reason"].startswith("body: '\\ud") and "lone UTF-16 surrogate" in reply.json()["reason"]
    assert controller.cameras == {}
    assert client.get("/cameras").status_code == 200
    # the same in a change
    controller.cameras["b"] = {"id": "b", "url": "rtsp://10.9.8.7/b"}
    patched = client.patch("/cameras/b", content=b'{"url": "rtsp://10.9.8.7/\\udc00"}', headers=JSON)
    assert patched.status_code == 422 and "surrogate" in patched.json()["reason"]
    assert controller.cameras["b"]["url"] == "rtsp://10.9.8.7/b" and client.get("/cameras").status_code == 200


def test_normal_path_guard_escaped_and_raw_non_ascii_text_is_accepted():
    """Guard (passes before and after the fix): a surrogate pair escaped as JSON allows, and raw UTF-8, still read
    as the characters they are."""
    controller = Controller()
    client = TestClient(build_api(controller, {}), raise_server_exceptions=False)
    body = '{"id": "a", "url": "rtsp://10.9.8.7/\\ud83d\\ude00-é-€"}'.encode()
    assert client.post("/cameras", content=body, headers=JSON).status_code == 201
    assert client.post("/cameras", content=json.dumps({"id": "b", "url": "rtsp://10.9.8.7/😀"},
                                                      ensure_ascii=False).encode(), headers=JSON).status_code == 201
    assert [c["url"] for c in client.get("/cameras").json()["result"]] == ["rtsp://10.9.8.7/😀-é-€",
                                                                            "rtsp://10.9.8.7/😀"]


def test_a_lone_surrogate_in_a_control_stream_command_is_refused_naming_it():
    """The Redis control stream (and the dashboard) read commands through the same strict_json: an add whose URL
    held "\\ud800" went through as it did over HTTP."""
    from pipeline.admission import CommandRejected
    from pipeline.control import parse_command

    raw = '{"op": "add", "camera": {"id": "x", "url": "rtsp://10.9.8.7/cam-\\ud800"}}'
    with pytest.raises(CommandRejected, match="lone UTF-16 surrogate"):
        parse_command({b"data": raw.encode()})
