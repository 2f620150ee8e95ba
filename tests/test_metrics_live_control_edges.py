"""Edges of live control as the control loop, /readyz and the control channels see them, without Ray: the App
with stand-ins for the stream actors (their calls answered at once), as tests/test_admission.py does."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import ray
import redis

from pipeline.admission import CommandRejected
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from pipeline.metrics import ready
from workers.settings import CameraConfig, RedisConfig


class FakeProbe:
    def check(self):
        return True, None


def service(monkeypatch) -> App:
    """An App whose Ray calls return their argument and whose Redis side effects are no-ops."""
    app = App(parse_config({"api": {"max_cameras": 4}}), say=lambda text: None)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    app._retire_in_redis = lambda camera_id, next_ids: None
    app._let_go = lambda handle, stop=False: False
    app.events = SimpleNamespace(remove_status=lambda camera_id: None, publish_event=lambda message: None)
    return app


def running(app: App, cid: str, stop=None) -> CameraHandle:
    """A running live camera; ``stop``: what its process's stop call does (the drained run ends in it)."""
    process = SimpleNamespace(stop=SimpleNamespace(remote=stop or (lambda camera_id, drain=True: {})))
    # ``done``: process.wait's ref, which ray.wait (above) finds ready, as it is once the stop has drained the run
    handle = CameraHandle(cid, CameraConfig(id=cid, url=f"rtsp://cam/{cid}"), process, f"hv-camera-{cid}",
                          done=f"done-{cid}")
    app.cameras[cid] = handle
    return handle


def test_removing_the_last_camera_is_not_the_end_of_its_source(monkeypatch):
    """The drained run of a camera being removed ends before the stop's answer comes back (its final status,
    a publisher flush: up to 5 s while Redis is down). It was still in ``cameras`` meanwhile, so the control
    loop's finished() took it for a source that had ended, and removing the service's last camera stopped
    the whole service."""
    app = service(monkeypatch)
    seen = []

    def stop(camera_id, drain=True):
        seen.append((app.finished(), list(app.cameras)))
        return {"state": "stopped", "published": 3}

    running(app, "live", stop)
    result = app.remove_camera("live", by="test")
    assert seen == [(False, [])]  # the control loop, ticking while the stop runs, goes on
    assert result["final"]["published"] == 3 and not app.cameras and not app._busy


def test_readyz_stays_ready_while_a_camera_is_being_removed(monkeypatch):
    """A control-loop tick during the removal records the camera's final state, stopped: /readyz answered 503
    (camera not ok) for a camera the operator was removing, until the removal returned."""
    app = service(monkeypatch)
    answers = []

    def stop(camera_id, drain=True):
        app.telemetry.record_cameras([{"camera": "other", "state": "running"}, {"camera": "live", "state": "stopped"}])
        answers.append(ready(app, FakeProbe())[1]["checks"]["cameras"])
        return {"state": "stopped"}

    running(app, "other")
    running(app, "live", stop)
    app.telemetry.record_cameras([{"camera": "other", "state": "running"}, {"camera": "live", "state": "running"}])
    app.remove_camera("live", by="test")
    assert answers[0]["ok"] and list(answers[0]["cameras"]) == ["other"], answers


def test_an_add_refused_because_the_service_began_to_stop_is_logged_like_any_refusal(monkeypatch, caplog):
    """The camera had started when the shutdown began: it was let go and the sender got 503, but no log line
    said so (every other refusal writes ``control: rejected <op> from <by>: <reason>``)."""
    app = service(monkeypatch)
    app.admission = SimpleNamespace(check=lambda cam: cam)
    let_go = []
    app._let_go = lambda handle, stop=False: let_go.append((handle.id, stop))

    def spawn(cams):  # the camera starts; meanwhile a SIGTERM begins the shutdown
        app.request_stop()
        return [CameraHandle(cams[0].id, cams[0], SimpleNamespace(), f"hv-camera-{cams[0].id}")]

    app._spawn = spawn
    with caplog.at_level(logging.WARNING, logger="pipeline.live_control"):
        with pytest.raises(CommandRejected) as refused:
            app.add_camera({"id": "late", "url": "synthetic://street"}, by="api:ops")
    assert (refused.value.status, refused.value.reason) == (503, "the service is shutting down")
    assert let_go == [("late", True)] and not app.cameras and not app._busy
    assert "control: rejected add of camera 'late' from api:ops: the service is shutting down" in caplog.text


