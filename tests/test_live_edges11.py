"""Live control, an eleventh audit (pipeline/control.py, pipeline/camera_commands.py): `hydravision cameras` sent
`--fps nan` (or a YAML `.inf`) as invalid JSON and the service refused "body: NaN is not JSON", naming no field; the
control stream read a refused command's body up to three more times; and a new command at an entry id the stream
had used before (a stream deleted, a Redis restarted empty, explicit ids) was answered with the old command's
result, unapplied. Real Redis; a stand-in App (no Ray), as in tests/test_control_concurrency9.py."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import redis

import pipeline.control as control
from pipeline.cli import main
from pipeline.control import ControlConsumer
from running import wait_for

CONTROL, RESULTS = "hv:control", "hv:control:results"


def _closed_port() -> int:
    """A port nothing listens on: a command that reached the network would be refused there, not named."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


class StandInApp:
    """What ControlConsumer calls on the App: updates are recorded, refusals noted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.updated: list[dict] = []
        self.rejected: list[tuple[str, object]] = []

    def update_camera(self, camera_id: str, changes: dict, by: str) -> dict:
        with self.lock:
            self.updated.append(changes)
        return {"id": camera_id, "changed": sorted(changes), "restarted": False}

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        self.rejected.append((reason, camera))


# -- `hydravision cameras`: a number JSON cannot carry is named by its field --------------------------------------

@pytest.mark.parametrize("argv, field", [
    (["update", "lobby", "--fps", "nan"], "camera.fps: nan"),
    (["add", "--id", "lobby", "--url", "synthetic://street", "--fps", "inf"], "camera.fps: inf"),
    (["update", "lobby", "--yaml", "{yaml}"], "camera.tracker.track_activation_threshold: nan"),
    (["add", "--yaml", "{cameras}"], "cameras[1].fps: inf"),
])
def test_the_cli_names_the_field_of_a_nan_or_infinite_number(argv: list[str], field: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """`--fps nan` (or `.nan` in --yaml) was sent as JSON's invalid NaN: the service refused the whole body ("body:
    NaN is not JSON"), naming no field. Refused here, before anything is sent, by the field's path."""
    one, several = tmp_path / "one.yaml", tmp_path / "cameras.yaml"
    one.write_text("tracker:\n  track_activation_threshold: .nan\n")
    several.write_text("cameras:\n  - id: a\n    url: synthetic://street\n"
                       "  - id: b\n    url: synthetic://street\n    fps: .inf\n")
    argv = [a.format(yaml=one, cameras=several) for a in argv]
    assert main(["cameras", *argv, "--api", f"http://127.0.0.1:{_closed_port()}", "--timeout", "5"]) == 2
    out, err = capsys.readouterr()
    assert _error_lines(err) == [f"error: {field} is not a finite number (JSON has no NaN or Infinity)"], err
    assert out == ""


# -- the control stream reads a refused command's body once ------------------------------------------------------

def test_a_refused_commands_body_is_read_leniently_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command refused by its schema had its body (up to 1 MiB) parsed for the answer's op, again for its
    request_id and again for the log's camera: the strict read and one lenient read are enough."""
    app = StandInApp()
    consumer = ControlConsumer(app, f"redis://127.0.0.1:{_closed_port()}/0", "hv")  # this test sends no command
    raw = json.dumps({"op": "update", "id": "lobby", "changes": {"fps": 5}, "priority": 1, "request_id": "r1",
                      "padding": "x" * 100_000}).encode()
    reads, loads = [], json.loads

    def counting(text, *args, **kwargs):
        if text is raw:
            reads.append(1)
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    answer = consumer._apply("1-1", {b"data": raw}, redelivered=False)
    assert (answer["status"], answer["op"], answer["request_id"], answer["code"]) == ("rejected", "update", "r1", 422)
    assert app.rejected and app.rejected[0][1] == "lobby", app.rejected  # the log still names its camera
    assert len(reads) == 2, f"the body was parsed {len(reads)} times"


# -- an entry id used again ------------------------------------------------------------------------------------------

def test_a_new_command_at_an_entry_id_used_before_is_applied_not_answered_from_the_old_one(redis_server) -> None:
    """The controller keeps its last results by entry id, to answer a command read again after a restart once.
    A stream deleted (or a Redis restarted empty) takes explicit ids again: a new command at an old id got the old
    command's answer, under the old request_id, and was never applied."""
    client = redis_server.client()
    app = StandInApp()
    consumer = ControlConsumer(app, redis_server.url, "hv").start()
    try:
        client.xadd(CONTROL, {"data": json.dumps({"op": "update", "id": "lobby", "changes": {"fps": 5},
                                                  "request_id": "r1"})}, id="5-1")
        first = control.await_answer(client, RESULTS, "r1", "0-0", 20)
        assert first is not None and first["status"] == "accepted", first
        client.delete(CONTROL)  # the operator clears the stream (or Redis restarted empty): ids start again
        client.xadd(CONTROL, {"data": json.dumps({"op": "update", "id": "lobby", "changes": {"fps": 7},
                                                  "request_id": "r2"})}, id="5-1")

        def next_answer() -> dict | None:
            entries = client.xrange(RESULTS)
            return json.loads(entries[1][1][b"data"]) if len(entries) > 1 else None

        second = wait_for(next_answer, 20, "the second command's answer", poll=0.05)
    finally:
        consumer.stop()
    assert (second["request_id"], second["status"]) == ("r2", "accepted"), second
    assert app.updated == [{"fps": 5}, {"fps": 7}]


def test_a_command_read_again_is_answered_from_its_result_also_once_its_sender_deleted_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the result cache is for stays: the same command read again (a Redis blip) gets its first answer, not a
    second application; so does one whose sender took it back meanwhile (read back with no fields)."""
    consumer = ControlConsumer(StandInApp(), f"redis://127.0.0.1:{_closed_port()}/0", "hv")
    applied, answered = [], []
    monkeypatch.setattr(consumer, "_apply", lambda entry_id, fields, redelivered: applied.append(fields) or
                        {"command": entry_id, "n": len(applied)})
    monkeypatch.setattr(consumer, "_answer", lambda entry_id, result, check_first=False:
                        answered.append((result["n"], check_first)) or True)
    fields = {b"data": b'{"op": "list"}'}
    consumer._handle("1-1", fields, redelivered=False)
    consumer._handle("1-1", dict(fields), redelivered=True)
    consumer._handle("1-1", {}, redelivered=True)
    assert applied == [fields] and answered == [(1, False), (1, True), (1, True)]
    consumer._handle("1-1", {b"data": b'{"op": "export"}'}, redelivered=False)  # another command at that id
    assert len(applied) == 2 and answered[-1] == (2, False)
