"""The controller at its edges: signals during a stop, a camera whose process Ray re-created when the service
stops, a start that fails on the way, `hydravision run`'s arguments. Without Ray, cameras or models: the App with
stand-ins for what it calls (as tests/test_metrics_live_control_edges.py does)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from pipeline.admission import CommandRejected
from pipeline.app import App, CameraHandle
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.errors import UserError
from test_cli_edges import StandInApp  # what `run` calls on the App, with no Ray, model or camera
from workers.settings import CameraConfig

REPO = Path(__file__).resolve().parent.parent
CAMERAS = [{"id": "a", "url": "synthetic://street"}]


def test_a_first_signal_during_a_stop_begun_without_one_still_drains(monkeypatch):
    """Once --duration was over (or every file had ended), shutdown() set the stop flag the signal handler reads
    as "a first signal came": one SIGTERM or Ctrl-C during the drain exited at once (exit 143/130), without the
    flush of Redis, the final stats or --summary-json, and without saying "send it again"."""
    handlers: dict = {}
    exits: list[int] = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.__setitem__(signum, handler))
    monkeypatch.setattr(os, "_exit", exits.append)
    said: list[str] = []
    app = App(parse_config({"cameras": CAMERAS}), say=said.append)
    app.install_signal_handlers()
    app.request_stop()  # what shutdown() does first once the run loop returned on its own
    handlers[signal.SIGTERM](signal.SIGTERM, None)
    assert exits == [] and said and "draining in-flight frames" in said[-1], said
    handlers[signal.SIGINT](signal.SIGINT, None)  # the second one: at once, as documented
    assert exits == [128 + signal.SIGINT]


def test_a_camera_its_restarted_process_never_started_keeps_its_id_in_the_final_stats(monkeypatch):
    """Ray re-created a camera's process (a crash) and the service stopped before the control loop started the
    camera again (or its restart failed): its stop answered {} and the final table showed a row "? ?", the
    summary JSON an entry without a camera."""
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    app = App(parse_config({"cameras": CAMERAS}), say=lambda text: None)
    answers = {"a": {}, "b": {"camera": "b", "state": "stopped", "published": 7}}  # a: CameraHost.stop, never started
    for cid, answer in answers.items():
        process = SimpleNamespace(stop=SimpleNamespace(remote=lambda camera_id, drain=True: answers[camera_id]))
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process,
                                        f"hv-camera-{cid}")
    app.cameras["b"].restarts = 2
    finals = app.shutdown(drain=True)
    assert [(f["camera"], f["state"]) for f in finals] == [("a", "unavailable"), ("b", "stopped")], finals
    assert finals[1]["published"] == 7 and app.cameras["a"].final["camera"] == "a"
    # b's counts are its third process's: the summary says there were two before (it said nothing of them)
    assert [f["restarts"] for f in finals] == [0, 2]


def test_a_start_that_fails_after_binding_the_dashboard_port_lets_it_go(monkeypatch):
    """The dashboard's port is bound before anything starts; a start that failed after that (an unusable Redis
    URL, Ray, a camera) and the shutdown that follows left the socket open, the port taken, for the life of the
    process (the HTTP API's socket was closed in the same case)."""
    monkeypatch.setattr("pipeline.app.Reaper.start", classmethod(lambda cls: SimpleNamespace(release=lambda: None)))
    config = parse_config({"dashboard": {"enabled": True, "port": 0}, "cameras": CAMERAS})
    app = App(config, redis_url="http://127.0.0.1:1/", say=lambda text: None)
    with pytest.raises(UserError, match="Redis URL"):
        app.start()
    sock = app._dashboard_socket
    assert sock is not None and sock.fileno() != -1  # bound by the start
    try:
        app.shutdown(drain=False)
        assert sock.fileno() == -1, "the dashboard's socket is still open after the shutdown"
    finally:
        sock.close()


def test_run_refuses_a_summary_json_that_is_a_directory_before_it_starts(tmp_path: Path, capsys, monkeypatch):
    """--summary-json naming a directory was found only when the summary was written: after the whole run
    (hours with --duration), whose stats were then in no file."""
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    monkeypatch.setattr(StandInApp, "started", False)
    code = main(["run", str(REPO / "configs/demo.yaml"), "--plain", "--summary-json", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: --summary-json {tmp_path}: cannot write: Is a directory" in err, err
    assert not StandInApp.started


def test_an_update_that_reaches_a_camera_ray_restarted_but_the_loop_did_not_yet_is_refused_as_busy(monkeypatch):
    """Ray had re-created the camera's process (a crash) and the control loop had not started the camera again
    yet: the update was answered 422 "camera: RuntimeError: camera cam: update before start" (KeyError "not
    hosted by this process" for a camera that had joined it), a client's mistake not to send again; the loop
    then restarted the camera without the change."""
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    app = App(parse_config({"cameras": CAMERAS}), say=lambda text: None)
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.events = SimpleNamespace(publish_event=lambda message: None)

    def update(camera_id, camera):  # what ray.get raises for CameraHost.update on a host never started
        raise ray.exceptions.RayTaskError("update", "Traceback ...", RuntimeError(f"camera {camera_id}: update "
                                                                                   "before start"))

    process = SimpleNamespace(update=SimpleNamespace(remote=update), stats=SimpleNamespace(
        remote=lambda camera_id: {"camera": camera_id, "state": "created", "pid": 4242}))
    handle = app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"), process,
                                               "hv-camera-cam")
    with pytest.raises(CommandRejected) as refused:
        app.update_camera("cam", {"fps": 5}, by="api:ops")
    assert refused.value.status == 409 and "restarted after a crash" in refused.value.reason, refused.value.reason
    assert handle.config.fps is None and not app._busy
    process.stats = SimpleNamespace(remote=lambda camera_id: {"camera": camera_id, "state": "running"})
    with pytest.raises(CommandRejected) as refused:  # a running camera that refuses the change: as before
        app.update_camera("cam", {"fps": 5}, by="api:ops")
    assert refused.value.status == 422 and "update before start" in refused.value.reason


def test_a_camera_a_command_is_changing_has_not_ended(monkeypatch):
    """An update starting an ended file camera again waits for its old run's end: that end made finished() true,
    and with every other source ended the service stopped while the update was bringing the camera back."""
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    app = App(parse_config({"cameras": CAMERAS}), say=lambda text: None)
    app.cameras["a"] = CameraHandle("a", CameraConfig(id="a", url="synthetic://street"), None, "hv-camera-a")
    app.cameras["a"].done = "ended"
    assert app.finished()
    app._busy.add("a")  # what update_camera holds while it works
    assert not app.finished()


def test_a_service_started_with_no_camera_does_not_end_with_the_file_camera_added_to_it(monkeypatch):
    """Run for its control channels (cameras: [] and the API), it shut down, API and all, as soon as the one file
    camera added to it ended; a service with cameras in its config still ends with its files."""
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    app = App(parse_config({"cameras": [], "api": {"port": 0}}), say=lambda text: None)
    app.cameras["a"] = CameraHandle("a", CameraConfig(id="a", url="synthetic://street"), None, "hv-camera-a")
    app.cameras["a"].done = "ended"
    assert not app.finished()
    configured = App(parse_config({"cameras": CAMERAS}), say=lambda text: None)
    configured.cameras["a"] = app.cameras["a"]
    assert configured.finished()
