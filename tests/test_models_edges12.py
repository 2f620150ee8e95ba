"""Model tooling at its edges (round 12): int8 calibration on a model trained from a data.yaml, and a checkpoint
config without the heads or input size the service reads from its metadata alone."""

import copy
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors.torch import save_file

from models.hydranet import HydraNet, HydraNetConfig
from models.quantize import calibration_frames

TINY_CONFIG = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                             neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}})


def write_split(images: Path, labels: Path, count: int, row: str, name: str) -> None:
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(images / f"{name}{i}.jpg"), np.full((48, 80, 3), 60 + 40 * i, np.uint8))
        (labels / f"{name}{i}.txt").write_text(row + "\n")


@pytest.mark.parametrize("given", ["data.yaml", "coco8.yaml"])
def test_int8_calibrates_on_the_data_yaml_a_model_was_trained_from(given, tmp_path):
    """``train --data ds/data.yaml`` (or an Ultralytics YAML outside the dataset) records that file as the model's
    data; int8 calibration took only a folder for data 'at hand' and refused it as 'not here'."""
    root = tmp_path / "ds"
    write_split(root / "images" / "train", root / "labels" / "train", 3, "0 0.5 0.5 0.4 0.6", "train")
    (root / "data.yaml").write_text("train: images/train\nnames: [person]\n")
    (tmp_path / "coco8.yaml").write_text("path: ds\ntrain: images/train\nnames: [person]\n")
    yaml = (root if given == "data.yaml" else tmp_path) / given
    frames = calibration_frames(HydraNet(TINY_CONFIG), [{"data": str(yaml.resolve())}], n=3)
    assert len(frames) == 3 and all(f.shape == (3, 64, 96) and f.dtype == np.uint8 for f in frames)


def damage(config: dict, what: str) -> dict:
    config = copy.deepcopy(config)
    if what == "input_size":
        del config["input_size"]
    elif what == "heads":
        del config["heads"]
    elif what == "heads.people.classes":
        del config["heads"]["people"]["classes"]
    return config


@pytest.mark.parametrize("missing", ["input_size", "heads", "heads.people.classes"])
def test_a_checkpoint_config_without_heads_or_input_size_stops_the_start_naming_the_file(missing, tmp_path):
    """The service reads the cameras' heads and input size from the metadata alone (``App.check_model``,
    ``model_changes``): a damaged config without them ended the start in a bare KeyError, where every other
    damage of the metadata is a CheckpointError naming the file."""
    from pipeline.app import App
    from pipeline.config import ConfigError as ServiceConfigError, parse_config

    tensors = {k: v.contiguous() for k, v in HydraNet(TINY_CONFIG).state_dict().items()}
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={"format": "hydravision-checkpoint", "format_version": "1",
                                            "config": json.dumps(damage(TINY_CONFIG.to_dict(), missing))})
    config = parse_config({"model": {"checkpoint": str(path)}, "cameras": [{"id": "c", "url": "synthetic://street"}]})
    with pytest.raises(ServiceConfigError, match=re.escape(f"model.checkpoint: {path}: checkpoint metadata is "
                                                           f"damaged (its config has no {missing})")):
        App(config, say=lambda m: None).check_model()
