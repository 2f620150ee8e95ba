"""Edges of run-time admission, placement and Ray's start, found in an audit (round 13), each failing on the code
before. No Ray cluster, no Redis, no network."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A lookup the resolver never answers (a DNS server gone: glibc waits 5 s per try, per server); the process that
# asked it then ends.
STUCK_LOOKUP_THEN_EXIT = textwrap.dedent("""
    import socket, time
    from pipeline import admission
    socket.getaddrinfo = lambda *args, **kwargs: time.sleep(60)
    print(admission.resolve("camera.example", 554, timeout_s=0.1), flush=True)
""")


def test_a_lookup_stuck_in_the_resolver_does_not_hold_the_services_exit():
    """A camera added with a host name while DNS hung: the check gave up after its timeout, but the lookup's
    thread was a ThreadPoolExecutor's, which the interpreter's exit joins, so the stopped service waited for the
    resolver (seconds per stuck lookup; past `docker stop`'s grace it was killed)."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK_LOOKUP_THEN_EXIT], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=30)  # the import and the 0.1 s wait; the stuck lookup is 60 s
    except subprocess.TimeoutExpired:
        pytest.fail("the process waited at its exit for a DNS lookup it had given up on")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and out.strip() == "set()", out
