"""The camera loop's cheaper paths give what the paths they replace gave (benchmarks/README.md, "hv-loop's CPU per
frame"): a frame's message built from detection_records' records as they are (records_message), the open tracks'
rows of a status without their track_ended dicts (CameraTracker.open_rows), and both latency percentiles of a
status from one call."""

from __future__ import annotations

import collections
import math
import random

import numpy as np
import pytest

from workers.frames import detection_records, to_detections
from workers.publish import detection_message, encode, records_message
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker


def _records(rng: random.Random, heads: list[str], n: int) -> list[dict]:
    """Records as detection_records makes them, from random model-like arrays of each head."""
    from models.letterbox import Letterbox

    lb = Letterbox.fit((360, 640), (192, 320))
    out = []
    for head in heads:
        k = rng.randint(0, n)
        xy = np.array([[rng.uniform(-20, 330), rng.uniform(-20, 200)] for _ in range(k)], np.float32).reshape(-1, 2)
        wh = np.array([[rng.uniform(0, 90), rng.uniform(0, 90)] for _ in range(k)], np.float32).reshape(-1, 2)
        arrays = {"boxes": np.concatenate([xy, xy + wh], axis=1), "scores": np.array(
                      [rng.random() for _ in range(k)], np.float32),
                  "class_ids": np.array([rng.randint(0, 1) for _ in range(k)], np.int64),
                  "attr:kind": np.array([rng.choice(["", "van", "sedan"]) for _ in range(k)]),
                  "attr:kind:conf": np.array([rng.random() for _ in range(k)], np.float32)}
        det = to_detections(arrays, lb, ["a", "b"])
        ids = np.array([rng.randint(-1, 50) for _ in range(len(det))], np.int64)
        out += detection_records(head, det, ids if rng.random() < 0.7 else None)
    return out


def test_records_message_is_detection_message_for_detection_records():
    rng = random.Random(13)
    for trial in range(300):
        heads = ["people", "vehicles"][:rng.randint(1, 2)]
        records = _records(rng, heads, 12)
        args = ("cam", trial, trial / 7, 1.8e9 + trial / 7, rng.uniform(-5, 300), (640, 360))
        want = detection_message(*args, records, heads)
        got = records_message(*args, records, heads)
        assert got == want
        assert encode(got) == encode(want)  # the same bytes in Redis: key order, types, rounding


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["box", "conf", "attribute", "pts", "latency"])
def test_records_message_refuses_what_detection_message_refuses(bad, where):
    records = [{"head": "vehicles", "track_id": 1, "class": "car", "class_id": 0, "conf": 0.5,
                "box": [1.0, 2.0, 3.0, 4.0], "attributes": {"kind": {"label": "van", "conf": 0.9}}}]
    pts, latency = 0.5, 10.0
    if where == "box":
        records[0]["box"][2] = bad
    elif where == "conf":
        records[0]["conf"] = bad
    elif where == "attribute":
        records[0]["attributes"]["kind"]["conf"] = bad
    elif where == "pts":
        pts = bad
    else:
        latency = bad
    args = ("cam", 3, pts, 1.8e9, latency, (640, 360), records, ["vehicles"])
    with pytest.raises(ValueError) as want:
        detection_message(*args)
    with pytest.raises(ValueError) as got:
        records_message(*args)
    assert str(got.value) == str(want.value)


def test_records_message_of_a_head_that_did_not_run_raises_as_detection_message():
    records = [{"head": "people", "track_id": None, "class": "person", "class_id": 0, "conf": 0.5,
                "box": [1.0, 2.0, 3.0, 4.0]}]
    with pytest.raises(ValueError, match="heads that ran"):
        records_message("cam", 1, 0.0, 1.8e9, 1.0, (640, 360), records, ["vehicles"])


def test_open_rows_are_the_ended_fields_of_the_open_tracks():
    tracker = CameraTracker(["people"], TrackerConfig(), 10.0)
    rng = np.random.default_rng(3)
    from models.letterbox import Letterbox

    lb = Letterbox.fit((360, 640), (360, 640))
    boxes = rng.uniform(0, 300, (6, 2)).astype(np.float32)
    for f in range(12):
        xy = boxes + f * 2.5
        arrays = {"boxes": np.concatenate([xy, xy + 40], axis=1), "scores": np.full(6, 0.9, np.float32),
                  "class_ids": np.zeros(6, np.int64)}
        tracker.update("people", to_detections(arrays, lb, ["person"]), f, f / 10 + 0.0333)
    rows = tracker.open_rows()
    assert rows and rows["people"]
    ended = CameraTracker._ended
    want = {h: [[e[f] for f in CameraTracker.OPEN_FIELDS] for e in map(ended, ht.active.values())]
            for h, ht in tracker.heads.items() if ht.active}
    assert rows == want
    assert CameraTracker.ended_from_rows(rows) == [{k: v for k, v in CameraTracker._ended(st).items() if k != "type"}
                                                   for st in tracker.heads["people"].active.values()]


def test_both_latency_percentiles_from_one_call_are_those_of_a_call_each():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 100, 299, 300]:
        for _ in range(200):
            latencies = collections.deque((rng.gamma(2.0, 40.0, n) * 10 ** rng.uniform(-2, 2)).tolist(), maxlen=300)
            lat = np.array(latencies)
            p50, p95 = np.percentile(lat, (50, 95)).tolist()
            assert (round(p50, 1), round(p95, 1)) == (round(float(np.percentile(lat, 50)), 1),
                                                      round(float(np.percentile(lat, 95)), 1))
            assert (p50, p95) == (float(np.percentile(lat, 50)), float(np.percentile(lat, 95)))
