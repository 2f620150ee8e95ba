"""A review of round 16's cluster commits (9ef8a34, 0c0a382): the Ray head watch stopped healthy services (a busy
head, a process resumed after Ctrl-Z), a removal sent track_ended twice for a camera whose process was alive, two
nodes lost in one poll were each judged alone, and Ray Client mode logged a traceback at every start. Ray's calls
are fakes; no Ray is started."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from types import SimpleNamespace

import pytest
import ray

import pipeline.app as app_module
import pipeline.cluster as cluster
from pipeline.app import App, CameraHandle
from pipeline.cluster import NodeWatch, inference_name
from pipeline.config import parse_config
from pipeline.placement import Node
from workers.settings import CameraConfig, RedisConfig
from workers.stream import publisher_for

# -- 1. the head watch: only no answer counts, from the first one, and a longer question confirms ----------------

UNAVAILABLE = ray.exceptions.RpcError("Timed out while waiting for GCS to become available.",
                                      rpc_code=ray._raylet.GRPC_STATUS_CODE_DEADLINE_EXCEEDED)


class Head:
    """The GCS as the watch's thread asks it, one question at a time: the test answers each (None: answered, else
    the error it raises) at a time it sets on the watch's clock, and learns the next question's timeout once the
    watch has taken the answer in (or the watch has stopped asking, its head lost)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.asked: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()
        self.watch = app_module.HeadWatch(self.ask, limit_s=60.0, poll_s=0.001, clock=lambda: self.now)

    def ask(self, timeout: float) -> None:
        self.asked.put(timeout)
        reply = self.replies.get(timeout=60)
        if reply is not None:
            raise reply

    def first(self) -> float:
        self.watch.start()
        return self.asked.get(timeout=30)

    def reply(self, at: float, reply: BaseException | None) -> float | None:
        """Answers the question under way at ``at``: the next question's timeout (None: none came, it is lost)."""
        self.now = at
        self.replies.put(reply)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                return self.asked.get(timeout=0.01)
            except queue.Empty:
                if self.watch.lost() is not None:
                    return None
        raise AssertionError("the watch neither asked again nor said the head lost")

    def close(self) -> None:
        self.watch.stop()
        self.replies.put(None)


@pytest.fixture
def head():
    head = Head()
    yield head
    head.close()


def test_a_head_that_answers_slowly_is_not_lost(head):
    """A head alive but busy, answering in 2 s for a minute: every 1 s question timed out, and 24 s later the
    service stopped with exit 4. Now the one more question, with 5 s, that comes before the stop is answered."""
    timeout, longer = head.first(), []
    for t in range(1, 90):
        if timeout > 1.0:
            longer.append(t)
        timeout = head.reply(t, UNAVAILABLE if timeout < 2.0 else None)
        assert head.watch.lost() is None, t
    assert longer and longer[0] >= 20  # asked near the limit only, then the count starts again
    assert len(longer) >= 2


def test_a_process_stopped_for_a_while_reads_no_silence(head):
    """Ctrl-Z for 30 s, then fg: the question under way was cut off at once, and the next tick stopped the run
    (counted from the last answer, 30 s ago). Now the silence counts from that failure."""
    head.first()
    head.reply(0.0, None)  # answered, then the process is stopped
    head.reply(30.0, UNAVAILABLE)  # resumed: the question under way fails at once
    assert head.watch.lost() is None
    head.reply(31.0, UNAVAILABLE)
    assert head.watch.lost() is None
    head.reply(32.0, None)
    for t in range(33, 50):
        head.reply(float(t), UNAVAILABLE)
    assert head.watch.lost() is None  # 17 s since the first failure after the last answer


def test_a_head_that_does_not_answer_is_lost_after_the_longer_question(head):
    """Guard: a GCS gone. Silent since its first unanswered question (1 s), the watch asks once more with 5 s at
    20 s, early enough that it ends by the 25 s head_lost_after_s allows (the stop keeps its HEAD_STOP_S of Ray's
    60), and only that one unanswered too says it lost: 24 s."""
    timeout = head.first()
    t = 0.0
    head.reply(t, None)
    while timeout is not None and timeout < 2.0:
        t += 1.0
        timeout = head.reply(t, UNAVAILABLE)
        assert head.watch.lost() is None
    assert (t, timeout) == (20.0, app_module.HEAD_CONFIRM_S) and timeout >= 5.0
    assert head.reply(25.0, UNAVAILABLE) is None
    assert head.watch.lost() == 24.0


def test_an_error_that_is_no_silence_does_not_count(head):
    """An error the GCS answered with (not unavailable, not a timeout), or Ray's private API changed: the watch
    stopped the service after 24 s of them. Now they are no silence."""
    head.first()
    head.reply(0.0, None)
    odd = [ray.exceptions.RpcError("bad request", rpc_code=ray._raylet.GRPC_STATUS_CODE_UNIMPLEMENTED),
           TypeError("internal_kv_exists() got an unexpected keyword argument 'timeout'")]
    for t in range(1, 60):
        head.reply(float(t), odd[t % 2])
    assert head.watch.lost() is None


