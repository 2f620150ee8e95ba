"""The Redis control stream (pipeline/control.py), `hydravision cameras` (pipeline/camera_commands.py) and
GroupConsumer (pipeline/consumer.py), a second look: commands left unapplied after a lost reply, commands dropped
with a neighbour that took the controller down, a dropped command's answer its sender could not recognise, a
sender's clock that is not the service's, a timeout that blamed the wrong command, a key given twice in
`--json`, two default-named consumers in one process sharing their messages, a consumer that stopped when Redis
restarted under its blocked read."""

from __future__ import annotations

import json
import threading
import time
import types

import pytest
import redis

from pipeline.cli import main
from pipeline.consumer import GroupConsumer
from pipeline.control import ControlConsumer
from running import wait_for
from servers import hold_lease

CONTROL, RESULTS = "hv:control", "hv:control:results"


class StandInApp:
    """What ControlConsumer calls on the App; ``crash_on``: an add of that camera takes the controller down."""

    def __init__(self, crash_on: str | None = None) -> None:
        self.crash_on = crash_on
        self.added: list[str] = []
        self.removed: list[str] = []

    def add_camera(self, camera: dict, by: str) -> dict:
        if camera["id"] == self.crash_on:
            raise ControllerDied(camera["id"])
        self.added.append(camera["id"])
        return {"id": camera["id"]}

    def remove_camera(self, camera_id: str, by: str) -> dict:
        self.removed.append(camera_id)
        return {"id": camera_id}

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        pass


class ControllerDied(BaseException):
    """Ends the reader's thread as the controller's death would: mid-command, nothing answered or acknowledged."""


def add(client: redis.Redis, camera: str) -> None:
    command = {"op": "add", "camera": {"id": camera, "url": "synthetic://street"}, "request_id": camera}
    client.xadd(CONTROL, {"data": json.dumps(command)})


def answers(client: redis.Redis) -> dict[str, dict]:
    """The answers on the results stream by request_id, else by command id (a second answer to one command fails
    the test)."""
    out: dict[str, dict] = {}
    for _, fields in client.xrange(RESULTS):
        answer = json.loads(fields[b"data"])
        key = answer["request_id"] or answer["command"]
        assert key not in out, f"answered twice: {answer}"
        out[key] = answer
    return out


def _the_one_answer(client, url: str) -> tuple[dict, "StandInApp"]:
    """A service started now (a ControlConsumer over a stand-in app): its one answer on the results stream."""
    app = StandInApp()
    consumer = ControlConsumer(app, url, "hv").start()
    try:
        [answer] = wait_for(lambda: list(answers(client).values()), 10, "the service's answer")
    finally:
        consumer.stop()
    return answer, app


# -- the control stream's reader -----------------------------------------------------------------------------

def test_a_command_whose_read_reply_was_lost_is_applied_without_a_restart(redis_server):
    """XREADGROUP hands its entries to the consumer when Redis runs it: if the reply is lost (a socket timeout on
    a Redis that froze, a connection reset), the commands are pending under the controller's name. The reader
    retried with ">" (new commands only): the command was never answered, and applied only at the next
    controller's start, days later perhaps, or never."""
    client = redis_server.client()
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv")
    real, lost = consumer._client.xreadgroup, []

    def reply_lost(*args, **kwargs):
        reply = real(*args, **kwargs)
        if reply and reply[0][1] and not lost:
            lost.append(reply)
            raise redis.ConnectionError("Connection reset by peer while reading the reply")
        return reply

    consumer._client.xreadgroup = reply_lost
    consumer.start()
    try:
        add(client, "lobby")
        wait_for(lambda: "lobby" in answers(client), 8, "the answer to the command whose reply was lost")
    finally:
        consumer.stop()
    assert lost, "the reply was never lost: the test did not test it"
    assert answers(client)["lobby"]["status"] == "accepted"
    assert app.added == ["lobby"]
    assert client.xpending(CONTROL, "hydravision")["pending"] == 0


