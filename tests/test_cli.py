"""The CLI tells the user's mistakes from hydravision's bugs (issue 12, defect 8).

A UserError (ConfigError, models/'s bad-input errors translated by pipeline/model_commands.py) is one
`error:` line and exit 2; with -v its traceback is logged too. Anything else is a bug whatever its type,
ValueError included: its traceback is logged, exit 1, and the last line says it is a bug.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from servers import hold_lease

REPO = Path(__file__).resolve().parent.parent
SECRET_URL = "rtsp://admin:p@ss:w0rd@cam/x"


def _deep_bug(*args: object, **kwargs: object) -> None:
    raise ValueError("operands could not be broadcast together with shapes (3,4) (5,)")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# command, where the bug is planted (module, name), the exception it raises
BUGS = {
    "eval-valueerror": (["eval", "--no-progress"], ("pipeline.model_commands", "load_checkpoint"), _deep_bug),
    "train-filenotfound": (["train", "--out", "TMP/o.safetensors", "--head", "people=person", "--steps", "1",
                            "--no-progress"], ("pipeline.model_commands", "train_model"),
                           lambda *a, **k: open("/nonexistent/hydravision/internal.json")),
    "run-valueerror": (["run", "TMP/c.yaml"], ("pipeline.run_commands", "load_config"), _deep_bug),
    "eval-keyerror": (["eval", "--no-progress"], ("pipeline.model_commands", "evaluate_model"),
                      lambda *a, **k: {}["heads"]),
}


@pytest.mark.parametrize("case", list(BUGS))
def test_a_bug_keeps_its_traceback_and_exits_1(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    argv, (module, name), bug = BUGS[case]
    monkeypatch.setattr(f"{module}.{name}", bug)
    code = main([a.replace("TMP", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback (most recent call last)" in caplog.text, caplog.text
    assert f", in {getattr(bug, '__name__', '<lambda>')}" in caplog.text  # the frame where it was raised
    assert "This is a bug in hydravision" in err.splitlines()[-1], err


def test_a_bugs_output_hides_credentials(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"could not reopen {SECRET_URL}")

    monkeypatch.setattr("pipeline.model_commands.load_checkpoint", bug)
    assert main(["eval", "--no-progress"]) == 1
    out = capsys.readouterr().err + caplog.text
    assert "rtsp://***@cam/x" in out and "ss:w0rd" not in out, out


USER_ERRORS = {
    "missing-config": (["run", "TMP/nope.yaml"], "config file not found"),
    "missing-checkpoint": (["eval", "--checkpoint", "TMP/nope.safetensors", "--no-progress"], "no such checkpoint"),
    "freeze-without-from": (["train", "--out", "TMP/o.safetensors", "--head", "p=person", "--freeze-shared",
                             "--no-progress"], "needs an init checkpoint"),
    "bad-depth": (["train", "--out", "TMP/o.safetensors", "--head", "p=person", "--depth", "7", "--steps", "1",
                   "--no-progress"], "resnet depth must be one of"),
    "tail-without-camera": (["tail"], "tail needs a camera id"),
    "second-reid-head": (["train-reid", "--from", str(REPO / "models/checkpoints/demo.safetensors"), "--out",
                          "TMP/o.safetensors", "--heads", "people", "--steps", "1", "--no-progress"],
                         "has a re-id head already"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_exits_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    argv, fragment = USER_ERRORS[case]
    code = main([a.replace("TMP", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(_error_lines(err)) == 1 and fragment in err.lower(), err
    assert "Traceback" not in err + caplog.text
    assert "bug" not in err


def test_with_v_a_user_error_shows_its_traceback(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    code = main(["-v", "eval", "--checkpoint", str(tmp_path / "nope.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(_error_lines(err)) == 1, err
    assert "Traceback (most recent call last)" in caplog.text
    assert "CheckpointError" in caplog.text  # models/'s original error, chained to the UserError


def test_arguments_that_can_only_be_wrong_are_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", "o.safetensors", "--head", "p=person", "--steps", "0"])
    assert exit_.value.code == 2
    assert "expected a positive whole number, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # was pydantic's ValidationError when set on the config: a 'bug'
        main(["run", "configs/demo.yaml", "--api-port", "70000"])
    assert exit_.value.code == 2
    assert "expected a port 0-65535 (0: a free one), got '70000'" in capsys.readouterr().err


def _console_script() -> list[str]:
    """The installed `hydravision` entry point of this interpreter's environment, else the module."""
    script = Path(sys.executable).with_name("hydravision")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline.cli"]


