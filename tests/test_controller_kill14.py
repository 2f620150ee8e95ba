"""Killing and stopping the controller (an operator's run, issue 14).

1. A camera no run starts again (added at run time, the controller SIGKILLed and started again) kept the tracks the
   killed run had open in its status (`tracks_open`); `cameras remove` took that status out, their list with it,
   and those tracks never got their `track_ended` (18 in the run).
2. SIGHUP (the terminal closed, an ssh session dropped) ended the controller as a crash does: exit 129, no drain,
   no final table, no summary, statuses left running until stale. It now stops the run as SIGTERM does, also
   where the terminal it wrote to is gone (every write to it fails).
3. A second signal exits at once, as documented, but the log ended at "Stopping: draining ..." without a word: it
   now says that the drain is abandoned and what that loses.

The signal tests run `hydravision run`'s code (pipeline/cli.py, pipeline/run_commands.py) with the real App's
signal handlers in a child process (a second signal ends it with os._exit), its camera work stood in for: the
stand-in sends itself the signals where the run and its drain are, so nothing depends on timing."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_leftover_status12 import app  # noqa: F401 (a fixture: an App whose events go to redis_server)
from workers.publish import validate

ROOT = Path(__file__).resolve().parent.parent


# -- 1. a leftover status's open tracks ---------------------------------------------------------------------------
def test_removing_a_killed_runs_leftover_status_ends_the_tracks_it_had_open(app, redis_server):
    client = redis_server.client()
    status = {"state": "running", "heartbeat_ts": time.time() - 600, "track_ids_next": {"people": 12, "vehicles": 4},
              "tracks_open": {"people": [[7, "person", 10, 40, 25, 3.0], [11, "person", 38, 41, 4, 0.3]],
                              "vehicles": [[3, "car", 2, 39, 30, 3.7]]}}
    client.hset("hv:cameras", "syn-2", json.dumps(status))
    answer = app.remove_camera("syn-2", by="redis:default")
    assert answer["final"]["leftover"] is True and answer["final"]["state"] == "running", answer
    assert app.events.flush(10.0)
    assert client.hget("hv:cameras", "syn-2") is None
    events = [json.loads(fields[b"data"]) for _, fields in client.xrange("hv:events")]
    for event in events:
        validate(event, "event")
    ended = [e for e in events if e["type"] == "track_ended"]
    assert {(e["head"], e["track_id"]) for e in ended} == {("people", 7), ("people", 11), ("vehicles", 3)}, events
    assert all(e["camera"] == "syn-2" and e["reason"] == "restart" for e in ended), ended
    car = next(e for e in ended if e["head"] == "vehicles")
    assert (car["class"], car["first_frame"], car["last_frame"], car["frames"], car["duration_s"]) == \
        ("car", 2, 39, 30, 3.7)
    assert events[-1]["type"] == "camera_removed", events  # its tracks end before it goes
    assert json.loads(client.hget("hv:track_ids", "syn-2")) == {"people": 12, "vehicles": 4}


def test_a_leftover_status_that_cannot_be_removed_ends_no_track(app, redis_server):
    """Refused (503, send it again): the status keeps its open tracks, the remove sent again ends them once."""
    client = redis_server.client()
    client.hset("hv:cameras", "syn-3", json.dumps({"state": "running", "heartbeat_ts": time.time() - 600,
                                                  "tracks_open": {"people": [[5, "person", 0, 9, 10, 1.0]]}}))
    retire = app._retire_in_redis
    app._retire_in_redis = lambda *a, **kw: False  # Redis refused right then
    with pytest.raises(Exception, match="send it again"):
        app.remove_camera("syn-3", by="api")
    app._retire_in_redis = retire
    app.remove_camera("syn-3", by="api")
    assert app.events.flush(10.0)
    types = [json.loads(fields[b"data"])["type"] for _, fields in client.xrange("hv:events")]
    assert types == ["track_ended", "camera_removed"], types


# -- 2 and 3. signals -----------------------------------------------------------------------------------------------
# `hydravision run CONFIG --plain` through pipeline.cli.main, the App's cameras stood in for. The stand-in's run()
# sends itself FIRST (then waits, as App.run does, until it stops); its shutdown, the drain, sends SECOND if any.
RUN = r"""
import os, signal, sys, time
from pipeline import cli, run_commands
from pipeline.app import App

FIRST, SECOND = [getattr(signal, name) if name != "-" else None for name in sys.argv[1:3]]
MODE = sys.argv[3]
TICK = [{"camera": "cam", "state": "running", "published": 5, "in_slot": 1, "in_flight": 2,
         "publisher": {"queued": 4}}]


