"""The Redis control stream (pipeline/control.py's ControlConsumer) applying commands side by side, in front of a
stand-in App (no Ray): an add that waits for its camera's process held up every later stream command (a list, a
remove of another camera) for as long as the camera took to start, while the HTTP API ran them at once."""

from __future__ import annotations

import json
import threading

import pytest
import redis

import pipeline.control as control
from pipeline.admission import CommandRejected
from pipeline.control import ControlConsumer
from running import wait_for

CONTROL, RESULTS = "hv:control", "hv:control:results"


class SlowApp:
    """What ControlConsumer calls on the App. An add of a camera in ``slow`` waits for ``release`` (a camera whose
    process takes long to start); a second command on a camera being changed is refused (409), as App._claim."""

    def __init__(self, slow: tuple[str, ...] = ()) -> None:
        self.slow, self.release = set(slow), threading.Event()
        self.lock = threading.Lock()
        self.applied: list[tuple[str, str]] = []
        self.busy: set[str] = set()
        self.running = self.most = 0

    def _change(self, op: str, camera_id: str) -> dict:
        with self.lock:
            if camera_id in self.busy:
                raise CommandRejected(f"camera.id: camera {camera_id!r} is being changed by another command", 409)
            self.busy.add(camera_id)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if op == "add" and camera_id in self.slow:
                self.release.wait(30)
            with self.lock:
                self.applied.append((op, camera_id))
        finally:
            with self.lock:
                self.busy.discard(camera_id)
                self.running -= 1
        return {"id": camera_id}

    def add_camera(self, camera: dict, by: str) -> dict:
        return self._change("add", camera["id"])

    def remove_camera(self, camera_id: str, by: str) -> dict:
        return self._change("remove", camera_id)

    def list_cameras(self) -> list[dict]:
        with self.lock:
            return [{"id": camera_id} for op, camera_id in self.applied if op == "add"]

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        pass


def send(client: redis.Redis, request_id: str, **command) -> None:
    client.xadd(CONTROL, {"data": json.dumps({**command, "request_id": request_id})})


def add(client: redis.Redis, camera: str) -> None:
    send(client, f"add {camera}", op="add", camera={"id": camera, "url": "synthetic://street"})


def answers(client: redis.Redis) -> dict[str, dict]:
    """The answers by request_id (a second answer to one command fails the test)."""
    out: dict[str, dict] = {}
    for _, fields in client.xrange(RESULTS):
        answer = json.loads(fields[b"data"])
        assert answer["request_id"] not in out, f"answered twice: {answer}"
        out[answer["request_id"]] = answer
    return out


def command_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "redis-control-command"]


def answered(client: redis.Redis, *request_ids: str) -> bool:
    got = answers(client)
    return all(r in got for r in request_ids)


def test_a_slow_add_holds_up_no_list_and_no_other_cameras_remove(redis_server):
    """The reader applied one command at a time: a list, and a remove of another camera, sent after an add whose
    camera took long to start, were answered only once that camera ran (tens of seconds on a busy cluster)."""
    client = redis_server.client()
    app = SlowApp(slow=("door",))
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        add(client, "door")
        send(client, "list", op="list")
        send(client, "remove lobby", op="remove", id="lobby")
        wait_for(lambda: answered(client, "list", "remove lobby"), 10, "the list and the remove (add held)", poll=0.05)
        assert "add door" not in answers(client) and app.applied == [("remove", "lobby")]
        app.release.set()
        wait_for(lambda: answered(client, "add door"), 10, "the add's answer", poll=0.05)
    finally:
        app.release.set()
        consumer.stop()
    assert {r: a["status"] for r, a in answers(client).items()} == {
        "add door": "accepted", "list": "accepted", "remove lobby": "accepted"}
    assert client.xpending(CONTROL, "hydravision")["pending"] == 0 and client.xlen(CONTROL) == 0


