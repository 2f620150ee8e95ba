"""Placement rules without Ray (issue 16): which options each actor gets, what is refused at once, how cameras
spread over replicas, how pipelines are namespaced, where a restarted camera resumes. The multi-node run is
tests/test_cluster.py."""

from __future__ import annotations

import json

import pytest

from pipeline.cluster import redis_warning, require_redis_url
from pipeline.config import ConfigError, InferenceConfig, RayConfig, parse_config
from pipeline.errors import UserError
from pipeline.placement import (Node, ReplicaAssigner, alive_nodes, cameras_per_process, check_placeable, fits,
                                group_cameras, inference_options, local_cpus, model_in_camera_process, namespace_for,
                                replica_count, replica_gpus, replicas_per_node, stream_options)
from workers.settings import CameraConfig
from workers.stream import Resume, resume_point

HEAD = Node("h" * 56, "10.0.0.1", {"CPU": 2, "memory": 1e9})
CPU_INF = Node("a" * 56, "10.0.0.2", {"CPU": 8, "hydravision_inference": 2}, {"zone": "a"})
NO_TORCH = Node("c" * 56, "10.0.0.3", {"CPU": 4, "site_c": 10}, {"zone": "c"})
GPU = Node("g" * 56, "10.0.0.4", {"CPU": 16, "GPU": 2, "hydravision_inference": 4}, {"zone": "g"})


def cam(**placement) -> CameraConfig:
    return CameraConfig(id="lobby", url="synthetic://street", placement=placement or None)


@pytest.mark.parametrize("nodes, num_gpus, expected", [
    ([HEAD], None, {"num_cpus": 0, "num_gpus": 0.0}),  # one machine: nothing to steer
    ([HEAD, NO_TORCH], None, {"num_cpus": 0, "num_gpus": 0.0, "scheduling_strategy": "SPREAD"}),
    ([HEAD, CPU_INF, NO_TORCH], None, {"num_cpus": 0, "num_gpus": 0.0, "scheduling_strategy": "SPREAD",
                                       "resources": {"hydravision_inference": 1.0}}),
    ([HEAD, GPU, NO_TORCH], None, {"num_cpus": 0, "num_gpus": 1.0, "scheduling_strategy": "SPREAD",
                                   "resources": {"hydravision_inference": 1.0}}),
    ([HEAD, GPU], 0.5, {"num_cpus": 0, "num_gpus": 0.5, "scheduling_strategy": "SPREAD",
                        "resources": {"hydravision_inference": 1.0}}),  # inference.num_gpus wins
])
def test_inference_options(nodes, num_gpus, expected):
    assert inference_options(RayConfig(), num_gpus, nodes) == expected


@pytest.mark.parametrize("model, num_gpus, expected", [
    ({}, None, None),  # a GPU where the cluster has one
    ({"backend": "openvino"}, None, 0.0), ({"precision": "int8"}, None, 0.0),  # they run on the CPU only
    ({"device": "cpu"}, None, 0.0),  # and so does any model the user put on the CPU
    ({"backend": "openvino"}, 0.5, 0.5),  # inference.num_gpus, set, is the user's
])
def test_a_model_that_runs_on_the_cpu_only_reserves_no_gpu(model, num_gpus, expected):
    config = parse_config({"model": model, "inference": {"num_gpus": num_gpus},
                           "cameras": [{"id": "a", "url": "synthetic://street"}]})
    gpus = replica_gpus(config.inference, config.model)
    assert gpus == expected
    opts = inference_options(config.ray, gpus, [HEAD, GPU])
    assert opts["num_gpus"] == (1.0 if expected is None else expected)
    # with no GPU reserved, one machine's CPUs run it as any CPU model: in the camera processes
    assert model_in_camera_process(config.inference, config.model.device, opts["num_gpus"], False) == (
        opts["num_gpus"] == 0)


def test_inference_never_fits_a_node_without_the_inference_resource():
    """A node started without torch does not advertise hydravision_inference: no replica can land there."""
    opts = inference_options(RayConfig(), None, [HEAD, CPU_INF, NO_TORCH])
    assert [n.id[0] for n in (HEAD, CPU_INF, NO_TORCH) if fits(n, opts)] == ["a"]


