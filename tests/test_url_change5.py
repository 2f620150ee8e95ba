"""A live change of a camera's URL to another source of the same frame size: a new scene for zones, lines and
tracks (docs/architecture.md, "Analytics" and "Live control", invariant 4)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mot import read_stream
from test_camera_update import until
from test_pipeline import MODEL_INFO
from workers.publish import Publisher, keys
from workers.settings import CameraConfig
from workers.stream import CameraPipeline

ZONES = [{"name": "all", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}]
LINES = [{"name": "mid", "start": [0.5, 0.0], "end": [0.5, 1.0], "anchors": ["bottom_center"]}]
OLD, NEW = "synthetic://street?seed=1&fps=20&size=160x96", "synthetic://street?seed=2&fps=20&size=160x96"


def person(x: float) -> dict:
    """One confident person box (model-input pixels, 320x192) in each head asked for."""
    return {h: {"boxes": np.array([[x, 60, x + 40, 150]], np.float32), "scores": np.array([0.9], np.float32),
                "class_ids": np.zeros(1, np.int64)} for h in ("people",)}


def walker(frame: int) -> dict:
    """Crosses the middle line on the first frames, then stands (in the old scene and, as far as the boxes go,
    in the new one: a different person standing where the first stood)."""
    return person(min(40 + 12 * frame, 240))


def zone_events(client) -> list[dict]:
    return [e for e in read_stream(client, keys("hv").events) if e["type"].startswith("zone_")]


@pytest.mark.timeout(60)
def test_a_new_url_of_the_same_size_starts_zones_and_lines_afresh(redis_server):
    """The analytics were rebuilt only on another frame size: the old scene's occupant stayed, and the new
    scene's person standing where it stood took it over (no zone_entered, its dwell counted from the old
    scene), and the line kept the old scene's crossing in its counts."""
    async def infer(request):
        return walker(request.frame)

    camera = CameraConfig(id="cam-n", url=OLD, heads=["people"], zones=ZONES, lines=LINES)
    client, counts_key = redis_server.client(), keys("hv").counts("cam-n")

    def counts() -> dict:
        return {k.decode(): v.decode() for k, v in client.hgetall(counts_key).items()}

    async def main() -> tuple[float, int]:
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            try:
                await until(lambda: pub.flush(1) and counts().get("line:mid:people:person:in") == "1"
                            and int(counts()["frame"]) >= 25, 30, "the walker standing in the old scene")
                since = float(counts()["since"])
                assert pipe.update(pipe.camera.model_copy(update={"url": NEW})) == ["url"]
                first = pipe._capture.playback_start  # the new source's first frame number
                # the new scene's entry, or 2 s of its stream time: less than a still occupant's lost_s (3 s)
                await until(lambda: pub.flush(1) and int(counts()["frame"]) >= first + 3 and (
                    len(zone_events(client)) >= 2 or int(counts()["frame"]) >= first + 40), 20, "new frames counted")
                return since, first
            finally:
                pipe.stop()
                await task

    since, first = asyncio.run(main())
    events = zone_events(client)
    assert [e["type"] for e in events] == ["zone_entered", "zone_entered"], events  # no takeover, no zone_left
    entered, again = events
    assert again["track_id"] != entered["track_id"] and again["frame"] >= first
    now = counts()
    assert float(now["since"]) > since  # the counts start again, which `since` tells consumers
    assert now["zone:all:people:person"] == "1"
    assert now["line:mid:people:person:in"] == "0" and now["line:mid:people:person:out"] == "0"


@pytest.mark.timeout(60)
def test_frames_of_the_old_url_still_in_flight_start_no_track_that_goes_on_in_the_new_scene(redis_server):
    """Frames sent before the update come back after it, into the fresh tracker: a track of the old scene
    went on as an object of the new one (and into its zones)."""
    hold = asyncio.Event()
    hold.set()
    waiting: list[int] = []

    async def infer(request):
        waiting.append(request.frame)
        await hold.wait()
        return person(200)

    camera = CameraConfig(id="cam-f", url=OLD, heads=["people"], zones=ZONES, max_inflight=2)
    client = redis_server.client()

    async def main() -> int:
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            try:
                await until(lambda: pipe.open_tracks() == 1 and pipe.published >= 5, 30, "a track in the old scene")
                hold.clear()
                sent = len(waiting)
                await until(lambda: len(waiting) >= sent + 2 and pipe._holding, 30, "old frames held in inference")
                pipe.update(pipe.camera.model_copy(update={"url": NEW}))
                first = pipe._capture.playback_start
                hold.set()
                await until(lambda: pipe.published >= 10 and any(f >= first + 5 for f in waiting), 30, "new frames")
                await until(lambda: pub.flush(1) and any(m["frame"] >= first + 5 for m in read_stream(
                    client, keys("hv").detections("cam-f"))), 20, "new frames published")
                return first
            finally:
                pipe.stop()
                await task

    first = asyncio.run(main())
    frames: dict[int, list[int]] = {}  # track id -> frames it was on
    for m in read_stream(client, keys("hv").detections("cam-f")):
        for d in m["detections"]:
            if d["track_id"] is not None:
                frames.setdefault(d["track_id"], []).append(m["frame"])
    assert not [t for t, f in frames.items() if min(f) < first <= max(f)], (first, frames)  # none spans the scenes
    assert any(min(f) < first for f in frames.values()) and any(min(f) >= first for f in frames.values()), frames
    entered = [e for e in zone_events(client) if e["camera"] == "cam-f" and e["type"] == "zone_entered"]
    assert len(entered) == 2 and entered[1]["frame"] >= first, entered