def test_commands_on_one_camera_apply_in_stream_order_beside_a_slow_one(redis_server):
    """An add then a remove of one camera are applied in that order (the App refuses a command on a camera another
    one is changing, 409), while a list sent after them is answered at once."""
    client = redis_server.client()
    app = SlowApp(slow=("door",))
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        add(client, "door")
        send(client, "remove door", op="remove", id="door")
        send(client, "list", op="list")
        wait_for(lambda: answered(client, "list"), 10, "the list, the add held", poll=0.05)
        assert app.applied == [] and not answered(client, "remove door")
        app.release.set()
        wait_for(lambda: answered(client, "add door", "remove door"), 10, "both answers", poll=0.05)
    finally:
        app.release.set()
        consumer.stop()
    assert app.applied == [("add", "door"), ("remove", "door")]
    assert [answers(client)[r]["status"] for r in ("add door", "remove door")] == ["accepted", "accepted"]


def test_stop_waits_for_the_command_under_way_and_leaves_the_one_behind_it_pending(redis_server):
    """stop() lets the add under way finish and answer (within its timeout); the remove queued behind it on its
    camera is not started: it stays pending, and the next controller applies it."""
    client = redis_server.client()
    app = SlowApp(slow=("door",))
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    stopper = threading.Thread(target=consumer.stop, kwargs={"timeout_s": 30})
    try:
        add(client, "door")
        send(client, "remove door", op="remove", id="door")
        send(client, "list", op="list")
        wait_for(lambda: answered(client, "list"), 10, "the list, the add held", poll=0.05)
        stopper.start()
        stopper.join(0.5)
        assert stopper.is_alive(), "stop() returned while a command was under way"
        app.release.set()
        stopper.join(10)
        assert not stopper.is_alive(), "stop() did not return once the command under way was answered"
    finally:
        app.release.set()
        consumer.stop()
    assert app.applied == [("add", "door")] and answers(client)["add door"]["status"] == "accepted"
    assert client.xpending(CONTROL, "hydravision")["pending"] == 1  # the remove, for the next controller
    following = SlowApp()
    consumer = ControlConsumer(following, redis_server.url, "hv").start()
    try:
        wait_for(lambda: answered(client, "remove door"), 10, "the next controller's answer to the remove", poll=0.05)
    finally:
        consumer.stop()
    assert following.applied == [("remove", "door")]


def test_a_flood_of_slow_commands_runs_a_bounded_number_at_once(redis_server, monkeypatch):
    """Commands run side by side up to MAX_AT_ONCE; the rest wait in Redis (no thread each), and all are applied
    once the slow ones end."""
    monkeypatch.setattr(control, "MAX_AT_ONCE", 3, raising=False)
    client = redis_server.client()
    cameras = [f"cam{i}" for i in range(8)]
    app = SlowApp(slow=tuple(cameras))
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        for camera in cameras:
            add(client, camera)
        wait_for(lambda: app.running == 3, 10, "three adds at once", poll=0.05)
        assert len(command_threads()) <= 3 and not answers(client)
        app.release.set()
        wait_for(lambda: answered(client, *(f"add {c}" for c in cameras)), 15, "every add's answer", poll=0.05)
    finally:
        app.release.set()
        consumer.stop()
    assert app.most == 3 and sorted(c for _, c in app.applied) == cameras


def test_a_redis_blip_while_a_slow_add_runs_neither_applies_nor_answers_it_twice(redis_server):
    """The reader goes on reading while an add runs: a read that fails then (a Redis blip) reads this consumer's
    own pending commands again, the add among them; it is applied and answered once."""
    client = redis_server.client()
    app = SlowApp(slow=("door",))
    consumer = ControlConsumer(app, redis_server.url, "hv")
    real, blips = consumer._client.xreadgroup, []

    def blip_once_the_add_runs(*args, **kwargs):
        if app.running and not blips:
            blips.append(args)
            raise redis.ConnectionError("Connection reset by peer")
        return real(*args, **kwargs)

    consumer._client.xreadgroup = blip_once_the_add_runs
    consumer.start()
    try:
        add(client, "door")
        wait_for(lambda: blips, 10, "the blip while the add runs", poll=0.05)
        send(client, "list", op="list")
        wait_for(lambda: answered(client, "list"), 10, "the list after the blip, the add held", poll=0.05)
        app.release.set()
        wait_for(lambda: answered(client, "add door"), 10, "the add's answer", poll=0.05)
        wait_for(lambda: client.xpending(CONTROL, "hydravision")["pending"] == 0, 10, "nothing pending", poll=0.05)
        # the add read again waits behind itself in its camera's lane: once that ended, any second answer is there
        wait_for(lambda: not command_threads(), 10, "the commands' threads to end", poll=0.05)
    finally:
        app.release.set()
        consumer.stop()
    assert app.applied == [("add", "door")] and len(answers(client)) == 2


