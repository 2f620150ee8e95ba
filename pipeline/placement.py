"""Where the pipeline's actors run on a Ray cluster: the ``.options(...)`` of each InferenceActor replica and
each camera's StreamActor, checked against the nodes alive before anything is created, and the namespace that
keeps two pipelines on one cluster apart.

Pure functions over a snapshot of the nodes (``Node``), so the unit tests need no Ray. The rules:

- inference replicas reserve a GPU when the cluster has one (or ``inference.num_gpus``), one unit of the
  custom resource ``ray.inference_resource`` when any node advertises it (nodes without torch simply do
  not), and ``ray.inference_cpus``; they are spread over the nodes that qualify;
- a camera reserves ``ray.stream_cpus`` and whatever its ``placement`` asks (node labels, hard or preferred;
  custom resources); cameras without a placement are spread over the cluster;
- cameras with the same placement share a StreamActor process, ``ray.cameras_per_process`` of them, or unset
  as many as spread them over the cores (``group_cameras``); the process reserves what its cameras do;
- ``inference.replicas`` unset: one replica where the replicas get a GPU, two on CPUs (two one-thread model
  processes beat one two-thread process on a 2-core machine: docs/architecture.md, "Two replicas on a CPU");
  unset ``inference.threads``: a replica takes its node's cores divided by the replicas placed per node;
- each camera is served by the replica with the fewest cameras (stable: a camera keeps its replica), not by one
  that a lost node left waiting for a node to join;
- ``inference.in_camera_process`` unset: on the CPUs of one machine there are no replicas, each camera
  process runs the model for its own cameras (``model_in_camera_process``);
- a demand that no alive node could ever meet is refused at once with a ``UserError`` naming the nodes,
  instead of an actor that waits forever.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pipeline.errors import UserError
from workers.settings import CameraConfig, runs_on_cpu_only

# Ray's own resources, not worth showing in an error about what a node offers.
_HIDDEN = ("memory", "object_store_memory", "node:")


@dataclass(frozen=True)
class Node:
    """One alive Ray node as placement sees it: total resources and labels."""

    id: str
    ip: str
    resources: Mapping[str, float]
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, entry: Mapping[str, Any]) -> "Node":
        """From one entry of ``ray.nodes()``. Ray's own labels (``ray.io/...``) are kept: a placement may ask
        for them, and Ray's label selector matches them."""
        return cls(entry["NodeID"], entry.get("NodeManagerAddress", "?"), dict(entry.get("Resources") or {}),
                   dict(entry.get("Labels") or {}))

    def describe(self) -> str:
        shown = {k: v for k, v in self.resources.items() if not k.startswith(_HIDDEN)}
        text = ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "no resources"
        labels = {k: v for k, v in self.labels.items() if k != "ray.io/node-id"}  # the id is shown already
        if labels:
            text += "; labels " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return f"{self.id[:8]} ({self.ip}): {text}"


def alive_nodes(entries: Iterable[Mapping[str, Any]]) -> list[Node]:
    return [Node.from_ray(e) for e in entries if e.get("Alive")]


def namespace_for(ray_namespace: str | None, redis_prefix: str) -> str:
    """The Ray namespace of one pipeline's named actors: two pipelines with different Redis prefixes never
    share actor names; two with the same prefix would also share Redis keys, so they collide on purpose."""
    return ray_namespace or f"hydravision-{redis_prefix}"


def demand(options: Mapping[str, Any]) -> dict[str, float]:
    """The resources an actor's options reserve, by Ray resource name (amounts of 0 left out)."""
    out = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0)}
    out.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in out.items() if v > 0}


def fits(node: Node, options: Mapping[str, Any]) -> bool:
    """Could this node ever host the actor (its totals, not what is free now; hard labels only)?"""
    if any(node.resources.get(k, 0.0) + 1e-9 < v for k, v in demand(options).items()):
        return False
    if options.get("fallback_strategy"):  # labels are a preference: any node will do
        return True
    return all(node.labels.get(k) == v for k, v in (options.get("label_selector") or {}).items())


