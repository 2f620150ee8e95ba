"""A camera's status in Redis counts its whole service run, as the final table and /metrics do: a camera whose
process Ray restarted wrote only the new process's counts (`hydravision status --json` said "published 1535 ...
restarts None" where the final table said 2010 "(restarted 1x)"), and a file started again by an update only the
new run's. What the pipeline's stats() give the controller stay its own (telemetry folds those).

Unpaced files (realtime: false) drop nothing and end by themselves, so every count here is exact whatever the
machine's speed or load."""

from __future__ import annotations

import asyncio
import json

import pytest

from test_stream_edges import MODEL_INFO, Replica
from workers.publish import keys
from workers.settings import CameraConfig, RedisConfig
from workers.stream import CameraHost

K = keys("hv")
FRAMES = 6


def file_camera(seed: int = 1, frames: int = FRAMES) -> CameraConfig:
    return CameraConfig(id="cam", url=f"synthetic://street?seed={seed}&frames={frames}&size=160x96", realtime=False,
                        heads=["people"])


def status(client) -> dict:
    return json.loads(client.hget(K.cameras, "cam"))


def adds_up(s: dict) -> bool:  # nothing held in a status written at the run's end (in_slot = in_flight = 0)
    return s["decoded"] == s["published"] + s["skipped"] + sum(s["dropped"].values())


def crashed_process(client, instance: str) -> None:
    """What a crashed camera process left in Redis: its last status (1300 decoded, 1284 published, 6 dropped,
    10 held in its slot and in flight) and its last published frame, 1283; its file's playback began at 0."""
    client.hset(K.cameras, "cam", json.dumps({
        "state": "running", "instance": instance, "stream_mark": "0-0", "decoded": 1300, "published": 1284,
        "skipped": 0, "reconnects": 2, "skipped_packets": 7, "track_ids_next": {"people": 40},
        "playback": {"start": 1284, "pts_offset": 0},
        "dropped": {"rate": 0, "budget": 0, "overload": 5, "error": 1, "shutdown": 0}}))
    client.xadd(K.detections("cam"), {"data": json.dumps({"frame": 1283, "pts": 51.32})})


def run_restarted(redis_server, restart: bool = True) -> tuple[dict, dict]:
    """The controller's restart of the camera in a process Ray re-created: (its stats() at the end, its status).
    ``restart`` False: the camera added again (a removal's status that Redis kept, see below)."""
    async def main() -> dict:
        host = CameraHost(file_camera(), [Replica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        host.restarted = restart  # as StreamActor.start(..., restart=True)
        await host.start()
        try:
            await asyncio.wait_for(host.wait(), 30)
            return await host.stats()
        finally:
            await host.stop()

    own = asyncio.run(main())
    return own, status(redis_server.client())


@pytest.mark.timeout(90)
def test_a_restarted_cameras_status_counts_on_from_its_crashed_process(redis_server):
    crashed_process(redis_server.client(), "run-1")
    own, s = run_restarted(redis_server)
    assert (own["decoded"], own["published"]) == (FRAMES, FRAMES), own  # the controller's: this process's own
    assert (s["decoded"], s["published"], s["reconnects"]) == (1300 + FRAMES, 1284 + FRAMES, 2), s
    assert s["skipped_packets"] == 7, s  # a UDP camera's loss: in the status too, over its processes
    assert s["dropped"]["overload"] == 5 and s["dropped"]["error"] == 1, s
    assert s["dropped"]["lost"] == 10 and adds_up(s), s  # what the crashed process held at its last status
    assert s["restarts"] == 1, s  # the status table's "(restarted 1x)"


@pytest.mark.timeout(90)
def test_a_service_run_of_its_own_counts_from_zero(redis_server):
    crashed_process(redis_server.client(), "run-0")  # another service run's status: nothing of it counts
    own, s = run_restarted(redis_server)
    assert (s["decoded"], s["published"]) == (FRAMES, FRAMES) and s.get("restarts", 0) == 0, s  # as before
    assert "lost" not in s["dropped"] and adds_up(s), s


@pytest.mark.timeout(90)
def test_a_file_started_again_by_an_update_counts_on_in_its_status(redis_server):
    async def main() -> dict:
        host = CameraHost(file_camera(), [Replica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        try:
            await asyncio.wait_for(host.wait(), 30)
            assert (await host.update(file_camera(seed=2, frames=4)))["restarted"]
            await asyncio.wait_for(host.wait(), 30)
            return await host.stats()
        finally:
            await host.stop()  # its last status written, its publisher flushed

    own = asyncio.run(main())
    s = status(redis_server.client())
    assert (own["run"], own["decoded"], own["published"]) == (2, 4, 4), own  # the controller's: this run's own
    assert (s["decoded"], s["published"]) == (FRAMES + 4, FRAMES + 4), s
    assert s["restarts"] == 0 and adds_up(s), s  # an update's new run is no restart of the process


def test_the_base_reads_what_no_version_writes_as_zero():
    from workers.stream import status_base

    base = status_base({"decoded": "12", "published": None, "skipped": True, "reconnects": -3, "dropped": [1],
                        "restarts": 2.5})
    assert base == {"decoded": 0, "published": 0, "skipped": 0, "reconnects": 0, "skipped_packets": 0, "dropped": {},
                    "restarts": 0}
    assert status_base({"decoded": 9, "published": 4, "dropped": {"error": 2, "lost": 1}, "restarts": 2}) == {
        "decoded": 9, "published": 4, "skipped": 0, "reconnects": 0, "skipped_packets": 0,
        "dropped": {"error": 2, "lost": 3}, "restarts": 2}


@pytest.mark.timeout(90)
def test_the_same_id_added_again_counts_from_zero_though_redis_kept_the_removed_ones_status(redis_server):
    """A removal whose status Redis could not delete (down then: kept until a retry): the same id added again read
    it as its own crashed process's, and said "(restarted 1x)" with the removed camera's counts."""
    client = redis_server.client()
    crashed_process(client, "run-1")  # this run's status, left by the removed camera
    own, s = run_restarted(redis_server, restart=False)
    assert (s["decoded"], s["published"], s["restarts"]) == (FRAMES, FRAMES, 0), s
    # and its file from its start, numbered afresh, as a camera added anew (not after the removed one's frame 1283)
    frames = [json.loads(f[b"data"])["frame"] for _, f in client.xrange(K.detections("cam"))][1:]
    assert frames == list(range(FRAMES)), frames
