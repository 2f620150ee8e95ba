"""Two cameras of one camera process removed at the same moment while that process hangs (round 17)."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import ray

from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig, RedisConfig
from workers.stream import publisher_for


def _status(track_id: int) -> dict:
    return {"state": "running", "published": 50, "tracks_open": {"people": [[track_id, "person", 10, 40, 9, 1.2]]},
            "track_ids_next": {"people": track_id + 1}}


def test_two_cameras_of_a_hung_process_removed_together_both_end_their_open_tracks(redis_server, monkeypatch):
    """a's stop timed out while b's was still waiting: a saw b in its process and let the process live (its drain
    would end a's tracks), then b's stop timed out, b saw a as drained already and killed the process; a's drain
    never came, and no track_ended ever came for a's open track (b's ended). Now a killed process is seen as such
    by each removal it concerns, whoever killed it."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="race17-controller").start()
    killed = threading.Event()
    a_in_forget = threading.Event()

    def stop(camera_id, drain=True):
        def answer():
            if camera_id == "b":  # b's stop times out only once a is past its own
                assert a_in_forget.wait(10)
            raise ray.exceptions.GetTimeoutError(f"stop of {camera_id} timed out")
        return answer

    def forget(camera_id):
        def answer():
            a_in_forget.set()
            assert killed.wait(10)  # hung until b's removal kills it; then the call fails
            raise ray.exceptions.RayActorError()
        return answer

    process = SimpleNamespace(stop=SimpleNamespace(remote=stop), forget=SimpleNamespace(remote=forget))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref() if callable(ref) else ref)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.set())

    def get_actor(name, namespace=None):
        raise ValueError(name)  # released at once

    monkeypatch.setattr(ray, "get_actor", get_actor)
    for n, cid in enumerate(("a", "b")):
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process,
                                        "hv-camera-a", done=f"done-{cid}")
        redis_server.client().hset("hv:cameras", cid, json.dumps(_status(7 + n)))
    answers: dict = {}
    threads = [threading.Thread(target=lambda cid=cid: answers.__setitem__(cid, app.remove_camera(cid, by="test")))
               for cid in ("a", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert set(answers) == {"a", "b"} and killed.is_set()
        assert app.events.flush(10.0)
        events = [json.loads(f[b"data"]) for _, f in redis_server.client().xrange("hv:events")]
    finally:
        app.events.close(2.0)
    ended = sorted((e["camera"], e["track_id"]) for e in events if e["type"] == "track_ended")
    assert ended == [("a", 7), ("b", 8)]
    for cid in ("a", "b"):  # each camera's ends came before its camera_removed
        mine = [e["type"] for e in events if e["camera"] == cid]
        assert mine[-1] == "camera_removed" and mine.count("track_ended") == 1


@pytest.mark.parametrize("drained_later", [False, True], ids=["never-drained", "drained-meanwhile"])
def test_a_camera_removed_from_a_hung_process_ends_its_tracks_when_a_later_removal_kills_it(
        redis_server, monkeypatch, drained_later):
    """Review: a's stop and its forget both timed out (the process hung: no kill yet), so a's removal let the
    process live for b and left a's tracks to its drain; b removed later killed it, and no track_ended ever came
    for a's. Now b's kill ends them, unless a's stop answered meanwhile (drained: it ended them itself)."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="race17-controller").start()
    asked: list[str] = []

    def stop(camera_id, drain=True):
        def answer():
            asked.append(camera_id)
            if camera_id == "a" and drained_later and asked.count("a") > 1:  # looked at again at b's kill
                return {"state": "stopped", "open_tracks": 0, "published": 50}
            raise ray.exceptions.GetTimeoutError(f"stop of {camera_id} timed out")
        return answer

    def forget(camera_id):
        def answer():
            raise ray.exceptions.GetTimeoutError(f"forget of {camera_id} timed out")
        return answer

    killed: list = []
    process = SimpleNamespace(stop=SimpleNamespace(remote=stop), forget=SimpleNamespace(remote=forget))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref() if callable(ref) else ref)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append(actor))

    def get_actor(name, namespace=None):
        raise ValueError(name)

    monkeypatch.setattr(ray, "get_actor", get_actor)
    for n, cid in enumerate(("a", "b")):
        app.cameras[cid] = CameraHandle(cid, CameraConfig(id=cid, url="synthetic://street"), process,
                                        "hv-camera-a", done=f"done-{cid}")
        redis_server.client().hset("hv:cameras", cid, json.dumps(_status(7 + n)))
    try:
        app.remove_camera("a", by="test")  # b still runs there: let live
        assert not killed
        app.remove_camera("b", by="test")  # the last camera: killed
        assert killed
        assert app.events.flush(10.0)
        events = [json.loads(f[b"data"]) for _, f in redis_server.client().xrange("hv:events")]
    finally:
        app.events.close(2.0)
    ended = sorted((e["camera"], e["track_id"]) for e in events if e["type"] == "track_ended")
    assert ended == ([("b", 8)] if drained_later else [("a", 7), ("b", 8)])
    assert not app._undrained
