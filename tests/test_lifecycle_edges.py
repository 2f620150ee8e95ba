"""Edges of the run's process lifecycle helpers: the embedded redis-server (pipeline/embedded_redis.py), the
reaper (pipeline/reaper.py) and the JSON log records (pipeline/logs.py). Every process a test starts is
stopped in its ``finally``, also when the test fails."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import pytest
import redis

from pipeline import embedded_redis, reaper
from pipeline.embedded_redis import EmbeddedRedis
from pipeline.errors import UserError
from pipeline.logs import JsonFormatter, json_worker_logs

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _gone(pid: int, deadline_s: float = 2.0) -> bool:
    """Whether pid has ended (or is a zombie) within deadline_s."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def _ports_then_free(*first: int):
    """A free_port() that hands out ``first`` before really free ports: another process took those between
    free_port() and the server's bind."""
    ports, real = iter(first), embedded_redis.free_port
    return lambda: next(ports, None) or real()


# -- the embedded redis-server -------------------------------------------------------------------------


def test_embedded_redis_never_takes_another_redis_on_its_port_for_its_own(monkeypatch, redis_server):
    monkeypatch.setattr(embedded_redis, "free_port", _ports_then_free(redis_server.port))
    embedded = EmbeddedRedis()
    try:
        embedded.start()
        with redis.Redis.from_url(embedded.url) as client:
            answering = int(client.info("server")["process_id"])
        assert embedded.proc.poll() is None, "the embedded redis-server exited: the run talks to someone else's"
        assert answering == embedded.proc.pid and embedded.port != redis_server.port
    finally:
        embedded.stop()


