"""The controller at its edges (third round): a camera added again while its old process is being removed, two
cameras of one process removed together, a restart whose stats call fails, the run loop's end. Without Ray,
cameras or models: the App with stand-ins for what it calls (as tests/test_controller_edges.py does)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import ray

from pipeline import cluster
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig


def answer(ref, timeout=None):
    """``ray.get`` of a stand-in's call: its answer, or the error it stands for."""
    if isinstance(ref, BaseException):
        raise ref
    return ref


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", answer)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))


class Process:
    """A StreamActor's handle: each method's ``.remote()`` answers at once (``ray.get`` passes it on)."""

    def __init__(self, name: str, pid: int = 4242):
        self.name, self.pid = name, pid
        self.killed = threading.Event()
        self.forgot: list[str] = []
        self.start = SimpleNamespace(remote=lambda camera_id, camera=None, inference=None, restart=False: None)
        self.wait = SimpleNamespace(remote=lambda camera_id: f"done-{camera_id}")
        self.stop = SimpleNamespace(remote=lambda camera_id, drain=True: {"camera": camera_id, "state": "stopped"})
        self.forget = SimpleNamespace(remote=lambda camera_id: self.forgot.append(camera_id) or 0)
        self.stats = SimpleNamespace(remote=lambda camera_id: {"camera": camera_id, "state": "running",
                                                               "pid": self.pid})


class Names:
    """Ray's named actors as the controller meets them: a name a live actor holds is refused (Placement.spawn's
    own translation of Ray's ValueError), and is free again once that actor is killed."""

    def __init__(self, monkeypatch, config):
        self.held: dict[str, Process] = {}
        self.placement = SimpleNamespace(config=config, namespace="hydravision-hv", cores=2, in_camera_process=False,
                                         replica_index=lambda camera, live=(): 0, spawn=self.spawn,
                                         stream_processes=lambda cams: [([c], {"name": cluster.camera_actor_name(c.id)})
                                                                         for c in cams])
        monkeypatch.setattr(ray, "kill", self.kill)
        monkeypatch.setattr(ray, "get_actor", self.get_actor)

    def spawn(self, actor_class, options, *args):
        def remote(*_args):
            if options["name"] in self.held:
                raise ValueError(f"The name {options['name']} (namespace=hydravision-hv) is already taken.")
            self.held[options["name"]] = Process(options["name"])
            return self.held[options["name"]]

        stand_in = SimpleNamespace(options=lambda **_options: SimpleNamespace(remote=remote))
        return cluster.Placement.spawn(self.placement, stand_in, options, *args)

    def kill(self, actor, no_restart=True):
        self.held = {name: p for name, p in self.held.items() if p is not actor}
        actor.killed.set()

    def get_actor(self, name, namespace=None):
        if name not in self.held:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return self.held[name]


def service(monkeypatch, said: list | None = None) -> App:
    app = App(parse_config({"cameras": []}), say=(said.append if said is not None else lambda text: None))
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.events = SimpleNamespace(published=[], publish_event=lambda m: app.events.published.append(m),
                                 remove_status=lambda camera_id: None, stats=lambda: {})
    app._retire_in_redis = lambda camera_id, next_ids: None
    app.model_heads = {"people": ["person"]}
    return app


