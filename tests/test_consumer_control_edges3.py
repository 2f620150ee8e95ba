"""GroupConsumer (pipeline/consumer.py), the Redis control stream (pipeline/control.py) and `hydravision cameras`
(pipeline/camera_commands.py), a third look: a crash-looping consumer that buried the good messages of its batch
with the poison one, commands nobody answered left in the stream for ever, a command applied while Redis
restarted that its sender never heard of, or that was applied twice."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from pipeline.cli import main
from pipeline.consumer import GroupConsumer
from pipeline.control import ControlConsumer
from running import wait_for
from servers import hold_lease

STREAM, CONTROL, RESULTS = "edges3:events", "hv:control", "hv:control:results"


# -- GroupConsumer: poison messages --------------------------------------------------------------------------

@pytest.mark.parametrize("restart", ["same name", "new name"])
def test_a_consumer_crash_looping_on_one_message_buries_that_one_only(restart: str, redis_server) -> None:
    """Redis counts a delivery of every entry a read or a claim returns: a consumer dying on message 3 of its
    batch, restarted under its name (its own pending entries, re-read) or under a new one (XAUTOCLAIM), had
    messages 4-9, never handed to it, counted with it each time, and all seven went to the dead stream."""
    client = redis_server.client()
    for i in range(10):
        client.xadd(STREAM, {"data": json.dumps({"i": i, "poison": i == 3})})
    handled: list[int] = []
    for life in range(10):
        consumer = GroupConsumer(client, STREAM, "g", "c" if restart == "same name" else f"c{life}", start="0",
                                 block_ms=50, claim_idle_ms=0 if restart == "new name" else 60_000, claim_every_s=0)
        died = False
        for _ in range(20):  # the life of one process: it dies on the poison message, nothing after it acked
            for m in consumer.read():
                if m.data["poison"]:
                    died = True
                    break
                consumer.ack(m)
                handled.append(m.data["i"])
            if died or len(handled) == 9:
                break
        if not died:
            break
    dead = [json.loads(f[b"data"])["i"] for _, f in client.xrange(f"{STREAM}:dead")]
    assert dead == [3]
    assert sorted(handled) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_normal_path_guard_messages_a_handler_keeps_failing_on_are_buried_together(redis_server) -> None:
    """Normal-path guard (passes before and after): run() tries every message of its batch, so three that its
    handler fails on are all buried once delivered more than max_deliveries times, not one batch after another."""
    client = redis_server.client()
    for i in range(5):
        client.xadd(STREAM, {"data": json.dumps({"i": i, "fails": i in (1, 2, 4)})})
    consumer = GroupConsumer(client, STREAM, "g", "c", start="0", block_ms=50, claim_idle_ms=0, claim_every_s=0,
                             max_deliveries=2)
    handled: list[int] = []

    def handle(m) -> None:
        if m.data["fails"]:
            raise ValueError("the handler's database is down")
        handled.append(m.data["i"])

    reads = 0

    def stop() -> bool:
        nonlocal reads
        reads += 1
        return consumer.stats["dead"] == 3 or reads > 50

    consumer.run(handle, stop=stop)
    dead = {json.loads(f[b"data"])["i"]: f[b"deliveries"] for _, f in client.xrange(f"{STREAM}:dead")}
    assert dead == {1: b"3", 2: b"3", 4: b"3"} and handled == [0, 3]


# -- `hydravision cameras`: commands nobody answered ---------------------------------------------------------

def test_a_command_nobody_answered_is_taken_back_at_the_timeout(redis_server, capsys) -> None:
    """No controller read the command: the CLI said it "expires unapplied" and left it in hv:control for ever,
    with the camera's password in its URL."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    client = redis_server.client()
    camera = '{"id": "door", "url": "rtsp://admin:s3cret-pw@cam.local/live"}'
    assert main(["cameras", "add", "--json", camera, "--redis-url", redis_server.url, "--timeout", "1"]) == 2
    assert "it expires unapplied" in capsys.readouterr().err
    assert client.xlen(CONTROL) == 0
    assert not [k for k in client.keys("*") if client.type(k) == b"stream"
                and any(b"s3cret" in v for _, f in client.xrange(k) for v in f.values())]


