"""A service short of file descriptors or of a writable HOME (pipeline/limits.py, workers/av_source.py:
open_files_cause, pipeline/cluster.py: init_ray). What runs out of files runs in a process of its own, under a
soft RLIMIT_NOFILE it lowers and fills itself; every process a test starts is stopped in its ``finally``."""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.cluster as cluster
from pipeline.config import parse_config
from pipeline.limits import ACCEPT_FAILED, RETRY_FAILED, AcceptErrors

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 256  # the soft open-file limit the child processes run under

# Fills this process's file table up to its soft limit (lowered to LIMIT first); ``free()`` empties it again.
FILL = f"""
import os, resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
def fill():
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return
def free():
    while held:
        os.close(held.pop())
"""

# A server (the API's or the dashboard's) that runs out of file descriptors while connections wait: it counts
# asyncio's failed accepts (a filter put before the service's), says "full" once its files are all taken, gives
# them back once asyncio has retried for 2.5 s (the retries come a second apart), then waits for "stop".
SERVER_OUT_OF_FILES = """
import logging, sys, time
from pipeline.logs import setup_logging
setup_logging(False, "text")
failed = []
class Count(logging.Filter):
    def filter(self, record):
        if str(record.msg).startswith("socket.accept() out of system resource"):
            failed.append((time.monotonic(), record.getMessage()))
        return True
logging.getLogger("asyncio").addFilter(Count())

async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

if sys.argv[1] == "api":
    from pipeline.api import ApiServer, bind
    server = ApiServer(app).start(bind("127.0.0.1", 0), check_host=False)
    port = server.port
else:
    from pipeline.dashboard import DashboardServer
    server = DashboardServer(sys.argv[2], "hv", "127.0.0.1", 0).start()
    port = server.port
print(port, flush=True)
sys.stdin.readline()
""" + FILL + """
fill()
print("full", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not (failed and time.monotonic() - failed[0][0] >= 2.5):
    time.sleep(0.05)
free()
got = list(failed)  # one copy: the server's thread still appends (a count of 12659 against 12660 on its port)
print("freed", len(got), sum(f"'127.0.0.1', {port})" in m for _, m in got), flush=True)
sys.stdin.readline()
server.stop()
"""


def _line(proc: subprocess.Popen, timeout_s: float = 60) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "the child said nothing"
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("which", ["api", "dashboard"])
def test_a_server_out_of_file_descriptors_says_so_once_naming_the_limit(which, redis_url, tmp_path):
    """`ulimit -n 128` and 100 dashboard pages: every failed accept() was an ERROR with its traceback, up to the
    listen backlog's count each second (37,935 in 36 s, the log 20 MB), none naming the limit. Now one WARNING
    names it and `ulimit -n`; asyncio still retries, so the waiting connection is answered once files are free."""
    err = tmp_path / "stderr.log"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SERVER_OUT_OF_FILES, which, redis_url], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, encoding="utf-8")
    clients: list[socket.socket] = []
    try:
        port = int(_line(proc))
        proc.stdin.write("fill\n")
        proc.stdin.flush()
        assert _line(proc) == "full"
        for _ in range(2):  # the kernel completes the handshake; the server's accept() fails
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            c.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            clients.append(c)
        freed = _line(proc).split()
        assert freed[0] == "freed", freed
        failed, on_this_port = int(freed[1]), int(freed[2])
        assert failed > 1 and on_this_port == failed  # the storm happened, on this server's socket
        assert clients[0].recv(64).startswith(b"HTTP/1.1 200")  # served once files were free
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = err.read_text()
    assert ACCEPT_FAILED not in log and "Traceback" not in log, log[:3000]
    said = [line for line in log.splitlines() if "cannot accept connections" in line]
    assert len(said) == 1, log[:3000]
    assert " WARNING pipeline.limits: " in said[0]
    assert f"on 127.0.0.1:{port}: this process (pid {proc.pid}) has reached its open-file limit " \
           f"(RLIMIT_NOFILE {LIMIT}," in said[0]
    assert "`ulimit -n 65536`" in said[0]


def _accept_failed(code: int = errno.EMFILE) -> logging.LogRecord:
    exc = OSError(code, os.strerror(code))
    msg = f"{ACCEPT_FAILED}\nsocket: <asyncio.TransportSocket fd=4, laddr=('127.0.0.1', 48985)>"
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (OSError, exc, None))


