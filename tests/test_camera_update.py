"""CameraPipeline.update without Ray (issue 13, part 1): heads change from the next frame sent to inference,
a dropped head's tracks end, a new URL reopens only the decoder (numbering and pts go on, tracks end, ids
continue), fps applies from the next decoded frame. A real Publisher on a real Redis; inference is faked
with one steady box per head, so that tracks exist to be ended."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest

from mot import read_stream
from test_pipeline import MODEL_INFO, assert_counters_add_up
from workers.publish import Publisher, keys, validate
from workers.settings import CameraConfig
from workers.stream import CameraPipeline
from test_tracking import moving, run_track
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker


def one_box(heads: list[str]) -> dict:
    return {h: {"boxes": np.array([[40, 40, 90, 120]], np.float32), "scores": np.array([0.9], np.float32),
                "class_ids": np.zeros(1, np.int64)} for h in heads}


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.timeout(90)
def test_update_heads_url_and_fps_of_a_running_camera(redis_server):
    sent: list[tuple[int, tuple[str, ...]]] = []  # (frame, heads) as inference received them

    async def infer(request):
        sent.append((request.frame, tuple(request.heads)))
        await asyncio.sleep(0.005)
        return one_box(request.heads)

    camera = CameraConfig(id="cam-u", url="synthetic://street?seed=1&fps=20", max_inflight=2)

    async def main():
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            await until(lambda: pipe.open_tracks() == 2, 30, "a track per head")

            marks = {"heads": len(sent)}
            assert pipe.update(camera.model_copy(update={"heads": ["people"]})) == ["heads"]
            assert pipe.open_tracks() == 1  # the vehicles track ended at once
            await until(lambda: len(sent) >= marks["heads"] + 15 and pipe.open_tracks() == 1, 30, "frames after")

            old_capture, marks["url"] = pipe._capture, len(sent)
            new_url = "synthetic://street?seed=2&fps=20"
            assert pipe.update(pipe.camera.model_copy(update={"url": new_url})) == ["url"]
            assert pipe._capture is not old_capture and pipe.open_tracks() == 0
            assert pipe._capture.resume_at == 0  # another source: from its start, not the old one's position
            await until(lambda: not old_capture.alive, 15, "the old decoder thread to exit")
            await until(lambda: len(sent) >= marks["url"] + 15 and pipe.open_tracks() == 1, 30, "a new track")

            marks["fps"] = len(sent)
            assert pipe.update(pipe.camera.model_copy(update={"fps": 5.0})) == ["fps"]
            assert pipe._capture is not None and pipe._capture.camera.fps == 5.0
            await until(lambda: len(sent) >= marks["fps"] + 8, 30, "frames at 5 fps")
            with pytest.raises(ValueError, match="unknown heads"):
                pipe.update(pipe.camera.model_copy(update={"heads": ["faces"]}))
            with pytest.raises(ValueError, match="max_inflight cannot change"):
                pipe.update(pipe.camera.model_copy(update={"max_inflight": 4}))
            pipe.stop(drain=True)
            stats = await task
            assert pub.flush(5)
            return marks, stats

    marks, stats = asyncio.run(main())
    assert_counters_add_up(stats)
    assert stats["watchdog_restarts"] == 0 and stats["capture_crashes"] == 0

    # heads: from the next frame sent; only frames already on their way (max_inflight) may carry the old ones
    after = [heads for _, heads in sent[marks["heads"]:]]
    first_new = after.index(("people",))
    assert first_new <= 2 and all(h == ("people",) for h in after[first_new:]), after[:6]
    # a new URL: the frame numbering goes on (no frame twice, none from 0 again)
    frames = [f for f, _ in sent]
    assert frames == sorted(set(frames)), frames

    client = redis_server.client()
    messages = read_stream(client, keys("hv").detections("cam-u"))
    events = [e for e in read_stream(client, keys("hv").events) if e["camera"] == "cam-u"]
    for m in messages:
        validate(m, "detection")
    pts = [m["pts"] for m in messages]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)  # pts go on increasing across the new URL
    # fps: from the next decoded frame, one frame every 0.2 s of stream time (a frame or two of slack)
    fps_frames = {f for f, _ in sent[marks["fps"] + 2:]}
    gaps = np.diff([m["pts"] for m in messages if m["frame"] in fps_frames])
    assert len(gaps) >= 5 and gaps.min() > 0.19, gaps

    started = [(e["head"], e["track_id"]) for e in events if e["type"] == "track_started"]
    ended = [(e["head"], e["track_id"]) for e in events if e["type"] == "track_ended"]
    assert sorted(started) == sorted(ended)  # every track ended: at the head drop, the new URL or the stop
    people = [tid for head, tid in started if head == "people"]
    assert len(people) >= 2 and people == sorted(set(people))  # the new URL's track did not reuse an id
    assert [h for h, _ in started].count("vehicles") == 1


def test_tracker_heads_change_ends_dropped_tracks_and_a_head_back_continues_its_ids():
    t = CameraTracker(["people", "vehicles"], TrackerConfig(), frame_rate=10, id_base={"faces": 7})
    run_track(t, "people", 5, lambda f: [moving(f)])
    run_track(t, "vehicles", 5, lambda f: [moving(f, y=200), moving(f, y=300)])
    ended = t.set_heads(["people"])
    assert sorted((e["type"], e["head"], e["track_id"]) for e in ended) == [
        ("track_ended", "vehicles", 0), ("track_ended", "vehicles", 1)]
    assert t.open_tracks() == 1  # people's track goes on
    assert t.next_ids() == {"people": 1, "vehicles": 2, "faces": 7}  # dropped heads' ids are still persisted
    assert t.set_heads(["people", "vehicles"]) == []
    _, ids = run_track(t, "vehicles", 5, lambda f: [moving(f, y=200)])
    assert {i for frame in ids for i in frame if i >= 0} == {2}  # not 0 again


def test_a_live_update_keeps_zone_and_line_state_and_new_heads_keep_it_for_the_heads_that_stay(redis_server):
    """Occupants and line counts survive an update that does not touch them (here: fps). A change of heads
    keeps them for the heads that stay: a person standing in the zone got a second zone_entered (and no
    zone_left) and the line's count went back to 0 when the analytics were rebuilt for the new heads."""
    import supervision as sv

    camera = CameraConfig(id="cam-z", url="synthetic://street?seed=1&fps=20",
                          zones=[{"name": "middle", "polygon": [[0.3, 0.45], [0.7, 0.45], [0.7, 0.95], [0.3, 0.95]]}],
                          lines=[{"name": "kerb", "start": [0.5, 0.0], "end": [0.5, 0.4]}])
    frame = SimpleNamespace(size=(360, 640))  # all _current_analytics reads of a frame
    events: list[str] = []
    frames = iter(range(1000))

    def person(box: list[float]) -> sv.Detections:
        return sv.Detections(xyxy=np.array([box], float), confidence=np.array([0.9]), class_id=np.array([0]),
                             tracker_id=np.array([5]), data={"class_name": np.array(["person"])})

    def step(n: int, box: list[float]) -> None:
        for f in itertools.islice(frames, n):
            events.extend(e["type"] for e in pipe._current_analytics(frame).update("people", person(box), f, f / 10))

    with Publisher(redis_server.url) as pub:
        pipe = CameraPipeline(camera, None, MODEL_INFO, pub)
        built = pipe._current_analytics(frame)
        assert built is not None and pipe._current_analytics(frame) is built
        assert pipe.update(pipe.camera.model_copy(update={"fps": 5.0})) == ["fps"]
        assert pipe._current_analytics(frame) is built  # counts and occupants go on
        for x in range(250, 400, 15):  # one walker crosses the kerb line ...
            step(1, [x, 40, x + 20, 100])
        step(10, [300, 250, 340, 330])  # ... then stands in the zone
        assert events == ["line_crossed", "zone_entered"]
        assert pipe.update(pipe.camera.model_copy(update={"heads": ["people"]})) == ["heads"]
        step(10, [300, 250, 340, 330])  # still there: no new entry
        assert events == ["line_crossed", "zone_entered"]
        counts = pipe._current_analytics(frame).counts()
        assert counts["zone:middle:people:person"] == 1 and counts["line:kerb:people:person:in"] == 1
        assert not [k for k in counts if ":vehicles:" in k]  # the dropped head's counts went with it


