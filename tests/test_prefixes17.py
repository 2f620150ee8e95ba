"""Two services (prefixes pa and pb) on one Redis, as an operator ran them: a `--prefix` the CLI ignored beside an
API URL (the command changed the other service), a join of a token-auth Ray cluster that said only "Failed to
connect", a command for a stopped service's prefix that waited its whole 90 s, and prefixes no service can have
(pipeline/camera_commands.py, pipeline/cli.py, pipeline/cluster.py, pipeline/api.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import pipeline.cluster as cluster
from pipeline.cli import build_parser, main
from pipeline.errors import UserError
from pipeline.service_lease import lease_key

ROOT = Path(__file__).resolve().parent.parent
LEASE = json.dumps({"run": "r17", "pid": 4242, "host": "cam-box", "since": 0})


@pytest.fixture(autouse=True)
def _no_defaults_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HYDRAVISION_API_URL", "HYDRAVISION_API_TOKEN", "HYDRAVISION_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# -- 1. --prefix beside an API URL -------------------------------------------------------------------------------

class PbService:
    """What the HTTP API calls on the App of the service of prefix pb."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(redis=SimpleNamespace(prefix="pb"))
        self.updated: list[tuple[str, dict]] = []

    def list_cameras(self) -> list[dict]:
        return [{"id": "cam1", "url": "synthetic://street", "heads": ["people"], "state": "running"}]

    def update_camera(self, camera_id: str, changes: dict, by: str) -> dict:
        self.updated.append((camera_id, changes))
        return {"id": camera_id, "changed": sorted(changes)}


@pytest.fixture
def pb_api():
    from pipeline.api import ApiServer, bind, build_api

    service = PbService()
    server = ApiServer(build_api(service, {})).start(bind("127.0.0.1", 0))
    yield server.url, service
    server.stop()


