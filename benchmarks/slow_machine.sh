#!/usr/bin/env bash
# Runs a command as on a machine with a third of this one's CPU (issue 18, item 5: tests that size themselves
# to the machine must pass on a machine 3x slower). Needs root and the cgroup v1 cpu controller: the command
# and everything it starts (Ray, redis-server, the RTSP server) share a CFS quota of 2/3 of one CPU per
# 100 ms, which on 2 cores is a third of the compute. The quota comes in bursts (a process runs at full speed
# until the period's share is spent, then waits), so short timings see less of the slowdown than long ones.
#   sudo benchmarks/slow_machine.sh .venv/bin/python -m pytest -q
set -euo pipefail
group=/sys/fs/cgroup/cpu/hydravision-slow
[ -d /sys/fs/cgroup/cpu ] || { echo "no cgroup v1 cpu controller at /sys/fs/cgroup/cpu" >&2; exit 2; }
mkdir -p "$group"
echo 100000 > "$group/cpu.cfs_period_us"
echo "${HV_SLOW_QUOTA_US:-66667}" > "$group/cpu.cfs_quota_us"
echo $$ > "$group/cgroup.procs"
exec "$@"
