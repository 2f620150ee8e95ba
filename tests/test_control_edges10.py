"""Live control as an operator meets it (pipeline/control.py, pipeline/live_control.py, pipeline/api.py,
pipeline/camera_commands.py, pipeline/dashboard.py): the answers of both channels carry a code that
`cameras add --yaml` decides by (it read the reason's text, and an export added back called every running file
camera of the config refused), `POST /cameras/` was a 307 that curl showed as an empty answer, and
`hydravision dashboard` exited 130 after Ctrl-C (killed by SIGTERM) where `run` exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.cli import main
from servers import hold_lease

HEADS = {"people": ["person"]}
REPO = Path(__file__).resolve().parents[1]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _app(tmp_path: Path, max_cameras: int = 2):
    """A real App (no Ray: only refusals and the list are asked of it) running one camera from its config that
    reads a file, as `hydravision run` with a clip in its config does; control channels may read no file."""
    from pipeline.admission import Admission
    from pipeline.app import App
    from pipeline.config import ApiConfig, parse_config
    from workers.settings import CameraConfig

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    app = App(parse_config({"api": {"max_cameras": max_cameras}}), say=lambda line: None)
    app.admission, app.model_heads = Admission(ApiConfig(), HEADS), HEADS
    config = CameraConfig(id="clip", url=str(clip))
    app.cameras["clip"] = SimpleNamespace(id="clip", config=config, added_by=None)
    return app, clip


# -- 1. the answers carry a code; `cameras add --yaml` decides by it ---------------------------------------------

def test_the_control_streams_answers_carry_the_http_apis_code(redis_server, tmp_path: Path) -> None:
    """The control stream's answer had status and reason only: a sender told "exists" from "bad field" by text."""
    from pipeline.control import ControlConsumer, await_answer

    app, clip = _app(tmp_path, max_cameras=1)
    client = redis_server.client()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        answers = {}
        for name, command in [("exists", {"op": "add", "camera": {"id": "clip", "url": str(clip)}}),
                              ("full", {"op": "add", "camera": {"id": "new", "url": "synthetic://street"}}),
                              ("missing", {"op": "remove", "id": "gone"}),
                              ("bad", {"op": "add", "camera": {"id": "x", "url": "synthetic://street", "fps": -1}}),
                              ("list", {"op": "list"})]:
            request_id = uuid.uuid4().hex
            client.xadd("hv:control", {"data": json.dumps({**command, "request_id": request_id})})
            answers[name] = await_answer(client, "hv:control:results", request_id, "0-0", 20)
    finally:
        consumer.stop()
    codes = {name: (a["status"], a.get("code")) for name, a in answers.items()}
    assert codes == {"exists": ("rejected", 409), "full": ("rejected", 409), "missing": ("rejected", 404),
                     "bad": ("rejected", 422), "list": ("accepted", 200)}, answers
    assert answers["exists"]["reason"] == "camera.id: camera 'clip' already exists"  # the fields stay as they were


def test_the_http_channels_answer_carries_the_status_as_its_code(tmp_path: Path) -> None:
    """HttpChannel kept the body of a refusal and dropped its status: the CLI could only read the text."""
    from pipeline.api import ApiServer, bind, build_api
    from pipeline.camera_commands import HttpChannel

    app, clip = _app(tmp_path)
    server = ApiServer(build_api(app, {})).start(bind("127.0.0.1", 0))
    try:
        channel = HttpChannel(server.url, None, 20)
        refused = channel.send("add", None, {"id": "clip", "url": str(clip)})
        listed = channel.send("list")
    finally:
        server.stop()
    assert (refused["status"], refused["code"], refused["reason"]) == (
        "rejected", 409, "camera.id: camera 'clip' already exists")
    assert (listed["status"], listed["code"], [c["id"] for c in listed["result"]]) == ("accepted", 200, ["clip"])


