"""How `hydravision run` ends and what it shows while it runs, as an operator meets it: the exit code and summary
of a run whose messages never reached Redis, /readyz for a camera slow to open, and a warning logged while the live
table draws. The App is a stand-in (no Ray, no model), as in tests/test_live_cli_edges6.py."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path

import pytest

from pipeline import run_commands
from pipeline.embedded_redis import free_port
from pipeline.logs import TEXT_FORMAT
from pipeline.metrics import ready
from pipeline.status import PipeSafeConsole
import test_live_cli_edges6
from test_metrics import Clock, FakeProbe, service, tick
from workers.publish import Publisher
from workers.settings import CameraConfig

REPO = Path(__file__).resolve().parent.parent


class StandInApp(test_live_cli_edges6.StandInApp):
    """What `run` calls on the App; ``finals``: what its shutdown returns, ``ticks``: the stats run() reports."""

    finals: list = []
    ticks: list = []
    events = None

    def shutdown(self, drain: bool = True) -> list[dict]:
        return self.finals


def final(camera: str, queued: int, state: str = "stopped") -> dict:
    """A camera's final stats as StreamActor.stop returns them: its publisher's stats taken after its close."""
    return {"camera": camera, "state": state, "published": 60,
            "publisher": {"sent": 60 - queued, "dropped": 0, "queued": queued, "connected": not queued}}


def args(**kw) -> argparse.Namespace:
    base = dict(config=str(REPO / "configs/demo.yaml"), summary_json=None, redis_url=None, plain=True,
                duration=None, log_every=0.0, log_format="text", verbose=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInApp]:
    monkeypatch.setattr(run_commands, "App", StandInApp)
    monkeypatch.setattr(StandInApp, "ticks", [])
    monkeypatch.setattr(StandInApp, "events", None)
    return StandInApp


def test_a_run_whose_messages_never_reached_redis_says_so_and_exits_3(stand_in, monkeypatch, capsys, tmp_path):
    """Redis never answered: the log said "publisher closed with 103 messages not delivered" from each camera's
    process, the final table "published 58", and the run exited 0, which scripts, systemd and k8s read as "all
    delivered". The controller's own events count too (its Publisher, closed by the shutdown, held them)."""
    events = Publisher(f"redis://127.0.0.1:{free_port()}/0", name="test-controller", connect_timeout_s=0.2)
    events.start()
    events.publish_event({"v": 1, "type": "camera_added", "camera": "street-2", "ts": 1.0})
    events.close(0.5)  # nobody listens there: the event stays in its buffer
    assert events.stats()["queued"] >= 1
    monkeypatch.setattr(StandInApp, "events", events)
    monkeypatch.setattr(StandInApp, "finals", [final("street-1", 103), final("street-2", 0)])
    summary = tmp_path / "summary.json"
    code = run_commands.run(args(summary_json=str(summary)))
    out = capsys.readouterr().out
    assert code == 3, out
    held = events.stats()["queued"]
    assert f"{103 + held} message(s) not delivered to Redis" in out, out
    assert (f"street-1 103 (103 left in its buffer at the stop), controller events {held} ({held} left in its "
            "buffer at the stop)") in out and "street-2" not in out.split("not delivered")[1], out
    assert [f["publisher"]["queued"] for f in json.loads(summary.read_text())] == [103, 0]


@pytest.mark.parametrize("finals, expected, said", [
    ([final("street-1", 0), final("street-2", 0)], 0, False),  # a healthy Redis took everything: as before
    ([{"camera": "street-1", "state": "unavailable"}], 0, False),  # a process that did not answer: no publisher stats
    ([final("street-1", 5, "failed"), final("street-2", 0, "failed")], 1, True),  # every camera failed says more
])
def test_a_run_keeps_its_exit_code_unless_messages_were_left(finals, expected, said, stand_in, monkeypatch, capsys):
    monkeypatch.setattr(StandInApp, "finals", finals)
    assert run_commands.run(args()) == expected
    assert ("5 message(s) not delivered" in capsys.readouterr().out) == said


def test_the_same_run_in_json_says_so_in_a_warning_record_with_the_counts(stand_in, monkeypatch, caplog):
    monkeypatch.setattr(StandInApp, "finals", [final("street-1", 7)])
    with caplog.at_level(logging.INFO, logger="hydravision"):
        assert run_commands.run(args(log_format="json")) == 3
    said = [r for r in caplog.records if "not delivered" in r.getMessage()]
    assert [(r.levelname, r.getMessage(), r.data) for r in said] == [(
        "WARNING", "7 message(s) not delivered to Redis: street-1 7 (7 left in its buffer at the stop)",
        {"event": "undelivered", "undelivered": {"street-1": 7}, "reasons": {"street-1": {"left": 7}}})], caplog.records


def test_messages_dropped_in_an_outage_are_not_delivered_either(stand_in, monkeypatch, capsys):
    """Redis away for long: the publisher's buffer (redis.buffer, 50 here) overflowed, the oldest dropped (398), and
    50 were left at the stop. The run said "50 message(s) not delivered" and the table "dropped 0": the 398 showed
    only in --summary-json's publisher.dropped (and a publisher_dropped event, had Redis come back)."""
    lost = dict(final("s1", 50), publisher={"sent": 110, "dropped": 398, "rejected": 2, "queued": 50})
    monkeypatch.setattr(StandInApp, "finals", [lost, final("s2", 0)])
    assert run_commands.run(args()) == 3
    out = capsys.readouterr().out
    assert ("450 message(s) not delivered to Redis: s1 450 (398 dropped, its buffer full while Redis was "
            "unreachable; 2 refused by Redis; 50 left in its buffer at the stop)") in " ".join(out.split()), out
    monkeypatch.setattr(StandInApp, "finals", [dict(final("s1", 0), publisher={"sent": 110, "dropped": 3})])
    assert run_commands.run(args()) == 3  # none left at the stop, but 3 never reached Redis