def test_a_command_that_takes_the_controller_down_is_dropped_alone(redis_server, monkeypatch):
    """A command that kills the controller is dropped after 3 deliveries. The restarted reader read its own
    unacknowledged commands ten at a time, and each read counted a delivery of all ten: after three crashes the
    commands queued behind the bad one, never tried, were dropped with it ("dropped after 3 deliveries")."""
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the deaths are the test's own
    client = redis_server.client()
    for camera in ("bad", "good1", "good2"):
        add(client, camera)
    for _ in range(3):  # three controllers, each killed by the same command
        consumer = ControlConsumer(StandInApp(crash_on="bad"), redis_server.url, "hv").start()
        wait_for(lambda: not consumer._thread.is_alive(), 10, "the controller to die on the bad command")
        consumer.stop()
    app = StandInApp(crash_on="bad")
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        wait_for(lambda: len(answers(client)) == 3, 10, "answers to the three commands")
    finally:
        consumer.stop()
    got = list(answers(client).values())
    dropped = [a["reason"] for a in got if a["status"] == "rejected"]
    assert len(dropped) == 1 and dropped[0].startswith("data: dropped after 3 deliveries"), got
    assert app.added == ["good1", "good2"]
    assert client.xpending(CONTROL, "hydravision")["pending"] == 0


def test_a_dropped_command_is_answered_under_its_request_id(redis_server):
    """The delivery count was checked before the command was read: the answer to a command dropped after 3
    deliveries had no request_id (nor op, camera): its sender never recognised it, waited out its timeout and
    was told that a service "may still apply it"."""
    client = redis_server.client()
    client.xgroup_create(CONTROL, "hydravision", id="0", mkstream=True)
    add(client, "bad")
    client.xreadgroup("hydravision", "controller", {CONTROL: ">"}, count=1)
    for _ in range(3):  # three controllers that died on it
        client.xreadgroup("hydravision", "controller", {CONTROL: "0"}, count=1)
    answer, app = _the_one_answer(client, redis_server.url)
    assert answer["reason"].startswith("data: dropped after 3 deliveries")
    assert (answer["request_id"], answer["op"], answer["camera"]) == ("bad", "add", "bad")
    assert app.added == []


def test_normal_path_guard_commands_are_applied_once_in_order(redis_server):
    """Normal-path guard (passes before and after): a batch of commands is applied and answered once each, in
    order, and a restarted reader applies none of them again."""
    client = redis_server.client()
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        for camera in ("a", "b", "c"):
            add(client, camera)
        wait_for(lambda: len(answers(client)) == 3, 10, "three answers")
    finally:
        consumer.stop()
    again = StandInApp()
    consumer = ControlConsumer(again, redis_server.url, "hv").start()
    try:
        add(client, "d")
        wait_for(lambda: len(answers(client)) == 4, 10, "the fourth answer")
    finally:
        consumer.stop()
    assert app.added == ["a", "b", "c"] and again.added == ["d"]


# -- `hydravision cameras` over Redis ------------------------------------------------------------------------

def test_a_command_read_but_not_yet_answered_is_said_to_be_read_after_other_answers(redis_server, capsys):
    """The CLI's loop over the results stream reused the name of the command's entry id: after any other answer
    (another sender's command, answered while ours was being applied), the timeout looked up that answer's id
    and said "no service read the command: it expires unapplied" of a command the service had read and was still
    applying. The user sent it again, and the camera was added twice."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    client = redis_server.client()
    client.xgroup_create(CONTROL, "hydravision", id="$", mkstream=True)

    def busy_service() -> None:  # reads the command, answers an earlier one, and is still applying ours
        client.xreadgroup("hydravision", "controller", {CONTROL: ">"}, count=1, block=10_000)
        time.sleep(0.01)  # the other answer's id is at least a millisecond later than the command's
        client.xadd(RESULTS, {"data": json.dumps({"request_id": "someone-else", "status": "accepted"})})

    service = threading.Thread(target=busy_service)
    service.start()
    code = main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "1.5"])
    service.join()
    err = capsys.readouterr().err
    assert code == 2
    assert "a service read the command and may still apply it" in err, err


def _skewed_clock(monkeypatch, offset_s: float, module: str = "camera_commands") -> None:
    """A machine's wall clock ``offset_s`` off (its monotonic clock, for waits, is fine): the CLI's by default,
    the service's with module "control"."""
    import importlib

    fake = types.SimpleNamespace(time=lambda: time.time() + offset_s, monotonic=time.monotonic, sleep=time.sleep)
    # raising=False: the CLI's module reads no clock of its own today (expires is on Redis's); one it came to
    # import would be this skewed one here
    monkeypatch.setattr(importlib.import_module(f"pipeline.{module}"), "time", fake, raising=False)