class StandIn(App):
    def start(self):
        pass

    def run(self, duration=None, on_tick=None):
        on_tick(TICK)
        if MODE == "nohup":
            print("SIGHUP ignored:", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
        if FIRST is not None:
            os.kill(os.getpid(), FIRST)
        while not self._stop.wait(0.05):  # a hung-up terminal's SIGHUP comes from the test
            pass
        return TICK

    def shutdown(self, drain=True, timeout=20.0):
        if SECOND is not None:
            os.kill(os.getpid(), SECOND)  # its handler runs before the next line: exits at once
            sys.exit(99)
        return [{"camera": "cam", "state": "stopped", "published": 5, "fps": 5.0}]


run_commands.App = StandIn
sys.exit(cli.main(["run", sys.argv[4], "--plain", "--summary-json", sys.argv[5]]))
"""


def command(tmp_path: Path, first: str, second: str = "-", mode: str = "") -> list[str]:
    config = tmp_path / "c.yaml"
    config.write_text("cameras: []\ncontrol: {enabled: true}\n")
    return [sys.executable, "-c", RUN, first, second, mode or "-", str(config), str(tmp_path / "summary.json")]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_sighup_drains_and_stops_as_sigterm_does(tmp_path):
    done = run(command(tmp_path, "SIGHUP"))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out  # was -1: killed by it, as by a crash
    assert "SIGHUP (the terminal or session closed): stopping as on SIGTERM" in out, out
    assert "SIGTERM: draining in-flight frames and flushing Redis" in out, out
    assert out.index("Stopping: draining") < out.index("final"), out
    assert json.loads((tmp_path / "summary.json").read_text())[0]["state"] == "stopped"


def test_a_sighup_ignored_from_the_start_stays_ignored(tmp_path):
    done = run(["env", "--ignore-signal=HUP", *command(tmp_path, "SIGTERM", mode="nohup")])
    assert done.returncode == 0 and "SIGHUP ignored: True" in done.stdout, done.stdout + done.stderr


def test_a_terminal_that_hung_up_still_lets_the_run_drain(tmp_path):
    """The terminal closed: the run is sent SIGHUP and every write to the terminal fails (EIO) from then on. The
    first such write, a line of the drain, raised out of it: no shutdown, the statuses left running."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    # util-linux's setsid: a session whose controlling terminal is the pty (stdin), as a login shell's job; it execs
    # the run (not the child of a group leader: no fork). No preexec_fn: docs/architecture.md, Hangs.
    proc = subprocess.Popen(["setsid", "--ctty", *command(tmp_path, "-")], cwd=ROOT, env=env, stdin=slave,
                            stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while b"Ctrl-C to stop" not in seen:  # the run is under way
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, seen.decode(errors="replace")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal, i.e. it ended
                chunk = b""
            assert chunk, f"ended (exit {proc.wait()}) before running:\n{seen.decode(errors='replace')}"
            seen += chunk
    finally:
        os.close(master)  # hangs the terminal up: the kernel sends SIGHUP to its session's leader
    assert proc.wait(120) == 0, seen.decode(errors="replace")
    assert json.loads((tmp_path / "summary.json").read_text())[0]["state"] == "stopped"


@pytest.mark.parametrize("first, second, code", [("SIGINT", "SIGINT", 130), ("SIGTERM", "SIGINT", 130),
                                                 ("SIGHUP", "SIGHUP", 143)])
def test_a_second_signal_during_the_drain_says_what_it_abandons(tmp_path, first, second, code):
    done = run(command(tmp_path, first, second))
    out = done.stdout + done.stderr
    assert done.returncode == code, out
    lines = out.splitlines()
    assert lines[-2].startswith("Stopping: draining in-flight frames"), out
    assert lines[-1] == (f"A second signal: exiting at once (exit {code}), the drain abandoned: the frames still in "
                         "flight and the messages not yet in Redis are lost (at the last status: 3 frame(s) in "
                         "flight, 4 message(s) not yet in Redis); no final table"), out
    assert not (tmp_path / "summary.json").exists()


def test_a_second_signal_before_the_first_tick_says_the_stop_is_abandoned():
    """The start, or its undo after the first signal: no frame flowed yet, nothing to count."""
    from types import SimpleNamespace

    from pipeline.run_commands import Signals

    said: list[str] = []
    signals = Signals(SimpleNamespace(install_signal_handlers=lambda: None), SimpleNamespace(say=said.append))
    assert signals.abandoned(signal.SIGINT) == ("A second signal: exiting at once (exit 130), the stop abandoned: "
                                                "the run's reaper ends the processes it had started")
    signals.tick([])  # a service with no camera yet
    assert "the drain abandoned" in signals.abandoned(signal.SIGTERM) and "(exit 143)" in signals.abandoned(15)


def test_what_ray_init_starts_outlives_a_hang_up_of_the_terminal():
    """A local Ray's GCS, raylet and agents are started by ray.init in the controller's process group: a terminal's
    hang-up (SIGHUP to the whole group) ended them under a controller that now drains on it, and during the start it
    hung 60 s on a dead GCS. What starts inside cluster._signals_held has SIGHUP blocked (checked with real Ray: the
    GCS, the raylet and the agents inherit the mask); the controller's own mask is back after it."""
    from pipeline import cluster

    with cluster._signals_held():
        child = subprocess.Popen(["sleep", "30"])
    try:
        status = open(f"/proc/{child.pid}/status").read()
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk")), 16)
        assert blocked & (1 << (signal.SIGHUP - 1)), f"SIGHUP not blocked in the child: SigBlk {blocked:x}"
        # Ctrl-\ (SIGQUIT to the group), which the controller drains on too, killed the GCS and the raylet alike
        assert blocked & (1 << (signal.SIGQUIT - 1)), f"SIGQUIT not blocked in the child: SigBlk {blocked:x}"
        assert not {signal.SIGHUP, signal.SIGQUIT} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        child.kill()
        child.wait()
