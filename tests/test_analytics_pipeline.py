"""Analytics inside CameraPipeline, without Ray: a synthetic camera whose "model" answers with the scene's
true boxes, so every count can be checked exactly. Events, the counts hash and the snapshot land in a real
Redis and validate against the schemas; the motion gate's skipped frames keep the counters adding up."""

from __future__ import annotations

import asyncio
import json
import time

import cv2
import numpy as np
import pytest
import supervision as sv

from mot import read_stream
from synthetic.scene import CLASS_NAMES
from workers.publish import Publisher, keys, validate
from workers.stream import CameraPipeline

HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}
MODEL_INFO = {"input_size": [192, 320], "heads": HEADS}
SEED, FRAMES, FPS = 5, 150, 10.0
LINE = {"name": "gate", "start": [0.5, 0.3], "end": [0.5, 1.0]}
ZONE = {"name": "middle", "polygon": [[0.3, 0.45], [0.7, 0.45], [0.7, 0.95], [0.3, 0.95]]}


def truth_infer(seed: int, frames: int, fps: float, density: float = 1.0):
    """An inference function that answers with the scene's true boxes (model-input pixels), score 0.9."""
    from synthetic.scene import StreetScene

    scene = StreetScene(seed, fps=fps, density=density)
    truths = [scene.step()[1] for _ in range(frames)]

    async def infer(request):
        t, lb = truths[request.frame], request.letterbox
        boxes = t.boxes[t.visibility >= 0.3].astype(np.float32)  # what a detector could see
        cls = t.class_ids[t.visibility >= 0.3]
        boxes = boxes * lb.scale + np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], np.float32)
        out = {}
        for head in request.heads:
            names = HEADS[head]
            keep = np.array([CLASS_NAMES[c] in names for c in cls], bool)
            out[head] = {"boxes": boxes[keep].reshape(-1, 4), "scores": np.full(int(keep.sum()), 0.9, np.float32),
                         "class_ids": np.array([names.index(CLASS_NAMES[c]) for c in cls[keep]], np.int64)}
        return out

    return infer, truths


def run_camera(url: str, camera: dict, infer, redis_url: str) -> dict:
    async def main():
        with Publisher(redis_url) as pub:
            pipe = CameraPipeline({"id": "cam", "url": url, "realtime": False, **camera}, infer, MODEL_INFO, pub)
            stats = await pipe.run()
            assert pub.flush(10)
            return stats

    return asyncio.run(main())


def hash_text(client, key: str) -> dict:
    return {k.decode(): v for k, v in client.hgetall(key).items()}