def _remove_lobby_through_a_service(url: str) -> tuple[int, "StandInApp"]:
    """`hydravision cameras remove lobby` answered by a ControlConsumer: exit code, stderr, the stand-in app."""
    app = StandInApp()
    hold_lease(redis.Redis.from_url(url))  # a service holds its lease (none: the CLI refuses at once)
    consumer = ControlConsumer(app, url, "hv").start()
    try:
        code = main(["cameras", "remove", "lobby", "--redis-url", url, "--timeout", "60"])
    finally:
        consumer.stop()
    return code, app


def test_a_sender_whose_clock_is_behind_is_not_told_its_commands_expired(redis_server, monkeypatch, capsys):
    """`expires` was the CLI machine's clock plus --timeout: with that clock 10 minutes behind the service's,
    every command was rejected on arrival, "data.expires: the command expired 540 s ago, unapplied"."""
    _skewed_clock(monkeypatch, -600)
    code, app = _remove_lobby_through_a_service(redis_server.url)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("removed camera lobby") and app.removed == ["lobby"]


def test_a_command_said_to_expire_unapplied_is_not_applied_later_whatever_the_senders_clock(
        redis_server, monkeypatch, capsys):
    """The other way round: the CLI's clock 10 minutes ahead. No service ran; the CLI said the command "expires
    unapplied", and the controller started a minute later applied it all the same (it expired only 10 minutes
    later on the service's clock)."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    _skewed_clock(monkeypatch, 600)
    client = redis_server.client()
    assert main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "1"]) == 2
    assert "it expires unapplied" in capsys.readouterr().err
    assert client.xlen(CONTROL) == 0  # the CLI took it back at its timeout: nothing is left to apply
    add(client, "later")  # a service started now applies commands in order: this one's answer comes after
    answer, app = _the_one_answer(client, redis_server.url)
    assert (answer["request_id"], answer["status"]) == ("later", "accepted")
    assert app.removed == []


def test_normal_path_guard_a_sender_whose_acl_refuses_time_still_sends(redis_server, capsys):
    """Normal-path guard (passes before and after): the documented ACL for senders has no TIME; the CLI then
    sets `expires` on its own clock, as before."""
    client = redis_server.client()
    client.execute_command("ACL", "SETUSER", "ops", "on", ">opspw-0123456789", "resetkeys", "~hv:control",
                           "~hv:control:results", "+xadd", "+xread", "+xrevrange", "+acl|whoami")
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        url = redis_server.url.replace("redis://", "redis://ops:opspw-0123456789@")
        code = main(["cameras", "remove", "lobby", "--redis-url", url, "--timeout", "60"])
    finally:
        consumer.stop()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "removed camera lobby (as redis:ops)\n" and app.removed == ["lobby"]


# -- GroupConsumer ---------------------------------------------------------------------------------------------

def test_two_consumers_with_default_names_in_one_process_do_not_share_messages(redis_server):
    """GroupConsumer is one per thread, and its default name was host-pid: two in one process were one consumer
    to Redis. The second one's start re-read the pending list it shared with the first (XREADGROUP id 0) and
    handed out, as its own, the messages the first was still handling: each was handled twice."""
    client = redis_server.client()
    ids = [client.xadd("edges2:events", {"data": json.dumps({"i": i})}).decode() for i in range(3)]
    first = GroupConsumer(client, "edges2:events", "g", start="0", block_ms=100, claim_idle_ms=60_000)
    assert [m.id for m in first.read()] == ids  # being handled, not yet acknowledged
    second = GroupConsumer(client, "edges2:events", "g", block_ms=100, claim_idle_ms=60_000)
    assert second.consumer != first.consumer
    assert second.read() == []
    assert {r["consumer"].decode() for r in client.xpending_range("edges2:events", "g", "-", "+", 10)} \
        == {first.consumer}


def test_cameras_json_with_a_key_given_twice_is_refused_by_name(capsys):
    """`cameras add --json` read its object with json.loads, which keeps the last of a key given twice: the
    service, sent only that one, never saw the duplicate it refuses on every other way in (the API, the control
    stream, --yaml), and a camera meant for 5 fps ran at 50."""
    camera = '{"id": "a", "url": "synthetic://street", "fps": 5, "fps": 50}'
    assert main(["cameras", "add", "--api", "http://127.0.0.1:9", "--json", camera]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: --json: key 'fps' given twice in one object"], err


def test_a_consumer_blocked_in_its_read_goes_on_after_a_redis_restart(redis_server):
    """A Redis restarted without persistence: the module says the consumer creates its group again and goes on.
    But the read blocked in Redis when it went away fails with ConnectionError (redis-py connects again only on
    the next command, with no retries for a client from from_url, as in the module's example), and run() ended
    there: `tail --group` stopped, and any consumer that trusted the docs. It now waits Redis out."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    consumer = GroupConsumer(client, "edges2:events", "g", "w", block_ms=1000, claim_idle_ms=60_000)
    published: list[str] = []

    def restart_under_the_blocked_read() -> None:
        with redis_server.client() as admin:
            wait_for(lambda: any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in admin.client_list()),
                  10, "the consumer to block in XREADGROUP")
        redis_server.stop()
        redis_server.start()
        published.append(redis_server.client().xadd("edges2:events", {"data": "{}"}).decode())

    helper = threading.Thread(target=restart_under_the_blocked_read)
    helper.start()
    seen: list[str] = []
    deadline = time.monotonic() + 20
    try:
        consumer.run(lambda m: seen.append(m.id), stop=lambda: bool(seen) or time.monotonic() > deadline)
    finally:
        helper.join()
    assert seen == published
    assert redis_server.client().xpending("edges2:events", "g")["pending"] == 0