@pytest.mark.timeout(60)
def test_snapshots_switched_on_while_the_camera_runs_come_from_the_next_frames(redis_server):
    """The decoder kept the snapshot settings it had opened the source with: switched on live, no picture was
    taken until the source reconnected, which a file or a synthetic scene never does."""
    async def infer(request):
        return one_box(request.heads)

    camera = CameraConfig(id="cam-s", url="synthetic://street?seed=1&fps=25&size=160x96", snapshot={"enabled": False})

    async def main() -> None:
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            await until(lambda: pipe.stats()["published"] >= 5, 30, "frames")
            on = camera.snapshot.model_copy(update={"enabled": True, "fps": 5.0})
            assert pipe.update(pipe.camera.model_copy(update={"snapshot": on})) == ["snapshot"]
            try:
                await until(lambda: pipe.snapshots.stats()["made"] >= 2, 10, "two snapshots")
            finally:
                pipe.stop()
                await task

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_the_tracker_counts_frames_at_the_rate_it_gets_them(redis_server):
    """It was built for the configured fps even where the source gives fewer frames (25 asked of a 10 fps
    source), and kept that rate through a live change of fps."""
    async def infer(request):
        return one_box(request.heads)

    camera = CameraConfig(id="cam-r", url="synthetic://street?seed=1&fps=10&size=160x96", fps=25)

    async def main() -> list[float]:
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            try:
                await until(lambda: pipe.tracker is not None, 30, "the tracker")
                rates = [pipe.tracker.frame_rate]
                pipe.update(pipe.camera.model_copy(update={"fps": 2.0}))
                return rates + [pipe.tracker.frame_rate]
            finally:
                pipe.stop()
                await task

    assert asyncio.run(main()) == [10.0, 2.0]


@pytest.mark.timeout(60)
def test_counts_of_zones_and_lines_that_are_gone_are_not_left_in_redis(redis_server):
    """Nothing deleted a camera's counts hash: a camera whose zones were removed live, or one added again under
    its id without any, kept showing the last counts (the dashboard read them as current)."""
    async def infer(request):
        return one_box(request.heads)

    client, key = redis_server.client(), keys("hv").counts("cam-k")
    client.hset(key, mapping={"zone:old:people:person": 3})  # a previous run's
    camera = CameraConfig(id="cam-k", url="synthetic://street?seed=1&fps=20&size=160x96")

    async def main() -> None:  # each wait fails the test when what it waits for does not happen
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, infer, MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            try:
                await until(lambda: pipe.stats()["published"] >= 3 and not client.exists(key), 10, "old counts gone")
                zone = {"name": "z", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]}
                pipe.update(CameraConfig.model_validate({**pipe.camera.model_dump(), "zones": [zone]}))
                await until(lambda: client.hexists(key, "zone:z:people:person"), 30, "the zone's counts")
                pipe.update(pipe.camera.model_copy(update={"zones": []}))
                await until(lambda: not client.exists(key), 30, "the counts of the removed zone gone")
            finally:
                pipe.stop()
                await task

    asyncio.run(main())
