"""A model file that passes the controller's metadata check but does not load in the actor (a LoRA adapter without
its base, weights missing a tensor, int8 without its calibration data): `run` printed Ray's traceback and "This is a
bug in hydravision" (exit 1) where `eval` refused the same file in one line. The error is found in the actor's
constructor; Ray hands back only its text, which names the error's class by module."""

from __future__ import annotations

import pytest
import ray

from pipeline import cluster
from pipeline.cluster import Placement
from pipeline.config import parse_config
from pipeline.errors import UserError


def died_with(last_line: str):
    text = ("The actor died because of an error raised in its creation task, ray::StreamActor.__init__() (pid=1, "
            "ip=10.0.0.1)\n  File \"models/checkpoint.py\", line 90, in load_checkpoint\n    raise ...\n" + last_line)

    def get(ref, timeout=None):
        raise ray.exceptions.RayActorError(error_msg=text, actor_init_failed=True)
    return get


@pytest.mark.parametrize("last_line, reason", [
    ("models.metadata.CheckpointError: /m/bikes.safetensors: adds to the checkpoint /m/base.safetensors, which is "
     "missing", "/m/bikes.safetensors: adds to the checkpoint /m/base.safetensors, which is missing"),
    ("models.hydranet.ConfigError: model.precision int8 calibrates on the model's training data; /d is gone",
     "model.precision int8 calibrates on the model's training data; /d is gone"),
])
def test_a_model_that_does_not_load_in_the_actor_is_a_user_error(monkeypatch, last_line, reason):
    monkeypatch.setattr(cluster.ray, "get", died_with(last_line))
    placement = Placement.__new__(Placement)
    placement.config = parse_config({"cameras": []})
    with pytest.raises(UserError) as refused:
        placement.ready(None, "the model in the first camera process")
    assert str(refused.value) == f"the model in the first camera process could not start: {reason}"


def test_another_modules_error_of_that_name_stays_a_bug(monkeypatch):
    monkeypatch.setattr(cluster.ray, "get", died_with("somewhere.else.CheckpointError: not ours"))
    placement = Placement.__new__(Placement)
    placement.config = parse_config({"cameras": []})
    with pytest.raises(ray.exceptions.RayActorError):
        placement.ready(None, "inference replica 0")
