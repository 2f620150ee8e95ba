"""Edges of the model family (seventh round): a head's max_detections without bound, an adapter file reached
through a symlink."""

import pytest
import torch

from models.checkpoint import checkpoint_files, load_checkpoint, save_checkpoint
from models.heads import HeadConfig
from models.hydranet import ConfigError, HydraNet, HydraNetConfig


def small_model(**config) -> HydraNet:
    torch.manual_seed(0)
    config = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
              "neck": {"type": "fpn", "channels": 16}, "heads": {"people": {"classes": ["person"]}}, **config}
    return HydraNet(HydraNetConfig(**config)).eval()


def test_a_max_detections_that_nms_cannot_hold_is_refused_by_name():
    """Up to max(300, max_detections) candidates go through NMS, whose (K, K) maps grow with its square: "no limit"
    (10**6) passed, and the first busy frame (or an evaluation's low threshold) ran the replica out of memory."""
    with pytest.raises(ConfigError, match=r"head 'people'.*max_detections must be at most 1000, got 1000000"):
        HydraNetConfig(heads={"people": {"classes": ["person"], "max_detections": 10 ** 6}})
    model = small_model()
    with pytest.raises(ConfigError, match="max_detections must be at most 1000, got 5000"):
        model.add_head("crowd", ["person"], max_detections=5000)
    assert model.head_names == ["people"]
    assert HeadConfig(["person"], max_detections=1000).max_detections == 1000  # a crowd's worth still is


def test_an_adapter_file_reached_through_a_symlink_finds_its_base(tmp_path):
    """The base's path is stored relative to the adapter file's real folder; read beside the symlink (a deployment's
    ``current.safetensors`` pointing at the run that made it) it named a base that was never there."""
    runs, deploy = tmp_path / "runs", tmp_path / "deploy"
    deploy.mkdir()
    model = small_model()
    base = save_checkpoint(model, runs / "base.safetensors")
    model.add_head("bikes", ["bicycle"])
    model.add_adapter("bikes_lora", ["bikes"], rank=2)
    with torch.no_grad():
        for b in model.adapters["bikes_lora"].b.values():
            b.normal_()  # not the identity: the adapter's heads read features of their own
    adapter = save_checkpoint(model, runs / "ft.safetensors", base=base)
    current = deploy / "current.safetensors"
    current.symlink_to(adapter)

    assert [p.resolve() for p in checkpoint_files(current)] == [adapter.resolve(), base.resolve()]
    served, _ = load_checkpoint(current)
    direct, _ = load_checkpoint(adapter)
    x = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    got, want = served.detect(x, score_threshold=0.0), direct.detect(x, score_threshold=0.0)
    for g, w in zip(got, want):
        for head in ("people", "bikes"):
            assert torch.equal(g[head].boxes, w[head].boxes) and torch.equal(g[head].scores, w[head].scores)
