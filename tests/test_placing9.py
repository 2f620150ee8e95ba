"""Live control where it waits on Ray (place9): adds queued behind one whose actor creation waits on a slow or gone
Ray GCS, an update's late answer during a shutdown, a refused constructor said again for a camera added again.
Without Ray, cameras or models: the App with stand-ins for what it calls (tests/test_controller_edges3.py's)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import ray

from pipeline import app as app_module
from pipeline import cluster
from pipeline import live_control
from pipeline.admission import CommandRejected
from pipeline.app import CameraHandle
from running import wait_for
from test_controller_edges3 import Names, Process, answer, fake_ray, service  # noqa: F401 (fake_ray: a fixture)
from workers.settings import CameraConfig


def gcs_hangs_for(monkeypatch, names: Names, camera_id: str) -> tuple[threading.Event, threading.Event]:
    """Creating the process of ``camera_id`` waits (a named actor's creation waits on Ray's GCS, with no timeout)
    until the test sets the second event; the first says it began."""
    waiting, answered = threading.Event(), threading.Event()
    spawn = names.placement.spawn

    def slow_spawn(actor_class, options, *args):
        if options["name"] == cluster.camera_actor_name(camera_id):
            waiting.set()
            answered.wait(30)
        return spawn(actor_class, options, *args)

    names.placement.spawn = slow_spawn
    return waiting, answered


def add_in_thread(app, camera_id: str) -> tuple[threading.Thread, list]:
    out: list = []

    def add() -> None:
        try:
            out.append(app.add_camera({"id": camera_id, "url": "synthetic://street"}, by="api:ops"))
        except CommandRejected as e:
            out.append(e)

    thread = threading.Thread(target=add, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.timeout(60)
def test_an_add_queued_behind_one_waiting_on_the_ray_gcs_fails_in_its_budget_naming_its_camera(monkeypatch,
                                                                                            fake_ray):
    """Camera a's add created its process while Ray's GCS did not answer (one add at a time places, App._placing):
    camera b's add waited for a's with no end, and so did every add after it, with nothing said."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    monkeypatch.setattr(app_module, "start_budget_s", lambda cameras: 1)  # the test's budget: 1 s
    waiting, answered = gcs_hangs_for(monkeypatch, names, "a")
    first, _ = add_in_thread(app, "a")
    try:
        assert waiting.wait(20), "a's add never created its process"
        second, out = add_in_thread(app, "b")
        second.join(10)
        assert not second.is_alive(), "b's add still waits for a's"
    finally:
        answered.set()
        first.join(20)
    [refused] = out
    assert isinstance(refused, CommandRejected) and refused.status == 503, out
    assert "camera b" in refused.reason and "not placed within 1 s" in refused.reason, refused.reason
    assert "b" not in names.held and "b" not in app._joins and "b" not in app._busy
    app.add_camera({"id": "b", "url": "synthetic://street"}, by="api:ops")  # and adds go on once Ray answers
    assert sorted(app.cameras) == ["a", "b"]


