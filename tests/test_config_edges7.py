"""Config edges: amounts Ray refuses only when the actor is made, and a relative checkpoint that replicas in
another working directory could not find."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, load_config, parse_camera, parse_config


def cam(**kw):
    return {"id": "c1", "url": "synthetic://street", **kw}


@pytest.mark.parametrize("amount", [0.00005, math.inf])
def test_a_placement_resource_ray_cannot_reserve_is_refused_at_load(amount):
    """`resources: {rack_a: 0.00005}` loaded, then Ray's ValueError when the camera's actor was made ended the
    start as "a bug in hydravision"; an infinite one was refused only once Ray was up."""
    import ray

    with pytest.raises((ValueError, OverflowError)):  # Ray's own verdict on that amount
        ray.remote(resources={"rack_a": amount})(type("Actor", (), {}))
    expected = r"cameras\[0\]\.placement\.resources: amounts must be > 0 \(at least 0\.0001, Ray's step\) and finite"
    with pytest.raises(ConfigError, match=expected):
        parse_config({"cameras": [cam(placement={"resources": {"rack_a": amount}})]})
    with pytest.raises(ConfigError, match=r"^camera\.placement\.resources: amounts must be > 0"):  # a live add
        parse_camera(cam(placement={"resources": {"rack_a": amount}}))


def test_placement_resources_ray_reserves_still_load():
    ray_step, whole = 0.0001, 2
    config = parse_config({"cameras": [cam(placement={"resources": {"rack_a": ray_step, "rack_b": whole}})]})
    assert config.cameras[0].placement.resources == {"rack_a": ray_step, "rack_b": whole}


def test_infinite_gpus_per_replica_are_refused_at_load(tmp_path):
    """`num_gpus: .inf` loaded; the start stopped only after Ray had started ("needs GPU=inf")."""
    p = tmp_path / "c.yaml"
    p.write_text("inference:\n  num_gpus: .inf\ncameras: [{id: a, url: 'synthetic://street'}]\n")
    with pytest.raises(ConfigError, match=r"inference\.num_gpus: must be finite \(got inf\)"):
        load_config(p)
    assert parse_config({"inference": {"num_gpus": 2}}).inference.num_gpus == 2


def test_a_relative_checkpoint_names_the_controllers_file_for_every_replica(tmp_path, monkeypatch):
    """The controller checked `model.checkpoint: mine.safetensors` in its own working directory, and sent the
    replicas (``distribute: path``) the relative name: a replica whose process runs elsewhere (a Ray started by
    `ray start` in another folder) looked for another file."""
    import pipeline.cluster as cluster

    (tmp_path / "mine.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    config = parse_config({"model": {"checkpoint": "mine.safetensors", "distribute": "path"}})
    arg = cluster.Placement.checkpoint_arg(SimpleNamespace(config=config, _checkpoint_ref=None))
    elsewhere = tmp_path / "ray-worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the replica's process
    assert Path(arg).read_bytes() == b"weights"
