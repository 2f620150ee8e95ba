"""Edges of the training commands a user drives: arguments that cannot train are refused before any training with
a message naming them, outputs that cannot be written are found at the start (not after the training), a head
that would be saved untrained is refused, and odd data (boxes past the picture) is taken as the picture shows it."""

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models.train as train_module
from models.checkpoint import load_checkpoint, save_checkpoint
from models.datasets import DatasetError, YoloFolder
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.train import TrainConfig, train
from models.train_attributes import AttributeTrainConfig, train_attribute
from pipeline.cli import main as cli_main

TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 2, "workers": 0, "warmup_steps": 1}
TINY_ARGS = ["--input-size", "64x96", "--depth", "10", "--width", "8", "--neck-channels", "16", "--batch-size", "1",
             "--steps", "1", "--no-progress"]
KIND = ["--attribute", "kind=sedan,hatch,van", "--on", "vehicles=car"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random model with the demo's detection heads (no attribute, no re-ID)."""
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16},
                                    heads={"people": {"classes": ["person"]},
                                           "vehicles": {"classes": ["car", "bicycle"]}}))
    return save_checkpoint(model, tmp_path_factory.mktemp("edges") / "base.safetensors")


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_train_refuses_a_learning_rate_that_cannot_train(lr, tmp_path, capsys):
    """-1 was a ValueError 'bug' traceback from AdamW, nan a FloatingPointError 'bug' after a step, 0 a silent
    training that changed nothing."""
    out = tmp_path / "o.safetensors"
    rc = cli_main(["train", "--out", str(out), "--head", "people=person", "--lr", lr, *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "lr" in err and "Traceback" not in err and not out.exists()


def test_a_state_saved_every_zero_steps_is_refused():
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(out=Path("o.safetensors"), heads={"people": ["person"]}, checkpoint_every=0)


@pytest.mark.parametrize("command", ["train", "train-attribute", "train-reid"])
def test_an_out_that_is_a_folder_is_refused_before_training(command, base, tmp_path, capsys, monkeypatch):
    """It failed only when the finished model was renamed over the folder: an IsADirectoryError 'bug' after the
    whole training."""
    folder = tmp_path / "models"
    folder.mkdir()
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))  # no training step may run
    args = {"train": ["train", "--head", "people=person", *TINY_ARGS],
            "train-attribute": ["train-attribute", "--from", str(base), *KIND, "--steps", "1", "--no-progress"],
            "train-reid": ["train-reid", "--from", str(base), "--heads", "people", "--steps", "1", "--no-progress"]}
    rc = cli_main([*args[command], "--out", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{folder}: is a folder" in err and not steps
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["models"]


@pytest.mark.parametrize("command", ["train-attribute", "train-reid"])
def test_an_out_whose_folder_cannot_be_made_is_a_user_error_before_training(command, base, tmp_path, capsys):
    """train checked this; train-attribute and train-reid failed after training with a FileExistsError 'bug'."""
    (tmp_path / "a-file").write_text("")
    args = {"train-attribute": ["train-attribute", "--from", str(base), *KIND],
            "train-reid": ["train-reid", "--from", str(base), "--heads", "people"]}
    rc = cli_main([*args[command], "--out", str(tmp_path / "a-file" / "o.safetensors"), "--steps", "1",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "a-file/o.safetensors: cannot make its folder" in err


def test_an_existing_output_is_replaced_with_a_word(tmp_path, caplog):
    out = tmp_path / "o.safetensors"
    train(TrainConfig(out=out, heads={"people": ["person"]}, steps=1, **TINY), progress=False)
    with caplog.at_level(logging.WARNING):
        train(TrainConfig(out=out, heads={"people": ["person"]}, steps=1, **TINY), progress=False)
    assert f"{out} exists" in caplog.text


def test_an_attribute_no_training_box_carries_is_refused_not_saved_untrained(base, tmp_path, capsys):
    """People have no body type: every step was skipped and a head that never trained was written, exit 0."""
    out = tmp_path / "o.safetensors"
    rc = cli_main(["train-attribute", "--from", str(base), "--out", str(out), "--attribute", "kind=sedan,hatch,van",
                   "--on", "people=person", "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "no box" in err and "'kind'" in err and not out.exists()


def test_attribute_labels_the_data_never_showed_are_named(base, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train_attribute(AttributeTrainConfig(init=base, out=tmp_path / "o.safetensors", name="kind",
                                             labels=["sedan", "hatch", "van", "truck"], on="vehicles", of=["car"],
                                             steps=2, batch_size=4), progress=False)
    assert "never" in caplog.text and "'truck'" in caplog.text


def test_yolo_boxes_reaching_past_the_picture_are_cut_at_its_edge(tmp_path):
    """YOLO's centre and size may each be in [0, 1] while the box reaches past the picture: it was taken as it was,
    a target that reaches into the letterbox's padding (where no picture is) on the unaugmented frames."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("person\n")
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((100, 100, 3), 128, np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.9 0.5 0.4 0.2\n0 0.5 0.5 0.2 0.2\n")
    ds = YoloFolder(tmp_path, (64, 96), augment=False)  # a square picture: padded left and right by 16
    boxes = ds[0].boxes
    np.testing.assert_allclose(boxes[0], [16 + 0.7 * 64, 0.4 * 64, 16 + 64, 0.6 * 64], atol=1e-4)
    np.testing.assert_allclose(boxes[1], [16 + 0.4 * 64, 0.4 * 64, 16 + 0.6 * 64, 0.6 * 64], atol=1e-4)


def test_unfreezing_with_classes_the_data_lacks_fails_before_scoring_the_other_heads(base, tmp_path, monkeypatch):
    """The other heads' held-out scoring (minutes on a real model) ran before the data and the head's classes
    were looked at: a typo cost that wait before its error."""
    def scored(*a, **k):
        raise AssertionError("scored the other heads before checking the data")

    monkeypatch.setattr(train_module, "score_heads", scored)
    with pytest.raises(DatasetError, match="'forklift'"):
        train(TrainConfig(out=tmp_path / "o.safetensors", heads={"forklifts": ["forklift"]}, init=base,
                          unfreeze_stages=1, steps=1, **TINY), progress=False)


def test_a_lora_adapter_written_over_the_base_of_its_from_is_refused_and_both_still_load(tmp_path):
    """--out was compared with --from only: an adapter trained from an adapter file and written over that file's
    base replaced the base, after which neither file loaded (each names the other's changed weights)."""
    base = train(TrainConfig(out=tmp_path / "base.safetensors", heads={"people": ["person"]}, steps=1, **TINY),
                 progress=False)
    bikes = train(TrainConfig(out=tmp_path / "bikes.safetensors", heads={"bikes": ["bicycle"]}, init=base,
                              lora={"rank": 2}, steps=1, **TINY), progress=False)
    with pytest.raises(ConfigError, match="adds to"):
        train(TrainConfig(out=base, heads={"cars": ["car"]}, init=bikes, lora={"rank": 2}, steps=1, **TINY),
              progress=False)
    assert load_checkpoint(base)[0].head_names == ["people"]
    assert load_checkpoint(bikes)[0].head_names == ["people", "bikes"]
