"""What an attacker on the network did to the HTTP API and the dashboard (round 15): escape sequences and 100 kB
lines forged into the controller's log, a DNS-rebound page reading /readyz and the schema of an API with a token,
a bidi override or C1 control in a run-time camera URL turning the dashboard's text backwards, and a dashboard
behind a proxy that rewrites Host refusing every Add and Remove without saying why."""

from __future__ import annotations

import http.client
import json
import logging
import time

import pytest
from fastapi.testclient import TestClient

from pipeline.admission import CommandRejected, parse_camera
from pipeline.api import ApiServer, bind, build_api
from pipeline.app import App
from pipeline.config import ConfigError, parse_config
from pipeline.dashboard import DashboardServer
from pipeline.testbed_dashboard import FakeController
import test_dashboard_browser
from test_dashboard_hostile import open_page
from workers.publish import keys

TOKEN = "t0k-" + "s" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
K = keys("hv")
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)
CONTROLS = "\x1b\x9b\u202e\u2066\u200f"  # ESC (C0), CSI (C1), right-to-left override and isolate, RLM


class Controller:
    def list_cameras(self) -> list[dict]:
        return []


def request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """``method path`` with exactly ``headers`` (Host included): the status and the JSON answer ({} for none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        answer = conn.getresponse()
        text = answer.read()
        is_json = answer.getheader("content-type", "").startswith("application/json")
        return answer.status, json.loads(text) if is_json else {}
    finally:
        conn.close()


# -- 1. what a client chose, in the log ------------------------------------------------------------------------

def _api_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.api"]


def test_a_path_sent_without_a_token_reaches_the_log_escaped_and_cut(caplog):
    """Before: `curl ".../cameras/x%0A13:26:00%20CRITICAL%20...%1B%5B31mRED"` logged a raw ESC that recoloured the
    operator's terminal (the path is percent-decoded; Python's URL parsing drops the newline), and a path of
    100,000 'A's made a 100 kB line. Now the control characters (C0, C1, bidi) show escaped and the line is cut."""
    server = ApiServer(build_api(Controller(), {"ops": TOKEN})).start(bind("127.0.0.1", 0))
    forged = "/cameras/x%0A13:26:00%20CRITICAL%20pipeline.app:%20fake%1B%5B31mRED%C2%9B%E2%80%AE%E2%81%A6%E2%80%8F"
    host = {"Host": f"127.0.0.1:{server.port}"}
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.api"):
            assert request(server.port, "GET", forged, host)[0] == 401
            assert request(server.port, "GET", "/cameras/" + "A" * 100_000, host)[0] == 401
    finally:
        server.stop()
    one, long = _api_warnings(caplog)
    assert not set(CONTROLS + "\n") & set(one), repr(one)
    assert one == ("HTTP API: refused GET /cameras/x13:26:00 CRITICAL pipeline.app: fake\\x1b[31mRED"
                   "\\x9b\\u202e\\u2066\\u200f from 127.0.0.1: Authorization: missing bearer token"), one
    assert len(long) < 1200 and "... (100013 characters)" in long, long[-200:]


def test_a_path_and_a_reason_of_a_refused_body_reach_the_log_escaped_and_cut(caplog):
    """The body's refusals are logged too, naming the path (with a token: the sender is known, not its path) and
    a reason that may quote the body: a key of 100,000 characters given twice was a 100 kB line."""
    client = TestClient(build_api(Controller(), {"ops": TOKEN}), raise_server_exceptions=False)
    twice = ('{"' + "k" * 100_000 + '": 1, "' + "k" * 100_000 + '": 2}').encode()
    with caplog.at_level(logging.WARNING, logger="pipeline.api"):
        assert client.patch("/cameras/x%1B%5B2J%E2%80%AE", content=b"id=1", headers=AUTH).status_code == 415
        assert client.post("/cameras", content=twice, headers={**AUTH, "Content-Type": "application/json"}
                           ).status_code == 422
    path, key = _api_warnings(caplog)
    assert not set(CONTROLS) & set(path) and path.startswith("HTTP API: rejected PATCH /cameras/x\\x1b[2J\\u202e: "), \
        repr(path)
    assert len(key) < 1200 and key.endswith(" characters)"), key[-200:]


# -- 2. a rebound page and an API with a token ---------------------------------------------------------------

@pytest.fixture
def service(monkeypatch):
    """A real App's HTTP API with a token, started as `hydravision run` starts it (start_control), without Ray."""
    monkeypatch.setattr(App, "_own_endpoints", lambda self: {})  # the Ray GCS's address: it started a local Ray
    app = App(parse_config({"api": {"port": 0, "tokens": {"ops": TOKEN}}, "control": {"enabled": False}}),
              say=lambda text: None)
    app.check_api_settings()
    app.start_control()
    try:
        yield app
    finally:
        app.stop_control()


