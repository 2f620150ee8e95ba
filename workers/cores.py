"""How many CPU cores this process may really use: what inference threads and replica counts are sized by.

``os.cpu_count()`` counts the machine's cores, and a container is usually given fewer: a cpuset (`docker
--cpuset-cpus`, taskset) narrows the cores it may run on, a CPU quota (`docker --cpus`, a Kubernetes CPU
limit) the time it may use. Sized by the machine, a pod limited to 4 CPUs on a 64-core node ran 64 model
threads, which the kernel's CFS throttling stalls for most of each period. Written by hand (a few lines):
Python 3.13's ``os.process_cpu_count()`` reads the cpuset only, and Ray's own count is a private API.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2's cpu.max, or v1's cfs quota), None when unlimited."""
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1
        limit = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 or period <= 0 else limit / period
    except (OSError, ValueError):
        return None


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota (rounded up); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _quota(cgroup)
    if quota is not None and quota > 0:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
