"""Live control when commands overlap (add8): adds at once placed as adds one after another are, a process whose
creating add failed while another add had joined it, an update that timed out and answers late, a shutdown that
stops Ray while an add is still undoing its camera. Without Ray, cameras or models: the App with stand-ins for
what it calls (tests/test_controller_edges3.py's)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import ray

from pipeline import cluster
from pipeline import live_control
from pipeline.admission import CommandRejected
from pipeline.app import CameraHandle
from running import wait_for
from test_controller_edges3 import Names, Process, answer, service
from workers.settings import CameraConfig


class Starting:
    """The ref of a camera's start: ``ray.get`` of it is the test's to answer (see ``starts``)."""

    def __init__(self, camera_id: str) -> None:
        self.camera_id = camera_id


def starts(monkeypatch, names: Names, get_start) -> tuple[list[Process], list[str]]:
    """Every process spawned from now answers its starts with a ``Starting``, which ``ray.get`` hands to
    ``get_start``; returns the processes spawned and the cameras whose start was sent, in order."""
    spawned: list[Process] = []
    sent: list[str] = []
    spawn = names.placement.spawn

    def start(camera_id, camera=None, inference=None):
        sent.append(camera_id)
        return Starting(camera_id)

    def spawn_starting(actor_class, options, *args):
        process = spawn(actor_class, options, *args)
        process.start = SimpleNamespace(remote=start)
        spawned.append(process)
        return process

    names.placement.spawn = spawn_starting
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: get_start(ref.camera_id)
                        if isinstance(ref, Starting) else answer(ref))
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    return spawned, sent


def adding(app, cid: str, out: dict[str, object]) -> threading.Thread:
    """A thread (not started) that adds camera ``cid``, as an HTTP request or a control-stream command does; its
    answer or refusal goes to ``out[cid]``."""
    def add() -> None:
        try:
            out[cid] = app.add_camera({"id": cid, "url": "synthetic://street"}, by="api:ops")
        except CommandRejected as e:
            out[cid] = e

    return threading.Thread(target=add, daemon=True)


def add_at_once(app, ids: str, sent: list[str] | None = None) -> dict[str, object]:
    """Adds the cameras ``ids`` from a thread each, as HTTP requests and control-stream commands come in; each
    one's answer or refusal. With ``sent`` (of ``starts``), each add begins once the one before sent its start."""
    out: dict[str, object] = {}
    threads = [adding(app, cid, out) for cid in ids]
    for i, thread in enumerate(threads):
        if sent is not None and i:
            wait_for(lambda: ids[i - 1] in sent, 20, f"camera {ids[i - 1]}'s start", poll=0.02)
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "an add never returned"
    return out


def test_adds_at_once_start_no_more_processes_than_the_same_adds_one_after_another(monkeypatch):
    """Four cameras added at once on 2 cores (cameras_per_process unset): each add counted only the cameras
    already running (none), and a process being created was not joinable, so each started a process of its own
    (4, each a Python, Ray's overhead and, with the model in the camera processes, a model), where the same adds
    one after another started 2."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement

    def get_start(camera_id: str) -> None:  # every start waits until all four adds have placed their camera
        wait_for(lambda: len(sent) == 4, 20, "all four adds to have placed their camera", poll=0.02)

    spawned, sent = starts(monkeypatch, names, get_start)
    out = add_at_once(app, "abcd")
    assert all(isinstance(answer, dict) for answer in out.values()), out
    assert len(spawned) == 2, [p.name for p in spawned]
    hosted = sorted(sorted(cid for cid, h in app.cameras.items() if h.process is p) for p in spawned)
    assert [len(cids) for cids in hosted] == [2, 2], hosted
    assert sorted(app.cameras) == list("abcd") and not app._joins and not app._busy


def test_a_process_whose_creating_add_failed_runs_on_for_the_camera_that_joined_it(monkeypatch):
    """b joined the process a's add was creating; then a's start timed out: a's add is refused, and its process
    forgets a instead of being killed under b, which runs on there."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement

    def get_start(camera_id: str) -> None:
        wait_for(lambda: len(sent) == 2, 20, "both adds to have placed their camera", poll=0.02)
        if camera_id == "a":
            wait_for(lambda: "b" in app.cameras, 20, "b to have started", poll=0.02)
            raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready")

    spawned, sent = starts(monkeypatch, names, get_start)
    app.config.ray.cameras_per_process = 2
    out = add_at_once(app, "ab", sent)  # a's add creates the process, b's joins it
    assert isinstance(out["a"], CommandRejected) and out["a"].status == 503, out
    assert isinstance(out["b"], dict), out
    assert len(spawned) == 1, [p.name for p in spawned]  # b joined a's process
    [process] = spawned
    assert list(app.cameras) == ["b"] and app.cameras["b"].process is process and app.cameras["b"].joined
    assert not process.killed.is_set() and process.forgot == ["a"]
    assert not app._joins and not app._busy