def test_a_rebound_page_reads_neither_the_probes_nor_the_schema_of_an_api_with_a_token(service):
    """Before: Chromium opening http://rebind.example:PORT/readyz (the name mapped to 127.0.0.1) got 200 and the
    cameras: start_control turned the Host check off whenever a token was set. Now the routes that need no token
    refuse a foreign Host as a tokenless API does, also with a made-up token; loopback names still get them."""
    port = service.api_server.port
    rebound = {"Host": f"rebind.example:{port}"}
    for path in ("/readyz", "/healthz", "/openapi.json", "/docs", "/nothing-here"):
        status, answer = request(port, "GET", path, rebound)
        assert status == 403 and "DNS rebinding" in answer["reason"], (path, status, answer)
        made_up = {**rebound, "Authorization": "Bearer made-up-by-the-page-0123456789"}  # refused as a wrong token
        status, answer = request(port, "GET", path, made_up)
        assert (status, answer["reason"]) == (401, "Authorization: invalid token"), (path, status, answer)
        assert request(port, "GET", path, {"Host": f"localhost:{port}"})[0] in (200, 404, 503), path  # answered


def test_the_token_guarded_routes_still_answer_through_a_proxys_host(service):
    """A proxy on the machine may pass its own Host on: a request with the token works through it as before (and
    so do the probes with one); without a token the refusal says that a token is what passes any Host."""
    port = service.api_server.port
    proxied = {"Host": "cams.example.org"}
    status, answer = request(port, "GET", "/cameras", {**proxied, **AUTH})
    assert (status, answer["by"], answer["result"]) == (200, "api:ops", [])
    assert request(port, "GET", "/metrics", {**proxied, **AUTH})[0] == 200
    assert request(port, "GET", "/readyz", {**proxied, **AUTH})[0] in (200, 503)  # answered: not ready, no Redis
    status, answer = request(port, "POST", "/cameras", {**proxied, **AUTH, "Content-Type": "application/json"},
                             b'{"id": "a"}')
    assert status == 422 and answer["reason"].startswith("camera.url: "), answer  # reached the App's checks
    status, answer = request(port, "GET", "/cameras", proxied)
    assert status == 403 and "a request with a valid bearer token is answered through any Host" in answer["reason"]
    assert request(port, "GET", "/cameras", {"Host": f"127.0.0.1:{port}"})[0] == 401  # on loopback: as before


def test_a_wrong_token_through_a_proxys_host_is_refused_as_a_wrong_token_and_logged(service, caplog):
    """A rotated token behind a proxy that passes its own Host read 403 "DNS rebinding?" and left no log line
    (review); a made-up token still passes nothing, the probes included."""
    port = service.api_server.port
    with caplog.at_level("WARNING", logger="pipeline.api"):
        for path in ("/cameras", "/readyz"):
            status, answer = request(port, "GET", path, {"Host": "cams.example.org", "Authorization": "Bearer junk"})
            assert (status, answer["reason"]) == (401, "Authorization: invalid token"), (path, status, answer)
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 2 and all(m.endswith("through Host cams.example.org: Authorization: invalid token")
                                  for m in said), said
    # a page's other scheme (Basic) is the Host refusal as before, unlogged: no 401 to tell tokens are set by
    with caplog.at_level("WARNING", logger="pipeline.api"):
        status, answer = request(port, "GET", "/readyz", {"Host": "cams.example.org", "Authorization": "Basic eDp5"})
    assert status == 403 and "DNS rebinding" in answer["reason"], answer
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 2


def test_a_tokenless_apis_host_refusal_says_what_can_be_done():
    server = ApiServer(build_api(Controller(), {})).start(bind("127.0.0.1", 0))
    try:
        status, answer = request(server.port, "GET", "/cameras", {"Host": "proxy.example"})
    finally:
        server.stop()
    # what can be done: the API has no allowed-hosts setting to name (review), a loopback Host or a token can
    assert status == 403 and answer["reason"].endswith(
        "have a proxy send a loopback Host (proxy_set_header Host localhost), or set api.tokens: a request with a "
        "valid bearer token is answered through any Host"), answer


def test_an_api_with_a_token_bound_to_every_address_still_checks_no_host():
    """Bound elsewhere than loopback nothing is checked (its legitimate names are not known here): as before."""
    server = ApiServer(build_api(Controller(), {"ops": TOKEN})).start(bind("0.0.0.0", 0))
    try:
        assert request(server.port, "GET", "/openapi.json", {"Host": "camera-box.example"})[0] == 200
    finally:
        server.stop()


# -- 3. bidi and C1 controls in a camera URL, and text from Redis on the page --------------------------------

