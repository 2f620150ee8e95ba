"""A newcomer operator's walk-through of `hydravision run / status / tail` (pipeline/status.py,
pipeline/run_commands.py, pipeline/logs.py): a failed camera's reason only in the final table, the frames a
camera's fps skips by design read as drops, `tail` of a camera that does not exist waiting in silence, Ray's
colour codes in log files, and `status` paying the service's imports to read Redis."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.cli import main
from pipeline.status import status_line, status_table
from running import wait_for
from test_live_cli_edges6 import StandInApp as RunStandInApp
from workers.publish import keys

REPO = Path(__file__).resolve().parent.parent
K = keys("hv")


class StandInApp(RunStandInApp):
    """test_live_cli_edges6's stand-in App for `run`, with no ticks of its own and one camera failed at shutdown."""

    ticks: list = []

    def shutdown(self, drain: bool = True) -> list[dict]:
        return [{"camera": "bikes-a", "state": "failed", "last_error": "nope.mp4: no such file"}]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInApp]:
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    monkeypatch.setattr(StandInApp, "ticks", [])
    monkeypatch.setattr(StandInApp, "during_run", staticmethod(lambda say: None))
    return StandInApp


def camera(cid: str, state: str = "running", **extra) -> dict:
    return {"camera": cid, "state": state, "fps": 10.0, "latency_ms_p50": 30.0, "published": 5,
            "dropped": {"rate": 0, "budget": 0, "overload": 0, "error": 0, "shutdown": 0}, **extra}


# -- 1. a failed camera's reason, live -------------------------------------------------------------------------

def test_the_status_line_says_why_a_camera_failed_or_reconnects_redacted_and_short() -> None:
    """`bikes-a: failed 0.0 fps p50 - ms pub 0 drop 0` and no more: the reason came in the final table only."""
    failed = camera("bikes-a", "failed", last_error="/data/nope.mp4: no such file")
    secret = camera("door", "reconnecting", last_error="rtsp://admin:hunter2@10.0.0.7/live: Connection refused "
                    + "x" * 300)
    running = camera("street-1", last_error="an old error, the camera runs again")
    line = status_line([failed, secret, running])
    parts = line.split(" | ")
    assert parts[0].endswith("drop 0 error: /data/nope.mp4: no such file"), line
    assert "error: rtsp://***@10.0.0.7/live: Connection refused" in parts[1] and "hunter2" not in line, line
    assert len(parts[1]) < 220, parts[1]  # shortened: a status line is one line of a log
    assert "error" not in parts[2], line


def test_run_logs_one_warning_when_a_camera_turns_failed_and_the_line_says_why(
        stand_in, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    """`run --plain` with a camera whose file does not exist said nothing on stderr, not even a WARNING."""
    failed = camera("bikes-a", "failed", last_error="rtsp://u:pw@cam/nope: no such file", fps=0.0)
    # the first tick is printed (--log-every); the camera started again by a live update, then failed again
    monkeypatch.setattr(StandInApp, "ticks", [[failed], [failed], [camera("bikes-a")], [failed], [failed]])
    caplog.set_level(logging.WARNING)
    assert main(["run", str(REPO / "configs/demo.yaml"), "--plain"]) == 1  # every camera failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bikes-a" in r.getMessage()]
    assert warnings == ["camera bikes-a failed: rtsp://***@cam/nope: no such file"] * 2, caplog.text
    out = capsys.readouterr().out
    # a failed camera's line has no rate of its last seconds (status.status_line)
    assert "bikes-a: failed - fps p50 - ms pub 5 drop 0 error: rtsp://***@cam/nope: no such file" in out, out


# -- 2. frames skipped by design are no drops ------------------------------------------------------------------

def test_frames_the_cameras_fps_skips_are_shown_apart_from_drops() -> None:
    """A 25 fps file at `fps: 10` showed `drop 1355 (rate 1355)`, 60% drops, in the line and in `status`; /metrics
    calls them "not analysed"."""
    s = camera("bikes-a", published=903, dropped={"rate": 1355, "budget": 0, "overload": 2, "error": 0, "shutdown": 0})
    line = status_line([s])
    assert "pub 903 drop 2 (overload 2) skip 1355" in line and "rate" not in line, line
    assert "drop 0 |" in status_line([camera("a", dropped={"rate": 7}), camera("b")]) + " |"
    console = Console(record=True, width=250)
    console.print(status_table([s]))
    header, row = [r for r in console.export_text().splitlines() if r.count("│") > 5 or r.count("┃") > 5][:2]
    cells = dict(zip([c.strip() for c in header.split("┃")[1:-1]], [c.strip() for c in row.split("│")[1:-1]]))
    assert (cells["dropped"], cells["skipped (fps)"]) == ("2 (overload 2)", "1355"), cells


# -- 3. tail of a camera that does not exist -------------------------------------------------------------------

def _status(state: str = "running") -> str:
    return json.dumps({"state": state, "heartbeat_ts": time.time()})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cameras, said", [
    ({"street-1": _status(), "bikes-a": _status("failed")}, "cameras there: bikes-a, street-1"),
    ({}, "no camera there yet"),
])
def test_tail_of_a_camera_not_in_redis_names_those_that_are_and_waits_on(
        cameras, said, redis_server, capsys: pytest.CaptureFixture) -> None:
    """`tail typo-cam` waited silently for ever. It says so now, and still prints the camera's first message
    when it comes (a camera may be added later)."""
    client = redis_server.client()
    if cameras:
        client.hset(K.cameras, mapping=cameras)
    codes: list = []
    reader = threading.Thread(target=lambda: codes.append(
        main(["tail", "typo-cam", "--count", "1", "--redis-url", redis_server.url])), daemon=True)
    reader.start()
    err: list[str] = []
    wait_for(lambda: err.append(capsys.readouterr().err) or "tailing" in "".join(err), 30, "tail to start")
    client.xadd(K.detections("typo-cam"), {"data": json.dumps({"not": "ours"})})  # the camera came after all
    reader.join(30)
    assert codes == [0]
    err.append(capsys.readouterr().err)
    note = "".join(err)
    assert f"note: no camera 'typo-cam' in {K.cameras} at {redis_server.url} ({said}); waiting" in note, note


