"""Backbones behind one interface: declared channels and strides, stages that split the pass exactly, config."""

import pytest
import torch

from models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from models.hydranet import BACKBONES, ConfigError, HydraNet, HydraNetConfig
from models.vit import ViT, ViTConfig

DEMO = "models/checkpoints/demo.safetensors"
# Tiny versions of every backbone kind, for CPU tests.
TINY_BACKBONES = {
    "resnet": {"type": "resnet", "depth": 10, "width": 8},
    "vit": {"type": "vit", "width": 32, "depth": 2, "heads": 2},
    "mobilenet": {"type": "mobilenet", "arch": "small", "width": 0.5},
}


def build(spec: dict):
    spec = dict(spec)
    cfg_cls, cls = BACKBONES[spec.pop("type")]
    torch.manual_seed(0)
    return cls(cfg_cls(**spec)).eval()


@pytest.mark.parametrize("spec, channels", [
    (TINY_BACKBONES["resnet"], [16, 32, 64]),
    (TINY_BACKBONES["vit"], [16, 32, 32]),
    (TINY_BACKBONES["mobilenet"], [16, 24, 288]),
    ({"type": "mobilenet", "arch": "large", "width": 1.0}, [40, 112, 960]),
])
@pytest.mark.parametrize("size", [(64, 96), (256, 448)])
def test_maps_have_the_declared_channels_and_strides(spec, channels, size):
    backbone = build(spec)
    with torch.inference_mode():
        maps = backbone(torch.randn(1, 3, *size))
    assert backbone.out_channels == channels == [m.shape[1] for m in maps]
    assert backbone.strides == (8, 16, 32)
    assert [tuple(m.shape[-2:]) for m in maps] == [(size[0] // s, size[1] // s) for s in backbone.strides]


@pytest.mark.parametrize("kind", sorted(TINY_BACKBONES))
def test_splitting_the_pass_at_any_stage_is_bit_identical(kind):
    """What the LoRA fork relies on: the stages before the split are shared, the rest run again."""
    backbone = build(TINY_BACKBONES[kind])
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        whole = backbone(x)
        for k in range(backbone.num_stages + 1):
            split = backbone.finish(backbone.begin(x, k), k)
            assert all(torch.equal(a, b) for a, b in zip(whole, split)), f"split at stage {k}"
        one = backbone.finish(backbone.begin(x, 2).select(torch.tensor([1])), 2)
        torch.testing.assert_close(one[-1], whole[-1][1:])


@pytest.mark.parametrize("kind", sorted(TINY_BACKBONES))
def test_stages_own_every_weight_once(kind):
    """"Unfreeze the last N stages" must mean all of their weights and nothing else."""
    backbone = build(TINY_BACKBONES[kind])
    owned = [set(backbone.stage_parameters(i)) - set(backbone.stage_parameters(i + 1))
             for i in range(backbone.num_stages)]
    assert all(owned), "a stage without weights"
    assert set().union(*owned) == {k for k, _ in backbone.named_parameters()}
    assert sum(map(len, owned)) == len(list(backbone.parameters()))


def test_vit_position_embedding_is_resized_along_the_right_axes():
    vit = ViT(ViTConfig(width=8, depth=1, heads=1, pos_grid=4))
    with torch.no_grad():  # a grid that varies along the width only: (1, 1 + 16, D), value = column
        grid = torch.arange(4.0).repeat(4).view(1, 16, 1).expand(1, 16, 8)
        vit.encoder.pos_embedding.copy_(torch.cat([torch.full((1, 1, 8), -1.0), grid], 1))
        assert vit.position_embedding((4, 4)) is vit.encoder.pos_embedding  # the stored grid is used as is
        pos = vit.position_embedding((16, 28))  # a 256x448 input
    assert pos.shape == (1, 1 + 16 * 28, 8)
    assert torch.equal(pos[0, 0], torch.full((8,), -1.0))  # the class token's entry is not resized
    cols = pos[0, 1:, 0].view(16, 28)
    torch.testing.assert_close(cols, cols[:1].expand(16, 28))  # constant down each column
    assert (cols[0, 3:-3].diff() > 0).all() and cols[0, -1] > cols[0, 0] + 2.5  # rising along the width (bicubic
    # overshoots a little at the borders)


@pytest.mark.parametrize("bad, message", [
    ({"type": "vit", "width": 30, "heads": 4}, "vit heads must divide width 30"),
    ({"type": "vit", "depth": 0}, "vit depth must be >= 1"),
    ({"type": "vit", "patch": 32}, "patch"),
    ({"type": "mobilenet", "arch": "huge"}, "mobilenet arch must be one of"),
    ({"type": "mobilenet", "width": 0.0}, "mobilenet width must be in"),
])
def test_bad_backbone_configs_name_the_problem(bad, message):
    with pytest.raises(ConfigError, match=message):
        HydraNetConfig(backbone=bad)


@pytest.mark.parametrize("kind", sorted(TINY_BACKBONES))
def test_the_checkpoint_records_the_backbone_and_rebuilds_it(kind, tmp_path):
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone=TINY_BACKBONES[kind],
                                    neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}}))
    path = save_checkpoint(model, tmp_path / f"{kind}.safetensors")
    recorded = read_metadata(path)["config"]["backbone"]  # written out with its defaults
    assert recorded.items() >= TINY_BACKBONES[kind].items() and "num_classes" in recorded
    loaded, _ = load_checkpoint(path)
    assert type(loaded.backbone) is type(model.backbone)
    x = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    a, b = model.eval().detect(x, score_threshold=0.0), loaded.detect(x, score_threshold=0.0)
    assert all(torch.equal(a[i]["people"].scores, b[i]["people"].scores) for i in range(2))


