"""Placement and the controller's watch at their edges (place10): Ray's node list that a slow, restarting or failing
GCS does not answer, and a removal that is not the end of a camera's source. Without Ray, cameras or models: fakes
for Ray's calls, and the App with the stand-ins of tests/test_controller_edges3.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import ray

import pipeline.cluster as cluster
from pipeline.app import App, CameraHandle
from pipeline.cluster import NodeWatch
from pipeline.config import parse_config
from pipeline.placement import Node
from running import wait_for
from test_controller_edges3 import Names, Process, answer
from workers.settings import CameraConfig

A, B = "a" * 56, "b" * 56


class Ref:
    """An ObjectRef that is ready at once (the fake ray.get returns its value)."""

    def __init__(self, value):
        self.value = value


def entry(node_id: str) -> dict:
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 1}}


def watched(monkeypatch, nodes) -> tuple[NodeWatch, list[str], list[dict]]:
    """A NodeWatch over nodes A and B with no actors; ``ray.nodes`` is ``nodes``. What it said and published."""
    said: list[str] = []
    published: list[dict] = []
    monkeypatch.setattr(cluster.ray, "nodes", nodes)
    monkeypatch.setattr(cluster.ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    app = SimpleNamespace(_lock=threading.RLock(), cameras={}, inference=[], say=said.append,
                          events=SimpleNamespace(publish_event=published.append))
    return NodeWatch(app, [Node(A, "10.0.0.1", {"CPU": 1}), Node(B, "10.0.0.2", {"CPU": 1})]), said, published


def test_a_node_list_the_gcs_does_not_answer_holds_no_status_tick(monkeypatch):
    """ray.nodes() has no timeout of ours (Ray's own is ~60 s): a slow or restarting GCS held every status tick, and
    /metrics, /healthz and the status hash with it, for as long at each poll. The tick waits a second for it, asks
    no second time while it is out, says so once, and reports the node lost once the answer comes."""
    gate = threading.Event()
    asked: list[float] = []

    def nodes() -> list[dict]:
        asked.append(time.monotonic())
        gate.wait(10)  # a GCS that answers late, without node B
        return [entry(A)]

    nw, said, published = watched(monkeypatch, nodes)
    try:
        for _ in range(3):  # three polls while the GCS does not answer
            nw._last_poll = 0.0
            started = time.monotonic()
            nw.tick()
            assert time.monotonic() - started < 6, "the tick waited for the GCS"
        assert len(asked) == 1, "a second question while the first was out"
        assert [s for s in said if "node list" in s] == [said[0]] and "has not answered" in said[0], said
        assert not published and set(nw.nodes) == {A, B}
    finally:
        gate.set()

    def polled() -> bool:
        nw._last_poll = 0.0
        nw.tick()
        return bool(published)

    wait_for(polled, 20, "node B's loss to be reported", poll=0.05)
    assert [(e["type"], e["node"]) for e in published] == [("node_lost", B)], published
    assert any("answers again" in s for s in said), said


@pytest.mark.parametrize("error", [ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError])
def test_a_node_list_that_fails_does_not_end_the_service(monkeypatch, error):
    """The GCS unreachable: ray.nodes() raised out of the status tick, out of App.run, and the whole service ended
    with a traceback. The failure is said once; the next answer is used. (A TimeoutError it raises, on Python 3.11
    the class a question not answered yet raises too, left the question asked for good: nothing reported again.)"""
    failing = [True]

    def nodes() -> list[dict]:
        if failing[0]:
            raise error("the GCS is unreachable")
        return [entry(A)]

    nw, said, published = watched(monkeypatch, nodes)
    for _ in range(2):
        nw._last_poll = 0.0
        nw.tick()
    assert len([s for s in said if "node list" in s]) == 1 and "GCS is unreachable" in said[0], said
    failing[0] = False
    nw._last_poll = 0.0
    nw.tick()
    assert [(e["type"], e["node"]) for e in published] == [("node_lost", B)], published


def test_removing_the_live_camera_beside_an_ended_file_camera_does_not_end_the_service(monkeypatch):
    """A config's file camera had ended; the service ran on for its live camera. Removing that one left only ended
    cameras in the set, and the control loop took that for the end of the last source: the service stopped, its
    API with it (removing every camera keeps it running). A camera added then that ends still ends it."""
    app = App(parse_config({"cameras": [{"id": "file", "url": "synthetic://street"},
                                        {"id": "live", "url": "synthetic://street"}]}), say=lambda text: None)
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.events = SimpleNamespace(publish_event=lambda m: None, remove_status=lambda camera_id: None, stats=lambda: {})
    app._retire_in_redis = lambda camera_id, next_ids: None
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    ended: set[str] = {"done-file"}  # the ``done`` refs whose camera's source has ended
    monkeypatch.setattr(ray, "get", answer)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (
        [r for r in refs if r in ended], [r for r in refs if r not in ended]))
    for cid in ("file", "live"):
        process = names.held[f"hv-camera-{cid}"] = Process(f"hv-camera-{cid}")
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process, process.name,
                                        done=f"done-{cid}")
    assert not app.finished()  # the live camera runs on
    app.remove_camera("live", by="api:ops")
    assert list(app.cameras) == ["file"]
    assert not app.finished() and not app.finished(), "removing the live camera ended the service"
    app.add_camera({"id": "clip", "url": "synthetic://street"}, by="api:ops")  # its ``done`` is "done-clip"
    assert not app.finished()
    ended.add("done-clip")
    assert app.finished()


def test_a_cluster_watch_forgets_the_cameras_removed(monkeypatch):
    """Each camera ever run kept its entries in the node watch, its process's Ray handle among them: a service whose
    cameras come and go under new ids grew them for ever, and went through them at every tick."""
    nw, _, _ = watched(monkeypatch, lambda: [entry(A), entry(B)])
    monkeypatch.setattr(cluster.ray, "get", lambda ref, timeout=None: ref.value)
    for i in range(50):  # added, seen by a tick, removed
        process = SimpleNamespace(where=SimpleNamespace(remote=lambda: Ref({"node": A})))
        nw.app.cameras = {f"cam-{i}": SimpleNamespace(process=process)}
        nw.tick()
        assert nw.where == {("camera", f"cam-{i}"): A}
    nw.app.cameras = {}
    nw.tick()
    assert not (nw.where or nw._whose or nw._asked or nw.lost_from)