@pytest.mark.parametrize("placement, expected", [
    ({}, {"num_cpus": 0.1, "scheduling_strategy": "SPREAD"}),
    ({"labels": {"zone": "a"}}, {"num_cpus": 0.1, "label_selector": {"zone": "a"}}),
    ({"labels": {"zone": "a"}, "strict": False},
     {"num_cpus": 0.1, "label_selector": {"zone": "a"}, "fallback_strategy": [{"label_selector": {}}]}),
    ({"resources": {"site_c": 1}}, {"num_cpus": 0.1, "resources": {"site_c": 1.0}}),
])
def test_stream_options(placement, expected):
    assert stream_options(RayConfig(), cam(**placement)) == expected


@pytest.mark.parametrize("cameras, cores, setting, expected", [
    (8, 2, None, 4), (3, 2, None, 2), (1, 2, None, 1), (8, 16, None, 1), (20, 2, None, 10), (0, 2, None, 1),
    (8, 2, 1, 1), (8, 16, 3, 3),  # ray.cameras_per_process wins
])
def test_cameras_per_process(cameras, cores, setting, expected):
    assert cameras_per_process(RayConfig(cameras_per_process=setting), cameras, cores) == expected


def test_only_cameras_placed_alike_share_a_process():
    """Cameras without a placement fill processes in order; a pinned camera goes with the cameras pinned
    alike only; a process reserves its cameras' CPUs and resources together."""
    def at(id_, **placement):
        return CameraConfig(id=id_, url="synthetic://street", placement=placement or None)

    cams = [at("a"), at("b"), at("z1", labels={"zone": "a"}), at("c"), at("s1", resources={"site_c": 1}),
            at("z2", labels={"zone": "a"}), at("s2", resources={"site_c": 1}), at("d"), at("e")]
    groups = group_cameras(RayConfig(), cams, cores=3)  # 9 cameras over 3 cores: 3 per process
    assert [[c.id for c in g] for g, _ in groups] == [["a", "b", "c"], ["d", "e"], ["z1", "z2"], ["s1", "s2"]]
    assert [opts for _, opts in groups] == [
        {"num_cpus": 0.1 * 3, "scheduling_strategy": "SPREAD"}, {"num_cpus": 0.1 * 2, "scheduling_strategy": "SPREAD"},
        {"num_cpus": 0.1 * 2, "label_selector": {"zone": "a"}}, {"num_cpus": 0.1 * 2, "resources": {"site_c": 2.0}}]
    isolated = group_cameras(RayConfig(cameras_per_process=1), cams, cores=3)
    assert [[c.id for c in g] for g, _ in isolated] == [[i] for i in ("a", "b", "c", "d", "e", "z1", "z2", "s1", "s2")]
    assert [opts for _, opts in isolated] == [stream_options(RayConfig(), g[0]) for g, _ in isolated]


def test_cameras_whose_sum_fits_no_node_get_a_process_each(monkeypatch):
    """Two cameras that each need the one site_c unit a node offers cannot share a process reserving two."""
    import pipeline.cluster
    from pipeline.cluster import Placement

    placement = Placement.__new__(Placement)  # its rules without a Ray: the snapshot it would take
    placement.config = parse_config({"cameras": []})
    placement.nodes = nodes = [HEAD, Node("s" * 56, "10.0.0.5", {"CPU": 4, "site_c": 1})]
    monkeypatch.setattr(pipeline.cluster.ray, "nodes", lambda: [  # what it reads before placing cameras
        {"NodeID": n.id, "Alive": True, "NodeManagerAddress": n.ip, "Resources": dict(n.resources)} for n in nodes])
    placement.cores, placement.namespace = 1, "ns"
    cams = [CameraConfig(id=i, url="synthetic://street", placement={"resources": {"site_c": 1}}) for i in "ab"]
    cams.append(CameraConfig(id="c", url="synthetic://street"))
    cams.append(CameraConfig(id="d", url="synthetic://street"))
    assert [([c.id for c in g], o["name"], o.get("resources")) for g, o in placement.stream_processes(cams)] == [
        (["a"], "hv-camera-a", {"site_c": 1.0}), (["b"], "hv-camera-b", {"site_c": 1.0}),
        (["c", "d"], "hv-camera-c+d", None)]


