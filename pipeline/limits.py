"""The controller's open-file limit: raised to its hard limit at start, and said once where it is reached.

A service that runs out of file descriptors (`ulimit -n 128`, hundreds of cameras or dashboard pages) could not
accept connections on its HTTP API or dashboard: asyncio (CPython's selector loop) logs every failed accept() as
an ERROR with its traceback and retries the next second, up to the listen backlog's count of them each time:
37,935 tracebacks in 36 s, none naming the limit. ``AcceptErrors`` turns them into one WARNING that does, said
again at most once a minute with a count of those held back. The camera processes say it in their cameras' error
(workers/av_source.py: classify; ``workers/`` may not import this module).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message (selector_events._accept_connection)
# asyncio's retry of the accepts, due a second after each failed one; fails where the server stopped meanwhile
RETRY_FAILED = "Exception in callback BaseSelectorEventLoop._start_serving("
SAY_AGAIN_S = 60.0
_LADDR = re.compile(r"laddr=\('([^']*)', (\d+)")  # the listening socket, as asyncio's message shows it


def raise_open_files_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one, as servers commonly do (systemd's default soft limit of 1024 is
    for programs still on select()): the processes Ray starts from here inherit it. Said at -v, only when raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return
        log.debug("open-file limit (RLIMIT_NOFILE) raised from %d to its hard limit %d", soft, target)


def open_files_text(code: int | None) -> str | None:
    """What to tell about an OSError's errno where it is EMFILE (this process's limit) or ENFILE (the system's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if code == errno.EMFILE:
        return (f"this process (pid {os.getpid()}) has reached its open-file limit (RLIMIT_NOFILE {soft}, hard limit "
                f"{hard}): raise it where the service starts (`ulimit -n 65536` before `hydravision run`, "
                "LimitNOFILE= in a systemd unit, --ulimit nofile=65536 for docker)")
    if code == errno.ENFILE:
        return "this machine's open-file table is full (sysctl fs.file-max)"
    return None


class AcceptErrors(logging.Filter):
    """On logger "asyncio": a listening socket's failed accept() (EMFILE, ENFILE, ENOBUFS, ENOMEM) becomes one
    WARNING of this module's logger saying why, then nothing for ``SAY_AGAIN_S``; the next one tells how many were
    held back meanwhile. asyncio goes on retrying as before, so connections waiting in the backlog are answered
    once files are free again. CPython 3.11 schedules a retry for each failed accept, up to
    the backlog's 2048 a second: where the server stops, each one pending failed on its closed socket with a
    traceback of its own (7,035 at a test's stop), dropped too. Any other record passes unchanged."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()  # the API's and the dashboard's loops run in threads of their own
        self._said_at: float | None = None
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(RETRY_FAILED) and self._said_at is not None:
            return False
        if not str(record.msg).startswith(ACCEPT_FAILED):
            return True
        with self._lock:
            now = self._clock()
            if self._said_at is not None and now - self._said_at < SAY_AGAIN_S:
                self._held += 1
                return False
            held, self._held, self._said_at = self._held, 0, now
        exc = record.exc_info[1] if record.exc_info else None
        code = getattr(exc, "errno", None)
        why = open_files_text(code) or f"out of memory for sockets ({getattr(exc, 'strerror', None) or exc})"
        on = ""
        if where := _LADDR.search(record.getMessage()):
            on = f" on {f'[{where[1]}]' if ':' in where[1] else where[1]}:{where[2]}"
        more = f"; {held} more held back since it was last said" if held else ""
        log.warning("cannot accept connections%s: %s; they wait in the backlog meanwhile (said again at most once "
                    "a minute%s)", on, why, more)
        return False


_accept_errors = AcceptErrors()


def quiet_accept_errors() -> None:
    """Installs ``AcceptErrors`` on asyncio's logger (once), where a server of this process is made."""
    logger = logging.getLogger("asyncio")
    if _accept_errors not in logger.filters:
        logger.addFilter(_accept_errors)
