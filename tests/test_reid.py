"""The re-ID head: a unit vector per box of its heads (the right box's), configs that name their errors, a loss
that ranks views of one object together, training that lowers it, and a checkpoint that round-trips."""

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.reid import contrastive_loss
from models.train_reid import ReIDTrainConfig, train_reid

REID = {"heads": ["people", "vehicles"], "dim": 8, "channels": 8, "hidden": 16, "colour": 2}


def tiny(reid=None) -> HydraNet:
    torch.manual_seed(0)
    return HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                   neck={"type": "fpn", "channels": 16},
                                   heads={"people": {"classes": ["person"]}, "vehicles": {"classes": ["car", "bicycle"]}},
                                   reid=REID if reid is None else reid)).eval()


def test_colour_reads_the_box_in_the_image_itself():
    model = tiny()
    images = torch.zeros(1, 3, 64, 96)
    images[0, 0, :, 48:] = 1.0  # the right half is red
    feats = [torch.zeros(1, 16, 64 // s, 96 // s) for s in model.strides]
    left, right = torch.tensor([[4.0, 4, 40, 60]]), torch.tensor([[52.0, 4, 90, 60]])
    a, b = (model.reid(feats, [box], images) for box in (left, right))
    assert not torch.allclose(a, b)  # same (empty) features, other colours: other vectors
    torch.testing.assert_close(model.reid(feats, [left + 2], images), a)  # same colours: same vector
    with pytest.raises(ValueError, match="reads colours"):
        model.reid(feats, [left])


def test_every_box_of_its_heads_gets_a_unit_vector_computed_from_its_own_box():
    model = tiny()
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    results = model.detect(images, [["people", "vehicles"], ["vehicles"]], score_threshold=0.0)
    x = model.normalize(images)
    feats = model.features(x)
    for i, r in enumerate(results):
        for head, det in r.items():
            assert len(det) > 0 and det.embeddings.shape == (len(det), 8)
            torch.testing.assert_close(det.embeddings.norm(dim=1), torch.ones(len(det)))
            # the rows belong to this image's boxes of this head (one call embeds every head and image)
            alone = model.reid([f[i:i + 1] for f in feats], [det.boxes], x[i:i + 1])
            torch.testing.assert_close(det.embeddings, alone, atol=1e-5, rtol=1e-4)
            arrays = det.numpy()
            assert arrays["embedding"].dtype == np.float16 and arrays["embedding"].shape == (len(det), 8)
    assert tiny(reid={}).detect(images, score_threshold=0.0)[0]["people"].embeddings is None
    assert "embedding" not in tiny(reid={}).detect(images, score_threshold=0.0)[0]["people"].numpy()


@pytest.mark.parametrize("reid, message", [
    ({**REID, "heads": ["trucks"]}, "reid: head 'trucks' is not one of"),
    ({**REID, "heads": []}, "must name at least one detection head"),
    ({**REID, "dim": 0}, "must be positive"),
    ({**REID, "colour": -1}, "colour >= 0"),
    ({**REID, "size": 3}, "unexpected keyword"),
])
def test_bad_reid_configs_name_the_field(reid, message):
    with pytest.raises(ConfigError, match=message):
        tiny(reid)


def test_a_model_without_reid_writes_no_reid_field_and_takes_one_head_only():
    model = tiny(reid={})
    assert "reid" not in model.config.to_dict()  # older builds read the file
    model.add_reid(["people"], dim=4)
    assert model.config.to_dict()["reid"]["heads"] == ["people"]
    with pytest.raises(ConfigError, match="has a re-ID head already"):
        model.add_reid(["vehicles"])


@pytest.mark.parametrize("arrangement, low", [
    ("views of one object together", True),
    ("views of two objects swapped", False),
])
def test_the_loss_is_low_when_an_objects_views_are_closest(arrangement, low):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # two objects, two views each (ids 7, 7, 9, 9)
    emb = torch.stack([a, a, b, b]) if low else torch.stack([a, b, b, a])
    loss = contrastive_loss(emb, torch.tensor([7, 7, 9, 9]))
    assert (loss < 0.01) if low else (loss > 5)
    assert contrastive_loss(emb, torch.tensor([1, 2, 3, 4])) == 0  # nobody has a second view: nothing to learn


def test_training_lowers_the_loss_and_the_checkpoint_round_trips(tmp_path):
    base = tiny(reid={})
    init = save_checkpoint(base, tmp_path / "base.safetensors", {"history": [{"heads": ["people", "vehicles"]}]})
    out, losses = train_reid(ReIDTrainConfig(init=init, out=tmp_path / "reid.safetensors", heads=["people", "vehicles"],
                                             steps=40, scenes_per_step=1, views=3, dim=8, lr=5e-3), progress=False)
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses
    after, training = load_checkpoint(out)
    for k, v in base.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), f"{k} changed"
    assert after.config.reid["heads"] == ["people", "vehicles"] and training["history"][-1]["reid"] == ["people", "vehicles"]
    # saved and loaded: the same weights, the same vectors
    again = save_checkpoint(after, tmp_path / "again.safetensors", training)
    reloaded, _ = load_checkpoint(again)
    images = torch.randint(0, 255, (1, 3, 64, 96), dtype=torch.uint8)
    first = after.detect(images, score_threshold=0.0)[0]["people"].embeddings
    torch.testing.assert_close(reloaded.detect(images, score_threshold=0.0)[0]["people"].embeddings, first)


def test_colours_read_from_the_pixels_under_the_boxes_equal_those_of_the_normalised_batch():
    """The exported runtimes hand the re-ID head uint8 images, and it normalises only the crop under each image's
    boxes; the samples must be the whole normalised batch's, at the image's edges (zero padding) included."""
    from models.reid import box_colours

    rng = np.random.default_rng(5)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 40, 64), dtype=np.uint8))
    mean, std = torch.tensor([0.4, 0.45, 0.5]).view(1, 3, 1, 1) * 255, torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1) * 255

    def normalize(x):
        return (x.float() - mean) / std

    inside = torch.tensor([[10.3, 5.2, 30.7, 20.1], [40.0, 12.5, 41.0, 30.0]])
    edges = torch.tensor([[0.0, 0.0, 64.0, 40.0], [0.0, 3.0, 0.4, 9.0], [63.6, 39.2, 64.0, 40.0]])
    point = torch.tensor([[22.0, 7.0, 22.0, 7.0]])  # alone in its image: its crop is the tightest
    boxes = [inside, point, edges, torch.zeros((0, 4))]
    whole = box_colours(normalize(images), boxes, 4)
    cropped = box_colours(images, boxes, 4, normalize)
    assert whole.shape == cropped.shape == (6, 48)
    torch.testing.assert_close(cropped, whole, atol=1e-4, rtol=1e-5)
    assert box_colours(images, [torch.zeros((0, 4))] * 4, 4, normalize).shape == (0, 48)