def test_a_process_whose_adds_all_failed_is_killed(monkeypatch):
    """a's add created a process, b's joined it, and both starts failed: the last of the two to let go kills it
    (none is left running for nobody), and neither camera stays counted as joining."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    both = threading.Barrier(2)

    def get_start(camera_id: str) -> None:
        both.wait(20)  # both placed and waiting: they fail together
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready")

    spawned, _ = starts(monkeypatch, names, get_start)
    app.config.ray.cameras_per_process = 2
    out = add_at_once(app, "ab")
    assert all(isinstance(e, CommandRejected) and e.status == 503 for e in out.values()), out
    assert len(spawned) == 1, [p.name for p in spawned]  # one joined the other's process
    [process] = spawned
    assert process.killed.is_set() and not names.held
    assert not app.cameras and not app._joins and not app._busy


def test_an_update_that_timed_out_keeps_its_camera_claimed_until_it_answers(monkeypatch):
    """An update whose actor did not answer in time was refused "may still apply" and released the camera: the
    next command went to the actor while the first could still apply there, and when it did, the service kept the
    old settings (list and export showed them; no audit event). The camera stays claimed until the late answer,
    which puts the new settings in place and is audited."""
    app = service(monkeypatch)
    late = threading.Event()
    calls: list[int] = []

    def update(camera_id, camera):
        calls.append(camera.fps)
        return ("update", len(calls))

    def get(ref, timeout=None):
        if ref == ("update", 1):  # the first update: no answer in time, then a late one
            if timeout == live_control.STOP_TIMEOUT_S and not late.is_set() and len(calls) == 1 and not get.timed_out:
                get.timed_out = True
                raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready")
            late.wait(20)
            return {"changed": ["fps"], "restarted": False}
        if isinstance(ref, tuple) and ref[0] == "update":
            return {"changed": ["fps"], "restarted": False}
        return answer(ref)

    get.timed_out = False
    monkeypatch.setattr(ray, "get", get)
    process = Process("hv-camera-lobby")
    process.update = SimpleNamespace(remote=update)
    app.cameras["lobby"] = CameraHandle("lobby", CameraConfig(id="lobby", url="synthetic://street", fps=2), process,
                                        process.name)
    with pytest.raises(CommandRejected, match="may still apply") as timed_out:
        app.update_camera("lobby", {"fps": 3}, by="api:ops")
    assert timed_out.value.status == 503
    try:
        with pytest.raises(CommandRejected, match="being changed by another command") as busy:
            app.update_camera("lobby", {"fps": 5}, by="redis:auto")
        assert busy.value.status == 409 and calls == [3]
        assert app.list_cameras()[0]["fps"] == 2  # not applied yet, as far as anyone knows
    finally:
        late.set()
    wait_for(lambda: not app._busy, 20, "the camera's claim to go with the late answer")
    assert app.cameras["lobby"].config.fps == 3 and app.list_cameras()[0]["fps"] == 3
    assert [(e["type"], e["by"]) for e in app.events.published] == [("camera_updated", "api:ops")]
    app.update_camera("lobby", {"fps": 5}, by="redis:auto")  # and the camera takes commands again
    assert calls == [3, 5] and app.cameras["lobby"].config.fps == 5


def test_a_shutdown_stops_ray_only_after_an_add_under_way_has_undone_its_camera(monkeypatch):
    """SIGTERM while an add waited for its camera's process (seconds on a busy machine): the shutdown stopped Ray,
    then the add, undoing its camera, called ray.kill, which started a NEW local Ray (Ray's calls call ray.init when
    Ray is not running) that stayed up with the program. The shutdown waits a few seconds for commands under way."""
    app = service(monkeypatch)
    app.events.close = lambda timeout=5.0: None
    app.started_ray = True
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    ray_down = threading.Event()
    after_ray: list[str] = []
    monkeypatch.setattr(cluster, "shutdown_ray", ray_down.set)
    kill = ray.kill

    def watched_kill(actor, no_restart=True):
        if ray_down.is_set():
            after_ray.append(f"ray.kill({actor.name})")
        kill(actor, no_restart)

    monkeypatch.setattr(ray, "kill", watched_kill)
    add_waits = threading.Event()

    def get_start(camera_id: str) -> None:  # its process starts once the shutdown has begun
        add_waits.set()
        app._stop.wait(20)
        ray_down.wait(1.5)  # or as soon as Ray is stopped, whichever comes first

    spawned, _ = starts(monkeypatch, names, get_start)
    out: dict[str, object] = {}
    adder = adding(app, "late", out)
    adder.start()
    assert add_waits.wait(20), "the add never started its camera"
    app.shutdown(timeout=2.0)
    adder.join(20)
    [refused] = out.values()
    assert isinstance(refused, CommandRejected) and refused.status == 503, out
    [process] = spawned
    assert process.killed.is_set() and ray_down.is_set()
    assert after_ray == [], f"Ray calls after the shutdown stopped Ray (each would start a new local Ray): {after_ray}"
    assert not app._busy


def test_an_add_joins_a_running_process_with_room_before_one_still_being_created(monkeypatch):
    """A process another add is still creating (in ``_joins``, no camera registered yet) may never be placed (a
    cluster short of CPU): an add that could join a running process with room waited on it instead, and failed
    with it (the final review of these changes)."""
    app = service(monkeypatch)
    names = Names(monkeypatch, app.config)
    app.placement = names.placement
    cam = CameraConfig(id="c", url="synthetic://street")
    running, creating = Process("hv-camera-r1"), Process("hv-camera-p1")
    for cid in ("r1", "r2"):
        app.cameras[cid] = CameraHandle(cid, cam.model_copy(update={"id": cid}), running, running.name, None)
    app._joins["p1"] = CameraHandle("p1", cam.model_copy(update={"id": "p1"}), creating, creating.name, None)
    app._busy.update({"p1", "x"})  # p1's add is still starting it; x, another add, has not been placed yet
    joined = app._joining([cam])  # 5 cameras there will be on 2 cores: 3 a process
    assert joined["c"].process is running, joined["c"].name
