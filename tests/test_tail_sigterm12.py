"""`hydravision tail --group` stopped with SIGTERM (a supervisor's stop, `docker stop`, systemd) ends as Ctrl-C
does: exit 143 (128 + SIGTERM), and its host-pid consumer name leaves the group. SIGTERM's default action killed
it where it stood: the name stayed in the group for good (it is never used again) with whatever it held."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_tail import REPO, K, frame_message, xadd


@pytest.mark.timeout(60)
def test_sigterm_ends_tail_group_cleanly(redis_server) -> None:
    client = redis_server.client()
    xadd(client, K.detections("lobby"), [frame_message(0)])
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "lobby", "--group", "g", "--from-start",
                             "--redis-url", redis_server.url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = proc.stderr.readline()
        assert line.startswith("tailing "), line + proc.stderr.read()
        printed = proc.stdout.readline()
        deadline = time.monotonic() + 20  # printed, then acknowledged: it waits for more, holding nothing
        while [c["pending"] for c in client.xinfo_consumers(K.detections("lobby"), "g")] != [0]:
            assert time.monotonic() < deadline, client.xinfo_consumers(K.detections("lobby"), "g")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert " frame 0 " in printed, printed
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert client.xinfo_consumers(K.detections("lobby"), "g") == []
