"""Edges of live control found in an audit (2026-12-07): the HTTP API's server, the `hydravision cameras` CLI,
the Redis control stream and the run-time checks of a camera. Stand-in controllers (no Ray), as tests/test_api.py
uses."""

from __future__ import annotations

import threading

import pytest

from pipeline.api import ApiServer, bind, build_api
from pipeline.cli import main
from test_api import TOKEN, Controller, metrics_routes


# -- the HTTP API's server ---------------------------------------------------------------------------------------

def test_an_api_start_given_up_on_stops_its_server_and_frees_its_port(monkeypatch):
    """An API slower to start than its timeout (a loaded machine) raised, and left uvicorn's thread running with the
    listening socket: App.stop_control never knew of them (``api_server`` stayed None), and the server went on to
    serve commands under a controller that had given up its start, on a port no later start could bind."""
    import uvicorn

    def slow_run(self, sockets=None):  # never says it started; ends when told to
        while not self.should_exit:
            threading.Event().wait(0.01)

    monkeypatch.setattr(uvicorn.Server, "run", slow_run)
    sock = bind("127.0.0.1", 0)
    server = ApiServer(build_api(Controller(), {}))
    with pytest.raises(RuntimeError, match="the HTTP API did not start"):
        server.start(sock, timeout_s=0.3)
    server._thread.join(5)
    assert not server._thread.is_alive() and sock.fileno() == -1


def _client():
    from fastapi.testclient import TestClient

    controller = Controller()
    return TestClient(build_api(controller, {"ops": TOKEN}, extensions=[metrics_routes]),
                      raise_server_exceptions=False), controller


def test_head_is_answered_as_get_without_a_body():
    """FastAPI's routes take GET alone: an uptime monitor probing /healthz with HEAD (the default of several) was
    answered 405, and took the running service for down; HEAD on a camera route still needs the token."""
    client, controller = _client()
    probe = client.head("/healthz")
    assert probe.status_code == 200 and probe.content == b""
    assert client.head("/cameras").status_code == 401
    assert client.head("/cameras", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert controller.calls == []


def test_a_method_a_path_does_not_take_is_answered_with_every_method_it_does():
    """PUT /cameras/lobby (a common guess for an update) was answered 405 with ``Allow: GET`` and "Method Not
    Allowed": Starlette names the first route of the path only, so the answer said a camera cannot be changed or
    removed there, where PATCH and DELETE do just that."""
    client, _ = _client()
    reply = client.put("/cameras/lobby", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 405
    assert reply.headers["Allow"] == "DELETE, GET, HEAD, PATCH"
    assert reply.json()["reason"] == "PUT /cameras/lobby: method not allowed (allowed: DELETE, GET, HEAD, PATCH)"
    assert client.delete("/cameras").headers["Allow"] == "GET, HEAD, POST"


# -- the CLI -----------------------------------------------------------------------------------------------------

def test_the_cli_sends_a_non_ascii_token_as_the_api_reads_it(monkeypatch, capsys):
    """The API takes a token's UTF-8 bytes (tests/test_api_sources_edges.py); the CLI sent it through http.client,
    which writes a header as latin-1: a token with 'ä' was refused as invalid, and one with '€' failed in the CLI
    as "--api http://...: not a usable URL", blaming the URL."""
    token = "pässwört-€-" + "z" * 24
    server = ApiServer(build_api(Controller(), {"ops": token})).start(bind("127.0.0.1", 0), check_host=False)
    try:
        monkeypatch.setenv("HYDRAVISION_API_TOKEN", token)
        assert main(["cameras", "list", "--api", server.url, "--json"]) == 0, capsys.readouterr().err
        assert '"by": "api:ops"' in capsys.readouterr().out
    finally:
        server.stop()


def test_a_redis_url_given_is_used_over_an_api_url_in_the_environment(monkeypatch, capsys):
    """`cameras add ... --redis-url redis://other` (README's form) went to $HYDRAVISION_API_URL where a shell set
    it: the flag given on the command line was ignored without a word, and the camera added to another service."""
    monkeypatch.setenv("HYDRAVISION_API_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    assert main(["cameras", "list", "--redis-url", "redis://127.0.0.1:1/0", "--timeout", "2"]) == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err
    assert main(["cameras", "list", "--timeout", "2"]) == 2  # no flag: the environment's API, as documented
    assert "cannot reach the HTTP API at http://127.0.0.1:1" in capsys.readouterr().err


def test_an_add_redirected_by_a_proxy_is_not_said_to_be_added(capsys):
    """A proxy in front of the API redirecting (http -> https, a moved host): urllib re-sent the POST as a GET, the
    list answered "accepted", and `cameras add` printed "added camera lobby" with nothing added (and the token went
    along to wherever the redirect pointed). Now the redirect is the answer, naming where it pointed."""
    import http.server

    controller = Controller()
    api = ApiServer(build_api(controller, {})).start(bind("127.0.0.1", 0))

    class Moved(http.server.BaseHTTPRequestHandler):
        def _moved(self) -> None:
            self.send_response(301)
            self.send_header("Location", api.url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _moved

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        argv = ["cameras", "add", "--id", "lobby", "--url", "synthetic://street",
                "--api", f"http://127.0.0.1:{proxy.server_port}"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"HTTP 301 Moved Permanently, not followed to {api.url}/cameras" in err
        assert controller.calls == []
    finally:
        proxy.shutdown()
        proxy.server_close()
        api.stop()
