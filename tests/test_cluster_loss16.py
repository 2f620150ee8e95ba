"""A lost Ray node and run-time placement as an operator met them (round 16), on a head and worker nodes run
natively: node_lost said Ray restarts replica 0 on the remaining nodes while the only inference node left had its
one hydravision_inference unit held by replica 1 (Ray kept replica 0 pending until a node joined, its cameras said
only "still starting"); every camera added meanwhile went to the pending replica 0 and was refused 503
(ActorUnavailableError); and docs/scaling.md said every camera reserves ray.stream_cpus where one that joins a
running process adds nothing. Ray's calls are fakes; no cluster is started."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

import pipeline.cluster as cluster
from pipeline.admission import CommandRejected
from pipeline.app import App, CameraHandle
from pipeline.cluster import Placement, inference_name
from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.placement import Node, ReplicaAssigner, inference_options
from workers.settings import CameraConfig
from test_cluster_edges14 import _get, _wait  # stand-ins for ray.get / ray.wait on Ref-like answers

HEAD, A, B = "h" * 56, "a" * 56, "b" * 56
SCALING = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()


class Ref:
    """An ObjectRef of a call to ``actor``: ready once Ray has placed the actor (``node`` set), then ``answer()``."""

    def __init__(self, actor: "Actor", answer) -> None:
        self.actor, self.answer = actor, answer

    def ready(self) -> bool:
        return self.actor.node is not None


class Actor:
    """A StreamActor / InferenceActor handle on ``node`` (None: pending in Ray). A camera's start pings its replica
    (given to the start, else to the constructor with the camera; ``replicas``: by name), as StreamActor.start
    does: a pending one fails it as Ray's did."""

    def __init__(self, node: str | None, replicas: dict[str, "Actor"], cameras=()) -> None:
        self.node, self.replicas = node, replicas
        self.inference = {cam.id: inference for cam, inference in cameras}
        self.where = SimpleNamespace(remote=lambda: Ref(self, lambda: {"node": self.node}))
        self.start = SimpleNamespace(remote=self._start)
        self.wait = SimpleNamespace(remote=lambda camera_id: Ref(self, lambda: None))

    def _start(self, camera_id, camera=None, inference=None, restart=False, **more) -> Ref:
        def answer() -> None:
            for _, name in inference or self.inference.get(camera_id, []):
                if self.replicas[name].node is None:
                    raise ray.exceptions.RayError(f"ActorUnavailableError: The actor {name} is unavailable: "
                                                  "The actor is restarting..")
        return Ref(self, answer)


@pytest.fixture
def units() -> int:
    return 1


@pytest.fixture
def service(monkeypatch, units):
    """A service on a head (CPU 2) and inference nodes A and B (CPU 1, ``units`` of hydravision_inference each):
    replica 0 on A, replica 1 on B; cameras a1 on A, b1 on B, h1 and h2 on the head, a1 and h1 served by replica 0,
    b1 and h2 by replica 1 (each camera its own process). ``lose`` kills nodes: Ray restarts a1's process on the
    head, and a replica on a node with a unit left free."""
    head = Node(HEAD, "10.0.0.1", {"CPU": 2})
    nodes = [head, *(Node(n, ip, {"CPU": 1, "hydravision_inference": units})
                     for n, ip in ((A, "10.0.0.2"), (B, "10.0.0.3")))]
    alive = {n.id: True for n in nodes}
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [
        {"NodeID": n.id, "Alive": alive[n.id], "NodeManagerAddress": n.ip, "Resources": dict(n.resources),
         "Labels": dict(n.labels)} for n in nodes])
    monkeypatch.setattr(cluster.ray, "wait", _wait)
    monkeypatch.setattr(cluster.ray, "get", _get)
    monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: {})  # totals: room enough
    config = parse_config({"cameras": [], "ray": {"address": "HEAD:6380", "stream_cpus": 0.25,
                                                   "cameras_per_process": 1}})
    said, published = [], []
    app = App(config, say=said.append)
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.events = SimpleNamespace(publish_event=published.append, remove_status=lambda camera_id: None,
                                 stats=lambda: {})
    app.model_heads = {"people": ["person"]}
    placement = Placement.__new__(Placement)  # its rules without a Ray: the snapshot it took at the start
    placement.config, placement.nodes, placement.cores, placement.namespace = config, nodes, 4, "ns"
    placement.assigner, placement.in_camera_process = ReplicaAssigner(2), False
    replicas: dict[str, Actor] = {}

    def on(node: str) -> SimpleNamespace:
        return SimpleNamespace(options=lambda **options: SimpleNamespace(
            remote=lambda *args: Actor(node, replicas, args[0] if args else ())))

    for index, node in enumerate((A, B)):
        replicas[inference_name(index)] = Placement.spawn(
            placement, on(node), {**inference_options(config.ray, None, nodes), "name": inference_name(index)})
    ids = ["a1", "b1", "h1", "h2"]
    for cid, node in zip(ids, (A, B, HEAD, HEAD)):
        cam = CameraConfig(id=cid, url="synthetic://street")
        [(_, options)] = placement.stream_processes([cam])
        replica = [("ns", inference_name(placement.replica_index(cid, ids)))]
        app.cameras[cid] = CameraHandle(cid, cam, Placement.spawn(placement, on(node), options), options["name"],
                                        replica)
    placement.spawn = lambda actor_class, options, *args: Placement.spawn(placement, on(HEAD), options, *args)
    app.inference, app.placement = list(replicas.values()), placement
    app.node_watch = placement.watch(app)
    app.node_watch.answer_s = 60.0  # ray.nodes() in its thread: answered at once, however busy the machine
    app.node_watch.learn()
    assert placement.assigner.of == {"a1": 0, "b1": 1, "h1": 0, "h2": 1}

    def lose(*lost: str) -> None:
        for node in lost:
            alive[node] = False
        app.cameras["a1"].process.node = HEAD
        left = [n for n in (A, B) if alive[n]]
        free = {n: units for n in left}
        for replica in replicas.values():  # what Ray does: the ones on a lost node move where a unit is free
            if replica.node in left:
                free[replica.node] -= 1
        for replica in replicas.values():
            if replica.node not in left:
                replica.node = next((n for n in left if free[n] > 0), None)
                if replica.node:
                    free[replica.node] -= 1
        app.node_watch._last_poll = 0.0
        app.node_watch.tick()

    return SimpleNamespace(app=app, said=said, published=published, replicas=replicas, lose=lose)