@pytest.mark.parametrize("fields, camera", [
    ({b"data": b'{"op": "add", "camera": {"id": "a"}, "id": "b"}'}, "a"),
    ({b"data": b'{"op": "remove", "id": "a"}'}, "a"),
    ({b"data": b'{"op": "list"}'}, None),
    ({b"data": b"[" * 100_000}, None),
    ({b"data": b'{"op": "remove", "id": 7}'}, None),
    ({}, None),
])
def test_a_commands_camera_is_read_leniently(fields: dict, camera: str | None) -> None:
    """What orders a command after others on its camera: an add's camera.id (what it adds), else its id."""
    assert control._camera_of(fields) == camera


def test_commands_queued_behind_a_slow_one_on_its_camera_hold_up_no_other_camera(redis_server):
    """Each command read took one of the MAX_AT_ONCE slots, also those only queued behind a slow add on their
    camera: a held add and eight removes of that camera (a script retrying) took them all, and a list and another
    camera's remove waited for the slow add again."""
    client = redis_server.client()
    app = SlowApp(slow=("door",))
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        add(client, "door")
        wait_for(lambda: app.running == 1, 10, "door's add to run", poll=0.05)
        for i in range(control.MAX_AT_ONCE):
            send(client, f"remove door {i}", op="remove", id="door")
        send(client, "list", op="list")
        send(client, "remove lobby", op="remove", id="lobby")
        wait_for(lambda: answered(client, "list", "remove lobby"), 10, "the list and lobby's remove", poll=0.05)
    finally:
        app.release.set()
        consumer.stop()


def test_a_command_the_stream_refuses_itself_names_its_camera(redis_server):
    """An expired (or undeliverable) command is refused by the control stream before the App sees it: its log
    line named no camera, while the App's own refusals did."""
    client = redis_server.client()
    refused: list[tuple] = []

    class Recording(SlowApp):
        def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
            refused.append((op, camera, reason.split(":")[0]))

    consumer = ControlConsumer(Recording(slow=()), redis_server.url, "hv").start()
    try:
        send(client, "remove door", op="remove", id="door", expires=1.0)  # long past
        wait_for(lambda: answered(client, "remove door"), 10, "the expired remove's answer", poll=0.05)
    finally:
        consumer.stop()
    assert refused == [("remove", "door", "data.expires")]


def test_a_command_answered_after_redis_restarted_empty_and_the_reader_made_the_group_again(redis_server):
    """The reader reads on while a command is applied: Redis restarted empty in the command's way, the reader made
    the stream and its group again before the answer's retry, and that retry took "not pending" for "the failed
    try went through": no answer was written, and the sender waited out its timeout (it failed once in the suite)."""
    from test_consumer_control_edges3 import RestartingApp

    class ReaderFirst(RestartingApp):
        def _back(self) -> None:  # Redis back, and the group made again at once, as the reader does
            self.server.start()
            self.server.client().xgroup_create(CONTROL, "hydravision", id="0", mkstream=True)

        def remove_camera(self, camera_id: str, by: str) -> dict:
            if not self.restarted.is_set():
                self.server.stop()
                self.starter = threading.Timer(0.2, self._back)
                self.starter.start()
            self.removed.append(camera_id)
            self.restarted.set()
            return {"id": camera_id}

    client = redis_server.client()
    app = ReaderFirst(redis_server, back_after_s=0.2)
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        send(client, "r1", op="remove", id="lobby")
        assert app.restarted.wait(10)
        app.starter.join(15)
        client = redis_server.client()
        wait_for(lambda: answered(client, "r1"), 10, "the answer", poll=0.05)
    finally:
        consumer.stop()
    assert answers(client)["r1"]["status"] == "accepted" and app.removed == ["lobby"]
