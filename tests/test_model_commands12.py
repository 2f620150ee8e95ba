"""`hydravision export` without --out and the fine-tune summary after `train`, at their edges."""
from __future__ import annotations

import torch

from models.checkpoint import save_checkpoint
from models.export import damaged
from models.hydranet import HydraNet, HydraNetConfig
from pipeline.cli import main as cli_main
from pipeline.model_commands import format_fine_tune


def test_an_export_cut_short_in_the_cache_is_made_again_not_called_up_to_date(tiny_checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    """A cached export cut short (a full disk, a restored cache) was reported "up to date" by the command an
    image's build runs to bake the export in: the service's every start then exported again."""
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    assert cli_main(["export", str(tiny_checkpoint)]) == 0
    [cached] = (tmp_path / "cache" / "onnx").glob("*.onnx")
    capsys.readouterr()
    cached.write_bytes(cached.read_bytes()[:1000])
    assert damaged(cached)
    assert cli_main(["export", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {cached}")
    assert damaged(cached) is None
    assert cli_main(["export", str(tiny_checkpoint)]) == 0  # whole now: nothing to do
    assert capsys.readouterr().out.startswith(f"{cached} is up to date")


def test_a_checkpoint_with_an_empty_history_has_nothing_to_say_after_training(tmp_path):
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}}))
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, {"history": []})
    assert format_fine_tune(path) == ""
