"""Edges of the model family: names a checkpoint cannot hold, neck widths, odd patch grids, frames that are not
a batch, adapter settings that cannot train, classes given as one string, an empty batch."""

import math
import re

import pytest
import torch

from models.hydranet import ConfigError, HydraNet, HydraNetConfig

SMALL_RESNET = {"type": "resnet", "depth": 10, "width": 8}
SMALL_VIT = {"type": "vit", "width": 32, "depth": 2, "heads": 2}


def small_model(**config) -> HydraNet:
    torch.manual_seed(0)
    config = {"input_size": (64, 96), "backbone": SMALL_RESNET, "neck": {"type": "fpn", "channels": 16},
              "heads": {"people": {"classes": ["person"]}}, **config}
    return HydraNet(HydraNetConfig(**config)).eval()


@pytest.mark.parametrize("name", ["my-vehicles", "two words", "3d"])
def test_a_head_added_under_a_name_no_checkpoint_can_hold_is_refused(name):
    """HydraNetConfig refuses these names on load: a head trained under one could never be loaded again."""
    model = small_model()
    with pytest.raises(ConfigError, match="identifier-like.*" + name):
        model.add_head(name, ["car"])
    assert model.head_names == ["people"] and list(model.config.heads) == ["people"]
    model.add_head("vehicles", ["car"])  # a name the config accepts still is
    HydraNet(HydraNetConfig.from_dict(model.config.to_dict()))


@pytest.mark.parametrize("channels", [36, 60, 100])
def test_heads_fit_a_neck_whose_width_eight_groups_do_not_divide(channels):
    """The tower's default GroupNorm groups must divide the neck's channels; nobody asked for norm_groups."""
    model = small_model(neck={"type": "fpn", "channels": channels})
    norms = [m for m in model.heads["people"].modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(channels % m.num_groups == 0 for m in norms)
    out = model(torch.zeros(1, 3, 64, 96), ["people"])["people"]
    assert out["cls_logits"].shape[-1] == 1


def test_default_tower_groups_are_unchanged_where_they_already_divided():
    for channels, groups in [(64, 8), (16, 4), (20, 5), (256, 8)]:
        model = small_model(neck={"type": "fpn", "channels": channels})
        assert {m.num_groups for m in model.heads["people"].modules() if isinstance(m, torch.nn.GroupNorm)} == {groups}


@pytest.mark.parametrize("neck", ["fpn", "pan"])
def test_vit_on_an_odd_patch_grid_keeps_a_coarse_cell_for_the_edge(neck):
    """80 px is 5 patches: the stride-32 map has 3 cells as ResNet's has (a 2-cell one left the edge uncovered, and
    PAN's bottom-up sum of 3 and 2 cells failed)."""
    model = small_model(backbone=SMALL_VIT, neck={"type": neck, "channels": 16})
    images = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8)
    with torch.inference_mode():
        sizes = [tuple(f.shape[-2:]) for f in model.features(model.normalize(images))]
    assert sizes == [(10, 10), (5, 5), (3, 3)]
    assert len(model.detect(images, score_threshold=0.0)) == 2


def test_vit_pyramid_is_unchanged_on_even_grids():
    model = small_model(backbone=SMALL_VIT)
    with torch.inference_mode():
        m = torch.randn(1, 32, 4, 6)
        assert torch.equal(model.backbone.pyramid(m)[2], torch.nn.functional.max_pool2d(m, 2, 2))


@pytest.mark.parametrize("shape", [(3, 64, 96), (1, 64, 96, 3), (1, 1, 64, 96), (2, 4, 64, 96)])
def test_detect_refuses_what_is_not_a_batch_of_rgb_frames_by_its_shape(shape):
    """A CHW frame became three 'images' (two of them empty results); an HWC one failed without saying why."""
    model = small_model()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*" + re.escape(str(shape))):
        model.detect(torch.zeros(shape, dtype=torch.uint8))


@pytest.mark.parametrize("alpha", [0.0, math.nan, math.inf])
def test_an_adapter_alpha_that_cannot_train_or_wipes_its_heads_is_refused_by_name(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        HydraNetConfig(heads={"people": {"classes": ["person"]}},
                       adapters={"lo": {"heads": ["people"], "alpha": alpha}})
    model = small_model()
    with pytest.raises(ConfigError, match="alpha"):
        model.add_adapter("lo", ["people"], alpha=alpha)
    assert not model.adapters and not model.config.adapters
    model.add_adapter("lo", ["people"], alpha=-2.0)  # a sign is only a sign: still the identity at the start


def test_head_classes_given_as_one_string_are_refused_not_split_into_letters():
    model = small_model()
    with pytest.raises(ConfigError, match="list of class names.*'car'"):
        model.add_head("vehicles", "car")
    with pytest.raises(ConfigError, match="list of class names.*'person'"):
        HydraNetConfig(heads={"people": {"classes": "person"}})
    assert model.head_names == ["people"]


def test_heads_run_on_an_empty_batch():
    model = small_model(heads={"people": {"classes": ["person"]}, "split": {"classes": ["car"], "tower": "split"}})
    with torch.inference_mode():
        out = model(torch.zeros(0, 3, 64, 96))
    points = sum((64 // s) * (96 // s) for s in model.strides)
    for raw in out.values():
        assert raw["centerness"].shape == (0, points) and raw["box_ltrb"].shape == (0, points, 4)


@pytest.mark.parametrize("channels", [36, 60, 100])
def test_attribute_and_reid_heads_fit_widths_eight_groups_do_not_divide(channels):
    """The same default as the towers': 8 GroupNorm groups failed on 100 channels, nobody having asked for 8."""
    from models.attributes import AttributeConfig, AttributeHead
    from models.reid import EmbeddingHead, ReIDConfig

    attr = AttributeHead(channels, (8, 16), AttributeConfig(labels=["a", "b"], on="people", of=["person"]))
    reid = EmbeddingHead(channels, (8, 16), ReIDConfig(heads=["people"], channels=channels))
    for head in (attr, reid):
        norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(channels % m.num_groups == 0 and m.num_groups > 1 for m in norms)


@pytest.mark.parametrize("field, value", [("std", (0.2, 0.0, 0.2)), ("std", (0.2, float("nan"), 0.2)),
                                          ("mean", (0.5, 0.5)), ("std", "abc"), ("mean", (0.4, float("inf"), 0.4))])
def test_a_normalisation_that_wipes_every_score_or_cannot_build_is_refused_by_name(field, value):
    """A 0 or NaN std made every feature NaN (the NaN guard then dropped every box, no error); a wrong length
    failed in a bare reshape while the model was built."""
    with pytest.raises(ConfigError, match=rf"^{field} must be 3 finite numbers"):
        small_model(**{field: value})


def test_an_empty_list_of_head_lists_is_refused_not_read_as_every_head():
    model = small_model()
    with pytest.raises(ValueError, match="expected 2 head lists"):
        model.detect(torch.zeros(2, 3, 64, 96, dtype=torch.uint8), heads_per_image=[])
    assert small_model(mean=[0, 0, 0], std=[1, 1, 1]).config.std == (1.0, 1.0, 1.0)  # ints and lists still do