def test_normal_path_guard_a_sender_whose_acl_refuses_xdel_is_told_of_the_timeout(redis_server, capsys) -> None:
    """Normal-path guard (passes before and after): the sender's ACL may lack XDEL; the CLI still says what became
    of its command."""
    client = redis_server.client()
    client.execute_command("ACL", "SETUSER", "ops", "on", ">opspw-0123456789", "resetkeys", "~hv:control",
                           "~hv:control:results", "+xadd", "+xread", "+xrevrange", "+acl|whoami", "+time")
    url = redis_server.url.replace("redis://", "redis://ops:opspw-0123456789@")
    assert main(["cameras", "remove", "lobby", "--redis-url", url, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no answer on hv:control:results within 1 s: ") and "expires unapplied" in err, err


# -- a Redis restart while a command is applied --------------------------------------------------------------

class RestartingApp:
    """What ControlConsumer calls on the App; the first removal restarts Redis (empty, or as last SAVEd) under it:
    ``back_after_s`` None: back before the call returns, else that long after (in the answer's way)."""

    def __init__(self, server, back_after_s: float | None = None) -> None:
        self.server, self.back_after_s = server, back_after_s
        self.removed: list[str] = []
        self.restarted = threading.Event()
        self.starter: threading.Thread | None = None

    def remove_camera(self, camera_id: str, by: str) -> dict:
        if not self.restarted.is_set():  # once
            self.server.stop()
            if self.back_after_s is None:
                self.server.start()
            else:
                self.starter = threading.Timer(self.back_after_s, self.server.start)
                self.starter.start()
        self.removed.append(camera_id)
        self.restarted.set()
        return {"id": camera_id}

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        pass


def test_a_command_applied_while_redis_restarted_empty_is_answered(redis_server) -> None:
    """Redis went away while the controller applied the command and came back empty: the answer's retry found the
    group gone and took it for "the failed try's EXEC ran", so no answer was ever written and the sender waited
    out its timeout for a camera removed long before."""
    client = redis_server.client()
    app = RestartingApp(redis_server, back_after_s=0.3)
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        client.xadd(CONTROL, {"data": json.dumps({"op": "remove", "id": "lobby", "request_id": "r1"})})
        assert app.restarted.wait(10)
        app.starter.join(15)
        client = redis_server.client()
        [(_, fields)] = wait_for(lambda: client.xrange(RESULTS), 10, "the answer")
    finally:
        consumer.stop()
    answer = json.loads(fields[b"data"])
    assert (answer["request_id"], answer["status"], app.removed) == ("r1", "accepted", ["lobby"])


def test_the_cli_gets_its_answer_through_a_redis_restart(redis_server, capsys) -> None:
    """The controller answered in the restarted Redis, but the CLI had given up at the restart: "error: lost Redis
    at ...: ConnectionError" for a camera that was removed; sent again, it was refused as unknown."""
    app = RestartingApp(redis_server)
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        code = main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "30"])
    finally:
        consumer.stop()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("removed camera lobby") and app.removed == ["lobby"]


def test_the_cli_says_its_command_may_have_been_applied_when_redis_stays_away(redis_server, capsys) -> None:
    """Redis gone for the rest of the wait: the CLI says so, and that the command may have been applied."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    with redis_server.client() as client:

        def stop_once_sent() -> None:
            wait_for(lambda: client.xlen(CONTROL), 10, "the command", poll=0.01)
            redis_server.stop()

        stopper = threading.Thread(target=stop_once_sent)
        stopper.start()
        code = main(["cameras", "remove", "lobby", "--redis-url", redis_server.url, "--timeout", "3"])
        stopper.join()
    err = capsys.readouterr().err
    assert code == 2
    assert "lost Redis at" in err and "may have been applied" in err, err
    with pytest.raises(redis.ConnectionError):
        redis_server.client(socket_connect_timeout=1).ping()  # it really stayed away


def test_a_command_read_again_after_redis_restarted_a_second_behind_is_not_applied_twice(redis_server) -> None:
    """Redis restarted from persistence a moment behind (a snapshot, or appendfsync everysec) holds the command
    but not its delivery: the answer's retry found it not pending and took that for "answered", and the reader
    got it again and applied it a second time (a removal is then answered "no such camera" to a sender whose
    camera was removed). It is answered now, with the first application's result."""
    client = redis_server.client()
    client.xadd(CONTROL, {"data": json.dumps({"op": "remove", "id": "lobby", "request_id": "r1"})})
    client.xgroup_create(CONTROL, "hydravision", id="0")
    client.save()  # what Redis comes back with: the command, not yet read
    app = RestartingApp(redis_server, back_after_s=0.3)
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        assert app.restarted.wait(10)
        app.starter.join(15)
        client = redis_server.client()
        wait_for(lambda: client.xlen(CONTROL) == 0, 10, "the command to be answered and deleted")
    finally:
        consumer.stop()
    [(_, fields)] = client.xrange(RESULTS)
    answer = json.loads(fields[b"data"])
    assert (answer["request_id"], answer["status"], app.removed) == ("r1", "accepted", ["lobby"])