def test_the_decision_is_a_function_of_the_silence_since_the_first_failure():
    after = app_module.head_lost_after_s(60.0)
    assert not app_module.head_lost(None, 1000.0, 60.0)  # answering: no silence, however long ago it answered
    assert not app_module.head_lost(100.0, 100.0 + after - 0.5, 60.0)
    assert app_module.head_lost(100.0, 100.0 + after, 60.0)
    assert app_module.gcs_unanswered(UNAVAILABLE)
    assert app_module.gcs_unanswered(ray.exceptions.RpcError(
        "unavailable", rpc_code=ray._raylet.GRPC_STATUS_CODE_UNAVAILABLE))
    assert app_module.gcs_unanswered(ray.exceptions.GetTimeoutError("timed out"))
    assert not app_module.gcs_unanswered(ray.exceptions.RpcError(
        "no", rpc_code=ray._raylet.GRPC_STATUS_CODE_UNIMPLEMENTED))
    assert not app_module.gcs_unanswered(AttributeError("gcs_client"))


# -- 5. Ray Client: no head watch, one plain line ----------------------------------------------------------------

def test_ray_client_mode_is_not_watched_and_says_so_in_one_plain_line(monkeypatch, caplog):
    """Under `ray.address: ray://...` the driver has no gcs_client: every start logged a WARNING with a traceback
    and ran unwatched. Now one INFO line says the head is not watched; elsewhere a failure still warns."""
    def no_client():
        raise AttributeError("'Worker' object has no attribute 'gcs_client'")

    monkeypatch.setattr(app_module.HeadWatch, "of_ray", staticmethod(no_client))
    with caplog.at_level(logging.DEBUG, logger="pipeline.app"):
        assert app_module.watch_head("ray://head:10001") is None
    [record] = [r for r in caplog.records if r.name == "pipeline.app"]
    assert record.levelno == logging.INFO and not record.exc_info and "not watched" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pipeline.app"):
        assert app_module.watch_head("10.0.0.1:6380") is None
    assert [r.levelno for r in caplog.records if r.name == "pipeline.app"] == [logging.WARNING]


# -- 2. a removal ends the tracks of its last status only where the camera's process is gone -----------------------

OPEN = {"people": [[7, "person", 100, 128, 20, 2.8]], "vehicles": [[3, "car", 90, 127, 30, 3.7]]}
LAST_STATUS = {"state": "running", "published": 129, "tracks_open": OPEN, "track_ids_next": {"people": 10}}


def _raise(error: BaseException):
    def stop(camera_id: str) -> dict:
        raise error
    return stop


