"""Cluster mode as an operator saw it on a two-node Ray cluster (round 13): a lost node whose actors no remaining
node can host (node_lost said Ray restarts them; Ray keeps them pending for ever), whole-run counts beside the last
process's in the final table and --summary-json, a refusal's `ray start` hint for a missing label, and what
docs/scaling.md says a camera waiting for its node reads as. Ray's calls are fakes; no cluster is started."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

import pipeline.cluster as cluster
from pipeline.cluster import Placement, inference_name
from pipeline.config import RayConfig, parse_config
from pipeline.errors import UserError
from pipeline.placement import Node, ReplicaAssigner, check_placeable, inference_options, stream_options
from pipeline.telemetry import Telemetry
from test_cluster_bookkeeping import Process  # an actor handle answering where() at once
from workers.settings import CameraConfig

HEAD, A, B = "h" * 56, "a" * 56, "b" * 56


def entry(node: Node, alive: bool = True) -> dict:
    return {"NodeID": node.id, "Alive": alive, "NodeManagerAddress": node.ip, "Resources": dict(node.resources),
            "Labels": dict(node.labels)}


def lose_a_node(monkeypatch, nodes: list[Node], lost: str) -> tuple[list[str], list[dict]]:
    """A pipeline placed by Placement on ``nodes`` (a replica and cameras gate (label site=z), lobby and free, each
    in its own process, on node A but lobby on the head), then node ``lost`` dies: what the controller said and
    published."""
    alive = {n.id: True for n in nodes}
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [entry(n, alive[n.id]) for n in nodes])
    monkeypatch.setattr(cluster.ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(cluster.ray, "get", lambda ref, timeout=None: ref.value)
    config = parse_config({"cameras": [], "ray": {"address": "HEAD:6380"}})
    placement = Placement.__new__(Placement)  # its rules without a Ray: the snapshot it took at the start
    placement.config, placement.nodes, placement.cores, placement.namespace = config, nodes, 4, "ns"
    placement.assigner = ReplicaAssigner(1)
    stand_in = SimpleNamespace(options=lambda **options: SimpleNamespace(remote=lambda *args: Process(
        HEAD if options["name"] == "hv-camera-lobby" else A)))
    replica = placement.spawn(stand_in, {**inference_options(config.ray, None, nodes), "name": inference_name(0)})
    cams = [CameraConfig(id="gate", url="synthetic://street", placement={"labels": {"site": "z"}}),
            CameraConfig(id="lobby", url="synthetic://street"), CameraConfig(id="free", url="synthetic://street")]
    handles = {}
    for cam in cams:
        [(_, options)] = placement.stream_processes([cam])
        placement.replica_index(cam.id, [c.id for c in cams])
        handles[cam.id] = SimpleNamespace(process=placement.spawn(stand_in, options), name=options["name"])
    said, published = [], []
    app = SimpleNamespace(_lock=threading.RLock(), cameras=handles, inference=[replica], say=said.append,
                          events=SimpleNamespace(publish_event=published.append))
    nw = placement.watch(app)
    nw.learn()
    alive[lost] = False
    nw._last_poll = 0.0
    nw.tick()
    return said, published


def test_a_lost_node_says_what_waits_for_a_node_that_can_host_it(monkeypatch):
    """Before: 'Ray restarts them on the remaining nodes' whatever the remaining nodes offered. The only node with
    hydravision_inference and label site=z dies: the replica and camera gate wait for a node with those to join,
    and the cameras the replica serves publish nothing meanwhile; camera free (spread) does restart."""
    head = Node(HEAD, "10.0.0.1", {"CPU": 4})
    node_a = Node(A, "10.0.0.2", {"CPU": 4, "hydravision_inference": 1}, {"site": "z"})
    said, published = lose_a_node(monkeypatch, [head, node_a], A)
    [line] = [s for s in said if "lost:" in s]
    assert "\n" not in line
    assert line.endswith("lost: cameras ['free', 'gate'], inference replicas [0]; Ray restarts camera free on the "
                         "remaining nodes; camera gate waits for a node with label site=z to join; inference replica 0 "
                         "waits for a node with hydravision_inference=1 to join (cameras ['free', 'gate', 'lobby'], "
                         "which it serves, publish no frames until then)"), line
    [event] = published
    assert (event["cameras"], event["inference"]) == (["free", "gate"], [0])
    assert event["waiting"] == [{"camera": "gate", "needs": {"resources": {}, "labels": {"site": "z"}}},
                                {"inference": 0, "needs": {"resources": {"hydravision_inference": 1.0}, "labels": {}}}]
    schema = json.loads((Path(__file__).resolve().parent.parent / "workers/schemas/event-v1.json").read_text())
    jsonschema.validate(event, schema)  # the field is in the event schema, as subscribers read it


def test_a_lost_node_whose_actors_fit_the_remaining_nodes_says_they_restart_there(monkeypatch):
    """Guard: node B offers all that node A did; nothing waits, and the event has no `waiting`."""
    head = Node(HEAD, "10.0.0.1", {"CPU": 4})
    node_a = Node(A, "10.0.0.2", {"CPU": 4, "hydravision_inference": 1}, {"site": "z"})
    node_b = Node(B, "10.0.0.3", {"CPU": 2, "hydravision_inference": 1}, {"site": "z"})
    said, published = lose_a_node(monkeypatch, [head, node_a, node_b], A)
    [line] = [s for s in said if "lost:" in s]
    assert line.endswith("inference replicas [0]; Ray restarts them on the remaining nodes"), line
    assert [e.get("waiting") for e in published] == [None]


@pytest.mark.parametrize("opts, hint, not_in", [
    ({"num_cpus": 0.1, "label_selector": {"site": "z"}}, "`ray start --address=HEAD:6380 --labels=site=z`",
     "--resources"),
    ({"num_cpus": 0.1, "resources": {"site_x": 1}}, """`ray start --address=HEAD:6380 --resources='{"site_x": 1}'`""",
     "--labels"),
    ({"num_cpus": 0, "resources": {"hydravision_inference": 1}, "label_selector": {"site": "b", "rack": "2"}},
     """--resources='{"hydravision_inference": 1}' --labels=site=b,rack=2`""", "--num-cpus"),
    ({"num_cpus": 9}, "`ray start --address=HEAD:6380 --num-cpus=9`", "--resources"),
    ({"num_cpus": 0.1, "label_selector": {"ray.io/accelerator-type": "H100"}}, "ray.io/ labels are Ray's own",
     "--labels="),
])
def test_a_refusals_hint_names_the_flag_for_what_is_missing(opts, hint, not_in):
    """Before: '--resources '{"NAME": 1}'' for a missing label too. A label is given with `ray start --labels`
    (Ray 2.60); a node that takes the actor needs its custom resources and labels together."""
    nodes = [Node(HEAD, "10.0.0.1", {"CPU": 4}), Node(A, "10.0.0.2", {"CPU": 4, "hydravision_inference": 1},
                                                      {"site": "a"})]
    with pytest.raises(UserError) as info:
        check_placeable("camera gate", opts, nodes)
    text = str(info.value)
    assert hint in text and not_in not in text and "NAME" not in text, text
    assert text.startswith("camera gate cannot be placed: it needs ")  # the rest of the message as before


def test_the_hint_for_a_cameras_missing_label_comes_from_its_placement():
    cam = CameraConfig(id="gate", url="synthetic://street", placement={"labels": {"site": "z"}})
    with pytest.raises(UserError, match="--labels=site=z"):
        check_placeable("camera gate", stream_options(RayConfig(), cam), [Node(HEAD, "10.0.0.1", {"CPU": 4})])


def stats(pid: int, run: int, submitted: int, published: int, sent: int, retries: int = 0, queued: int = 0,
          in_flight: int = 0) -> dict:
    return {"camera": "c", "state": "running", "pid": pid, "run": run, "decoded": submitted + 1,
            "submitted": submitted, "published": published, "skipped": 0, "dropped": {"error": 0},
            "in_slot": 1, "in_flight": in_flight, "reconnects": 0, "watchdog_restarts": 0, "capture_crashes": 1,
            "publisher": {"sent": sent, "retries": retries, "dropped": 0, "rejected": 0, "reconnects": 0,
                          "round_trips": sent, "queued": queued, "connected": True}}


def test_whole_run_counts_are_whole_run_and_what_is_there_now_the_last_process():
    """Before: "submitted": 1535 beside "published": 2010 after a restart; publisher.sent and retries too were the
    last process's. in_flight, in_slot and publisher.queued are the last process's, as before."""
    t = Telemetry()
    t.record_cameras([stats(1, 1, submitted=1500, published=1490, sent=1490, retries=3)])
    last = stats(2, 1, submitted=40, published=30, sent=31, queued=5, in_flight=2)
    t.record_cameras([last])
    [whole] = t.whole_run([last])
    assert (whole["submitted"], whole["published"], whole["capture_crashes"]) == (1540, 1520, 2)
    pub = whole["publisher"]
    assert (pub["sent"], pub["retries"], pub["round_trips"]) == (1521, 3, 1521)
    assert (whole["in_flight"], whole["in_slot"], pub["queued"], pub["connected"]) == (2, 1, 5, True)
    assert last["submitted"] == 40 and last["publisher"]["sent"] == 31  # the caller's stats are left as they were


def test_a_new_run_in_the_same_process_adds_its_submitted_but_not_its_publishers_counts_twice():
    """A file camera started again by an update: a new pipeline (submitted from 0), the same Publisher (counting
    on): its sends are not added to themselves."""
    t = Telemetry()
    t.record_cameras([stats(7, 1, submitted=100, published=100, sent=100)])
    last = stats(7, 2, submitted=3, published=3, sent=103)
    t.record_cameras([last])
    [whole] = t.whole_run([last])
    assert (whole["submitted"], whole["published"], whole["publisher"]["sent"]) == (103, 103, 103)


def test_scaling_doc_says_what_a_camera_waiting_for_its_node_reads_as_and_how_its_frames_count():
    """docs/scaling.md said a waiting camera 'reads unavailable' (hydravision status, from Redis, shows it stale)
    and frames lost to a dead replica count as dropped.error (most are replaced in the slot: overload)."""
    text = (Path(__file__).parent.parent / "docs" / "scaling.md").read_text()
    section = text[text.index("## Losing a node"):text.index("## Redis: memory per camera")]
    flat = " ".join(section.split())
    assert "counted as `dropped.error` where the camera survived" not in flat
    assert "`dropped.overload`" in flat and "`dropped.error`" in flat
    assert "read it `unavailable`, while `hydravision status`" in flat and "show it `stale`" in flat