@pytest.mark.timeout(60)
def test_an_add_queued_behind_one_waiting_on_the_ray_gcs_ends_when_the_service_shuts_down(monkeypatch, fake_ray):
    """SIGTERM while b's add waited for a's placing: the shutdown waits a few seconds for commands under way and
    then stops Ray, while b's add, still queued, went on to create its process after that (a Ray call after the
    shutdown starts a new local Ray). A shutdown ends the wait at once."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    waiting, answered = gcs_hangs_for(monkeypatch, names, "a")
    first, _ = add_in_thread(app, "a")
    try:
        assert waiting.wait(20), "a's add never created its process"
        second, out = add_in_thread(app, "b")
        wait_for(lambda: "b" in app._busy, 20, "b's add to have claimed its camera", poll=0.02)
        app.request_stop()
        second.join(10)
        assert not second.is_alive(), "b's add still waits for a's after the shutdown began"
    finally:
        answered.set()
        first.join(20)
    [refused] = out
    assert isinstance(refused, CommandRejected) and refused.status == 503, out
    assert "shutting down" in refused.reason, refused.reason
    assert cluster.camera_actor_name("b") not in names.held and "b" not in app._busy


@pytest.mark.timeout(60)
def test_a_late_update_waiting_for_its_answer_lets_the_shutdown_stop_ray_at_once(monkeypatch):
    """An update timed out and a thread waited for its late answer, one ray.get of up to 30 s: a shutdown meanwhile
    waited its 5 s of grace for the camera's claim, stopped Ray with the thread still waiting, and the answer, when
    it came, was acted on with Ray calls after Ray had stopped (each starts a new local Ray). The thread waits in
    short steps and lets go of the camera as soon as the shutdown begins."""
    app = service(monkeypatch)
    app.events.close = lambda timeout=5.0: None
    app.started_ray = True
    answered = threading.Event()
    ray_calls_after_stop: list[str] = []
    at_ray_stop: list[set] = []
    monkeypatch.setattr(cluster, "shutdown_ray", lambda: at_ray_stop.append(set(app._busy)))

    def get(ref, timeout=None):
        if ref == "update":  # the actor answers only once the test says so: the update's own call times out at
            # once (its 30 s), the late update's waits as long as they ask
            get.calls += 1
            if not answered.wait(min(timeout, 20) if get.calls > 1 else 0):
                raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready")
            return {"changed": ["url"], "restarted": True}
        return answer(ref)

    get.calls = 0
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: actor.killed.set())
    process = Process("hv-camera-lobby")
    process.update = SimpleNamespace(remote=lambda camera_id, camera: "update")

    def wait(camera_id):
        if at_ray_stop:
            ray_calls_after_stop.append(f"wait({camera_id})")
        return f"done-{camera_id}"

    process.wait = SimpleNamespace(remote=wait)
    app.cameras["lobby"] = CameraHandle("lobby", CameraConfig(id="lobby", url="synthetic://street"), process,
                                        process.name)
    with pytest.raises(CommandRejected, match="may still apply"):
        app.update_camera("lobby", {"url": "synthetic://street?seed=2"}, by="api:ops")
    assert app._busy == {"lobby"}  # the late update's thread holds it
    try:
        app.shutdown(timeout=2.0)
    finally:
        answered.set()  # the actor's late answer, after the shutdown
    wait_for(lambda: not any(t.name == "late-update-lobby" for t in threading.enumerate()), 20,
             "the late update's thread to end")
    assert ray_calls_after_stop == [], ray_calls_after_stop
    assert at_ray_stop == [set()], "Ray was stopped while the late update still held its camera"
    assert app.cameras["lobby"].config.url == "synthetic://street"  # not applied: the service stopped first


def test_an_update_that_answers_late_within_the_wait_still_applies(monkeypatch):
    """The late update's short waits still take an answer that comes after several of them."""
    app = service(monkeypatch)
    tries: list[float] = []

    def get(ref, timeout=None):
        if ref == "update":
            tries.append(timeout)
            if len(tries) < 4:  # the first call's timeout, then two of the late thread's waits
                raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready")
            return {"changed": ["fps"], "restarted": False}
        return answer(ref)

    monkeypatch.setattr(ray, "get", get)
    process = Process("hv-camera-lobby")
    process.update = SimpleNamespace(remote=lambda camera_id, camera: "update")
    app.cameras["lobby"] = CameraHandle("lobby", CameraConfig(id="lobby", url="synthetic://street", fps=2), process,
                                        process.name)
    with pytest.raises(CommandRejected, match="may still apply"):
        app.update_camera("lobby", {"fps": 3}, by="api:ops")
    wait_for(lambda: not app._busy, 20, "the camera's claim to go with the late answer", poll=0.02)
    assert app.cameras["lobby"].config.fps == 3
    assert [e["type"] for e in app.events.published] == ["camera_updated"]
    assert tries[0] == live_control.STOP_TIMEOUT_S and max(tries[1:]) < live_control.STOP_TIMEOUT_S, tries


