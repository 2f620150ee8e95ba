"""The dashboard over a long run (audit 7): a page that met an HTTP error on its way back to a restarted dashboard
(a proxy's 502), in Debian's chromium through Playwright as tests/test_dashboard_browser.py; and an event far
larger than the pipeline's, which the Hub keeps among the events of every page's hello.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

from pipeline.dashboard import DashboardServer
from pipeline.dashboard_hub import Hub
import test_dashboard_browser
from workers.publish import keys

K = keys("hv")
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:g} s")


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A proxy in front of a dashboard that is restarting: 502 to everything."""
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_page_that_met_a_proxys_502_reconnects_once_the_dashboard_is_back(redis_server, browser):
    """EventSource retries a lost connection, but an HTTP error answer closes it for good. Before: one 502 from a
    proxy while the dashboard restarted, and the page said 'reconnecting…' forever over the tiles of then."""
    client = redis_server.client()
    client.hset(K.cameras, "before", _status())
    server = DashboardServer(redis_server.url, interval_s=0.2).start()
    port, page = server.port, test_dashboard_browser.new_page(browser)
    try:
        page.goto(server.url)
        page.wait_for_function("() => window.hvLoaded")
        server.stop()
        gateway = http.server.HTTPServer(("127.0.0.1", port), _Gateway)
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        try:
            _wait(lambda: _Gateway.hits, 30, "request of the page to the gateway")
        finally:
            gateway.shutdown()
            gateway.server_close()
        client.hset(K.cameras, "after", _status())
        server = DashboardServer(redis_server.url, interval_s=0.2, port=port).start()
        names = "() => [...document.querySelectorAll('.tile')].map((t) => t.dataset.camera)"
        _wait(lambda: "after" in page.evaluate(names), 30, "tile of the camera added while the page was away")
        assert page.evaluate("() => document.querySelector('#notice').hidden"), page.inner_text("#notice")
        assert not page.errors, page.errors
    finally:
        page.close()
        server.stop()


def test_a_huge_event_is_kept_as_the_page_shows_it(redis_server):
    """The Hub keeps the last 300 events and sends them in every page's hello. Before: an event another program
    wrote with a picture or an embedding inline (here 1 MB of numbers and 1 MB of text) was kept whole, so every
    page opening (and reconnecting) got megabytes per such event; the page shows no list, and text cut."""
    client = redis_server.client()
    big = {"v": 1, "type": "plate_read", "camera": "gate", "ts": time.time(), "plate": "AB-123",
           "embedding": [0.5] * 200_000, "crop": "Q" * 10**6}
    client.xadd(K.events, {"data": json.dumps(big)})
    client.xadd(K.events, {"data": json.dumps({"v": 1, "type": "stream_up", "camera": "gate", "ts": time.time(),
                                               "track_ids": [1, 2]})})
    hub = Hub(redis_server.url)
    hub._backlog(client)
    hello = hub.hello_text()
    assert len(hello) < 16 * 1024, len(hello)
    huge, small = json.loads(hello)["events"]
    assert huge["plate"] == "AB-123" and huge["type"] == "plate_read" and "embedding" not in huge
    assert 0 < len(huge["crop"]) <= 1000
    assert small["track_ids"] == [1, 2]  # an event of the usual size stays whole
