"""The controller at its edges (fourth round): a shutdown while a removal drains, a start or add whose later camera
process fails to spawn, more inference replicas than the nodes hold. Without Ray, cameras or models: the App with
stand-ins for what it calls (as tests/test_controller_edges3.py does)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import ray

from pipeline import app as app_module
from pipeline import cluster
from pipeline.admission import CommandRejected
from pipeline.app import CameraHandle
from pipeline.config import parse_config
from pipeline.errors import UserError
from test_controller_edges3 import Names, Process, answer, service
from workers.settings import CameraConfig


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", answer)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))


def test_a_shutdown_lets_a_removal_under_way_drain(monkeypatch, fake_ray):
    """Cameras a and b share a process; a's removal was draining (its in-flight frames, its final status) when the
    service shut down. shutdown() stopped b and killed the process at once: a's drain was cut, its tracks never
    ended, its removal answered "unavailable". It waits for removals under way (their camera_removed event included),
    but only until its deadline: c's removal, which never ends, does not hold the shutdown."""
    said: list[str] = []
    app = service(monkeypatch, said)
    closed, removed_before_close = threading.Event(), []

    def close(timeout):
        removed_before_close.extend(e["camera"] for e in app.events.published if e["type"] == "camera_removed")
        closed.set()

    app.events.close = close
    release = app._release

    def release_late(camera_id):  # a's removal is done; the shutdown may close the Publisher before it goes on
        if camera_id == "a":
            closed.wait(30)
        release(camera_id)

    app._release = release_late
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    shared = names.held["hv-camera-a+b"] = Process("hv-camera-a+b")
    alone = names.held["hv-camera-c"] = Process("hv-camera-c")
    draining = {"a": threading.Event(), "c": threading.Event()}

    def stop(camera_id, drain=True):
        """a's drain ends once the shutdown says it waits for it, c's never; a killed process answers as Ray does."""
        if camera_id == "b":
            return {"camera": "b", "state": "stopped"}
        process = shared if camera_id == "a" else alone
        draining[camera_id].set()
        deadline = time.monotonic() + 30
        while not process.killed.wait(0.01):
            if camera_id == "a" and any("Waiting up to" in line for line in said):
                return {"camera": "a", "state": "stopped", "open_tracks": 0}
            assert time.monotonic() < deadline, "the test never let the drain end"
        return ray.exceptions.ActorDiedError()

    shared.stop = alone.stop = SimpleNamespace(remote=stop)
    for cid, process in (("a", shared), ("b", shared), ("c", alone)):
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process, process.name)
    removed: dict = {}
    removers = [threading.Thread(target=lambda cid=cid: removed.__setitem__(cid, app.remove_camera(cid, by="api:ops")),
                                 daemon=True) for cid in "ac"]
    for remover in removers:
        remover.start()
    try:
        assert all(event.wait(30) for event in draining.values()), "the removals never stopped their cameras"
        began = time.monotonic()
        finals = app.shutdown(drain=True, timeout=2.0)
        took = time.monotonic() - began
    finally:
        alone.killed.set()  # c's drain ends (as a kill ends it) whatever happened
        for remover in removers:
            remover.join(30)
    assert [f["camera"] for f in finals] == ["b"]
    assert removed["a"]["final"]["state"] == "stopped", removed  # drained: its tracks ended, its status written
    assert any("removal of camera(s) a, c" in line for line in said), said
    assert removed_before_close == ["a"]  # its camera_removed event was sent, not dropped by a closed Publisher
    assert took < 20, took  # c's removal held it for its deadline only
    assert shared.killed.is_set() and not app._leaving


