"""A camera whose process crashed and was restarted: its counts in the status line, the final table and
--summary-json are the whole run's (as /metrics' are), not its last process's, and it says it was restarted.
Without Ray, cameras or models: the App with stand-ins for what it calls (as tests/test_app_edges10.py does)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from rich.console import Console

from pipeline.app import App, CameraHandle
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.run_commands import _compact
from pipeline.status import status_line, status_table
from pipeline.telemetry import Telemetry
from workers.settings import CameraConfig

REPO = Path(__file__).resolve().parent.parent


def counts(decoded: int, published: int, overload: int = 0, error: int = 0, in_flight: int = 0, **more) -> dict:
    """A camera's stats() as CameraPipeline gives them (decoded = outcomes + in slot + in flight)."""
    return {"decoded": decoded, "published": published, "skipped": 0, "in_slot": 0, "in_flight": in_flight,
            "dropped": {"rate": 0, "budget": 0, "overload": overload, "error": error, "shutdown": 0},
            "reconnects": 0, "skipped_packets": 0, **more}


def add_up(s: dict) -> bool:
    return s["decoded"] == s["published"] + s["skipped"] + sum(s["dropped"].values()) + s["in_slot"] + s["in_flight"]


class Process:
    """A StreamActor's handle: ``row`` is what its camera reports now (as stats and stats_many answer)."""

    def __init__(self, row: dict):
        self.row, self.final = row, {}
        self.start = SimpleNamespace(remote=lambda camera_id, camera=None, inference=None, restart=False: None)
        self.wait = SimpleNamespace(remote=lambda camera_id: f"done-{camera_id}")
        self.stats = SimpleNamespace(remote=lambda camera_id: dict(self.row))
        self.stats_many = SimpleNamespace(remote=lambda ids, model=False: {
            "cameras": {cid: dict(self.row) for cid in ids}, "model": None})
        self.stop = SimpleNamespace(remote=lambda camera_id, drain=True: dict(self.final))


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)


def test_a_restarted_cameras_counts_are_the_whole_runs_in_the_status_and_the_final_stats(no_ray):
    """The process of street-1 was killed after it had published 1284 frames; Ray re-created it and the App
    started the camera again. The final table said "published 218" (its new process's count), "reconnects 0",
    and nothing in it or in --summary-json said the camera had been restarted."""
    said: list[str] = []
    app = App(parse_config({"cameras": []}), say=said.append)
    app.events = SimpleNamespace(publish_event=lambda message: None, stats=lambda: {}, close=lambda timeout: None)
    up = {"camera": "street-1", "state": "running"}
    process = Process({**up, "pid": 100, **counts(1300, 1284, overload=5, error=1, in_flight=9, reconnects=2)})
    app.cameras["street-1"] = CameraHandle("street-1", CameraConfig(id="street-1", url="synthetic://street"),
                                           process, "hv-camera-street-1")
    first = app.stats()[0]
    assert first["published"] == 1284 and "restarts" not in first  # nothing to fold before any restart
    process.row = {"camera": "street-1", "state": "created", "pid": 200}  # killed; Ray re-ran its constructor
    started = dict(up, pid=200, **counts(3, 2, in_flight=1))
    process.stats = SimpleNamespace(remote=lambda camera_id: dict(started))  # what the restart asks it then
    row = app.stats()[0]
    assert any("crashed and was restarted" in line for line in said), said
    assert (row["published"], row["restarts"]) == (1286, 1), row
    process.row = dict(up, pid=200, **counts(230, 218, overload=2, in_flight=10))
    row = app.stats()[0]
    assert (row["decoded"], row["published"], row["reconnects"]) == (1530, 1502, 2), row
    assert row["dropped"]["overload"] == 7 and row["dropped"]["lost"] == 10 and add_up(row), row  # held at the kill
    line = status_line([row])
    assert "street-1: running (restarted 1x)" in line and "pub 1502" in line, line
    assert app._last_stats["street-1"]["published"] == 1502  # the API's list says the same

    process.final = {"camera": "street-1", "state": "stopped", **counts(232, 230, overload=2)}  # no pid in a stop's
    final = app.shutdown(drain=True)[0]
    assert (final["decoded"], final["published"], final["restarts"]) == (1532, 1514, 1), final
    assert final["dropped"] == {"rate": 0, "budget": 0, "overload": 7, "error": 1, "shutdown": 0, "lost": 10}
    assert add_up(final) and app.cameras["street-1"].final is final
    console = Console(width=250, record=True)
    console.print(status_table([final], title="final"))
    table = console.export_text()
    assert "stopped (restarted 1x)" in table and "1514" in table, table


def test_a_final_from_a_process_restarted_after_the_last_tick_keeps_the_crashed_ones_counts():
    """The camera's process crashed after the last tick and its restart answered before the stop: the stop's
    stats (which name no pid) are the new process's, smaller than what the last tick saw."""
    telemetry = Telemetry()
    telemetry.record_cameras([{"camera": "c", "state": "running", "pid": 100, **counts(60, 50, in_flight=10)}])
    final = {"camera": "c", "state": "stopped", **counts(8, 8)}
    telemetry.record_cameras([final], final=True)
    whole = telemetry.whole_run([final])[0]
    assert (whole["decoded"], whole["published"], whole["dropped"]["lost"]) == (68, 58, 10), whole
    assert add_up(whole)
    telemetry.record_cameras([final], final=True)  # the same stats again: nothing counted twice
    assert telemetry.whole_run([final])[0]["published"] == 58


class RestartedApp:
    """What `run` calls on the App: one tick and the final stats of a camera restarted once."""

    def __init__(self, config, redis_url=None, say=print, on_ray_started=None) -> None:
        self.cameras: dict = {}

    def install_signal_handlers(self) -> None:
        pass

    def start(self) -> None:
        pass

    def run(self, duration=None, on_tick=None) -> list[dict]:
        on_tick([{"camera": "street-1", "state": "running", "published": 1290, "restarts": 1}])
        return []

    def shutdown(self, drain: bool = True) -> list[dict]:
        return [{"camera": "street-1", "state": "stopped", "published": 1502, "restarts": 1}]


def test_run_says_a_camera_was_restarted_in_its_status_line_and_final_table(tmp_path: Path, capsys, monkeypatch):
    """Only a log line said "stream actor of camera street-1 crashed and was restarted": the status line, the
    final table and the JSON status records did not."""
    monkeypatch.setattr("pipeline.run_commands.App", RestartedApp)
    summary = tmp_path / "s.json"
    code = main(["run", str(REPO / "configs/demo.yaml"), "--plain", "--log-every", "0.001",
                 "--summary-json", str(summary)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "street-1: running (restarted 1x)" in out, out
    assert "stopped (restarted 1x)" in out, out
    assert json.loads(summary.read_text())[0]["restarts"] == 1
    assert _compact([{"camera": "street-1", "restarts": 1}]) == [{"camera": "street-1", "restarts": 1}]