@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u200f", "\x9b", "\x85"])
def test_a_camera_url_with_a_bidi_or_c1_control_is_refused_naming_the_field(char):
    """Before: `POST /cameras` with a U+202E in the URL was accepted (201), and the dashboard tile's error showed
    backwards ('...hcus on :live htap eht kcehc'); a U+009B (CSI) reached the controller's log raw. Both are
    refused now, naming the field and the character; the value quoted escaped."""
    url = f"rtsp://127.0.0.1:8554/live{char}x"
    with pytest.raises(CommandRejected) as refused:
        parse_camera({"id": "evil", "url": url})
    reason = refused.value.reason
    assert refused.value.status == 422 and reason.startswith(f"camera.url: holds the invisible control character "
                                                             f"U+{ord(char):04X} "), reason
    assert char not in reason and ascii(char)[1:-1] in reason
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.url: holds the invisible control character"):
        parse_config({"cameras": [{"id": "c", "url": f"synthetic://street?seed=1{char}2"}]})
    fine = parse_camera({"id": "fine", "url": "rtsp://127.0.0.1:8554/caméra-été"})
    assert fine.url.endswith("été")  # letters stay


def _status(**extra) -> str:
    return json.dumps({"state": "reconnecting", "heartbeat_ts": time.time() + 3600, "fps": 0.0, **extra})


def test_text_from_redis_on_the_page_reorders_none_of_the_pages_own(redis_server, browser):
    """A camera's error (last_error: what its server answered, its URL in it, or what another program wrote to
    Redis) and its id are isolated from the page's own text (<bdi>, dir=auto). Before, an id starting with a U+202E
    put the detail view's state badge on the wrong side of the camera's name, and the tile's error was not
    isolated from the page's "Redis: " before it."""
    rlo = "\u202e"
    camera, error = f"{rlo}cam", f"rtsp://h/live{rlo}RED: no such stream (404): check the path"
    client = redis_server.client()
    client.hset(K.cameras, mapping={camera: _status(last_error=error),
                                    "up-cam": _status(state="running", redis_error=f"{rlo}OOM command not allowed")})
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = open_page(browser, server.url)
        page.wait_for_selector('.tile[data-camera="up-cam"] .error:not([hidden])')
        shown = page.evaluate("""() => [...document.querySelectorAll(".tile .error")].map(
            (e) => [e.textContent, e.querySelector("bdi") && e.querySelector("bdi").textContent])""")
        assert sorted(shown) == sorted([[error, error], [f"Redis: {rlo}OOM command not allowed",
                                                         f"{rlo}OOM command not allowed"]]), shown
        page.goto(f"{server.url}#/camera/{camera}")
        page.wait_for_selector("#detail h2 .state:not(:empty)")
        name_right, badge_left = page.evaluate("""() => {
            const h2 = document.querySelector("#detail h2"), range = document.createRange();
            range.selectNodeContents(h2.firstChild);  // the camera's name (its text, or the element holding it)
            return [range.getBoundingClientRect().right, h2.querySelector(".state").getBoundingClientRect().left];
        }""")
        assert badge_left >= name_right, (badge_left, name_right)  # the badge after the name, as for any camera
        assert page.inner_text("#detail h2") == f"{camera} reconnecting" and not page.errors


# -- 4. the dashboard behind a proxy that rewrites Host ------------------------------------------------------

def test_a_proxys_origin_allowed_by_the_operator_may_add_and_remove(redis_server):
    """Behind nginx's default proxy_pass (the upstream's Host: 127.0.0.1:PORT) the page served as
    https://cams.example.org sent Origin https://cams.example.org: every Add and Remove was refused with a bare
    "cross-origin request". An Origin whose host is in allowed_hosts is taken now; another site's is refused
    naming the Origin, the Host it was compared with, and the setting that would allow it."""
    server = DashboardServer(redis_server.url, allow_control=True, allowed_hosts=["cams.example.org"]).start()
    try:
        with FakeController(redis_server.url) as controller:
            upstream = {"Host": f"127.0.0.1:{server.port}"}
            status, answer = request(server.port, "DELETE", "/api/cameras/lobby",
                                     {**upstream, "Origin": "https://cams.example.org"})
            assert (status, answer.get("reason")) == (404, "id: no camera 'lobby'"), answer  # the controller's
            assert controller.received == [("remove", "lobby", "redis:dashboard")]
            status, answer = request(server.port, "DELETE", "/api/cameras/lobby",
                                     {**upstream, "Origin": "https://evil.example"})
            assert status == 403 and controller.received == [("remove", "lobby", "redis:dashboard")]
            reason = answer["reason"]
            assert reason.startswith("cross-origin request: ") and "'https://evil.example'" in reason, reason
            assert f"'127.0.0.1:{server.port}'" in reason and "dashboard.allowed_hosts" in reason, reason
            assert "--allowed-host" in reason, reason
            status, answer = request(server.port, "DELETE", "/api/cameras/lobby", {**upstream, "Origin": "null"})
            assert status == 403, answer
    finally:
        server.stop()
