"""Two inference replicas through Ray: cameras are spread over both, each serves its own cameras' frames,
and the batcher's rejections cross the process boundary as themselves."""

from __future__ import annotations


import numpy as np
import pytest
import ray

from test_e2e import make_app, validate_all
from workers.cores import usable_cores
from workers.inference import InferenceExpired

FRAMES = 30


@pytest.mark.timeout(120)
def test_four_cameras_over_two_replicas(ray_local, redis_server, tiny_checkpoint):
    ids = ["lobby", "gate", "dock", "yard"]
    cameras = [{"id": cid, "url": f"synthetic://street?seed={i}&frames={FRAMES}", "realtime": False}
               for i, cid in enumerate(ids)]
    app = make_app(redis_server.url, tiny_checkpoint, cameras, replicas=2, in_camera_process=False)
    app.start()
    route = dict(app.placement.assigner.of)  # each camera to the replica with the fewest cameras
    assert sorted(route.values()) == [0, 0, 1, 1], route
    app.run(duration=60)  # returns as soon as all four sources have ended
    replicas = ray.get([a.stats.remote() for a in app.inference], timeout=30)
    threads = [ray.get(a.info.remote(), timeout=30)["threads"] for a in app.inference]

    # A request whose caller's timeout has already passed is refused by the replica, and the caller gets
    # the batcher's own exception (pickled across Ray, a TimeoutError), not a generic error.
    image = np.zeros((3, *app.model_info["input_size"]), np.uint8)
    with pytest.raises(InferenceExpired) as info:
        ray.get(app.inference[1].infer_image.remote(image, None, "probe", 0.0), timeout=30)
    probed = ray.get(app.inference[1].stats.remote(), timeout=30)
    finals = {f["camera"]: f for f in app.shutdown()}
    messages = validate_all(redis_server.client(), ids)

    assert replicas[0]["pid"] != replicas[1]["pid"]
    assert threads == [max(1, usable_cores() // 2)] * 2, threads  # unset inference.threads: they split the cores
    for r, s in enumerate(replicas):  # each replica computed exactly its own cameras' frames, none dropped
        assert s["frames"] == FRAMES * sum(1 for v in route.values() if v == r), (r, s)
        assert (s["shed"], s["expired"], s["cancelled"], s["queue_depth"]) == (0, 0, 0, 0), (r, s)
        assert 1 <= s["queue_depth_max"] <= 2 * 2  # two cameras, max_inflight 2 each
    for cid in ids:
        assert finals[cid]["state"] == "ended"
        assert finals[cid]["published"] == FRAMES and finals[cid]["dropped"]["error"] == 0
        assert [m["frame"] for m in messages[cid]] == list(range(FRAMES))
    assert isinstance(info.value, TimeoutError) and info.value.camera == "probe"
    assert probed["expired"] == 1 and probed["frames"] == replicas[1]["frames"]  # not computed


def test_actors_run_at_the_priority_of_every_other_program(ray_local):
    """Ray starts worker processes at nice 15 (its worker_niceness), so any other busy program on the machine
    took the CPU from the cameras and the model almost entirely: the demo published 0.5 frames/s per camera
    with 7-10 s latency beside two busy loops on 2 cores, 80 s after start. pipeline/app.py sets 0."""
    import os

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote(), timeout=120) == os.nice(0)
