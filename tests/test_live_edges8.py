"""Live control when commands overlap (a second audit, issue 13's control channels): a command the control stream
refuses on one of its fields answered under its request_id, a Redis blip while a command is checked, an HTTP
request that the API's shutdown cuts short, a client that goes away while sending its command, the audit events
of two commands on one camera in the wrong order. Real Redis and uvicorn; a stand-in App (no Ray), as in
tests/test_control_stream.py, or the App with stand-ins for its stream actors, as in tests/test_admission.py."""

from __future__ import annotations

import json
import logging
import socket
import threading
from types import SimpleNamespace

import httpx
import pytest
import ray
import redis

import pipeline.control as control
from pipeline.api import ApiServer, bind, build_api
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from pipeline.control import ControlConsumer
from running import wait_for

CONTROL, RESULTS = "hv:control", "hv:control:results"


class StandInApp:
    """What the control channels call on the App; ``hold``: an add waits for it (a camera that starts slowly)."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold, self.adding = hold, threading.Event()
        self.added: list[str] = []
        self.rejected: list[str] = []

    def add_camera(self, camera: dict, by: str) -> dict:
        self.adding.set()
        if self.hold is not None:
            self.hold.wait(30)
        self.added.append(camera["id"])
        return {"id": camera["id"]}

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        self.rejected.append(reason)


def answers(client: redis.Redis) -> list[dict]:
    return [json.loads(fields[b"data"]) for _, fields in client.xrange(RESULTS)]


def test_a_command_refused_on_one_of_its_fields_is_answered_under_its_request_id(redis_server):
    """The answer of a command refused by its schema named no request: its sender (the CLI, the dashboard) waited
    out its whole timeout, then said the command "may still apply". E.g. a sender name the schema refuses, or a
    field a newer client sends."""
    client = redis_server.client()
    camera = {"id": "lobby", "url": "synthetic://street"}
    client.xadd(CONTROL, {"data": json.dumps({"op": "add", "camera": camera, "user": "two words", "request_id": "r1"})})
    client.xadd(CONTROL, {"data": json.dumps({"op": "add", "camera": camera, "priority": 1, "request_id": "r2"})})
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        got = wait_for(lambda: len(answers(client)) == 2 and answers(client), 20, "both answers")
    finally:
        consumer.stop()
    assert [(a["request_id"], a["status"]) for a in got] == [("r1", "rejected"), ("r2", "rejected")], got
    assert got[0]["reason"].startswith("data.user") and got[1]["reason"].startswith("data.priority"), got
    assert not app.added and client.xlen(CONTROL) == 0


def test_a_redis_blip_while_a_command_is_checked_applies_it_once_redis_is_back(redis_server, monkeypatch):
    """Redis went away between reading a command and asking its TIME (for ``expires``, which the CLI always
    sends): the command was rejected as an "internal error" with a traceback, instead of being read back and
    applied once Redis answered, as a command whose read reply was lost is."""
    redis_now, blips = control.redis_now, []

    def flaky(client: redis.Redis) -> float:
        if not blips:
            blips.append("TIME")
            raise redis.ConnectionError("Connection reset by peer")
        return redis_now(client)

    monkeypatch.setattr(control, "redis_now", flaky)
    client = redis_server.client()
    command = {"op": "add", "camera": {"id": "lobby", "url": "synthetic://street"}, "request_id": "r1",
               "expires": client.time()[0] + 60}
    client.xadd(CONTROL, {"data": json.dumps(command)})
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        [answer] = wait_for(lambda: answers(client), 20, "the answer")
        wait_for(lambda: client.xpending(CONTROL, "hydravision")["pending"] == 0, 10, "the acknowledgement")
    finally:
        consumer.stop()
    assert blips == ["TIME"]
    assert (answer["request_id"], answer["status"]) == ("r1", "accepted"), answer
    assert app.added == ["lobby"] and len(answers(client)) == 1


@pytest.mark.timeout(60)
def test_an_http_command_the_shutdown_cuts_short_is_answered_503_with_the_reason():
    """SIGTERM while an add over HTTP waited for its camera's process (seconds on a busy machine): uvicorn cancelled
    the request after its grace period and answered a bare "500 Internal Server Error" (the CLI: "rejected: HTTP
    500"), with an error traceback in the service's log, for a command the shutdown undoes."""
    hold = threading.Event()
    app = StandInApp(hold)
    server = ApiServer(build_api(app, {})).start(bind("127.0.0.1", 0))
    server._server.config.timeout_graceful_shutdown = 0.5  # uvicorn reads it when it stops: the test waits less
    replies: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: replies.append(
        httpx.post(f"{server.url}/cameras", json={"id": "late", "url": "synthetic://street"}, timeout=30)))
    sender.start()
    try:
        assert app.adding.wait(20), "the add never reached the App"
        server.stop()
        sender.join(20)
    finally:
        hold.set()
    [reply] = replies
    assert reply.status_code == 503, (reply.status_code, reply.text)
    assert reply.json() == {"status": "rejected", "reason": "the service is shutting down; the command was still "
                            "running when the API stopped (an add is undone, an update or a removal may have applied)"}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def test_a_client_that_goes_away_mid_body_is_a_refusal_not_a_traceback():
    """A sender killed (or timed out by a proxy) while sending its command's body: Starlette's ClientDisconnect went
    to the catch-all handler, and uvicorn logged "Exception in ASGI application" with a traceback, as for a bug."""
    app, reading = StandInApp(), threading.Event()
    api = build_api(app, {})

    async def watched(scope, receive, send):  # says when the API began to read the body
        async def receiving():
            reading.set()
            return await receive()
        await api(scope, receiving, send)

    server = ApiServer(watched).start(bind("127.0.0.1", 0))
    records = Records()  # on the root: uvicorn's records reach it through the service's logging (route_uvicorn)
    loggers = [logging.getLogger()]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /cameras HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"id\": ")
            assert reading.wait(10), "the API never read the body"
        said = lambda: [line for line in records.lines if line.startswith(("uvicorn", "pipeline.api"))]  # noqa: E731
        wait_for(said, 10, "the server to say what became of the request")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        server.stop()
    assert said() == ["pipeline.api: HTTP API: rejected POST /cameras: body: the client disconnected before "
                             "sending all of it"], records.lines
    assert not app.adding.is_set()


