"""What an operator found the HTTP API and the dashboard let network clients do (round 17): a dashboard with control
on 0.0.0.0 taking Add and Remove from the LAN (past the API's tokens) and from a DNS-rebound page through
127.0.0.1, connections that never finished a request held open for good, no security scheme in the OpenAPI schema,
one log line per refused request, an accepted add answered 200 by the dashboard, and an IPv6 address unbracketed."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import pytest
from fastapi import Depends
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

import pipeline.api as api_module
import pipeline.dashboard as dashboard_module
from pipeline.admission import Admission, CommandRejected
from pipeline.api import ApiServer, BearerAuth, bind, build_api
from pipeline.app import App
from pipeline.config import ApiConfig, ConfigError, parse_config
from pipeline.dashboard import DashboardServer, create_app
from pipeline.dashboard_hub import Hub
from pipeline.testbed_dashboard import FakeController
from workers.settings import CameraConfig

TOKEN = "t0k-" + "s" * 24
HEADS = {"people": ["person"]}
CLOSE_WAIT_S = 15.0  # how long a test waits for the server to close a connection (the deadline is 1 s)


class Controller:
    def list_cameras(self) -> list[dict]:
        return []


def request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """``method path`` to 127.0.0.1:port with exactly ``headers`` (Host included): the status and the JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        answer = conn.getresponse()
        text = answer.read()
        return answer.status, json.loads(text) if text.startswith(b"{") else {}
    finally:
        conn.close()


# -- 1. control from a dashboard other machines reach ----------------------------------------------------------

class _Bound(Exception):
    """Raised where the start binds its sockets: the settings passed (nothing after it runs: no Ray)."""


@pytest.fixture
def starting(monkeypatch):
    """``start(dashboard)``: App.start of a config with that dashboard section, up to the binding of its ports."""
    monkeypatch.setattr(App, "check_model", lambda self: {"heads": HEADS, "input_size": [64, 64]})

    def refuse_to_bind(*args, **kwargs):
        raise _Bound()
    monkeypatch.setattr(api_module, "bind", refuse_to_bind)

    def start(dashboard: dict) -> None:
        config = parse_config({"dashboard": {"enabled": True, **dashboard},
                               "cameras": [{"id": "a", "url": "synthetic://street"}]})
        App(config, say=lambda text: None).start()
    return start


def test_a_service_refuses_dashboard_control_reachable_from_other_machines(starting):
    """Before: `dashboard: {host: 0.0.0.0, allow_control: true}` started without a word, and a LAN user's curl POST
    and DELETE /api/cameras added and removed cameras ("by": "redis:dashboard"), past the API's tokens; the API
    bound there without a token is refused at start. The page has no login: refused at start too."""
    with pytest.raises(ConfigError) as refused:
        starting({"host": "0.0.0.0", "allow_control": True})
    message = str(refused.value)
    assert message.startswith("dashboard.host: 0.0.0.0 is reachable from other machines, and "
                              "dashboard.allow_control would let anyone there add and remove cameras"), message
    assert "bind 127.0.0.1" in message and "HTTP API" in message, message
    for fine in ({"host": "127.0.0.1", "allow_control": True}, {"host": "localhost", "allow_control": True},
                 {"host": "::1", "allow_control": True}, {"host": "0.0.0.0", "allow_control": False}):
        with pytest.raises(_Bound):  # on to binding its ports
            starting(fine)


def test_the_dashboard_command_refuses_control_reachable_from_other_machines(monkeypatch, capsys):
    """Before: `hydravision dashboard --host 0.0.0.0 --allow-control` served (the same LAN add and remove)."""
    from pipeline.cli import main

    served = []
    monkeypatch.setattr(dashboard_module, "serve", lambda *args, **kwargs: served.append(args[2]) or 0)
    nowhere = ["--redis-url", "redis://127.0.0.1:1/0"]
    assert main(["dashboard", *nowhere, "--host", "0.0.0.0", "--allow-control"]) == 2 and served == []
    err = capsys.readouterr().err
    assert err.startswith("error: --host: 0.0.0.0 is reachable from other machines, and --allow-control would "
                          "let anyone there add and remove cameras"), err
    assert main(["dashboard", *nowhere, "--host", "0.0.0.0"]) == 0  # a page to look at: as before
    assert main(["dashboard", *nowhere, "--host", "127.0.0.1", "--allow-control"]) == 0
    assert served == ["0.0.0.0", "127.0.0.1"]


