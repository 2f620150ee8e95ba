"""Test helpers: skip a test (or fail it when $CI is set) when a server it needs is not installed, and a port
that never answers. The servers themselves live in ``pipeline/testbed.py`` and the clips in
``synthetic/clips.py``, where the benchmarks use them too; their names are re-exported here so that a test
imports its helpers from one module.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

from pipeline.testbed import (HOST, SYSTEM_PYTHON, ManagedProcess, RedisServer, RtspServer, find_redis_server,
                              free_port)
from synthetic.clips import bigbuckbunny_mp4, bikes_mp4, encode_mp4

__all__ = ["HOST", "BlackHole", "ManagedProcess", "RedisServer", "RtspServer", "bigbuckbunny_mp4", "bikes_mp4",
           "encode_mp4", "find_redis_server", "free_port", "require_binary", "skip_or_fail"]

# What `require_binary` checks, and the Debian packages that provide it.
_GST_CHECK = (
    "import gi, sys; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0');"
    "from gi.repository import Gst, GstRtspServer; Gst.init(None);"
    "sys.exit(any(Gst.ElementFactory.find(e) is None for e in"
    " ('appsrc', 'qtdemux', 'h264parse', 'rtph264pay', 'videotestsrc', 'x264enc')))"
)
_DEBIAN_PACKAGES = {
    "redis-server": "redis-server",
    "ffmpeg": "ffmpeg",
    "node": "nodejs npm",
    "npm": "nodejs npm",
    "gst-rtsp-server": "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly",
}


def skip_or_fail(message: str) -> None:
    """pytest.skip, or pytest.fail when $CI is set: CI must not go green by skipping integration tests."""
    import pytest  # only here: the rest of this module works without pytest

    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@functools.cache
def _have(name: str) -> bool:
    if name == "gst-rtsp-server":
        try:
            check = subprocess.run([SYSTEM_PYTHON, "-c", _GST_CHECK], capture_output=True, timeout=30)
            return check.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    if name == "redis-server":
        return find_redis_server() is not None
    return shutil.which(name) is not None


def require_binary(name: str) -> None:
    """Skip the calling test when `name` is missing (fail instead when $CI is set).

    `name` is an executable, or "gst-rtsp-server" for the GStreamer RTSP server under /usr/bin/python3.
    """
    if not _have(name):
        if name == "redis-server" and os.environ.get("HV_REDIS_SERVER"):  # installing one would not help
            skip_or_fail(f"HV_REDIS_SERVER={os.environ['HV_REDIS_SERVER']}: no such program to run")
        what = f"GStreamer's RTSP server for {SYSTEM_PYTHON}" if name == "gst-rtsp-server" else name
        package = _DEBIAN_PACKAGES.get(name, name)
        skip_or_fail(f"{what} is not installed; on Debian/Ubuntu: sudo apt-get install {package}")


class BlackHole:
    """A port that accepts TCP connections and never says a word, like a hung camera or a dead NAT."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self._accepted.append(self._listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self._listener.close()
        for conn in self._accepted:
            conn.close()

    def __enter__(self) -> "BlackHole":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def serving(handler: type) -> Iterator[str]:
    """An http.server handler class served on HOST at a free port, in a thread: its base URL ("http://HOST:PORT");
    shut down after (serve_forever looks for that every 0.05 s: its default 0.5 s was each test's teardown)."""
    server = ThreadingHTTPServer((HOST, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hold_lease(client, prefix: str = "hv") -> None:
    """Holds ``{prefix}:service`` as a running service does (pipeline/service_lease.py): the `cameras` CLI over Redis
    refuses at once, nothing sent, where no service holds it. For tests of a service that holds it and does not
    answer (busy, hung, or a reader of the test's own)."""
    client.set(f"{prefix}:service", '{"run": "test", "pid": 0, "host": "test"}', px=600_000)
