"""The calling thread as the OS sees it: its name and its scheduling policy.

Names: `top -H`, `ps -L -o comm` and /proc/<pid>/task/*/comm show them (the benchmarks read them, see
bench_pipeline's CPU by thread). Python sets only its own name before 3.14; Linux keeps 15 bytes.

Policy: the pipeline's threads run as SCHED_BATCH, "CPU-bound, do not preempt on wakeup". A camera process
has a model thread, an event loop, a decoder per camera and a Redis writer taking turns on few cores; under
the normal policy each wakeup (a frame decoded, a reply from Redis) may preempt the model in the middle of
its call. As batch threads they wait for the running one's slice to end or its next block instead: a third
of the model thread's context switches and ~4% more frames/s with 8 file cameras on 2 cores (docs/
architecture.md, "CPU under contention", also for what it does beside another busy program). It needs no
privilege and does not touch the nice value; HYDRAVISION_SCHED_BATCH=0 keeps the normal policy. Elsewhere
than Linux both do nothing."""

from __future__ import annotations

import ctypes
import os
import sys

_PR_SET_NAME = 15  # prctl(2)
_libc = None


def worker_thread(name: str) -> None:
    """What each of the pipeline's threads calls first: named ``name`` for the OS, scheduled as a batch thread."""
    name_native_thread(name)
    batch_scheduling()


def name_native_thread(name: str) -> None:
    """Names the calling thread ``name`` (cut to 15 bytes) for the OS; never fails."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode("utf-8", "replace")[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl (another libc, a sandbox): the names are a convenience
        pass


def batch_scheduling() -> None:
    """The calling thread (and threads it starts later) as SCHED_BATCH, unless HYDRAVISION_SCHED_BATCH=0; never
    fails. On Linux pid 0 means the calling thread, not the whole process."""
    if os.environ.get("HYDRAVISION_SCHED_BATCH", "1") == "0" or not hasattr(os, "SCHED_BATCH"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:  # a seccomp profile or an RT policy we may not leave: the default policy works too
        pass
