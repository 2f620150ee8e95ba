"""Placement decisions at their edges, without a Ray: replica counts the nodes cannot host, a GPU that is on a
decoder node only, an address whose port cannot be one, a local Ray given fewer CPUs than its cameras reserve,
settings Ray refuses only once the actors are created, and a namespace shared on purpose. Ray's calls are
replaced by stand-ins (tests/test_cluster_bookkeeping.py does the same); nothing here starts a Ray."""

from __future__ import annotations

import time

import pytest

import pipeline.cluster as cluster
from pipeline.cluster import Placement, init_ray
from pipeline.config import ConfigError, parse_config
from pipeline.errors import UserError
from pipeline.placement import Node, check_placeable, inference_options

HEAD = Node("h" * 56, "10.0.0.1", {"CPU": 2})
INF_1 = Node("i" * 56, "10.0.0.2", {"CPU": 4, "hydravision_inference": 1})  # docker-compose.yml's ray-worker
INF_2 = Node("j" * 56, "10.0.0.3", {"CPU": 8, "hydravision_inference": 2})
DECODE_GPU = Node("d" * 56, "10.0.0.4", {"CPU": 8, "GPU": 1}, {"site": "a"})  # NVDEC for `hwaccel: cuda`, no torch


def _entry(node: Node) -> dict:
    return {"NodeID": node.id, "Alive": True, "NodeManagerAddress": node.ip, "Resources": dict(node.resources),
            "Labels": dict(node.labels)}


def placed(monkeypatch, nodes: list[Node], **sections) -> Placement:
    """A Placement built as the controller builds it on a cluster, over stand-in nodes."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [_entry(n) for n in nodes])
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {})
    config = parse_config({"ray": {"address": "10.0.0.1:6380", **sections.pop("ray", {})},
                           "redis": {"url": "redis://10.0.0.9:6379/0"}, "cameras": [], **sections})
    return Placement(config, say=lambda m: None)


@pytest.mark.parametrize("nodes, expected", [
    ([HEAD, INF_1], 1),  # one unit of hydravision_inference: a second replica would wait for it forever
    ([HEAD, INF_1, Node("k" * 56, "10.0.0.5", {"CPU": 4, "hydravision_inference": 1})], 2),  # guard
    ([HEAD, INF_2], 2),  # guard: two units on one node host the two replicas
])
def test_replicas_unset_are_never_more_than_the_nodes_can_host(monkeypatch, nodes, expected):
    """inference.replicas unset is two on CPUs. On a cluster whose only inference node advertises
    hydravision_inference: 1 (docker-compose.yml's ray-worker), the second replica stayed pending: the start
    waited ray.placement_timeout_s (120 s) and then failed with "the nodes ... may be full"."""
    placement = placed(monkeypatch, nodes)
    assert placement.replicas == expected
    hosts = sum(int(n.resources.get("hydravision_inference", 0)) for n in nodes)
    assert placement.replicas <= hosts


def test_replicas_unset_leave_cpus_for_each_other(monkeypatch):
    """ray.inference_cpus 4 on a 4-CPU inference node: one replica fits, two never start together."""
    node = Node("i" * 56, "10.0.0.2", {"CPU": 4, "hydravision_inference": 2})
    assert placed(monkeypatch, [node], ray={"inference_cpus": 4}).replicas == 1


def test_replicas_set_are_as_set(monkeypatch):
    """Guard (normal path): a count the user set is kept, even beyond what is alive now (an autoscaler may add
    nodes for pending actors)."""
    assert placed(monkeypatch, [HEAD, INF_1], inference={"replicas": 3}).replicas == 3


def test_a_gpu_on_a_decoder_node_does_not_make_the_replicas_ask_for_one():
    """docs/scaling.md: GPU nodes may decode (`hwaccel: cuda`) while the model runs on the nodes that advertise
    hydravision_inference. The replicas asked for a GPU because *the cluster* had one, and GPU +
    hydravision_inference is on no node: the start was refused."""
    nodes = [HEAD, INF_1, DECODE_GPU]
    opts = inference_options(parse_config({}).ray, None, nodes)
    assert opts.get("num_gpus") == 0.0
    check_placeable("inference replica 0", opts, nodes)


def test_a_gpu_on_an_inference_node_is_still_used():
    """Guard (normal path): the GPU of a node that runs inference is reserved."""
    gpu_inf = Node("g" * 56, "10.0.0.6", {"CPU": 8, "GPU": 1, "hydravision_inference": 1})
    assert inference_options(parse_config({}).ray, None, [HEAD, gpu_inf, DECODE_GPU])["num_gpus"] == 1.0
    assert inference_options(parse_config({}).ray, None, [HEAD, DECODE_GPU])["num_gpus"] == 1.0  # no resource: any


@pytest.mark.timeout(60)
@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "[::1]:70000", "head.example:abc"])
def test_an_address_whose_port_cannot_be_one_is_refused_at_once(address):
    """A port out of range or not a number: nothing can ever answer there, yet _check_head waited all of
    ray.placement_timeout_s (120 s by default) before saying nothing answers."""
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"^ray.address: .*port"):
        cluster._check_head(address, "ray.address", 8.0)
    assert time.monotonic() - t0 < 4


def _cams(n: int) -> list[dict]:
    return [{"id": f"c{i}", "url": "synthetic://street"} for i in range(n)]


def test_a_local_ray_with_fewer_cpus_than_its_cameras_reserve_is_refused(monkeypatch):
    """ray.num_cpus 1 with 4 cameras of ray.stream_cpus 0.5: Ray starts with 1 logical CPU, the cameras'
    processes reserve 2, the second never starts, and the start waited 60 s + 5 s a camera for it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = []
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: started.append(kw))
    config = parse_config({"ray": {"num_cpus": 1, "stream_cpus": 0.5}, "cameras": _cams(4)})
    with pytest.raises(UserError, match=r"^ray.num_cpus: 1 .* 2"):
        init_ray(config, {})
    assert started == []