@pytest.mark.parametrize("what, opts, nodes, ok", [
    ("camera on zone a", {"num_cpus": 0.1, "label_selector": {"zone": "a"}}, [HEAD, CPU_INF], True),
    ("camera on a missing zone", {"num_cpus": 0.1, "label_selector": {"zone": "x"}}, [HEAD, CPU_INF], False),
    ("camera preferring a missing zone", {"num_cpus": 0.1, "label_selector": {"zone": "x"},
                                          "fallback_strategy": [{"label_selector": {}}]}, [HEAD], True),
    ("camera needing a missing resource", {"num_cpus": 0.1, "resources": {"site_b": 1}}, [HEAD, NO_TORCH], False),
    ("a GPU on a CPU cluster", {"num_gpus": 1}, [HEAD, CPU_INF], False),
    ("more CPU than any one node has", {"num_cpus": 9}, [HEAD, CPU_INF, NO_TORCH], False),
    ("a fractional GPU", {"num_gpus": 0.25, "resources": {"hydravision_inference": 1}}, [GPU], True),
    ("anything, no nodes", {"num_cpus": 0.1}, [], False),
])
def test_check_placeable(what, opts, nodes, ok):
    if ok:
        check_placeable(what, opts, nodes)
        return
    with pytest.raises(UserError) as info:
        check_placeable(what, opts, nodes)
    text = str(info.value)
    assert text.startswith(f"{what} cannot be placed: it needs ") and "no node of the Ray cluster has that" in text
    for n in nodes:  # the error lists what every node offers, so the user sees what is missing
        assert n.describe() in text


def test_node_from_ray_entry_and_describe():
    entry = {"NodeID": "ab" * 28, "Alive": True, "NodeManagerAddress": "10.1.2.3",
             "Resources": {"CPU": 4.0, "memory": 1e9, "node:10.1.2.3": 1.0, "site_a": 10.0},
             "Labels": {"ray.io/node-id": "ab" * 28, "zone": "a"}}
    dead = {**entry, "NodeID": "cd" * 28, "Alive": False}
    nodes = alive_nodes([entry, dead])
    assert [n.id for n in nodes] == ["ab" * 28]
    assert nodes[0].labels == {"ray.io/node-id": "ab" * 28, "zone": "a"}
    assert nodes[0].describe() == "abababab (10.1.2.3): CPU=4, site_a=10; labels zone=a"


def test_a_camera_may_ask_for_rays_own_node_labels():
    """Ray's label selector matches the labels Ray sets itself (ray.io/node-id, ray.io/accelerator-type, ...):
    a placement asking for one is not refused as if no node had it."""
    entry = {"NodeID": "ab" * 28, "Alive": True, "NodeManagerAddress": "10.1.2.3", "Resources": {"CPU": 4.0},
             "Labels": {"ray.io/node-id": "ab" * 28, "ray.io/accelerator-type": "A100"}}
    nodes = alive_nodes([entry])
    for labels in ({"ray.io/node-id": "ab" * 28}, {"ray.io/accelerator-type": "A100"}):
        check_placeable("camera gate", stream_options(RayConfig(), cam(labels=labels)), nodes)
    with pytest.raises(UserError, match="labels ray.io/accelerator-type=H100"):
        check_placeable("camera gate", stream_options(RayConfig(), cam(labels={"ray.io/accelerator-type": "H100"})),
                        nodes)
    assert nodes[0].describe() == "abababab (10.1.2.3): CPU=4; labels ray.io/accelerator-type=A100"


def test_pipelines_get_their_own_namespace():
    assert namespace_for(None, "hv") != namespace_for(None, "shop2")
    assert namespace_for("site-7", "hv") == "site-7"


def test_cameras_spread_evenly_over_replicas_and_keep_theirs():
    a = ReplicaAssigner(3)
    first = [a.assign(c, ["c0", "c1", "c2", "c3", "c4"]) for c in ["c0", "c1", "c2", "c3", "c4"]]
    assert first == [0, 1, 2, 0, 1]
    assert a.assign("c3", ["c0", "c1", "c2", "c3", "c4"]) == 0  # a camera keeps its replica
    # c0 and c3 were removed: replica 0 is now the emptiest, the next camera goes there
    assert a.assign("c5", ["c1", "c2", "c4"]) == 0
    assert sorted(a.of) == ["c1", "c2", "c4", "c5"]


