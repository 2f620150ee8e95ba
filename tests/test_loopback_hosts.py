"""DNS rebinding: a loopback-bound HTTP API or dashboard answers only requests whose Host names loopback.

Any web page can have its own name resolve to 127.0.0.1; its script may then read and drive a loopback server
(no token is needed there) as if it were the page's own site, but its requests name that site in Host."""

from __future__ import annotations

import http.client

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from pipeline.admission import host_header_name, is_loopback_name
from pipeline.api import ApiServer, bind
from pipeline.dashboard import DashboardServer


def status(port: int, host: str, path: str = "/") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("header, name, loopback", [
    ("127.0.0.1:8080", "127.0.0.1", True), ("localhost", "localhost", True), ("[::1]:9", "::1", True),
    ("app.localhost:80", "app.localhost", True), ("127.9.9.9", "127.9.9.9", True), ("LOCALHOST.", "LOCALHOST.", True),
    ("evil.example:8080", "evil.example", False), ("10.0.0.5", "10.0.0.5", False), ("[fe80::1]:80", "fe80::1", False),
    ("localhost.evil.example", "localhost.evil.example", False)])
def test_host_headers_are_read_as_browsers_send_them(header, name, loopback):
    assert host_header_name(header) == name and is_loopback_name(name) is loopback


def test_a_loopback_api_refuses_a_page_of_another_site_that_rebound_its_name():
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    server = ApiServer(app).start(bind("127.0.0.1", 0))
    try:
        port = server.port
        assert status(port, f"127.0.0.1:{port}") == 200 and status(port, f"localhost:{port}") == 200
        assert status(port, f"evil.example:{port}") == 403
    finally:
        server.stop()


def test_an_api_bound_to_every_address_checks_no_host():
    """Its legitimate names (a LAN address, a DNS name) are not known here; a token guards it (see ApiConfig)."""
    server = ApiServer(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])).start(bind("0.0.0.0", 0))
    try:
        assert status(server.port, "camera-box.example") == 200
    finally:
        server.stop()


def test_the_dashboard_on_loopback_refuses_them_too_but_a_proxys_name_it_is_given():
    server = DashboardServer("redis://127.0.0.1:1/0", port=0, allowed_hosts=["cams.example.org"]).start()
    try:  # its Redis is never reached here
        assert status(server.port, f"127.0.0.1:{server.port}", "/healthz") != 403
        assert status(server.port, "rebound.example", "/healthz") == 403
        assert status(server.port, "rebound.example", "/api/state") == 403
        assert status(server.port, "cams.example.org:443", "/healthz") != 403  # a proxy passing its Host on
    finally:
        server.stop()


def test_the_dashboard_command_takes_a_proxys_names():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["dashboard", "--allowed-host", "a.example", "--allowed-host", "b.example"])
    assert args.allowed_host == ["a.example", "b.example"]


def test_the_services_dashboard_takes_a_proxys_names_from_its_config():
    from pipeline.config import parse_config

    config = parse_config({"dashboard": {"enabled": True, "allowed_hosts": ["cams.example.org"]},
                           "cameras": [{"id": "a", "url": "synthetic://street"}]})
    assert config.dashboard.allowed_hosts == ["cams.example.org"]


def test_a_dashboard_bound_to_every_address_checks_the_host_when_given_names():
    """The Compose stack's dashboard: bound to 0.0.0.0 in its container, published on the host's loopback. It
    checked no Host there, so a page that rebound its name to 127.0.0.1 read the cameras' pictures and events."""
    server = DashboardServer("redis://127.0.0.1:1/0", host="0.0.0.0", port=0, allowed_hosts=["localhost"]).start()
    try:
        assert status(server.port, f"localhost:{server.port}", "/healthz") != 403
        assert status(server.port, f"127.0.0.1:{server.port}", "/healthz") != 403
        assert status(server.port, f"rebound.example:{server.port}", "/api/state") == 403
        # a LAN user or a load balancer's health check by address: a rebound page names its site, never an IP
        assert status(server.port, f"10.0.0.5:{server.port}", "/healthz") != 403
        assert status(server.port, f"[fe80::1]:{server.port}", "/healthz") != 403
    finally:
        server.stop()
    server = DashboardServer("redis://127.0.0.1:1/0", port=0, allowed_hosts=["cams.example.org"]).start()
    try:  # on loopback an address other than loopback's is refused, as before
        assert status(server.port, f"10.0.0.5:{server.port}", "/healthz") == 403
    finally:
        server.stop()
    server = DashboardServer("redis://127.0.0.1:1/0", host="0.0.0.0", port=0).start()
    try:  # no names given: as before, its legitimate names are not known here
        assert status(server.port, "camera-box.example", "/healthz") != 403
    finally:
        server.stop()
