"""Deploy and scale-out, where an operator met it: the reaper, the embedded Redis, joining a Ray cluster and the
compose stack (pipeline/reaper.py, pipeline/embedded_redis.py, pipeline/cluster.py, docker-compose.yml). Every
process a test starts is stopped in its ``finally``."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pipeline.cluster as cluster
from pipeline.errors import UserError
from pipeline.reaper import Reaper

ROOT = Path(__file__).resolve().parent.parent


def test_reaper_runs_this_package_whatever_the_working_directory(tmp_path, monkeypatch):
    """`hydravision run` from a folder holding a package of its own named pipeline (a common name): the reaper
    was `python -m pipeline.reaper`, which looks in the working directory first, so it ran that package (and
    where hydravision is installed from a wheel, found no reaper in it: the run had none)."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    reaper = Reaper.start()
    reaper.release(timeout=60)
    assert reaper.proc.returncode == 0


JOIN_WITHOUT_TOKEN = """
import pipeline.cluster as cluster
from pipeline.config import parse_config
from pipeline.errors import UserError
cluster._check_head = lambda *args: None  # a head answers there
config = parse_config({"redis": {"url": "redis://10.9.9.9:6379/0"}, "ray": {"address": "127.0.0.1:1"}})
try:
    cluster.init_ray(config, {})
except UserError as e:
    print("UserError:", e)
"""


def test_joining_a_cluster_with_token_auth_and_no_token_is_the_users_error(tmp_path):
    """A controller with RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN (the node's .env forgotten): ray.init's
    AuthenticationError went through as "a bug in hydravision", with a traceback. Ray reads the mode once per
    process: the join runs in one of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")  # no ~/.ray/auth_token
    out = subprocess.run([sys.executable, "-c", JOIN_WITHOUT_TOKEN], env=env, cwd=ROOT, capture_output=True,
                         encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("UserError: ray.address: cannot join the Ray cluster at '127.0.0.1:1'"), out.stdout
    assert "RAY_AUTH_TOKEN" in out.stdout


def test_a_ray_address_where_an_http_server_answers_is_refused_at_once():
    """`ray.address: head:8265` (the dashboard's port, the one Ray's job docs put in RAY_ADDRESS) or any other
    HTTP port: the check before ray.init let every answer but a Redis's through, and ray.init then retried
    for minutes. A head's GCS answers in binary HTTP/2 frames (tests/test_cluster_bookkeeping.py)."""
    server = http.server.ThreadingHTTPServer(("", 0), http.server.BaseHTTPRequestHandler)  # also the node's IP
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        with pytest.raises(UserError, match=rf"^ray.address: '{address}' is not a Ray cluster's head"):
            cluster._check_head(address, "ray.address", 1.0)
    finally:
        server.shutdown()
        server.server_close()
