"""What `hydravision run` prints, a fifteenth look: the lines camera processes log reach the controller's output
each on its own (Ray's log deduplication took "camera street-1: ..." and "camera street-2: ..." for one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# After `run`'s start-up (here: a config that is not there, after Ray was imported), two cameras' lines that differ
# in the camera's id alone go through Ray's deduplicator as the driver prints its workers' lines.
PROBE = """
import time
from pipeline.cli import main
assert main(["run", "/nonexistent/hydravision.yaml"]) == 2
from ray._private.ray_logging import stdout_deduplicator
batch = lambda pid, cam: {"ip": "127.0.0.1", "pid": pid, "lines": [f"camera {cam}: frame-age budget fps (p95 917 ms)"]}
out = []
for pid, cam in ((11, "street-1"), (12, "street-2"), (13, "street-3")):
    out += [line for b in stdout_deduplicator.deduplicate(batch(pid, cam)) for line in b["lines"]]
out += [line for b in stdout_deduplicator.flush() for line in b["lines"]]
print(repr(out))
"""


@pytest.mark.timeout(120)
def test_every_cameras_line_reaches_the_output_on_its_own():
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=110)
    assert done.returncode == 0, done.stderr
    lines = eval(done.stdout.strip().splitlines()[-1])
    assert [line.split(":")[0] for line in lines] == ["camera street-1", "camera street-2", "camera street-3"], lines
    assert not [line for line in lines if "repeated" in line], lines


@pytest.mark.timeout(120)
def test_a_dedup_setting_of_the_users_stays():
    env = {**os.environ, "RAY_DEDUP_LOGS": "1"}
    done = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; "
                           "assert main(['run', '/nonexistent.yaml']) == 2; "
                           "import ray._private.ray_constants as c; print(c.RAY_DEDUP_LOGS)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert done.stdout.strip().splitlines()[-1] == "True", (done.stdout, done.stderr)


# The dashboard's server (uvicorn with its own logging set up), with no HTTP API: uvicorn's lines came in its own
# format on stderr beside the JSON lines (route_uvicorn was the API's alone).
UVICORN = """
import logging, sys, uvicorn
from pipeline.logs import setup_logging
setup_logging(log_format="json")
uvicorn.Config(lambda scope, receive, send: None)  # as pipeline/dashboard.py makes its server's
logging.getLogger("uvicorn.error").error("Exception in ASGI application")
"""


@pytest.mark.timeout(60)
def test_uvicorns_lines_are_json_lines_with_the_dashboard_alone():
    done = subprocess.run([sys.executable, "-c", UVICORN], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["logger"], record["level"], record["msg"]) == (
        "uvicorn.error", "error", "Exception in ASGI application"), record


def test_the_status_line_says_why_a_camera_is_still_starting():
    """A decoder the watchdog restarted, or holds stalled (an open that blocks): the line said "starting" for ever,
    where `hydravision status` said why."""
    from pipeline.status import status_line

    line = status_line([{"camera": "tty", "state": "starting", "published": 0, "last_error":
                         "decoder made no progress for 8 s; restarted by the watchdog"}])
    assert line.endswith("error: decoder made no progress for 8 s; restarted by the watchdog"), line
    assert "error" not in status_line([{"camera": "cam", "state": "starting", "published": 0}])


def test_tail_shows_no_escape_sequence_anyone_wrote_to_redis():
    """`hydravision tail --events` printed a camera id and an event type from Redis as they were: an entry with
    "\\x1b]0;PWNED\\x07\\x1b[2J" in its type retitled and cleared the reader's terminal (status already cleaned it)."""
    from pipeline.run_commands import _message_line

    event = {"v": 1, "ts": 1.0, "camera": "cam-a\x1b[31mRED", "type": "zone_entered\x1b]0;PWNED\x07\x1b[2J"}
    line = _message_line("1-0", event, as_json=False)
    assert line == "1.000 cam-a?[31mRED zone_entered?]0;PWNED??[2J {}", repr(line)
    frame = {"camera": "c", "frame": 1, "pts": 0.0, "latency_ms": 3.0,
             "detections": [{"head": "people\x9b", "class": "person\n", "track_id": None, "conf": 0.5}]}
    assert _message_line("1-0", frame, as_json=False).endswith("people?/person?#- 0.50"), frame


def test_a_local_ray_without_authentication_is_warned_of(monkeypatch):
    """Its ports listen on every interface (the docs said 127.0.0.1); Ray's token auth guards them unless turned off."""
    from pipeline.cluster import unguarded_ray

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert unguarded_ray() is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert unguarded_ray() is None
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert unguarded_ray().startswith("RAY_AUTH_MODE=disabled: the local Ray's ports")
