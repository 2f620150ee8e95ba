"""models.evaluate.evaluate() against average precision worked out by hand on a tiny case.

The frames and the model's detections are made by hand (the model's detect() is replaced), so every
number below can be checked on paper: which prediction is a true positive at which IoU, the ranking by score
across frames, the predictions on mostly hidden objects that count as neither, and COCO's 101-point
interpolated precision that supervision's MeanAveragePrecision computes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models.evaluate as evaluate_module
from models.evaluate import EvalConfig, evaluate
from models.hydranet import HydraNet, HydraNetConfig
from models.postprocess import HeadDetections
from pipeline.model_commands import format_report

SIZE = (192, 320)  # (h, w): frames are the model's input size, so letterboxing is the identity
PERSON, CAR, BICYCLE = 0, 1, 2  # synthetic class ids (index into the scenes' CLASS_NAMES)

# Frame 0: three objects the people head must find, one person too hidden to be a target.
P1, P2, H = [10, 10, 40, 90], [60, 10, 90, 90], [200, 10, 230, 90]
# Frame 1: a person, two cars and a bicycle.
P3, C1, C2, B1 = [110, 10, 140, 90], [10, 100, 80, 150], [100, 100, 170, 150], [200, 120, 240, 160]
NOWHERE = [250, 100, 280, 180]
P3_SHIFTED = [116, 10, 146, 90]  # 6 px right of P3: IoU = 24*80 / (2*30*80 - 24*80) = 2/3

TRUTH = [  # per frame: (boxes, synthetic class ids, visibility)
    ([P1, P2, H], [PERSON, PERSON, PERSON], [1.0, 0.8, 0.2]),
    ([P3, C1, C2, B1], [PERSON, CAR, CAR, BICYCLE], [1.0, 1.0, 0.6, 1.0]),
]
# per frame, per head: (boxes, scores, head class ids)
PREDICTIONS = [
    {"people": ([P1, NOWHERE, P2, H, P1], [0.9, 0.8, 0.7, 0.6, 0.4], [0, 0, 0, 0, 0]),
     "vehicles": ([], [], [])},
    {"people": ([P3_SHIFTED], [0.5], [0]),
     "vehicles": ([C2, B1, C1, B1], [0.95, 0.85, 0.3, 0.9], [0, 0, 0, 1])},  # 0 = car, 1 = bicycle
]

# people, ranked by score over both frames (H's prediction is dropped: it sits on a mostly hidden person):
#   0.9 P1 TP | 0.8 FP | 0.7 P2 TP | 0.5 P3_SHIFTED TP while IoU 2/3 >= threshold | 0.4 P1 again: FP
# IoU thresholds 0.50, 0.55, 0.60, 0.65 (3 targets):
#   precision 1, 1/2, 2/3, 3/4, 3/5 at recall 1/3, 1/3, 2/3, 1, 1; interpolated (max to the right):
#   1 for recall 0.00..0.33 (34 of the 101 points), 3/4 for 0.34..1.00 (67 points)
AP_PEOPLE_LOOSE = (34 * 1 + 67 * 3 / 4) / 101  # 0.83416
# IoU thresholds 0.70 .. 0.95 (6 of them): P3_SHIFTED is a false positive too:
#   precision 1, 1/2, 2/3, 1/2, 2/5 at recall 1/3, 1/3, 2/3, 2/3, 2/3; interpolated:
#   1 for 0.00..0.33 (34 points), 2/3 for 0.34..0.66 (33 points), recall 0.67..1 never reached: 0 (34 points)
AP_PEOPLE_STRICT = (34 * 1 + 33 * 2 / 3) / 101  # 0.55446
# cars (the 0.85 "car" on the bicycle is a false positive: matching is per class):
#   0.95 C2 TP | 0.85 FP | 0.3 C1 TP, 2 targets: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;
#   interpolated 1 for 0.00..0.50 (51 points), 2/3 for 0.51..1.00 (50 points); exact boxes: every threshold
AP_CAR = (51 * 1 + 50 * 2 / 3) / 101  # 0.83498
AP_BICYCLE = 1.0


def frames_of(truth: list):
    """A stand-in for held_out_frames(cfg) that yields these hand-made frames."""
    def frames(_cfg):
        for f, (boxes, classes, visibility) in enumerate(truth):
            image = np.full((*SIZE, 3), f, np.uint8)  # the frame's number, so the fake model knows which it got
            yield image, SimpleNamespace(boxes=np.array(boxes, np.float32), class_ids=np.array(classes, np.int64),
                                         visibility=np.array(visibility, np.float32))
    return frames


def hand_made_detect(images: torch.Tensor, heads_per_image, score_threshold=None, autocast_dtype=None):
    out = []
    for image, heads in zip(images, heads_per_image):
        frame = PREDICTIONS[int(image[0, 0, 0])]
        out.append({h: HeadDetections(torch.tensor(frame[h][0], dtype=torch.float32).reshape(-1, 4),
                                      torch.tensor(frame[h][1], dtype=torch.float32),
                                      torch.tensor(frame[h][2], dtype=torch.int64)) for h in heads})
    return out


@pytest.fixture
def hand_made_model(monkeypatch) -> HydraNet:
    assert evaluate_module.CLASS_NAMES[:3] == ("person", "car", "bicycle")
    monkeypatch.setattr(evaluate_module, "held_out_frames", frames_of(TRUTH))
    model = HydraNet(HydraNetConfig(input_size=SIZE, backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16},
                                    heads={"people": {"classes": ["person"]},
                                           "vehicles": {"classes": ["car", "bicycle"]}}))
    model.detect = hand_made_detect
    return model


def test_evaluate_matches_average_precision_worked_out_by_hand(hand_made_model: HydraNet) -> None:
    report = evaluate(hand_made_model, EvalConfig(scenes=1, frames_per_scene=2))
    assert report["frames"] == 2
    people, vehicles = report["heads"]["people"], report["heads"]["vehicles"]
    assert people["map50"] == pytest.approx(AP_PEOPLE_LOOSE, abs=1e-4)
    assert people["ap50_per_class"] == {"person": pytest.approx(AP_PEOPLE_LOOSE, abs=1e-4)}
    assert people["map50_95"] == pytest.approx((4 * AP_PEOPLE_LOOSE + 6 * AP_PEOPLE_STRICT) / 10, abs=1e-4)
    assert vehicles["ap50_per_class"] == {"car": pytest.approx(AP_CAR, abs=1e-4),
                                          "bicycle": pytest.approx(AP_BICYCLE, abs=1e-4)}
    assert vehicles["map50"] == pytest.approx((AP_CAR + AP_BICYCLE) / 2, abs=1e-4)
    assert vehicles["map50_95"] == pytest.approx((AP_CAR + AP_BICYCLE) / 2, abs=1e-4)


def test_prediction_on_a_hidden_object_is_neither_hit_nor_miss(hand_made_model: HydraNet, monkeypatch) -> None:
    """The same case with the hidden person made visible: H's prediction becomes a fourth true positive."""
    truth = [(TRUTH[0][0], TRUTH[0][1], [1.0, 0.8, 1.0])] + TRUTH[1:]
    monkeypatch.setattr(evaluate_module, "held_out_frames", frames_of(truth))
    report = evaluate(hand_made_model, EvalConfig(scenes=1, frames_per_scene=2))
    # 4 targets: 0.9 TP | 0.8 FP | 0.7 TP | 0.6 H TP | 0.5 TP | 0.4 FP
    # precision 1, 1/2, 2/3, 3/4, 4/5, 2/3 at recall 1/4, 1/4, 1/2, 3/4, 1, 1; interpolated:
    # 1 for 0.00..0.25 (26 points), 4/5 for 0.26..1.00 (75 points)
    assert report["heads"]["people"]["map50"] == pytest.approx((26 + 75 * 4 / 5) / 101, abs=1e-4)