def test_the_audit_events_of_commands_on_one_camera_come_in_the_order_they_were_applied(monkeypatch):
    """An add or update released its camera's id before it published its event: a command on that camera from the
    other channel, applied in between, was audited first (camera_updated before camera_added; the update applied
    last audited first, so the audit trail named the wrong sender of the camera's settings)."""
    app = App(parse_config({"api": {"max_cameras": 4}}), say=lambda text: None)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)  # the stand-in's calls answer at once
    app.admission, app.model_heads = SimpleNamespace(check=lambda cam, url_changed=True: cam), {"people": ["person"]}
    audit: list[tuple[str, str]] = []
    app.events = SimpleNamespace(publish_event=lambda message: audit.append((message["type"], message["by"])))
    process = SimpleNamespace(update=SimpleNamespace(remote=lambda cid, cam: {"changed": ["fps"], "restarted": False}))
    app._spawn = lambda cams: [CameraHandle(cams[0].id, cams[0], process, f"hv-camera-{cams[0].id}")]
    release, next_command = app._release, []

    def release_then_next(camera_id: str) -> None:  # the other channel's command comes in as soon as the id is free
        release(camera_id)
        if next_command:
            next_command.pop()()

    app._release = release_then_next
    next_command.append(lambda: app.update_camera("lobby", {"fps": 2}, by="api:ops"))
    app.add_camera({"id": "lobby", "url": "synthetic://street"}, by="redis:auto")
    next_command.append(lambda: app.update_camera("lobby", {"fps": 4}, by="api:ops"))
    app.update_camera("lobby", {"fps": 3}, by="redis:auto")
    assert app.cameras["lobby"].config.fps == 4
    assert audit == [("camera_added", "redis:auto"), ("camera_updated", "api:ops"), ("camera_updated", "redis:auto"),
                     ("camera_updated", "api:ops")]
