"""Deploy and scale-out edges, round 9: the reaper (pipeline/reaper.py). Every process a test starts is stopped in
its ``finally``, also when the test fails."""
from __future__ import annotations

import io
import os
import select
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest

from pipeline import reaper
from test_lifecycle_edges import SLEEPER, _gone, _kill


def test_a_run_killed_before_the_reapers_first_look_leaves_no_server(monkeypatch):
    """App.start() starts the reaper and at once the embedded redis-server (its own session: nothing else ties it
    to the run). The reaper waited half a second on the run's pipe before it first looked at the run's children:
    a run SIGKILLed in that window (it dies here in the reaper's first wait) left the server running for ever."""
    run = subprocess.Popen([sys.executable, "-c", (  # the run: its redis-server is already up
        "import subprocess, sys, time\n"
        f"server = subprocess.Popen({SLEEPER!r}, start_new_session=True)\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    server_pid = int(run.stdout.readline())
    pipe_r, pipe_w = os.pipe()  # the reaper's stdin; the run holds the other end
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(pipe_r, "rb")))
    open_ends = [pipe_w]

    def first_wait_kills_the_run(*args):
        if open_ends:
            run.kill()
            run.wait(10)
            os.close(open_ends.pop())  # closed with the run, as the kernel does
        return select.select(*args)

    monkeypatch.setattr(reaper, "select", SimpleNamespace(select=first_wait_kills_the_run))
    try:
        assert reaper.watch(run.pid) == 0
        assert run.poll() is not None  # the run did die while the reaper waited
        assert _gone(server_pid, 5.0), "the run's redis-server outlived the run"
    finally:
        run.kill()
        run.wait(10)
        _kill(server_pid)
        for fd in open_ends:
            os.close(fd)


def test_a_reaper_whose_run_died_before_it_started_stops_nothing():
    """Guard of the look before the first wait: a watcher that starts after its run died (it is no longer the run's
    child) must not take another process that has the run's pid by now for the run and stop its children."""
    stranger = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen({SLEEPER!r})\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child_pid = int(stranger.stdout.readline())
    try:
        # stdin at its end, as the dead run's pipe is; the stranger's pid where the run's was
        watcher = subprocess.run([sys.executable, "-m", "pipeline.reaper", str(stranger.pid)], stdin=subprocess.DEVNULL,
                                 cwd=os.path.dirname(os.path.dirname(reaper.__file__)), timeout=60)
        assert watcher.returncode == 0
        assert stranger.poll() is None and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
    finally:
        stranger.kill()
        stranger.wait(10)
        _kill(child_pid)


@pytest.mark.parametrize("cuda", [None, "12.4"])
def test_a_local_gpu_this_torch_cannot_use_is_not_reserved(monkeypatch, cuda):
    """A laptop with an NVIDIA GPU and a CPU-only torch: a local Ray counts the GPU (it asks the driver, not
    torch), so the one replica reserved it and ran on the CPU anyway, and the model in the camera processes (the
    faster CPU mode) was off. A torch with CUDA keeps the GPU replica."""
    import torch

    import pipeline.cluster as cluster
    from pipeline.config import parse_config
    from pipeline.placement import Node

    gpu_laptop = Node("g" * 56, "127.0.0.1", {"CPU": 8, "GPU": 1})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [{"NodeID": gpu_laptop.id, "Alive": True,
                                                        "NodeManagerAddress": gpu_laptop.ip,
                                                        "Resources": dict(gpu_laptop.resources), "Labels": {}}])
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(torch.version, "cuda", cuda)
    said: list[str] = []
    placement = cluster.Placement(parse_config({"cameras": []}), say=said.append)
    if cuda is None:
        assert placement.replica_options["num_gpus"] == 0 and placement.in_camera_process
        assert any("no CUDA" in s for s in said)
    else:
        assert placement.replica_options["num_gpus"] == 1 and not placement.in_camera_process and not said
