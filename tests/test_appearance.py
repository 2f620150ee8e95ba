"""Appearance in tracking (workers/appearance.py): identities that motion alone loses are kept by the re-ID
embeddings, a different-looking object is not given a lost one's id, tracks end when nothing can continue them,
and without embeddings the tracker is exactly ByteTrack."""

import numpy as np
import pytest
import supervision as sv
from trackers import ByteTrackTracker

from workers.appearance import AppearanceByteTrack
from workers.settings import AppearanceConfig, TrackerConfig
from workers.tracking import CameraTracker

FPS = 10.0
LOOKS = {"a": np.array([1.0, 0.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0, 0.0]),
         "a'": np.array([0.96, 0.28, 0.0, 0.0])}  # a' is a seen in another pose: cosine 0.96 with a


def dets(objects: list[tuple[float, float, str]], w: float = 20.0, h: float = 40.0, conf: float = 0.9) -> sv.Detections:
    """People at (x, y) of their top-left corner, each with a look (its embedding)."""
    if not objects:
        det = sv.Detections.empty()
        det.data["class_name"] = np.array([], dtype=str)
        return det
    return sv.Detections(xyxy=np.array([[x, y, x + w, y + h] for x, y, _ in objects], float),
                         confidence=np.full(len(objects), conf), class_id=np.zeros(len(objects), int),
                         data={"class_name": np.array(["person"] * len(objects)),
                               "embedding": np.stack([LOOKS[look] for _, _, look in objects]).astype(np.float16)})


def tracker(appearance: bool, **options) -> CameraTracker:
    return CameraTracker(["people"], TrackerConfig(appearance=AppearanceConfig(enabled=appearance, **options)), FPS)


def occluded_walk(back_look: str = "a'") -> list[sv.Detections]:
    """A person walks right at 4 px a frame, is hidden for 6 frames (behind a van), and comes out 30 px behind
    where its pace would have taken it (it slowed down there): ByteTrack's prediction no longer overlaps it."""
    frames = [dets([(10 + 4 * f, 50, "a")]) for f in range(10)]
    frames += [dets([]) for _ in range(6)]
    frames += [dets([(10 + 4 * f - 30, 50, back_look)]) for f in range(16, 26)]
    return frames


def run(camera: CameraTracker, frames: list[sv.Detections]) -> tuple[list[list[int]], list[dict]]:
    ids, events = [], []
    for f, det in enumerate(frames):
        tracked, ev = camera.update("people", det, f, f / FPS)
        ids.append([int(i) for i in tracked.tracker_id])
        events += [{**e, "at": f} for e in ev]
    return ids, events


@pytest.mark.parametrize("appearance, same_id", [(True, True), (False, False)])
def test_a_person_hidden_for_a_moment_keeps_its_id_by_appearance(appearance, same_id):
    camera = tracker(appearance)
    ids, events = run(camera, occluded_walk())
    before, after = ids[5][0], ids[20][0]
    assert camera.appearance_stats()["people"] == ({"embedded": 20, "relinks": 1} if appearance
                                                   else {"embedded": 0, "relinks": 0})
    assert before >= 0 and after >= 0
    assert (before == after) == same_id  # motion alone: a second id for the same person (an ID switch)
    if same_id:  # one track, never ended in between, no second start
        assert [e["type"] for e in events] == ["track_started"]
        assert all(i in ([-1], [before]) for i in ids[16:])  # its first frame out is unconfirmed, then its own id


def test_someone_who_looks_different_gets_a_new_id():
    ids, events = run(tracker(True), occluded_walk(back_look="b"))
    assert ids[5][0] >= 0 and ids[20][0] >= 0 and ids[20][0] != ids[5][0]


