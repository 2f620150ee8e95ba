"""Defects an operator found when a camera's node, or the Ray head, died under a joined `hydravision run` (round 16)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

import pipeline.app as app_module
from pipeline import run_commands
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig, RedisConfig
from workers.stream import publisher_for

REPO = Path(__file__).resolve().parent.parent

# what the camera's last status said before its node died: two tracks open, 129 frames published over its run
OPEN = {"people": [[7, "person", 100, 128, 20, 2.8], [9, "person", 120, 128, 9, 0.8]], "vehicles": [[3, "car", 90,
                                                                                                        127, 30, 3.7]]}
LAST_STATUS = {"state": "running", "published": 129, "tracks_open": OPEN, "track_ids_next": {"people": 10}}


class NodeDied(ray.exceptions.RayActorError):
    def __str__(self) -> str:
        return "The actor died because its node died"


def _app(redis_server, monkeypatch, stop) -> App:
    """An App whose one camera, "cam", answers its stop with ``stop(camera_id)`` (or raises from it)."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="loss16-controller").start()
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref() if callable(ref) else ref)
    app._let_go = lambda handle, stop=False: False
    process = SimpleNamespace(stop=SimpleNamespace(remote=lambda camera_id, drain=True: lambda: stop(camera_id)))
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"), process,
                                      "hv-camera-cam", done="done-cam")
    redis_server.client().hset("hv:cameras", "cam", json.dumps(LAST_STATUS))
    return app


def _events(redis_server) -> list[dict]:
    return [json.loads(f[b"data"]) for _, f in redis_server.client().xrange("hv:events")]


def _died(camera_id: str) -> dict:
    raise NodeDied()


@pytest.mark.parametrize("stop", [_died, lambda camera_id: {}], ids=["its-process-died", "ray-re-created-it"])
@pytest.mark.parametrize("ticked", [True, False], ids=["seen-by-a-tick", "no-tick-yet"])
def test_a_camera_whose_process_died_ends_its_open_tracks_and_says_what_it_published_at_removal(
        redis_server, monkeypatch, stop, ticked):
    """Removed after its node died, a camera's stop failed (or, Ray having re-created its process, answered {}):
    the answer said "published": null, "open_tracks": null, camera_removed said "published": 0 where the status line
    had shown pub 129, and its status, which named the tracks it had open, was deleted with no track_ended for them
    (76 started, 66 ended). Now those tracks end (reason restart) before the status goes, and the count published is
    the whole run's: the telemetry's where a tick saw the camera, its last status's where none did."""
    app = _app(redis_server, monkeypatch, stop)
    if ticked:  # the last tick's stats before the node died (126: the status, written since, says 129)
        app.telemetry.record_cameras([{"camera": "cam", "state": "running", "decoded": 130, "published": 126,
                                       "pid": 4242}], present=["cam"])
    try:
        answer = app.remove_camera("cam", by="test")
        assert app.events.flush(10.0)
        events = _events(redis_server)
        assert redis_server.client().hget("hv:cameras", "cam") is None
    finally:
        app.events.close(2.0)
    ended = [(e["head"], e["track_id"], e["reason"]) for e in events if e["type"] == "track_ended"]
    assert sorted(ended) == [("people", 7, "restart"), ("people", 9, "restart"), ("vehicles", 3, "restart")]
    assert [e["type"] for e in events][-1] == "camera_removed"  # after the tracks' ends
    published = 126 if ticked else 129
    assert events[-1]["published"] == published
    assert answer["final"]["state"] == "unavailable" and answer["final"]["published"] == published
    assert app.removed[-1]["published"] == published  # its row in the final table


def test_a_drained_removal_ends_no_track_from_its_status(redis_server, monkeypatch):
    """A camera whose stop drained ended its tracks itself (and its final status names none open): an older status
    still naming some (its final one not written yet) ends nothing more; the count is its final stats'."""
    app = _app(redis_server, monkeypatch, lambda camera_id: {"state": "stopped", "published": 131, "open_tracks": 0,
                                                            "decoded": 131})
    try:
        answer = app.remove_camera("cam", by="test")
        assert app.events.flush(10.0)
        events = _events(redis_server)
    finally:
        app.events.close(2.0)
    assert [(e["type"], e.get("published")) for e in events] == [("camera_removed", 131)]
    assert answer["final"]["published"] == 131 and answer["final"]["open_tracks"] == 0


# -- 2. the Ray head (GCS) lost while `hydravision run` is attached ------------------------------------------------

def test_rays_limit_on_a_silent_gcs_is_read_as_ray_resolves_it():
    """The cluster's system config first (the head's --system-config), then $RAY_..., then Ray's default 60 s."""
    env = {"RAY_gcs_rpc_server_reconnect_timeout_s": "90"}
    assert app_module.gcs_limit_s({}, {}) == 60.0
    assert app_module.gcs_limit_s({}, env) == 90.0
    assert app_module.gcs_limit_s({"gcs_rpc_server_reconnect_timeout_s": 30}, env) == 30.0
    assert app_module.gcs_limit_s({"gcs_rpc_server_reconnect_timeout_s": "x"}, {"RAY_gcs_rpc_server_reconnect_"
                                                                                 "timeout_s": "-1"}) == 60.0


