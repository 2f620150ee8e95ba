"""`hydravision cameras` and `hydravision status` as an operator meets them (pipeline/camera_commands.py,
pipeline/status.py): an answer that came late read as a service not reached, an export added back said "give
the camera's --id" (and a camera's ${VAR} was sent as its password), and the status table showed a dead
service's rates, "inf" and "None", and passed a terminal escape sequence from Redis to the reader's terminal."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.cli import main
from pipeline.status import status_table
from servers import hold_lease


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _table(stats: list[dict]) -> dict[str, list[str]]:
    """The status table's cells, by camera."""
    out = io.StringIO()
    Console(file=out, width=250).print(status_table(stats))
    rows = [line.split("│")[1:-1] for line in out.getvalue().splitlines() if line.startswith("│")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


COLUMNS = ["camera", "state", "fps", "decode fps", "latency", "published", "dropped", "skipped", "reconnects"]


# -- an answer that does not come in --timeout -----------------------------------------------------------------

@pytest.fixture
def silent_api():
    """An HTTP server that takes the request and answers only once the test is done with it."""
    release, received = threading.Event(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _hold(self) -> None:
            received.set()
            release.wait(30)

        do_GET = do_POST = do_PATCH = do_DELETE = _hold

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    release.set()
    server.shutdown()
    server.server_close()


def test_an_add_answered_after_the_timeout_says_it_may_still_apply_not_that_the_api_is_unreachable(
        silent_api, capsys: pytest.CaptureFixture) -> None:
    """The service had the add and was starting the camera; the CLI said "cannot reach the HTTP API ...: timed
    out", so the operator took it for not sent and sent it again (409), or went looking for a network fault."""
    url, received = silent_api
    assert main(["cameras", "add", "--api", url, "--id", "gate", "--url", "synthetic://street",
                 "--timeout", "1"]) == 2
    assert received.is_set()
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"error: no answer from the HTTP API at {url} within 1 s: the command may still "
                                 "be applied (see `cameras list`)"], err
    # a list has nothing to apply
    assert main(["cameras", "list", "--api", url, "--timeout", "1"]) == 2
    assert _error_lines(capsys.readouterr().err) == [f"error: no answer from the HTTP API at {url} within 1 s"]


def test_an_api_nobody_listens_on_is_still_said_to_be_unreachable(capsys: pytest.CaptureFixture) -> None:
    """Normal-path guard: a refused connection is no late answer."""
    assert main(["cameras", "add", "--api", "http://127.0.0.1:9", "--id", "gate", "--url", "synthetic://street",
                 "--timeout", "1"]) == 2
    assert "error: cannot reach the HTTP API at http://127.0.0.1:9: " in capsys.readouterr().err


# -- a file of several cameras ---------------------------------------------------------------------------------

class StandInApp:
    """What the HTTP API calls on the App: adds that refuse the ids in ``refuse``, refuse as the App does those
    in ``running``, and the cameras added."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse, self.added, self.running = refuse, [], set()

    def add_camera(self, camera: dict, by: str) -> dict:
        from pipeline.admission import CommandRejected

        if camera.get("id") in self.refuse:
            raise CommandRejected(f"camera.url: {camera['id']!r}'s is outside the media roots", 403)
        if camera.get("id") in self.running:
            raise CommandRejected(f"camera.id: camera {camera['id']!r} already exists", 409)  # live_control's
        self.added.append(camera)
        return {"id": camera["id"]}


@pytest.fixture
def api_service():
    from pipeline.api import ApiServer, bind, build_api

    app = StandInApp({"door"})
    server = ApiServer(build_api(app, {})).start(bind("127.0.0.1", 0))
    yield server.url, app
    server.stop()


def _exported(tmp_path: Path) -> Path:
    """What `cameras export` writes for three cameras, one with a password (a variable in the export)."""
    from pipeline.camera_export import export_cameras, export_yaml
    from workers.settings import CameraConfig

    cameras = [CameraConfig(id="street", url="synthetic://street?seed=1", fps=5),
               CameraConfig(id="door", url="synthetic://street?seed=2"),
               CameraConfig(id="yard", url="rtsp://admin:hunter2@cam/live", heads=["people"])]
    path = tmp_path / "cameras.yaml"
    path.write_text(export_yaml(*export_cameras(cameras, {})))
    return path


def test_an_export_of_several_cameras_is_added_back_one_by_one_naming_the_one_refused(
        api_service, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cameras export > f.yaml; cameras add --yaml f.yaml` said "give the camera's --id" (the file was sent as one
    camera with a `cameras` field) and added none; with --id it sent that as a camera the service refused."""
    url, app = api_service
    path = _exported(tmp_path)
    monkeypatch.setenv("HV_YARD_SECRET", "admin:hunter2")
    assert main(["cameras", "add", "--api", url, "--yaml", str(path), "--heads", "people"]) == 2
    out, err = capsys.readouterr()
    assert [c["id"] for c in app.added] == ["street", "yard"]  # the refused one did not stop the next
    assert all(c["heads"] == ["people"] for c in app.added) and app.added[0]["fps"] == 5.0
    assert app.added[1]["url"] == "rtsp://admin:hunter2@cam/live"  # the export's variable, from this environment
    assert out == "added camera street (as api:anonymous)\nadded camera yard (as api:anonymous)\n"
    assert "camera door rejected: camera.url: 'door''s is outside the media roots" in err, err
    assert _error_lines(err) == ["error: 1 of 3 cameras not added: door"], err


def test_a_variable_of_the_file_is_read_from_the_senders_environment_or_named_when_unset(
        api_service, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export's ${HV_<CAMERA>_SECRET} was sent as it stood (the service interpolates nothing it receives): the
    camera was "added" with the text ${HV_YARD_SECRET} as its password and never got a picture."""
    url, app = api_service
    app.refuse = set()
    single = tmp_path / "one.yaml"
    # a whole config with one camera: only the camera is sent, so only its variables are read
    single.write_text("redis:\n  url: ${HV_UNSET_REDIS_URL}\n"
                      "cameras:\n  - id: gate\n    url: rtsp://viewer:${GATE_PW}@cam/2\n")
    monkeypatch.delenv("HV_UNSET_REDIS_URL", raising=False)
    monkeypatch.setenv("GATE_PW", "s3cret")
    assert main(["cameras", "add", "--api", url, "--yaml", str(single)]) == 0
    assert [c["url"] for c in app.added] == ["rtsp://viewer:s3cret@cam/2"]
    assert "s3cret" not in "".join(capsys.readouterr())
    path = _exported(tmp_path)
    monkeypatch.delenv("HV_YARD_SECRET", raising=False)
    assert main(["cameras", "add", "--api", url, "--yaml", str(path)]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        f"error: --yaml: {path}: cameras[2].url: environment variable ${{HV_YARD_SECRET}} is not set "
        "(use ${HV_YARD_SECRET:-default} for a default)"]
    assert len(app.added) == 1  # none of the file's sent, rather than one with a password that cannot be right


def test_all_cameras_of_a_file_added_exit_0(api_service, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, app = api_service
    app.refuse = set()
    monkeypatch.setenv("HV_YARD_SECRET", "admin:hunter2")
    assert main(["cameras", "add", "--api", url, "--yaml", str(_exported(tmp_path))]) == 0
    assert [c["id"] for c in app.added] == ["street", "door", "yard"]
    assert capsys.readouterr().out.count("added camera ") == 3


@pytest.mark.parametrize("argv, message", [
    (["add", "--id", "x"], "--id and --url name one camera"),
    (["add", "--url", "synthetic://street"], "--id and --url name one camera"),
    (["update", "street"], "give one to update"),
])
def test_flags_that_name_one_camera_are_refused_with_a_file_of_several(
        argv: list[str], message: str, api_service, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, app = api_service
    monkeypatch.setenv("HV_YARD_SECRET", "admin:hunter2")
    path = _exported(tmp_path)
    assert main(["cameras", *argv, "--api", url, "--yaml", str(path)]) == 2
    assert _error_lines(capsys.readouterr().err) == [f"error: --yaml: {path} lists 3 cameras: {message}"]
    assert app.added == []


# -- the status table ------------------------------------------------------------------------------------------

def test_a_stale_entry_shows_no_rates_of_the_service_that_stopped() -> None:
    """A camera whose service died last week showed "stale" beside 10.0 fps and 40 ms, read as what it does now
    (the dashboard shows a stale camera no rate); its counts stay: they are what it did."""
    stale = {"camera": "gone", "state": "stale", "reported_state": "running", "fps": 10.0, "decode_fps": 10.0,
             "latency_ms_p50": 40.0, "latency_ms_p95": 90.0, "published": 500, "reconnects": 1}
    live = {**stale, "camera": "here", "state": "running"}
    rows = _table([stale, live])
    assert dict(zip(COLUMNS, rows["gone"])) == {
        "camera": "gone", "state": "stale", "fps": "-", "decode fps": "-", "latency": "-/-", "published": "500",
        "dropped": "-", "skipped": "-", "reconnects": "1"}
    assert rows["here"][2:5] == ["10.0", "10.0", "40/90"]


def test_numbers_that_are_no_numbers_show_as_a_dash(redis_server, capsys: pytest.CaptureFixture) -> None:
    """JSON's 1e999 reads as inf: the table showed "inf" fps and "inf (error inf)" drops; nulls showed "None"."""
    now = time.time()
    redis_server.client().hset("hv:cameras", mapping={
        "odd": '{"state": "running", "heartbeat_ts": %f, "fps": 1e999, "decode_fps": -1e999, "latency_ms_p50": 1e999,'
               ' "published": null, "reconnects": null, "dropped": {"error": 1e999, "overload": 2}}' % now,
        "good": json.dumps({"state": "running", "heartbeat_ts": now, "fps": 5.0, "published": 3, "reconnects": 0})})
    assert main(["status", "--redis-url", redis_server.url]) == 0
    table = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in table.splitlines() if line.startswith("│")}
    assert dict(zip(COLUMNS, rows["odd"])) == {
        "camera": "odd", "state": "running", "fps": "-", "decode fps": "-", "latency": "-/-", "published": "-",
        "dropped": "2 (overload 2)", "skipped": "-", "reconnects": "-"}, table
    assert rows["good"][2] == "5.0" and rows["good"][5] == "3"
    assert _table([{"camera": "n", "state": "running", "fps": float("nan")}])["n"][2] == "-"  # a run's own stats


def test_a_terminal_escape_in_an_entry_does_not_reach_the_terminal(redis_server, capsys: pytest.CaptureFixture) -> None:
    """Anyone who may write {prefix}:cameras could retitle, clear or recolour the reader's terminal through the
    camera's name or its error, and the columns went askew (the escape counted as width)."""
    hostile = "cam\x1b]0;owned\x07\x1b[2J"
    redis_server.client().hset("hv:cameras", hostile, json.dumps(
        {"state": "failed", "last_error": "bad\x1b[31m stream", "heads": ["people"]}))
    assert main(["status", "--redis-url", redis_server.url]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and "\x07" not in table, repr(table)
    assert "cam?]0;owned??[2J" in table and "bad?[31m stream" in table, table
    widths = {len(line) for line in table.splitlines() if line.startswith(("┏", "│", "└"))}
    assert len(widths) == 1, table  # every row as wide as the frame


def test_an_export_put_back_beside_its_running_cameras_leaves_those_and_exits_0(
        api_service, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export, remove one camera, add the export back: the removed one came back, and the command said "3 of 4
    cameras not added" and exited 2 for the ones still running, which is what the operator wanted."""
    url, app = api_service
    app.refuse, app.running = set(), {"street", "door"}
    monkeypatch.setenv("HV_YARD_SECRET", "admin:hunter2")
    assert main(["cameras", "add", "--api", url, "--yaml", str(_exported(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert [c["id"] for c in app.added] == ["yard"] and not _error_lines(err), err
    assert out.splitlines() == ["camera street already runs: left as it is (`cameras update` changes it)",
                                "camera door already runs: left as it is (`cameras update` changes it)",
                                "added camera yard (as api:anonymous)"]


@pytest.mark.timeout(60)
def test_a_command_no_service_answers_says_what_it_waits_for(redis_server, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`cameras list --redis-url` with no service on that Redis: 90 s of silence, then the error. After a few
    seconds it now says what it waits for, and that nothing ever read the control stream there."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    from pipeline import camera_commands

    monkeypatch.setattr(camera_commands, "QUIET_S", 0.5)
    assert main(["cameras", "list", "--redis-url", redis_server.url, "--timeout", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "waiting up to 1 s more for a hydravision service to answer on hv:control (no service has read" in err
    assert "no answer on hv:control:results within 1.5 s" in err


def test_a_camera_of_a_file_whose_add_got_no_answer_does_not_stop_the_others(capsys, monkeypatch) -> None:
    """One add of several timing out ended the whole --yaml add: the cameras after it were never tried, and
    nothing named them."""
    from pipeline import camera_commands
    from pipeline.errors import UserError

    sent: list[str] = []

    class Channel:
        def send(self, op, camera_id, body):
            sent.append(body["id"])
            if body["id"] == "b":
                raise UserError("no answer from the HTTP API at http://h within 1 s: the command may still apply")
            return {"status": "accepted", "camera": body["id"], "by": "api:ops"}

    with pytest.raises(UserError, match=r"^1 of 3 cameras not added: b$"):
        camera_commands._add_each(Channel(), [{"id": "a"}, {"id": "b"}, {"id": "c"}])
    assert sent == ["a", "b", "c"]
    assert "camera b rejected: no answer from the HTTP API" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_command_a_service_took_and_still_applies_says_so(redis_server, capsys, monkeypatch) -> None:
    """An add takes longer than the few seconds before the note: it said "waiting for a hydravision service to
    answer", as if none ran, while one was applying the command."""
    import threading

    from pipeline import camera_commands
    from pipeline.control import ControlConsumer

    class SlowList:
        def list_cameras(self):
            time.sleep(1.5)
            return []

        def note_rejected(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(camera_commands, "QUIET_S", 0.5)
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    consumer = ControlConsumer(SlowList(), redis_server.url, "hv").start()
    try:
        assert main(["cameras", "list", "--redis-url", redis_server.url, "--timeout", "20"]) == 0
    finally:
        consumer.stop()
    assert "a hydravision service took the command and is applying it" in capsys.readouterr().err
