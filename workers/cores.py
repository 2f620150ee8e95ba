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
SELF = Path("/proc/self/cgroup")  # this process's cgroup per hierarchy, e.g. "0::/system.slice/hv.service" (v2)


def _v2_limit(folder: Path) -> float | None:
    try:
        limit, period = (folder / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        limit = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if limit <= 0 or period <= 0 else limit / period
    except (OSError, ValueError):
        return None


def _own_paths(proc: Path) -> tuple[str, str]:
    """This process's cgroup under the v2 hierarchy and under v1's cpu controller ("/": the mount's root)."""
    v2 = v1 = "/"
    try:
        for line in proc.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if ".." in path.split("/"):  # outside its cgroup namespace's root: not under the mount
                continue
            if not controllers:
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    return v2, v1


def _chain(base: Path, path: str) -> list[Path]:
    """``base``/``path`` and each folder above it up to ``base``."""
    folder = base / path.strip("/")
    return [folder, *folder.parents[:len(folder.relative_to(base).parts)]]


def _quota(root: Path, proc: Path) -> float | None:
    """CPUs' worth of time this process may use (cgroup v2's cpu.max, or v1's cfs quota), None when unlimited: the
    lowest limit of its own cgroup and those above it. Its own is below the mount's root where the cgroup namespace
    is the host's (a systemd service with CPUQuota, `docker --cgroupns=host`): the root alone has no limit there,
    and such a service ran a model thread per core of the machine. In a container's own namespace the root is its
    cgroup (a path named but not there, as v1 Docker shows the host's, is skipped)."""
    v2, v1 = _own_paths(proc)
    limits = [_v2_limit(f) for f in _chain(root, v2)] + [_v1_limit(f) for f in _chain(root / "cpu", v1)]
    return min((q for q in limits if q is not None), default=None)


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota (rounded up); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _quota(cgroup, SELF)
    if quota is not None and quota > 0:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
