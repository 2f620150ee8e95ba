"""usable_cores: the cores a process in a container may really use, what model threads are sized by."""

from __future__ import annotations

import os

import pytest

from workers.cores import usable_cores


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)


@pytest.mark.parametrize("cpu_max, want", [("max 100000\n", 8), ("200000 100000\n", 2), ("150000 100000\n", 2),
                                           ("50000 100000\n", 1), ("2000000 100000\n", 8), ("garbage\n", 8)])
def test_a_cpuset_and_a_cgroup_v2_quota_both_narrow_the_machines_cores(tmp_path, eight_cores, cpu_max, want):
    """A pod limited to 2 CPUs on a 64-core node ran 64 model threads (os.cpu_count()), throttled most of the time."""
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cores(tmp_path) == want


def test_a_cgroup_v1_quota_narrows_them_too(tmp_path, eight_cores):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert usable_cores(tmp_path) == 8


def test_no_cgroup_files_leave_the_cpuset(tmp_path, eight_cores):
    assert usable_cores(tmp_path / "absent") == 8


def test_the_inference_replica_sizes_its_threads_by_them(monkeypatch):
    """InferenceActor's unset threads: the usable cores split by the replicas on the node, not os.cpu_count()."""
    from workers import inference

    seen = {}

    class Service:
        def __init__(self, checkpoint, device, precision, max_batch, max_wait_ms, threads, *rest, **options):
            seen["threads"] = threads
            seen.update(options)

    monkeypatch.setattr(inference, "InferenceService", Service)
    monkeypatch.setattr(inference, "usable_cores", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    inference.InferenceActor.__ray_metadata__.modified_class("demo", per_node=2)  # the class behind ray.remote
    assert seen["threads"] == 2
    assert seen["exit_on_device_loss"] is True  # a lost CUDA context ends the replica's process, for Ray to restart
