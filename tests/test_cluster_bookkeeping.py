"""Cluster mode's bookkeeping where a user saw it go wrong: which node a camera is on once it was removed and
added again, a node lost just before its actors came back, cameras added at run time for nodes that joined or
died since the start, and a Ray address that is really a Redis (both default to port 6379). Ray's calls are
replaced by fakes except where the test says otherwise; the real-raylet run is tests/test_cluster.py."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

import pipeline.cluster as cluster
from pipeline.cluster import NodeWatch, Placement, init_ray
from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.placement import Node, alive_nodes
from workers.settings import CameraConfig

A, B, HEAD = "a" * 56, "b" * 56, "h" * 56


class Ref:
    """An ObjectRef that is ready at once (the fake ray.get returns its value)."""

    def __init__(self, value):
        self.value = value


class Process:
    """A StreamActor handle whose where() answers the node it runs on now."""

    def __init__(self, node: str):
        self.node = node
        self.where = SimpleNamespace(remote=lambda: Ref({"node": self.node}))


class FakeRay:
    def __init__(self, nodes: list[str]):
        self.alive = dict.fromkeys(nodes, True)

    def nodes(self) -> list[dict]:
        return [{"NodeID": n, "Alive": up, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 1}}
                for n, up in self.alive.items()]


@pytest.fixture
def fake_ray(monkeypatch):
    fake = FakeRay([HEAD, A, B])
    monkeypatch.setattr(cluster.ray, "nodes", fake.nodes)
    monkeypatch.setattr(cluster.ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(cluster.ray, "get", lambda ref, timeout=None: ref.value)
    return fake


def watched(cameras: dict) -> tuple[NodeWatch, SimpleNamespace, list[str], list[dict]]:
    said, published = [], []
    events = SimpleNamespace(publish_event=published.append)
    app = SimpleNamespace(_lock=threading.RLock(), cameras=cameras, inference=[], say=said.append, events=events)
    return NodeWatch(app, alive_nodes(cluster.ray.nodes())), app, said, published


def test_a_camera_removed_and_added_again_elsewhere_is_reported_where_it_runs_now(fake_ray):
    """Its placement changed (remove, then add: the way to move a camera): a new process on node B. Node B dies:
    node_lost names the camera, and its restart says it came from B, not from the node of its old process."""
    nw, app, said, published = watched({"x": SimpleNamespace(process=Process(A))})
    nw.learn()
    assert nw.where[("camera", "x")] == A
    app.cameras = {"x": SimpleNamespace(process=Process(B))}  # removed and added again, pinned to B
    nw.tick()
    assert nw.where[("camera", "x")] == B
    fake_ray.alive[B] = False
    nw._last_poll = 0.0
    nw.tick()
    assert [e["cameras"] for e in published] == [["x"]], said
    app.cameras["x"].process.node = HEAD  # Ray brought it back elsewhere
    assert nw.moved(("camera", "x")) == {"node": HEAD, "from_node": B}


def test_a_node_lost_just_before_its_actors_answered_again_names_them(fake_ray):
    """Ray restarts a dead node's actors as soon as it declares the node dead; the controller's status loop can
    see a camera restarted (and report worker_restarted) before its node poll runs. node_lost still names the
    camera, once, and the restart says where it came from."""
    process = Process(A)
    nw, app, said, published = watched({"y": SimpleNamespace(process=process)})
    nw.learn()
    nw.tick()  # a poll: node A alive
    fake_ray.alive[A] = False
    process.node = B  # restarted on B before the next poll (poll_s has not passed)
    assert nw.moved(("camera", "y")) == {"node": B, "from_node": A}
    nw._last_poll = 0.0
    nw.tick()
    assert [(e["node"], e["cameras"]) for e in published] == [(A, ["y"])], said
    assert nw.where[("camera", "y")] == B


def _entry(node: Node) -> dict:
    return {"NodeID": node.id, "Alive": True, "NodeManagerAddress": node.ip, "Resources": dict(node.resources),
            "Labels": dict(node.labels)}


def test_cameras_added_at_run_time_are_checked_against_the_nodes_alive_now(monkeypatch):
    """A decoder node that joined after the start takes the cameras pinned to it; one that died since refuses
    them at once instead of leaving their actor pending until the start's budget runs out."""
    head = Node(HEAD, "10.0.0.1", {"CPU": 2})
    site_b = Node(B, "10.0.0.2", {"CPU": 4}, {"site": "b"})
    placement = Placement.__new__(Placement)  # its rules without a Ray: the snapshot it took at the start
    placement.config = parse_config({"cameras": []})
    placement.nodes, placement.cores, placement.namespace = [head], 2, "ns"
    cam = CameraConfig(id="gate-b", url="synthetic://street", placement={"labels": {"site": "b"}})
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [_entry(head), _entry(site_b)])  # site B joined
    assert [o["name"] for _, o in placement.stream_processes([cam])] == ["hv-camera-gate-b"]
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [_entry(head), {**_entry(site_b), "Alive": False}])
    with pytest.raises(UserError, match="camera gate-b cannot be placed"):
        placement.stream_processes([cam])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("from_env", [False, True])