@pytest.mark.timeout(60)
def test_tail_of_a_known_camera_or_one_with_messages_says_nothing_of_it(redis_server, capsys) -> None:
    """The note is for a camera Redis has never heard of: one with a status, or messages, is tailed as before."""
    client = redis_server.client()
    client.hset(K.cameras, "street-1", _status())
    for cam in ("street-1", "old-cam"):  # old-cam: messages and no status entry (written by hand, or another tool)
        client.xadd(K.detections(cam), {"data": json.dumps({"not": "ours"})})
        assert main(["tail", cam, "--from-start", "--count", "1", "--redis-url", redis_server.url]) == 0
        assert "note:" not in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_tail_group_of_a_camera_not_in_redis_says_so_too(redis_server, capsys) -> None:
    """tail --group of a typo waited in silence too."""
    reader = threading.Thread(target=lambda: main(["tail", "typo-cam", "--group", "g", "--count", "1",
                                                   "--redis-url", redis_server.url]), daemon=True)
    reader.start()
    err: list[str] = []
    wait_for(lambda: err.append(capsys.readouterr().err) or "tailing" in "".join(err), 30, "tail to start")
    redis_server.client().xadd(K.detections("typo-cam"), {"data": json.dumps({"not": "ours"})})
    reader.join(30)
    err.append(capsys.readouterr().err)
    assert "note: no camera 'typo-cam' in hv:cameras" in "".join(err) and not reader.is_alive(), err


# -- 4. Ray's colour codes in files ----------------------------------------------------------------------------

def test_ray_worker_lines_have_no_colour_codes_when_the_output_is_no_terminal(
        stand_in, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --plain > log` wrote `\\x1b[36m(StreamActor pid=...)\\x1b[0m` into the file; here stdout and stderr are
    pytest's captures, no terminal. Ray's own printer of worker lines, as the driver runs it during a run."""
    from ray._private.worker import print_worker_logs

    monkeypatch.setenv("RAY_COLOR_PREFIX", "")  # recorded, so that what run() sets is undone after the test
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    printed = io.StringIO()
    batch = {"pid": 4242, "actor_name": "StreamActor", "ip": "10.0.0.1", "localhost": "10.0.0.1",
             "lines": ["camera bikes-a: opened"], "is_err": True}
    monkeypatch.setattr(StandInApp, "during_run", staticmethod(lambda say: print_worker_logs(batch, printed)))
    assert main(["run", str(REPO / "configs/demo.yaml"), "--plain"]) == 1
    assert printed.getvalue() == "(StreamActor pid=4242) camera bikes-a: opened\n", repr(printed.getvalue())


def test_a_colour_setting_of_the_users_own_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAY_COLOR_PREFIX=1, set by the user, stays."""
    from pipeline.logs import plain_ray_prefix

    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    plain_ray_prefix()
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


# -- 5. status and tail start without the service's imports ----------------------------------------------------

def test_status_reads_redis_without_importing_the_service() -> None:
    """`status` and `tail` imported pipeline.app (supervision, scipy, the camera actors: ~1.7 s) to read Redis."""
    probe = ("import sys; from pipeline.cli import main; "
             "code = main(['status', '--redis-url', 'redis://127.0.0.1:1/0']); "
             "print(code, sorted(m for m in ('pipeline.app', 'supervision', 'scipy', 'workers.stream') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "2 []", (done.stdout, done.stderr)


def test_the_run_still_makes_the_real_app() -> None:
    """Guard (passes before and after): run_commands.App, imported when a run starts, is pipeline.app's App."""
    from pipeline import run_commands
    from pipeline.app import App
    from pipeline.config import load_config

    app = run_commands.App(load_config(REPO / "configs/demo.yaml"), redis_url=None, say=lambda m: None)
    assert isinstance(app, App)


def test_the_not_in_redis_text_is_redacted_before_it_is_cut() -> None:
    """The Publisher redacts its own error, but the line cut whatever it was given at 80 characters unredacted:
    a URL cut there is no longer found by the redaction further on."""
    from pipeline.status import status_line

    error = "ConnectionError: " + "x" * 40 + " redis://ops:s3cretpass@redis.example:6379/0 refused"
    line = status_line([{"camera": "a", "state": "running", "redis_error": error}])
    assert "s3cret" not in line and "NOT IN REDIS:" in line
