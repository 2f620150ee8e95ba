"""Training and checkpoint edges a user meets: a diverging training is the user's to fix (not a bug report), a
--import-backbone with an --out that cannot be written fails before anything is written, a YOLO folder is
recorded where any process finds it, a head whose classes no label has is refused before it is trained on
background alone, and a checkpoint with a damaged config is a CheckpointError naming it."""

import json
import logging
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import models.train as train_module
from models.checkpoint import CheckpointError, load_checkpoint
from models.datasets import DatasetError
from models.hydranet import HydraNet, HydraNetConfig
from models.train import TrainConfig, train
from pipeline.cli import main as cli_main

TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 2, "workers": 0, "warmup_steps": 1}
TINY_ARGS = ["--input-size", "64x96", "--depth", "10", "--width", "8", "--neck-channels", "16", "--batch-size", "1",
             "--no-progress"]


def write_yolo(root: Path, names: list[str], rows: str) -> Path:
    """Three grey pictures, each with the same label rows."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(f"names: [{', '.join(names)}]\n")
    for i in range(3):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.full((64, 96, 3), 60 + 40 * i, np.uint8))
        (root / "labels" / f"{i}.txt").write_text(rows)
    return root


def test_a_diverging_training_is_a_user_error_naming_the_learning_rate(tmp_path, capsys):
    """The loss became NaN: the command printed a traceback and 'This is a bug in hydravision ... please report it'
    (exit 1) for a learning rate the user chose."""
    out = tmp_path / "o.safetensors"
    rc = cli_main(["train", "--out", str(out), "--head", "people=person", "--lr", "1e6", "--steps", "30", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "diverged" in err and "loss became" in err and "--lr (it is 1e+06)" in err
    assert "bug in hydravision" not in err and "Traceback" not in err and not out.exists()


def test_a_nan_loss_names_the_step_as_the_progress_counts_it_without_a_warning(tmp_path, monkeypatch):
    """The step was 0-based where the progress lines count from 1, and formatting the losses warned about
    converting a tensor that requires grad."""
    real, calls = train_module.fcos_loss, []

    def nan_on_the_third_step(*args):
        calls.append(1)
        losses = real(*args)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) == 3 else losses

    monkeypatch.setattr(train_module, "fcos_loss", nan_on_the_third_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match=r"loss became nan at step 3: people/cls=nan"):
            train(TrainConfig(out=tmp_path / "o.safetensors", heads={"people": ["person"]}, steps=5, **TINY),
                  progress=False)
    assert not [w for w in caught if "requires_grad" in str(w.message)]


def test_import_backbone_with_an_out_that_cannot_be_written_fails_first_and_writes_nothing(tmp_path, capsys):
    """A file in --out's folder path was a FileExistsError 'bug' (exit 1); a folder as --out was refused only after
    the imported start file had been written beside it."""
    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(HydraNet(HydraNetConfig(input_size=(64, 96), backbone=TINY["backbone"], neck=TINY["neck"],
                                       heads={"people": {"classes": ["person"]}})).backbone.state_dict(), weights)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder").mkdir()
    for out, message in ((tmp_path / "a-file" / "o.safetensors", "a-file/o.safetensors: cannot make its folder"),
                         (tmp_path / "folder", "folder: is a folder")):
        rc = cli_main(["train", "--import-backbone", str(weights), "--out", str(out), "--head", "people=person",
                       "--steps", "1", *TINY_ARGS])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert message in err and "bug in hydravision" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "backbone.pth", "folder"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_a_yolo_folder_given_relative_is_recorded_absolute(tmp_path, monkeypatch):
    """The history kept the path as typed: int8 calibration (models/quantize.py) reads it from the service's
    working folder, and refused a folder that was there as 'not here'."""
    write_yolo(tmp_path / "ds", ["person"], "0 0.5 0.5 0.3 0.6\n")
    monkeypatch.chdir(tmp_path)
    out = train(TrainConfig(out=tmp_path / "o.safetensors", heads={"people": ["person"]}, data="ds", steps=1,
                            **TINY), progress=False)
    record = load_checkpoint(out)[1]["history"][-1]
    assert record["data"] == str(tmp_path.resolve() / "ds")
    monkeypatch.chdir(tmp_path.parent)
    assert Path(record["data"]).is_dir()


def test_a_head_whose_classes_no_label_has_is_refused_before_training(tmp_path, monkeypatch, caplog):
    """Every box became background: a head that detects nothing was trained for the whole run and saved, exit 0."""
    data = write_yolo(tmp_path / "ds", ["person", "car", "forklift"], "0 0.5 0.5 0.3 0.6\n1 0.2 0.7 0.2 0.2\n")
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))  # no training step may run
    out = tmp_path / "o.safetensors"
    with pytest.raises(DatasetError, match=r"head 'forklifts': no label file in .*ds has a box of \['forklift'\]"):
        train(TrainConfig(out=out, heads={"forklifts": ["forklift"]}, data=str(data), steps=2, **TINY), progress=False)
    assert not steps and not out.exists()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):  # some of a head's classes only: trained, with a word
        train(TrainConfig(out=out, heads={"vehicles": ["car", "forklift"]}, data=str(data), steps=1, **TINY),
              progress=False)
    assert "no label file" in caplog.text and "['forklift']" in caplog.text and out.is_file()


def test_a_checkpoint_whose_input_size_is_not_numbers_is_a_checkpoint_error(tmp_path, capsys):
    """A ValueError from the config escaped load_checkpoint: `eval` reported it as a bug, without the file's name."""
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone=TINY["backbone"], neck=TINY["neck"],
                                    heads={"people": {"classes": ["person"]}}))
    config = {**model.config.to_dict(), "input_size": "abc"}
    path = tmp_path / "damaged.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "hydravision-checkpoint", "format_version": "1", "config": json.dumps(config),
                        "training": "{}"})
    with pytest.raises(CheckpointError, match=f"{path}: cannot build the architecture"):
        load_checkpoint(path)
    assert cli_main(["eval", "--checkpoint", str(path), "--scenes", "1", "--frames", "1", "--no-progress"]) == 2
    assert "bug in hydravision" not in capsys.readouterr().err
    assert os.path.exists(path)