def test_a_ray_address_where_redis_answers_is_refused_at_once(ray_free, redis_server, monkeypatch, from_env):
    """Ray's head and Redis both default to port 6379. ray.init at a Redis retried for ~14 minutes and then
    blamed the GCS; the error names the setting to fix, $RAY_ADDRESS when that is where the address came from."""
    address = redis_server.url.split("//")[1].split("/")[0]  # host:port
    if from_env:
        monkeypatch.setenv("RAY_ADDRESS", address)
        config = parse_config({"redis": {"url": redis_server.url}})
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        config = parse_config({"redis": {"url": redis_server.url}, "ray": {"address": address}})
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        init_ray(config, {})
    assert time.monotonic() - t0 < 10
    assert str(info.value).startswith(f"{'$RAY_ADDRESS' if from_env else 'ray.address'}: {address!r} is a Redis "
                                      "server"), info.value
    assert "6379" in str(info.value)


@pytest.mark.timeout(60)
def test_a_ray_address_where_nothing_answers_fails_within_the_placement_timeout(ray_free, monkeypatch):
    """ray.init retried a Ray address where nothing listens for ~14 minutes (20 tries of ~40 s); the controller
    waits ray.placement_timeout_s for a head still starting, then says which setting to check."""
    from pipeline.embedded_redis import free_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"
    config = parse_config({"redis": {"url": "redis://10.9.9.9:6379/0"},
                           "ray": {"address": address, "placement_timeout_s": 1}})
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"^ray.address: nothing answers at '{address}' .* after 1 s "
                                        r"\(ray.placement_timeout_s\)"):
        init_ray(config, {})
    assert time.monotonic() - t0 < 15


