"""Edges of the appearance heads and their training commands, a ninth look (models/reid.py, models/attributes.py,
models/train_reid.py, models/train_attributes.py, workers/appearance.py): an attribute the data cannot teach is
refused before any training, and the re-ID check scores the classes the head embeds only."""

import pytest
import torch

import models.train_attributes as train_attributes
from models.datasets import DatasetError
from models.hydranet import HydraNet, HydraNetConfig
from models.train_attributes import AttributeTrainConfig, train_attribute
from models.train_reid import FIRST_TRAIN_SEED, match_accuracy

KIND = {"name": "kind", "labels": ["sedan", "hatch", "van"], "on": "vehicles", "of": ["car"]}


def no_data(*args, **kwargs):
    raise AssertionError("training data was drawn")


@pytest.mark.parametrize("attribute, message", [
    ({**KIND, "on": "people", "of": ["person"]}, "no box of 'people' \\(person\\)"),  # people have no body type
    ({**KIND, "labels": ["sedan", "truck"]}, "shows 1 of the labels"),  # a head that only ever says "sedan"
])
def test_an_attribute_the_data_cannot_teach_is_refused_before_any_training(attribute, message, tiny_checkpoint,
                                                                           tmp_path, monkeypatch):
    """Every step skipped the boxes, and only after the whole run (600 steps, 8 min on a CPU) was the head refused;
    with one label the data has, a head that always says it was saved."""
    monkeypatch.setattr(train_attributes, "DataLoader", no_data)
    out = tmp_path / "o.safetensors"
    with pytest.raises(DatasetError, match=message):
        train_attribute(AttributeTrainConfig(init=tiny_checkpoint, out=out, **attribute), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("labels", [KIND["labels"], ["sedan", "van", "truck"]])  # a label it lacks: a warning
def test_guard_normal_path_an_attribute_the_data_teaches_trains(labels, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(train_attributes, "DataLoader", no_data)
    with pytest.raises(AssertionError, match="training data was drawn"):
        train_attribute(AttributeTrainConfig(init=tiny_checkpoint, out=tmp_path / "o.safetensors",
                                             **{**KIND, "labels": labels}), progress=False)


def reid_model(heads: list[str]) -> HydraNet:
    torch.manual_seed(0)
    return HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                   neck={"type": "fpn", "channels": 16},
                                   heads={"people": {"classes": ["person"]},
                                          "vehicles": {"classes": ["car", "bicycle"]}},
                                   reid={"heads": heads, "dim": 8, "channels": 8, "hidden": 16, "colour": 2})).eval()


def test_the_reid_check_scores_only_the_classes_of_the_heads_it_embeds():
    """`train-reid --heads people` printed an accuracy over people, cars and bicycles: the service never compares
    the embeddings of the classes of heads it does not embed."""
    scored = {tuple(h): match_accuracy(reid_model(h), [FIRST_TRAIN_SEED - 1], pairs=3, gap=3)["scored"]
              for h in (["people"], ["vehicles"], ["people", "vehicles"])}
    assert scored[("people",)] > 0 and scored[("vehicles",)] > 0, scored
    assert scored[("people",)] + scored[("vehicles",)] == scored[("people", "vehicles")], scored
