"""Four things an ML engineer met on the model side: `model.compile: true` failing at start with "the nodes that
could host it may be full" while CPU was free (the actor was placed; its constructor was still compiling), fp16
on a CPU accepted silently at ~6x the CPU per frame, and training and export silent for minutes where their
output went to a log or a pipe (a stage of 60 steps said nothing for 25 minutes: a line came every 100 steps)."""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import ray

from models import export
from models import train as train_module
from models.train import TrainConfig
from pipeline.cluster import Placement
from pipeline.config import parse_config
from pipeline.errors import UserError
from workers.model_runner import ModelRunner


class Starting:
    """An actor whose constructor says it runs (a file), then runs for minutes: a model compiling at start."""

    def __init__(self, marker: str) -> None:
        Path(marker).write_text("in the constructor")
        time.sleep(600)

    def ping(self) -> int:
        return 1


def placement_with(model: dict, timeout_s: float = 0.5) -> Placement:
    placement = Placement.__new__(Placement)  # ready() reads only the config
    placement.config = parse_config({"cameras": [], "model": model, "ray": {"placement_timeout_s": timeout_s}})
    return placement


def wait_for(path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s  # a worker process's start, however slow the machine: not timed here
    while not path.exists():
        assert time.monotonic() < deadline, f"the actor's constructor did not run within {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_a_model_placed_and_still_compiling_is_not_said_to_wait_for_full_nodes(ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "started"
    actor = ray.remote(num_cpus=0)(Starting).remote(str(marker))
    try:
        wait_for(marker)
        with pytest.raises(UserError) as refused:
            placement_with({"backend": "torch", "compile": True}).ready(
                actor.ping.remote(), "the model in the first camera process")
        said = str(refused.value)
        assert said.startswith("the model in the first camera process did not start within 0.5 s "
                               "(ray.placement_timeout_s): it was placed (node ")
        assert "pid " in said and "still starting, compiling the model (model.compile: true" in said
        assert "Raise ray.placement_timeout_s (e.g. to 600) or set model.compile: false" in said
        assert "may be full" not in said
        # int8's first start quantizes: said so, with the setting to raise
        with pytest.raises(UserError, match=r"still starting, loading the model \(its first start exports and "
                                            r"quantizes it to int8; cached after\)\. Raise ray.placement_timeout_s$"):
            placement_with({"precision": "int8"}).ready([actor.ping.remote()], "inference replica 0")
    finally:
        ray.kill(actor)


@pytest.mark.timeout(300)
def test_a_model_no_node_took_still_says_the_nodes_may_be_full(ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "started"
    placed = ray.remote(num_cpus=0)(Starting).remote(str(marker))
    waiting = ray.remote(num_cpus=0, resources={"hv_no_node_has_this17": 1})(Starting).remote(str(tmp_path / "x"))
    try:
        wait_for(marker)
        for refs in (waiting.ping.remote(), [placed.ping.remote(), waiting.ping.remote()]):  # one not placed: full
            with pytest.raises(UserError, match=r"^inference replica 0 did not start within 0.5 s "
                                                r"\(ray.placement_timeout_s\): the nodes that could host it may be "
                                                r"full\. Free resources now:"):
                placement_with({"backend": "torch", "compile": True}).ready(refs, "inference replica 0")
    finally:
        ray.kill(placed)
        ray.kill(waiting)


@pytest.mark.parametrize("precision, warned", [("fp16", True), ("fp32", False), ("bf16", False), ("auto", False)])
def test_fp16_on_the_cpu_is_said_at_load_with_its_cost_and_the_fix(tiny_checkpoint, monkeypatch, caplog, precision,
                                                                    warned):
    with caplog.at_level(logging.WARNING, logger="workers.model_runner"):
        runner = ModelRunner(tiny_checkpoint, "cpu", precision, threads=1, backend="torch")
    said = [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()]
    assert runner.info()["autocast"] == ("fp16" if precision == "fp16" else "fp32" if precision == "auto"
                                         else precision)
    assert said == (["model.precision fp16 on the CPU (tiny.safetensors): torch runs half precision there on slow "
                     "kernels, ~6x the CPU per frame of fp32, and cameras drop frames as overload; on a CPU set "
                     "model.precision auto (the exported backends), bf16 or fp32"] if warned else [])


TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 1, "workers": 0, "warmup_steps": 1}


@pytest.mark.parametrize("seconds_a_step, lines", [
    (31.0, ["step 1/3", "step 2/3", "step 3/3"]),  # each step past 30 s: a line each, though far from 100 steps
    (11.0, ["step 3/3"]),  # a line once 30 s have passed since the last (started at 0: 33 s at step 3)
    (1.0, []),
])
def test_training_into_a_log_says_its_progress_at_least_every_30_s(tmp_path, monkeypatch, caplog, seconds_a_step,
                                                                   lines):
    ticks = itertools.count()  # the clock the progress lines read: each read one step later
    monkeypatch.setattr(train_module, "_clock", lambda: next(ticks) * seconds_a_step, raising=False)
    with caplog.at_level(logging.INFO, logger="models.train"):
        train_module.train(TrainConfig(out=tmp_path / "m.safetensors", heads={"people": ["person"]}, steps=3,
                                       **TINY), progress=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [s.split(" loss")[0] for s in said] == lines
    for line in said:  # steps done/total, the rate and the time left, from the same clock
        rate = 1 / seconds_a_step
        done = int(line.split()[1].split("/")[0])
        assert f" {rate:.2f} steps/s, {(3 - done) * seconds_a_step:.0f} s left" in line


@pytest.mark.parametrize("seconds, said", [(0, "0 s"), (89, "89 s"), (1500, "25 min"), (9000, "2.5 h")])
def test_the_time_left_reads_at_a_glance(seconds, said):
    assert train_module._duration(seconds) == said


def test_an_export_says_when_it_is_done_and_how_long_it_took(tmp_path, caplog):
    """"exporting ... (once; cached at ...)" was followed by 48 s of silence, then whatever came next."""
    with caplog.at_level(logging.INFO, logger="models.export"):
        path = export.cached(tmp_path / "m.onnx", lambda p: shutil.copyfile(__file__, p), "exporting m to ONNX")
        export.cached(path, lambda p: pytest.fail("made again"), "exporting m to ONNX")  # cached: nothing said
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == f"exporting m to ONNX (once; cached at {path})"
    assert len(said) == 2 and re.fullmatch(r"exporting m to ONNX: done in \d+ s", said[1])