def test_a_prefix_other_than_the_api_services_is_refused_naming_both_and_nothing_is_changed(
        pb_api, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`HYDRAVISION_API_URL=<pb's API> cameras update cam1 --fps 3 --prefix pa` said "updated camera cam1" and
    changed pb's camera; `cameras list --api <pb's API> --prefix pa` listed pb's cameras as pa's."""
    url, service = pb_api
    monkeypatch.setenv("HYDRAVISION_API_URL", url)
    assert main(["cameras", "update", "cam1", "--fps", "3", "--prefix", "pa"]) == 2
    assert service.updated == []
    out, err = capsys.readouterr()
    assert not out and _errors(err) == [
        f"error: --prefix pa: the HTTP API at {url} ($HYDRAVISION_API_URL) is the service of prefix 'pb', not 'pa': "
        "nothing sent. Give that prefix's own API, or give --redis-url to reach prefix 'pa''s control stream"], err
    monkeypatch.delenv("HYDRAVISION_API_URL")
    assert main(["cameras", "list", "--api", url, "--prefix", "pa"]) == 2
    out, err = capsys.readouterr()
    assert "cam1" not in out and "(--api) is the service of prefix 'pb', not 'pa'" in err, err
    # its own prefix (or none) goes through as before
    assert main(["cameras", "update", "cam1", "--fps", "3", "--api", url, "--prefix", "pb"]) == 0
    assert main(["cameras", "list", "--api", url, "--prefix", "pb"]) == 0
    assert "cam1" in capsys.readouterr().out
    assert main(["cameras", "update", "cam1", "--fps", "4", "--api", url]) == 0
    assert service.updated == [("cam1", {"fps": 3.0}), ("cam1", {"fps": 4.0})]


def test_a_prefix_given_to_an_api_that_does_not_say_its_own_is_refused(capsys: pytest.CaptureFixture) -> None:
    """A service of a version whose answers do not name its prefix: the command is not sent on a guess."""
    import http.server

    changed: list[str] = []

    class Older(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "accepted", "op": "list", "by": "api:anonymous", "result": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_DELETE(self) -> None:
            changed.append(self.path)
            self.send_error(500)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Older)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["cameras", "remove", "cam1", "--api", url, "--prefix", "pa"]) == 2
    finally:
        server.shutdown()
        server.server_close()
    assert changed == []
    assert "does not say its service's prefix (an older version): nothing sent" in capsys.readouterr().err


# -- 2. joining a cluster that requires Ray's token auth --------------------------------------------------------

# What Ray 2.60's ray.init raised, joining a plain `ray start --head` without RAY_AUTH_MODE=token (after ~20 s)
GCS_REFUSED = ("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n  File \"ray/"
               "_private/node.py\", line 996, in _init_gcs_client\nray.exceptions.AuthenticationError: RPC error: "
               "InvalidAuthToken: Authentication token is missing or incorrect. Note: RAY_AUTH_MODE is currently "
               "'disabled' (not 'token').\n")


def _join(monkeypatch: pytest.MonkeyPatch, cause: Exception) -> str:
    def init(**kwargs: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:27430") from cause

    monkeypatch.setattr(cluster, "_check_head", lambda *args: None)  # a head answers there
    monkeypatch.setattr(cluster.ray, "init", init)
    ray_config = SimpleNamespace(resolved_address=lambda: "127.0.0.1:27430", address="127.0.0.1:27430",
                                 namespace=None, placement_timeout_s=1.0)
    with pytest.raises(UserError) as raised:
        cluster.init_ray(SimpleNamespace(ray=ray_config, redis=SimpleNamespace(prefix="pb")), {})
    return str(raised.value)


@pytest.mark.parametrize("mode, why", [
    (None, "RAY_AUTH_MODE is not 'token' here, so no token was sent"),
    ("token", "the token here is not the cluster's"),
])
def test_a_join_refused_for_its_token_says_what_to_set(mode: str | None, why: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """It said "cannot join the Ray cluster at '127.0.0.1:27430': Failed to connect to Ray cluster at ...", which
    named no cause; with RAY_AUTH_MODE=token exported the same join took 1 s."""
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    message = _join(monkeypatch, RuntimeError(GCS_REFUSED))
    assert message == (f"ray.address: cannot join the Ray cluster at '127.0.0.1:27430': the cluster requires Ray's "
                       f"token authentication and {why}: set RAY_AUTH_MODE=token and the cluster's token (its "
                       "head's ~/.ray/auth_token, in ~/.ray/auth_token here or in RAY_AUTH_TOKEN), as "
                       "docs/scaling.md ('Token auth') says")


def test_a_join_that_fails_for_another_cause_is_not_blamed_on_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Normal-path guard: a head gone away is no token problem; Ray's own first line stays."""
    message = _join(monkeypatch, RuntimeError("Failed to connect to GCS. Last connection error: Deadline Exceeded"))
    assert message == ("ray.address: cannot join the Ray cluster at '127.0.0.1:27430': Failed to connect to Ray "
                       "cluster at 192.0.2.2:27430")


# -- 3. a prefix no service holds --------------------------------------------------------------------------------

def test_a_command_for_a_prefix_without_a_service_is_refused_at_once_and_nothing_is_written(
        redis_server, capsys: pytest.CaptureFixture) -> None:
    """pa stopped cleanly, pb runs: `cameras list --prefix pa` waited 90 s ("waiting up to 87 s more for a
    hydravision service to answer on pa:control") for nobody."""
    client = redis_server.client()
    client.set(lease_key("pb"), LEASE, px=120_000)
    client.set("other:service", "not a lease")  # another program's key is no service
    assert main(["cameras", "list", "--redis-url", redis_server.url, "--prefix", "pa", "--timeout", "4"]) == 2
    err = capsys.readouterr().err
    assert _errors(err) == [f"error: no hydravision service runs on prefix 'pa' at {redis_server.url} now (no lease "
                            "pa:service, which a running service holds): nothing sent; prefixes with a service "
                            "there: pb"], err
    assert "waiting" not in err
    assert sorted(client.keys()) == [b"other:service", b"pb:service"]  # no pa:control, nor its results
    client.delete(lease_key("pb"))
    assert main(["cameras", "remove", "cam1", "--redis-url", redis_server.url, "--prefix", "pb"]) == 2
    assert "nothing sent; no service holds any prefix there" in capsys.readouterr().err


def test_a_command_for_a_prefix_whose_lease_is_held_is_sent_and_answered(redis_server,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Normal-path guard: a service holding the lease (busy or starting) gets the command and its answer counts."""
    client = redis_server.client()
    client.set(lease_key("pa"), LEASE, px=120_000)

    def service() -> None:  # answers the first command on pa:control
        [(_, [(_, fields)])] = client.xread({"pa:control": "0-0"}, block=60_000)
        command = json.loads(fields[b"data"])
        answer = {"request_id": command["request_id"], "status": "accepted", "op": "list", "by": "redis:default",
                  "result": [{"id": "cam9", "url": "synthetic://street", "heads": ["people"]}]}
        client.xadd("pa:control:results", {"data": json.dumps(answer)})

    answering = threading.Thread(target=service, daemon=True)
    answering.start()
    assert main(["cameras", "list", "--redis-url", redis_server.url, "--prefix", "pa", "--timeout", "60"]) == 0
    answering.join(10)
    assert "cam9" in capsys.readouterr().out


# -- 4. prefixes no service can have; a command ended by SIGTERM ---------------------------------------------

@pytest.mark.parametrize("command", [["status"], ["tail", "--events"], ["dashboard"], ["cameras", "list"],
                                     ["cameras", "remove", "cam1"]])
@pytest.mark.parametrize("prefix", ["", "pa:cam", "a b", "x" * 33])
def test_prefixes_the_config_refuses_are_refused_by_every_command(command: list[str], prefix: str,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """`status --prefix ''` read ":cameras"; `cameras list --prefix 'a b'` left a stream "a b:control" behind."""
    with pytest.raises(SystemExit) as ended:
        build_parser().parse_args([*command, "--prefix", prefix])
    assert ended.value.code == 2
    assert f"expected a redis.prefix (1-32 letters, digits, '_', '.' or '-', as the config takes), got {prefix!r}" \
        in capsys.readouterr().err


def test_a_command_ended_by_sigterm_while_it_waits_is_taken_back(redis_server) -> None:
    """A `cameras add` killed with SIGTERM (a `timeout`, a supervisor) left its command, the camera's password in
    it, in pa:control for ever; Ctrl-C's take-back did not run. Now taken back, and the process still ends by
    SIGTERM."""
    client = redis_server.client()
    client.set(lease_key("pa"), LEASE, px=300_000)  # a service holds pa, but never answers
    camera = '{"id": "door", "url": "rtsp://admin:s3cret-pw@cam.local/live"}'
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRAVISION_")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cameras", "add", "--json", camera, "--redis-url",
                             redis_server.url, "--prefix", "pa", "--timeout", "120"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    try:
        deadline = time.monotonic() + 90
        # sent, and waiting for the answer: its waiter blocks in XREAD on the results
        while not (client.xlen("pa:control") and any(c.get("cmd") == "xread" for c in client.client_list())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, err
    assert client.xlen("pa:control") == 0, err


def test_a_service_on_its_embedded_redis_holds_the_lease_from_the_start():
    """Review: a service on the embedded Redis (no redis.url: the demo) took no lease, so `cameras ... --redis-url`
    to it said "no hydravision service runs" until its control stream was first read (20-60 s into the start)."""
    import redis

    from pipeline.app import App
    from pipeline.config import parse_config

    app = App(parse_config({}), say=lambda text: None)
    url = app.resolve_redis()
    try:
        assert redis.Redis.from_url(url).exists("hv:service")
    finally:
        app.lease.release()
        app.embedded.stop()