@pytest.mark.parametrize("channel", ["api", "redis"])
def test_an_export_added_back_leaves_a_running_file_camera_and_names_the_one_refused(
        channel: str, redis_server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`cameras export > f.yaml; cameras add --yaml f.yaml` beside the running service: the config's camera that
    reads a file was refused as "outside the media roots" (checked before the id) and the command exited 2
    naming it, although it runs. A 409 that is not "runs" (api.max_cameras) is still a refusal."""
    from pipeline.api import ApiServer, bind, build_api
    from pipeline.control import ControlConsumer

    app, clip = _app(tmp_path, max_cameras=1)
    path = tmp_path / "cameras.yaml"
    path.write_text(f"cameras:\n  - id: clip\n    url: {clip}\n  - id: extra\n    url: synthetic://street\n")
    if channel == "api":
        server = ApiServer(build_api(app, {})).start(bind("127.0.0.1", 0))
        argv, stop = ["--api", server.url], server.stop
    else:
        hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
        consumer = ControlConsumer(app, redis_server.url, "hv").start()
        argv, stop = ["--redis-url", redis_server.url], consumer.stop
    try:
        assert main(["cameras", "add", "--yaml", str(path), "--timeout", "20", *argv]) == 2
    finally:
        stop()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["camera clip already runs: left as it is (`cameras update` changes it)"], (out, err)
    assert "camera extra rejected: camera: 1 cameras already run (api.max_cameras)" in err, err
    assert _error_lines(err) == ["error: 1 of 2 cameras not added: extra"], err


def test_cameras_add_yaml_goes_by_the_code_and_the_list_not_by_the_reasons_words(capsys) -> None:
    """The reason is for people (its words may change); a 409 for a camera the list shows is one that runs."""
    from pipeline import camera_commands

    class Channel:
        def send(self, op, camera_id=None, body=None):
            if op == "list":
                return {"status": "accepted", "code": 200, "result": [{"id": "a"}]}
            return {"status": "rejected", "code": 409, "reason": f"camera.id: {body['id']!r} runs already"}

    with pytest.raises(camera_commands.UserError, match=r"^1 of 2 cameras not added: b$"):
        camera_commands._add_each(Channel(), [{"id": "a"}, {"id": "b"}])
    assert capsys.readouterr().out == "camera a already runs: left as it is (`cameras update` changes it)\n"


# -- 4. a trailing slash -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, right", [("POST", "/cameras/", "/cameras"),
                                                 ("DELETE", "/cameras/lobby/", "/cameras/lobby"),
                                                 ("GET", "/cameras/export/", "/cameras/export")])
def test_a_trailing_slash_is_answered_404_naming_the_path_not_redirected(method: str, path: str, right: str) -> None:
    """`curl -X POST .../cameras/` got a bodiless 307 (curl without -L shows nothing) and no camera was added."""
    from fastapi.testclient import TestClient

    from pipeline.api import build_api

    calls: list[str] = []

    class Controller:
        def add_camera(self, camera, by):
            calls.append("add")
            return {"id": camera["id"]}

        def remove_camera(self, camera_id, by):
            calls.append("remove")
            return {"id": camera_id}

        def export_cameras(self):
            calls.append("export")
            return {"yaml": ""}

    client = TestClient(build_api(Controller(), {}))
    got = client.request(method, path, json={"id": "lobby", "url": "synthetic://street"}, follow_redirects=False)
    assert (got.status_code, got.json()) == (404, {"status": "rejected", "reason": f"{method} {path}: no such path; "
                                                   f"without the trailing slash: {method} {right}"})
    assert calls == []
    assert client.request(method, "/cameras/nope/x/").status_code == 404  # no such path either way: as before
    assert client.request(method, right, json={"id": "lobby", "url": "synthetic://street"}).status_code < 300


# -- 3. the dashboard's exit on Ctrl-C and SIGTERM ---------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_dashboard_stopped_by_ctrl_c_or_sigterm_exits_0_as_run_does(sig: int, redis_server) -> None:
    """uvicorn raises the signal again after its graceful shutdown: exit 130 after Ctrl-C, and SIGTERM (docker
    stop, systemd) killed it, which a supervisor reads as a failure."""
    proc = subprocess.Popen(
        # a shell in the background ignores SIGINT; env puts it back (no preexec_fn: docs/architecture.md, Hangs)
        ["env", "--default-signal=INT",
         sys.executable, "-m", "pipeline.cli", "dashboard", "--redis-url", redis_server.url, "--port", "0"],
        cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()  # "Dashboard of ... at ...: http://127.0.0.1:PORT/ (Ctrl-C to stop)"
        found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert found, line
        deadline = time.monotonic() + 30
        while True:  # the port is bound before the line; poll until it answers
            try:
                with urllib.request.urlopen(found.group(1) + "healthz", timeout=5) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the dashboard did not answer"
                time.sleep(0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, (rc, err)
    assert "interrupted" not in err and "Traceback" not in err, err