# -- 1. what waits is decided by what the nodes left have FREE ------------------------------------------------

def test_a_lost_replica_whose_only_host_left_is_full_waits_for_a_node_and_its_cameras_say_so(service):
    """Before: "inference replicas [0]; Ray restarts them on the remaining nodes" (node B has a unit in all, held by
    replica 1), and the cameras it serves, h1 on the healthy head too, said only "still starting"."""
    service.lose(A)
    assert service.replicas[inference_name(0)].node is None  # as Ray: pending until a node joins
    [line] = [s for s in service.said if "lost:" in s]
    assert line.endswith("lost: cameras ['a1'], inference replicas [0]; Ray restarts camera a1 on the remaining "
                         "nodes; inference replica 0 waits for a node with hydravision_inference=1 to join (cameras "
                         "['a1', 'h1'], which it serves, publish no frames until then)"), line
    [event] = service.published
    assert event["waiting"] == [{"inference": 0, "needs": {"resources": {"hydravision_inference": 1.0},
                                                            "labels": {}}}]
    why = "inference replica 0, which it sends its frames to, waits for a node with hydravision_inference=1 to join"
    watch = service.app.node_watch
    assert watch.waits_for("a1") == watch.waits_for("h1") == why
    assert watch.waits_for("b1") == watch.waits_for("h2") == ""


@pytest.mark.parametrize("units", [2])
def test_a_lost_replica_restarts_where_a_unit_is_left_free(service):
    """Guard: node B has two units, replica 1 holds one; replica 0 restarts there, nothing waits."""
    service.lose(A)
    assert service.replicas[inference_name(0)].node == B
    [line] = [s for s in service.said if "lost:" in s]
    assert line.endswith("inference replicas [0]; Ray restarts them on the remaining nodes"), line
    assert "waiting" not in service.published[0]
    assert service.app.node_watch.waits_for("h1") == ""


def test_cameras_sharing_a_lost_process_count_its_reservation_once(monkeypatch):
    """Guard of the count: cameras c and d share a process on node A reserving CPU 2 (1 each); the head has CPU 2
    free. Counted per camera (2 + 2), d would read as waiting; Ray restarts the process whole on the head."""
    head, node_a = Node(HEAD, "10.0.0.1", {"CPU": 2}), Node(A, "10.0.0.2", {"CPU": 2})
    alive = {HEAD: True, A: True}
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [
        {"NodeID": n.id, "Alive": alive[n.id], "NodeManagerAddress": n.ip, "Resources": dict(n.resources)}
        for n in (head, node_a)])
    monkeypatch.setattr(cluster.ray, "wait", _wait)
    monkeypatch.setattr(cluster.ray, "get", _get)
    config = parse_config({"cameras": [], "ray": {"address": "HEAD:6380", "stream_cpus": 1}})
    placement = Placement.__new__(Placement)
    placement.config, placement.nodes, placement.cores, placement.namespace = config, [head, node_a], 1, "ns"
    placement.assigner = ReplicaAssigner(1)
    cams = [CameraConfig(id=cid, url="synthetic://street") for cid in "cd"]
    [(group, options)] = placement.stream_processes(cams)
    assert len(group) == 2 and options["num_cpus"] == 2
    process = Placement.spawn(placement, SimpleNamespace(
        options=lambda **o: SimpleNamespace(remote=lambda *a: Actor(A, {}))), options)
    said: list[str] = []
    app = SimpleNamespace(_lock=threading.RLock(), cameras={c.id: SimpleNamespace(process=process,
                                                                                   name=options["name"])
                                                           for c in cams},
                          inference=[], say=said.append, events=None)
    watch = placement.watch(app)
    watch.answer_s = 60.0
    watch.learn()
    alive[A] = False
    process.node = HEAD
    watch._last_poll = 0.0
    watch.tick()
    [line] = [s for s in said if "lost:" in s]
    assert line.endswith("cameras ['c', 'd'], inference replicas none; Ray restarts them on the remaining nodes"), line


