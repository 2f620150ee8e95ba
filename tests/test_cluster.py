"""Cluster mode (issue 16) on real raylets: a Ray head and three worker nodes on this machine, each with its own
resources and labels (``ray.cluster_utils.Cluster``, which Ray's own multi-node tests use), one of them without
torch. The pipeline places its actors where the config says, and when a node is killed its cameras and its
inference replica come back on the others: no frame published twice, no track id reused.

Two pipelines on one Ray (the session's local one) are kept apart by their namespaces.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray

from pipeline.app import RAY_SYSTEM_CONFIG, App
from pipeline.config import parse_config
from pipeline.errors import UserError
from running import events, messages, wait_for
from test_e2e import DEMO
from workers.publish import keys, validate

ROOT = Path(__file__).resolve().parent.parent
# A killed node is declared dead after ~5 missed health checks; Ray's defaults (every 3 s, 10 s timeout)
# take 15-30 s. Tighter here to keep the test short, loose enough for a loaded 2-core machine.
NODE_DEATH = {"health_check_initial_delay_ms": 2000, "health_check_period_ms": 1000,
              "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}
FPS = 4


@pytest.fixture
def ray_cluster(ray_free, monkeypatch):
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="hvc", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    (tmp / "ray").mkdir()
    # Ray records "the current cluster" under $RAY_TMPDIR/ray: a plain ray.init() elsewhere on this shared
    # machine would join ours if that were /tmp/ray.
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # The nodes take the machine's address, as on a real cluster: a driver cannot join a loopback-only cluster
    # (ray.init resolves 127.0.0.1 in an address to the machine's address).
    common = dict(temp_dir=str(tmp), object_store_memory=80 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, include_dashboard=False, _system_config={**RAY_SYSTEM_CONFIG, **NODE_DEATH}, **common))
    try:
        yield cluster, tmp, common
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def no_torch_env(tmp: Path) -> dict[str, str]:
    """A worker node whose Python cannot import torch (as a node with a different environment would be): a
    `torch` package that fails to import, ahead of the venv on the path of that node's processes."""
    stub = tmp / "notorch" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("torch is not installed on this node")\n')
    return {"PYTHONPATH": f"{stub.parent}:{ROOT}"}


def actor_nodes() -> dict[str, str]:
    """Name -> node id of this job's alive actors, from the GCS actor table (what `ray list actors` shows;
    ray.util.state needs the dashboard, which this install does not have)."""
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    return {a["Name"]: a["Address"]["NodeID"] for a in actors().values()
            if a["JobID"] == job and a["Name"] and a["State"] == "ALIVE"}


def node_of(name: str) -> str | None:
    return actor_nodes().get(name)


@ray.remote(num_cpus=0)
def imports_torch() -> str:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"no torch: {e}"
    return "torch"