class Refused(Exception):
    """Ray's error for an actor whose constructor raised ValueError (what refused_setting reads)."""
    actor_init_failed = True


def test_a_camera_added_again_whose_process_refuses_to_run_again_is_said_again(monkeypatch, fake_ray):
    """The first time a camera's process died of a refused setting the operator was told ("camera lobby cannot
    run: ..."); removed, added again under the same id, and dead of it again, nothing more was said: the camera
    showed "unavailable" with no reason on the console."""
    said: list[str] = []
    app = service(monkeypatch, said)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    refused = Refused("ray.exceptions.ActorDiedError: ...\nValueError: model.checkpoint: its heads changed")

    def dead(process: Process) -> None:
        process.stats_many = SimpleNamespace(remote=lambda ids, model: refused)
        process.stop = SimpleNamespace(remote=lambda camera_id, drain=True: refused)

    app.add_camera({"id": "lobby", "url": "synthetic://street"}, by="api:ops")
    dead(app.cameras["lobby"].process)
    app.stats()
    app.stats()  # said once, not at every tick
    assert sum("camera lobby cannot run" in line for line in said) == 1, said
    app.remove_camera("lobby", by="api:ops")
    app.add_camera({"id": "lobby", "url": "synthetic://street"}, by="api:ops")
    dead(app.cameras["lobby"].process)
    app.stats()
    app.stats()
    assert sum("camera lobby cannot run" in line for line in said) == 2, said


def test_a_camera_process_between_its_last_cameras_removal_and_a_join_keeps_its_model_counts(monkeypatch,
                                                                                              fake_ray):
    """Model in the camera processes: process P's only camera was being removed while a camera added at run time
    joined P, and a status tick came between the two. P was in neither the running set nor kept, so its counts went
    into the sums over models; back with the new camera, its whole count was counted a second time on /metrics."""
    app = service(monkeypatch)
    app.placement = SimpleNamespace(in_camera_process=True)
    process = Process("hv-camera-a")
    process.model_stats = SimpleNamespace(remote=lambda: {"pid": 4242, "batches": 10, "frames": 30})
    app.telemetry.record_inference("hv-camera-a", {"pid": 4242, "batches": 10, "frames": 30})
    cam = CameraConfig(id="b", url="synthetic://street")
    app._leaving["a"] = CameraHandle("a", CameraConfig(id="a", url="synthetic://street"), process, "hv-camera-a")
    app._joins["b"] = CameraHandle("b", cam, process, "hv-camera-a", joined=True)
    app._check_inference()  # the tick between the two: no camera in the running set
    del app._leaving["a"], app._joins["b"]
    app.cameras["b"] = CameraHandle("b", cam, process, "hv-camera-a", joined=True)
    app._check_inference()
    snap = app.telemetry.snapshot()
    assert "hv-camera-a" in snap.replicas and not snap.retired.keys()


def test_a_refused_command_names_its_camera_in_the_log(monkeypatch, fake_ray, caplog):
    """The refusal's reason starts with the field at fault ("camera.id: no camera ..."): which camera an operator's
    remove or a script's update was about was in no log line."""
    import logging

    app = service(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.live_control"):
        for call in (lambda: app.remove_camera("ghost", by="api:ops"),
                     lambda: app.update_camera("ghost", {"fps": 5}, by="redis:ops"),
                     lambda: app.add_camera({"id": "bad", "url": "ftp://x"}, by="api:ops")):
            with pytest.raises(CommandRejected):
                call()
    assert "rejected remove of camera 'ghost' from api:ops: " in caplog.text
    assert "rejected update of camera 'ghost' from redis:ops: " in caplog.text
    assert "rejected add of camera 'bad' from api:ops: camera.url" in caplog.text
