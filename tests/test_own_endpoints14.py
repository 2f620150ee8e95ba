"""The service's own endpoints that a camera added at run time may not point at: its dashboard too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

import test_app_edges10 as app_edges
from pipeline.admission import Admission, CommandRejected
from pipeline.app import App
from pipeline.config import ApiConfig, parse_config
from workers.settings import CameraConfig

clock = app_edges.clock  # the fixture: Ray's waits move a clock of the test's own
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens: the dashboard starts all the same and says Redis is down


def test_a_camera_added_at_run_time_may_not_read_the_services_own_dashboard():
    """The HTTP API, Redis and Ray's GCS were forbidden to cameras from a control channel, the dashboard (its
    pictures, its state and, with allow_control, its command routes) was not: an http camera could read it."""
    app = App(parse_config({"dashboard": {"enabled": True, "port": 0}, "cameras": []}), say=lambda text: None)
    app.admission = Admission(ApiConfig(), {"people": ["person"]}, {})
    app.start_dashboard(NOWHERE)
    try:
        port = app.dashboard.port
        with pytest.raises(CommandRejected, match="own dashboard"):
            app.admission.check(CameraConfig(id="x", url=f"http://localhost:{port}/api/state"))
    finally:
        app.dashboard.stop()


@pytest.mark.parametrize("dead", [ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, "waiting"])
def test_a_dead_replicas_gauges_go_a_slow_ones_stay(clock, dead):
    """A replica whose process died kept its last queue depth and batch limit in /metrics until a new process
    answered (for ever if none did): a dashboard read a queue that was not there. Ray restarts a replica
    (max_restarts=-1): a call to it raises ActorDiedError or, while it restarts, ActorUnavailableError; one that a
    lost node left waiting for a node only times out, and NodeWatch knows it waits. One that only did not answer in
    time (busy, a long batch) keeps its gauges; their counters stay in every case."""
    app = app_edges.service([], app_edges.Process("running"), "")
    stats = {"pid": 7, "batches": 3, "frames": 9, "queue_depth": 5, "batch_limit": 8}
    answers = {0: stats, 1: stats}
    app.inference = [SimpleNamespace(model_stats=SimpleNamespace(remote=lambda i=i: answers[i])) for i in (0, 1)]
    app.inference_pids = [7, 7]
    app._check_inference()
    if dead == "waiting":
        app.node_watch = SimpleNamespace(waiting={("inference", 0): "resource hydravision_inference=1"})
        answers[0] = app_edges.Pending()
    else:
        answers[0] = dead("its process is restarting", None) if dead is ray.exceptions.ActorUnavailableError else dead()
    answers[1] = app_edges.Pending()  # slow: no answer within the tick's wait
    app._check_inference()
    replicas = app.telemetry.snapshot().replicas
    assert replicas[0].stats == {} and not replicas[0].answering
    assert replicas[1].stats["queue_depth"] == 5 and not replicas[1].answering
    assert replicas[0].counters.value("frames") == 9  # what it counted stays


def test_a_camera_process_left_waiting_for_a_node_loses_its_models_gauges(clock):
    """Model in the camera processes: a process a lost node left waiting for a node only times out (its cameras'
    stats_many answers are GetTimeoutErrors), and its model's queue depth read on; NodeWatch knows its cameras
    wait (the review of the first fix, which covered the replicas only)."""
    app = app_edges.service([], app_edges.Process("running"), "a")
    app.placement = SimpleNamespace(in_camera_process=True)
    name = app.cameras["a"].name
    app.telemetry.record_inference(name, {"pid": 7, "batches": 3, "frames": 9, "queue_depth": 5, "batch_limit": 8})
    app.node_watch = SimpleNamespace(waiting={("camera", "a"): "label site=z"})
    app._check_inference({name: ray.exceptions.GetTimeoutError("Get timed out")})
    assert app.telemetry.snapshot().replicas[name].stats == {}
    app.node_watch.waiting.clear()  # slow, not waiting: its gauges stay
    app.telemetry.record_inference(name, {"pid": 7, "queue_depth": 5})
    app._check_inference({name: ray.exceptions.GetTimeoutError("Get timed out")})
    assert app.telemetry.snapshot().replicas[name].stats["queue_depth"] == 5
