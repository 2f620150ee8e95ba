"""/metrics, /healthz, /readyz and the telemetry behind them (pipeline/metrics.py, pipeline/telemetry.py,
workers/histograms.py), found in an audit (round 14): edge cases an operator of a long-running service meets. No
Ray: stats dicts as the actors report them, and the stand-ins of tests/test_metrics.py."""

from __future__ import annotations

import socket
import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.metrics import RedisProbe, include_metrics
from test_metrics import Clock, service, tick
from workers.settings import CameraConfig


@pytest.mark.parametrize("accept", [
    "application/openmetrics-text; version=abc",
    'application/openmetrics-text; version="1.0.0"',  # a quoted parameter value: legal HTTP
    "text/plain; version=1.x",
    "application/openmetrics-text; version=1.\u00e9",
])
def test_metrics_answers_the_text_format_to_an_accept_header_whose_version_is_no_number(accept):
    """prometheus-client compares the parts of the asked version with numbers: a part that is no number raised
    TypeError, and the scrape was answered 500 (a scraper or proxy sending an odd Accept got no metrics at all)."""
    clock = Clock()
    app = service(clock, {"a": CameraConfig(id="a", url="rtsp://cam/a")})
    tick(app, clock, {"a": "running"})
    api = FastAPI()
    include_metrics(api, app)
    with TestClient(api, raise_server_exceptions=False) as client:
        r = client.get("/metrics", headers={"Accept": accept.encode("latin-1")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'hydravision_frames_total{camera="a",outcome="published"} 80.0' in r.text


@pytest.fixture
def frozen_redis():
    """A port that takes connections and never answers (a frozen Redis, a black-holed network): its URL."""
    server = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                taken.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()
    for conn in taken:  # a probe still waiting reads EOF and ends
        conn.close()


@pytest.mark.parametrize("query", ["?socket_timeout=120", "?socket_connect_timeout=120&socket_timeout=120",
                                   "?socket_timeout=3&retry_on_timeout=true"])
def test_the_readiness_probe_keeps_its_own_timeout_whatever_the_redis_urls_query_says(frozen_redis, query):
    """/readyz PINGs Redis with a 1 s timeout (docs/architecture.md), but redis-py lets a URL's query win over the
    client's arguments: a service whose Redis URL carried ?socket_timeout=120 (for its writers) had each /readyz
    wait 2 minutes on a frozen Redis, every other probe queued behind the probe's lock (and retried once more with
    ?retry_on_timeout=true)."""
    probe = RedisProbe(frozen_redis + query, timeout_s=0.5)
    answer: list = []
    worker = threading.Thread(target=lambda: answer.append(probe.check()), daemon=True)
    worker.start()
    worker.join(5)  # 0.5 s and one try, with room for a busy machine
    assert answer, "the probe was still waiting"
    ok, error = answer[0]
    assert not ok and "Timeout" in error