def test_failed_accepts_are_said_again_at_most_once_a_minute_with_a_count(caplog):
    """The first failed accept is said; those within a minute after it are counted and held back; the first one
    after that minute says how many were; asyncio's other records pass as they are, its failed retries of the
    accepts once a storm was seen excepted."""
    now = [1000.0]
    errors = AcceptErrors(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="pipeline.limits")
    retry = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, f"{RETRY_FAILED}<function ...>)", None, None)
    assert errors.filter(retry) is True  # no storm seen: a failure of its own
    passed = []
    for t in (0, 1, 30, 59.9, 60.5, 61):
        now[0] = 1000.0 + t
        passed.append(errors.filter(_accept_failed()))
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", None, None)
    assert errors.filter(other) is True
    assert errors.filter(retry) is False  # the storm's retries, failing on the socket of a server that stopped
    assert passed == [False] * 6
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.limits"]
    assert len(said) == 2, said
    assert "on 127.0.0.1:48985: this process" in said[0] and "held back" not in said[0]
    assert said[1].endswith("(said again at most once a minute; 3 more held back since it was last said)")
    now[0] += 120
    errors.filter(_accept_failed(errno.ENFILE))
    assert "open-file table is full" in caplog.records[-1].getMessage()


RAISED = f"""
import logging, resource
from pipeline.logs import setup_logging
setup_logging(True, "text")
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import pipeline.cluster as cluster
from pipeline.config import parse_config
seen = []
cluster.ray.init = lambda **kw: seen.append(resource.getrlimit(resource.RLIMIT_NOFILE))
for _ in range(2):
    cluster.init_ray(parse_config({{"cameras": []}}), {{}})
print("at ray.init", seen, "hard", resource.getrlimit(resource.RLIMIT_NOFILE)[1])
"""


def test_the_open_file_limit_is_raised_to_the_hard_one_before_ray_starts():
    """Servers raise their soft RLIMIT_NOFILE to the hard limit at start; the processes Ray starts inherit it.
    Said at -v, once: the second start finds it raised already."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= LIMIT:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", RAISED], cwd=ROOT, env=env, capture_output=True, encoding="utf-8",
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    hard = int(out.stdout.split("hard ")[1])
    assert f"at ray.init [({hard}, {hard}), ({hard}, {hard})]" in out.stdout, out.stdout
    said = [line for line in out.stderr.splitlines() if "open-file limit" in line]
    assert len(said) == 1 and f"DEBUG pipeline.limits: open-file limit (RLIMIT_NOFILE) raised from {LIMIT} to its " \
                               f"hard limit {hard}" in said[0], out.stderr[-3000:]


CAMERA_OUT_OF_FILES = """
import socket
from workers.av_source import AVSource
from workers.source_base import SourceError
silent = socket.create_server(("127.0.0.1", 0))  # it accepts nothing: the open fails before it could
source = AVSource(f"http://127.0.0.1:{silent.getsockname()[1]}/cam200", "http", open_timeout_s=5)
""" + FILL + """
fill()
try:
    source.open()
except SourceError as e:
    free()
    print(e.kind, "|", e)
"""


def test_a_camera_process_out_of_file_descriptors_says_its_limit_and_how_to_raise_it():
    """200 cameras in 2 processes under `ulimit -n 128`: they showed "http://.../cam200: Too many open files",
    naming neither the process, its limit nor `ulimit -n`. Still retried as an unreachable camera."""
    out = subprocess.run([sys.executable, "-c", CAMERA_OUT_OF_FILES], cwd=ROOT, capture_output=True,
                         encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, text = out.stdout.strip().split(" | ")
    assert kind == "unreachable"
    assert "/cam200: too many open files: this camera process (pid " in text, text
    assert f"has reached its open-file limit ({LIMIT}, hard limit " in text
    assert "`ulimit -n 65536`" in text and "ray.cameras_per_process" in text


RAY_HOME = """
import pipeline.cluster as cluster
from pipeline.config import parse_config
from pipeline.errors import UserError
try:
    cluster.init_ray(parse_config({"cameras": []}), {})
except UserError as e:
    print("UserError:", e)
"""


def test_a_home_ray_cannot_write_its_token_under_is_the_users_error(tmp_path):
    """HOME read-only (here a file: root writes anywhere else): Ray's token setup in ray.init raised OSError for
    ~/.ray, shown as "a bug in hydravision" with its traceback (exit 1). Ray reads RAY_AUTH_TOKEN_PATH instead."""
    home = tmp_path / "home"
    home.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no token, no mode, no address
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", RAY_HOME], env=env, cwd=ROOT, capture_output=True,
                         encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == (f"UserError: ray: cannot start a local Ray: it saves its authentication token in {home}/"
                          f".ray/auth_token and cannot write {home}/.ray (Not a directory): run hydravision with a "
                          "writable HOME, or set RAY_AUTH_TOKEN_PATH to a file holding a token of your own "
                          "(`openssl rand -hex 32`), which Ray reads instead\n"), out.stdout


def test_another_os_error_of_ray_init_is_not_taken_for_home(monkeypatch):
    """Guard: an OSError of ray.init about another path (Ray's session folder) stays what it was."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def fail(**kw):
        raise PermissionError(errno.EACCES, "Permission denied", "/tmp/ray/session_latest")

    monkeypatch.setattr(cluster.ray, "init", fail)
    with pytest.raises(PermissionError):
        cluster.init_ray(parse_config({"cameras": []}), {})
