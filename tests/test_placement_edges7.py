"""Placement at its edges (seventh round): room counted node by node and net of what other pipelines hold, at
start and for a camera added at run time. The App with stand-ins for Ray (as tests/test_controller_edges5.py
does), and one test against a real local Ray for Ray's own view of what each node has free."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import ray

from pipeline import app as app_module
from pipeline import cluster
from pipeline.admission import CommandRejected
from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.placement import Node, short_together
from test_controller_edges3 import Process, answer

A, B = "a" * 56, "b" * 56
NODE_ENTRIES = [{"NodeID": node_id, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True,
                 "Resources": {"CPU": 2.0, "memory": 8e9}} for i, node_id in ((1, A), (2, B))]
CLUSTER = {"address": "10.0.0.1:6380", "stream_cpus": 1, "inference_cpus": 1}
HEADS = {"p": ["x"]}


def on_nodes(monkeypatch, entries: list[dict], free: dict | None) -> None:
    """Ray's nodes (totals) and, when given, what Ray says each has free now (its available resources)."""
    monkeypatch.setattr(ray, "nodes", lambda: entries)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    if free is not None:
        monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: free)


def said_at_wait(monkeypatch, sections: dict, entries: list[dict] = NODE_ENTRIES, free: dict | None = None) -> list:
    """Starts a pipeline on stand-in nodes whose cameras never start: what had been said when the start waited."""
    config = parse_config({"redis": {"url": "redis://10.0.0.9:6379/0"}, **sections})
    said: list[str] = []
    app = app_module.App(config, say=said.append)
    on_nodes(monkeypatch, entries, free)
    monkeypatch.setattr(app_module.App, "check_model", lambda self: {"input_size": [256, 448], "heads": HEADS})
    monkeypatch.setattr(app_module.App, "resolve_redis", lambda self: "redis://10.0.0.9:6379/0")
    monkeypatch.setattr(app_module.App, "start_ray", lambda self: None)
    monkeypatch.setattr(app_module, "Reaper", SimpleNamespace(start=lambda: SimpleNamespace(release=lambda: None)))
    monkeypatch.setattr(app_module, "publisher_for", lambda settings, name: SimpleNamespace(start=lambda: None))
    actor = SimpleNamespace(info=SimpleNamespace(remote=lambda: "info"), ping=SimpleNamespace(remote=lambda: "ping"),
                            model_info=SimpleNamespace(remote=lambda: "info"),
                            start=SimpleNamespace(remote=lambda camera_id: "started"))
    monkeypatch.setattr(cluster.Placement, "spawn", lambda self, actor_class, options, *args: actor)
    monkeypatch.setattr(cluster.Placement, "checkpoint_arg", lambda self: "model.safetensors")
    monkeypatch.setattr(cluster.Placement, "ready", lambda self, ref, what:
                        {"input_size": [256, 448], "heads": HEADS, "threads": 1} if ref == "info" else [1, 2])
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    waited: list[list[str]] = []

    def get(ref, timeout=None):  # where _started waits for the cameras
        waited.append(list(said))
        raise ray.exceptions.GetTimeoutError()

    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(UserError, match="did not start within"):
        app.start()
    assert waited, "the start never waited for the cameras"
    return waited[0]


def cameras(n: int) -> list[dict]:
    return [{"id": f"c{i}", "url": "synthetic://street"} for i in range(n)]


# -- node by node ------------------------------------------------------------------------------------------------
def test_a_process_needs_its_whole_reservation_on_one_node():
    """Two nodes with 1 CPU each had "2 CPUs" for a process that needs 2: Ray takes an actor's reservation from one
    node, so it waits; short_together summed the nodes and saw room."""
    ones = [Node(A, "10.0.0.1", {"CPU": 1.0}), Node(B, "10.0.0.2", {"CPU": 1.0})]
    assert short_together([{"num_cpus": 2}], ones) == {"CPU": (2.0, 2.0)}
    threes = [Node(A, "10.0.0.1", {"CPU": 3.0}), Node(B, "10.0.0.2", {"CPU": 3.0})]
    assert short_together([{"num_cpus": 2}] * 3, threes) == {"CPU": (6.0, 6.0)}  # 6 of 6, but 2 + 2 > 3
    assert short_together([{"num_cpus": 2}] * 2, threes) == {}  # guard: one a node
    assert short_together([{"num_cpus": 2}, {"num_cpus": 1}] * 2, threes) == {}  # guard: 2 + 1 on each


