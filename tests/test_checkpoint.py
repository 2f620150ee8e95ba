"""Checkpoints: round trip, and every kind of bad file ends in an error naming the file and the problem."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import (
    CheckpointError,
    import_backbone_weights,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from models.hydranet import HydraNet, HydraNetConfig
from models.resnet import ResNet, ResNetConfig


def tiny_config(**heads) -> HydraNetConfig:
    return HydraNetConfig(
        input_size=(64, 96),
        backbone={"type": "resnet", "depth": 10, "width": 8},
        neck={"type": "fpn", "channels": 16},
        heads=heads or {"people": {"classes": ["person"]}},
    )


def test_roundtrip_keeps_weights_config_and_metadata(tmp_path):
    torch.manual_seed(1)
    model = HydraNet(tiny_config(people={"classes": ["person"]}, vehicles={"classes": ["car", "bicycle"]}))
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"steps": 7})
    loaded, training = load_checkpoint(path)
    assert training == {"steps": 7}
    assert loaded.head_names == ["people", "vehicles"]
    assert loaded.head_classes("vehicles") == ["car", "bicycle"]
    assert loaded.config.input_size == (64, 96)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert read_metadata(path)["config"]["backbone"]["width"] == 8


def test_checkpoints_saved_before_the_tower_choice_load_as_fcos_convs(tmp_path):
    """Heads saved without a "tower" field were FCOS's full-conv towers: they must load as such."""
    model = HydraNet(tiny_config(people={"classes": ["person"], "tower": "conv"}))
    config = model.config.to_dict()
    del config["heads"]["people"]["tower"]
    path = write_safetensors(tmp_path / "old.safetensors", good_meta(config), model)
    loaded, _ = load_checkpoint(path)
    assert loaded.heads["people"].config.tower == "conv"
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def write_safetensors(path, metadata, model=None):
    model = model or HydraNet(tiny_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def good_meta(config=None):
    return {"format": "hydravision-checkpoint", "format_version": "1",
            "config": json.dumps(config if isinstance(config, dict) else (config or tiny_config()).to_dict()),
            "training": "{}"}


def make_bad(kind, tmp_path):
    p = tmp_path / f"{kind}.safetensors"
    if kind == "missing":
        return tmp_path / "nope.safetensors"
    if kind == "text":
        p.write_text("hello, I am not a checkpoint\n")
    elif kind == "truncated":
        good = save_checkpoint(HydraNet(tiny_config()), tmp_path / "good.safetensors")
        p.write_bytes(good.read_bytes()[:200])
    elif kind == "pickle":
        p.write_bytes(pickle.dumps({"conv1.weight": [1, 2, 3]}))
    elif kind == "foreign_safetensors":
        save_file({"w": torch.zeros(2)}, str(p))
    elif kind == "future_version":
        write_safetensors(p, {**good_meta(), "format_version": "99"})
    elif kind == "unknown_backbone":
        meta = good_meta()
        cfg = json.loads(meta["config"])
        cfg["backbone"] = {"type": "vit_h14"}
        write_safetensors(p, {**meta, "config": json.dumps(cfg)})
    elif kind == "wrong_shapes":
        other = HydraNet(tiny_config(people={"classes": ["person", "dog"]}))  # 2 classes, config says 1
        write_safetensors(p, good_meta(), model=other)
    elif kind == "damaged_config":
        write_safetensors(p, {**good_meta(), "config": "{not json"})
    elif kind == "heads_not_a_mapping":  # valid JSON of the wrong shape: an AttributeError and "a bug" before
        meta = good_meta()
        write_safetensors(p, {**meta, "config": json.dumps({**json.loads(meta["config"]), "heads": 3})})
    elif kind == "config_not_a_mapping":
        write_safetensors(p, {**good_meta(), "config": "[1, 2]"})
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such checkpoint file"),
        ("text", "not a safetensors file"),
        ("truncated", "not a safetensors file"),
        ("pickle", "not a safetensors file"),
        ("foreign_safetensors", "not a hydravision checkpoint"),
        ("future_version", "format version 99 is not supported"),
        ("unknown_backbone", "unknown backbone type 'vit_h14'"),
        ("wrong_shapes", r"heads\.people\.cls_logits\.weight: expected \(1, 16, 1, 1\), got \(2, 16, 1, 1\)"),
        ("damaged_config", "metadata is damaged"),
        ("heads_not_a_mapping", "metadata is damaged"),
        ("config_not_a_mapping", "metadata is damaged"),
    ],
)
def test_bad_checkpoints_name_file_and_problem(kind, message, tmp_path):
    path = make_bad(kind, tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_import_torchvision_style_resnet_weights(tmp_path):
    torch.manual_seed(3)
    source = ResNet(ResNetConfig(depth=10, width=8, num_classes=1000))
    path = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), path)
    model = HydraNet(tiny_config())
    loaded = import_backbone_weights(model, path)
    assert "conv1.weight" in loaded and not any(k.startswith("fc.") for k in loaded)
    assert torch.equal(model.backbone.layer4[0].conv2.weight, source.layer4[0].conv2.weight)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"conv1.weight": Evil()}, "refused: .*pickled objects other than tensors .*print"),  # a pickle that runs code is refused
        ([torch.zeros(1)], "expected a state dict of tensors"),
        ({"conv1.weight": torch.zeros(1)}, "does not fit this backbone"),
    ],
)
def test_import_rejects_unsafe_or_foreign_weights(payload, message, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        import_backbone_weights(HydraNet(tiny_config()), path)


def test_score_thresholds_are_rewritten_with_the_weights_unchanged(tiny_checkpoint, tmp_path):
    from pipeline.model_commands import set_score_thresholds

    path = tmp_path / "t.safetensors"
    path.write_bytes(tiny_checkpoint.read_bytes())
    before, _ = load_checkpoint(path)
    set_score_thresholds(path, {"vehicles": 0.4})
    after, training = load_checkpoint(path)
    assert after.heads["vehicles"].config.score_threshold == 0.4
    assert after.heads["people"].config.score_threshold == 0.05  # the other head keeps its own
    assert training["history"][-1] == {"score_thresholds": {"vehicles": 0.4}}
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())
