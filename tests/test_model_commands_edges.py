"""`hydravision import-detector` and `eval` where they accepted arguments they could not honour: an --out that
is the weights file (replaced by the checkpoint), a folder or unwritable (a traceback), and an eval --precision
silently ignored without --backend (the report then says fp32, not what was asked)."""

from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.hydranet import HydraNet, HydraNetConfig
from pipeline import model_commands
from pipeline.cli import main as cli_main


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "fcos.pth"
    torch.save({"w": torch.zeros(1)}, path)  # never loaded where --out is refused first
    return path


@pytest.fixture
def tiny_import(monkeypatch):
    """import_torchvision_fcos stood in for by a tiny model with a 'coco' head (the real one is ResNet-50)."""
    cfg = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16}, heads={"coco": {"classes": ["person", "car"]}})
    monkeypatch.setattr(model_commands, "import_torchvision_fcos", lambda path, size: HydraNet(cfg))


def test_import_detector_out_naming_the_weights_file_is_refused_and_leaves_it(weights, tiny_import, capsys):
    before = weights.read_bytes()
    assert cli_main(["import-detector", str(weights), "--out", str(weights)]) == 2
    assert f"--out {weights} is the weights file itself" in capsys.readouterr().err
    assert weights.read_bytes() == before


def test_import_detector_out_a_folder_is_a_user_error(weights, tiny_import, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert cli_main(["import-detector", str(weights), "--out", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'folder'} is a folder" in err and "Traceback" not in err


def test_import_detector_out_unwritable_is_a_user_error_and_leaves_nothing(weights, tiny_import, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert cli_main(["import-detector", str(weights), "--out", str(tmp_path / "a-file" / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "a-file/m.safetensors: cannot write it" in err and "bug in hydravision" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "fcos.pth"]


def test_import_detector_out_fine_writes_the_checkpoint(weights, tiny_import, tmp_path, capsys):
    """Normal-path guard (passes on the original too): the checks above do not refuse a plain --out."""
    out = tmp_path / "new" / "coco.safetensors"
    assert cli_main(["import-detector", str(weights), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert load_checkpoint(out)[0].head_names == ["coco"]


@pytest.mark.parametrize("precision", ["int8", "bf16", "fp16"])
def test_eval_precision_without_backend_is_refused_not_ignored(tiny_checkpoint, precision, capsys):
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--scenes", "1", "--frames", "1", "--no-progress"]
    assert cli_main([*argv, "--precision", precision]) == 2
    assert f"--precision {precision} is for the service's model path: it needs --backend" in capsys.readouterr().err