def test_a_rebound_page_reaching_the_dashboard_through_loopback_cannot_control_it(redis_server):
    """Before: a dashboard bound to 0.0.0.0 (which checks no Host) took an add and a removal from a page that
    rebound its name to 127.0.0.1: Host rebind.example:PORT and Origin http://rebind.example:PORT match, and
    cross_origin compared only those. Over loopback a control request must name a loopback Host (or an allowed
    name)."""
    server = DashboardServer(redis_server.url, host="0.0.0.0", allow_control=True).start()
    try:
        with FakeController(redis_server.url) as controller:
            rebound = f"rebind.example:{server.port}"
            page = {"Host": rebound, "Origin": f"http://{rebound}"}
            status, answer = request(server.port, "DELETE", "/api/cameras/lobby", page)
            assert status == 403 and "DNS rebinding" in answer["reason"] and repr(rebound) in answer["reason"], answer
            camera = json.dumps({"id": "evil", "url": "synthetic://street"}).encode()
            status, answer = request(server.port, "POST", "/api/cameras",
                                     {**page, "Content-Type": "application/json"}, camera)
            assert status == 403 and "DNS rebinding" in answer["reason"], answer
            assert controller.received == []
            for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):  # a loopback Host still does
                status, answer = request(server.port, "DELETE", "/api/cameras/lobby", {"Host": host})
                assert (status, answer.get("reason")) == (404, "id: no camera 'lobby'"), (host, answer)
            assert len(controller.received) == 2
            # reading the page is no control: as before, answered whatever the Host (503 until Redis is read)
            assert request(server.port, "GET", "/healthz", {"Host": rebound})[0] in (200, 503)
    finally:
        server.stop()
    # on loopback: a proxy on the machine that passes its own Host on, a name the operator allowed, still controls
    with DashboardServer(redis_server.url, allow_control=True, allowed_hosts=["cams.example.org"]) as server, \
            FakeController(redis_server.url) as controller:
        status, answer = request(server.port, "DELETE", "/api/cameras/lobby",
                                 {"Host": "cams.example.org", "Origin": "https://cams.example.org"})
        assert (status, answer.get("reason")) == (404, "id: no camera 'lobby'"), answer
        assert controller.received == [("remove", "lobby", "redis:dashboard")]


# -- 2. connections that never finish a request ----------------------------------------------------------------

@pytest.fixture
def deadline(monkeypatch):
    monkeypatch.setattr(api_module, "HEAD_TIMEOUT_S", 1.0)


