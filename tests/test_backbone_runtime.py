"""Each backbone through the real runtime, chosen by the checkpoint alone: config -> Ray actors -> Redis.

The service config names nothing but the checkpoint; the architecture (backbone type, neck) comes from the
checkpoint's own metadata, so a ViT or a MobileNet runs where the ResNet ran with no other change.
"""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.hydranet import HydraNet, HydraNetConfig
from running import RunningApp, messages
from workers.publish import validate

FRAMES = 12
BACKBONES = {
    "vit": {"type": "vit", "width": 32, "depth": 2, "heads": 2},
    "mobilenet": {"type": "mobilenet", "arch": "small", "width": 0.5},
    "resnet": {"type": "resnet", "depth": 10, "width": 8},
}


@pytest.mark.timeout(300)
# ResNet with FPN is every other runtime test's model (demo, tiny), and PAN runs here under MobileNet, so ResNet
# with PAN is behind -m slow (the default suite is near its 10-minute budget).
@pytest.mark.parametrize("kind, neck", [("vit", "fpn"), ("mobilenet", "pan"),
                                        pytest.param("resnet", "pan", marks=pytest.mark.slow)])
def test_the_service_runs_each_backbone_from_its_checkpoint(kind, neck, machine, ray_local, redis_server, tmp_path):
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(96, 160), backbone=BACKBONES[kind],
                                    neck={"type": neck, "channels": 16},
                                    heads={"people": {"classes": ["person"], "score_threshold": 0.0}}))
    checkpoint = save_checkpoint(model, tmp_path / f"{kind}.safetensors")
    cameras = [{"id": "street", "url": f"synthetic://street?seed=3&frames={FRAMES}", "realtime": False}]
    with RunningApp(redis_server.url, checkpoint, cameras) as run:
        # the camera's file-like source ends after FRAMES frames; then the run loop returns
        assert run.join(machine.deadline(60)), "the camera did not finish"
        final = run.stop()[0]
    published = messages(redis_server.client(), "street")
    assert final["state"] == "ended" and final["published"] == FRAMES == len(published)
    for m in published:
        validate(m, "detection")
        assert m["heads"] == ["people"]
    # score_threshold 0: random weights still give boxes, so the head's output really reached Redis
    assert sum(len(m["detections"]) for m in published) > 0