def test_processes_of_several_cameras_at_start_need_room_on_one_node_each(monkeypatch):
    """6 cameras, 2 a process (1 CPU each), on two 3-CPU nodes: 6 CPUs, but a node holds one 2-CPU process and 1
    CPU left over. The check counted the cameras one by one (6 x 1 CPU fit), said nothing and waited 90 s."""
    entries = [{**e, "Resources": {"CPU": 3.0}} for e in NODE_ENTRIES]
    said = said_at_wait(monkeypatch, {"cameras": cameras(6), "model": {"device": "cpu"},
                                      "ray": {**CLUSTER, "cameras_per_process": 2},
                                      "inference": {"in_camera_process": True}}, entries)
    assert any("Waiting up to 90 s" in line and "6 camera(s)" in line and "CPU=6" in line
               and "node by node CPU 3 + 3" in line for line in said), said


def test_cameras_that_fit_start_without_a_warning(monkeypatch):
    """Guard: 2 cameras and 2 replicas of 1 CPU on two 2-CPU nodes, nothing held by others: no word of a wait."""
    said = said_at_wait(monkeypatch, {"cameras": cameras(2), "model": {"device": "cpu"}, "ray": CLUSTER,
                                      "inference": {"replicas": 2}}, free={A: {"CPU": 2.0}, B: {"CPU": 2.0}})
    assert not any("Waiting up to" in line for line in said), said


# -- what other pipelines hold -----------------------------------------------------------------------------------
def test_free_nodes_are_what_ray_has_available_on_each():
    """Ray leaves a used-up resource out of its available resources: 0, not the total; a node Ray does not answer
    for keeps its totals."""
    from pipeline.placement import free_nodes  # here: the other tests run on the code before it too

    nodes = [Node(A, "10.0.0.1", {"CPU": 2.0, "GPU": 1.0}, {"zone": "x"}), Node(B, "10.0.0.2", {"CPU": 2.0})]
    free = free_nodes(nodes, {A: {"CPU": 0.5}})
    assert free[0] == Node(A, "10.0.0.1", {"CPU": 0.5, "GPU": 0.0}, {"zone": "x"}) and free[1] == nodes[1]


def test_cameras_at_start_count_what_another_pipeline_holds(monkeypatch):
    """2 cameras and 2 replicas of 1 CPU on two 2-CPU nodes fit the totals, but another pipeline's actors hold
    node a's 2 CPUs (ray.nodes() gives totals; Ray's available resources leave them out): the start waited 70 s
    without a word."""
    said = said_at_wait(monkeypatch, {"cameras": cameras(2), "model": {"device": "cpu"}, "ray": CLUSTER,
                                      "inference": {"replicas": 2}}, free={A: {"memory": 8e9}, B: {"CPU": 2.0}})
    assert any("Waiting up to 70 s" in line and "reserve CPU=4" in line and "CPU=2 free" in line
               and "node by node CPU 0 + 2" in line for line in said), said


def test_a_replica_whose_gpu_another_pipeline_holds_is_announced(monkeypatch):
    """One GPU node; another pipeline's replica holds its GPU. The replica (one, as the GPU count allows) waited
    ray.placement_timeout_s for it without a word."""
    entries = [{**NODE_ENTRIES[0], "Resources": {"CPU": 4.0, "GPU": 1.0}}]
    said = said_at_wait(monkeypatch, {"cameras": cameras(1), "ray": CLUSTER}, entries, free={A: {"CPU": 3.0}})
    assert any("Waiting up to 120 s" in line and "1 inference replicas" in line and "room for 0" in line
               for line in said), said