def _closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (what it answers before is read and dropped), while
    ``dribble`` is sent every 0.2 s (a slowloris keeps a head coming, a byte at a time)."""
    end = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < end:
        try:
            if dribble:
                sock.sendall(dribble)
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset by the server
            return True
    return False


def _connect(port: int, sent: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if sent:
        sock.sendall(sent)
    return sock


async def _slow() -> PlainTextResponse:
    import asyncio

    await asyncio.sleep(3.0)  # three deadlines: an answer that takes long is no head that does
    return PlainTextResponse("done")


def _api_server() -> ApiServer:
    app = build_api(Controller(), {}, [lambda api, controller: api.add_api_route("/slow", _slow)])
    return ApiServer(app).start(bind("127.0.0.1", 0))


def test_the_api_closes_connections_whose_request_head_never_completes(deadline):
    """Before: 200 slowloris sockets stayed open 40 s+, 5 that connected and sent nothing 150 s (uvicorn starts its
    keep-alive timer only after a first answer, and any byte stops it): enough of them take every file descriptor."""
    server = _api_server()
    head = b"GET /cameras HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    try:
        silent, partial = _connect(server.port), _connect(server.port, head)
        assert _closed_within(silent, CLOSE_WAIT_S) and _closed_within(partial, CLOSE_WAIT_S)
        dribbling = _connect(server.port, head)
        assert _closed_within(dribbling, CLOSE_WAIT_S, dribble=b"X")
        # kept alive after an answer: the next head has its deadline from that answer, however it dribbles in
        kept = _connect(server.port, head + b"\r\n")
        kept.settimeout(10)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200 ")
        kept.sendall(head)
        assert _closed_within(kept, CLOSE_WAIT_S, dribble=b"X")
        # a request whose head is in is answered, however long its answer takes (three deadlines here)
        status, _ = request(server.port, "GET", "/slow", {"Host": "127.0.0.1"})
        assert status == 200
        for sock in (silent, partial, dribbling, kept):
            sock.close()
    finally:
        server.stop()


def test_the_dashboard_closes_them_too_but_not_its_event_streams(deadline, redis_server):
    """Before: a standalone dashboard under `ulimit -n 160` was locked by 200 such sockets (every probe timed out).
    Its event stream, answered, is no head awaited: it stays open past the deadline."""
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        silent = _connect(server.port)
        partial = _connect(server.port, b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _closed_within(silent, CLOSE_WAIT_S) and _closed_within(partial, CLOSE_WAIT_S)
        stream = _connect(server.port, b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        stream.settimeout(10)
        received, end = b"", time.monotonic() + 4.0  # four deadlines
        while time.monotonic() < end:
            chunk = stream.recv(65536)
            assert chunk, f"the event stream was closed after {len(received)} bytes"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"event: tick") >= 2, received
        for sock in (silent, partial, stream):
            sock.close()


@pytest.fixture
def body_deadline(deadline, monkeypatch):
    monkeypatch.setattr(api_module, "BODY_TIMEOUT_S", 2.0)


async def _slow_post(request: Request) -> PlainTextResponse:
    import asyncio

    body = await request.body()
    await asyncio.sleep(3.0)  # past the body's deadline: a request all in is answered however long it takes
    return PlainTextResponse(f"{len(body)} bytes")


def _answer(sock: socket.socket) -> bytes:
    """The head of what the server answers on ``sock`` (its first bytes)."""
    sock.settimeout(10)
    return sock.recv(65536)


def test_the_api_closes_connections_whose_declared_body_never_comes(body_deadline):
    """Before: the deadline ran only while a head was awaited. A POST declaring Content-Length: 100000 without a
    token got its 401 at once and stayed open for good while a byte came now and then (any byte stops uvicorn's
    keep-alive timer), a GET with a Content-Length as well; without tokens the API's body reader waited on the body
    for good. Now the body must be in within BODY_TIMEOUT_S of its head; a connection answered before its body was
    all in goes on once the rest is in."""
    def extension(api, controller) -> None:
        api.add_api_route("/slow", _slow_post, methods=["POST"])
    server = ApiServer(build_api(Controller(), {"ops": TOKEN}, [extension])).start(bind("127.0.0.1", 0))
    post = b"POST /cameras HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    try:
        refused = _connect(server.port, post + b"Content-Length: 100000\r\n\r\n")
        assert _answer(refused).startswith(b"HTTP/1.1 401 ")
        assert _closed_within(refused, CLOSE_WAIT_S, dribble=b"x")
        listed = _connect(server.port, b"GET /cameras HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode())
        assert _answer(listed).startswith(b"HTTP/1.1 200 ")
        assert _closed_within(listed, CLOSE_WAIT_S, dribble=b"x")
        # answered before its body came, then the body: the whole answer read, and the connection goes on (review:
        # closed there, a keep-alive client's next request on it was lost)
        late = _connect(server.port, post + b"Content-Length: 2\r\n\r\n")
        answer = _answer(late)
        late.sendall(b"{}")
        while not answer.endswith(b"}"):
            answer += late.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 ") and b"missing bearer token" in answer
        late.sendall(b"GET /cameras HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _answer(late).startswith(b"HTTP/1.1 401 ")
        # a body that comes within the deadline, and an answer that takes longer than it, are fine
        status, _ = request(server.port, "POST", "/slow", {"Host": "127.0.0.1"}, b"{}")
        assert status == 200
        for sock in (refused, listed, late):
            sock.close()
    finally:
        server.stop()
    server = ApiServer(build_api(Controller(), {})).start(bind("127.0.0.1", 0))  # no tokens: the body is read
    try:
        silent = _connect(server.port, post + b"Content-Length: 1000\r\n\r\n")
        dribbling = _connect(server.port, post + b"Content-Length: 1000\r\n\r\n")
        assert _closed_within(silent, CLOSE_WAIT_S) and _closed_within(dribbling, CLOSE_WAIT_S, dribble=b" ")
        for sock in (silent, dribbling):
            sock.close()
    finally:
        server.stop()


def test_the_dashboard_closes_connections_whose_declared_body_never_comes(body_deadline, redis_server):
    """Before: POST /api/cameras with Content-Length: 1000 and no body waited on it for good (control off too): still
    open and unanswered after 12 s, and 200 of them locked the dashboard out as slow heads had. The body reader's
    ClientDisconnect, once closed, is no traceback in the log."""
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        failed: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = failed.append  # type: ignore[method-assign]
        logging.getLogger("uvicorn.error").addHandler(handler)  # the dashboard's uvicorn logs there, not propagated
        try:
            post = (b"POST /api/cameras HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n")
            silent, dribbling = _connect(server.port, post), _connect(server.port, post)
            assert _closed_within(silent, CLOSE_WAIT_S) and _closed_within(dribbling, CLOSE_WAIT_S, dribble=b" ")
            # a body all in is answered as before (control is off)
            camera = json.dumps({"id": "lobby", "url": "synthetic://street"}).encode()
            status, answer = request(server.port, "POST", "/api/cameras",
                                     {"Host": "127.0.0.1", "Content-Type": "application/json"}, camera)
            assert status == 403 and "control is off" in answer["reason"], answer
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
        assert [r.getMessage() for r in failed if r.levelno >= logging.ERROR] == []
        for sock in (silent, dribbling):
            sock.close()


# -- 3. the token in the OpenAPI schema -------------------------------------------------------------------------

def test_the_schema_declares_the_bearer_token_and_the_refusals():
    """Before: /openapi.json had no securitySchemes: /docs' "Try it out" could not send the token, and generated
    clients did not know of it. The answers are as before."""
    def extension(api, controller) -> None:  # another module's route that wants the token
        api.add_api_route("/extra", lambda: {}, dependencies=[Depends(api.state.auth)])
    client = TestClient(build_api(Controller(), {"ops": TOKEN}, [extension]))
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["BearerAuth"]["type"] == "http"
    assert schema["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    operations = [(path, method, op) for path, ops in schema["paths"].items() for method, op in ops.items()]
    cameras = [(path, method, op) for path, method, op in operations if path.startswith("/cameras")]
    assert len(cameras) == 6, [(p, m) for p, m, _ in cameras]
    for path, method, op in cameras:
        assert op.get("security") == [{"BearerAuth": []}], (path, method)
        assert {"401", "403"} <= set(op["responses"]), (path, method, list(op["responses"]))
        assert op["responses"]["401"]["content"]["application/json"]["schema"]["properties"]["reason"]
        assert not [p for p in op.get("parameters", []) if p["name"].lower() == "authorization"], (path, method)
    assert [op.get("security") for path, _, op in operations if path == "/extra"] == [[{"BearerAuth": []}]]
    # its answers, unchanged
    answer = client.get("/cameras")
    assert (answer.status_code, answer.json()) == (401, {"status": "rejected",
                                                         "reason": "Authorization: missing bearer token"})
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    answer = client.get("/cameras", headers={"Authorization": "Basic eDp5"})
    assert (answer.status_code, answer.json()["reason"]) == (401, "Authorization: expected 'Bearer <token>'")
    answer = client.get("/cameras", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert (answer.status_code, answer.json()["reason"]) == (401, "Authorization: invalid token")
    answer = client.get("/cameras", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (answer.status_code, answer.json()["by"]) == (200, "api:ops")
    assert client.get("/extra").status_code == 401
    tokenless = TestClient(build_api(Controller(), {}))
    assert tokenless.get("/cameras").json()["by"] == "api:anonymous"


# -- 4. one log line per refused request ------------------------------------------------------------------------

def _request_from(client: str, headers: dict[str, str] | None = None, path: str = "/cameras") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "GET", "path": path, "headers": raw, "client": (client, 40000)})


def test_refusals_are_logged_a_few_a_minute_per_client_then_counted(caplog):
    """Before: 300 requests without a token from 192.0.2.2 were 300 log lines. Now an address's first few of a
    minute are said (someone fixing a header sees each new reason), the rest counted, and the count said with its
    next line a minute on; another address is said meanwhile, and so is a refusal through another Host."""
    auth = BearerAuth({"ops": TOKEN})
    now = [1000.0]
    auth._clock = lambda: now[0]

    def refuse(client: str, headers: dict[str, str] | None = None) -> None:
        with pytest.raises(HTTPException) as refused:
            auth(_request_from(client, headers))
        assert refused.value.status_code == 401

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "pipeline.api"]

    with caplog.at_level(logging.WARNING, logger="pipeline.api"):
        for i in range(300):
            refuse("192.0.2.2", {"Authorization": "Bearer junk"} if i == 1 else None)
            now[0] += 0.1  # 30 s in all
        rebound = {"Host": "proxy.example", "Authorization": "Bearer junk"}
        scope = _request_from("192.0.2.2", rebound).scope
        assert auth.vouches(scope) == "Authorization: invalid token"  # still refused, counted with the rest
        assert said() == ["HTTP API: refused GET /cameras from 192.0.2.2: Authorization: missing bearer token",
                          "HTTP API: refused GET /cameras from 192.0.2.2: Authorization: invalid token",
                          "HTTP API: refused GET /cameras from 192.0.2.2: Authorization: missing bearer token"]
        refuse("192.0.2.3")
        assert said()[-1] == "HTTP API: refused GET /cameras from 192.0.2.3: Authorization: missing bearer token"
        now[0] += 31  # a minute after the first
        assert auth.vouches(scope) == "Authorization: invalid token"
        assert said()[-1] == ("HTTP API: refused GET /cameras from 192.0.2.2 through Host proxy.example: "
                              "Authorization: invalid token (298 more from this address held back: said at most 3 "
                              "a minute)"), said()[-1]
        refuse("192.0.2.2")
        assert said()[-1].endswith(": Authorization: missing bearer token") and len(said()) == 6


def test_refusals_from_many_addresses_keep_a_bounded_table_and_few_lines(caplog):
    """Before: past 4096 remembered addresses each new one rebuilt the whole table (in the event loop, for vouches),
    and each was said: 20,480 addresses of an IPv6 /64 in a minute took 35 s of CPU, 20,480 lines. Now the table
    keeps 4096, the first minute to begin forgotten first once it is over, and with all of them refused within a
    minute a new address's refusals are counted with the other addresses': one line a minute for them."""
    auth = BearerAuth({"ops": TOKEN})
    now = [1000.0]
    auth._clock = lambda: now[0]
    kept = api_module._REFUSERS_KEPT

    def refuse(client: str) -> None:
        with pytest.raises(HTTPException):
            auth(_request_from(client))
        now[0] += 0.001

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "pipeline.api"]

    refused = "HTTP API: refused GET /cameras from {}: Authorization: missing bearer token"
    with caplog.at_level(logging.WARNING, logger="pipeline.api"):
        for i in range(3 * kept):
            refuse(f"2001:db8::{i:x}")
        assert len(auth._refusers) == kept
        assert len(said()) == kept + 1 and said()[-1] == refused.format(f"2001:db8::{kept:x}")
        refuse("2001:db8::5")  # remembered: its own few lines still
        assert len(said()) == kept + 2 and said()[-1] == refused.format("2001:db8::5")
        # a minute on: new addresses take the places of those whose minute is over, then the others' count is said
        now[0] += 60
        for i in range(kept + 1):
            refuse(f"2001:db8:1::{i:x}")
        assert len(auth._refusers) == kept and "2001:db8::5" not in auth._refusers
        assert len(said()) == 2 * kept + 3
        assert said()[-1] == refused.format(f"2001:db8:1::{kept:x}") + (
            f" ({2 * kept - 1} more from other addresses held back: past {kept} addresses refused in a minute, one "
            "line a minute for them)"), said()[-1]


# -- 5. nits ---------------------------------------------------------------------------------------------------

def test_the_dashboard_answers_an_accepted_add_201_as_the_controller_does(redis_server):
    """Before: an add the controller accepted (its code 201, the HTTP API's too) was answered 200."""
    hub = Hub(redis_server.url, interval_s=0.2, allow_control=True)
    with FakeController(redis_server.url) as controller, TestClient(create_app(hub)) as http:
        answer = http.post("/api/cameras", json={"id": "lobby", "url": "synthetic://street"})
        assert (answer.status_code, answer.json()["status"], answer.json()["code"]) == (201, "accepted", 201)
        answer = http.delete("/api/cameras/lobby")
        assert (answer.status_code, answer.json()["status"]) == (200, "accepted")
        assert [op for op, _, _ in controller.received] == ["add", "remove"]


def test_an_ipv6_address_of_the_services_own_is_named_bracketed():
    """Before: "camera.url: ::1:16417 is this service's own Redis" (read as one IPv6 address)."""
    admission = Admission(ApiConfig(), HEADS, {"Redis": ("::1", 16417)})
    with pytest.raises(CommandRejected) as refused:
        admission.check(CameraConfig(id="a", url="rtsp://[::1]:16417/x"))
    assert refused.value.reason == "camera.url: [::1]:16417 is this service's own Redis; a camera may not point at it"
    with pytest.raises(CommandRejected) as refused:
        admission.check(CameraConfig(id="a", url="rtsp://localhost:16417/x"))
    assert refused.value.reason.startswith("camera.url: localhost:16417 is this service's own Redis")
