"""Defects found in an audit of live removal, analytics and the publisher (round 14)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import ray

from pipeline.admission import CommandRejected
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig, RedisConfig
from workers.stream import publisher_for


def _removed_app(redis_server, monkeypatch, final: dict) -> App:
    """An App whose one camera, "cam", answers its stop with ``final``."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="rem14-controller").start()
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    app._let_go = lambda handle, stop=False: False
    stop = SimpleNamespace(remote=lambda camera_id, drain=True: final)
    app.cameras["cam"] = CameraHandle("cam", CameraConfig(id="cam", url="synthetic://street"),
                                      SimpleNamespace(stop=stop), "hv-camera-cam", done="done-cam")
    return app


def test_a_removal_counts_what_its_publisher_dropped_during_an_outage_as_undelivered(redis_server, monkeypatch):
    """A camera removed after a Redis outage that overflowed its buffer (the oldest dropped) and a few messages Redis
    refused: the answer and camera_removed said 'undelivered' only for the 5 left in the buffer (or nothing at all
    when the buffer had emptied since), while the end of a run counts dropped + refused + left (307)."""
    final = {"state": "stopped", "published": 900, "publisher": {"sent": 600, "dropped": 300, "rejected": 2,
                                                                 "queued": 5}}
    app = _removed_app(redis_server, monkeypatch, final)
    try:
        answer = app.remove_camera("cam", by="test")
        assert answer["final"]["undelivered"] == 307
        assert app.events.flush(10.0)
        events = [json.loads(f[b"data"]) for _, f in redis_server.client().xrange("hv:events")]
        assert [(e["type"], e.get("undelivered")) for e in events] == [("camera_removed", 307)]
    finally:
        app.events.close(2.0)


@pytest.mark.parametrize("raw", ["5", "null", "[1, 2]"])
def test_a_remove_of_an_unknown_camera_with_a_status_that_is_no_object_is_refused_404(redis_server, raw):
    """A remove of a camera this service does not run looks for a status an earlier run left: one that is JSON but
    not an object (written by hand or by another program) raised TypeError in mark_stale, and the command was
    answered 500 'internal error' instead of 404 'no camera is running'."""
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="rem14-controller").start()
    redis_server.client().hset("hv:cameras", "cam", raw)
    try:
        with pytest.raises(CommandRejected, match="no camera 'cam' is running") as e:
            app.remove_camera("cam", by="test")
        assert e.value.status == 404
        assert redis_server.client().hget("hv:cameras", "cam") == raw.encode()  # not ours: left as it was
    finally:
        app.events.close(2.0)


def _frame(frame: int) -> dict:
    return {"v": 1, "camera": "yard", "frame": frame, "pts": frame / 10, "ts": 1.0, "latency_ms": 1.0,
            "size": [640, 360], "heads": [], "detections": []}


def test_a_refusal_that_comes_with_every_batch_is_not_logged_once_a_batch(redis_server, monkeypatch, caplog):
    """A Redis 7 ACL user made without channels (``ACL SETUSER cams on >pw ~hv:* +@all``: no channel is allowed by
    default) is refused every PUBLISH: the Publisher wrote an ERROR line for every batch, ten a second per camera for
    as long as the service ran. The first is logged at once, the rest at most every REFUSALS_LOG_S with their count;
    the messages themselves reach their streams."""
    import logging

    import workers.publish as publish

    monkeypatch.setattr(publish, "REFUSALS_LOG_S", 3600.0, raising=False)  # no second report within the test
    admin = redis_server.client()
    admin.acl_setuser("cams", enabled=True, passwords=["+cams-Pa55"], keys=["hv:*"], commands=["+@all"])
    p = publish.Publisher(f"redis://cams:cams-Pa55@127.0.0.1:{redis_server.port}/0").start()
    try:
        with caplog.at_level(logging.ERROR, logger="workers.publish"):
            for frame in range(20):  # a batch each
                p.publish_detections(_frame(frame))
                assert p.flush(10.0)
            assert admin.xlen("hv:cam:yard:detections") == 20 and p.stats()["sent"] == 20
            lines = [r.getMessage() for r in caplog.records if "Redis rejected" in r.getMessage()]
            assert len(lines) == 1 and "publish to the channel" in lines[0], lines
            monkeypatch.setattr(publish, "REFUSALS_LOG_S", 0.0)  # the next report: the batches in between counted
            p.publish_detections(_frame(20))
            assert p.flush(10.0)
            lines = [r.getMessage() for r in caplog.records if "Redis rejected" in r.getMessage()]
            assert len(lines) == 2 and "0 message(s) and 20 other write(s) of 20 batches" in lines[1], lines
    finally:
        p.close(2.0)


@pytest.mark.parametrize("ending", ["close", "refusals stop"])
def test_refusals_counted_after_the_first_line_are_said_when_they_stop_or_at_the_close(redis_server, monkeypatch,
                                                                                        caplog, ending):
    """The refusals after the first line were said only by a later refusal past REFUSALS_LOG_S: refused for 30 s
    (a wrong ACL, fixed), then fine, the log held the first batch's line alone; the other batches' refused PUBLISHes
    were nowhere. They are said at the close, or by the first clean batch once the period has passed."""
    import logging

    import workers.publish as publish

    monkeypatch.setattr(publish, "REFUSALS_LOG_S", 3600.0, raising=False)
    admin = redis_server.client()
    admin.acl_setuser("cams2", enabled=True, passwords=["+cams-Pa55"], keys=["hv:*"], commands=["+@all"])
    p = publish.Publisher(f"redis://cams2:cams-Pa55@127.0.0.1:{redis_server.port}/0").start()

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "Redis rejected" in r.getMessage()]

    try:
        with caplog.at_level(logging.ERROR, logger="workers.publish"):
            for frame in range(5):
                p.publish_detections(_frame(frame))
                assert p.flush(10.0)
            assert len(said()) == 1
            if ending == "refusals stop":
                admin.acl_setuser("cams2", channels=["*"])  # fixed: PUBLISH allowed
                monkeypatch.setattr(publish, "REFUSALS_LOG_S", 0.0)
                p.publish_detections(_frame(5))
                assert p.flush(10.0)
            else:
                p.close(5.0)
            assert len(said()) == 2 and "0 message(s) and 4 other write(s) of 4 batches" in said()[1], said()
    finally:
        p.close(2.0)