def test_the_demo_checkpoint_still_loads_as_resnet_and_fpn():
    model, _ = load_checkpoint(DEMO)
    meta = read_metadata(DEMO)["config"]
    # the file names its parts: compactly as first written, in full (defaults too) since re-saved with its re-ID head
    assert {k: meta["backbone"][k] for k in ("type", "depth", "width")} == {"type": "resnet", "depth": 18, "width": 16}
    assert {k: meta["neck"][k] for k in ("type", "channels")} == {"type": "fpn", "channels": 64}
    assert "adapters" not in meta
    assert model.config.backbone == {"type": "resnet", "depth": 18, "width": 16, "num_classes": None}
    assert model.config.neck == {"type": "fpn", "channels": 64, "extra_levels": 0}


def test_train_command_builds_the_backbone_it_is_asked_for(tmp_path, capsys):
    from pipeline.cli import main as cli_main

    out = tmp_path / "vit.safetensors"
    common = ["--head", "people=person", "--input-size", "64x96", "--steps", "1", "--batch-size", "1", "--no-progress"]
    assert cli_main(["train", "--out", str(out), "--backbone", "vit", "--width", "32", "--depth", "1", *common]) == 0
    assert read_metadata(out)["config"]["backbone"] == {"type": "vit", "width": 32, "depth": 1, "heads": 4,
                                                        "mlp_dim": 128, "pos_grid": 14, "num_classes": None}
    assert cli_main(["train", "--out", str(tmp_path / "m.safetensors"), "--backbone", "mobilenet", "--depth", "3",
                     *common]) == 2
    assert "unexpected keyword argument 'depth'" in capsys.readouterr().err


# torch.export's exporter takes ~10 s per model here (the default TorchScript one ~1 s): slow.
@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["vit", "mobilenet"])
def test_new_backbones_export_to_onnx_with_the_same_outputs(kind, exporter, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from models.export import export_onnx, output_names

    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(96, 160), backbone=TINY_BACKBONES[kind],
                                    neck={"type": "pan", "channels": 16}, heads={"people": {"classes": ["person"]}}))
    session = ort.InferenceSession(str(export_onnx(model.eval(), tmp_path / "m.onnx", exporter)),
                                   providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 96, 160), dtype=np.uint8)
    outs = dict(zip(output_names(model), session.run(None, {"images": images})))
    with torch.inference_mode():
        ref = model(model.normalize(torch.from_numpy(images)))["people"]
    np.testing.assert_allclose(outs["people.cls_logits"], ref["cls_logits"].numpy(), atol=1e-4, rtol=1e-4)
