"""Live camera control and the `run` / `demo` / `status` commands at their edges, as an operator meets them:
a stdout whose reader went away, a service with no camera yet, the answer to a removal whose camera's process had
died. The App is a stand-in (no Ray, no model): as in tests/test_cli_edges.py and test_metrics_live_control_edges.py."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import ray

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent


class StandInApp:
    """What `run` calls on the App; ``during_run`` is called inside run() with the App's ``say``."""

    during_run = staticmethod(lambda say: None)
    ticks: list = [[{"camera": "street-1", "state": "running", "published": 3}]]
    shut_down: list = []

    def __init__(self, config, redis_url=None, say=print, on_ray_started=None) -> None:
        self.cameras: dict = {}
        self.say = say

    def install_signal_handlers(self) -> None:
        pass

    def start(self) -> None:
        pass

    def run(self, duration=None, on_tick=None) -> list[dict]:
        for stats in self.ticks:
            on_tick(stats)
        self.during_run(self.say)
        return []

    def shutdown(self, drain: bool = True) -> list[dict]:
        self.shut_down.append(drain)
        return [{"camera": "street-1", "state": "stopped", "published": 3}]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInApp]:
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    monkeypatch.setattr(StandInApp, "shut_down", [])
    return StandInApp


@pytest.fixture
def piped_stdout(monkeypatch: pytest.MonkeyPatch):
    """Makes stdout a pipe (`| tee log`), from inside the test (pytest puts its own capture back before the
    test's call); returns a function that closes the pipe's reading end, as a reader that exits does."""
    ends: list = []

    def pipe():
        read_end, write_end = os.pipe()
        ends.extend([read_end, open(write_end, "w")])
        monkeypatch.setattr(sys, "stdout", ends[1])
        return lambda: os.close(ends.pop(0))

    yield pipe
    monkeypatch.undo()
    for end in ends:
        try:
            end.close() if hasattr(end, "close") else os.close(end)
        except OSError:  # what was left in its buffer cannot go anywhere
            pass


def _main(argv: list[str]) -> int | str:
    try:
        return main(argv)
    except SystemExit as e:  # what rich raised out of a print, before the fix
        return f"SystemExit({e.code})"


@pytest.mark.parametrize("when", ["signal-message", "stopping-message"])
def test_run_whose_stdout_reader_went_away_still_drains_and_writes_its_summary(
        when: str, stand_in, piped_stdout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hydravision run cfg | tee log`, then Ctrl-C: the terminal's SIGINT ends tee too. rich raised SystemExit(1)
    out of the next print: the signal handler's "SIGINT: draining ..." (the drain ran, but the final stats and
    --summary-json were skipped, exit 1 without a word), or run's own "Stopping: ..." (the shutdown itself was
    skipped: no drain, no final statuses, cameras left 'running' in Redis to read as stale)."""
    reader_gone = piped_stdout()

    def during_run(say) -> None:
        reader_gone()
        if when == "signal-message":  # what App's signal handler says, inside app.run
            say("SIGINT: draining in-flight frames and flushing Redis (send it again to exit at once)")
    monkeypatch.setattr(StandInApp, "during_run", staticmethod(during_run))
    summary = tmp_path / "s.json"
    code = _main(["run", str(REPO / "configs/demo.yaml"), "--plain", "--summary-json", str(summary)])
    assert (code, StandInApp.shut_down) == (0, [True])
    assert json.loads(summary.read_text())[0]["state"] == "stopped"


def test_status_into_a_pipe_already_closed_exits_0_as_tail_does(redis_server, piped_stdout) -> None:
    """`hydravision status | head -1` whose reader is gone before the table is written: rich's SystemExit(1)
    (status --json and tail end 0 there: the reader has what it wanted)."""
    redis_server.client().hset("hv:cameras", "lobby", json.dumps({"state": "stopped", "published": 1}))
    piped_stdout()()
    assert _main(["status", "--redis-url", redis_server.url]) == 0


@pytest.fixture
def logging_restored():
    """main() with --log-format json replaces the root logger's handlers and Ray's: put back for the tests after."""
    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    handlers, level, ray_handlers = root.handlers[:], root.level, ray_logger.handlers[:]
    propagate = ray_logger.propagate
    yield
    root.handlers[:], ray_logger.handlers[:] = handlers, ray_handlers
    root.setLevel(level)
    ray_logger.propagate = propagate


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_service_with_no_camera_yet_logs_a_status_line_that_says_so(
        log_format: str, stand_in, logging_restored, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """`cameras: []` with the API on (cameras come at run time): every --log-every seconds the status line was
    an empty line in the log (text) or a record with "msg": "" (json)."""
    monkeypatch.setattr(StandInApp, "ticks", [[]])
    assert main(["run", str(REPO / "configs/demo.yaml"), "--plain", "--log-format", log_format]) == 0
    out = capsys.readouterr().out
    if log_format == "text":
        assert "" not in out.splitlines() and "no cameras" in out.splitlines(), out
    else:  # (the json handler writes to the stdout of when the CLI set logging up: pytest's capture)
        statuses = [json.loads(line) for line in out.splitlines() if '"event": "status"' in line]
        assert [(s["msg"], s["cameras"]) for s in statuses] == [("no cameras", [])], out


def test_a_camera_removed_before_its_crashed_process_started_it_again_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray re-created the camera's process and the control loop had not started the camera again (up to a tick):
    its stop answers {}, and the removal's answer was a final of nulls ("state": null), where the shutdown's
    final table says "unavailable" and why. Why is in the answer now, also for a process that did not answer."""
    from test_metrics_live_control_edges import running, service

    app = service(monkeypatch)
    running(app, "cam", lambda camera_id, drain=True: {})
    final = app.remove_camera("cam", by="api:ops")["final"]
    assert final["state"] == "unavailable" and not app.cameras and not app._busy
    assert final["last_error"] == "its process was restarted and the camera not started again"


def test_a_camera_removed_after_its_process_died_says_why_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its process did not answer the stop: the answer said "unavailable" and no more (the reason went to the log
    only). It says why now, with the camera's password hidden in every form its URL may be printed in."""
    from test_metrics_live_control_edges import running, service

    def stop(camera_id, drain=True):  # its text quoting the password %-decoded, outside any URL
        raise ray.exceptions.RayActorError(error_msg="The actor died: no stream at cam/x (admin, password pa/ss@x)")

    app = service(monkeypatch)
    handle = running(app, "cam", stop)
    handle.config = handle.config.model_copy(update={"url": "rtsp://admin:pa%2Fss%40x@cam/x"})
    final = app.remove_camera("cam", by="api:ops")["final"]
    assert final["state"] == "unavailable" and "The actor died: no stream at cam/x" in final["last_error"], final
    assert "pa/ss" not in final["last_error"] and "ss@x" not in final["last_error"], final


def test_cameras_list_into_a_pipe_already_closed_ends_quietly(piped_stdout) -> None:
    """`hydravision cameras list | head -1`: the same rich SystemExit(1) as status, from its own Console."""
    from pipeline.camera_commands import _print_list

    piped_stdout()()
    _print_list([{"id": f"cam-{i}", "state": "running", "url": "synthetic://street", "fps": 10, "heads": ["people"]}
                 for i in range(200)])  # more than a pipe's buffer: the write meets the closed end