def test_embedded_redis_starts_on_another_port_when_its_port_was_taken(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(embedded_redis, "free_port", _ports_then_free(taken.getsockname()[1]))
        embedded = EmbeddedRedis()
        try:
            embedded.start()
            assert embedded.port != taken.getsockname()[1] and embedded_redis.reachable(embedded.url)
        finally:
            embedded.stop()


def test_embedded_redis_that_exits_says_why_and_leaves_no_directory(monkeypatch, tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR (Redis 7.0.15) *** Bad directive' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(embedded_redis, "find_redis_server", lambda: str(fake))
    embedded = EmbeddedRedis()
    try:
        with pytest.raises(RuntimeError, match="FATAL CONFIG FILE ERROR"):
            embedded.start(timeout=5)
        assert not os.path.exists(embedded.dir), f"left {embedded.dir} behind"
    finally:
        embedded.stop()


def test_embedded_redis_binary_that_cannot_run_is_a_user_error_and_leaves_no_directory(monkeypatch, tmp_path):
    broken = tmp_path / "redis-server"  # executable, but no program: a truncated download, another architecture
    broken.write_bytes(b"\x7fELF\x02\x01\x01garbage")
    broken.chmod(0o755)
    monkeypatch.setattr(embedded_redis, "find_redis_server", lambda: str(broken))
    embedded = EmbeddedRedis()
    try:
        with pytest.raises(UserError, match=str(broken)):
            embedded.start(timeout=5)
        assert not os.path.exists(embedded.dir), f"left {embedded.dir} behind"
    finally:
        embedded.stop()


def test_embedded_redis_without_a_temporary_directory_is_a_user_error(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/hydravision-redis-x")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(UserError, match="No space left on device.*TMPDIR.*redis.url"):
        EmbeddedRedis()


def test_embedded_redis_start_interrupted_leaves_no_process(monkeypatch):
    def interrupted(url: str, timeout: float = 1.0) -> bool:
        raise KeyboardInterrupt  # Ctrl-C while the start waits (App's handler raises it during start)

    monkeypatch.setattr(embedded_redis, "reachable", interrupted)
    embedded = EmbeddedRedis()
    try:
        with pytest.raises(KeyboardInterrupt):
            embedded.start()
        assert embedded.proc is not None and _gone(embedded.proc.pid), "redis-server still runs after the start failed"
        assert not os.path.exists(embedded.dir)
    finally:
        embedded.stop()


def test_embedded_redis_start_closes_its_copy_of_the_log_file():
    embedded = EmbeddedRedis()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            embedded.start()
        assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    finally:
        embedded.stop()


# -- the reaper ------------------------------------------------------------------------------------------


def test_reap_stops_what_a_known_process_started_after_the_last_look():
    """The raylet starts a worker between the reaper's polls, then the run dies: the worker is still the
    raylet's child when the reaper acts."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "sys.stdin.readline()\n"
        f"child = subprocess.Popen({SLEEPER!r})\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        me = psutil.Process(os.getpid())
        seen = {pid: v for pid, v in reaper._descendants(me).items() if pid == parent.pid}  # the last poll
        assert list(seen) == [parent.pid]
        parent.stdin.write("go\n")
        parent.stdin.flush()
        child_pid = int(parent.stdout.readline())
        reaper.reap(seen, grace_s=1.0)
        assert _gone(parent.pid)
        assert _gone(child_pid), "the process started after the reaper's last look outlives the run"
    finally:
        parent.kill()
        parent.wait(5)
        if child_pid:
            _kill(child_pid)


def test_reap_stops_a_descendant_after_the_wall_clock_was_stepped(monkeypatch):
    """NTP steps the clock of a long-running service: psutil's wall-clock create time moves with it (its boot
    time is read from /proc/stat each time), so it no longer tells the run's own process from a reused pid."""
    child = subprocess.Popen(SLEEPER)
    try:
        me = psutil.Process(os.getpid())
        seen = {pid: v for pid, v in reaper._descendants(me).items() if pid == child.pid}
        boot_time = psutil._pslinux.boot_time
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot_time() + 1.0)  # the clock went 1 s ahead
        assert reaper.reap(seen, grace_s=1.0) == 1
        assert child.wait(2) is not None
    finally:
        child.kill()
        child.wait(5)


def test_reap_spares_a_process_that_reused_a_pid():
    """Normal-path guard: a pid the reaper saw, now a different process, is left alone."""
    child = subprocess.Popen(SLEEPER)
    try:
        me = psutil.Process(os.getpid())
        seen = {pid: v for pid, v in reaper._descendants(me).items() if pid == child.pid}
        child.kill()
        child.wait(5)
        # Which process gets the pid next cannot be chosen: the check is the reaper's, on a live stand-in.
        # Create times count clock ticks (10 ms): the stand-in starts ticks later than the child did.
        time.sleep(0.05)
        stand_in = subprocess.Popen(SLEEPER)
        try:
            fake = {stand_in.pid: seen[child.pid]}
            assert reaper.reap(fake, grace_s=0.5) == 0 and stand_in.poll() is None
        finally:
            stand_in.kill()
            stand_in.wait(5)
    finally:
        child.kill()
        child.wait(5)


RUN_WITH_REAPER = (
    "import subprocess, sys, time\n"
    "from pipeline.reaper import Reaper\n"
    "reaper = Reaper.start()\n"
    f"child = subprocess.Popen({SLEEPER!r})\n"
    "print(reaper.proc.pid, child.pid, flush=True)\n"
    "if sys.stdin.readline() == 'release\\n':\n"
    "    reaper.release()\n"
    "    print(reaper.proc.returncode, flush=True)\n"
    "time.sleep(60)\n")


def _run_with_reaper() -> tuple[subprocess.Popen, int, int]:
    run = subprocess.Popen([sys.executable, "-c", RUN_WITH_REAPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, cwd=Path(reaper.__file__).parent.parent)
    reaper_pid, child_pid = map(int, run.stdout.readline().split())
    return run, reaper_pid, child_pid


def test_reaper_stops_the_runs_processes_after_sigkill_and_ends():
    """Normal-path guard (the whole service: tests/test_lifecycle.py): the reaper as a process, SIGKILL."""
    run, reaper_pid, child_pid = _run_with_reaper()
    try:
        # The reaper notes the child at its polls (every POLL_S, the first one POLL_S after its start-up): it
        # runs three poll periods before the SIGKILL
        time.sleep(3 * reaper.POLL_S)
        run.kill()
        run.wait(5)
        # The pipe closes with the run: the reaper acts at once. (That it ends afterwards, after up to GRACE_S
        # where no init reaps the orphans, is tests/test_lifecycle.py's.)
        assert _gone(child_pid, 1.0), "the run's child outlived the run"
    finally:
        run.kill()
        run.wait(5)
        _kill(child_pid)
        _kill(reaper_pid)


def test_released_reaper_ends_and_kills_nothing():
    """Normal-path guard: a clean stop leaves no reaper, and what still runs is not its to stop."""
    run, reaper_pid, child_pid = _run_with_reaper()
    try:
        run.stdin.write("release\n")
        run.stdin.flush()
        assert run.stdout.readline().strip() == "0"
        assert _gone(reaper_pid, 0.1) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
    finally:
        run.kill()
        run.wait(5)
        _kill(child_pid)
        _kill(reaper_pid)


# -- log records -----------------------------------------------------------------------------------------


def test_json_record_keeps_its_stack():
    try:
        raise ValueError("bad ✓ value\nsecond line")
    except ValueError:
        exc = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom é\nnext", (), exc,
                               sinfo="Stack (most recent call last):\n  File \"x.py\", line 1, in f")
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "boom é\nnext" and "bad ✓ value\nsecond line" in out["exc"]
    assert out.get("stack", "").startswith("Stack (most recent call last)"), out


@pytest.fixture
def worker_json_lines(capsys):
    """json_worker_logs() on Ray's dispatcher (its handlers put back afterwards); emits a batch, returns the
    records printed."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    saved = list(dispatcher.handlers)
    try:
        assert json_worker_logs()

        def emit(batch: dict) -> list[dict]:
            capsys.readouterr()
            dispatcher.emit(batch)
            return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

        yield emit
    finally:
        dispatcher.handlers = saved


def batch(*lines: str, is_err: bool = True, pid: object = 4242) -> dict:
    return {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": pid, "job": "01000000", "is_err": is_err,
            "lines": list(lines), "actor_name": "StreamActor" if pid != "raylet" else "", "task_name": ""}


def test_worker_lines_keep_their_level_in_each_format(worker_json_lines):
    records = worker_json_lines(batch(
        "2026-12-06 06:12:41,123 INFO workers.stream: camera lobby up",  # StreamActor's own logging
        "2026-12-06 06:12:41,123\tERROR worker.py:912 -- Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED')",
        "[2026-12-06 06:12:41,123 E 4242 4250] core_worker.cc:612: Failed to register worker to Raylet",
        "[2026-12-06 06:12:41,124 I 4242 4250] core_worker.cc:300: Constructing CoreWorker",
        "Traceback (most recent call last):"))
    assert [r["level"] for r in records] == ["info", "error", "error", "info", "warning"]


def test_raylet_info_message_loses_its_marker(worker_json_lines):
    records = worker_json_lines(batch(
        "[2026-12-06 06:12:41,123 I 77 77] local_object_manager.cc:490: :info_message:Spilled 1024 MiB, 12 objects",
        is_err=False, pid="raylet"))
    assert [r["msg"] for r in records] == ["Spilled 1024 MiB, 12 objects"]
    assert records[0]["logger"] == "ray.worker.raylet" and records[0]["level"] == "info"


def test_worker_lines_are_printed_once_after_ray_was_started_again(worker_json_lines):
    assert json_worker_logs()  # a second App in one process: ray.init, ray.shutdown, ray.init
    records = worker_json_lines(batch("hello", is_err=False))
    assert [r["msg"] for r in records] == ["hello"]


def test_worker_line_with_non_ascii_and_credentials(worker_json_lines):
    """Normal-path guard: text passes whole, credentials do not."""
    records = worker_json_lines(batch("caméra ✓ rtsp://admin:s3cret@cam/x failed", is_err=False))
    assert records[0]["msg"] == "caméra ✓ rtsp://***@cam/x failed" and records[0]["level"] == "info"


def test_releasing_a_reaper_that_already_ended_closes_its_pipe():
    """release() returned at once when the watcher had ended, leaving this process's end of its stdin open
    (a file descriptor and a ResourceWarning per App start)."""
    r = reaper.Reaper.start()
    r.proc.kill()
    r.proc.wait(10)
    r.release()
    assert r.proc.stdin.closed
