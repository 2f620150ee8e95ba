"""The HTTP API while the service starts (round 18): its socket was bound at the very start of App._start, but served
only once the model was loaded and every camera ran (18 s on a small machine, minutes with model.compile or many
cameras), so /healthz went unanswered meanwhile and a liveness probe killed a service that was only starting. Now it
is served right after the start's checks: its probes say "starting", its commands answer 503 until the start is done.
Without Ray or a model: App._start with stand-ins for what it calls (as tests/test_controller_edges4.py does), and a
stand-in start_ray that holds the start until the test lets it go on."""

from __future__ import annotations

import os
import signal
import socket
import threading
from types import SimpleNamespace

import httpx
import pytest
import ray

from pipeline import app as app_module
from pipeline import cluster
from pipeline.config import parse_config

TOKEN = "t0k-" + "s" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADS = {"p": ["x"]}


class Held:
    """A start held in its stand-in start_ray until ``go`` (or ``fail``, the error it raises then)."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.fail: BaseException | None = None

    def start_ray(self) -> None:
        self.reached.set()
        assert self.go.wait(60), "the test never let the start go on"
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def service(monkeypatch, redis_server):
    """An App with the API (a token) and the control stream on, no camera yet, its start's Ray and model stood in for;
    what it said; the held start_ray. Shut down after the test (as `hydravision run` does, after a failed start too)."""
    monkeypatch.delenv("HYDRAVISION_API_TOKEN", raising=False)
    said: list[str] = []
    config = parse_config({"cameras": [], "api": {"port": 0, "tokens": {"ops": TOKEN}}, "model": {"device": "cpu"},
                           "inference": {"replicas": 1, "in_camera_process": False}, "ray": {"inference_cpus": 1}})
    app = app_module.App(config, say=said.append)
    held = Held()
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "n1", "NodeManagerAddress": "10.0.0.5", "Alive": True,
                                                "Resources": {"CPU": 2.0, "memory": 8e9}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    monkeypatch.setattr(app_module.App, "check_model", lambda self: {"input_size": [256, 448], "heads": HEADS})
    monkeypatch.setattr(app_module.App, "resolve_redis", lambda self: redis_server.url)
    monkeypatch.setattr(app_module.App, "start_ray", lambda self: held.start_ray())
    monkeypatch.setattr(app_module.App, "_own_endpoints", lambda self: {})  # the Ray GCS's address: Ray's
    monkeypatch.setattr(app_module, "watch_head", lambda address: None)
    monkeypatch.setattr(app_module, "Reaper", SimpleNamespace(start=lambda: SimpleNamespace(release=lambda: None)))
    monkeypatch.setattr(app_module, "publisher_for", lambda settings, name: SimpleNamespace(start=lambda: None))
    replica = SimpleNamespace(info=SimpleNamespace(remote=lambda: "info"), ping=SimpleNamespace(remote=lambda: "ping"))
    monkeypatch.setattr(cluster.Placement, "spawn", lambda self, actor_class, options, *args: replica)
    monkeypatch.setattr(cluster.Placement, "checkpoint_arg", lambda self: "model.safetensors")  # no ray.put
    monkeypatch.setattr(cluster.Placement, "ready", lambda self, ref, what:  # the model's info; the replica's pid
                        {"input_size": [256, 448], "heads": HEADS, "threads": 1} if ref == "info" else [1])
    commands: list[str] = []  # what reached the App's commands
    for name in ("add_camera", "update_camera", "remove_camera", "list_cameras", "export_cameras"):
        command = getattr(app_module.App, name)
        monkeypatch.setattr(app_module.App, name, lambda self, *a, _c=command, _n=name, **k: (commands.append(_n),
                                                                                              _c(self, *a, **k))[1])
    try:
        yield SimpleNamespace(app=app, said=said, held=held, commands=commands)
    finally:
        held.go.set()
        app.shutdown(drain=False)


def starting_in_a_thread(service) -> tuple[threading.Thread, list[BaseException]]:
    """``app.start()`` in a thread, once held in start_ray; the errors it raised."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            service.app.start()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=start, name="test-start", daemon=True)
    thread.start()
    assert service.held.reached.wait(60), "the start never reached start_ray"
    return thread, errors


