"""The motion gate, snapshots (picture, drawing, size bound) and the Publisher's latest-value hashes that carry
the counts and the snapshots to Redis."""

from __future__ import annotations

import time

import av
import cv2
import numpy as np
import pytest
import supervision as sv

from models.letterbox import letterbox
from synthetic.clips import encode_mp4
from synthetic.scene import StreetScene
from workers.analytics import CameraAnalytics
from workers.analytics_settings import LineConfig, MotionConfig, SnapshotConfig, ZoneConfig
from workers.motion import MotionGate
from workers.publish import Publisher, keys
from workers.snapshots import Snapshotter, picture_due
from workers.source_base import SourceFrame

INPUT = (256, 448)


# --- motion gate ----------------------------------------------------------------------------------------

def model_inputs(seed: int, frames: int, density: float, fps: float = 10.0):
    scene = StreetScene(seed, fps=fps, density=density)
    for f in range(frames):
        rgb, truth = scene.step()
        yield f / fps, letterbox(rgb, INPUT)[0], truth


def test_gate_skips_an_empty_street_but_not_a_passer_by():
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=60))
    empty = [gate.wants(img, pts) for pts, img, _ in model_inputs(3, 50, density=0.0)]
    assert empty[0] and sum(empty) <= 5  # the first frame, then light drift now and then: noise is no motion
    busy = MotionGate(MotionConfig(enabled=True, max_skip_s=60))
    decisions = [(busy.wants(img, pts), len(t)) for pts, img, t in model_inputs(3, 50, density=1.0)]
    assert all(len_ > 0 for _, len_ in decisions)  # objects in every frame, moving
    assert sum(w for w, _ in decisions) >= 45


def test_slow_motion_adds_up_against_the_last_inferred_frame():
    """A small object creeping 1 px a frame: no frame differs from the previous one by much, but the gate
    compares with the last frame it let through, so it fires every few frames instead of never."""
    base = np.full((3, *INPUT), 100, np.uint8)
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=60))
    fired = []
    for f in range(40):
        img = base.copy()
        img[:, 100:112, 50 + f:58 + f] = 200  # an 8x12 px patch moving right
        fired.append(gate.wants(img, f / 10))
    assert 3 <= sum(fired[1:]) <= 20


def test_max_skip_forces_inference_on_a_still_picture():
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=1.0))
    img = np.full((3, *INPUT), 90, np.uint8)
    fired = [f for f in range(50) if gate.wants(img, f / 10)]
    assert fired == [0, 10, 20, 30, 40]
    assert gate.stats() == {"checked": 50, "skipped": 45, "skip_fraction": 0.9}


def street(car_at: int | None) -> np.ndarray:
    """A still grey model input, with a 40x60 px "car" at x = ``car_at`` or none."""
    img = np.full((3, *INPUT), 100, np.uint8)
    if car_at is not None:
        img[:, 150:190, car_at:car_at + 60] = 200
    return img


@pytest.mark.parametrize("failing, expected", [
    ((), False),          # the car was analysed where it is now: nothing moved since
    ((0.1,), False),      # the first sight of it failed, the second (car moved) was analysed
    ((0.2,), True),       # the car was last analysed 100 px to the left
    ((0.1, 0.2), True),   # neither was analysed: the last analysed frame is the empty street
])
def test_a_frame_whose_inference_failed_is_no_reference_for_the_gate(failing, expected):
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=60))
    assert gate.wants(street(None), 0.0)  # analysed
    assert gate.wants(street(100), 0.1) and gate.wants(street(200), 0.2)  # both sent, results in frame order
    for pts in failing:
        gate.failed(pts)
    assert gate.wants(street(200), 0.3) == expected


def test_after_a_failure_the_gate_compares_with_the_last_analysed_frame():
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=60))
    assert gate.wants(street(None), 0.0) and gate.wants(street(100), 0.1)
    gate.failed(0.1)
    assert not gate.wants(street(None), 0.2)  # the car left before anyone saw it: as analysed at 0.0
    assert gate.wants(street(100), 0.3)


def test_max_skip_counts_from_the_last_analysed_frame_when_a_forced_one_failed():
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=1.0))
    assert gate.wants(street(None), 0.0) and gate.wants(street(None), 1.0)
    gate.failed(1.0)
    assert gate.wants(street(None), 1.1)


