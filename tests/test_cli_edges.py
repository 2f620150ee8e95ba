"""The operator's commands at their edges: arguments that cannot work, services that answer oddly, output a pipe
reads. Each was a traceback ("This is a bug in hydravision", exit 1), a run that never stopped, or a line that
broke `| jq`; now it is one `error:` line naming what to fix (exit 2) or the output the reader expects."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from pipeline.cli import main
from workers.publish import keys
from servers import hold_lease

REPO = Path(__file__).resolve().parent.parent
K = keys("hv")


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _refused_by_parser(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    return err


# -- arguments that cannot work --------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--duration", "0"), ("--duration", "-5"), ("--duration", "nan"),
                                           ("--log-every", "nan"), ("--log-every", "-1")])
def test_run_refuses_a_duration_or_period_that_cannot_work(option: str, value: str, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--duration 0 or nan ran for ever (App.run took them for "no limit"), a negative one started every camera
    to stop them at once, --log-every nan never logged a status line."""
    started = []
    monkeypatch.setattr("pipeline.run_commands.run", lambda args: started.append(args) or 0)
    err = _refused_by_parser(["run", "configs/demo.yaml", option, value], capsys)
    assert f"argument {option}: expected a number of seconds above 0, got '{value}'" in err, err
    assert not started


class StandInApp:
    """What `run` calls on the App, with no Ray, model or camera; ``started`` says whether start() was called."""

    started = False

    def __init__(self, config, redis_url=None, say=print, on_ray_started=None) -> None:
        self.cameras: dict = {}

    def install_signal_handlers(self) -> None:
        pass

    def start(self) -> None:
        StandInApp.started = True

    def run(self, duration=None, on_tick=None) -> list[dict]:
        return []

    def shutdown(self, drain: bool = True) -> list[dict]:
        return [{"camera": "street-1", "state": "stopped", "published": 3}]