# -- a camera added at run time ----------------------------------------------------------------------------------
def added(monkeypatch, free: dict, starts: bool) -> tuple[list[str], list[list[str]], object]:
    """Adds camera c at run time on two 2-CPU nodes with ``free`` free: what was said, what had been said when
    the add waited for its process, and the add's answer (or its refusal)."""
    config = parse_config({"cameras": [], "ray": CLUSTER, "redis": {"url": "redis://10.0.0.9:6379/0"},
                           "model": {"device": "cpu"}})
    said: list[str] = []
    app = app_module.App(config, say=said.append)
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.events = SimpleNamespace(publish_event=lambda m: None, remove_status=lambda camera_id: None)
    app.model_heads = HEADS
    on_nodes(monkeypatch, NODE_ENTRIES, free)
    app.placement = cluster.Placement(config, say=said.append)
    monkeypatch.setattr(cluster.Placement, "spawn", lambda self, actor_class, options, *args: Process(options["name"]))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    waited: list[list[str]] = []

    def get(ref, timeout=None):  # the camera's start: at once, or never within its budget
        waited.append(list(said))
        if not starts:
            raise ray.exceptions.GetTimeoutError()
        return answer(ref)

    monkeypatch.setattr(ray, "get", get)
    try:
        result: object = app.add_camera({"id": "c", "url": "synthetic://street"}, by="api:ops")
    except CommandRejected as e:
        result = e
    return said, waited, result


def test_a_camera_added_to_a_full_cluster_says_what_is_short_at_once(monkeypatch, caplog):
    """Both nodes' CPUs held: the add waited 65 s with no word in the log, then answered "is the Ray cluster short
    of CPUs or memory?" (after the CLI's 60 s had run out), while a camera at start is told at once what is short."""
    said, waited, result = added(monkeypatch, {A: {"memory": 8e9}, B: {"CPU": 0.5}}, starts=False)
    assert waited and any("Camera c: waiting up to 65 s" in line and "reserve CPU=1" in line
                          and "CPU=0.5 free, node by node CPU 0 + 0.5" in line for line in waited[0]), waited
    assert isinstance(result, CommandRejected) and result.status == 503, result
    assert "did not start within 65 s" in result.reason and "would reserve CPU=1" in result.reason, result.reason
    assert any("rejected add" in r.getMessage() and "would reserve CPU=1" in r.getMessage()
               for r in caplog.records), caplog.text  # a refusal is a warning in the log


def test_a_camera_added_where_it_fits_starts_without_a_warning(monkeypatch):
    """Guard: a node has a CPU free: the camera starts, nothing is said about a wait."""
    said, waited, result = added(monkeypatch, {A: {"memory": 8e9}, B: {"CPU": 1.0}}, starts=True)
    assert isinstance(result, dict) and result["id"] == "c", result
    assert waited and not any("waiting up to" in line.lower() for line in said), said


# -- Ray itself (last: starts the session's local Ray) -----------------------------------------------------------
def test_free_now_is_what_ray_leaves_after_another_namespaces_actor(ray_local):
    """Ray's own answer: an actor of another namespace (another pipeline) holding 1 of the node's 2 CPUs leaves
    ray.nodes()'s totals as they were; the free view takes it off, node by node, under the node's id."""
    from pipeline.app import free_now  # here: the other tests run on the code before it too
    from pipeline.placement import alive_nodes

    @ray.remote(num_cpus=1)
    class Other:
        def ping(self) -> int:
            return 1

    other = Other.options(name="hv-camera-x", namespace="hydravision-other").remote()
    try:
        ray.get(other.ping.remote(), timeout=60)
        nodes = alive_nodes(ray.nodes())
        assert [n.resources["CPU"] for n in nodes] == [2.0]  # totals: the other pipeline's CPU still counted
        deadline = time.monotonic() + 30  # the GCS learns of the reservation from the raylet's next report
        while (free := free_now(nodes))[0].resources["CPU"] != 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert free[0].resources["CPU"] == 1.0, free
        assert short_together([{"num_cpus": 2}], free) == {"CPU": (2.0, 1.0)}
    finally:
        ray.kill(other, no_restart=True)