@pytest.mark.parametrize("limit, after", [(60.0, 25.0), (30.0, 12.0), (600.0, 565.0)])
def test_the_head_is_lost_well_before_ray_ends_the_process(limit, after):
    """Decided with time left for the stop (HEAD_STOP_S of Ray's limit, at most 60 % of it), and not sooner: a GCS
    that restarts (fault tolerance) comes back within Ray's limit."""
    assert app_module.head_lost_after_s(limit) == after
    assert not app_module.head_lost(silent_since=100.0, now=100.0 + after - 0.5, limit_s=limit)
    assert app_module.head_lost(silent_since=100.0, now=100.0 + after, limit_s=limit)


class Process:
    """A camera's StreamActor: its stats, and its stop's answer (or the error of a process gone with the head)."""

    def __init__(self, row: dict, final: dict | Exception):
        self.row, self.final = row, final
        self.stats_many = SimpleNamespace(remote=lambda ids, model=False: {
            "cameras": {cid: dict(self.row) for cid in ids}, "model": None})
        self.stop = SimpleNamespace(remote=lambda camera_id, drain=True: self._stop)

    def _stop(self) -> dict:
        if isinstance(self.final, Exception):
            raise self.final
        return dict(self.final)


def _service_losing_its_head(monkeypatch, waits: list) -> App:
    """A service on a cluster (stand-ins for Ray) whose head stops answering: cam-a ran on the head's node (gone
    with it), cam-b on a node that is left (its process still answers, directly)."""
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref() if callable(ref) else ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)
    monkeypatch.setattr(app_module, "_wait_all", lambda refs, timeout: waits.append(timeout))
    said: list[str] = []
    app = App(parse_config({"cameras": []}), say=said.append)
    app.said = said
    app.events = SimpleNamespace(publish_event=lambda message: None, remove_status=lambda camera_id: None,
                                 stats=lambda: {}, close=lambda timeout: None)
    app._retire_in_redis = lambda camera_id, next_ids, quiet=False: True
    running = {"state": "running", "decoded": 140, "skipped": 0, "dropped": {}, "pid": 7}
    for cid, published, final in (("cam-a", 129, NodeDied()),
                                  ("cam-b", 131, {"camera": "cam-b", "state": "stopped", "decoded": 150,
                                                  "published": 140, "skipped": 0, "dropped": {}, "pid": 7})):
        process = Process({**running, "camera": cid, "published": published}, final)
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process, f"hv-{cid}")
    now = [500.0]
    app.head_watch = app_module.HeadWatch(lambda timeout: None, limit_s=60.0, clock=lambda: now[0])
    app.head_watch.lost_for = 26.0  # the GCS unanswered for 26 s, confirmed (not started: no thread)
    return app


def test_a_run_whose_ray_head_is_lost_stops_with_the_last_status_before_ray_ends_it(monkeypatch):
    """The GCS killed under a joined run: Ray ended the process 60 s later (exit 1, no final table, no summary) and
    the service said only once that the node list did not answer; /readyz stayed 200. Now the control loop's tick
    after the watch's limit says the head is lost and stops as on a signal (/readyz: stopping), the cameras' drain
    bounded to what Ray's limit leaves, the one gone with the head has the last tick's counts, marked as such."""
    waits: list = []
    app = _service_losing_its_head(monkeypatch, waits)
    ticks: list = []
    app.run(duration=5.0, on_tick=ticks.append, interval=0.01)  # the duration: only a watch that never acts waits it
    assert len(ticks) == 1 and app.head_lost == 26.0 and app.stopping
    assert any("head (GCS) has not answered for 26 s" in line for line in app.said), app.said
    finals = {f["camera"]: f for f in app.shutdown(drain=True)}
    assert waits and max(waits) <= app_module.HEAD_LOST_DRAIN_S
    assert finals["cam-a"]["as_of"] == "last status" and finals["cam-a"]["published"] == 129
    assert "the Ray head lost" in finals["cam-a"]["last_error"]
    assert finals["cam-b"]["state"] == "stopped" and finals["cam-b"]["published"] == 140 and "as_of" not in finals[
        "cam-b"]


def test_run_writes_the_final_table_and_summary_and_exits_4_when_the_ray_head_is_lost(monkeypatch, tmp_path,
                                                                                        capsys):
    """`hydravision run`'s end: the table and --summary-json as at any stop, and the documented exit 4 (README),
    not 1 ("every camera failed", or a bug) as Ray's own end of the process gave."""
    app = _service_losing_its_head(monkeypatch, [])
    app.start = lambda: None
    monkeypatch.setattr(run_commands, "App", lambda config, **kwargs: app)
    summary = tmp_path / "summary.json"
    args = argparse.Namespace(config=str(REPO / "configs/demo.yaml"), summary_json=str(summary), redis_url=None,
                              plain=True, duration=5.0, log_every=0.0, log_format="text", verbose=False)
    assert run_commands.run(args) == run_commands.HEAD_LOST_EXIT == 4
    rows = {r["camera"]: r for r in json.loads(summary.read_text())}
    assert rows["cam-a"]["as_of"] == "last status" and rows["cam-a"]["published"] == 129
    assert rows["cam-b"]["published"] == 140
    assert "cam-a" in capsys.readouterr().out
