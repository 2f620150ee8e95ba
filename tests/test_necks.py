"""Necks: FPN and PAN give the heads the same contract (channels, strides); PAN adds a bottom-up path."""

import pytest
import torch

from models.fpn import FPN, FPNConfig
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.pan import PAN, PANConfig

IN_CHANNELS, STRIDES = [16, 32, 64], (8, 16, 32)


def pyramid(n: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(n, c, 64 // s, 96 // s) for c, s in zip(IN_CHANNELS, STRIDES)]


@pytest.mark.parametrize("neck", [FPN(IN_CHANNELS, STRIDES, FPNConfig(channels=24)),
                                  PAN(IN_CHANNELS, STRIDES, PANConfig(channels=24))])
def test_fpn_and_pan_keep_the_contract_the_heads_expect(neck):
    out = neck.eval()(pyramid(2))
    assert neck.out_channels == 24 and neck.strides == STRIDES
    assert [tuple(o.shape) for o in out] == [(2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3)]


def test_pan_carries_the_finest_level_up_to_the_coarsest_and_fpn_does_not():
    """FPN only flows top-down: C3 cannot reach P5. PAN's bottom-up path must carry it there."""
    torch.manual_seed(0)
    fpn, pan = FPN(IN_CHANNELS, STRIDES, FPNConfig(channels=16)), PAN(IN_CHANNELS, STRIDES, PANConfig(channels=16))
    feats = pyramid()
    changed = [feats[0] + torch.randn_like(feats[0]), *feats[1:]]
    with torch.inference_mode():
        assert torch.equal(fpn(feats)[2], fpn(changed)[2])
        assert not torch.equal(pan(feats)[2], pan(changed)[2])
        assert not torch.equal(pan(feats)[0], pan([*feats[:2], feats[2] + 1.0])[0])  # and top-down, as FPN


def test_pan_top_down_part_is_an_fpn_under_fpns_key_names():
    fpn = FPN(IN_CHANNELS, STRIDES, FPNConfig(channels=16)).state_dict()
    pan = PAN(IN_CHANNELS, STRIDES, PANConfig(channels=16)).state_dict()
    assert all(pan[k].shape == v.shape for k, v in fpn.items())
    assert sorted(set(pan) - set(fpn)) == [f"{p}.{i}.{w}" for p in ("down", "fuse") for i in (0, 1) for w in ("bias", "weight")]


@pytest.mark.parametrize("neck, message", [
    ({"type": "pan", "channels": 4}, "pan channels must be >= 8"),
    ({"type": "pan", "extra_levels": 2}, "extra_levels"),
])
def test_bad_pan_configs_name_the_problem(neck, message):
    with pytest.raises(ConfigError, match=message):
        HydraNetConfig(neck=neck)


def test_a_model_config_chooses_pan():
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "pan", "channels": 16}, heads={"people": {"classes": ["person"]}}))
    assert isinstance(model.neck, PAN) and model.strides == STRIDES
    out = model.eval()(torch.zeros(1, 3, 64, 96))["people"]
    assert out["cls_logits"].shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 1)
