"""Ties every process `hydravision run` starts to the life of the run, also when it is killed with SIGKILL.

A clean stop shuts Ray and the embedded Redis down itself. A SIGKILL (the OOM killer, `kill -9`, a crashed
interpreter) runs no handler: Ray's GCS and raylet notice within seconds, but its agents linger about a
minute and an embedded redis-server would answer forever. So `App.start()` first starts this reaper, a
small process in its own session that watches the run: every half second it notes the run's descendants
(redis-server, Ray's GCS, raylet, workers, agents), and once the run is gone (the pipe it holds closes,
or its process disappears) it sends them SIGTERM, then SIGKILL to those still alive 3 s later. What the run
started after the watcher's last look (or before its first: a run killed in its first moments) was no longer
its descendant by then (reparented): every process the run starts inherits a token in ``HYDRAVISION_RUN``
(``/proc/PID/environ``), and those holding this run's token go too; a twin run's have a token of their own.
(Ray's agents overwrite their environment with their title: they are found as the raylet's children.)

Written by hand: `prctl(PR_SET_PDEATHSIG)` reaches only direct children (not Ray's workers and agents,
whose parent is the raylet), and nothing in Ray ties a local cluster to its driver's life.
Under systemd (KillMode=control-group, the default) or as a container's main process, the service
manager does the same job; the reaper is for everywhere else.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys

import psutil

POLL_S = 0.5
GRACE_S = 3.0
_RELEASE = b"release\n"
RUN_ENV = "HYDRAVISION_RUN"  # the run's token, inherited by every process it starts


class Reaper:
    """The run's side: start the watcher, and ``release()`` it after a clean shutdown."""

    def __init__(self, proc: subprocess.Popen, token: str = "") -> None:
        self.proc, self.token = proc, token

    @classmethod
    def start(cls) -> "Reaper":
        # From the folder that holds this package: `-m` looks in the working directory first, where a package of
        # the user's own named pipeline was run instead (or none was found: no reaper)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.reaper", str(os.getpid()), token], cwd=root,
                                stdin=subprocess.PIPE, start_new_session=True)  # Ctrl-C reaches the run, not it
        os.environ[RUN_ENV] = token  # after the watcher's start: from here on, what the run starts carries it
        return cls(proc, token)

    def release(self, timeout: float = 5.0) -> None:
        """Everything was shut down cleanly: the watcher exits without killing anything."""
        assert self.proc.stdin is not None
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(_RELEASE)
                self.proc.stdin.close()
                self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        finally:  # also when the watcher was gone already: the pipe is this process's file either way
            try:
                self.proc.stdin.close()
            except OSError:  # the unsent release line, into a pipe nobody reads
                pass
            if os.environ.get(RUN_ENV) == self.token:  # what this process starts later is no released run's
                del os.environ[RUN_ENV]


def _descendants(root: psutil.Process) -> dict[int, psutil.Process]:
    """pid -> every process below root. A psutil.Process tells a reused pid apart by its start time counted
    from boot; the wall-clock create_time() is not used for that: it moves when NTP steps the clock."""
    me = os.getpid()
    return {p.pid: p for p in root.children(recursive=True) if p.pid != me}


def _alive(procs: dict[int, psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _marked(token: str) -> dict[int, psutil.Process]:
    """pid -> every process that carries the run's token in its environment, reparented ones included."""
    me, out = os.getpid(), {}
    for p in psutil.process_iter():
        try:
            if p.pid != me and p.environ().get(RUN_ENV) == token:
                out[p.pid] = p
        except psutil.Error:  # another user's, or ended meanwhile
            continue
    return out


def reap(pids: dict[int, psutil.Process], grace_s: float = GRACE_S) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``; returns how many were still running. What the known ones
    started since the last poll (a raylet's new worker) is still their child: it is found first and goes too."""
    known = {p.pid: p for p in _alive(pids)}
    for p in list(known.values()):
        try:
            known.update(_descendants(p))
        except psutil.Error:
            continue
    procs = _alive(known)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def watch(parent_pid: int, token: str = "") -> int:
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return _reap_marked(parent_pid, token)
    seen: dict[int, psutil.Process] = {}  # every descendant noticed, pruned of those that ended
    stdin = sys.stdin.buffer
    for tick in range(sys.maxsize):
        # A look before each wait, not after: the run starts its redis-server as soon as this watcher is started,
        # and a run killed within the first wait left that server (its own session, no tie to us) running.
        if not parent.is_running():
            break
        try:
            if tick % 20 == 0:  # a long-running service restarts workers: forget the pids that are gone
                seen = {p.pid: p for p in _alive(seen)}
            seen.update(_descendants(parent))
        except psutil.Error:
            break
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready:
            line = stdin.readline()
            if line == _RELEASE:
                return 0
            if not line:  # the pipe closed without a release: the run died
                break
    return _reap_marked(parent_pid, token, seen)


def _reap_marked(parent_pid: int, token: str, seen: dict[int, psutil.Process] | None = None) -> int:
    """Stops what the run left: the descendants seen, and every process holding its token."""
    killed = reap({**(seen or {}), **(_marked(token) if token else {})})
    if killed:
        print(f"hydravision reaper: the run (pid {parent_pid}) died; stopped {killed} process(es) it had started",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_pid, run_token = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "")
    # Already reparented: the run died before this started, and its pid may be another process's by now (what it
    # started is told by its token alone)
    sys.exit(watch(run_pid, run_token) if os.getppid() == run_pid else _reap_marked(run_pid, run_token))