def test_a_local_ray_with_enough_cpus_starts(monkeypatch):
    """Guard (normal path): ray.num_cpus that covers the cameras is passed to Ray as it is."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = []
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: started.append(kw))
    init_ray(parse_config({"ray": {"num_cpus": 2, "stream_cpus": 0.5}, "cameras": _cams(4)}), {})
    assert started[0]["num_cpus"] == 2


def test_a_local_ray_refusing_its_settings_is_a_user_error(monkeypatch):
    """ray.object_store_mb larger than the machine's memory: ray.init raises a ValueError, which the CLI showed
    as a bug with its traceback instead of the setting to change."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def refuse(**kw):  # Ray's own words (ray/_private/resource_and_label_spec.py)
        raise ValueError("After taking into account object store and redis memory usage, the amount of memory on "
                         "this node available for tasks and actors (-98.2 GB) is less than -613% of total. You can "
                         "adjust these settings with ray.init(memory=<bytes>, object_store_memory=<bytes>).")

    monkeypatch.setattr(cluster.ray, "init", refuse)
    with pytest.raises(UserError, match=r"ray.object_store_mb"):
        init_ray(parse_config({"ray": {"object_store_mb": 100_000_000}, "cameras": _cams(1)}), {})


@pytest.mark.parametrize("section, field, value", [
    ("ray", "placement_timeout_s", float("inf")),  # ray.get(timeout=inf): OverflowError at the first wait
    ("ray", "placement_timeout_s", 1e300),  # finite, but not an int64 of milliseconds either
    ("ray", "stream_cpus", 0.00001),  # below Ray's 0.0001: .options() raises a ValueError at spawn
    ("ray", "inference_cpus", 0.00005),
    ("inference", "num_gpus", 0.00001),
])
def test_settings_ray_cannot_take_are_refused_by_name(section, field, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{field}"):
        parse_config({section: {field: value}})


@pytest.mark.parametrize("wanted", [{"GPU": float("inf")}, {"hydravision_inference": -1}])
def test_wait_for_resources_that_mean_nothing_are_refused(wanted):
    """inf can never be offered (the start waited the whole timeout for it); a negative amount was silently
    dropped."""
    with pytest.raises(ConfigError, match=r"ray\.wait_for_resources"):
        parse_config({"ray": {"wait_for_resources": wanted}})


def test_ray_settings_ray_takes_are_accepted():
    """Guard (normal path): zero CPUs, 0.0001 of a unit, 0 wanted (configs/compose.yaml's GPU: 0)."""
    config = parse_config({"ray": {"stream_cpus": 0, "inference_cpus": 0.0001, "placement_timeout_s": 3600,
                                   "wait_for_resources": {"hydravision_inference": 1, "GPU": 0}},
                           "inference": {"num_gpus": 0.25}})
    assert config.ray.wait_for_resources == {"hydravision_inference": 1, "GPU": 0}


def test_a_namespace_set_in_the_config_is_named_when_it_is_taken():
    """ray.namespace set: a name already taken there belongs to whichever pipeline chose that namespace, whatever
    its Redis prefix. The error said the other pipeline had this one's prefix and to change redis.prefix, which
    changes nothing while ray.namespace is set."""
    class Taken:
        @staticmethod
        def options(**options):
            def remote(*args):
                raise ValueError(f"The name {options['name']} (namespace={options['namespace']}) is already taken.")
            return type("Opts", (), {"remote": staticmethod(remote)})

    placement = Placement.__new__(Placement)
    placement.config = parse_config({"ray": {"namespace": "site-7"}, "redis": {"prefix": "shop2"}})
    placement.namespace = "site-7"
    with pytest.raises(UserError) as info:
        placement.spawn(Taken, {"name": "hv-inference-0", "namespace": "site-7"})
    text = str(info.value)
    assert "ray.namespace" in text and "site-7" in text
    assert "redis.prefix" not in text and "'shop2'" not in text
