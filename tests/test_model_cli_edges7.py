"""The model commands where an --out could destroy a file the user keeps, or fail only after an hour: an export
named as a checkpoint (written over another checkpoint, exit 0), an import-detector checkpoint named as an
export, train --import-backbone writing its checkpoint over the backbone weights it started from, and
train-demo refusing a folder --out only after its first three training stages; and int8 calibrated on fewer
frames than it wants without a word."""


import pytest
import torch

from models.checkpoint import save_checkpoint
from models.hydranet import HydraNet, HydraNetConfig
from pipeline import model_commands
from pipeline.cli import main as cli_main

TINY = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                      neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}})
TINY_ARGS = ["--input-size", "64x96", "--depth", "10", "--width", "8", "--neck-channels", "16", "--batch-size", "1",
             "--steps", "1", "--no-progress"]


@pytest.fixture
def no_training(monkeypatch) -> list[str]:
    """The training functions the model commands call, stood in for: each records its call and writes its --out
    as a trained model would (tiny, untrained), so a test sees what a command would do without training."""
    calls = []

    def stand_in(name):
        def train(cfg, progress=True, **kwargs):
            calls.append(name)
            path = save_checkpoint(HydraNet(TINY), cfg.out)
            return (path, {}) if name == "train_reid_head" else path
        return train

    for name in ("train_model", "train_attribute_head", "train_reid_head"):
        monkeypatch.setattr(model_commands, name, stand_in(name))
    return calls


def test_export_out_named_as_a_checkpoint_is_refused_and_leaves_that_checkpoint(tiny_checkpoint, tmp_path, capsys):
    other = tmp_path / "coco.safetensors"  # another model the user keeps
    other.write_bytes(tiny_checkpoint.read_bytes()[::-1])
    before = other.read_bytes()
    assert cli_main(["export", str(tiny_checkpoint), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--out {other} is named as a .safetensors file" in err and "name a .onnx file" in err
    assert other.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco.safetensors"]


def test_import_detector_out_named_as_an_export_is_refused_and_leaves_it(tmp_path, monkeypatch, capsys):
    coco = HydraNetConfig.from_dict({**TINY.to_dict(), "heads": {"coco": {"classes": ["person", "car"]}}})
    monkeypatch.setattr(model_commands, "import_torchvision_fcos", lambda path, size: HydraNet(coco))
    weights = tmp_path / "fcos.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    export = tmp_path / "model.onnx"
    export.write_bytes(b"an ONNX export the service runs")
    assert cli_main(["import-detector", str(weights), "--out", str(export)]) == 2
    assert f"--out {export} is named as a .onnx file" in capsys.readouterr().err
    assert export.read_bytes() == b"an ONNX export the service runs"


def test_train_import_backbone_out_naming_the_weights_file_is_refused_and_leaves_it(tmp_path, no_training, capsys):
    weights = tmp_path / "resnet10.pth"
    torch.save(HydraNet(TINY).backbone.state_dict(), weights)  # weights that fit: the import itself succeeds
    before = weights.read_bytes()
    rc = cli_main(["train", "--import-backbone", str(weights), "--out", str(weights), "--head", "people=person",
                   *TINY_ARGS])
    assert rc == 2, capsys.readouterr()
    assert f"--out {weights} is the --import-backbone file itself" in capsys.readouterr().err
    assert weights.read_bytes() == before and no_training == []


def test_train_import_backbone_to_another_out_still_trains(tmp_path, no_training, capsys):
    """Normal-path guard (passes on the original too): the check above does not refuse a plain --out."""
    weights = tmp_path / "resnet10.pth"
    torch.save(HydraNet(TINY).backbone.state_dict(), weights)
    out = tmp_path / "model.safetensors"
    assert cli_main(["train", "--import-backbone", str(weights), "--out", str(out), "--head", "people=person",
                     *TINY_ARGS]) == 0
    assert no_training == ["train_model"] and out.is_file()


def test_train_demo_out_a_folder_is_refused_before_any_training(tmp_path, no_training, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    assert cli_main(["train-demo", "--out", str(folder), "--steps", "1", "1", "1", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: is a folder" in err and "bug" not in err
    assert no_training == []  # the original trained three stages (over an hour) before refusing it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # and left their files beside it



def test_int8_calibration_on_fewer_frames_than_it_wants_says_so(tmp_path, caplog):
    import cv2
    import numpy as np

    from models import quantize

    data = tmp_path / "yolo"  # a training folder of two pictures
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    (data / "classes.txt").write_text("person\n")
    for i in range(2):
        cv2.imwrite(str(data / "images" / f"{i}.png"), np.full((48, 80, 3), 60 * i, np.uint8))
        (data / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    with caplog.at_level("WARNING", logger="models.quantize"):
        frames = quantize.calibration_frames(HydraNet(TINY), [{"data": str(data)}], n=8)
    assert len(frames) == 2 and frames[0].shape == (3, 64, 96)
    assert f"int8 calibrates on 2 frames, not 8: the training data ({data})" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="models.quantize"):  # enough pictures: nothing to say
        assert len(quantize.calibration_frames(HydraNet(TINY), [{"data": str(data)}], n=2)) == 2
    assert "calibrates on" not in caplog.text


def test_a_folder_given_as_backbone_weights_is_named_a_folder(tmp_path) -> None:
    """It exists: "no such weights file" sent the user looking for a typo (read_metadata says "is a folder")."""
    from models.checkpoint import CheckpointError, load_torch_weights

    with pytest.raises(CheckpointError, match="is a folder"):
        load_torch_weights(tmp_path)