def test_console_script_with_v_shows_a_user_errors_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    missing = tmp_path / "nope.safetensors"
    quiet = subprocess.run([*_console_script(), "eval", "--checkpoint", str(missing), "--no-progress"],
                           capture_output=True, encoding="utf-8", timeout=120, env=env)
    loud = subprocess.run([*_console_script(), "-v", "eval", "--checkpoint", str(missing), "--no-progress"],
                          capture_output=True, encoding="utf-8", timeout=120, env=env)
    for result in (quiet, loud):
        assert result.returncode == 2, result.stderr[-2000:]
        assert _error_lines(result.stderr) == [f"error: {missing}: no such checkpoint file"], result.stderr
    assert "Traceback" not in quiet.stderr
    assert "Traceback (most recent call last)" in loud.stderr and "CheckpointError" in loud.stderr, loud.stderr


def test_the_controller_does_not_import_torch():
    """`hydravision run` starts faster without it (a second of its ~9 s to a first message): the controller
    reads the checkpoint's metadata only; the inference replicas load the model."""
    code = "import sys, pipeline.cli, pipeline.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_status_shows_an_entry_nobody_refreshes_as_stale(redis_server, capsys: pytest.CaptureFixture) -> None:
    """What a reader sees after a run was SIGKILLed (tests/test_lifecycle.py kills a real one): its last status
    says "running" but its heartbeat is older than STALE_AFTER_S, so `status` shows it as stale."""
    import json
    import time

    from pipeline.status import STALE_AFTER_S

    now = time.time()
    base = {"state": "running", "instance": "i1", "fps": 10.0, "published": 5}
    redis_server.client().hset("hv:cameras", mapping={
        "dead": json.dumps({**base, "camera": "dead", "heartbeat_ts": now - STALE_AFTER_S - 5}),
        "live": json.dumps({**base, "camera": "live", "heartbeat_ts": now})})
    assert main(["status", "--redis-url", redis_server.url, "--json"]) == 0
    statuses = {s["camera"]: s for s in json.loads(capsys.readouterr().out)}
    assert (statuses["dead"]["state"], statuses["dead"]["stale"]) == ("stale", True)
    assert (statuses["live"]["state"], statuses["live"]["stale"]) == ("running", False)
    assert main(["status", "--redis-url", redis_server.url]) == 0
    table = capsys.readouterr().out
    assert "stale" in table and "dead" in table and "live" in table, table


def test_status_output_says_when_a_cameras_messages_are_not_reaching_redis() -> None:
    """`published` counts frames handed to the publisher; while Redis refuses them the line and table say so."""
    from rich.console import Console

    from pipeline.status import status_line, status_table

    ok = {"camera": "a", "state": "running", "fps": 10.0, "published": 50, "dropped": {"rate": 0},
          "last_error": None, "redis_error": None}
    failing = {**ok, "camera": "b", "last_error": "EOF", "redis_error": "ConnectionError: Connection refused"}
    line = status_line([ok, failing])
    assert line.count("NOT IN REDIS") == 1 and line.endswith("NOT IN REDIS: ConnectionError: Connection refused")
    console = Console(record=True, width=250)
    console.print(status_table([ok, failing]))
    rows = {row.split("│")[1].strip(): row for row in console.export_text().splitlines() if row.count("│") > 5}
    assert "Redis: ConnectionError: Connection refused; EOF" in rows["b"] and "Redis" not in rows["a"]


# -- hydravision cameras ---------------------------------------------------------------------------------------

