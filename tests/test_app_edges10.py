"""The supervisor at its edges (tenth round): restarts of crashed camera processes whose start hangs or answers
late, a camera process crashing at every start, inference replicas that hang, an add still waiting when a shutdown
begins. Without Ray, cameras or models: the App with stand-ins for what it calls (as tests/test_controller_edges3.py
does), and a clock of its own that Ray's waits move, so what a tick would wait for is measured without waiting."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import ray

import pipeline.app as app_module
from pipeline import cluster
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from pipeline.live_control import CommandRejected
import test_concurrent_adds8 as concurrent_adds
from workers.settings import CameraConfig

HEALTHZ_WINDOW_S = 30  # /healthz fails once the control loop's last tick is older (docs/architecture.md)


class Clock:
    """pipeline.app's ``time``: only Ray's waits (below) move it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Pending:
    """A call that has not answered (yet): ``ray.get`` or ``ray.wait`` on it waits out its timeout."""

    def __init__(self) -> None:
        self.done, self.value = False, None


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(app_module, "time", clock)

    def get(ref, timeout=None):
        if isinstance(ref, Pending):
            if not ref.done:
                assert timeout is not None, "a ray.get without a timeout on a call that never answers"
                clock.now += timeout
                raise ray.exceptions.GetTimeoutError("Get timed out")
            return ref.value
        if isinstance(ref, BaseException):
            raise ref
        return ref

    def wait(refs, num_returns=1, timeout=None):
        refs = list(refs)
        ready = [r for r in refs if not isinstance(r, Pending) or r.done]
        if len(ready) < num_returns:
            assert timeout is not None, "a ray.wait without a timeout on a call that never answers"
            clock.now += timeout
        return ready, [r for r in refs if r not in ready]

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", wait)
    return clock


class Process:
    """A StreamActor's handle hosting some cameras; ``start`` answers with ``started`` (at once unless told)."""

    def __init__(self, state: str = "created", pid: int = 4242):
        self.state, self.pid, self.starts = state, pid, []
        self.started = Pending()
        self.started.done = True
        self.start = SimpleNamespace(remote=self._start)
        self.wait = SimpleNamespace(remote=lambda camera_id: f"done-{camera_id}")
        self.stats = SimpleNamespace(remote=lambda camera_id: self.row(camera_id))
        self.stats_many = SimpleNamespace(remote=lambda ids, model=False: {
            "cameras": {cid: self.row(cid) for cid in ids}, "model": None})

    def row(self, camera_id: str) -> dict:
        return {"camera": camera_id, "state": self.state, "pid": self.pid}

    def _start(self, camera_id, camera=None, inference=None, restart=False):
        self.starts.append(camera_id)
        return self.started


def service(said: list, process: Process, cameras: str) -> App:
    app = App(parse_config({"cameras": []}), say=said.append)
    published: list[dict] = []
    app.events = SimpleNamespace(published=published, publish_event=published.append, stats=lambda: {},
                                 close=lambda timeout: None)
    for cid in cameras:
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process, "hv-camera-x")
    return app


def restarted(app: App) -> list[str]:
    return [e["camera"] for e in app.events.published if e["type"] == "worker_restarted"]


def test_a_restart_whose_start_hangs_holds_a_tick_once_not_once_per_camera_and_is_not_sent_again(clock):
    """Ray re-created a process of four cameras on a lost node; their starts wait for a replica that is restarting
    too. Each camera's start was waited for 30 s in turn, in the tick: 2 minutes without a tick (/healthz failed
    after 30 s, /metrics stood still), then each was sent again at the next tick, to wait 2 minutes more."""
    said: list[str] = []
    process = Process("created")
    process.started = Pending()
    app = service(said, process, "abcd")
    for _ in range(2):
        before = clock.now
        app.stats()
        assert clock.now - before <= 2 * 5, f"one tick waited {clock.now - before:g} s"  # stats, then the restarts
        assert clock.now - before < HEALTHZ_WINDOW_S
    assert process.starts == list("abcd")  # a start under way is looked at again, not sent again
    assert restarted(app) == [] and not app._busy


def test_a_restart_that_answers_after_its_tick_is_reported_at_the_next(clock):
    """A restart's start answered after the tick had given up on it (its replica came back 31 s later): the next
    tick found the camera running and took it for one that had never crashed: no worker_restarted, no count in the
    restarts metric, and its end never watched again (a service of files whose sources had all ended ran on)."""
    said: list[str] = []
    process = Process("created")
    process.started = Pending()
    app = service(said, process, "ab")
    app.stats()
    process.started.done, process.state, process.pid = True, "running", 4343  # it started meanwhile
    rows = app.stats()
    assert [r["state"] for r in rows] == ["running", "running"]
    assert restarted(app) == ["a", "b"], app.events.published
    assert [h.restarts for h in app.cameras.values()] == [1, 1]
    assert [h.done for h in app.cameras.values()] == ["done-a", "done-b"]
    assert app.telemetry.snapshot().restarts["stream"] == 1
    app.stats()  # and only once
    assert restarted(app) == ["a", "b"] and not app._busy