def test_the_model_runs_in_the_camera_processes_only_on_one_machines_cpus_unless_set():
    unset = InferenceConfig()
    assert model_in_camera_process(unset, "auto", gpus_per_replica=0.0, cluster=False)
    assert model_in_camera_process(unset, "cpu", gpus_per_replica=0.0, cluster=False)
    assert not model_in_camera_process(unset, "auto", gpus_per_replica=1.0, cluster=False)  # replicas get a GPU
    assert not model_in_camera_process(unset, "cuda:1", gpus_per_replica=0.0, cluster=False)
    assert not model_in_camera_process(unset, "mps", gpus_per_replica=0.0, cluster=False)
    assert not model_in_camera_process(unset, "cpu", gpus_per_replica=0.0, cluster=True)
    assert not model_in_camera_process(InferenceConfig(in_camera_process=False), "cpu", 0.0, cluster=False)
    assert model_in_camera_process(InferenceConfig(in_camera_process=True), "cpu", 0.0, cluster=True)  # set: as set


def test_replicas_unset_are_one_on_a_gpu_and_two_on_a_cpu():
    unset, three = InferenceConfig(), InferenceConfig(replicas=3)
    assert replica_count(unset, "auto", gpus_per_replica=0.0, cores=2) == 2
    assert replica_count(unset, "cpu", gpus_per_replica=0.0, cores=None) == 2  # a cluster: cores not known here
    assert replica_count(unset, "auto", gpus_per_replica=1.0, cores=16) == 1
    assert replica_count(unset, "cuda:1", gpus_per_replica=0.0, cores=16) == 1
    assert replica_count(unset, "cpu", gpus_per_replica=0.0, cores=1) == 1  # one core: nothing to split
    assert replica_count(three, "auto", gpus_per_replica=1.0, cores=2) == 3  # set: as set
    anywhere = {"num_cpus": 0, "num_gpus": 0.0}
    assert replicas_per_node(2, [HEAD], anywhere) == 2
    assert replicas_per_node(2, [HEAD, NO_TORCH], anywhere) == 1 and replicas_per_node(3, [HEAD, NO_TORCH], anywhere) == 2
    # only the nodes that advertise the inference resource host replicas: both on CPU_INF
    assert replicas_per_node(2, [HEAD, CPU_INF, NO_TORCH], inference_options(RayConfig(), None, [HEAD, CPU_INF])) == 2


def test_local_ray_gets_enough_logical_cpus():
    rc = RayConfig(stream_cpus=0.25, inference_cpus=1)
    assert local_cpus(rc, replicas=2, cameras=40, spare_cameras=0) == 12
    assert local_cpus(RayConfig(), replicas=1, cameras=3) == 2  # (3 + 16) x 0.1 -> 2


@pytest.mark.parametrize("url, nodes, warns", [
    ("redis://127.0.0.1:6379/0", [HEAD, CPU_INF], True),
    ("redis://localhost:6379/0", [HEAD, CPU_INF], True),
    ("redis://127.0.0.1:6379/0", [HEAD], False),  # one machine: loopback is right
    ("redis://redis:6379/0", [HEAD, CPU_INF], False),
    ("redis://:secret@10.0.0.9:6379/0", [HEAD, CPU_INF], False),
])
def test_loopback_redis_on_a_cluster_is_pointed_out(url, nodes, warns):
    assert (redis_warning(url, nodes) is not None) == warns


