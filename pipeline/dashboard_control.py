"""Adding and removing cameras from the dashboard, through the service's Redis control stream, so the dashboard
still needs nothing but Redis.

The protocol is the controller's (pipeline/control.py): a command is
``XADD {prefix}:control * data <JSON {op, camera | id, request_id, user, expires}>``, answered on
``{prefix}:control:results`` (field ``data``: JSON with the same ``request_id``, ``status`` accepted or
rejected, ``reason``). "Reachable" here means a controller reads that stream now: a Redis client named
``CONSUMER_NAME`` (the name the controller's reader connects with) is connected; where this Redis user may
not list clients, a consumer of the stream's group that read it within ``ALIVE_MS`` (the controller blocks
in XREADGROUP about a second at a time; Redis 7.0 lists a consumer only once it was handed a command).
Whether this dashboard may write there is Redis's to decide (ACLs); the page offers the buttons only when
the dashboard was started with ``--allow-control``.
"""

from __future__ import annotations

import json
import threading
import uuid

import redis

from pipeline.control import await_answer, control_key, redis_now, results_key, take_back

ALIVE_MS = 5000
USER = "dashboard"
CONSUMER_NAME = "hydravision-control"  # client_name of ControlConsumer's connection (pipeline/control.py)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def control_reachable(client: redis.Redis, prefix: str) -> bool:
    """True when a controller is reading the control stream now."""
    try:
        return any(c.get("name") == CONSUMER_NAME for c in client.client_list(_type="normal"))
    except redis.ResponseError:  # NOPERM: this user may not list clients
        pass
    try:
        groups = client.xinfo_groups(control_key(prefix))
    except redis.ResponseError:  # no such stream: no controller ever listened
        return False
    for group in groups:
        name = _text(group.get("name", b""))
        for consumer in client.xinfo_consumers(control_key(prefix), name):
            if int(consumer.get("idle", ALIVE_MS + 1)) <= ALIVE_MS:
                return True
    return False


def send_command(client: redis.Redis, prefix: str, command: dict, timeout_s: float = 30.0,
                 stop: threading.Event | None = None) -> dict:
    """Sends one command and waits for its answer; {"status": "timeout", ...} when none comes in time (the
    reason says whether a service read it: see control.unanswered). Starting a camera's actor takes seconds, more on
    a busy machine: hence the long default. ``stop`` set (the dashboard is stopping) ends the wait within a second."""
    request_id = f"dashboard-{uuid.uuid4().hex[:12]}"
    top = client.xrevrange(results_key(prefix), count=1)
    last = top[0][0] if top else "0-0"
    body = {**command, "request_id": request_id, "user": USER, "expires": round(redis_now(client) + timeout_s, 3)}
    entry_id = client.xadd(control_key(prefix), {"data": json.dumps(body)})
    try:
        answer = await_answer(client, results_key(prefix), request_id, last, timeout_s, stop)
    except (redis.ConnectionError, redis.TimeoutError) as lost:
        return {"status": "timeout", "request_id": request_id, "reason": f"lost Redis while waiting for the "
                f"answer ({type(lost).__name__}): the command may have been applied (see the cameras)"}
    if answer is not None:
        return answer
    what = take_back(client, control_key(prefix), entry_id)
    if stop is not None and stop.is_set():  # else the dashboard's shutdown waited out the whole timeout
        return {"status": "timeout", "request_id": request_id,
                "reason": "the dashboard stopped before the controller answered: " + what}
    return {"status": "timeout", "request_id": request_id,
            "reason": f"no answer from the controller within {timeout_s:g} s: " + what}


def add_command(camera: dict) -> dict:
    return {"op": "add", "camera": camera}


def remove_command(camera_id: str) -> dict:
    return {"op": "remove", "id": camera_id}
