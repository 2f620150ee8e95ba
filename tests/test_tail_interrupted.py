"""`hydravision tail` stopped by Ctrl-C exits 130 (128 + SIGINT), as the CLI's other commands do: a script can tell
an interrupted tail from one that printed its --count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis

from test_tail import REPO, K, frame_message, tail, xadd


@pytest.mark.timeout(60)
def test_ctrl_c_ends_tail_with_130_after_what_it_printed(redis_server) -> None:
    client = redis_server.client()
    # a test run started as a background job (`./dev.sh test &`, nohup) ignores SIGINT, and its children with it:
    # Ctrl-C at a terminal reaches a tail as the default handler (env sets it; no preexec_fn: docs/architecture.md,
    # Hangs)
    proc = subprocess.Popen(["env", "--default-signal=INT", sys.executable, "-m", "pipeline.cli", "tail", "lobby",
                             "--count", "5", "--redis-url", redis_server.url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = proc.stderr.readline()
        assert line.startswith("tailing "), line + proc.stderr.read()
        xadd(client, K.detections("lobby"), [frame_message(1)])
        printed = proc.stdout.readline()  # one of the five it waits for
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert " frame 1 " in printed, printed
    assert proc.returncode == 130, (proc.returncode, err)


@pytest.mark.timeout(60)
def test_ctrl_c_ends_tail_group_with_130(redis_server, capsys, monkeypatch) -> None:
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(redis.Redis, "xreadgroup", interrupted)
    code, lines, err = tail(capsys, "--events", "--group", "g", "--redis-url", redis_server.url)
    assert code == 130, err
