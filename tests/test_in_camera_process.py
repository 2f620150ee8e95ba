"""``inference.in_camera_process``: each camera process loads the model and batches its own cameras' frames
(no InferenceActor, no Ray call per frame). Every frame is computed and published once, in order; the model's
numbers reach /metrics under the process's name; a crashed process comes back with its model."""

from __future__ import annotations

import time

import pytest
import ray

from pipeline.app import App
from pipeline.config import ConfigError, parse_config
from pipeline.metrics import ready
from running import RunningApp, events, messages, wait_for
from test_e2e import make_app, validate_all
from workers.cores import usable_cores

FRAMES = 30


def ask_counted(app: App) -> dict:
    """One ``app.stats()`` with the camera processes' handles wrapped to record which of their methods it calls."""
    calls: list[str] = []

    class Counted:
        def __init__(self, handle):
            self.handle = handle

        def __getattr__(self, name: str):
            calls.append(name)
            return getattr(self.handle, name)

    handles = {cid: h.process for cid, h in app.cameras.items()}
    counted = {id(p): Counted(p) for p in handles.values()}  # a process's cameras share its handle, and the proxy
    for h in app.cameras.values():
        h.process = counted[id(h.process)]
    try:
        stats = app.stats()
    finally:
        for cid, h in app.cameras.items():
            h.process = handles[cid]
    return {"stats": stats, "calls": calls}


@pytest.mark.timeout(180)
def test_each_camera_process_runs_the_model_for_its_own_cameras(ray_local, any_redis, tiny_checkpoint):
    """The demo's path (the model in the camera processes), also on Redis 6.2: what the demo embeds where no
    redis-server is installed."""
    ids = ["a", "b", "c"]
    cameras = [{"id": cid, "url": f"synthetic://street?seed={60 + i}&frames={FRAMES}", "realtime": False}
               for i, cid in enumerate(ids)]
    app = make_app(any_redis.url, tiny_checkpoint, cameras, in_camera_process=True)
    app.config.ray.cameras_per_process = 2
    app.config.model.distribute = "object_store"  # the checkpoint's bytes, as a cluster's nodes get it
    said: list[str] = []
    app.say = said.append
    app.start()
    holders = app.model_holders()
    assert app.inference == [] and sorted(holders) == ["hv-camera-a+b", "hv-camera-c"], holders
    # A status tick asks each process once, for its cameras and its model together (a call per camera and per
    # model cost 10-23 ms more CPU per tick at 8 cameras: docs/architecture.md, "Cameras per process").
    asked = ask_counted(app)
    assert sorted(s["camera"] for s in asked["stats"]) == ids
    assert all(s["state"] != "unavailable" for s in asked["stats"]), asked["stats"]
    assert asked["calls"] == ["stats_many", "stats_many"], asked["calls"]
    assert all(app.telemetry.snapshot().replicas[name].answering for name in holders)
    app.run(duration=90)  # returns as soon as every source has ended; each tick reads the models' stats
    models = {name: ray.get(h.model_stats.remote(), timeout=30) for name, h in holders.items()}
    infos = [ray.get(h.model_info.remote(), timeout=30) for h in holders.values()]
    camera_pids = {cid: ray.get(app.cameras[cid].process.stats.remote(cid), timeout=30)["pid"] for cid in ids}
    snap = app.telemetry.snapshot()
    finals = {f["camera"]: f for f in app.shutdown()}
    received = validate_all(any_redis.client(), ids)

    assert any("in each camera process" in line for line in said), said
    # Unset inference.threads: the cores shared by the two camera processes, as two replicas would.
    assert [i["threads"] for i in infos] == [max(1, usable_cores() // 2)] * 2, infos
    assert models["hv-camera-a+b"]["pid"] == camera_pids["a"] == camera_pids["b"] != camera_pids["c"]
    assert models["hv-camera-c"]["pid"] == camera_pids["c"]
    # Each process's model computed exactly its own cameras' frames, and nothing was refused.
    assert (models["hv-camera-a+b"]["frames"], models["hv-camera-c"]["frames"]) == (2 * FRAMES, FRAMES), models
    for s in models.values():
        assert (s["shed"], s["expired"], s["cancelled"], s["queue_depth"]) == (0, 0, 0, 0), s
    assert sorted(snap.replicas) == sorted(holders) and all(r.answering for r in snap.replicas.values())
    for cid in ids:
        assert finals[cid]["state"] == "ended", finals[cid]
        assert finals[cid]["published"] == FRAMES and finals[cid]["dropped"]["error"] == 0, finals[cid]
        assert [m["frame"] for m in received[cid]] == list(range(FRAMES))


@pytest.mark.timeout(180)
def test_a_crashed_camera_process_comes_back_with_its_model(ray_local, redis_server, tiny_checkpoint):
    client = redis_server.client()
    cams = [{"id": "x", "url": "synthetic://street?seed=71&fps=8&size=320x192"}]
    with RunningApp(redis_server.url, tiny_checkpoint, cams, interval=0.3, in_camera_process=True) as run:
        wait_for(lambda: len(messages(client, "x")) >= 8, 60, "frames from x")
        process = run.app.cameras["x"].process
        before = ray.get(process.model_stats.remote(), timeout=10)["pid"]
        assert ready(run.app)[0]
        ray.kill(process, no_restart=False)
        t_kill = time.time()
        wait_for(lambda: events(client, "x", "worker_restarted"), 60, "the camera restarted")
        wait_for(lambda: [m for m in messages(client, "x") if m["ts"] > t_kill + 1], 30, "frames after the restart")
        after = ray.get(process.model_stats.remote(), timeout=10)
        assert after["pid"] != before and after["frames"] > 0
        wait_for(lambda: ready(run.app)[0], 10, "ready again")
        frames = [m["frame"] for m in messages(client, "x")]
        assert frames == sorted(set(frames)), "a frame published twice or out of order across the restart"


def test_not_with_a_gpu_device(tmp_path, tiny_checkpoint):
    config = parse_config({"model": {"checkpoint": str(tiny_checkpoint), "device": "cuda"},
                           "inference": {"in_camera_process": True},
                           "cameras": [{"id": "a", "url": "synthetic://street"}]})
    with pytest.raises(ConfigError, match="inference.in_camera_process: with model.device cuda"):
        App(config, say=lambda m: None).check_model()
