"""pipeline/analytics_eval.py's ground truth on hand-made frames: an object fully hidden for a while (behind
another object, visibility 0) is still in the scene, so it is still inside a zone ("don't care" for occupancy,
like any object less than half visible), and a crossing it makes while hidden is a true crossing."""

from __future__ import annotations

import numpy as np

from pipeline.analytics_eval import STREET_LINES, STREET_ZONES, SceneRun, score_lines, score_zones
from synthetic.scene import CLASS_NAMES, FrameTruth
from workers.analytics import CameraAnalytics

HEADS = {"people": ["person"]}
SIZE, FPS = (640, 360), 10.0
PERSON = CLASS_NAMES.index("person")


def frame(f: int, boxes: list, visibility: list) -> FrameTruth:
    return FrameTruth(f, np.array(boxes, np.float32).reshape(-1, 4), np.full(len(boxes), PERSON, np.int64),
                      np.arange(1, len(boxes) + 1, dtype=np.int64), np.array(visibility, np.float32))


def scene_run(truths: list[FrameTruth], occupancy: list[int]) -> SceneRun:
    analytics = CameraAnalytics(STREET_ZONES, STREET_LINES, HEADS, SIZE)
    return SceneRun(0, FPS, SIZE, truths, [{} for _ in truths], [], [], [{"middle": n} for n in occupancy],
                    analytics, occupants=[{"middle": [("people", 0)] * n} for n in occupancy], heads=HEADS)


def test_an_object_hidden_for_a_moment_is_still_inside_the_zone():
    # A person standing in the zone (x 192..448, y 162..342) on frames 1-10, fully behind a passing car on
    # frames 5-6; the pipeline keeps it as an occupant throughout (what the zone's patience is for).
    truths = [frame(f, [[300, 200, 330, 300]], [0.0 if f in (5, 6) else 1.0]) if 1 <= f <= 10 else frame(f, [], [])
              for f in range(12)]
    occupancy = [1 if 1 <= f <= 10 else 0 for f in range(12)]
    matches = [{1: ("people", 0)} if 1 <= f <= 10 and f not in (5, 6) else {} for f in range(12)]
    z = score_zones(scene_run(truths, occupancy), matches)["middle"]
    assert z["exact"] == 1.0  # was 10/12: the hidden person was not among "all inside", so 1 counted > 0
    assert z["max_error"] == 0


def test_a_crossing_made_while_hidden_is_a_true_crossing():
    # A person walking right across the west line (x = 224) at 10 px a frame, fully hidden on frames 4-10
    # (behind a van standing at the line); seen again past it.
    truths = [frame(f, [[150 + 10 * f, 250, 170 + 10 * f, 300]], [0.0 if 4 <= f <= 10 else 1.0]) for f in range(16)]
    lines = score_lines(scene_run(truths, [0] * 16), [{} for _ in truths])
    assert lines["west"]["truth_all"] == 1  # was 0: LineZone forgot the person while it was hidden
    assert lines["west"]["by_class"] == {"people/person/in": {"pipeline": 0, "truth_tracked": 0, "truth_all": 1}}
