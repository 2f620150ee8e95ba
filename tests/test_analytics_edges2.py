"""Zones and lines, a second look (workers/analytics.py, workers/analytics_settings.py): what a long-running
camera showed wrong (a crossing never counted, an occupant entering twice, counts left stale) and a config error
that misled, driven with synthetic tracked detections (and the project's own tracker where the bug needs its ids)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import supervision as sv

from pipeline.config import ConfigError, parse_config
from workers.analytics import CameraAnalytics, LineCounter
from workers.analytics_settings import LineConfig, ZoneConfig
from workers.publish import keys
from workers.settings import TrackerConfig
from workers.stream import CameraPipeline
from workers.tracking import CameraTracker

HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}
SIZE = (640, 360)
SQUARE = [[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]]  # normalised: x 160..480, y 90..270
DOWN_THE_MIDDLE = {"start": (0.5, 0.0), "end": (0.5, 1.0)}  # x = 320: left to right is "in"


def people(boxes, ids=None, look=None):
    """Person detections; ``ids``: tracker ids (None: untracked, for the tracker); ``look``: a re-ID embedding."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    det = sv.Detections(xyxy=boxes, confidence=np.full(len(boxes), 0.9), class_id=np.zeros(len(boxes), int),
                        tracker_id=None if ids is None else np.asarray(ids, int).reshape(-1),
                        data={"class_name": np.array(["person"] * len(boxes))})
    if look is not None:
        det.data["embedding"] = np.tile(look, (len(boxes), 1)).astype(np.float32)
    return det


def standing_at(x, y, h=60.0, w=20.0):
    """A box whose bottom centre (a zone's default anchor) is at (x, y)."""
    return [x - w / 2, y - h, x + w / 2, y]


def kinds(events):
    return [(e["type"], e["track_id"]) for e in events]


# --- lines ------------------------------------------------------------------------------------------------

def test_a_track_hidden_at_the_line_for_longer_than_30_frames_at_25_fps_is_still_counted():
    """A walker hidden behind a pole on the line for 1.6 s comes back past it under the same id (the tracker's
    re-ID gives a lost track its id back for 2 s). The line forgot its side after 30 analysed frames, 1.2 s at
    25 fps, and never counted the crossing; once the track has been gone longer than that it is still
    forgotten (the line's memory stays bounded)."""
    fps, look = 25.0, np.eye(16, dtype=np.float32)[3]
    tracker = CameraTracker(["people"], TrackerConfig(), frame_rate=fps)
    line = LineCounter(LineConfig(name="l", **DOWN_THE_MIDDLE), SIZE, HEADS, HEADS)
    events, ids = [], set()
    for f in range(200):
        x = 100.0 + 3 * f  # 75 px/s, left to right: the box reaches the line at f = 60 and is past it by f = 80
        hidden = 60 <= f < 100 or f >= 110  # 1.6 s at the line; gone for good after f = 110
        tracked, _ = tracker.update("people", people([] if hidden else [[x, 150, x + 40, 230]], look=look), f, f / fps)
        ids |= {int(t) for t in tracked.tracker_id if t >= 0}
        events += line.update("people", tracked, f, f / fps)
    assert len(ids) == 1  # the tracker did bring it back under its id
    assert [(e["direction"], e["track_id"], e["count"]) for e in events] == [("in", ids.pop(), 1)]
    assert line.counts()[("people", "person")] == {"in": 1, "out": 0}
    assert not line.zones["people"].crossing_state_history  # 3.6 s after it went for good: forgotten


# --- zones ------------------------------------------------------------------------------------------------

def test_an_occupant_whose_own_track_comes_back_after_a_takeover_does_not_enter_twice():
    """A person (track 1) stands in the zone; on one frame the detector misses them and a new track (2) is
    confirmed on a box overlapping theirs (a duplicate box, or someone stepping out beside them), which takes
    the occupant over. Track 1 is seen again on the next frame: it got a second zone_entered (no zone_left
    between), the zone counted two people, and when track 2's box was gone for good a zone_left named track 1
    while it still stood there."""
    a = CameraAnalytics([ZoneConfig(name="z", polygon=SQUARE)], [], HEADS, SIZE)
    events = []
    for f in range(80):
        t = f / 10
        if f == 10:
            det = people([standing_at(304, 200)], [2])  # 1 missed; 2 where 1 stands
        else:
            det = people([standing_at(300, 200)], [1])
        events += a.update("people", det, f, t)
        if f > 10:
            assert a.counts()["zone:z:people:person"] == 1, (f, kinds(events))
    assert kinds(events) == [("zone_entered", 1)]
    (occupant,) = a.zones["z"].occupants.values()
    assert (occupant.track_id, occupant.current_id, occupant.track_ids) == (1, 1, [1])


# --- the counts hash ----------------------------------------------------------------------------------------

class Hashes:
    """Stands in for the Publisher: keeps the hashes set and the events sent."""

    keys = keys("hv")

    def __init__(self) -> None:
        self.hashes: dict[str, dict] = {}
        self.events: list[dict] = []

    def set_hash(self, key: str, fields: dict) -> None:
        self.hashes[key] = fields

    def publish_event(self, message: dict) -> None:
        self.events.append(message)


def test_counts_of_a_zone_switched_off_by_another_frame_size_are_not_left_as_current():
    """A pixel zone fits the camera's 1280x720 main stream; its URL is changed to the 640x360 sub-stream, where
    the zone does not fit and is switched off (analytics_error says so). With no zone or line left on, the
    counts hash was never written again: it kept showing the zone's last occupancy as the camera's counts."""
    pub = Hashes()
    door = {"name": "door", "units": "pixels", "polygon": [[0, 0], [1200, 0], [1200, 700], [0, 700]]}
    pipe = CameraPipeline({"id": "cam", "url": "synthetic://street", "zones": [door]}, None,
                          {"input_size": [192, 320], "heads": HEADS}, pub)

    def frame(index: int, size: tuple[int, int]) -> dict:
        item = SimpleNamespace(index=index, pts=index / 10, wall=1000.0 + index, size=size, picture=None)
        analytics = pipe._current_analytics(item)
        if analytics:
            analytics.update("people", people([standing_at(300, 200)], [1]), index, item.pts)
        pipe._after_analytics(item, analytics)
        return pub.hashes[pub.keys.counts("cam")]

    assert [frame(i, (720, 1280))["zone:door:people:person"] for i in range(3)] == [0, 1, 1]
    counts = frame(3, (360, 640))
    assert [e["reason"] for e in pub.events if e["type"] == "analytics_error"] == [
        "zones[0].polygon: point (1200, 0) is outside the 640x360 frame; zone 'door' is off"]
    assert counts["frame"] == 3 and not [k for k in counts if k.startswith("zone:")]


# --- settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item", [
    {"zones": [{"name": "door", "units": "pixel", "polygon": [[500, 200], [640, 200], [640, 360]]}]},
    {"lines": [{"name": "gate", "units": "pixel", "start": [320, 0], "end": [320, 360]}]},
])
def test_misspelled_units_are_the_one_error_not_also_points_outside_normalized_coordinates(item):
    """`units: pixel` (for pixels) was refused with its own error, and every pixel point was refused as well,
    as outside normalized coordinates, telling the user to "set units: pixels", which they had tried to do."""
    kind = next(iter(item))
    with pytest.raises(ConfigError) as e:
        parse_config({"cameras": [{"id": "c", "url": "synthetic://street", **item}]})
    assert str(e.value).splitlines()[1:] == [
        f"cameras[0].{kind}[0].units: Input should be 'normalized' or 'pixels' (got 'pixel')"]