class StandInApp:
    """What the HTTP API calls on the App: cameras whose URLs hold brackets, and the ids asked to remove."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def list_cameras(self) -> list[dict]:
        return [{"id": "v6", "url": "rtsp://[fd00::5]:554/live", "heads": ["people"], "state": "running"},
                {"id": "ch", "url": "rtsp://cam/ch[/1]", "heads": ["people"], "state": "running"}]

    def remove_camera(self, camera_id: str, by: str) -> dict:
        self.removed.append(camera_id)
        return {"id": camera_id}


@pytest.fixture
def api_service():
    from pipeline.api import ApiServer, bind, build_api

    app = StandInApp()
    server = ApiServer(build_api(app, {})).start(bind("127.0.0.1", 0))
    yield server.url, app
    server.stop()


@pytest.mark.parametrize("content, message", [
    (None, "--yaml: cannot read TMP/camera.yaml: No such file or directory"),
    ("id: lobby\nurl: rtsp://admin:s3cret@cam/x: 5\n",
     "--yaml: TMP/camera.yaml is not valid YAML: mapping values are not allowed here (line 2, column 31)"),
    ("id: lobby\nheads: [people\n",
     "--yaml: TMP/camera.yaml is not valid YAML: expected ',' or ']', but got '<stream end>' (line 3, column 1)"),
])
def test_cameras_add_says_which_yaml_file_it_cannot_read_or_parse_and_where(
        content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "camera.yaml"
    if content is not None:
        path.write_text(content)
    # --api: the file is read before anything is sent, and no service needs to listen there
    assert main(["cameras", "add", "--api", "http://127.0.0.1:9", "--yaml", str(path)]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"error: {message.replace('TMP', str(tmp_path))}"], err
    assert "s3cret" not in err  # the parser's snippet of the file is left out


def test_camera_ids_reach_the_http_api_as_one_path_segment(api_service, capsys: pytest.CaptureFixture) -> None:
    url, app = api_service
    for camera_id in ("lobby?x", "a b", "c#d"):
        assert main(["cameras", "remove", camera_id, "--api", url]) == 0, capsys.readouterr().err
    assert app.removed == ["lobby?x", "a b", "c#d"]  # not "lobby", not an InvalidURL


def test_cameras_list_and_status_show_brackets_in_urls_and_errors_as_written(
        api_service, capsys: pytest.CaptureFixture) -> None:
    from rich.console import Console

    from pipeline.status import status_table

    url, _ = api_service
    assert main(["cameras", "list", "--api", url]) == 0
    listed = capsys.readouterr().out
    assert "rtsp://[fd00::5]:554/live" in listed and "rtsp://cam/ch[/1]" in listed, listed
    console = Console(record=True, width=250)
    console.print(status_table([{"camera": "lobby", "state": "failed", "last_error": "[rtsp @ 0x5581] 401; [/x]"}]))
    assert "[rtsp @ 0x5581] 401; [/x]" in console.export_text()


@pytest.mark.parametrize("read, message", [
    (False, "(no service read the command: it expires unapplied)"),
    (True, "a service read the command and may still apply it"),
])
def test_a_command_left_unanswered_is_said_to_expire_only_if_no_service_read_it(
        read: bool, message: str, redis_server, capsys: pytest.CaptureFixture) -> None:
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    import threading

    client = redis_server.client()
    client.xgroup_create("hv:control", "hydravision", id="$", mkstream=True)
    # a controller that takes the command and is still applying it when the CLI gives up
    reader = threading.Thread(target=client.xreadgroup, args=("hydravision", "busy", {"hv:control": ">"}),
                              kwargs={"count": 1, "block": 10_000})
    if read:
        reader.start()
    assert main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "1"]) == 2
    if read:
        reader.join()
    err = capsys.readouterr().err
    assert err.startswith("error: no answer on hv:control:results within 1 s: ") and message in err, err


def test_demo_finds_its_config_under_the_working_directory_where_hydravision_is_installed(tmp_path, monkeypatch):
    """Installed from a wheel (the Docker image's `pip install .`), the package has no configs/ beside it:
    `hydravision demo` said 'config file not found' in the image, whose working directory holds configs/."""
    import pipeline.run_commands as rc
    from pipeline.errors import UserError

    monkeypatch.setattr(rc, "DEMO_CONFIG", tmp_path / "site-packages" / "configs" / "demo.yaml")
    monkeypatch.chdir(REPO)
    assert rc.demo_config() == REPO / "configs" / "demo.yaml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run it from the checkout, or `hydravision run PATH/TO/demo.yaml`"):
        rc.demo_config()


def test_model_commands_take_demo_for_the_bundled_checkpoint(capsys) -> None:
    """As model.checkpoint: demo does in a config; --from demo said 'no such checkpoint file'."""
    from pipeline.cli import build_parser

    bundled = REPO / "models" / "checkpoints" / "demo.safetensors"
    parser = build_parser()
    assert parser.parse_args(["train-reid", "--from", "demo", "--out", "o.safetensors", "--heads", "people"]).init == bundled
    assert parser.parse_args(["eval", "--checkpoint", "demo"]).checkpoint == bundled
    assert main(["train-reid", "--from", "demo", "--out", "o.safetensors", "--heads", "people", "--steps", "1",
                 "--no-progress"]) == 2
    assert "has a re-ID head already" in capsys.readouterr().err  # it got to the checkpoint itself