def test_readyz_waits_out_a_camera_opening_within_its_timeouts():
    """An RTSP camera with open_timeout_s 20 and stall_timeout_s 10 read "not ready" 10 s into its open, while the
    capture's watchdog still waited for it (the open's 20 s, then the first picture's read timeout)."""
    clock = Clock()
    cams = {"slow": CameraConfig(id="slow", url="rtsp://cam/slow", open_timeout_s=20, read_timeout_s=5,
                                 stall_timeout_s=10),
            "default": CameraConfig(id="default", url="rtsp://cam/d", open_timeout_s=2, read_timeout_s=2)}
    app = service(clock, cams)
    tick(app, clock, {"slow": "starting", "default": "running"})
    clock.now += 18
    tick(app, clock, {"slow": "starting", "default": "running"})
    ok, details = ready(app, FakeProbe())
    assert ok, details
    assert details["checks"]["cameras"]["cameras"]["slow"]["grace_s"] == 25
    clock.now += 8  # 26 s: past the open and the first picture's time
    tick(app, clock, {"slow": "starting", "default": "reconnecting"})
    ok, details = ready(app, FakeProbe())
    assert not ok and not details["checks"]["cameras"]["cameras"]["slow"]["ok"], details
    assert details["checks"]["cameras"]["cameras"]["default"]["grace_s"] == 8  # stall_timeout's default: as before


class Terminal(io.StringIO):
    """The terminal that the table and the log share (stdout and stderr of an interactive run)."""

    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: only the controls rich's Live writes (carriage return, erase line,
    cursor up, cursor show/hide) are applied. Hand-written: no terminal emulator is among the dependencies."""
    lines, row = [""], 0
    for part in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)", text):
        if part == "\n":
            row += 1
            lines += [""] * (row + 1 - len(lines))
        elif part == "\r":
            lines[row] = lines[row]  # the column is not tracked: rich erases the line after each return
        elif part == "\x1b[2K":
            lines[row] = ""
        elif m := re.fullmatch(r"\x1b\[(\d*)A", part):
            row = max(0, row - int(m.group(1) or 1))
        elif not part.startswith("\x1b"):
            lines[row] += part
    return lines


def test_a_warning_logged_while_the_live_table_draws_prints_above_it(stand_in, monkeypatch):
    """A camera turning failed logs a WARNING while the live table is up: logging's handler wrote it to the
    terminal between the table's redraws, and the next redraw moved up over it: the line was half erased, the
    table torn. It prints above the table now, once and whole, and the table goes on below it."""
    term = Terminal()
    console = PipeSafeConsole(file=term, force_terminal=True, color_system=None, width=120, height=60)
    monkeypatch.setattr(run_commands, "make_console", lambda: console)
    running = {"camera": "street-1", "state": "running", "published": 3}
    failed = {"camera": "street-2", "state": "failed", "published": 0, "last_error": "no such file: /x.mp4"}
    monkeypatch.setattr(StandInApp, "ticks", [[running, {**failed, "state": "running"}], [running, failed],
                                              [{**running, "published": 9}, failed]])
    monkeypatch.setattr(StandInApp, "finals", [final("street-1", 0), final("street-2", 0, "failed")])
    handler = logging.StreamHandler(term)  # as basicConfig's on stderr, the same terminal
    handler.setFormatter(logging.Formatter(TEXT_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        assert run_commands.run(args(plain=False)) == 0
    finally:
        root.removeHandler(handler)
    shown = screen(term.getvalue())
    warning = [i for i, line in enumerate(shown) if "camera street-2 failed" in line]
    assert len(warning) == 1, "\n".join(shown)
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING pipeline\.run_commands: camera street-2 failed: no such file: "
                        r"/x\.mp4", shown[warning[0]]), "\n".join(shown)
    below = shown[warning[0] + 1:]
    # the live table's last frame, whole, under the warning; then the stop and the final table
    assert below[0].strip() == "hydravision" and below[1].startswith("┏"), "\n".join(shown)
    assert any("street-1" in line and " 9 " in line for line in below), "\n".join(shown)
    assert sum(line.startswith("┏") for line in shown) == 2, "\n".join(shown)  # the live table's and the final's
    assert sum(line.startswith("└") for line in shown) == 2, "\n".join(shown)
    assert handler.stream is term  # the handler has its own stream back after the run


def test_a_run_whose_every_camera_failed_before_a_tick_says_why(stand_in, monkeypatch, caplog):
    """One camera whose file does not exist: the run ended (exit 1) before a tick saw it failed, and nothing said
    why but the last column of the final table."""
    monkeypatch.setattr(StandInApp, "finals", [{**final("cam-a", 0, state="failed"),
                                                 "last_error": "/videos/nosuch.mp4: no such file"}])
    with caplog.at_level(logging.WARNING):
        assert run_commands.run(args()) == 1
    assert "camera cam-a failed: /videos/nosuch.mp4: no such file" in caplog.text