class FakeRedis:
    """hget/hset/delete on a dict: what _retire_in_redis reads and writes."""

    def __init__(self, entries: dict) -> None:
        self.entries = dict(entries)

    def hget(self, key: str, field: str):
        return self.entries.get((key, field))

    def hset(self, key: str, field: str, value: str) -> None:
        self.entries[(key, field)] = value.encode()

    def delete(self, *names: str) -> None:
        self.entries = {k: v for k, v in self.entries.items() if k[0] not in names}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("entries", [
    {("hv:cameras", "live"): b'{"state": "running", "track_ids_next": {"people": null}}'},
    {("hv:cameras", "live"): b'"running"'},
    {("hv:track_ids", "live"): b'[3, 9]'},
    {("hv:track_ids", "live"): b'{"people": 1e999}'},
])
def test_a_removal_goes_on_past_track_ids_in_a_shape_it_never_wrote(monkeypatch, entries):
    """An entry edited by hand (a null, a list, a string, an infinite id) raised TypeError, AttributeError or
    OverflowError in the middle of the removal: the answer was an internal error, no camera_removed, its status
    entry stayed, and its process was never let go (killed, or told to forget the camera)."""
    app = service(monkeypatch)
    del app._retire_in_redis  # the real one, on the entries above
    app.redis_settings = RedisConfig(url="redis://127.0.0.1:1/0")
    fake = FakeRedis(entries)
    monkeypatch.setattr(redis.Redis, "from_url", lambda url, **kwargs: fake)
    let_go = []
    app._let_go = lambda handle, stop=False: let_go.append(handle.id)
    running(app, "live", lambda camera_id, drain=True: {"state": "stopped", "track_ids_next": {"people": 5}})
    assert app.remove_camera("live", by="test")["final"]["state"] == "stopped"
    assert let_go == ["live"] and not app.cameras and not app._busy
    assert json.loads(fake.entries[("hv:track_ids", "live")]) == {"people": 5}  # the ids it could read are kept


def test_a_removal_during_a_crash_restart_is_refused_until_the_restart_is_done(monkeypatch):
    """The control loop restarts a camera whose process Ray re-created (its stats say "created"). A removal
    in that window stopped a camera that had not started yet (nothing to stop), the process forgot it, and the
    restart's start went on: the camera ran on in a process shared with others, forgotten by the controller."""
    app = service(monkeypatch)
    refused = []

    def start(camera_id, camera, inference, restart=False):  # the restart, under way: a removal comes in
        try:
            app.remove_camera(camera_id, by="api:ops")
        except CommandRejected as e:
            refused.append((e.status, e.reason))
        return None

    handle = running(app, "cam", lambda camera_id, drain=True: pytest.fail("stopped while it restarted"))
    handle.process.start = SimpleNamespace(remote=start)
    handle.process.wait = SimpleNamespace(remote=lambda camera_id: f"done-{camera_id}")
    handle.process.stats = SimpleNamespace(remote=lambda camera_id: {"camera": camera_id, "state": "running",
                                                                     "pid": 4242})
    handle.process.stats_many = SimpleNamespace(remote=lambda ids, model: {
        "cameras": {cid: {"camera": cid, "state": "created", "pid": 4242} for cid in ids}, "model": None})
    app._report_restart = lambda *args, **kwargs: None
    app.events.stats = lambda: {}
    stats = app.stats()
    assert refused == [(409, "camera.id: camera 'cam' is being changed by another command (or restarted after "
                             "a crash)")]
    assert stats[0]["state"] == "running" and list(app.cameras) == ["cam"] and not app._busy
    handle.process.stop = SimpleNamespace(remote=lambda camera_id, drain=True: {"state": "stopped"})
    assert app.remove_camera("cam", by="api:ops")["final"]["state"] == "stopped"  # once the restart is done


def test_an_update_that_timed_out_does_not_say_nothing_changed(monkeypatch):
    """The update call still waited in the camera's process and could apply later; the answer said the actor
    did not answer, read as "nothing was changed"."""
    app = service(monkeypatch)
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    handle = running(app, "cam")

    def late(camera_id, camera):
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")

    handle.process.update = SimpleNamespace(remote=late)
    with pytest.raises(CommandRejected) as refused:
        app.update_camera("cam", {"fps": 5}, by="api:ops")
    assert refused.value.status == 503 and "the change may still apply" in refused.value.reason
    assert handle.config.fps is None and not app._busy