def started_ids(client, camera: str) -> dict[tuple[str, int], float]:
    return {(e["head"], e["track_id"]): e["ts"] for e in events(client, camera, "track_started")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_actors_land_where_configured_and_move_when_a_node_dies(ray_cluster, redis_server):
    cluster, tmp, common = ray_cluster
    t_setup = time.monotonic()
    node_a = cluster.add_node(num_cpus=1, resources={"hydravision_inference": 2}, labels={"zone": "a"}, **common)
    node_b = cluster.add_node(num_cpus=1, resources={"hydravision_inference": 2}, labels={"zone": "b"}, **common)
    node_c = cluster.add_node(num_cpus=1, resources={"site_c": 4}, labels={"zone": "c"}, env_vars=no_torch_env(tmp),
                              **common)
    cluster.wait_for_nodes()
    a, b, c, head = node_a.node_id, node_b.node_id, node_c.node_id, cluster.head_node.node_id
    config = parse_config({
        "redis": {"url": redis_server.url},
        "ray": {"address": cluster.address},
        "model": {"checkpoint": str(DEMO), "device": "cpu"},
        "inference": {"replicas": 2, "threads": 1, "max_batch": 4, "max_wait_ms": 5},
        "status": {"interval_s": 0.5},
        "cameras": [
            # prefers zone a, may move; pinned to zone b; needs a resource only node c has (the torch-less one)
            {"id": "cam-a", "url": f"synthetic://street?seed=21&fps={FPS}",
             "placement": {"labels": {"zone": "a"}, "strict": False}},
            {"id": "cam-b", "url": f"synthetic://street?seed=22&fps={FPS}", "placement": {"labels": {"zone": "b"}}},
            {"id": "cam-c", "url": f"synthetic://street?seed=23&fps={FPS}", "placement": {"resources": {"site_c": 1}}},
        ],
    })
    said: list[str] = []
    app = App(config, say=said.append)
    client = redis_server.client()
    ticker = threading.Thread(target=app.run, daemon=True)  # the controller's status loop, as `hydravision run`
    try:
        app.start()
        assert app.placement.namespace == "hydravision-hv"
        # The controller knows where every actor runs once it has started, before its status loop ticks: a
        # node lost in the first seconds is still reported with what ran on it.
        assert app.node_watch.where == {("camera", "cam-a"): a, ("camera", "cam-b"): b, ("camera", "cam-c"): c,
                                        **{("inference", i): node_of(f"hv-inference-{i}") for i in range(2)}}
        t_started = time.monotonic()
        assert ray.get(imports_torch.options(resources={"site_c": 0.01}).remote(), timeout=60).startswith("no torch")
        assert ray.get(imports_torch.options(resources={"hydravision_inference": 0.01}).remote(), timeout=60) == "torch"

        # 1. where everything landed, from the GCS actor table
        replicas = {node_of(f"hv-inference-{i}") for i in range(2)}
        assert replicas == {a, b}, f"replicas on {replicas}; nodes a={a} b={b} c={c} head={head}"
        assert (node_of("hv-camera-cam-a"), node_of("hv-camera-cam-b"), node_of("hv-camera-cam-c")) == (a, b, c)
        assert app.placement.assigner.of == {"cam-a": 0, "cam-b": 1, "cam-c": 0}
        on_a = [i for i in range(2) if node_of(f"hv-inference-{i}") == a]  # the replica that will move
        ticker.start()
        try:
            cams = ["cam-a", "cam-b", "cam-c"]
            wait_for(lambda: all(len(messages(client, cid)) >= 12 for cid in cams), 90, "frames from every camera")
            wait_for(lambda: started_ids(client, "cam-a"), 60, "tracks on cam-a")
            before = {cid: started_ids(client, cid) for cid in cams}
            last_frame = {cid: messages(client, cid)[-1]["frame"] for cid in cams}

            # 2. node a dies (SIGKILL to its raylet, workers and agents, like a machine that lost power)
            t_kill = time.time()
            cluster.remove_node(node_a, allow_graceful=False)
            for cid in cams:
                wait_for(lambda: any(m["frame"] > last_frame[cid] and m["ts"] > t_kill for m in messages(client, cid)),
                         120, f"{cid} publishing again after node a died")
            lost = wait_for(lambda: events(client, "*", "node_lost"), 30, "a node_lost event")
            wait_for(lambda: [e for e in events(client, "cam-a", "worker_restarted") if e.get("from_node") == a],
                     30, "worker_restarted for cam-a, moved off node a")
            wait_for(lambda: [e for e in events(client, "*", "worker_restarted")
                              if e.get("worker") == "inference" and e.get("from_node") == a], 60,
                     "worker_restarted for the inference replica that was on node a")
            # new tracks after the move, to check their ids against the old ones
            wait_for(lambda: [t for t in started_ids(client, "cam-a").values() if t > t_kill], 60, "new tracks on cam-a")
        except AssertionError:
            print("\n".join(said))
            print(f"nodes a={a} b={b} c={c} head={head}")
            print("\n".join(str(e) for e in events(client) if e["type"] in ("node_lost", "worker_restarted")))
            raise
        finally:
            app.request_stop()
            ticker.join(30)
        after_nodes = {name: node_of(name) for name in
                       ("hv-camera-cam-a", "hv-camera-cam-b", "hv-camera-cam-c", "hv-inference-0", "hv-inference-1")}
    finally:
        finals = app.shutdown()

    # Resumed: the capture time of the first frame published after the kill (frames captured while a camera's
    # actor or replica was gone were never published).
    resumed = {cid: min(m["ts"] for m in messages(client, cid) if m["ts"] > t_kill) - t_kill
               for cid in ("cam-a", "cam-b", "cam-c")}
    print(f"\ncluster up and pipeline started in {t_started - t_setup:.1f} s; node a killed: node_lost after "
          f"{lost[0]['ts'] - t_kill:.1f} s; first frame published after the kill, by capture time: "
          + ", ".join(f"{cid} {s:.1f} s" for cid, s in resumed.items())
          + f" (replica per camera {app.placement.assigner.of}; replica {on_a} was on node a with cam-a)")
    print("\n".join(line for line in said if "node" in line.lower() or "restarted" in line))

    # 3. the node_lost event says what was there; everything now runs on the survivors, inference never on c
    assert lost[0]["node"] == a and lost[0]["cameras"] == ["cam-a"] and lost[0]["inference"] == on_a
    assert after_nodes["hv-camera-cam-a"] not in (a, None)
    assert (after_nodes["hv-camera-cam-b"], after_nodes["hv-camera-cam-c"]) == (b, c)
    assert after_nodes["hv-inference-0"] == after_nodes["hv-inference-1"] == b
    assert max(resumed.values()) < 60, resumed

    # 4. nothing published twice, every message valid, no (camera, head, track_id) started twice or reused
    for cid in ("cam-a", "cam-b", "cam-c"):
        msgs = messages(client, cid)
        for m in msgs:
            validate(m, "detection")
        frames = [m["frame"] for m in msgs]
        assert frames == sorted(set(frames)), f"{cid}: frames published twice or out of order"
        pts = [m["pts"] for m in msgs]
        assert pts == sorted(pts), f"{cid}: pts went backwards"
        started = [(e["head"], e["track_id"]) for e in events(client, cid, "track_started")]
        assert len(started) == len(set(started)), f"{cid}: a track id was started twice"
    moved_ids = [(h, i) for (h, i), t in started_ids(client, "cam-a").items() if t > t_kill]
    for head, tid in moved_ids:  # the restarted tracker on another node numbers above the ids seen before
        assert tid > max((i for (h, i) in before["cam-a"] if h == head), default=-1), (head, tid, before["cam-a"])
    for e in events(client):
        validate(e, "event")
    assert {f["camera"]: f["state"] for f in finals} == {"cam-a": "stopped", "cam-b": "stopped", "cam-c": "stopped"}


def _config(redis_url: str, checkpoint: Path, prefix: str) -> object:
    return parse_config({
        "redis": {"url": redis_url, "prefix": prefix},
        "model": {"checkpoint": str(checkpoint), "device": "cpu"},
        "inference": {"max_batch": 4, "max_wait_ms": 5, "threads": 1},
        "cameras": [{"id": "lobby", "url": "synthetic://street?seed=5&frames=30", "realtime": False}],
    })


@pytest.mark.timeout(180)
def test_two_pipelines_on_one_cluster_do_not_collide(ray_local, redis_server, tiny_checkpoint):
    """Same camera id, same Ray, same Redis: different prefixes keep actors and keys apart; a second
    pipeline with the same prefix is refused with a clear error instead of taking over the first one's actors: on
    the same Redis by the prefix's lease, on another Redis (database 1 here) by the Ray namespace."""
    first, second = (App(_config(redis_server.url, tiny_checkpoint, p), say=lambda m: None) for p in ("shop1", "shop2"))
    clash = App(_config(redis_server.url, tiny_checkpoint, "shop1"), say=lambda m: None)
    elsewhere = App(_config(redis_server.url.rsplit("/", 1)[0] + "/1", tiny_checkpoint, "shop1"), say=lambda m: None)
    started = []
    try:
        for app in (first, second):
            app.start()
            started.append(app)
        with pytest.raises(UserError, match="redis.prefix 'shop1': another hydravision service runs with this prefix"):
            clash.start()
        with pytest.raises(UserError, match="already exists in Ray namespace hydravision-shop1"):
            elsewhere.start()
        assert first.placement.namespace != second.placement.namespace
        for app in (first, second):
            app.run(duration=90)  # returns when the camera's 30 frames are done
        assert ray.get_actor("hv-camera-lobby", namespace="hydravision-shop1") is not None
    finally:
        finals = [app.shutdown() for app in started]
        clash.shutdown()  # releases its reaper; it created no actor
        elsewhere.shutdown()
    client = redis_server.client()
    for prefix, final in zip(("shop1", "shop2"), finals):
        frames = [m["frame"] for m in messages(client, "lobby", prefix)]
        assert frames == list(range(30)), (prefix, frames)
        assert final[0]["published"] == 30 and final[0]["state"] == "ended"
        assert client.hexists(keys(prefix).cameras, "lobby")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inference, placement, error", [
    ({"num_gpus": 1}, None, "inference replica 0 cannot be placed: it needs GPU=1"),
    ({}, {"resources": {"site_x": 1}}, "camera lobby cannot be placed: it needs CPU=0.1, site_x=1"),
    ({}, {"labels": {"zone": "x"}}, "camera lobby cannot be placed: it needs CPU=0.1; labels zone=x"),
])
def test_a_placement_no_node_can_take_is_refused_at_once(ray_local, redis_server, tiny_checkpoint, inference,
                                                         placement, error):
    config = parse_config({
        "redis": {"url": redis_server.url},
        "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu"},
        "inference": {"threads": 1, **inference},
        "cameras": [{"id": "lobby", "url": "synthetic://street?seed=5", "placement": placement}],
    })
    app = App(config, say=lambda m: None)
    t0 = time.monotonic()
    try:
        with pytest.raises(UserError) as info:
            app.start()
    finally:
        app.shutdown()
    assert error in str(info.value) and "Nodes:" in str(info.value)
    assert time.monotonic() - t0 < 60  # refused, not left waiting for a node that will never come