def test_a_camera_added_again_while_the_process_named_after_it_is_removed_gets_a_process_of_its_own(
        monkeypatch, fake_ray):
    """Camera a started process hv-camera-a, b joined it, a was removed (the process stayed for b, its name with
    it). Adding a again while b's removal drained the last camera out of that process: the name was free by the
    running set's books, Ray's was not, and the add was refused 503 "actor hv-camera-a already exists in Ray
    namespace ...: another pipeline with Redis prefix 'hv' runs on this cluster"; added just after the kill, the
    new process took the name and the removal waited its 10 s for it to go."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    old = names.held["hv-camera-a"] = Process("hv-camera-a", pid=1)
    draining, drained = threading.Event(), threading.Event()

    def stop(camera_id, drain=True):  # b's drain takes a while (its in-flight frames, its final status)
        draining.set()
        assert drained.wait(30), "the test never let the drain end"
        return {"camera": camera_id, "state": "stopped"}

    old.stop = SimpleNamespace(remote=stop)
    app.cameras["b"] = CameraHandle("b", CameraConfig(id="b", url="synthetic://street"), old, "hv-camera-a",
                                    joined=True)
    removed: list = []
    remover = threading.Thread(target=lambda: removed.append(app.remove_camera("b", by="api:ops")), daemon=True)
    remover.start()
    try:
        assert draining.wait(30), "the removal never stopped b"
        added = app.add_camera({"id": "a", "url": "synthetic://street"}, by="api:ops")
    finally:
        drained.set()
        remover.join(30)
    assert added["id"] == "a" and removed and removed[0]["final"]["state"] == "stopped"
    handle = app.cameras["a"]
    assert handle.process is not old and handle.name == "hv-camera-a-2", handle.name
    assert names.held == {"hv-camera-a-2": handle.process}  # the old process is gone, the new one runs
    assert list(app.cameras) == ["a"] and not app._busy and not app._leaving


def test_two_cameras_of_one_process_removed_together_both_drain(monkeypatch, fake_ray):
    """Cameras a and b share a process and are removed at the same time (two commands). b's removal, done first,
    found no other camera of that process in the running set (a had left it) and killed the process while a
    still drained: a's stop failed, its final stats "unavailable", its tracks never ended (no track_ended)."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    process = names.held["hv-camera-a+b"] = Process("hv-camera-a+b")
    draining, drained = threading.Event(), threading.Event()

    def stop(camera_id, drain=True):
        if camera_id == "b":
            return {"camera": "b", "state": "stopped"}
        draining.set()  # a: its in-flight frames, its final status; a killed process answers as Ray does
        deadline = time.monotonic() + 30
        while not (drained.wait(0.01) or process.killed.is_set()):
            assert time.monotonic() < deadline, "the test never let the drain end"
        return ray.exceptions.ActorDiedError() if process.killed.is_set() else {"camera": "a", "state": "stopped"}

    process.stop = SimpleNamespace(remote=stop)
    for cid in "ab":
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process, "hv-camera-a+b")
    removed: list = []
    remover = threading.Thread(target=lambda: removed.append(app.remove_camera("a", by="api:ops")), daemon=True)
    remover.start()
    try:
        assert draining.wait(30), "the removal never stopped a"
        assert app.remove_camera("b", by="api:ops")["final"]["state"] == "stopped"
        assert not process.killed.is_set(), "b's removal killed the process a still drained in"
        assert process.forgot == ["b"]
    finally:
        drained.set()
        remover.join(30)
    assert removed and removed[0]["final"]["state"] == "stopped", removed
    assert process.killed.is_set() and names.held == {}  # the last one out took the process along
    assert not app.cameras and not app._busy and not app._leaving


def test_a_restart_whose_stats_call_fails_is_still_reported(monkeypatch, fake_ray):
    """Ray re-created a process of two cameras; the controller started both again, but their stats call right
    after timed out (a busy machine) or failed (a camera crashing at each start): no worker_restarted event, no
    count in the restarts metric, for a camera that had restarted (for one crashing at every start, never)."""
    said: list[str] = []
    app = service(monkeypatch, said)
    process = Process("hv-camera-a+b", pid=4242)
    process.stats_many = SimpleNamespace(remote=lambda ids, model: {
        "cameras": {cid: {"camera": cid, "state": "created", "pid": 4242} for cid in ids}, "model": None})
    process.stats = SimpleNamespace(remote=lambda camera_id: ray.exceptions.GetTimeoutError("Get timed out"))
    for cid in "ab":
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process,
                                        "hv-camera-a+b")
    stats = app.stats()
    assert [s["camera"] for s in stats] == ["a", "b"]
    restarted = [e for e in app.events.published if e["type"] == "worker_restarted"]
    assert [(e["camera"], e["worker"]) for e in restarted] == [("a", "stream"), ("b", "stream")], app.events.published
    assert app.telemetry.snapshot().restarts["stream"] == 1  # one process, as when the stats answer
    assert [h.restarts for h in app.cameras.values()] == [1, 1]
    assert [h.done for h in app.cameras.values()] == ["done-a", "done-b"]
    assert sum("crashed and was restarted" in line for line in said) == 2, said


def test_the_run_loop_asks_the_cameras_no_more_once_it_ends(monkeypatch):
    """run() asked every camera for its stats once more after its loop had ended (a stop, --duration, every file
    ended), right before shutdown() asked them for their final stats: a round trip to every process for nothing
    (one timeout per hung process at every stop), and a camera found restarted then was started just to be
    stopped."""
    app = App(parse_config({"cameras": []}), say=lambda text: None)
    ticks: list[list[dict]] = []

    def stats(timeout: float = 5.0) -> list[dict]:
        ticks.append([{"camera": "a", "state": "running", "tick": len(ticks)}])
        return ticks[-1]

    app.stats = stats
    app.finished = lambda: len(ticks) >= 2  # every source ended after two ticks
    assert app.run(interval=0.01) == ticks[-1] and len(ticks) == 2
    ticks.clear()
    app.finished = lambda: False
    assert app.run(interval=0.01, on_tick=lambda s: app.request_stop()) == ticks[-1] and len(ticks) == 1