def test_a_start_whose_later_process_fails_to_spawn_kills_the_earlier_ones(monkeypatch, fake_ray):
    """Cameras a, b, c started together in three processes (the config's, at start); the third's spawn failed (its
    name held by another pipeline). The processes of a and b, already spawned and starting their cameras, were
    never killed: a program that goes on after the failed start (or a driver that stays up) kept them running. They
    are killed, and the error raised is the spawn's own, also when a kill fails (Ray unreachable)."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    names.held["hv-camera-c"] = Process("hv-camera-c")  # another pipeline's
    kills: list[str] = []

    def kill(actor, no_restart=True):
        kills.append(actor.name)
        if actor.name == "hv-camera-a":
            raise ray.exceptions.RaySystemError("the GCS is unreachable")
        names.kill(actor, no_restart)

    monkeypatch.setattr(ray, "kill", kill)
    cams = [CameraConfig(id=cid, url="synthetic://street") for cid in "abc"]
    with pytest.raises(UserError, match="actor hv-camera-c already exists"):
        app._spawn(cams)
    assert sorted(kills) == ["hv-camera-a", "hv-camera-b"], kills
    assert "hv-camera-b" not in names.held and not app._joins


def test_an_add_that_joined_a_process_and_then_failed_leaves_no_camera_running_there(monkeypatch, fake_ray):
    """A camera added at run time joined a running process (its start was sent), then the add failed (Ray's node
    list unreachable for a moment): the add answered 503, but the process went on running the camera, which the
    service no longer knew (decoding and publishing until the process ended, its id free to be added again)."""
    app = service(monkeypatch)
    app.config = parse_config({"cameras": [], "ray": {"cameras_per_process": 4}})
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    process = names.held["hv-camera-x"] = Process("hv-camera-x")
    started: list[str] = []
    process.start = SimpleNamespace(remote=lambda camera_id, camera=None, inference=None, restart=False:
                                    started.append(camera_id))
    stopped: list[str] = []
    process.stop = SimpleNamespace(remote=lambda camera_id, drain=True: stopped.append(camera_id) or {})
    app.cameras["x"] = CameraHandle("x", CameraConfig(id="x", url="synthetic://street"), process, "hv-camera-x")

    def nodes_lost(cams):
        raise ray.exceptions.RaySystemError("the GCS is unreachable")

    names.placement.stream_processes = nodes_lost
    with pytest.raises(CommandRejected, match="GCS is unreachable") as refused:
        app.add_camera({"id": "d", "url": "synthetic://street"}, by="api:ops")
    assert refused.value.status == 503
    assert started == ["d"] and stopped == ["d"] and process.forgot == ["d"]  # joined, then let go
    assert list(app.cameras) == ["x"] and not app._busy and not app._joins and not process.killed.is_set()


def test_more_replicas_than_the_nodes_hold_are_announced_before_the_wait(monkeypatch):
    """inference.replicas: 4 on a node with room for 2 (1 CPU each, 2 CPUs): the start waited the whole
    ray.placement_timeout_s (an autoscaler may add nodes) without a word, then failed."""
    said: list[str] = []
    config = parse_config({"cameras": [], "ray": {"inference_cpus": 1, "placement_timeout_s": 300},
                           "model": {"device": "cpu"}, "inference": {"replicas": 4, "in_camera_process": False}})
    app = app_module.App(config, say=said.append)
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "n1", "NodeManagerAddress": "10.0.0.5", "Alive": True,
                                                "Resources": {"CPU": 2.0, "memory": 8e9}}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(app_module.App, "check_model", lambda self: {"input_size": [256, 448], "heads": {"p": ["x"]}})
    monkeypatch.setattr(app_module.App, "resolve_redis", lambda self: "redis://10.0.0.9:6379/0")
    monkeypatch.setattr(app_module.App, "start_ray", lambda self: None)
    monkeypatch.setattr(app_module, "Reaper", SimpleNamespace(start=lambda: SimpleNamespace(release=lambda: None)))
    monkeypatch.setattr(app_module, "publisher_for", lambda settings, name: SimpleNamespace(start=lambda: None))
    replica = SimpleNamespace(info=SimpleNamespace(remote=lambda: "info"), ping=SimpleNamespace(remote=lambda: "ping"))
    monkeypatch.setattr(cluster.Placement, "spawn", lambda self, actor_class, options, *args: replica)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    waited: list[list[str]] = []

    def ready(self, ref, what):  # where the start waits; what had been said by then
        waited.append(list(said))
        raise UserError(f"{what} did not start within 300 s (ray.placement_timeout_s)")

    monkeypatch.setattr(cluster.Placement, "ready", ready)
    with pytest.raises(UserError, match="did not start within"):
        app.start()
    assert waited, "the start never waited for the replicas"
    assert any("Waiting up to 300 s" in line and "4 inference replicas" in line and "room for 2" in line
               for line in waited[0]), waited[0]