@pytest.mark.timeout(120)
def test_events_counts_and_snapshot_land_in_redis_and_match_the_truth(redis_server):
    infer, truths = truth_infer(SEED, FRAMES, FPS)
    url = f"synthetic://street?seed={SEED}&fps={FPS:g}&frames={FRAMES}"
    stats = run_camera(url, {"zones": [ZONE], "lines": [LINE], "snapshot": {"fps": 2.0}}, infer, redis_server.url)
    assert stats["published"] == FRAMES and stats["skipped"] == 0
    client = redis_server.client()
    events = [e for e in read_stream(client, keys("hv").events) if e["camera"] == "cam"]
    for e in events:
        validate(e, "event")
    crossings = [e for e in events if e["type"] == "line_crossed"]
    entered = [e for e in events if e["type"] == "zone_entered"]
    left = [e for e in events if e["type"] == "zone_left"]
    assert crossings and entered and left

    # The counts hash: valid, and what the events add up to.
    raw = hash_text(client, keys("hv").counts("cam"))
    validate({k: v.decode() for k, v in raw.items()}, "counts")
    counts = {k: int(v) for k, v in raw.items() if k.startswith(("zone:", "line:"))}
    assert int(raw["frame"]) == FRAMES - 1
    for head, classes in HEADS.items():
        for c in classes:
            for d in ("in", "out"):
                assert counts[f"line:gate:{head}:{c}:{d}"] == sum(
                    1 for e in crossings if (e["head"], e["class"], e["direction"]) == (head, c, d))
            inside = sum(1 for e in entered if (e["head"], e["class"]) == (head, c)) - sum(
                1 for e in left if (e["head"], e["class"]) == (head, c))
            assert counts[f"zone:middle:{head}:{c}"] == inside

    # With true boxes the only errors left are the tracker's: line counts equal the true crossings.
    true_line = {h: sv.LineZone(sv.Point(320, 108), sv.Point(320, 360)) for h in HEADS}
    true_counts = {}
    for t in truths:
        for head, names in HEADS.items():
            keep = (t.visibility >= 0.3) & np.isin([CLASS_NAMES[c] for c in t.class_ids], names)
            det = sv.Detections(xyxy=t.boxes[keep].astype(float), tracker_id=t.object_ids[keep],
                                class_id=np.array([names.index(CLASS_NAMES[c]) for c in t.class_ids[keep]], int))
            cin, cout = true_line[head].trigger(det)
            for i in np.flatnonzero(cin | cout):
                key = (head, names[det.class_id[i]], "in" if cin[i] else "out")
                true_counts[key] = true_counts.get(key, 0) + 1
    got = {k: v for k, v in ((tuple(k.split(":")[2:]), v) for k, v in counts.items() if k.startswith("line:")) if v}
    print("line counts, pipeline:", got, "truth:", true_counts)
    assert sum(true_counts.values()) >= 5
    assert sum(abs(got.get(k, 0) - true_counts.get(k, 0)) for k in set(got) | set(true_counts)) <= 1

    # The snapshot: a JPEG of the right size, bounded, with its frame and time.
    snap = hash_text(client, keys("hv").snapshot("cam"))
    validate({k: v.decode() for k, v in snap.items() if k != "jpeg"} | {"jpeg": ""}, "snapshot")
    picture = cv2.imdecode(np.frombuffer(snap["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (360, 640, 3)
    assert int(snap["bytes"]) == len(snap["jpeg"]) <= 262_144
    assert int(snap["frame"]) >= FRAMES - 1 - FPS / 2  # the last one due: 2 a second
    assert stats["analytics"]["snapshots"]["made"] == pytest.approx(FRAMES / FPS * 2, abs=1)


@pytest.mark.timeout(120)
def test_motion_gate_skips_a_static_scene_and_the_counters_add_up(redis_server):
    infer, _ = truth_infer(9, 120, FPS, density=0.0)
    calls = []

    async def counting(request):
        calls.append(request.frame)
        return await infer(request)

    url = f"synthetic://street?seed=9&fps={FPS:g}&frames=120&density=0"
    camera = {"motion": {"enabled": True, "max_skip_s": 5.0}, "zones": [ZONE]}
    stats = run_camera(url, camera, counting, redis_server.url)
    d = stats["dropped"]
    assert stats["decoded"] == 120
    assert stats["decoded"] == stats["published"] + stats["skipped"] + sum(d.values()) + stats["in_slot"] + \
        stats["in_flight"]
    assert stats["published"] == len(calls) == len(read_stream(redis_server.client(), keys("hv").detections("cam")))
    # An empty street: only sensor noise and slow light changes, so nearly everything is skipped; the
    # gate still sends a frame at least every max_skip_s.
    print("motion gate:", stats["skipped"], "of", stats["decoded"], "skipped; inferred frames", calls)
    assert stats["skipped"] >= 100
    assert all(b - a <= 5.0 * FPS for a, b in zip([0] + calls, calls + [119]))
    assert stats["analytics"]["motion"]["skipped"] == stats["skipped"]


def test_zones_without_their_head_in_the_model_refuse_to_start():
    with pytest.raises(ValueError, match=r"zones\[0\]\.heads: unknown head\(s\) \['faces'\]"):
        CameraPipeline({"id": "cam", "url": "synthetic://street", "zones": [{**ZONE, "heads": ["faces"]}]},
                       None, MODEL_INFO, None)


def test_pixel_zone_outside_the_frame_is_reported_and_the_camera_runs(redis_server):
    infer, _ = truth_infer(SEED, 20, FPS)
    url = f"synthetic://street?seed={SEED}&fps={FPS:g}&frames=20"
    zone = {"name": "wide", "units": "pixels", "polygon": [[0, 0], [1920, 0], [1920, 1080]]}
    stats = run_camera(url, {"zones": [zone, ZONE]}, infer, redis_server.url)
    assert stats["published"] == 20 and stats["analytics"]["zones"] == ["middle"]
    assert stats["last_error"] == "zones[0].polygon: point (1920, 0) is outside the 640x360 frame; zone 'wide' is off"
    errors = [e for e in read_stream(redis_server.client(), keys("hv").events) if e["type"] == "analytics_error"]
    assert [e["reason"] for e in errors] == [stats["last_error"]]
    json.dumps(stats)  # stats stay plain data (they cross Ray and go to the status hash)


def test_counts_that_start_again_at_another_frame_size_say_so():
    """Frames of another size (a new URL, a camera reconfigured) rebuild the zones and lines from nothing: the
    line counts went back to 0 under the camera's first `since`, so a consumer could not tell them from a drop."""
    from types import SimpleNamespace

    class Hashes:  # stands in for the Publisher: keeps the hashes set
        keys = keys("hv")

        def __init__(self) -> None:
            self.hashes: dict[str, dict] = {}

        def set_hash(self, key: str, fields: dict) -> None:
            self.hashes[key] = fields

    pub = Hashes()
    camera = {"id": "cam", "url": "synthetic://street", "lines": [LINE], "zones": [ZONE]}
    pipe = CameraPipeline(camera, None, MODEL_INFO, pub)

    def frame(index: int, size: tuple[int, int]) -> dict:
        item = SimpleNamespace(index=index, pts=index / FPS, wall=1000.0 + index, size=size, picture=None)
        pipe._after_analytics(item, pipe._current_analytics(item))
        return pub.hashes[pub.keys.counts("cam")]

    first = frame(0, (360, 640))["since"]
    assert frame(1, (360, 640))["since"] == first
    time.sleep(0.01)
    assert frame(2, (720, 1280))["since"] > first
