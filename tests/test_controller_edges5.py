"""The controller at its edges (fifth round): camera processes that fit the Ray cluster one by one but not all
together, and a camera added again while Ray still holds the name of its killed process. Without Ray, cameras or
models: the App with stand-ins for what it calls (as tests/test_controller_edges3.py does)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from pipeline import app as app_module
from pipeline import cluster
from pipeline.app import CameraHandle
from pipeline.config import RayConfig, parse_config
from pipeline.errors import UserError
from pipeline.live_control import LiveControl
from pipeline.placement import Node, stream_options
from test_controller_edges3 import Names, Process, answer, service
from workers.settings import CameraConfig

NODES = [{"NodeID": f"n{i}" * 14, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True,
          "Resources": {"CPU": 2.0, "memory": 8e9}} for i in (1, 2)]  # 4 CPUs in all


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", answer)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))


def start_on_cluster(monkeypatch, cameras: int) -> tuple[list[str], list[list[str]]]:
    """Starts ``cameras`` cameras (ray.stream_cpus 1 each, a process each) and two replicas (ray.inference_cpus 1)
    on two 2-CPU nodes; the cameras' start never ends. What was said, and what had been said when it waited."""
    said: list[str] = []
    config = parse_config({"cameras": [{"id": f"c{i}", "url": "synthetic://street"} for i in range(cameras)],
                           "ray": {"address": "10.0.0.1:6380", "stream_cpus": 1, "inference_cpus": 1,
                                   "cameras_per_process": 1},
                           "redis": {"url": "redis://10.0.0.9:6379/0"}, "model": {"device": "cpu"},
                           "inference": {"replicas": 2}})
    app = app_module.App(config, say=said.append)
    monkeypatch.setattr(ray, "nodes", lambda: NODES)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    heads = {"p": ["x"]}
    monkeypatch.setattr(app_module.App, "check_model", lambda self: {"input_size": [256, 448], "heads": heads})
    monkeypatch.setattr(app_module.App, "resolve_redis", lambda self: "redis://10.0.0.9:6379/0")
    monkeypatch.setattr(app_module.App, "start_ray", lambda self: None)
    monkeypatch.setattr(app_module, "Reaper", SimpleNamespace(start=lambda: SimpleNamespace(release=lambda: None)))
    monkeypatch.setattr(app_module, "publisher_for", lambda settings, name: SimpleNamespace(start=lambda: None))
    actor = SimpleNamespace(info=SimpleNamespace(remote=lambda: "info"), ping=SimpleNamespace(remote=lambda: "ping"),
                            start=SimpleNamespace(remote=lambda camera_id: "started"))
    monkeypatch.setattr(cluster.Placement, "spawn", lambda self, actor_class, options, *args: actor)
    monkeypatch.setattr(cluster.Placement, "checkpoint_arg", lambda self: "model.safetensors")  # no ray.put
    monkeypatch.setattr(cluster.Placement, "ready", lambda self, ref, what:  # the model's info; the replicas' pids
                        {"input_size": [256, 448], "heads": heads, "threads": 1} if ref == "info" else [1, 2])
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    waited: list[list[str]] = []

    def get(ref, timeout=None):  # where _started waits for the cameras: as long as its budget, then this
        waited.append(list(said))
        raise ray.exceptions.GetTimeoutError()

    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(UserError, match="did not start within"):
        app.start()
    return said, waited


def test_camera_processes_that_fit_alone_but_not_together_are_announced_before_the_wait(monkeypatch):
    """3 cameras of 1 CPU each and 2 replicas of 1 CPU on two 2-CPU nodes: each process fits a node
    (check_placeable looked at one at a time), all together need 5 of 4 CPUs. The start waited 60 + 5 x 3 s
    for the last camera without a word, then failed."""
    said, waited = start_on_cluster(monkeypatch, 3)
    assert waited, "the start never waited for the cameras"
    assert any("Waiting up to 75 s" in line and "3 camera(s)" in line and "CPU=5" in line and "CPU=4" in line
               for line in waited[0]), waited[0]