def test_a_service_whose_clock_is_ahead_still_applies_a_fresh_command(redis_server, monkeypatch, capsys):
    """The service compared `expires` with its own machine's clock: 10 minutes ahead of Redis's (which the
    sender writes `expires` on), it rejected every command as expired. Both sides read Redis's clock now."""
    _skewed_clock(monkeypatch, 600, module="control")
    code, app = _remove_lobby_through_a_service(redis_server.url)
    assert code == 0, capsys.readouterr().err
    assert app.removed == ["lobby"]


@pytest.mark.parametrize("user", ["team:ops", "ops/eu", "a*b"])
def test_a_redis_user_named_with_a_colon_can_send_commands(user):
    """`team:ops` is a common ACL user name (Redis takes `ops/eu` too); the CLI sends its WHOAMI as `user`, and the
    pattern refused it, so every `hydravision cameras` command of that user was rejected on data.user."""
    from pipeline.control import parse_command

    cmd = parse_command({b"data": json.dumps({"op": "remove", "id": "lobby", "user": user}).encode()})
    assert cmd.user == user


@pytest.mark.parametrize("user", ["two words", "line\nbreak", "", "x" * 65, "caf\u00e9"])
def test_a_sender_that_could_forge_a_log_line_is_refused(user):
    from pipeline.control import CommandRejected, parse_command

    with pytest.raises(CommandRejected, match="data.user"):
        parse_command({b"data": json.dumps({"op": "remove", "id": "lobby", "user": user}).encode()})


@pytest.mark.parametrize("every", [float("nan"), float("inf"), -1.0, "5", True])
def test_a_claim_interval_that_never_claims_is_refused_by_name(redis_server, every):
    """claim_every_s NaN: every comparison with it is false, so a dead member's entries were never claimed."""
    from pipeline.consumer import GroupConsumer

    with pytest.raises(ValueError, match="claim_every_s must be a finite number"):
        GroupConsumer(redis_server.client(), "hv:events", "g", claim_every_s=every)