def check_placeable(what: str, options: Mapping[str, Any], nodes: list[Node]) -> None:
    """Raises a UserError when no alive node could host the actor: Ray would keep it pending forever."""
    if any(fits(n, options) for n in nodes):
        return
    wants = ", ".join(f"{k}={v:g}" for k, v in demand(options).items()) or "nothing"
    if options.get("label_selector") and not options.get("fallback_strategy"):
        wants += "; labels " + ", ".join(f"{k}={v}" for k, v in options["label_selector"].items())
    listing = "\n  ".join(n.describe() for n in nodes) or "(no alive node)"
    raise UserError(f"{what} cannot be placed: it needs {wants}, and no node of the Ray cluster has that.\n"
                    f"Nodes:\n  {listing}\n({node_hint(*node_needs(options, nodes))}, or change the config)")


def node_needs(options: Mapping[str, Any], nodes: list[Node]) -> tuple[dict[str, float], dict[str, str]]:
    """What a node must offer to host the actor, as (resources with their amounts, hard labels): its whole demand,
    but CPU only where no node in ``nodes`` has enough (`ray start` gives a node its machine's CPUs). For a
    message about an actor that fits none of ``nodes``: what the node that would take it has to bring."""
    resources = demand(options)
    if "CPU" in resources and any(fits(n, {"num_cpus": resources["CPU"]}) for n in nodes):
        del resources["CPU"]
    return resources, {} if options.get("fallback_strategy") else dict(options.get("label_selector") or {})


def describe_needs(resources: Mapping[str, float], labels: Mapping[str, str]) -> str:
    """``node_needs``' answer in words: "hydravision_inference=1", "label site=z", ..."""
    parts = [f"{k}={v:g}" for k, v in resources.items()]
    if labels:
        parts.append(("label " if len(labels) == 1 else "labels ") + ", ".join(f"{k}={v}" for k, v in labels.items()))
    return " and ".join(parts) or "nothing"


def node_hint(resources: Mapping[str, float], labels: Mapping[str, str]) -> str:
    """How a node offering what ``node_needs`` found joins: `ray start` with the flags for it (a label is given
    with --labels, Ray 2.60; --resources takes custom resources only)."""
    if any(k.startswith("ray.io/") for k in labels):
        return "start a node that Ray gives that label (ray.io/ labels are Ray's own: --labels cannot set them)"
    flags = ["ray start --address=HEAD:6380"]
    if "CPU" in resources:
        flags.append(f"--num-cpus={math.ceil(resources['CPU'])}")
    if "GPU" in resources:
        flags.append(f"--num-gpus={math.ceil(resources['GPU'])}")
    if custom := {k: int(v) if v == int(v) else v for k, v in resources.items() if k not in ("CPU", "GPU")}:
        flags.append(f"--resources='{json.dumps(custom)}'")
    if labels:
        flags.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    return f"start a node that offers it, e.g. `{' '.join(flags)}`"


def short_together(options: Iterable[Mapping[str, Any]], nodes: list[Node]) -> dict[str, tuple[float, float]]:
    """What actors with these options reserve together beyond the nodes: resource -> (reserved, the nodes' sum),
    for what the actors left without a node lack. Each may fit a node alone (``check_placeable``) while the last
    ones wait for room that never comes. Node by node: Ray takes an actor's whole reservation from one node, so
    two nodes with 1 CPU each do not host a 2-CPU actor. Placed largest first, each on the first node with room
    (first-fit decreasing: a quick estimate, as Ray's own scheduler does not look for the best packing either)."""
    left = [Node(n.id, n.ip, dict(n.resources), n.labels) for n in nodes]  # what each node has left
    wanted: collections.Counter = collections.Counter()
    short: set[str] = set()
    for opts in sorted(options, key=lambda o: -sum(demand(o).values())):
        wants = demand(opts)
        wanted.update(wants)
        node = next((n for n in left if fits(n, opts)), None)
        if node is None:  # the resources no node has enough of, else those some node lacks
            lacking = [{k for k, v in wants.items() if n.resources.get(k, 0.0) + 1e-9 < v} for n in left]
            everywhere = set.intersection(*lacking) if lacking else set()
            short.update(everywhere or set().union(*lacking))
            continue
        for k, v in wants.items():
            node.resources[k] -= v  # type: ignore[index]  # our own copy
    return {k: (wanted[k], sum(n.resources.get(k, 0.0) for n in nodes)) for k in sorted(short)}


