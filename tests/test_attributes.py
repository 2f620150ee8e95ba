"""Attribute heads: RoI sampling reads the right place, labels reach only their classes, the message and the
schema carry them, training leaves the rest of the model bit-identical."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from models.attributes import roi_features
from models.checkpoint import load_checkpoint, save_checkpoint
from models.evaluate import EvalConfig, evaluate
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.letterbox import letterbox
from models.train_attributes import AttributeTrainConfig, train_attribute
from synthetic.scene import CAR_KINDS, StreetScene
from workers.frames import detection_records, to_detections
from workers.publish import detection_message
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "workers/schemas/detection-v1.json").read_text())
KIND = {"labels": list(CAR_KINDS), "on": "vehicles", "of": ["car"]}


def tiny(attributes=None) -> HydraNet:
    torch.manual_seed(0)
    return HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                   neck={"type": "fpn", "channels": 16},
                                   heads={"people": {"classes": ["person"]}, "vehicles": {"classes": ["car", "bicycle"]}},
                                   attributes={"kind": KIND} if attributes is None else attributes)).eval()


def test_roi_sampling_reads_the_box_on_the_level_that_fits_its_size():
    # maps whose value is the x coordinate (in input pixels) of each cell's centre: a bin reads its own x
    strides = (8, 16, 32)
    feats = [((torch.arange(96 // s) + 0.5) * s).float().expand(1, 2, 64 // s, 96 // s).clone() for s in strides]
    boxes = [torch.tensor([[16.0, 8.0, 44.0, 36.0], [0.0, 0.0, 96.0, 64.0]])]
    out = roi_features(feats, strides, boxes, pool=2)
    assert out.shape == (2, 2, 2, 2)
    # small box on stride 8: bin centres at x = 23 and 37, sampled bilinearly between cell centres
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([23.0, 37.0]))
    # the whole image (78 px side) goes to a coarser level; centres 24 and 72 still read as 24 and 72
    torch.testing.assert_close(out[1, 0, 1], torch.tensor([24.0, 72.0]))
    assert roi_features(feats, strides, [torch.zeros(0, 4)], pool=2).shape == (0, 2, 2, 2)


def test_roi_sampling_of_a_batch_equals_each_box_sampled_alone():
    # boxes of one level in several images, several of a level in one image, images with none of a level or
    # none at all: each box reads its own image and place (a batched rewrite must keep this)
    torch.manual_seed(3)
    strides = (8, 16, 32)
    feats = [torch.randn(4, 3, 128 // s, 192 // s) for s in strides]
    sizes = torch.tensor([[6.0, 6.0], [30.0, 20.0], [60.0, 70.0], [150.0, 120.0]])
    boxes = [torch.cat([xy := torch.rand(len(wh), 2) * torch.tensor([40.0, 8.0]), xy + wh], 1)
             for wh in (sizes, sizes[[0, 0, 0]], torch.zeros((0, 2)), sizes[[3, 1]])]
    out = roi_features(feats, strides, boxes, pool=3)
    alone = [roi_features([f[i:i + 1] for f in feats], strides, [box[None]], pool=3) for i, b in enumerate(boxes)
             for box in b]
    assert torch.equal(out, torch.cat(alone))


def test_labels_go_only_to_the_classes_the_head_labels():
    model = tiny()
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    results = model.detect(images, [["vehicles"], ["people"]], score_threshold=0.0)
    det = results[0]["vehicles"]
    ids, probs, labels = det.attributes["kind"]
    cars = det.class_ids == 0
    assert cars.any() and (~cars).any()
    assert (ids[cars] >= 0).all() and (ids[~cars] == -1).all() and labels == list(CAR_KINDS)
    assert ((probs[cars] > 0) & (probs[cars] <= 1)).all()
    arrays = det.numpy()
    assert set(arrays["attr:kind"][cars.numpy()]) <= set(CAR_KINDS) and set(arrays["attr:kind"][~cars.numpy()]) == {""}
    assert "kind" not in results[1]["people"].attributes  # rides on vehicles only


def test_labels_of_a_batch_where_some_images_lack_the_head_equal_each_image_labelled_alone():
    # the head reads the whole batch's maps in place and skips images without its detection head
    model = tiny()
    images = torch.randint(0, 255, (4, 3, 64, 96), dtype=torch.uint8)
    heads = [["people"], ["vehicles"], ["people"], ["vehicles", "people"]]
    batch = model.detect(images, heads, score_threshold=0.0)
    for i, h in enumerate(heads):
        alone = model.detect(images[i:i + 1], [h], score_threshold=0.0)[0]
        assert batch[i].keys() == alone.keys()
        for head, det in alone.items():
            assert det.attributes.keys() == batch[i][head].attributes.keys() == ({"kind"} if head == "vehicles" else set())
            for (ids, probs, _), (ids_b, probs_b, _) in zip(det.attributes.values(), batch[i][head].attributes.values()):
                assert len(ids) > 0 and torch.equal(ids, ids_b)
                torch.testing.assert_close(probs_b, probs)


@pytest.mark.parametrize("attributes, message", [
    ({"kind": {**KIND, "on": "trucks"}}, "'on' names head 'trucks'"),
    ({"kind": {**KIND, "of": ["bus"]}}, r"'of' \['bus'\] must be classes of head 'vehicles'"),
    ({"kind": {**KIND, "labels": ["van"]}}, "at least two unique names"),
    ({"bad name": KIND}, "identifier"),
])
def test_bad_attribute_configs_name_the_field(attributes, message):
    with pytest.raises(ConfigError, match=message):
        tiny(attributes)


def test_the_label_reaches_the_message_through_the_tracker_and_fits_the_schema():
    model = tiny()
    frame = np.random.default_rng(0).integers(0, 255, (128, 192, 3), dtype=np.uint8)
    image, lb = letterbox(frame, (64, 96))
    det = model.detect(torch.from_numpy(image[None]), [["vehicles"]], score_threshold=0.0)[0]["vehicles"]
    detections = to_detections(det.numpy(), lb, ["car", "bicycle"])
    tracker = CameraTracker(["vehicles"], TrackerConfig(), 10.0)
    tracked, _ = tracker.update("vehicles", detections, 0, 0.0)  # a subset of rows, in another order
    records = detection_records("vehicles", tracked, tracked.tracker_id)
    assert records
    message = detection_message("c", 0, 0.0, 0.0, 1.0, (192, 128), records, ["vehicles"])
    validator = jsonschema.Draft202012Validator(SCHEMA)
    validator.validate(message)
    assert {r["class"] for r in message["detections"]} == {"car", "bicycle"}
    for r in message["detections"]:
        assert ("attributes" in r) == (r["class"] == "car")
        if r["class"] == "car":
            assert r["attributes"]["kind"]["label"] in CAR_KINDS
    bad = {**message["detections"][0], "attributes": {"kind": {"label": "", "conf": 0.5}}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**message, "detections": [bad]})


def test_training_an_attribute_leaves_the_model_bit_identical_and_eval_scores_it(tmp_path):
    base = tiny(attributes={})
    init = save_checkpoint(base, tmp_path / "base.safetensors", {"history": [{"heads": ["people", "vehicles"]}]})
    out = train_attribute(AttributeTrainConfig(init=init, out=tmp_path / "kind.safetensors", name="kind", steps=3,
                                               batch_size=2, **KIND), progress=False)
    after, training = load_checkpoint(out)
    for k, v in base.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), f"{k} changed"
    assert list(after.attributes) == ["kind"] and training["history"][-1]["attribute"] == "kind"
    report = evaluate(after, EvalConfig(scenes=1, frames_per_scene=3, frame_stride=20))
    kind = report["attributes"]["kind"]
    assert kind["objects"] > 0 and set(kind["confusion_truth_x_predicted"]) == set(CAR_KINDS)


def test_synthetic_cars_carry_their_kind():
    scene = StreetScene(3)
    kinds = set()
    for _ in range(200):
        _, truth = scene.step()
        cars = truth.class_ids == 1
        assert set(truth.kinds[cars]) <= set(CAR_KINDS) and set(truth.kinds[~cars]) <= {""}
        kinds |= set(truth.kinds[cars])
    assert kinds == set(CAR_KINDS)


def test_a_tracked_objects_label_is_its_tracks_vote_not_the_last_frames_guess():
    import supervision as sv

    tracker = CameraTracker(["vehicles"], TrackerConfig(minimum_consecutive_frames=1), 10.0)
    seen = []
    for frame, (label, conf) in enumerate([("van", 0.9), ("van", 0.8), ("hatch", 0.6), ("van", 0.7), ("hatch", 0.7)]):
        det = sv.Detections(xyxy=np.array([[10.0 + frame, 10, 60 + frame, 40]]), confidence=np.array([0.9]),
                            class_id=np.array([0]), data={"class_name": np.array(["car"]), "attr:kind": np.array([label]),
                                                          "attr:kind:conf": np.array([conf], np.float32)})
        tracked, _ = tracker.update("vehicles", det, frame, frame / 10)
        seen.append((int(tracked.tracker_id[0]), str(tracked.data["attr:kind"][0]),
                     round(float(tracked.data["attr:kind:conf"][0]), 3)))
    # ByteTrack confirms a new track on its second frame; from then on the track votes
    assert seen[0] == (-1, "van", 0.9) and all(s[0] == seen[1][0] >= 0 for s in seen[1:])
    # van keeps the vote against the hatch frames: 0.8 against 0.6, then 1.5 against 1.3
    assert seen[2][1:] == ("van", round(0.8 / 1.4, 3))
    assert [s[1] for s in seen] == ["van"] * 5 and seen[4][1:] == ("van", round(1.5 / 2.8, 3))


def test_a_snapshot_draws_heads_with_and_without_attributes_and_shows_the_label():
    import supervision as sv

    from workers.snapshots import labelled

    people = sv.Detections(xyxy=np.array([[5.0, 5, 20, 40]]), confidence=np.array([0.9]), class_id=np.array([0]),
                           tracker_id=np.array([3]), data={"class_name": np.array(["person"])})
    cars = sv.Detections(xyxy=np.array([[30.0, 10, 90, 40], [0, 0, 10, 10]]), confidence=np.array([0.8, 0.7]),
                         class_id=np.array([0, 1]), tracker_id=np.array([7, -1]),
                         data={"class_name": np.array(["car", "bicycle"]), "attr:kind": np.array(["van", ""]),
                               "attr:kind:conf": np.array([0.9, 0.0], np.float32)})
    merged = sv.Detections.merge([labelled(people, 0.5), labelled(cars, 0.5)])  # merge() of the originals refuses
    assert list(merged.data["label"]) == ["#3 person", "#7 car van", "bicycle"]
    np.testing.assert_allclose(merged.xyxy[1], [15, 5, 45, 20])
