"""A restarted StreamActor (after a crash here, or on another node after its node died: tests/test_cluster.py)
continues this run's frame numbering after the last frame it published, and a file continues from there: no
(camera, frame) is published twice, nothing is replayed."""

from __future__ import annotations

import time

import pytest
import ray

from running import RunningApp, events, messages, wait_for

FRAMES = 400
FPS = 25.0  # the scene's own rate: pts = frame / 25


@pytest.mark.slow  # ~35 s; the slow cluster test asserts the same after a node dies
@pytest.mark.timeout(180)
def test_restarted_cameras_publish_no_frame_twice(ray_local, redis_server, tiny_checkpoint):
    cams = [{"id": "live", "url": "synthetic://street?seed=31&fps=8&size=320x192"},
            {"id": "file", "url": f"synthetic://street?seed=32&frames={FRAMES}&size=320x192", "realtime": False,
             "max_inflight": 1}]
    client = redis_server.client()
    with RunningApp(redis_server.url, tiny_checkpoint, cams, interval=0.3) as run:
        wait_for(lambda: len(messages(client, "live")) >= 10 and len(messages(client, "file")) >= 40, 60,
                 "frames from both cameras")
        for cid in ("live", "file"):
            ray.kill(run.app.cameras[cid].process, no_restart=False)
        t_kill = time.time()
        wait_for(lambda: len(events(client, "live", "worker_restarted")) and len(events(client, "file", "worker_restarted")),
                 60, "both cameras restarted")
        wait_for(lambda: [m for m in messages(client, "live") if m["ts"] > t_kill + 1], 30, "live frames after the restart")
        wait_for(lambda: run.camera("file").get("state") == "ended", 120, "the file camera reaching its end")
    for cid in ("live", "file"):
        frames = [m["frame"] for m in messages(client, cid)]
        assert frames == sorted(set(frames)), f"{cid}: a frame was published twice or out of order"
        pts = [m["pts"] for m in messages(client, cid)]
        assert pts == sorted(pts), f"{cid}: pts went backwards"
    file_msgs = messages(client, "file")
    # the file went on from where it stopped: each frame number is still that frame of the file, to the end
    assert all(abs(m["pts"] - m["frame"] / FPS) < 1e-6 for m in file_msgs)
    assert file_msgs[-1]["frame"] == FRAMES - 1
    lost = FRAMES - len(file_msgs)  # what was in flight or unflushed when the actor died; never replayed
    assert 0 <= lost <= 10, lost