def free_nodes(nodes: list[Node], free: Mapping[str, Mapping[str, float]]) -> list[Node]:
    """The nodes with what is free on each now instead of their totals (``free``: Ray's available resources by
    node id, which leave a used-up resource out); a node missing from ``free`` keeps its totals."""
    return [Node(n.id, n.ip, {k: float(free[n.id].get(k, 0.0)) for k in n.resources}, n.labels)
            if n.id in free else n for n in nodes]


def replica_gpus(inference_cfg: Any, model_cfg: Any) -> float | None:
    """What ``inference_options`` gets as ``num_gpus``: ``inference.num_gpus``, else None (a GPU where the cluster
    has one), but 0 for a model that runs on the CPU only (``model.device: cpu``, OpenVINO, int8): a reserved GPU
    would sit unused, and the replicas would be counted and placed as GPU ones (one replica, no model in the
    camera processes)."""
    cpu_only = model_cfg.device == "cpu" or runs_on_cpu_only(model_cfg.backend, model_cfg.precision)
    if inference_cfg.num_gpus is None and cpu_only:
        return 0.0
    return inference_cfg.num_gpus


def inference_options(ray_cfg: Any, num_gpus: float | None, nodes: list[Node]) -> dict[str, Any]:
    """Options for every InferenceActor replica (``ray_cfg``: the config's RayConfig). A GPU is looked for on
    the nodes that can run inference only: a GPU node that decodes (``hwaccel: cuda``) without the inference
    resource would make the replicas ask for GPU and resource together, which no node has."""
    hosts = [n for n in nodes if n.resources.get(ray_cfg.inference_resource, 0) > 0]
    gpus = num_gpus if num_gpus is not None else (
        1.0 if sum(n.resources.get("GPU", 0) for n in hosts or nodes) >= 1 else 0.0)
    opts: dict[str, Any] = {"num_cpus": ray_cfg.inference_cpus, "num_gpus": gpus}
    if hosts:
        opts["resources"] = {ray_cfg.inference_resource: 1.0}
    if len(nodes) > 1:
        opts["scheduling_strategy"] = "SPREAD"  # replicas on different nodes: losing one node loses one replica
    return opts


def replica_count(inference_cfg: Any, device: str, gpus_per_replica: float, cores: int | None,
                  room: int | None = None) -> int:
    """``inference.replicas`` or, unset, 1 on GPUs (``gpus_per_replica`` > 0, device cuda or mps) and 2 on CPUs
    of two cores or more (``cores``: the machine's, None when unknown), but no more than the ``room`` the nodes
    have for them (``replica_room``): a replica beyond it would wait for a place until the start times out."""
    if inference_cfg.replicas:
        return inference_cfg.replicas
    on_gpu = gpus_per_replica > 0 or device.startswith("cuda")
    count = 1 if on_gpu or device == "mps" or (cores or 2) < 2 else 2
    return count if room is None else max(1, min(count, room))


def replica_room(options: Mapping[str, Any], nodes: list[Node]) -> int | None:
    """How many replicas with these options the nodes could host at once, by their totals (None: they reserve
    nothing, so any number)."""
    wants = demand(options)
    if not wants:
        return None
    return sum(min(int(n.resources.get(k, 0.0) / v + 1e-9) for k, v in wants.items())
               for n in nodes if fits(n, options))


def model_in_camera_process(inference_cfg: Any, device: str, gpus_per_replica: float, cluster: bool) -> bool:
    """``inference.in_camera_process`` or, unset, True where the model runs on the CPUs of one machine (no GPU
    for the replicas, device auto or cpu, no Ray cluster joined): the camera processes then run it themselves,
    with no Ray call per frame (docs/architecture.md, "The model in the camera processes")."""
    if inference_cfg.in_camera_process is not None:
        return inference_cfg.in_camera_process
    return gpus_per_replica == 0 and device in ("auto", "cpu") and not cluster


def camera_process_device(device: str) -> str:
    """``model.device`` for the camera processes that run the model themselves: 'auto' is the CPU there. They
    reserve no GPU (the model is in them where the replicas get none, e.g. ``inference.num_gpus: 0``), so 'auto'
    picking CUDA on a GPU machine put a model copy and a CUDA context in every camera process, unreserved."""
    return "cpu" if device == "auto" else device


