"""HydraNet: torchvision ResNet layout, shared backbone, per-image head routing."""

import pytest
import torch
from torch import nn

from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.resnet import ResNet, ResNetConfig

# Published torchvision figures: parameter counts of the ImageNet classifiers, and sample keys/shapes.
TORCHVISION_PARAMS = [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)]
TORCHVISION_KEYS = [
    (18, "conv1.weight", (64, 3, 7, 7)),
    (18, "layer1.0.conv1.weight", (64, 64, 3, 3)),
    (18, "layer2.0.downsample.0.weight", (128, 64, 1, 1)),
    (18, "layer2.0.downsample.1.running_var", (128,)),
    (18, "layer4.1.bn2.num_batches_tracked", ()),
    (18, "fc.weight", (1000, 512)),
    (34, "layer3.5.conv2.weight", (256, 256, 3, 3)),
    (50, "layer1.0.conv3.weight", (256, 64, 1, 1)),
    (50, "layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    (50, "layer2.0.conv2.weight", (128, 128, 3, 3)),  # v1.5: stride on the 3x3 conv
    (50, "layer4.2.bn3.bias", (2048,)),
    (50, "fc.weight", (1000, 2048)),
]
TORCHVISION_KEY_COUNTS = [(18, 122), (34, 218), (50, 320)]  # len(state_dict()) incl. BN buffers


@pytest.mark.parametrize("depth, params", TORCHVISION_PARAMS)
def test_resnet_parameter_count_matches_torchvision(depth, params):
    model = ResNet(ResNetConfig(depth=depth, num_classes=1000))
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("depth, key, shape", TORCHVISION_KEYS)
def test_resnet_keys_and_shapes_match_torchvision(depth, key, shape):
    sd = ResNet(ResNetConfig(depth=depth, num_classes=1000)).state_dict()
    assert key in sd
    assert tuple(sd[key].shape) == shape


@pytest.mark.parametrize("depth, count", TORCHVISION_KEY_COUNTS)
def test_resnet_state_dict_size_matches_torchvision(depth, count):
    assert len(ResNet(ResNetConfig(depth=depth, num_classes=1000)).state_dict()) == count


def test_resnet50_bottleneck_stride_is_on_the_3x3_conv():
    model = ResNet(ResNetConfig(depth=50))
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].conv1.stride == (1, 1)


@pytest.mark.parametrize(
    "width, depth, expected",
    [(16, 18, [32, 64, 128]), (24, 10, [48, 96, 192]), (64, 50, [512, 1024, 2048])],
)
def test_feature_maps_have_declared_channels_and_strides(width, depth, expected):
    model = ResNet(ResNetConfig(depth=depth, width=width)).eval()
    feats = model(torch.zeros(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == expected == model.out_channels
    assert [(64 // f.shape[2], 96 // f.shape[3]) for f in feats] == [(s, s) for s in model.strides]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"backbone": {"type": "vit_h14"}}, "unknown backbone type 'vit_h14'"),
        ({"backbone": {"type": "resnet", "depth": 19}}, "depth must be one of"),
        ({"backbone": {"type": "resnet", "colour": 1}}, "colour"),
        ({"neck": {"type": "bifpn"}}, "unknown neck type 'bifpn'"),
        ({"input_size": (100, 320)}, "multiple of 32"),
        ({"heads": {"people": {"classes": []}}}, "non-empty"),
        ({"heads": {"bad name": {"classes": ["a"]}}}, "identifier"),
        ({"heads": {"people": {"classes": ["a"], "tower": "bifpn"}}}, "tower must be one of"),
        ({"heads": {"people": {"classes": ["a"], "max_detections": 0}}}, "max_detections must be >= 1, got 0"),
    ],
)
def test_bad_model_config_names_the_problem(bad, message):
    with pytest.raises(ConfigError, match=message):
        HydraNetConfig(**bad)


def tiny_model(**heads) -> HydraNet:
    heads = heads or {"people": {"classes": ["person"]}, "vehicles": {"classes": ["car", "bicycle"]}}
    cfg = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16}, heads=heads)
    torch.manual_seed(0)
    return HydraNet(cfg).eval()


def test_forward_runs_only_requested_heads():
    model = tiny_model()
    out = model(torch.zeros(2, 3, 64, 96), heads=["vehicles"])
    assert list(out) == ["vehicles"]
    p = (8 * 12) + (4 * 6) + (2 * 3)
    assert out["vehicles"]["cls_logits"].shape == (2, p, 2)
    assert out["vehicles"]["box_ltrb"].shape == (2, p, 4)
    assert out["vehicles"]["centerness"].shape == (2, p)


def test_detect_routes_heads_per_image_and_runs_backbone_once(monkeypatch):
    model = tiny_model()
    calls = []
    real = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda x: calls.append(x.shape[0]) or real(x))
    images = torch.randint(0, 255, (3, 3, 64, 96), dtype=torch.uint8)
    results = model.detect(images, [["people"], ["vehicles"], None], score_threshold=0.0)
    assert calls == [3]
    assert [sorted(r) for r in results] == [["people"], ["vehicles"], ["people", "vehicles"]]


def test_detect_subset_matches_full_batch():
    """A head run on a subset of the batch gives the same detections as on the whole batch."""
    model = tiny_model()
    images = torch.randint(0, 255, (3, 3, 64, 96), dtype=torch.uint8)
    full = model.detect(images, None, score_threshold=0.0)
    part = model.detect(images, [["people"], ["vehicles"], ["people"]], score_threshold=0.0)
    for i in (0, 2):
        torch.testing.assert_close(part[i]["people"].boxes, full[i]["people"].boxes)
        torch.testing.assert_close(part[i]["people"].scores, full[i]["people"].scores)


def test_unknown_head_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(KeyError, match="unknown heads \\['faces'\\]"):
        model.detect(torch.zeros(1, 3, 64, 96, dtype=torch.uint8), [["faces"]])


def test_add_head_keeps_existing_outputs():
    model = tiny_model(people={"classes": ["person"]})
    x = torch.randn(1, 3, 64, 96)
    before = model(x)["people"]
    model.add_head("forklifts", ["forklift"])
    after = model(x)
    assert set(after) == {"people", "forklifts"}
    for k in before:
        assert torch.equal(before[k], after["people"][k])
    with pytest.raises(ConfigError, match="already exists"):
        model.add_head("people", ["person"])


@pytest.mark.parametrize("tower, kernel, convs", [("separable", 1, 4), ("conv", 3, 2)])
def test_head_towers_give_the_same_outputs_with_their_own_layers(tower, kernel, convs):
    model = tiny_model(people={"classes": ["person"], "tower": tower})
    head = model.heads["people"]
    assert sum(isinstance(m, nn.Conv2d) for m in head.tower) == convs
    assert head.cls_logits.kernel_size == (kernel, kernel)
    out = model(torch.zeros(1, 3, 64, 96))["people"]
    assert out["cls_logits"].shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 1)


def test_new_heads_default_to_the_separable_tower():
    assert tiny_model().heads["vehicles"].config.tower == "separable"
    assert tiny_model().add_head("extra", ["car"]).config.tower == "separable"
