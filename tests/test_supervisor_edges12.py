"""The supervisor at its edges (twelfth round): an add whose Ray calls were still under way when a shutdown began,
restarts of camera processes counted in a cluster. Without Ray, cameras or models: the App with stand-ins for what
it calls (as tests/test_app_edges10.py does)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import ray

from pipeline import cluster
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from pipeline.live_control import CommandRejected
import test_concurrent_adds8 as concurrent_adds
from workers.settings import CameraConfig


class Process:
    """A StreamActor's handle; ``killed`` is set by ``ray.kill``."""

    def __init__(self, state: str = "running", pid: int = 4242):
        self.state, self.pid = state, pid
        self.killed = threading.Event()
        self.started = object()  # the ObjectRef of its start
        self.start = SimpleNamespace(remote=lambda camera_id, camera=None, inference=None, restart=False: self.started)
        self.wait = SimpleNamespace(remote=lambda camera_id: f"done-{camera_id}")
        self.stats = SimpleNamespace(remote=lambda camera_id: {"camera": camera_id, "state": "running",
                                                               "pid": self.pid})
        self.stats_many = SimpleNamespace(remote=lambda ids, model=False: {
            "cameras": {cid: {"camera": cid, "state": self.state, "pid": self.pid} for cid in ids}, "model": None})


def service(said: list | None = None) -> App:
    app = App(parse_config({"cameras": []}), say=(said.append if said is not None else lambda text: None))
    published: list[dict] = []
    app.events = SimpleNamespace(published=published, publish_event=published.append, stats=lambda: {},
                                 close=lambda timeout: None)
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    return app


def test_an_add_whose_new_process_was_created_after_the_shutdown_looked_is_undone_before_ray_stops(monkeypatch):
    """An add still inside Ray's placement calls (ray.nodes(), the named actor's creation: a slow GCS) when a
    shutdown began created its process after the shutdown had taken the list of processes being created to kill:
    it then waited up to its whole start budget for that process, the shutdown stopped Ray meanwhile (after
    COMMANDS_GRACE_S), and the add's undo that followed (ray.kill) started a new local Ray as the service exited."""
    process = Process("created")
    app = service()
    app.started_ray = True
    ray_down, looked, after_ray = threading.Event(), threading.Event(), []
    kill_creating = app._kill

    def kill(actors):  # the shutdown's first kill: the processes adds are creating, as it found them
        looked.set()
        kill_creating(actors)

    app._kill = kill
    stopper = threading.Thread(target=app.shutdown, kwargs={"timeout": 1.0}, daemon=True)

    def spawn(actor_class, options, *args):  # Ray answers only once the shutdown has begun and looked
        stopper.start()
        assert looked.wait(20), "the shutdown never looked for processes being created"
        return process

    app.placement = SimpleNamespace(namespace="hydravision-hv", cores=2, in_camera_process=False, nodes=[],
                                    replica_index=lambda camera, live=(): 0, spawn=spawn,
                                    stream_processes=lambda cams: [([c], {"name": f"hv-camera-{c.id}"}) for c in cams])
    monkeypatch.setattr(cluster, "shutdown_ray", ray_down.set)

    def ray_kill(actor, no_restart=True):
        if ray_down.is_set():
            after_ray.append("ray.kill")
        actor.killed.set()

    def get(ref, timeout=None):
        if ref is process.started:  # its process imports for a long while: it answers when killed or Ray stops
            for _ in range(1000):
                if process.killed.wait(0.01) or ray_down.is_set():
                    raise ray.exceptions.RayActorError()
            raise ray.exceptions.GetTimeoutError("Get timed out")
        return ref

    monkeypatch.setattr(ray, "kill", ray_kill)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    out: dict = {}
    adder = concurrent_adds.adding(app, "late", out)
    adder.start()
    adder.join(30)
    stopper.join(30)
    assert not adder.is_alive() and not stopper.is_alive()
    assert after_ray == [], f"Ray calls after the shutdown stopped Ray (each would start a new local Ray): {after_ray}"
    [refused] = out.values()
    assert isinstance(refused, CommandRejected) and refused.status == 503 and "shutting down" in refused.reason, out
    assert process.killed.is_set() and ray_down.is_set()
    assert not app.cameras and not app._busy and not app._joins


def test_camera_processes_restarted_on_two_nodes_with_the_same_pid_count_two_restarts(monkeypatch):
    """A node died and Ray re-created its two camera processes on two other nodes (containers of one image number
    their processes alike): both came back as pid 310. The restarts metric counted one (a restart was told by its
    pid alone, the cameras of one process restart together), though two processes had crashed."""
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    app = service()
    for cid, name in (("a", "hv-camera-a"), ("b", "hv-camera-b")):
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), Process("created", 310),
                                        name)
    rows = app.stats()
    assert [e["camera"] for e in app.events.published if e["type"] == "worker_restarted"] == ["a", "b"]
    assert [r["restarts"] for r in rows] == [1, 1]
    assert app.telemetry.snapshot().restarts["stream"] == 2
    # the cameras of one process still count one restart of it
    shared = Process("created", 311)
    for cid in "cd":
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), shared, "hv-camera-c+d")
    app.cameras["a"].process.state = app.cameras["b"].process.state = "running"
    app.stats()
    assert app.telemetry.snapshot().restarts["stream"] == 3