def replicas_per_node(replicas: int, nodes: list[Node], options: Mapping[str, Any]) -> int:
    """How many replicas share a node once spread over the nodes that can host them (``options``: the
    replicas' ``inference_options``): their torch threads split its cores."""
    hosts = sum(fits(n, options) for n in nodes)
    return max(1, math.ceil(replicas / max(1, hosts)))


def stream_options(ray_cfg: Any, camera: CameraConfig) -> dict[str, Any]:
    """Options for one camera's StreamActor."""
    opts: dict[str, Any] = {"num_cpus": ray_cfg.stream_cpus}
    place = camera.placement
    if place and place.resources:
        opts["resources"] = dict(place.resources)
    if place and place.labels:
        opts["label_selector"] = dict(place.labels)
        if not place.strict:
            opts["fallback_strategy"] = [{"label_selector": {}}]  # then: any node
    if not (place and (place.resources or place.labels)):
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def cameras_per_process(ray_cfg: Any, cameras: int, cores: int) -> int:
    """``ray.cameras_per_process`` or, unset, the fewest per process that leave no more processes than
    ``cores`` (the machine's, or the cluster's CPUs): each process costs CPU even when idle (Ray's 10-ms timer),
    and more processes than cores only take turns."""
    if ray_cfg.cameras_per_process:
        return ray_cfg.cameras_per_process
    return max(1, math.ceil(cameras / max(1, cores)))


def group_cameras(ray_cfg: Any, cameras: list[CameraConfig], cores: int) -> list[tuple[list[CameraConfig], dict]]:
    """The StreamActor processes for ``cameras`` started together: (cameras, options) each. Only cameras whose
    options are the same share a process (a pinned camera never drags another along); a process reserves the
    sum of its cameras' CPUs and custom resources."""
    per = cameras_per_process(ray_cfg, len(cameras), cores)
    by_options: dict[str, list[CameraConfig]] = {}
    for camera in cameras:
        by_options.setdefault(json.dumps(stream_options(ray_cfg, camera), sort_keys=True), []).append(camera)
    groups = []
    for same in by_options.values():
        for i in range(0, len(same), per):
            group = same[i:i + per]
            opts = stream_options(ray_cfg, group[0])
            opts["num_cpus"] = ray_cfg.stream_cpus * len(group)
            if "resources" in opts:
                opts["resources"] = {k: v * len(group) for k, v in opts["resources"].items()}
            groups.append((group, opts))
    return groups


def local_cpus(ray_cfg: Any, replicas: int, cameras: int, spare_cameras: int = 16) -> int:
    """Logical CPUs for a Ray this process starts itself: the machine's cores, or more when the reservations
    need it (on one machine the OS shares the cores anyway; Ray's count is only a budget), with room for
    cameras added at run time."""
    need = replicas * ray_cfg.inference_cpus + (cameras + spare_cameras) * ray_cfg.stream_cpus
    return max(1, math.ceil(need - 1e-9))


class ReplicaAssigner:
    """Which inference replica serves which camera: the one with the fewest cameras, lowest index on a tie.
    A camera keeps its replica while it exists; cameras no longer in ``live`` free their place."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self.of: dict[str, int] = {}

    def assign(self, camera: str, live: Iterable[str] = (), waiting: Mapping[int, str] | None = None) -> int:
        """``waiting``: replicas a lost node left waiting for a node to join -> what that node needs; a new camera
        is given none of them (its start would fail on the pending replica), and with all of them waiting it is
        refused (a UserError). A camera that has its replica keeps it."""
        keep, waiting = set(live) | {camera}, waiting or {}
        self.of = {c: r for c, r in self.of.items() if c in keep}
        if camera not in self.of:
            running = [r for r in range(self.replicas) if r not in waiting]
            if not running:
                raise UserError(f"camera {camera}: no inference replica runs to send its frames to: "
                                + "; ".join(f"inference replica {r} waits for a node with {needs} to join"
                                            for r, needs in sorted(waiting.items()))
                                + f" (lost with {'its node' if len(waiting) == 1 else 'their nodes'}). "
                                "Add the camera once such a node has joined")
            load = collections.Counter(self.of.values())
            self.of[camera] = min(running, key=lambda r: (load[r], r))
        return self.of[camera]
