"""A camera removed at run time and added again after Redis restarted empty (no persistence: the Compose stack's
default) reused track ids consumers had seen: ``DELETE /cameras/cam-a`` answered ``track_ids_next`` people 222,
vehicles 411; Redis restarted (shutdown nosave, start); cam-a added again started people and vehicles at track id 0.
Redis's ``{prefix}:track_ids`` was the only copy. The controller remembers them for its run now, and the add hands
them to the camera's start, which numbers from the larger of them and what Redis holds."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import ray

from pipeline import cluster
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig, RedisConfig
from workers.stream import CameraHost, StreamActor

MODEL_INFO = {"input_size": [96, 160], "heads": {"people": ["person"], "vehicles": ["car"]}}
FINAL_IDS = {"people": 222, "vehicles": 411}  # the removal's answer in the operator's run


class Process:
    """A StreamActor's handle: each call answers at once (``ray.get`` passes it on); ``starts`` keeps what each
    ``start`` was handed. ``final``: what its ``stop`` answers (an exception: a crashed process)."""

    def __init__(self, name: str, final: dict | Exception | None = None):
        self.name, self.starts = name, []
        final = {"state": "stopped", "track_ids_next": dict(FINAL_IDS)} if final is None else final
        self.start = SimpleNamespace(remote=lambda camera_id, *args, **kwargs: self.starts.append(
            (camera_id, args, kwargs)))
        self.wait = SimpleNamespace(remote=lambda camera_id: f"done-{camera_id}")
        self.stop = SimpleNamespace(remote=lambda camera_id, drain=True: final)
        self.forget = SimpleNamespace(remote=lambda camera_id: 0)


def answer(ref, timeout=None):
    if isinstance(ref, BaseException):
        raise ref
    return ref


def service(monkeypatch, redis_url: str) -> tuple[App, list[Process]]:
    """An App on a real Redis whose placement creates Processes (without Ray), four cameras to a process."""
    spawned: list[Process] = []

    def spawn(actor_class, options, *args):
        spawned.append(Process(options["name"]))
        return spawned[-1]

    app = App(parse_config({"cameras": [], "ray": {"cameras_per_process": 4}}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_url)
    app.model_info, app.model_heads = MODEL_INFO, MODEL_INFO["heads"]
    app.admission = SimpleNamespace(check=lambda cam, url_changed=False: cam)
    app.events = SimpleNamespace(publish_event=lambda message: None, remove_status=lambda camera_id: None)
    app._let_go = lambda handle, stop=False: False  # its process forgets it: nothing for Ray to kill
    app.placement = SimpleNamespace(
        cores=2, in_camera_process=False, namespace="ns", replica_index=lambda camera, live=(): 0, spawn=spawn,
        stream_processes=lambda cams: [([cam], {"name": cluster.camera_actor_name(cam.id)}) for cam in cams])
    monkeypatch.setattr(ray, "get", answer)
    return app, spawned


def running(app: App, camera_id: str, final: dict | Exception | None = None) -> Process:
    process = Process(cluster.camera_actor_name(camera_id), final)
    app.cameras[camera_id] = CameraHandle(camera_id, CameraConfig(id=camera_id, url="synthetic://street"), process,
                                          process.name, done=f"done-{camera_id}")
    return process


def restarted_empty(redis_server) -> None:
    """Redis shut down without saving and started again (the Compose stack's Redis keeps nothing)."""
    redis_server.kill()
    redis_server.start()
    assert redis_server.client().dbsize() == 0


def first_ids(process: Process, camera_id: str, redis_url: str) -> dict[str, int]:
    """The next track ids the camera numbers from, started as ``process`` was asked to start it: the real
    StreamActor.start hands the arguments to a real CameraHost (its pipeline not run), which reads Redis."""
    [(cid, args, kwargs)] = [s for s in process.starts if s[0] == camera_id]
    actor = object.__new__(StreamActor.__ray_metadata__.modified_class)
    host = CameraHost(CameraConfig(id=camera_id, url="synthetic://street"), [], MODEL_INFO, RedisConfig(url=redis_url))
    actor.hosts = {camera_id: host}

    async def no_pipeline(camera=None) -> None:
        pass

    host.start = no_pipeline
    asyncio.run(actor.start(cid, *args, **kwargs))
    ids, _ = host._previous_state(attempts=1)
    return ids


@pytest.mark.parametrize("joins", [False, True], ids=["own-process", "joins-a-running-process"])
def test_a_camera_added_again_after_redis_restarted_empty_continues_its_track_ids(redis_server, monkeypatch, joins):
    app, spawned = service(monkeypatch, redis_server.url)
    beside = running(app, "cam-b") if joins else None  # a process with room: cam-a joins it when added again
    running(app, "cam-a")
    assert app.remove_camera("cam-a", by="api:ops")["final"]["track_ids_next"] == FINAL_IDS
    assert json.loads(redis_server.client().hget("hv:track_ids", "cam-a")) == FINAL_IDS
    restarted_empty(redis_server)
    app.add_camera({"id": "cam-a", "url": "synthetic://street"}, by="api:ops")
    assert len(spawned) == (0 if joins else 1)
    process = beside if joins else spawned[0]
    assert first_ids(process, "cam-a", redis_server.url) == FINAL_IDS  # was {}: people and vehicles from 0


def test_a_removal_while_redis_is_down_still_hands_its_ids_to_the_camera_added_again(redis_server, monkeypatch):
    """Redis down at the removal (its ids not kept there: the retry is pending), back empty, and the camera added
    again before the control loop's retry: its status, which held the ids too, was lost with Redis's data."""
    app, spawned = service(monkeypatch, redis_server.url)
    running(app, "cam-a")
    redis_server.kill()
    try:
        app.remove_camera("cam-a", by="api:ops")
    finally:
        redis_server.start()
    assert "cam-a" in app._unretired and redis_server.client().dbsize() == 0
    app.add_camera({"id": "cam-a", "url": "synthetic://street"}, by="api:ops")
    assert first_ids(spawned[0], "cam-a", redis_server.url) == FINAL_IDS


def test_a_second_removal_without_final_stats_keeps_what_the_first_left(redis_server, monkeypatch):
    """Added again, cam-a's process crashed and its removal had no final stats; Redis restarted empty once more:
    the controller's memory of the first removal's ids still holds (each removal's merged into it)."""
    app, spawned = service(monkeypatch, redis_server.url)
    running(app, "cam-a")
    app.remove_camera("cam-a", by="api:ops")
    restarted_empty(redis_server)
    app.cameras["cam-a"] = CameraHandle("cam-a", CameraConfig(id="cam-a", url="synthetic://street"),
                                        Process("hv-camera-cam-a", final=RuntimeError("its actor died")),
                                        "hv-camera-cam-a", done="done-cam-a")
    assert app.remove_camera("cam-a", by="api:ops")["final"]["track_ids_next"] is None
    restarted_empty(redis_server)
    app.add_camera({"id": "cam-a", "url": "synthetic://street"}, by="api:ops")
    assert first_ids(spawned[0], "cam-a", redis_server.url) == FINAL_IDS


def test_the_camera_numbers_from_the_larger_of_the_controllers_ids_and_redis(redis_server):
    """Where Redis holds a higher next id for a head (an earlier service run's removal), that one counts."""
    redis_server.client().hset("hv:track_ids", "cam-a", json.dumps({"people": 500, "vehicles": 7}))
    process = Process("hv-camera-cam-a")
    process.starts.append(("cam-a", (), {"track_ids": dict(FINAL_IDS)}))
    assert first_ids(process, "cam-a", redis_server.url) == {"people": 500, "vehicles": 411}


def test_a_camera_never_removed_starts_without_the_controllers_ids(redis_server, monkeypatch):
    """The start's arguments are as before for every other camera (no ``track_ids``)."""
    app, spawned = service(monkeypatch, redis_server.url)
    app.add_camera({"id": "cam-a", "url": "synthetic://street"}, by="api:ops")
    assert spawned[0].starts == [("cam-a", (), {})]
    assert first_ids(spawned[0], "cam-a", redis_server.url) == {}