def api_url(app: app_module.App) -> str:
    assert app.api_server is not None, "the HTTP API is not served while the start waits for Ray"
    return app.api_server.url


def test_while_the_service_starts_its_probes_say_starting_and_its_commands_answer_503(service):
    """Before: while the start waited for Ray, the model and the cameras, the API's socket accepted connections and
    answered nothing (a probe timed out: a liveness probe killed the service). Now the API answers from the start's
    first seconds: /healthz 200 starting, /readyz 503 starting, /metrics and the schema as usual, and every command
    503 with Retry-After, reaching nothing of the App; the token and Host rules as ever. Once the start is done, all
    as before."""
    app = service.app
    thread, errors = starting_in_a_thread(service)
    url = api_url(app)
    assert any(line.startswith(f"HTTP API: {url} ") for line in service.said), service.said
    with httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"ok": True, "starting": True})
        assert client.head("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert (ready.status_code, ready.json()) == (503, {"ok": False, "starting": True})
        assert client.get("/metrics", headers=AUTH).status_code == 200
        assert client.get("/metrics").status_code == 401  # its token, as ever
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()["paths"]
        assert all("503" in schema[path][method]["responses"] for path, method in (  # documented, as 401 and 403
            ("/cameras", "get"), ("/cameras", "post"), ("/cameras/export", "get"), ("/cameras/{camera_id}", "get"),
            ("/cameras/{camera_id}", "patch"), ("/cameras/{camera_id}", "delete")))
        add = client.post("/cameras", headers=AUTH, json={"id": "a", "url": "synthetic://street"})
        assert add.status_code == 503 and add.headers["retry-after"].isdigit(), (add.status_code, add.headers)
        assert add.json()["status"] == "rejected" and "the service is starting" in add.json()["reason"], add.json()
        for method, path in (("GET", "/cameras"), ("GET", "/cameras/export"), ("GET", "/cameras/a"),
                             ("PATCH", "/cameras/a"), ("DELETE", "/cameras/a")):
            answer = client.request(method, path, headers=AUTH, json={"fps": 5} if method == "PATCH" else None)
            assert answer.status_code == 503 and "retry-after" in answer.headers, (method, path, answer.text)
        # no token: refused for it first, as after the start (not told the service is starting)
        assert client.post("/cameras", json={"id": "a", "url": "synthetic://street"}).status_code == 401
        # a rebound page (Host not loopback's) reads neither the probes nor the rest, as after the start
        for path in ("/healthz", "/readyz", "/cameras"):
            assert client.get(path, headers={"Host": "rebind.example"}).status_code == 403, path
    assert service.commands == [] and not app.cameras and app.control is None  # the control stream: after the cameras

    service.held.go.set()
    thread.join(60)
    assert not thread.is_alive() and errors == [], errors
    assert not app.starting and app.control is not None and app.admission is not None
    assert [line for line in service.said if line.startswith("HTTP API: ")] == [service.said[0]]  # said once
    with httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"ok": True, "control_loop": "not started yet"})
        ready = client.get("/readyz")  # its checks, as before: no tick has heard the replica yet
        assert ready.status_code == 503 and "starting" not in ready.json(), ready.json()
        assert ready.json()["checks"]["redis"] == {"ok": True}, ready.json()
        listed = client.get("/cameras", headers=AUTH)
        assert (listed.status_code, listed.json()["result"]) == (200, [])
        add = client.post("/cameras", headers=AUTH, json={"id": "a"})
        assert add.status_code == 422 and add.json()["reason"].startswith("camera.url: "), add.json()  # the App's
    assert service.commands == ["list_cameras", "add_camera"]