@pytest.mark.timeout(60)
def test_waiting_for_nodes_that_do_not_come_is_a_clear_error(ray_local):
    from pipeline.cluster import wait_for_resources

    said: list[str] = []
    wait_for_resources({"CPU": 1, "GPU": 0}, 1.0, said.append)  # there already: no wait, nothing said
    assert said == []
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"after 1 s the cluster offers only hydravision_inference 0/1\. Nodes:"):
        wait_for_resources({"hydravision_inference": 1, "CPU": 1}, 1.0, said.append)
    assert 1.0 <= time.monotonic() - t0 < 10 and said == ["Waiting up to 1 s for the Ray cluster to offer "
                                                           "hydravision_inference=1, CPU=1"]



SHUTDOWN_SCRIPT = """
import json, logging, ray
from pipeline.cluster import shutdown_ray
ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
         logging_level=logging.WARNING)
node = ray._private.worker._global_node
started = {kind: [p.process for p in infos] for kind, infos in node.all_processes.items()}
seen = {}
real_shutdown = ray.shutdown
def shutdown(*args, **kwargs):  # what is still running when Ray's own shutdown begins
    seen.update({kind: [p.poll() is None for p in procs] for kind, procs in started.items()})
    real_shutdown(*args, **kwargs)
ray.shutdown = shutdown
shutdown_ray()
print(json.dumps({"alive_at_shutdown": seen,
                  "alive_after": [kind for kind, procs in started.items() if any(p.poll() is None for p in procs)]}))
"""


@pytest.mark.timeout(120)
def test_a_local_ray_is_shut_down_without_waiting_on_its_autoscaler_monitor():
    """ray.shutdown() stops the monitor after the GCS, and the monitor then spends Ray's 1 s grace trying to
    reach the gone GCS: shutdown_ray() kills it first, and Ray's own shutdown still stops everything else."""
    import json
    import os
    import subprocess

    tmp = tempfile.mkdtemp(prefix="hvs", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], capture_output=True, encoding="utf-8",
                             timeout=100, env=env, cwd=ROOT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    alive = result["alive_at_shutdown"]
    assert alive["monitor"] == [False], alive
    assert alive["raylet"] == [True] and alive["gcs_server"] == [True], alive  # the rest is left to Ray
    assert result["alive_after"] == [], result


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-s", "-q"]))
