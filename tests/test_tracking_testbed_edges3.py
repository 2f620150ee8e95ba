"""Edge cases of tracking and the test servers, a third look: the class a track ends with, the bound on the
lost-track buffer, and test servers that outlive a test run killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import supervision as sv
from pydantic import ValidationError

from running import wait_for
from servers import RedisServer, require_binary
from workers.settings import CameraConfig, TrackerConfig
from workers.tracking import CameraTracker

ROOT = Path(__file__).resolve().parents[1]


def dets(x: float, name: str) -> sv.Detections:
    return sv.Detections(xyxy=np.array([[x, 50, x + 20, 90]], np.float32), confidence=np.array([0.9], np.float32),
                         class_id=np.array([0]), data={"class_name": np.array([name])})


# -- track_ended names the class the track had last ---------------------------------------------------------------

def test_a_track_whose_class_changed_ends_under_the_class_it_had_last():
    """A far "person" turned out a bicycle: its messages, line crossings and re-link all said "bicycle" from then
    on, but track_ended named the class of its first frame, "person"."""
    t = CameraTracker(["objects"], TrackerConfig(lost_track_buffer=3), frame_rate=10)
    events = []
    for f in range(12):
        tracked, ev = t.update("objects", dets(10 + 4 * f, "person" if f < 4 else "bicycle"), f, f / 10)
        events += ev
    assert str(tracked.data["class_name"][0]) == "bicycle"  # what the last message said
    events += t.finish()
    assert [(e["type"], e["class"]) for e in events] == [("track_started", "person"), ("track_ended", "bicycle")]


def test_a_track_that_ends_unseen_names_its_last_class():
    """The same when the track ends by being lost (not by finish()): the class of its last sighting."""
    t = CameraTracker(["objects"], TrackerConfig(lost_track_buffer=3), frame_rate=10)
    events = []
    empty = sv.Detections.empty()
    empty.data["class_name"] = np.array([], dtype=str)
    for f in range(30):
        det = dets(10 + 4 * f, "car" if f < 3 else "bus") if f < 10 else empty
        events += t.update("objects", det, f, f / 10)[1]
    ended = [e for e in events if e["type"] == "track_ended"]
    assert [e["class"] for e in ended] == ["bus"] and ended[0]["last_frame"] == 9


# -- lost_track_buffer has a bound ---------------------------------------------------------------------------------

def test_lost_track_buffer_is_bounded_like_max_lost_s():
    """Any value was taken: a huge one kept every lost track (and its Kalman state, and its place in every
    association) for ever in a long-running service, and its track_ended never came. 1800 frames at trackers'
    30 fps are 60 s, appearance.max_lost_s's bound."""
    assert TrackerConfig(lost_track_buffer=1800).lost_track_buffer == 1800
    with pytest.raises(ValidationError) as err:
        CameraConfig(id="lobby", url="synthetic://street", tracker={"lost_track_buffer": 10**9})
    assert "tracker.lost_track_buffer" in str(err.value) and "1800" in str(err.value)


# -- test servers end with the test run that started them -----------------------------------------------------------

_HOLDER = """
import sys
from pipeline.testbed import RedisServer, RtspServer
servers = [RedisServer().start(), RedisServer().start()]
servers[1].pause()  # a stalled server (SIGSTOP) handles no SIGTERM
if sys.argv[1] == "rtsp":  # it quits by itself when its parent goes (--exit-with-parent), unless paused
    servers.append(RtspServer("pattern").start())
    servers[2].pause()
print(" ".join(str(s.process.pid) for s in servers), flush=True)
sys.stdin.read()  # until killed
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, its new parent has not reaped it yet
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("kinds", ["redis", "rtsp"])
def test_servers_end_when_the_test_run_is_killed(kinds: str, tmp_path):
    """pytest SIGKILLed (a timeout, a cancelled CI job) runs no atexit hook: its redis-servers went on for ever,
    and an RTSP server paused to play a stalled camera too (it watched its parent from its own main loop)."""
    require_binary("redis-server")
    if kinds == "rtsp":
        require_binary("gst-rtsp-server")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, kinds], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE,  # TMPDIR: its servers' folders, left by the kill, go too
                              env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    pids: list[int] = []
    try:
        line = holder.stdout.readline().decode()
        pids = [int(p) for p in line.split()]
        assert len(pids) == (3 if kinds == "rtsp" else 2), line
        assert not any(_gone(p) for p in pids)
        holder.kill()
        holder.wait(10)
        wait_for(lambda: all(_gone(p) for p in pids), 15, f"the servers {pids} to end with their parent")
    finally:
        holder.kill()
        holder.wait(10)
        for pid in pids:  # the unfixed code's orphans: the test must not leave them behind either
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_guard_a_server_started_by_a_thread_outlives_the_thread():
    """PR_SET_PDEATHSIG fires when the *thread* that started the child ends, not the process: a test's helper
    thread that restarts a server (tests/test_consumer_control_edges2.py) must not take the server with it."""
    require_binary("redis-server")
    with RedisServer() as server:
        helper = threading.Thread(target=lambda: (server.stop(), server.start()))
        helper.start()
        helper.join()
        pid = server.process.pid
        time.sleep(0.3)  # a signal is delivered at once; give a loaded machine a moment anyway
        assert server.running and server.client().ping()
        assert server.process.pid == pid
