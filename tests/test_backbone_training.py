"""Every backbone x neck trains on synthetic scenes: a few steps at a tiny input, the loss falls and every
stage of the backbone learns (the CI variant; the full runs are benchmarks/bench_backbones.py --train)."""

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.hydranet import HydraNet, HydraNetConfig
from models.train import TrainConfig, train

BACKBONES = {
    "resnet": {"type": "resnet", "depth": 10, "width": 8},
    "vit": {"type": "vit", "width": 32, "depth": 2, "heads": 2},
    "mobilenet": {"type": "mobilenet", "arch": "small", "width": 0.5},
}
STEPS = 12


@pytest.mark.parametrize("neck", ["fpn", "pan"])
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_each_backbone_and_neck_trains_on_synthetic_scenes(kind, neck, tmp_path):
    cfg = TrainConfig(out=tmp_path / "m.safetensors", heads={"people": ["person"], "vehicles": ["car"]},
                      input_size=(96, 160), backbone=BACKBONES[kind], neck={"type": neck, "channels": 16},
                      batch_size=4, workers=0, warmup_steps=1, steps=STEPS, lr=5e-3, seed=0)
    losses: list[float] = []
    trained, _ = load_checkpoint(train(cfg, progress=False, on_step=lambda step, v: losses.append(sum(v.values()))))
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first, f"loss {first:.3f} -> {last:.3f}: {[round(v, 3) for v in losses]}"
    torch.manual_seed(cfg.seed)  # train() seeds and builds the model exactly so: its initial weights
    initial = HydraNet(HydraNetConfig(input_size=cfg.input_size, backbone=cfg.backbone, neck=cfg.neck,
                                      heads={h: {"classes": c} for h, c in cfg.heads.items()}))
    now = trained.backbone.state_dict()
    for stage in range(initial.backbone.num_stages):  # gradients reached the first stage too
        params = initial.backbone.stage_parameters(stage)
        assert any(not torch.equal(p, now[k]) for k, p in params.items()), f"stage {stage} did not learn"
