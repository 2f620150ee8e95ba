"""Edges of the run's tie to what it starts and of cluster placement, where an audit (2026-12-06) found them:
the reaper (pipeline/reaper.py). Every process a test starts is stopped in its ``finally``, also when the test
fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import reaper
from test_lifecycle_edges import _gone, _kill

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
RUN_ENV = "HYDRAVISION_RUN"  # pipeline/reaper.py: the token every process of a run inherits

# A run that starts a process of its own session (as the embedded redis-server is started) ``delay`` seconds
# after its reaper, says both pids, and is SIGKILLed at once: before the reaper's first look, or after its last.
RUN_KILLED_AFTER_A_START = (
    "import os, signal, subprocess, sys, time\n"
    "from pipeline.reaper import Reaper\n"
    "reaper = Reaper.start()\n"
    "time.sleep(float(sys.argv[1]))\n"
    f"child = subprocess.Popen({SLEEPER!r}, start_new_session=True)\n"
    "print(reaper.proc.pid, child.pid, flush=True)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n")


@pytest.mark.parametrize("delay", [0.0, 4 * reaper.POLL_S], ids=["before-its-first-look", "after-its-last-look"])
def test_a_run_killed_right_after_it_started_a_process_leaves_none_behind(delay):
    """The reaper noted the run's descendants every POLL_S; once the run was dead, what it had started since the
    last look (or before the reaper's first: a run killed at its start, its redis-server just up) was reparented,
    no one's descendant, and ran on for ever. A twin's process, not this run's, still runs."""
    bystander = subprocess.Popen(SLEEPER, start_new_session=True,
                                 env={**os.environ, RUN_ENV: f"{os.getpid()}-twin"})
    run = subprocess.Popen([sys.executable, "-c", RUN_KILLED_AFTER_A_START, str(delay)], stdout=subprocess.PIPE,
                           text=True, cwd=Path(reaper.__file__).parent.parent)
    reaper_pid = child_pid = 0
    try:
        reaper_pid, child_pid = map(int, run.stdout.readline().split())
        run.wait(30)
        assert _gone(child_pid, 15.0), "a process the run started just before it was killed outlived it"
        assert _gone(reaper_pid, 15.0)
        assert bystander.poll() is None, "the reaper stopped a process of another run"
    finally:
        run.kill()
        run.wait(5)
        for pid in (child_pid, reaper_pid):
            if pid:
                _kill(pid)
        bystander.kill()
        bystander.wait(5)


def test_a_released_run_leaves_no_token_for_what_its_process_starts_later(monkeypatch):
    """Normal-path guard: after a clean stop, a process started later by the same Python (a test, an embedding
    program) belongs to no run, so no later reaper of that token stops it."""
    monkeypatch.delenv(RUN_ENV, raising=False)
    r = reaper.Reaper.start()
    try:
        assert os.environ.get(RUN_ENV), "the run's token is not in its environment"
    finally:
        r.release()
    assert RUN_ENV not in os.environ
