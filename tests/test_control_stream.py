"""The Redis control stream's reader (pipeline/control.py's ControlConsumer) in front of a stand-in App, no Ray:
what it does when Redis fails between applying a command and answering it. The end-to-end tests of the control
stream, with a real App, are in tests/test_live_control.py."""

from __future__ import annotations

import json
import time

import pytest
import redis
from redis.client import Pipeline

from pipeline.control import ControlConsumer


class StandInApp:
    """What ControlConsumer calls on the App; keeps the cameras it was asked to add."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_camera(self, camera: dict, by: str) -> dict:
        self.added.append(camera["id"])
        return {"id": camera["id"]}

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        raise AssertionError(f"rejected {op}: {reason}")


def add(client: redis.Redis, camera: str) -> None:
    command = {"op": "add", "camera": {"id": camera, "url": "synthetic://street"}, "request_id": camera}
    client.xadd("hv:control", {"data": json.dumps(command)})


def answered(client: redis.Redis) -> list[str]:
    return [json.loads(fields[b"data"])["request_id"] for _, fields in client.xrange("hv:control:results")]


def wait_for_answers(client: redis.Redis, expected: list[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sorted(set(answered(client))) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(answered(client)) == expected  # each once


# when the answer's MULTI/EXEC fails: before Redis ran it, or after (only its reply lost: no second answer)
@pytest.mark.parametrize("blip", ["before the transaction ran", "after the transaction ran"])
def test_a_redis_blip_while_answering_retries_the_answer_and_never_applies_the_command_again(
        redis_server, monkeypatch, blip):
    execute, failed = Pipeline.execute, []

    def flaky(pipe: Pipeline, *args, **kwargs):
        if not failed and any(command[0][0] == "XACK" for command in pipe.command_stack):
            failed.append(blip)
            if blip == "after the transaction ran":
                execute(pipe, *args, **kwargs)
            raise redis.ConnectionError("Redis went away while answering")
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", flaky)
    client = redis_server.client()
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        add(client, "first")
        wait_for_answers(client, ["first"])
        add(client, "second")  # the reader goes on with the next command
        wait_for_answers(client, ["first", "second"])
    finally:
        consumer.stop()
    assert failed == [blip]
    assert app.added == ["first", "second"]
    assert client.xpending("hv:control", "hydravision")["pending"] == 0
    # a controller starting later finds nothing of them left to apply
    restarted = StandInApp()
    consumer = ControlConsumer(restarted, redis_server.url, "hv").start()
    try:
        add(client, "third")
        wait_for_answers(client, ["first", "second", "third"])
    finally:
        consumer.stop()
    assert restarted.added == ["third"]


@pytest.mark.parametrize("command, camera, reason", [
    ({"op": "add", "id": "x", "camera": {"id": "y", "url": "synthetic://street"}}, "y",
     "data.id: 'x' is not the added camera's id 'y'"),
    ({"op": "add", "id": "y", "camera": {"id": "y", "url": "synthetic://street"}}, "y", None),
    ({"op": "add", "camera": {"id": "y", "url": "synthetic://street"}}, "y", None),
])
def test_an_add_answers_for_the_camera_it_adds(command: dict, camera: str, reason: str | None) -> None:
    """An add with a top-level id besides camera.id added camera.id and answered for the id: the sender read
    that camera x was added (a remove of x then failed: no such camera)."""
    app = StandInApp()
    app.note_rejected = lambda op, by, text, camera=None: None  # type: ignore[method-assign]
    consumer = ControlConsumer(app, "redis://127.0.0.1:1/0", "hv")  # _apply needs no Redis for these
    result = consumer._apply("1-0", {b"data": json.dumps(command).encode()}, redelivered=False)
    assert result["camera"] == camera
    if reason is None:
        assert result["status"] == "accepted" and app.added == [camera]
    else:
        assert result["status"] == "rejected" and result["reason"].startswith(reason) and app.added == []


@pytest.mark.parametrize("data, reason", [
    ('{"op": "add", "camera": {"id": "a", "url": "synthetic://street", "fps": 5, "fps": 50}}',
     "data: key 'fps' given twice in one object"),  # the last one silently won: a camera at 50 fps
    ('{"op": "add", "camera": {"id": "a", "url": "synthetic://street", "fps": NaN}}', "data: NaN is not JSON"),
    ('{"op": "update", "id": "a", "changes": {"stall_timeout_s": Infinity}}', "data: Infinity is not JSON"),
    ("[" * 100_000 + "]" * 100_000, "data: not valid JSON (nested too deeply)"),
])
def test_a_command_is_strict_json(data: str, reason: str) -> None:
    """The same reading as the HTTP API's bodies (pipeline/admission.py strict_json)."""
    from pipeline.admission import CommandRejected
    from pipeline.control import parse_command

    with pytest.raises(CommandRejected) as refused:
        parse_command({b"data": data.encode()})
    assert refused.value.reason == reason