def test_a_camera_process_crashing_at_every_start_is_restarted_with_a_back_off(clock):
    """A camera whose process crashes right after each start (PyAV on a bad stream) was restarted at every tick
    for ever: a new process, a worker_restarted event and a line every second, its process-mates taken down each
    time. Restarts now back off while they do not last, and not at all after one that lasted."""
    said: list[str] = []
    process = Process("created")  # Ray re-created it: "created" at every tick
    app = service(said, process, "a")
    for _ in range(60):  # a minute of ticks, 1 s apart
        starts = len(process.starts)
        app.stats()
        if len(process.starts) > starts:
            process.pid += 1  # that start crashed it: the next tick sees Ray's next process
        clock.now += 1
    assert 3 <= len(process.starts) <= 8, process.starts  # at 0, 2, 5, 10, 19, 36 s
    assert len(restarted(app)) == len(process.starts)
    assert any("did not last" in line and "restarting it again in" in line for line in said), said
    # Once a restart lasts, the next crash is restarted at once.
    clock.now += 120  # past any back-off
    starts = len(process.starts)
    app.stats()
    assert len(process.starts) == starts + 1
    process.state = "running"
    clock.now += 600
    app.stats()
    process.state, process.pid = "created", process.pid + 1
    app.stats()
    assert len(process.starts) == starts + 2


def test_replicas_that_hang_hold_a_tick_once_not_once_each(clock):
    """The models' numbers were asked of each replica in turn, 2 s each: three hung replicas (a stuck GPU) cost
    every tick 6 s, more with more replicas. One that answers is still recorded, its restart reported."""
    said: list[str] = []
    app = service(said, Process("running"), "")
    hung = SimpleNamespace(model_stats=SimpleNamespace(remote=Pending))
    fine = SimpleNamespace(model_stats=SimpleNamespace(remote=lambda: {"pid": 77, "batches": 1, "frames": 2}))
    app.inference, app.inference_pids = [hung, hung, hung, fine], [1, 2, 3, 4]
    before = clock.now
    app._check_inference()
    assert clock.now - before <= 2, f"one tick waited {clock.now - before:g} s for the replicas"
    replicas = app.telemetry.snapshot().replicas
    assert [replicas[i].answering for i in range(4)] == [False, False, False, True]
    assert app.inference_pids == [1, 2, 3, 77] and restarted(app) == ["*"]


def test_an_add_still_waiting_for_its_new_process_when_a_shutdown_begins_is_undone_before_ray_stops(monkeypatch):
    """A camera added at run time whose new process had not started yet (a busy machine or cluster: the add waits up
    to 65 s) kept waiting through a shutdown, which waits 5 s for commands under way and then stops Ray: the add's
    undo came after that, and its Ray calls started a new local Ray as the service exited."""
    process = Process("created")
    process.killed = threading.Event()
    app = service([], Process("running"), "")
    app.started_ray = True
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.placement = SimpleNamespace(namespace="hydravision-hv", cores=2, in_camera_process=False, nodes=[],
                                    replica_index=lambda camera, live=(): 0,
                                    spawn=lambda actor_class, options, *args: process,
                                    stream_processes=lambda cams: [([c], {"name": f"hv-camera-{c.id}"}) for c in cams])
    ray_down, after_ray, adding = threading.Event(), [], threading.Event()
    monkeypatch.setattr(cluster, "shutdown_ray", ray_down.set)

    def kill(actor, no_restart=True):
        if ray_down.is_set():
            after_ray.append("ray.kill")
        actor.killed.set()

    def get(ref, timeout=None):
        if ref is process.started:  # its process imports for a long while; a killed one's start fails at once
            adding.set()
            if not process.killed.wait(min(timeout, 8)):
                raise ray.exceptions.GetTimeoutError("Get timed out")
            raise ray.exceptions.RayActorError()
        return ref

    monkeypatch.setattr(ray, "kill", kill)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    out: dict = {}
    adder = concurrent_adds.adding(app, "late", out)
    adder.start()
    assert adding.wait(20), "the add never waited for its camera"
    app.shutdown(timeout=1.0)
    adder.join(20)
    assert after_ray == [], f"Ray calls after the shutdown stopped Ray (each would start a new local Ray): {after_ray}"
    [refused] = out.values()
    assert isinstance(refused, CommandRejected) and refused.status == 503 and "shutting down" in refused.reason, out
    assert process.killed.is_set() and ray_down.is_set()
    assert not app.cameras and not app._busy and not app._joins


def test_a_camera_restarted_beside_one_whose_start_hangs_gets_its_stats_in_the_same_tick(monkeypatch):
    """a's start hangs (its replica restarting) and uses the tick's deadline up; b's start answered, but its fresh
    stats were asked with no time left (timeout 0: a call just sent never answers that fast), so b showed the
    stale "created" row and a warning "no stats after its restart"."""
    clock = Clock()
    monkeypatch.setattr(app_module, "time", clock)
    asked = []

    class Sent:  # a call just sent
        pass

    def get(ref, timeout=None):
        if isinstance(ref, Sent):
            asked.append(timeout)
            if not timeout:
                raise ray.exceptions.GetTimeoutError("Get timed out")
            return {"camera": "b", "state": "running", "pid": 5151}
        if isinstance(ref, Pending):
            if not ref.done:
                clock.now += timeout
                raise ray.exceptions.GetTimeoutError("Get timed out")
            return ref.value
        return ref

    def wait(refs, num_returns=1, timeout=None):
        refs = list(refs)
        ready = [r for r in refs if not isinstance(r, Pending) or r.done]
        if len(ready) < num_returns:
            clock.now += timeout
        return ready, [r for r in refs if r not in ready]

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "wait", wait)
    hanging, answering = Process("created", 1), Process("created", 2)
    hanging.started = Pending()
    answering.stats = SimpleNamespace(remote=lambda cid: Sent())
    app = service([], hanging, "a")
    app.cameras["b"] = CameraHandle("b", CameraConfig(id="b", url="synthetic://street"), answering, "hv-camera-y")
    rows = {r["camera"]: r for r in app.stats()}
    assert rows["b"]["state"] == "running" and asked and asked[0] >= 1.0, (rows, asked)