def test_a_lost_track_ends_once_nothing_can_continue_it():
    frames = occluded_walk()[:10] + [dets([]) for _ in range(40)]
    for appearance, waits_s in ((True, 2.0), (False, 1.0)):  # re-link window, or ByteTrack's lost buffer (30/30 s)
        _, events = run(tracker(appearance, max_lost_s=2.0), frames)
        ended = [e for e in events if e["type"] == "track_ended"]
        assert len(ended) == 1 and ended[0]["last_frame"] == 9
        assert ended[0]["at"] - 9 == pytest.approx(waits_s * FPS, abs=1)


def test_crossing_people_keep_their_ids_where_motion_swaps_them():
    """Two people walk towards each other and cross. While they overlap the detector sees one box around both
    (the one in front, b, is what it looks like); motion alone gives that box to a's track, and b comes out of
    the crossing with a's id."""
    frames = []
    for f in range(40):
        xa, xb = 40 + 5 * f, 200 - 5 * f
        if abs(xa - xb) < 20:
            frames.append(dets([(min(xa, xb), 50, "b")], w=abs(xa - xb) + 20))
        else:
            frames.append(dets([(xa, 50, "a"), (xb, 50, "b")]))
    ids_of = {}
    for appearance in (False, True):
        camera, seen = tracker(appearance), {"a": set(), "b": set()}
        for f, det in enumerate(frames):
            tracked, _ = camera.update("people", det, f, f / FPS)
            for look, i in zip(tracked.data["embedding"].argmax(1), tracked.tracker_id):
                if i >= 0:
                    seen["ab"[look]].add(int(i))
        ids_of[appearance] = seen
    assert len(ids_of[False]["b"]) == 2 and ids_of[False]["a"] <= ids_of[False]["b"]  # b took a's id for a while
    assert len(ids_of[True]["a"]) == len(ids_of[True]["b"]) == 1 and ids_of[True]["a"] != ids_of[True]["b"]


def test_without_embeddings_it_is_bytetrack():
    rng = np.random.default_rng(0)
    options = dict(frame_rate=FPS, track_activation_threshold=0.6, minimum_iou_threshold=0.1, high_conf_det_threshold=0.5)
    ours, theirs = AppearanceByteTrack(**options, weight=0.5), ByteTrackTracker(**options)
    x = rng.uniform(0, 300, (8, 2))
    v = rng.normal(0, 4, (8, 2))
    for f in range(60):
        keep = rng.random(8) > 0.2
        pos = x + v * f + rng.normal(0, 1.5, (8, 2))
        det = sv.Detections(xyxy=np.concatenate([pos, pos + [20, 40]], 1)[keep],
                            confidence=rng.uniform(0.2, 1.0, 8)[keep], class_id=np.zeros(int(keep.sum()), int))
        a, b = ours.update(det), theirs.update(det)
        np.testing.assert_array_equal(a.xyxy, b.xyxy)
        np.testing.assert_array_equal(a.tracker_id, b.tracker_id)


def test_a_non_finite_embedding_from_the_model_is_no_look_and_tracking_goes_on():
    """An fp16 overflow in the re-ID head gives a NaN embedding: the track it started carried NaN, every later
    assignment near it failed ('matrix contains invalid numeric entries') and each such frame was lost for all
    heads. to_detections now passes such a row on as no look at all."""
    from models.letterbox import Letterbox
    from workers.frames import to_detections

    lb = Letterbox.fit((360, 640), (360, 640))  # model input = source pixels

    def model_output(look: np.ndarray) -> sv.Detections:
        arrays = {"boxes": np.array([[100, 50, 120, 90]], np.float32), "scores": np.array([0.9], np.float32),
                  "class_ids": np.array([0]), "embedding": look[None].astype(np.float16)}
        return to_detections(arrays, lb, ["person"])

    camera = tracker(True)
    ids = []
    for f in range(30):  # a parked person, its first look NaN
        tracked, _ = camera.update("people", model_output(np.full(4, np.nan) if f == 0 else LOOKS["a"]), f, f / FPS)
        ids += tracked.tracker_id.tolist()
    assert len(ids) == 30 and len({i for i in ids if i >= 0}) == 1, ids