@pytest.mark.parametrize("how", ["error", "SIGTERM"])
def test_a_start_that_fails_stops_the_api_it_served(service, how):
    """A start that fails while the API serves (an error, or a signal: App's handler raises KeyboardInterrupt in the
    start) is undone by the shutdown as `hydravision run` does: the API stops with the rest, no thread or socket
    left; and a command sent between the failure and the shutdown reaches no half-built App."""
    app = service.app
    held = service.held
    if how == "error":
        held.fail = RuntimeError("the model did not load")
        thread, errors = starting_in_a_thread(service)
        url = api_url(app)
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"ok": True, "starting": True}
        held.go.set()
        thread.join(60)
        assert not thread.is_alive() and [type(e) for e in errors] == [RuntimeError], errors
    else:  # the signal comes to the main thread, which runs the start (as in `hydravision run`)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        seen: dict = {}

        def probe_then_signal() -> None:
            try:
                held.reached.wait(60)
                seen["url"] = api_url(app)
                seen["health"] = httpx.get(f"{seen['url']}/healthz", timeout=10).json()
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # the start ends either way

        prober = threading.Thread(target=probe_then_signal, name="test-prober", daemon=True)
        app.install_signal_handlers()
        try:
            prober.start()
            with pytest.raises(KeyboardInterrupt):
                app.start()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        prober.join(30)
        assert "url" in seen, "the HTTP API is not served while the start waits for Ray"
        url = seen["url"]
        assert seen["health"] == {"ok": True, "starting": True}
    # failed, not yet shut down: commands still refused (they reached the half-built App: a 500 of its admission,
    # None), the probes say so
    with httpx.Client(base_url=url, timeout=10) as client:
        add = client.post("/cameras", headers=AUTH, json={"id": "a", "url": "synthetic://street"})
        assert add.status_code == 503 and "retry-after" in add.headers, add.json()
        ready = client.get("/readyz")
        assert (ready.status_code, ready.json()) == (503, {"ok": False, "starting": True, "stopping": True})
    assert service.commands == [] and not app.cameras
    port = app.api_server.port
    app.shutdown(drain=False)
    assert app.api_server is None and app._api_socket is None
    assert not [t for t in threading.enumerate() if t.name == "http-api"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_cameras_cli_waits_while_the_service_starts_then_sends(capsys) -> None:
    """`hydravision run ... &` then `hydravision cameras add --api ...`: before, the request waited in the socket's
    backlog until the start was done; with the API served during the start it answered 503 "starting" at once.
    The CLI now asks again after Retry-After, within --timeout, saying once that it waits; past --timeout it gives
    the 503's answer as it is."""
    import http.server
    import json

    from pipeline.api import STARTING
    from pipeline.camera_commands import HttpChannel

    asked: list[str] = []
    first = {"status": "rejected", "reason": STARTING}  # the first answer; then accepted

    class Starting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            starting = len(asked) == 1
            body = json.dumps(first if starting else {"status": "accepted", "cameras": []}).encode()
            self.send_response(503 if starting else 200)
            if starting:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Starting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        answer = HttpChannel(base, None, timeout=30).send("list")
        assert answer["status"] == "accepted" and answer["code"] == 200 and asked == ["/cameras", "/cameras"], answer
        assert "is starting: waiting for it (up to 30 s, --timeout)" in capsys.readouterr().err
        asked.clear()
        answer = HttpChannel(base, None, timeout=0.5).send("list")  # Retry-After 1 s is past its --timeout
        assert answer == {"status": "rejected", "reason": STARTING, "code": 503} and asked == ["/cameras"], answer
        asked.clear()
        first["reason"] = "down for maintenance"  # another server's 503 (a gateway's): its answer, not asked again
        answer = HttpChannel(base, None, timeout=30).send("list")
        assert answer["code"] == 503 and asked == ["/cameras"], answer
    finally:
        server.shutdown()
        server.server_close()


def test_the_dashboards_port_is_forbidden_to_cameras_before_the_control_stream_is_read() -> None:
    """The Redis control stream is read from start_control on, the dashboard served (and forbidden to cameras) only
    after it: an add read from the stream in between could point a camera at the service's own dashboard (the
    review of round 18). Its socket is bound at the start: start_control forbids its port at once."""
    from pipeline.admission import CommandRejected
    from pipeline.api import bind
    from workers.settings import CameraConfig

    app = app_module.App(parse_config({"dashboard": {"enabled": True, "port": 0}, "control": {"enabled": False},
                                       "cameras": []}), say=lambda text: None)
    app.model_heads = {"people": ["person"]}
    app.redis_settings = app.config.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"})
    app._dashboard_socket = bind("127.0.0.1", 0, "dashboard")
    try:
        app.start_control()
        port = app._dashboard_socket.getsockname()[1]
        with pytest.raises(CommandRejected, match="own dashboard"):
            app.admission.check(CameraConfig(id="x", url=f"http://localhost:{port}/api/state"))
    finally:
        app._dashboard_socket.close()
