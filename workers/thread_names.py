"""The calling thread's name at the OS level, so a process's CPU can be told apart by thread: `top -H`,
`ps -L -o comm` and /proc/<pid>/task/*/comm show it (the benchmarks read it, see bench_pipeline's CPU by
thread). Python sets only its own name before 3.14; Linux keeps 15 bytes. Elsewhere it does nothing."""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15  # prctl(2)
_libc = None


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
