"""Defects an audit left alone, fixed: a checkpoint file replaced under a running service was loaded by a restarted
camera process or replica, whose frames then failed ("publishing failed: IndexError") for ever; `--log-format
json` printed a "--- Logging error ---" traceback for every record once stdout's reader was gone; `hydravision
cameras` waited 10 s per command on a frozen Redis whatever its --timeout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray

from pipeline.cli import main
from running import RunningApp, wait_for

ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(path: Path, vehicles: list[str], input_size: tuple[int, int] = (192, 320)) -> Path:
    """tiny_checkpoint's model (conftest.py), with other vehicle classes or input size."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.hydranet import HydraNet, HydraNetConfig

    cfg = HydraNetConfig(input_size=input_size, backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16},
                         heads={"people": {"classes": ["person"], "score_threshold": 0.05},
                                "vehicles": {"classes": vehicles, "score_threshold": 0.05}})
    torch.manual_seed(0)
    return save_checkpoint(HydraNet(cfg), path)


def test_a_model_that_is_not_the_services_is_refused_naming_the_file_and_what_differs(tmp_path, tiny_checkpoint):
    """What a replica (InferenceActor passes ``expect`` on) or a camera process checks before it loads the model."""
    from workers.inference import InferenceService

    expect = {"input_size": [192, 320], "heads": {"people": ["person"], "vehicles": ["car", "bicycle"]}}
    other = _checkpoint(tmp_path / "other.safetensors", ["car", "bicycle", "bus"], input_size=(160, 288))
    with pytest.raises(ValueError) as refused:
        InferenceService(str(other), device="cpu", backend="torch", expect=expect)
    text = str(refused.value)
    assert str(other) in text and "restart the service" in text
    assert "input size [160, 288], not [192, 320]" in text
    assert "head 'vehicles' has classes ['car', 'bicycle', 'bus'], not ['car', 'bicycle']" in text
    service = InferenceService(str(tiny_checkpoint), device="cpu", backend="torch", expect=expect)  # the same model
    assert service.info()["heads"] == expect["heads"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("in_camera_process", [True, False], ids=["camera-process", "replica"])
def test_a_checkpoint_replaced_under_the_service_is_refused_on_restart_and_said(
        ray_local, redis_server, tiny_checkpoint, tmp_path, in_camera_process):
    """The file replaced by one with another class, then the model's process crashed: Ray restarted it, it loaded
    the new file, and every frame failed "publishing failed: IndexError" (the cameras kept the old class names)
    without a word from the service. Now it refuses the file and the controller says why, naming it."""
    path = Path(shutil.copy(tiny_checkpoint, tmp_path / "model.safetensors"))
    cams = [{"id": "x", "url": "synthetic://street?seed=71&fps=8&size=320x192"}]
    with RunningApp(redis_server.url, path, cams, interval=0.3, in_camera_process=in_camera_process) as run:
        _checkpoint(tmp_path / "new.safetensors", ["car", "bicycle", "bus"]).replace(path)
        ray.kill(run.app.cameras["x"].process if in_camera_process else run.app.inference[0], no_restart=False)
        said = wait_for(lambda: [line for line in run.log if "cannot run: model.checkpoint" in line], 60,
                        "the controller saying the model was refused")
        assert str(path) in said[0] and "head 'vehicles' has classes ['car', 'bicycle', 'bus']" in said[0]
        assert said[0].startswith("camera x" if in_camera_process else "inference replica 0")
        if in_camera_process:  # the camera's own status says it too (Ray's message began with a traceback header)
            wait_for(lambda: run.camera("x").get("last_error", "").startswith(f"model.checkpoint {path}: "), 30,
                     "the status")


_PIPED = textwrap.dedent("""
    import logging, sys
    from pipeline.logs import json_worker_logs, setup_logging
    setup_logging(log_format="json")
    log = logging.getLogger("hydravision")
    log.info("first")
    sys.stdin.readline()  # the reader has closed its end of stdout now
    if sys.argv[1] == "worker":  # a line a Ray worker printed, first: it went through Ray's log thread
        assert json_worker_logs()
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
        global_worker_stdstream_dispatcher.emit({"lines": ["a worker's line"], "pid": 1, "is_err": False})
    for i in range(3):
        log.info("status %d", i)
    print("still running", file=sys.stderr)
""")


@pytest.mark.parametrize("first", ["record", "worker"])
def test_json_logs_go_quiet_once_stdout_is_gone_and_the_service_runs_on(first):
    """`hydravision run --log-format json | head -1`: each record after the reader left printed "--- Logging
    error ---" and a traceback on stderr (a worker's line raised into Ray's log thread). The text format's output
    is dropped quietly there (PipeSafeConsole): so is JSON's now."""
    child = subprocess.Popen([sys.executable, "-c", _PIPED, first], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b'"msg": "first"' in child.stdout.readline()
        child.stdout.close()
        _, err = child.communicate(b"go\n", timeout=60)
    finally:
        child.kill()
    text = err.decode()
    assert child.returncode == 0, text
    assert "still running" in text
    assert "Logging error" not in text and "Traceback" not in text, text


def test_cameras_on_a_frozen_redis_answers_within_its_timeout_naming_the_url(redis_server, capsys):
    """A Redis stopped with SIGSTOP before `hydravision cameras list --timeout 1`: its first command (ACL WHOAMI)
    hung for the client's 10 s socket timeout, as each of TIME, XREVRANGE and XADD would."""
    redis_server.pause()
    try:
        started = time.monotonic()
        rc = main(["cameras", "list", "--timeout", "1", "--redis-url", redis_server.url])
        took = time.monotonic() - started
    finally:
        redis_server.resume()
    assert rc == 2
    assert f"cannot reach Redis at {redis_server.url}" in capsys.readouterr().err
    assert took < 6, f"took {took:.1f} s for --timeout 1"