@pytest.mark.parametrize("where", ["missing-directory", "a-directory"])
def test_run_says_which_summary_json_it_cannot_write(where: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--summary-json into a missing directory (or onto a directory) was FileNotFoundError / IsADirectoryError
    once the whole run had ended: "a bug", exit 1. A missing directory is now refused before anything starts."""
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    monkeypatch.setattr(StandInApp, "started", False)
    path = tmp_path / "nope" / "s.json" if where == "missing-directory" else tmp_path
    code = main(["run", str(REPO / "configs/demo.yaml"), "--plain", "--summary-json", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    if where == "missing-directory":
        assert _error_lines(err) == [f"error: --summary-json {path}: no such directory {path.parent}"], err
        assert not StandInApp.started
    else:
        assert _error_lines(err) == [f"error: --summary-json {path}: cannot write: Is a directory"], err


def test_run_writes_its_summary_json(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Normal-path guard (passes on the original too): a writable --summary-json gets the final stats."""
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    path = tmp_path / "s.json"
    assert main(["run", str(REPO / "configs/demo.yaml"), "--plain", "--summary-json", str(path)]) == 0
    assert json.loads(path.read_text())[0]["camera"] == "street-1"


@pytest.mark.parametrize("value", ["nan", "-1", "0"])
def test_cameras_refuse_a_timeout_that_cannot_work(value: str, capsys: pytest.CaptureFixture) -> None:
    """nan and -1 were urllib's ValueError, "a bug"; 0 was "cannot reach ...: Operation now in progress"."""
    err = _refused_by_parser(["cameras", "list", "--api", "http://127.0.0.1:9", "--timeout", value], capsys)
    assert f"argument --timeout: expected a number of seconds above 0, got '{value}'" in err, err


def test_dashboard_refuses_a_port_out_of_range(capsys: pytest.CaptureFixture) -> None:
    """Was bind()'s OverflowError after the hub had started: "a bug", exit 1."""
    err = _refused_by_parser(["dashboard", "--port", "70000", "--redis-url", "redis://127.0.0.1:1/0"], capsys)
    assert "argument --port: expected a port 0-65535 (0: a free one), got '70000'" in err, err


@pytest.mark.parametrize("api, message", [
    ("http://[::1", "error: --api http://[::1: not a usable URL (Invalid IPv6 URL)"),
    ("http://127.0.0.1:port8470", "error: --api http://127.0.0.1:port8470: not a usable URL (nonnumeric port: "
                                  "'port8470')"),
    ("http://admin:s3c:ret@127.0.0.1", "error: --api http://***@127.0.0.1: not a usable URL"),
])
def test_cameras_say_which_api_url_is_unusable_in_one_line(api: str, message: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    """urllib's ValueError and http.client's InvalidURL were "a bug"; the last one's text quoted "ret", a piece
    of the password."""
    assert main(["cameras", "list", "--api", api]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [message], err
    assert "Traceback" not in err and "s3c" not in err and "ret@" not in err


# -- an HTTP API that answers oddly ----------------------------------------------------------------------------

@pytest.fixture
def http_stand_in():
    """A server on a free port answering every request with the body set in ``answer[0]`` (status 200)."""
    answer = [b"{}"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer[0])))
            self.end_headers()
            self.wfile.write(answer[0])

        do_GET = do_POST = do_PATCH = do_DELETE = _reply

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answer
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("body", [b"<html><body>Dashboard</body></html>", b"[]", b'"accepted"'])
def test_cameras_say_when_the_api_url_is_not_hydravisions_api(body: bytes, http_stand_in,
                                                              capsys: pytest.CaptureFixture) -> None:
    """--api at the dashboard's port (or any server answering 200 with something else): json.loads' ValueError or
    list.get's AttributeError, "a bug"."""
    url, answer = http_stand_in
    answer[0] = body
    assert main(["cameras", "list", "--api", url]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"error: {url}/cameras answered something that is not hydravision's API "
                                 f"(not a JSON object: {body!r})"], err
    assert "bug" not in err


def test_cameras_export_says_which_out_file_it_cannot_write(http_stand_in, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Was FileNotFoundError after the service had answered: "a bug", exit 1."""
    url, answer = http_stand_in
    answer[0] = json.dumps({"status": "accepted", "result": {"yaml": "cameras: []\n", "variables": []}}).encode()
    out = tmp_path / "missing" / "cameras.yaml"
    assert main(["cameras", "export", "--api", url, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"error: --out {out}: cannot write: No such file or directory"], err
    # normal-path guard: a writable path gets the YAML
    assert main(["cameras", "export", "--api", url, "-o", str(tmp_path / "cameras.yaml")]) == 0
    assert (tmp_path / "cameras.yaml").read_text() == "cameras: []\n"


# -- the Redis control stream ----------------------------------------------------------------------------------

def test_cameras_over_redis_say_what_redis_refused_in_one_line(redis_server, capsys: pytest.CaptureFixture) -> None:
    """An ACL user that may not XADD, or a results key of another type: redis-py's ResponseError was "a bug"."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    client = redis_server.client()
    client.execute_command("ACL", "SETUSER", "reader", "on", ">readerpw", "~*", "+@read", "+ping", "+acl|whoami")
    reader_url = redis_server.url.replace("redis://", "redis://reader:readerpw@")
    assert main(["cameras", "remove", "lobby", "--redis-url", reader_url, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [
        f"error: Redis at {redis_server.url.replace('redis://', 'redis://***@')} refused the command: "
        "NoPermissionError: this user has no permissions to run the 'xadd' command"], err
    assert "readerpw" not in err and "bug" not in err

    client.set("hv:control:results", "not a stream")
    assert main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err)[0].startswith(f"error: Redis at {redis_server.url} refused the command: ResponseError: "
                                           "WRONGTYPE"), err


def test_cameras_over_redis_read_past_entries_that_are_not_answers(redis_server, capsys: pytest.CaptureFixture) -> None:
    """Another writer's entry on the results stream (not JSON, no data field, a JSON list) ended the command with
    JSONDecodeError, "a bug", though the service's answer came right after it."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    client = redis_server.client()

    def service() -> None:  # a stand-in for the controller: junk first, then the answer
        reply = client.xread({"hv:control": "0-0"}, block=5000, count=1)
        command = json.loads(reply[0][1][0][1][b"data"])
        for fields in ({"data": "not json"}, {"other": "x"}, {"data": "[1, 2]"}):
            client.xadd("hv:control:results", fields)
        answer = {"request_id": command["request_id"], "status": "accepted", "camera": "lobby", "by": "redis:default",
                  "result": {"id": "lobby"}}
        client.xadd("hv:control:results", {"data": json.dumps(answer)})

    thread = threading.Thread(target=service)
    thread.start()
    code = main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "5"])
    thread.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "removed camera lobby (as redis:default)\n"


# -- tail --json: stdout is JSON lines only --------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("group", [False, True])
def test_tail_json_prints_only_json_on_stdout(group: bool, redis_server, capsys: pytest.CaptureFixture) -> None:
    """A message holding NaN (json.loads takes it in) was printed back as NaN, and an entry it could not read as
    "entry ...: unreadable" on stdout: either stops `| jq` at that line. Both now go to stderr."""
    def strict(line: str):
        return json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))

    client = redis_server.client()
    good = {"v": 1, "type": "stream_up", "camera": "c1", "ts": 1.5}
    client.xadd(K.events, {"data": '{"v": 1, "type": "stream_up", "camera": "c1", "ts": NaN}'})
    client.xadd(K.events, {"data": json.dumps(good)})
    argv = ["tail", "--events", "--from-start", "--count", "2", "--json", "--redis-url", redis_server.url]
    if not group:  # (the group's consumer buries an entry that is not JSON at all before tail sees it)
        client.xadd(K.events, {"data": "not json"})
        argv[4] = "3"
    assert main(argv + (["--group", "g"] if group else [])) == 0
    out, err = capsys.readouterr()
    assert [strict(line) for line in out.splitlines()] == [good], out
    assert "unreadable (ValueError: Out of range float values are not JSON compliant" in err, err
