"""A camera this service does not run, whose status an earlier run left in Redis (added at run time, not in the
config, and the service restarted): the dashboard showed it 'down · stopped' for good, counted among the down
cameras, and its Remove was refused ("no camera 'street-4' is running"). A remove now takes that status out, its
next track ids kept as at any removal; a status someone still refreshes is left alone (an operator's run)."""
from __future__ import annotations

import json
import time

import pytest

from pipeline.admission import CommandRejected
from pipeline.app import App
from pipeline.config import parse_config
from workers.settings import RedisConfig
from workers.stream import publisher_for


@pytest.fixture
def app(redis_server):
    app = App(parse_config({}), say=lambda text: None)
    app.redis_settings = RedisConfig(url=redis_server.url)
    app.events = publisher_for(app.redis_settings, name="leftover-controller").start()
    yield app
    app.events.close(2.0)


def test_the_status_an_earlier_run_left_is_removed_and_its_ids_kept(app, redis_server):
    client = redis_server.client()
    client.hset("hv:cameras", "street-4", json.dumps({"state": "stopped", "track_ids_next": {"people": 31},
                                                     "heartbeat_ts": time.time() - 600}))
    client.hset("hv:cam:street-4:counts", "since", "1")
    answer = app.remove_camera("street-4", by="dashboard")
    assert answer["final"]["state"] == "stopped" and answer["final"]["leftover"] is True
    assert app.events.flush(10.0)
    assert client.hget("hv:cameras", "street-4") is None and not client.exists("hv:cam:street-4:counts")
    assert json.loads(client.hget("hv:track_ids", "street-4")) == {"people": 31}  # added again: goes on from 31
    [(_, fields)] = client.xrange("hv:events")  # audited as every accepted command (the review)
    event = json.loads(fields[b"data"])
    assert (event["type"], event["camera"], event["by"]) == ("camera_removed", "street-4", "dashboard"), event
    assert event["reason"] == "not running: the status an earlier run left"
    with pytest.raises(CommandRejected, match="no camera 'street-4' is running") as e:
        app.remove_camera("street-4", by="dashboard")  # nothing left to remove
    assert e.value.status == 404


def test_a_status_still_refreshed_is_not_taken_for_a_leftover(app, redis_server):
    client = redis_server.client()
    client.hset("hv:cameras", "lobby", json.dumps({"state": "running", "heartbeat_ts": time.time()}))
    with pytest.raises(CommandRejected, match="no camera 'lobby' is running"):
        app.remove_camera("lobby", by="api")
    assert client.hget("hv:cameras", "lobby") is not None
