"""Cameras sharing one StreamActor process (``ray.cameras_per_process``): each keeps its own pipeline,
publisher and decoder; a crash of the process restarts exactly its cameras, each resuming after its own last
frame, also one that joined it at run time; removing one leaves the others running in the same process; the
last one out takes the process along; a camera added at run time joins a process with room."""

from __future__ import annotations

import time

import psutil
import pytest
import ray

from running import RunningApp, events, messages, wait_for


def cam(id_: str, seed: int) -> dict:
    return {"id": id_, "url": f"synthetic://street?seed={seed}&fps=8&size=320x192"}


def pid_of(run: RunningApp, cid: str) -> int:
    return ray.get(run.app.cameras[cid].process.stats.remote(cid), timeout=10)["pid"]


@pytest.mark.timeout(240)
def test_cameras_sharing_a_process(ray_local, redis_server, tiny_checkpoint):
    client = redis_server.client()
    cams = [cam("a", 41), cam("b", 42), cam("c", 43)]
    with RunningApp(redis_server.url, tiny_checkpoint, cams, interval=0.3, ray={"cameras_per_process": 2}) as run:
        handles = run.app.cameras
        assert handles["a"].process is handles["b"].process and handles["c"].process is not handles["a"].process
        assert handles["a"].name == "hv-camera-a+b" and handles["c"].name == "hv-camera-c"
        wait_for(lambda: all(len(messages(client, c)) >= 8 for c in "abc"), 60, "frames from every camera")
        shared, alone = pid_of(run, "a"), pid_of(run, "c")
        assert pid_of(run, "b") == shared != alone
        # One Redis connection per camera process, its cameras' Publishers sharing it (each its own counters).
        names = [c["name"] for c in client.client_list() if c["name"].startswith("hydravision-cameras-")]
        assert sorted(names) == sorted(f"hydravision-cameras-{pid}" for pid in (shared, alone)), names
        sent = {s["camera"]: s["publisher"]["sent"] for s in run.app.stats()}
        assert all(sent[c] >= 8 for c in "abc"), sent

        # The shared process crashes: a and b restart in a new one, c does not notice.
        ray.kill(handles["a"].process, no_restart=False)
        t_kill = time.time()
        wait_for(lambda: events(client, "a", "worker_restarted") and events(client, "b", "worker_restarted"), 60,
                 "both cameras of the process restarted")
        wait_for(lambda: all([m for m in messages(client, c) if m["ts"] > t_kill + 1] for c in "ab"), 30,
                 "frames from a and b after the restart")
        assert pid_of(run, "a") == pid_of(run, "b") != shared
        assert pid_of(run, "c") == alone and not events(client, "c", "worker_restarted")
        assert run.app.telemetry.snapshot().restarts["stream"] == 1  # one process, however many cameras
        shared = pid_of(run, "a")

        # Removing a: b goes on in the same process; removing b then ends that process.
        final = run.app.remove_camera("a", by="test")["final"]
        assert final["state"] == "stopped" and final["decoder_threads"] == 0 and final["open_tracks"] == 0, final
        n_b = len(messages(client, "b"))
        wait_for(lambda: len(messages(client, "b")) > n_b + 8, 30, "frames from b after a was removed")
        assert pid_of(run, "b") == shared and psutil.pid_exists(shared)
        run.app.remove_camera("b", by="test")
        wait_for(lambda: not psutil.pid_exists(shared), 20, "the emptied process to exit")

        # A camera added at run time joins a process with room (c's): no new process.
        t_add = time.time()
        run.app.add_camera(cam("a", 41), by="test")
        assert run.app.cameras["a"].process is handles["c"].process and run.app.cameras["a"].joined
        assert pid_of(run, "a") == alone
        wait_for(lambda: len([m for m in messages(client, "a") if m["ts"] > t_add]) >= 8, 60, "frames from a added again")

        # That process crashes: c and the camera that joined it (not among its constructor's) both come back.
        ray.kill(handles["c"].process, no_restart=False)
        t_kill = time.time()

        def restarted(c: str) -> list:
            return [e for e in events(client, c, "worker_restarted") if e["ts"] > t_kill]

        wait_for(lambda: restarted("a") and restarted("c"), 60, "both cameras of the second process restarted")
        wait_for(lambda: all([m for m in messages(client, c) if m["ts"] > t_kill + 1] for c in "ac"), 30,
                 "frames from a and c after the restart")
        second = pid_of(run, "c")
        assert pid_of(run, "a") == second != alone and run.app.telemetry.snapshot().restarts["stream"] == 2

        # c leaves and d takes its place; c added again finds the process full and starts one of its own,
        # whose name the first one (still named after c) holds: it gets another.
        run.app.remove_camera("c", by="test")
        run.app.add_camera(cam("d", 44), by="test")
        assert pid_of(run, "d") == second and run.app.cameras["d"].name == "hv-camera-c"
        run.app.add_camera(cam("c", 43), by="test")
        assert run.app.cameras["c"].name == "hv-camera-c-2" and pid_of(run, "c") != second
        t_back = time.time()
        wait_for(lambda: all([m for m in messages(client, c) if m["ts"] > t_back] for c in "acd"), 60,
                 "frames from a, c and d")
    a_again = [m["frame"] for m in messages(client, "a") if m["ts"] > t_add]
    assert a_again == sorted(set(a_again)), "a: a frame was published twice or out of order across the restart"
    frames = [m["frame"] for m in messages(client, "b")]
    assert frames == sorted(set(frames)), "b: a frame was published twice or out of order"