# -- 2. a camera added while a replica waits goes to one that runs --------------------------------------------

def test_a_camera_added_while_a_replica_waits_for_a_node_goes_to_a_running_one(service):
    """Before: a tie (2 cameras each) gave the new camera to replica 0, pending in Ray: its start failed and the add
    was refused 503 "its stream actor failed to start: ActorUnavailableError ... The actor is restarting..", and so
    was every add after it, replica 1 running with room."""
    service.lose(A)
    for cid in ("n1", "n2"):
        answer = service.app.add_camera({"id": cid, "url": "synthetic://street"}, by="api:ops")
        assert answer["id"] == cid
        assert service.app.cameras[cid].inference == [("ns", inference_name(1))]
    assert service.app.placement.assigner.of["h1"] == 0  # the cameras it has keep their replica


def test_a_camera_added_while_every_replica_waits_is_refused_with_what_they_wait_for(service):
    """Before: refused as "its stream actor failed to start: ActorUnavailableError: The actor ... is unavailable",
    which named neither the inference replica nor that it waits for a node."""
    service.lose(A, B)
    assert not any(r.node for r in service.replicas.values())
    with pytest.raises(CommandRejected) as info:
        service.app.add_camera({"id": "n1", "url": "synthetic://street"}, by="api:ops")
    assert info.value.status == 503
    assert info.value.reason == (
        "camera: camera n1: no inference replica runs to send its frames to: inference replica 0 waits for a node "
        "with hydravision_inference=1 to join; inference replica 1 waits for a node with hydravision_inference=1 to "
        "join (lost with their nodes). Add the camera once such a node has joined"), info.value.reason
    app = service.app
    assert "n1" not in app.cameras and not app._busy and not app._joins and "n1" not in app.placement.assigner.of


def test_the_assigner_skips_waiting_replicas_for_new_cameras_only():
    assigner = ReplicaAssigner(2)
    assert assigner.assign("a", ["a"]) == 0
    assert assigner.assign("b", ["a", "b"], {0: "hydravision_inference=1"}) == 1
    assert assigner.assign("c", ["a", "b", "c"], {0: "hydravision_inference=1"}) == 1  # not the fewest: it runs
    assert assigner.assign("a", ["a", "b", "c"], {0: "GPU=1"}) == 0  # a camera keeps its replica
    with pytest.raises(UserError, match=r"^camera d: .*inference replica 0 waits for a node with GPU=1 and "
                                        r"hydravision_inference=1 to join \(lost with its node\)"):
        ReplicaAssigner(1).assign("d", ["d"], {0: "GPU=1 and hydravision_inference=1"})


# -- 3. a camera that joins a running process reserves nothing more: said so ----------------------------------

def test_a_camera_joining_a_running_process_adds_no_reservation_and_the_docs_say_so(monkeypatch):
    """docs/scaling.md said a StreamActor reserves ray.stream_cpus "times its cameras" and that Ray stops placing
    cameras on a node before its cores are full; a camera added at run time that joins a running process adds no
    reservation (Ray cannot grow an actor's), so `ray status` showed 1.25/5.0 CPU for 7 cameras at 0.25, and a node
    that joined later took no run-time camera."""
    config = parse_config({"cameras": [], "ray": {"address": "HEAD:6380", "stream_cpus": 0.25}})
    app = App(config, say=lambda text: None)
    app.placement = SimpleNamespace(cores=1)  # the CPUs counted at the start: a node joining since adds none
    process = object()
    first = CameraConfig(id="a", url="synthetic://street")
    app.cameras["a"] = CameraHandle("a", first, process, "hv-camera-a")
    joining = app._joining([CameraConfig(id="b", url="synthetic://street")])
    assert joining["b"].process is process  # ceil(2 cameras / 1 CPU) per process: b joins a's, no new reservation
    flat = re.sub(r"\s+", " ", SCALING)
    assert "the camera's `placement`, times its cameras |" not in flat
    joined = flat.split("**Cameras added at run time", 1)[1].split("- **", 1)[0]
    for claim in ("shares its process's reservation", "`ray status`", "new processes only",
                  "`ray.cameras_per_process: 1`", "`placement.labels`"):
        assert claim in joined, (claim, joined)