def _removal_events(redis_server, monkeypatch, stop, shared: bool = True) -> list[dict]:
    """Removes camera "cam", whose stop answers with ``stop(camera_id)``, from a process shared with another
    camera (kept: _let_go lets it live), or (``shared`` False) one it had alone, which the removal kills; the
    events it sent."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="head16-controller").start()
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref() if callable(ref) else ref)
    app._let_go = lambda handle, stop=False: not shared
    app._shares_process = lambda handle: shared
    process = SimpleNamespace(stop=SimpleNamespace(remote=lambda camera_id, drain=True: lambda: stop(camera_id)))
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"), process,
                                      "hv-camera-cam", done="done-cam")
    redis_server.client().hset("hv:cameras", "cam", json.dumps(LAST_STATUS))
    monkeypatch.setattr(app, "_wait_gone", lambda handle: None, raising=False)
    try:
        app.remove_camera("cam", by="test")
        assert app.events.flush(10.0)
    finally:
        app.events.close(2.0)
    return [json.loads(f[b"data"]) for _, f in redis_server.client().xrange("hv:events")]


def _task_error_of_an_actor_error() -> BaseException:
    """A RayTaskError whose cause is a RayActorError (the stop met a dead replica): an instance of both."""
    error = ray.exceptions.RayTaskError("stop", "Traceback ...", ray.exceptions.RayActorError()).as_instanceof_cause()
    assert isinstance(error, ray.exceptions.RayActorError)
    return error


@pytest.mark.parametrize("error", [
    ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready."),
    ray.exceptions.RayTaskError("stop", "Traceback ...", RuntimeError("boom")),
    _task_error_of_an_actor_error(),
    ray.exceptions.ActorUnavailableError("The actor is temporarily unreachable", None),
], ids=["timed-out", "task-error", "task-error-of-an-actor-error", "unavailable"])
def test_a_removal_whose_process_is_alive_ends_no_track_from_its_status(redis_server, monkeypatch, error):
    """A stop not answered in 30 s (or failing) in a process shared with other cameras, which lives on: the removal
    sent track_ended for the tracks of the camera's last status, and the camera's own late drain sent them again
    (two track_ended per track). Now the drain alone ends them."""
    events = _removal_events(redis_server, monkeypatch, _raise(error))
    assert [e["type"] for e in events] == ["camera_removed"]
    assert events[-1]["published"] == 129  # its last status's, as before


@pytest.mark.parametrize("error", [
    ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready."),
    ray.exceptions.ActorUnavailableError("The actor is temporarily unreachable", None),
], ids=["timed-out", "unavailable"])
def test_a_removal_that_kills_the_process_it_had_alone_ends_the_tracks_of_its_status(redis_server, monkeypatch, error):
    """Review: a stop not answered in a process the camera had alone, which the removal then kills (_let_go): its
    drain never finishes, and no track_ended came at all."""
    events = _removal_events(redis_server, monkeypatch, _raise(error), shared=False)
    ended = [e for e in events if e["type"] == "track_ended"]
    assert {(e["head"], e["track_id"]) for e in ended} == {(h, t[0]) for h, ts in OPEN.items() for t in ts}, events
    assert events[-1]["type"] == "camera_removed"


@pytest.mark.parametrize("stop", [_raise(ray.exceptions.ActorDiedError()), lambda camera_id: {}],
                         ids=["its-process-died", "ray-re-created-it"])
def test_a_removal_whose_process_is_gone_ends_the_tracks_of_its_status(redis_server, monkeypatch, stop):
    """Guard: a process gone (ActorDiedError) or re-created without the camera ({}) ends nothing: the removal does."""
    events = _removal_events(redis_server, monkeypatch, stop)
    ended = sorted((e["head"], e["track_id"]) for e in events if e["type"] == "track_ended")
    assert ended == [("people", 7), ("vehicles", 3)]
    assert events[-1]["type"] == "camera_removed"


# -- 4. nodes lost in one poll share the room left ---------------------------------------------------------------

def test_nodes_lost_together_share_the_free_room_left(monkeypatch):
    """Inference nodes A, B and C hold a replica each, spare node D has one hydravision_inference unit free; A and B
    die together: both lines said "Ray restarts replica ...", where D takes one and the other waits (Ray keeps it
    pending), and new cameras went to the pending one. Now the second waits, and says so."""
    ids = {name: name * 56 for name in "habcd"}
    unit = {"CPU": 1, "hydravision_inference": 1}
    nodes = [Node(ids["h"], "10.0.0.1", {"CPU": 2}),
             *(Node(ids[n], f"10.0.0.{i}", dict(unit)) for i, n in enumerate("abcd", start=2))]
    alive = {n.id: True for n in nodes}
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [
        {"NodeID": n.id, "Alive": alive[n.id], "NodeManagerAddress": n.ip, "Resources": dict(n.resources),
         "Labels": {}} for n in nodes])
    monkeypatch.setattr(cluster.ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(cluster.ray, "get", lambda ref, timeout=None: {"node": ref.node})
    class Replica:  # an InferenceActor handle; where.remote() is its own ObjectRef
        def __init__(self, node: str) -> None:
            self.node, self.where = node, SimpleNamespace(remote=lambda: self)

    replicas = [Replica(ids[n]) for n in "abc"]
    options = {"num_cpus": 1, "num_gpus": 0, "resources": {"hydravision_inference": 1.0}}
    placement = SimpleNamespace(reserved={inference_name(i): dict(options) for i in range(3)},
                                assigner=SimpleNamespace(of={}))
    said: list[str] = []
    app = SimpleNamespace(_lock=threading.RLock(), cameras={}, inference=replicas, say=said.append, events=None)
    watch = NodeWatch(app, nodes, placement=placement)
    watch.answer_s = 60.0  # ray.nodes() in its thread: answered at once, however busy the machine
    watch.learn()
    alive[ids["a"]] = alive[ids["b"]] = False
    watch._last_poll = 0.0
    watch.tick()
    lines = [s for s in said if "lost:" in s]
    assert len(lines) == 2, said
    assert lines[0].endswith("inference replicas [0]; Ray restarts them on the remaining nodes"), lines
    assert lines[1].endswith("inference replicas [1]; inference replica 1 waits for a node with "
                             "hydravision_inference=1 to join"), lines
    assert set(watch.waiting) == {("inference", 1)}


@pytest.mark.parametrize("limit", [60.0, 30.0, 20.0, 10.0])
def test_the_head_is_said_lost_with_the_stop_s_margin_of_ray_s_limit_left(limit):
    """The 5 s confirmation came on top of the 25 s: 27.5 s of Ray's 60 were left for the stop, 5.5 of 20, and at 10
    it came after Ray had ended the process. A GCS silent from t=0 (its last answer), each question taking its
    timeout, a poll of 1 s: said lost by head_lost_after_s (plus a poll), so the stop keeps what HEAD_STOP_S says."""
    now = [0.0]

    def ask(timeout: float) -> None:
        now[0] += timeout
        raise UNAVAILABLE

    watch = app_module.HeadWatch(ask, limit_s=limit, poll_s=1.0, clock=lambda: now[0])
    while watch.lost() is None:
        watch.check()
        now[0] += 1.0  # the poll
    said_at = now[0] - 1.0
    assert said_at <= app_module.head_lost_after_s(limit) + 1.0, said_at
    assert limit - said_at >= min(app_module.HEAD_STOP_S, 0.6 * limit) - 1.0, said_at