def test_a_ray_head_is_not_taken_for_a_redis(ray_local):
    """The check before ray.init lets a real head through at once (its GCS speaks HTTP/2 first)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    t0 = time.monotonic()
    cluster._check_head(address, "ray.address", 1.0)
    assert cluster._first_byte(address) not in (None, b"+", b"-")
    assert time.monotonic() - t0 < 5


def test_cameras_added_at_the_same_time_keep_each_others_replica():
    """A camera being added is in App.cameras only once its process has started, seconds later: a second add
    meanwhile built the replica assigner's list without it, which forgot it (x and y both on replica 0, then z
    too: three of five cameras on one replica)."""
    from pipeline.app import App
    from pipeline.placement import ReplicaAssigner

    app = App(parse_config({"ray": {"cameras_per_process": 1}, "cameras": []}), say=lambda m: None)
    assigner = ReplicaAssigner(2)
    started = SimpleNamespace(remote=lambda *args: None)
    app.placement = SimpleNamespace(namespace="ns", in_camera_process=False, cores=2, replica_index=assigner.assign,
                                    stream_processes=lambda cams: [([c], {"name": f"hv-camera-{c.id}"}) for c in cams],
                                    spawn=lambda cls, options, *args: SimpleNamespace(start=started))

    def create(cid: str):
        return app._create([CameraConfig(id=cid, url="synthetic://street")])[0][0]

    for cid in "ab":
        app.cameras[cid] = create(cid)
    app._busy |= {"x", "y"}  # two adds at once (LiveControl marks them busy until they are registered)
    x, y = create("x"), create("y")
    app.cameras |= {"x": x, "y": y}
    app._busy -= {"x", "y"}
    app.cameras["z"] = create("z")
    replicas = [h.inference[0][1] for h in app.cameras.values()]
    assert sorted(replicas.count(r) for r in set(replicas)) == [2, 3] and assigner.of.keys() == set("abxyz")


def test_a_replica_refusing_a_setting_is_a_user_error_not_a_bug(monkeypatch):
    """model.device cuda on a node without one: the replica's constructor raises a ValueError naming the
    setting; Ray hands only its text back, and the CLI printed a traceback and "This is a bug in hydravision"."""
    import ray

    text = ("The actor died because of an error raised in its creation task, ray::hv-inference-0:InferenceActor."
            "__init__() (pid=1, ip=10.0.0.1)\n  File \"workers/model_runner.py\", line 47, in pick_device\n    raise "
            "ValueError(...)\nValueError: model.device cuda: no such device on this node (a CPU-only torch build); "
            "set model.device auto or cpu")

    def died(ref, timeout=None):
        raise ray.exceptions.RayActorError(error_msg=text, actor_init_failed=True)

    monkeypatch.setattr(cluster.ray, "get", died)
    placement = Placement.__new__(Placement)
    placement.config = parse_config({"cameras": []})
    with pytest.raises(UserError, match=r"^inference replica 0 could not start: model.device cuda: no such device"):
        placement.ready(None, "inference replica 0")

    def crashed(ref, timeout=None):  # anything else stays what it is: a bug, with its traceback
        raise ray.exceptions.RayActorError(error_msg=text.replace("ValueError", "KeyError"), actor_init_failed=True)

    monkeypatch.setattr(cluster.ray, "get", crashed)
    with pytest.raises(ray.exceptions.RayActorError):
        placement.ready(None, "inference replica 0")


@pytest.mark.parametrize("given, expected", [(None, "2"), ("4", "4")])
def test_a_local_ray_starts_its_processes_with_two_malloc_arenas(monkeypatch, given, expected):
    """Camera processes gave each decoder thread an arena (up to 8 per core) and cameras coming and going left
    150-180 MB per process behind in them over 26 cycles; Ray's processes inherit the driver's environment."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if given is not None:
        env["MALLOC_ARENA_MAX"] = given
    monkeypatch.setattr(os, "environ", env)  # this process's own stays as it was
    seen = []

    def init(**kwargs):
        seen.append(os.environ.get("MALLOC_ARENA_MAX"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(cluster.ray, "init", init)
    with pytest.raises(Exception, match="stop here"):
        init_ray(parse_config({"cameras": [{"id": "a", "url": "synthetic://street"}]}), {})
    assert seen == [expected]


def test_the_free_resources_of_a_full_cluster_read_none(monkeypatch):
    """Ray leaves used-up resources out of available_resources(): the placement timeout's "Free resources
    now:" was followed by an empty line."""
    monkeypatch.setattr(cluster.ray, "available_resources",
                        lambda: {"memory": 2e9, "object_store_memory": 1e9, "node:127.0.0.1": 1.0})
    assert cluster._free() == "(none)"
    monkeypatch.setattr(cluster.ray, "available_resources", lambda: {"CPU": 1.5, "memory": 2e9})
    assert cluster._free() == "CPU=1.5"
