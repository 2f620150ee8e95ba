"""`hydravision run --log-format json` when a camera's or a replica's Ray worker process dies (round 18).

The raylet's notice of the dead worker ("A worker died or was killed while executing a task ...") came out as one
plain-text line, "(raylet) A worker died ...", among the JSON lines on stdout: a log shipper broke on it. Ray does
not forward it through its log dispatcher (which pipeline/logs.py:json_worker_logs already turns into JSON records)
but from its error listener thread, ray/_private/worker.py:listen_error_messages, which calls print_to_stdstream
itself (seen in a real run: kill -9 of a camera's StreamActor). It is now a record at WARNING with the notice in
"msg"; the plain format is unchanged.

The tests run Ray's own listen_error_messages in a child process after the service's logging is set up, as
`hydravision run` sets it up, with the GCS's error subscriber stood in for: no Ray cluster, no crash, no timing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

NOTICE = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the "
          "problem, check the logs for the dead worker. Worker PID: 32415 Worker exit type: SYSTEM_ERROR Worker "
          "exit detail: Worker unexpectedly exits with a connection error code 2. End of file.")
SPILLED = ":info_message:Spilled 1024 MiB, 12 objects, write throughput 512 MiB/s."

# setup_logging as pipeline/cli.py calls it; json_worker_logs as App calls it after ray.init in JSON mode (twice:
# Ray started again in one process); then Ray's error listener with one error message per argument, as the GCS
# publishes them for this job
_LISTEN = textwrap.dedent("""
    import json, logging, sys, threading
    from types import SimpleNamespace
    from pipeline.logs import json_worker_logs, setup_logging
    log_format, messages = sys.argv[1], json.loads(sys.argv[2])
    setup_logging(log_format=log_format)
    if log_format == "json":
        assert json_worker_logs() and json_worker_logs()
    from ray._private import worker as ray_worker
    from ray._raylet import JobID

    stopped = threading.Event()

    class Subscriber:
        def subscribe(self):
            pass

        def poll(self):
            if messages:
                return None, {"job_id": None, "error_message": messages.pop(0)}
            stopped.set()  # all delivered: the listener returns at its next look at the event
            return None, None

    logging.getLogger("hydravision").info("before")
    ray_worker.listen_error_messages(SimpleNamespace(gcs_error_subscriber=Subscriber(),
                                                     current_job_id=JobID.from_int(1)), stopped)
    logging.getLogger("hydravision").info("after")
""")


def listen(log_format: str, *messages: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_COLOR_PREFIX": "0"}  # as plain_ray_prefix sets it in pipes
    return subprocess.run([sys.executable, "-c", _LISTEN, log_format, json.dumps(messages)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_dead_workers_notice_is_a_json_warning_record():
    done = listen("json", NOTICE, SPILLED)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line that is no JSON among the JSON logs: {line!r}")
    assert [r["msg"] for r in records] == ["before", NOTICE, SPILLED.split(":info_message:")[1], "after"]
    notice, spilled = records[1], records[2]
    assert notice["level"] == "warning" and notice["logger"] == "ray.worker.raylet", notice
    assert spilled["level"] == "info", spilled  # Ray's informational message stays info, its marker gone


def test_the_plain_format_prints_the_notice_as_ray_does():
    """Guard: with --log-format text the notice stays Ray's own line on stdout."""
    done = listen("text", NOTICE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"(raylet) {NOTICE}\n"
    assert "before" in done.stderr and "after" in done.stderr and "raylet" not in done.stderr