def test_a_class_without_targets_is_not_scored(hand_made_model: HydraNet, monkeypatch) -> None:
    """No bicycle in the frames: its predictions count for no class, and the head's mAP is the car's AP
    (COCO skips a category without ground truth rather than scoring it 0 or -1)."""
    truth = [TRUTH[0], ([P3, C1, C2], [PERSON, CAR, CAR], [1.0, 1.0, 0.6])]
    monkeypatch.setattr(evaluate_module, "held_out_frames", frames_of(truth))
    report = evaluate(hand_made_model, EvalConfig(scenes=1, frames_per_scene=2))
    vehicles = report["heads"]["vehicles"]
    assert vehicles["ap50_per_class"] == {"car": pytest.approx(AP_CAR, abs=1e-4)}
    assert vehicles["map50"] == pytest.approx(AP_CAR, abs=1e-4)
    assert vehicles["classes_without_targets"] == ["bicycle"]  # the report says which class the mAP leaves out
    assert f"car {AP_CAR:.3f}; no targets of bicycle" in format_report({**report, "checkpoint": "tiny"})


def test_a_head_without_any_target_is_not_scored(hand_made_model: HydraNet, monkeypatch) -> None:
    """No car nor bicycle in the frames (the vehicles head still predicts four boxes): supervision's mAP is its
    -1 sentinel, which is no score; the report lists the head as not scored instead of an mAP of -1."""
    truth = [TRUTH[0], ([P3], [PERSON], [1.0])]
    monkeypatch.setattr(evaluate_module, "held_out_frames", frames_of(truth))
    report = evaluate(hand_made_model, EvalConfig(scenes=1, frames_per_scene=2))
    assert list(report["heads"]) == ["people"]
    assert report["skipped"] == {"vehicles": "no visible object of its classes (car, bicycle) in the 2 frames"}
