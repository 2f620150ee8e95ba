"""Edges of evaluation and the small trainers: the held-out frames are scored a batch at a time (not all held in
memory), a seed numpy cannot take is refused by name, a re-ID training that cannot learn is refused rather than
saved, damaged checkpoint metadata is a CheckpointError, and scoring tracks pairs every box that matches."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import supervision as sv
import torch
from safetensors.torch import save_file

import models.evaluate as evaluate_module
from models.checkpoint import load_checkpoint, save_checkpoint
from models.datasets import DatasetError
from models.evaluate import EvalConfig, evaluate
from models.hydranet import HydraNet, HydraNetConfig
from models.metadata import FORMAT, FORMAT_VERSION, CheckpointError, read_metadata
from models.train_reid import ReIDTrainConfig, train_reid
from pipeline.analytics_eval import SceneRun, match_tracks
from pipeline.cli import main as cli_main
from synthetic.scene import FrameTruth

SIZE = (64, 96)  # (h, w)
KIND = ["--attribute", "kind=sedan,hatch,van", "--on", "vehicles=car"]


def tiny_model() -> HydraNet:
    torch.manual_seed(0)
    return HydraNet(HydraNetConfig(input_size=SIZE, backbone={"type": "resnet", "depth": 10, "width": 8},
                                   neck={"type": "fpn", "channels": 16},
                                   heads={"people": {"classes": ["person"]},
                                          "vehicles": {"classes": ["car", "bicycle"]}}))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random model with the demo's detection heads."""
    return save_checkpoint(tiny_model(), tmp_path_factory.mktemp("eval-edges") / "base.safetensors")


def test_eval_holds_one_batch_of_frames_at_a_time(monkeypatch):
    """All held-out frames were read into a list first: 0.7 MB a frame, 2.8 GB for --scenes 40 --frames 100."""
    taken = []

    def frames(_cfg):
        for i in range(20):
            taken.append(i)
            yield (np.zeros((*SIZE, 3), np.uint8),
                   SimpleNamespace(boxes=np.array([[10, 10, 40, 60]], np.float32), class_ids=np.array([0]),
                                   visibility=np.array([1.0], np.float32)))

    monkeypatch.setattr(evaluate_module, "held_out_frames", frames)
    done, ahead = [], []

    def detect(images, heads, _threshold):
        ahead.append(len(taken) - sum(done))  # frames read but not yet scored
        done.append(len(images))
        box = {"boxes": np.array([[10, 10, 40, 60]], np.float32), "scores": np.array([0.9], np.float32),
               "class_ids": np.array([0])}
        return [{h: box for h in hs} for hs in heads]

    report = evaluate(tiny_model(), EvalConfig(scenes=1, frames_per_scene=20, batch_size=8), only=["people"],
                      detect=detect)
    assert done == [8, 8, 4] and max(ahead) <= 8, ahead
    assert report["frames"] == 20 and report["heads"]["people"]["map50"] == 1.0


@pytest.mark.parametrize("command", ["train-attribute", "train-reid", "train"])
def test_a_seed_numpy_cannot_take_is_refused_by_name(command, base, tmp_path, capsys):
    """--seed -1 was a ValueError 'bug' traceback ("expected non-negative integer") that named no argument."""
    out = tmp_path / "o.safetensors"
    args = {"train-attribute": ["train-attribute", "--from", str(base), *KIND],
            "train-reid": ["train-reid", "--from", str(base), "--heads", "people"],
            "train": ["train", "--head", "people=person"]}
    rc = cli_main([*args[command], "--out", str(out), "--steps", "1", "--seed", "-1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "seed" in err and "-1" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("field, value", [("gap", (0, 0)), ("gap", (5, 3)), ("temperature", 0.0),
                                          ("temperature", float("nan")), ("jitter", float("nan")),
                                          ("jitter", 0.5), ("seed", -1)])
def test_reid_settings_that_cannot_train_are_refused_by_name(field, value):
    """gap 0 was an UnboundLocalError (or a view repeating the one before), temperature 0 a head of NaN saved as
    trained, jitter NaN an OverflowError from numpy."""
    with pytest.raises(ValueError, match=field):
        ReIDTrainConfig(init=Path("a.safetensors"), out=Path("b.safetensors"), heads=["people"], **{field: value})


def test_a_reid_training_that_never_saw_an_object_twice_is_refused_not_saved(base, tmp_path):
    """Empty streets: every step's loss was 0 and a head that never trained was written as if it had."""
    out = tmp_path / "o.safetensors"
    with pytest.raises(DatasetError, match="two views"):
        train_reid(ReIDTrainConfig(init=base, out=out, heads=["people"], steps=1, density=(0.0, 0.0)),
                   progress=False)
    assert not out.exists()


def checkpoint_with(path: Path, **meta: str) -> Path:
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": "{}", **meta})
    return path


@pytest.mark.parametrize("meta", [{"base": '"base.safetensors"'}, {"base": "{}"}, {"base": '{"path": 1}'},
                                  {"base": json.dumps({"path": "base.safetensors"})},
                                  {"config": "[" * 100_000 + "]" * 100_000},
                                  {"training": "[" * 100_000 + "]" * 100_000}])
def test_damaged_metadata_is_a_checkpoint_error_naming_the_file(meta, tmp_path):
    """A base that is not {path, sha256} was a TypeError/KeyError 'bug' when the model loaded (or, empty, the
    file was taken for a whole model); JSON nested too deep a RecursionError."""
    path = checkpoint_with(tmp_path / "damaged.safetensors", **meta)
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint metadata is damaged"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_match_tracks_pairs_every_box_that_matches():
    """Person A is matched by box X (IoU 0.67); B overlaps X by 0.48 and Y overlaps A by 0.43. The largest sum
    of IoUs pairs A-Y and B-X, both under 0.5: A was scored unmatched (its crossings untracked)."""
    a, b = [100, 100, 200, 200], [155, 100, 255, 200]
    x, y = [120, 100, 220, 200], [60, 100, 160, 200]
    truth = FrameTruth(0, np.array([a, b], np.float32), np.array([0, 0]), np.array([7, 8]),
                       np.array([1.0, 1.0], np.float32))
    tracks = sv.Detections(xyxy=np.array([x, y], np.float64), confidence=np.ones(2), class_id=np.zeros(2, int),
                           tracker_id=np.array([1, 2]), data={"class_name": np.array(["person", "person"])})
    run = SceneRun(0, 10.0, (640, 360), [truth], [{"people": tracks}], [], [], [], None,
                   heads={"people": ["person"]})
    assert match_tracks(run) == [{7: ("people", 1)}]


def test_a_folder_given_as_checkpoint_is_called_a_folder(tmp_path):
    """It was 'no such checkpoint file', for a folder that is there (`--checkpoint models/checkpoints`)."""
    with pytest.raises(CheckpointError, match=f"{tmp_path}: is a folder; name the checkpoint file"):
        read_metadata(tmp_path)
