"""Edges of the measurement code and the synthetic scenes it rests on: the parked-car scene's truth agrees with its
picture (objects under the car are not "visible", the car has the scene's sensor noise), and an attribute head's
score pairs a car with the car detection on it, not with a bicycle detection on the very same box."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from models.evaluate import AttributeScore, greedy_pairs
from models.letterbox import letterbox
from pipeline.analytics_eval import parked_scene
from synthetic.scene import StreetScene

PARKED = 10**6


def test_a_parked_car_hides_the_passers_by_under_it_in_the_truth_too():
    """The car was pasted on the finished frames: objects under it vanished from the picture while their truth
    still called them visible (on the motion gate's benchmark streets, 6-8% of the targets), so a detector was
    scored as missing what no picture showed."""
    seed, n = 3, 30
    plain = StreetScene(seed, fps=10.0, density=3.0)
    covered = 0
    for f, (_, truth) in enumerate(parked_scene(seed, n, at=(0.5, 0.85), length=0.6, density=3.0)):
        _, alone = plain.step()  # the same street without the car: the same objects, as visible as the scene draws them
        assert truth.object_ids[-1] == PARKED and np.array_equal(truth.object_ids[:-1], alone.object_ids), f
        assert (truth.visibility[:-1] <= alone.visibility + 1e-6).all(), f  # the car hides, never reveals
        covered += int(np.sum((alone.visibility >= 0.5) & (truth.visibility[:-1] < 0.5)))
    assert covered >= 5  # before: 0, every object as visible as without the car


def test_a_parked_car_has_the_sensor_noise_and_light_of_its_scene():
    """Pasted after the scene's light drift and noise, the car's pixels were the same on every frame (a perfectly
    still, noiseless object: the motion gate's easiest case), unlike the docstring's "sensor noise and light drift"."""
    (a, truth), (b, _) = list(parked_scene(5, 2))
    x0, y0, x1, y1 = truth.boxes[-1].astype(int)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    inner = (slice(cy - (y1 - y0) // 6, cy + (y1 - y0) // 6), slice(cx - (x1 - x0) // 4, cx + (x1 - x0) // 4))
    changed = np.mean(np.any(a[inner] != b[inner], axis=-1))
    assert changed > 0.3, changed  # before: 0.0


# A car seen by an FCOS head: one location gives a car box and a bicycle box with the very same coordinates.
CARS = [[10 + 40 * i, 10, 40 + 40 * i, 40] for i in range(6)]


@pytest.mark.parametrize("bicycles_first", [False, True], ids=["score-sorted", "bicycles-listed-first"])
def test_an_attribute_is_scored_on_the_surer_of_two_detections_on_one_box(bicycles_first):
    """The truth car went to whichever of the two tied detections numpy's sort put first (an order that changes
    with the CPU): 2 of these 6 cars were "matched without label" here, 4 with the bicycles listed first."""
    _, lb = letterbox(np.zeros((192, 320, 3), np.uint8), (192, 320))  # frames at the model's size: identity
    truth = SimpleNamespace(boxes=np.array(CARS, np.float32), class_ids=np.full(6, 1), kinds=np.array(["van"] * 6))
    car = (CARS, [0.9] * 6, [0] * 6, ["van"] * 6)
    bicycle = (CARS, [0.4] * 6, [1] * 6, [""] * 6)  # an attribute of cars: a bicycle box carries no label
    parts = [bicycle, car] if bicycles_first else [car, bicycle]
    d = {key: np.concatenate([np.array(p[i]) for p in parts]) for i, key in
         enumerate(["boxes", "scores", "class_ids", "attr:kind"])}
    score = AttributeScore(["sedan", "hatch", "van"])
    score.update(d, lb, truth, np.ones(6, bool), SimpleNamespace(of=["car"]), 0.3, "kind")
    report = score.report()
    assert report["matched_without_label"] == 0 and report["scored"] == 6 and report["accuracy"] == 1.0, report


def test_greedy_pairs_break_iou_ties_by_row_then_column():
    iou = np.array([[0.7, 0.7, 0.2, 0.7], [0.7, 0.7, 0.7, 0.1], [0.3, 0.7, 0.7, 0.7]])
    assert greedy_pairs(iou, 0.5) == [(0, 0), (1, 1), (2, 2)]