def test_cluster_mode_needs_a_redis_url(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    require_redis_url(parse_config({}))  # local: the embedded Redis is fine
    with pytest.raises(UserError, match="redis.url: required when joining a Ray cluster"):
        require_redis_url(parse_config({"ray": {"address": "10.0.0.1:6380"}}))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6380")
    assert parse_config({}).ray.cluster
    with pytest.raises(UserError):
        require_redis_url(parse_config({}))
    assert not parse_config({"ray": {"address": "local"}}).ray.cluster  # the config wins over the environment


@pytest.mark.parametrize("placement, error", [
    ({"resources": {"CPU": 1}}, "set by ray.stream_cpus"),
    ({"resources": {"site_a": 0}}, "amounts must be > 0"),
    ({"labels": {"zone": "a"}, "strict": "maybe"}, "strict"),
    ({"nodes": ["a"]}, "unknown field"),
])
def test_bad_camera_placement_names_the_field(placement, error):
    with pytest.raises(ConfigError) as info:
        parse_config({"cameras": [{"id": "c", "url": "synthetic://street", "placement": placement}]})
    assert "cameras[0].placement" in str(info.value) and error in str(info.value)


def _entry(entry_id: str, frame: int, pts: float) -> list:
    return [(entry_id.encode(), {b"data": json.dumps({"frame": frame, "pts": pts}).encode()})]


@pytest.mark.parametrize("status, last, expected", [
    ({}, [], Resume(0, 0.0, "0-0")),  # a camera never seen
    ({"instance": "old", "stream_mark": "5-0"}, _entry("90-0", 41, 4.1), Resume(0, 0.0, "90-0")),  # new run
    ({"instance": "run", "stream_mark": "90-0"}, _entry("95-3", 12, 1.2), Resume(13, 1.2, "90-0")),  # restarted
    ({"instance": "run", "stream_mark": "90-0"}, _entry("90-0", 41, 4.1), Resume(0, 0.0, "90-0")),  # none yet
    ({"instance": "run", "stream_mark": "100-0"}, _entry("99-7", 41, 4.1), Resume(0, 0.0, "100-0")),
    # a file whose URL changed live at frame 10: its position 3, its pts shifted as that playback's were
    ({"instance": "run", "stream_mark": "90-0", "playback": {"start": 10, "pts_offset": 2.0}}, _entry("95-3", 12, 1.2),
     Resume(13, 1.2, "90-0", 3, 2.0)),
    # ... changed after the last frame published: the new file from its start
    ({"instance": "run", "stream_mark": "90-0", "playback": {"start": 20, "pts_offset": 2.0}}, _entry("95-3", 12, 1.2),
     Resume(13, 1.2, "90-0", 0, 0.0)),
])
def test_resume_point(status, last, expected):
    """A restarted camera continues after the last frame this run published: no (camera, frame) twice."""
    assert resume_point("run", status, last) == expected


def test_concurrent_adds_never_take_one_place_twice():
    """Two cameras added at once while a process has room for one: the first joins it, the second does not
    (it starts a process of its own) until the first is registered or gave up."""
    from types import SimpleNamespace

    from pipeline.app import App, CameraHandle

    app = App(parse_config({"ray": {"cameras_per_process": 2}, "cameras": []}), say=lambda m: None)
    app.placement = SimpleNamespace(cores=2)
    process = object()
    app.cameras["a"] = CameraHandle("a", CameraConfig(id="a", url="synthetic://street"), process, "hv-camera-a")
    x, y = (CameraConfig(id=i, url="synthetic://street") for i in "xy")
    assert app._joining([x])["x"].process is process
    assert app._joining([y]) == {}  # x holds the last place, though not registered yet
    app._registered(["x"])  # x did not start after all: its place is free again
    assert app._joining([y])["y"].process is process
    app.cameras["y"] = CameraHandle("y", y, process, "hv-camera-a")
    app._registered(["y"])
    assert app._joining([x]) == {} and app._joins == {}


def test_restarts_count_processes_and_remember_only_recent_ones(monkeypatch):
    """Cameras of one restarted process count one restart; a camera that keeps crashing counts each time and
    leaves a bounded memory of the processes counted."""
    from types import SimpleNamespace

    import pipeline.app as app_module
    from pipeline.app import App, CameraHandle

    pids = iter([7, 7] + list(range(100, 100 + 3 * app_module.RECENT_RESTARTED_PIDS)))

    class Process:  # the StreamActor handle: each method's .remote() answers at once (ray.get passes it on)
        start = SimpleNamespace(remote=lambda *a, **kw: None)
        wait = SimpleNamespace(remote=lambda *a: None)
        stats = SimpleNamespace(remote=lambda *a: {"pid": next(pids)})

    monkeypatch.setattr(app_module.ray, "get", lambda value, timeout=None: value)
    app = App(parse_config({"cameras": []}), say=lambda m: None)
    handles = [CameraHandle(i, CameraConfig(id=i, url="synthetic://street"), Process(), "hv-camera-a") for i in "ab"]
    for h in handles:  # both cameras of process 7 came back
        app._restart_camera(h)
    assert app.telemetry.snapshot().restarts["stream"] == 1
    for _ in range(3 * app_module.RECENT_RESTARTED_PIDS):  # one camera crashing again and again
        app._restart_camera(handles[0])
    assert app.telemetry.snapshot().restarts["stream"] == 1 + 3 * app_module.RECENT_RESTARTED_PIDS
    assert len(app._restarted_pids) == app_module.RECENT_RESTARTED_PIDS