def test_the_gate_lets_the_next_frame_through_when_every_frame_it_remembers_failed():
    gate = MotionGate(MotionConfig(enabled=True, max_skip_s=60))
    sent = [f / 10 for f in range(12) if gate.wants(street(None if f % 2 else 200), f / 10)]
    assert len(sent) == 12  # more than the gate keeps
    for pts in sent:
        gate.failed(pts)
    assert gate.wants(street(200), 1.2)


# --- snapshots ------------------------------------------------------------------------------------------

def tracked(truth) -> sv.Detections:
    return sv.Detections(xyxy=truth.boxes.astype(float), confidence=np.ones(len(truth)), class_id=truth.class_ids,
                         tracker_id=truth.object_ids, data={"class_name": np.array(["car"] * len(truth))})


def test_snapshot_draws_on_the_scaled_picture_and_stays_under_max_bytes():
    scene = StreetScene(4, width=1280, height=720)
    rgb, truth = scene.step()
    frame = SourceFrame(0, 0.0, time.time(), (720, 1280), rgb)
    picture = frame.to_picture(640)
    assert picture.shape == (360, 640, 3)
    assert np.abs(picture[..., ::-1].astype(int) - cv2.resize(rgb, (640, 360), interpolation=cv2.INTER_AREA)).max() <= 1
    analytics = CameraAnalytics([ZoneConfig(name="z", polygon=[(0.1, 0.5), (0.5, 0.5), (0.5, 0.9)])],
                                [LineConfig(name="l", start=(0.6, 0.2), end=(0.6, 1.0))],
                                {"vehicles": ["car"]}, (1280, 720))
    plain = picture.copy()
    snap = Snapshotter(SnapshotConfig(max_width=640))
    fields = snap.render(picture, (1280, 720), [tracked(truth)], analytics, 7, 0.28, 1.5)
    assert (fields["frame"], fields["width"], fields["height"]) == (7, 640, 360)
    drawn = cv2.imdecode(np.frombuffer(fields["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(drawn.astype(int) - plain.astype(int)).mean() > 1  # boxes, zone and line are on it
    small = Snapshotter(SnapshotConfig(max_width=640, max_bytes=8192, quality=95))
    bounded = small.render(plain.copy(), (1280, 720), [tracked(truth)], analytics, 7, 0.28, 1.5)
    assert bounded["bytes"] == len(bounded["jpeg"]) <= 8192 and bounded["quality"] < 95


@pytest.mark.parametrize("max_bytes, shrunk", [(2_000_000, False), (60_000, True)])
def test_snapshot_size_is_the_size_of_its_jpeg_also_when_it_had_to_shrink(max_bytes, shrunk):
    noise = np.random.default_rng(0).integers(0, 256, (540, 960, 3), np.uint8)  # compresses badly
    fields = Snapshotter(SnapshotConfig(max_bytes=max_bytes)).render(noise, (1920, 1080), [], None, 1, 0.1, 0.0)
    jpeg = cv2.imdecode(np.frombuffer(fields["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert (fields["width"], fields["height"]) == (jpeg.shape[1], jpeg.shape[0])
    assert (jpeg.shape[1] < 960) == shrunk


def test_snapshot_draws_the_zones_of_new_analytics_that_took_the_place_of_freed_ones():
    """Each live change of zones makes a new CameraAnalytics, often at the address of the one just freed (the
    same id): drawings cached by id showed the old zones then. Which allocation reuses an address is up to
    CPython's allocator, so the change is made many times."""
    size, classes, no_lines = (640, 360), {"people": ["person"]}, []
    top_left = [ZoneConfig(name="door", polygon=[(0.1, 0.1), (0.4, 0.1), (0.4, 0.4)])]
    bottom_right = [ZoneConfig(name="gate", polygon=[(0.6, 0.6), (0.9, 0.6), (0.9, 0.9)])]
    snap = Snapshotter(SnapshotConfig())
    for change in range(20):
        zones = bottom_right if change % 2 else top_left
        # the test keeps no reference: each analytics lives only as long as the Snapshotter keeps one
        fields = snap.render(np.zeros((360, 640, 3), np.uint8), size, [],
                             CameraAnalytics(zones, no_lines, classes, size), change, change / 10, 0.0)
        drawn = cv2.imdecode(np.frombuffer(fields["jpeg"], np.uint8), cv2.IMREAD_GRAYSCALE) > 64
        assert (drawn[:180, :320].any(), drawn[180:, 320:].any()) == (zones is top_left, zones is bottom_right)


def test_picture_of_a_decoded_video_frame_matches_its_rgb(tmp_path):
    rgb = [StreetScene(2, width=320, height=192).step()[0] for _ in range(2)]
    path = encode_mp4(tmp_path / "clip.mp4", rgb, fps=10)
    with av.open(str(path)) as c:
        video_frame = next(c.decode(video=0))
        frame = SourceFrame(0, 0.0, 0.0, (video_frame.height, video_frame.width), video_frame)
        picture = frame.to_picture(160)
        full = frame.to_rgb()
    assert picture.shape == (96, 160, 3)
    want = cv2.resize(full, (160, 96), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.abs(picture.astype(int) - want.astype(int)).mean() < 4  # BGR, scaled: swscale vs cv2 filters


@pytest.mark.parametrize("pts, next_pts, expected", [
    (0.0, None, (True, 1.0)),   # the first frame
    (0.5, 1.0, (False, 1.0)),
    (1.04, 1.0, (True, 2.0)),   # on the grid: the frame's overshoot is not added to the next wait
    (3.5, 1.0, (True, 4.5)),    # a frame past a whole period (a gap in the stream): the grid starts again there
    (0.2, 5.0, (True, 1.2)),    # the clock went back (a file looped): due at once
])
def test_picture_due_at_most_fps_a_second(pts, next_pts, expected):
    assert picture_due(SnapshotConfig(fps=1.0), pts, next_pts) == expected


@pytest.mark.parametrize("camera_fps, snapshot_fps", [(10, 5), (15, 10), (12, 10), (10, 1), (25, 2)])
def test_a_camera_keeps_snapshot_fps_pictures_a_second(camera_fps, snapshot_fps):
    """The next due time counted from the frame that fell due: every overshoot added to the wait, so a 10 fps
    camera kept 4.69 pictures a second for snapshot.fps 5, a 12 fps one 6.0 for 10 (pts summed as the capture
    does, float errors included)."""
    settings, due_at, kept, pts = SnapshotConfig(fps=snapshot_fps), None, 0, 0.0
    for _ in range(camera_fps * 100):  # 100 s
        due, due_at = picture_due(settings, pts, due_at)
        kept += due
        pts += 1 / camera_fps
    assert abs(kept / 100 - snapshot_fps) <= 0.02, kept / 100


def test_snapshots_off_keep_no_picture():
    assert picture_due(SnapshotConfig(enabled=False), 5.0, None) == (False, None)


# --- the Publisher's hashes -------------------------------------------------------------------------------

def test_hashes_are_replaced_whole_and_written_with_the_batch(redis_server):
    client, k = redis_server.client(), keys("hv")
    with Publisher(redis_server.url) as pub:
        pub.set_hash(k.counts("cam"), {"v": 1, "zone:a:people:person": 2, "zone:b:people:person": 1})
        assert pub.flush()
        pub.set_hash(k.counts("cam"), {"v": 1, "zone:a:people:person": 3})  # zone b was removed
        pub.set_hash(k.snapshot("cam"), {"jpeg": b"\xff\xd8\x00binary\xff\xd9", "frame": 12})
        assert pub.flush()
        assert client.hgetall(k.counts("cam")) == {b"v": b"1", b"zone:a:people:person": b"3"}
        assert client.hget(k.snapshot("cam"), "jpeg") == b"\xff\xd8\x00binary\xff\xd9"
        assert pub.stats()["hashes_pending"] == 0


@pytest.mark.timeout(60)
def test_hashes_wait_out_an_outage_and_only_the_latest_is_written(redis_server):
    client, k = redis_server.client(), keys("hv")
    with Publisher(redis_server.url, connect_timeout_s=0.5, socket_timeout_s=0.5, max_backoff_s=0.2) as pub:
        pub.set_hash(k.counts("cam"), {"frame": 0})
        assert pub.flush()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # Redis refuses every batch from now on
        for f in range(1, 50):
            pub.set_hash(k.counts("cam"), {"frame": f})
        deadline = time.monotonic() + 10

        def kept() -> bool:  # between retries (while one is under way, the hash is in flight, not pending)
            s = pub.stats()
            return s["failing"] and s["hashes_pending"] == 1  # the latest value, kept
        while not kept() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kept()
        assert client.hget(k.counts("cam"), "frame") == b"0"
        client.config_set("maxmemory", 0)
        assert pub.flush(10)
        assert client.hget(k.counts("cam"), "frame") == b"49"
