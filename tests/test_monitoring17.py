"""What an operator wiring `hydravision run --log-format json` into monitoring found:

1. A crashed and restarted worker and the Ray head lost were INFO records (an alert on level >= warning missed
   both), and the run that stopped on the head lost (exit 4) wrote no exit record (``event: exit``) at its end, as
   the other early ends do.
2. The control stream said its Redis failure (one WARNING) and never that it read again; the publishers do.
3. README: removed cameras' series on /metrics, and log files (copytruncate; SIGUSR1 reopens nothing).
Without Ray: the App's methods on stand-ins, `run` with a stand-in App (as tests/test_crash_counts10.py does)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from pipeline import run_commands
from pipeline.app import App
from pipeline.config import parse_config
from pipeline.control import ControlConsumer
from pipeline.logs import JsonFormatter
from running import wait_for

REPO = Path(__file__).resolve().parent.parent
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture
def signals_kept():
    """`run` installs its signal handlers in this process: the test's end puts pytest's back."""
    before = {s: signal.getsignal(s) for s in HANDLED}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def json_records(caplog) -> list[dict]:
    """The records of logger "hydravision" as the JSON lines `--log-format json` writes."""
    return [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "hydravision"]


# -- 1. levels and the exit record ----------------------------------------------------------------------------------

def test_a_crashed_and_restarted_worker_is_a_warning_record(caplog):
    caplog.set_level(logging.INFO, logger="hydravision")
    app = App(parse_config({"cameras": []}), say=run_commands.Output(Console(), json_mode=True).say)
    app._report_restart("stream", "bunny", "stream actor of camera bunny crashed and was restarted",
                        ("camera", "bunny"))
    app._report_restart("inference", "*", "inference replica 0 crashed and was restarted", ("inference", 0))
    assert [(r["level"], r["msg"]) for r in json_records(caplog)] == [
        ("warning", "stream actor of camera bunny crashed and was restarted"),
        ("warning", "inference replica 0 crashed and was restarted")]


def test_a_say_that_takes_no_level_gets_the_text_alone():
    """print, and the tests' stand-ins (a list's append), are App's say too: a level passed to them raised."""
    said: list[str] = []
    app = App(parse_config({"cameras": []}), say=said.append)
    app._report_restart("stream", "bunny", "stream actor of camera bunny crashed and was restarted")
    app.head_watch = SimpleNamespace(limit_s=60.0)
    app._head_lost(26.0)
    assert said[0] == "stream actor of camera bunny crashed and was restarted"
    assert said[1].startswith("Ray: the head (GCS) has not answered for 26 s"), said


class HeadLostApp:
    """What `run` calls on the App: one tick, then the Ray head lost (App._head_lost itself), then the stop."""

    def __init__(self, config, redis_url=None, say=print, on_ray_started=None) -> None:
        self.say, self.cameras, self._stop = say, {}, threading.Event()
        self.head_watch, self.head_lost = SimpleNamespace(limit_s=60.0), None

    def install_signal_handlers(self) -> None:
        pass

    def start(self) -> None:
        pass

    def run(self, duration=None, on_tick=None) -> list[dict]:
        on_tick([{"camera": "bunny", "state": "running", "published": 10}])
        App._head_lost(self, 25.4)
        return []

    def shutdown(self, drain: bool = True) -> list[dict]:
        return [{"camera": "bunny", "state": "stopped", "published": 12}]


def run_losing_the_head(monkeypatch, log_format: str) -> int:
    monkeypatch.setattr(run_commands, "App", HeadLostApp)
    args = argparse.Namespace(config=str(REPO / "configs/demo.yaml"), summary_json=None, redis_url=None, plain=True,
                              duration=None, log_every=0.0, log_format=log_format, verbose=False)
    return run_commands.run(args)


def test_the_head_lost_is_an_error_and_the_run_ends_with_the_exit_record(monkeypatch, caplog, signals_kept):
    caplog.set_level(logging.INFO, logger="hydravision")
    assert run_losing_the_head(monkeypatch, "json") == run_commands.HEAD_LOST_EXIT == 4
    records = json_records(caplog)
    [lost] = [r for r in records if "has not answered for 25 s" in r["msg"]]
    assert lost["level"] == "error", lost
    events = [r.get("event") for r in records]
    assert events.index("final") < len(events) - 1, records  # the final stats, then why the run ended
    last = records[-1]
    assert (last["level"], last["logger"], last["event"], last["exit_code"]) == ("error", "hydravision", "exit", 4)
    assert last["msg"].startswith("Ray: the head (GCS) was lost (25 s unanswered)"), last


def test_the_head_lost_in_text_output_ends_with_that_line_on_stderr(monkeypatch, capsys, signals_kept):
    """As the other early ends in text output (cli._fatal): their reason, last, on stderr."""
    assert run_losing_the_head(monkeypatch, "text") == 4
    out, err = capsys.readouterr()
    assert "Ray: the head (GCS) has not answered for 25 s" in out and "bunny" in out, out
    assert err.splitlines()[-1].startswith("Ray: the head (GCS) was lost (25 s unanswered)"), err


# -- 2. the control stream's recovery --------------------------------------------------------------------------------

def test_the_control_stream_says_once_that_it_reads_again_after_redis_came_back(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.control")

    def lines(part: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "pipeline.control" and part in r.getMessage()]

    client = redis_server.client()
    consumer = ControlConsumer(SimpleNamespace(), redis_server.url, "hv", block_ms=50).start()
    try:
        wait_for(lambda: client.exists("hv:control"), 10, "the control stream's group")  # it reads
        redis_server.stop()
        wait_for(lambda: lines("retrying"), 30, "the failure said")
        redis_server.start()
        [back] = wait_for(lambda: lines("reads again"), 30, "the recovery said")
    finally:
        consumer.stop()
    assert back.levelno == logging.INFO
    match = re.fullmatch(r"control stream hv:control reads again after (\d+\.\d) s and (\d+) failed attempts",
                         back.getMessage())
    assert match and float(match[1]) > 0 and int(match[2]) >= 1, back.getMessage()
    assert len(lines("retrying")) == 1 and len(lines("reads again")) == 1  # each said once per outage


# -- 3. docs ----------------------------------------------------------------------------------------------------------

def test_readme_says_what_a_removal_does_to_metrics_and_how_to_rotate_a_log_file():
    readme = (REPO / "README.md").read_text()
    operating = readme[readme.index("\n## Operating it\n"):readme.index("\n## What lands in Redis")]
    flat = " ".join(operating.split())
    assert "a removed camera's series leave /metrics at once" in flat
    assert "rate() and increase()" in flat
    assert "copytruncate" in flat and "a rename plus SIGUSR1 rotates nothing" in flat


def test_say_at_gives_a_level_only_to_a_say_that_takes_one():
    """What App and NodeWatch say a node lost (WARNING), a crash loop (WARNING) and an actor Ray will not restart
    (ERROR) through: a JSON record at that level, the text alone for a say without levels."""
    import logging as logging_module

    from pipeline.logs import say_at

    said: list = []

    def say(text, level=logging_module.INFO):
        said.append((level, text))

    say.takes_level = True
    say_at(say, "x", logging_module.ERROR)
    say_at(said.append, "y", logging_module.ERROR)  # a say without levels gets the text alone
    assert said == [(logging_module.ERROR, "x"), "y"]