def test_camera_processes_that_fit_together_start_without_a_warning(monkeypatch):
    """Guard: 2 cameras and 2 replicas of 1 CPU on 4 CPUs fit; nothing is said about a wait."""
    said, waited = start_on_cluster(monkeypatch, 2)
    assert waited and not any("Waiting up to" in line for line in said), said


def test_custom_resources_that_fit_one_camera_but_not_two_are_short_together():
    """Two cameras pinned to resource cam_a (1 each) where the only node offers cam_a: 1: each fits, both never."""
    from pipeline.placement import short_together  # here: the other tests run on the code before it too

    nodes = [Node("n" * 56, "10.0.0.1", {"CPU": 8, "cam_a": 1})]
    pinned = [stream_options(RayConfig(), CameraConfig(id=c, url="synthetic://street",
                                                       placement={"resources": {"cam_a": 1}})) for c in "ab"]
    assert short_together(pinned[:1], nodes) == {}
    assert short_together(pinned, nodes) == {"cam_a": (2.0, 1.0)}


class SlowNames(Names):
    """Ray releasing a killed actor's name only when the test says so (a busy GCS, a node slow to answer)."""

    def kill(self, actor, no_restart=True):
        actor.killed.set()

    def release(self):
        self.held = {name: p for name, p in self.held.items() if not p.killed.is_set()}


def test_a_camera_added_again_while_ray_still_holds_its_old_process_name_starts_under_another(monkeypatch,
                                                                                              fake_ray):
    """Camera a removed: its process was killed, and the removal waited for Ray to release the name hv-camera-a,
    but only 10 s. Added again while Ray still held it, the add was refused 503 "actor hv-camera-a already exists in
    Ray namespace ...: another pipeline with Redis prefix 'hv' runs on this cluster": the service's own old
    process, blamed on a pipeline that does not exist. It starts under a free name; once Ray released the old one,
    a later process gets it back."""
    said: list[str] = []
    app = service(monkeypatch, said)
    names = SlowNames(monkeypatch, app.config)
    app.placement = names.placement
    monkeypatch.setattr(app_module.App, "_wait_gone",
                        lambda self, handle: LiveControl._wait_gone(self, handle, timeout_s=0.2))
    old = names.held["hv-camera-a"] = Process("hv-camera-a", pid=1)
    app.cameras["a"] = CameraHandle("a", CameraConfig(id="a", url="synthetic://street"), old, "hv-camera-a")
    app.remove_camera("a", by="api:ops")
    assert old.killed.is_set() and "hv-camera-a" in names.held  # Ray has not let the name go yet
    added = app.add_camera({"id": "a", "url": "synthetic://street"}, by="api:ops")
    assert added["id"] == "a" and not any("rejected" in line for line in said), said
    assert app.cameras["a"].name == "hv-camera-a-2" and names.held["hv-camera-a-2"] is app.cameras["a"].process
    names.release()  # Ray is done with the old process now
    app.remove_camera("a", by="api:ops")
    names.release()
    app.add_camera({"id": "a", "url": "synthetic://street"}, by="api:ops")
    assert app.cameras["a"].name == "hv-camera-a", app.cameras["a"].name


def test_a_name_ray_keeps_past_the_removals_wait_is_said(monkeypatch, caplog):
    """The removal's wait for Ray to release its process's name gave up after 10 s without a word."""
    import pipeline.live_control as live_control

    monkeypatch.setattr(live_control.ray, "get_actor", lambda name, namespace=None: object())  # never released
    with caplog.at_level("WARNING", logger="pipeline.live_control"):
        LiveControl._wait_gone(SimpleNamespace(placement=None), SimpleNamespace(id="a", name="hv-camera-a"), 0.1)
    assert "Ray still holds the name hv-camera-a" in caplog.text
