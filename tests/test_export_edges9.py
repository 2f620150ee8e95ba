"""Model files at their edges: an export cache on a disk it filled, BatchNorm folded into a conv that pads by
reflection, and checkpoint metadata whose optional parts are damaged."""

import errno
import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.checkpoint import CheckpointError, load_checkpoint, read_metadata
from models.export import CACHE_MAX_AGE_DAYS, cached
from models.fuse import fuse_conv_bn
from models.hydranet import HydraNet, HydraNetConfig


def test_a_cache_on_a_disk_it_filled_removes_its_month_old_exports_before_making_a_new_one(tmp_path):
    """Pruning ran only after the new export was written: on a disk full of exports nobody used for months the
    new one failed (no space left), the old ones were never pruned, and every later start failed the same way
    (or ran torch under ``auto``). Now the old ones go first and their space takes the new one."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    old = folder / "last-month-0123456789abcdef.onnx"
    old.write_bytes(b"an old export")
    long_ago = time.time() - (CACHE_MAX_AGE_DAYS + 1) * 86400
    os.utime(old, (long_ago, long_ago))

    def export_on_a_full_disk(path):  # the disk has room for the new export only once the old one is gone
        if old.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(b"a new export")

    new = folder / "this-week-fedcba9876543210.onnx"
    assert cached(new, export_on_a_full_disk, "exporting") == new
    assert new.read_bytes() == b"a new export" and not old.exists()


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_folding_batchnorm_keeps_the_convs_padding_mode(padding_mode):
    """The folded conv was rebuilt with zero padding whatever the conv's mode: a conv padding by reflection gave
    other outputs along every border once its BatchNorm was folded (serving and the export fold them)."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, padding_mode=padding_mode, groups=2, bias=True), nn.BatchNorm2d(6)
    with torch.no_grad():  # statistics a trained BN would have, so that the fold changes the numbers
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    block = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        expected = block(x)
        assert fuse_conv_bn(block) == 1
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("part, damaged", [("attributes", [1]), ("adapters", "lora"), ("reid", ["people"])])
def test_damaged_optional_parts_of_the_metadata_are_refused_naming_the_file(part, damaged, tmp_path):
    """A config whose attributes or adapters are not a mapping (a hand edit, a damaged file) ended in an
    AttributeError naming neither the file nor the problem, as heads did before they were checked; the controller's
    check of the config (``read_metadata``) passed it, and a re-ID part that is not a mapping, too."""
    cfg = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}})
    tensors = {k: v.contiguous() for k, v in HydraNet(cfg).state_dict().items()}
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={"format": "hydravision-checkpoint", "format_version": "1",
                                            "config": json.dumps({**cfg.to_dict(), part: damaged}), "training": "{}"})
    for read in (read_metadata, load_checkpoint):
        with pytest.raises(CheckpointError, match="metadata is damaged") as err:
            read(path)
        assert str(path) in str(err.value)


def test_a_checkpoint_replaced_while_it_was_loaded_is_not_exported_under_the_new_content(tmp_path, monkeypatch):
    """The export's cache key is the file's content when the export is asked for, after the model was loaded:
    a new checkpoint copied over the file in between had the old weights' graph filed under the new content, and
    every later start of the new checkpoint ran the old model (its logits 7e-3 from the new one's)."""
    from models.checkpoint import save_checkpoint
    from models.export import cached_export

    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    cfg = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}})
    path = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_checkpoint(HydraNet(cfg), path)
    old, _ = load_checkpoint(path)
    torch.manual_seed(1)
    save_checkpoint(HydraNet(cfg), path)  # the operator's copy of the new version lands now
    with pytest.raises(CheckpointError, match="replaced while it was being loaded"):
        cached_export(old, path)
    assert not list((tmp_path / "cache").glob("**/*.onnx"))
    new, _ = load_checkpoint(path)  # a start after it loads and exports the file as it is
    assert cached_export(new, path).is_file()
