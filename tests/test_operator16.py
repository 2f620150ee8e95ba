"""What an operator reads (s38): a camera added or updated below the rate its lines and zones need to count was
warned of in the service's log only, which the API's client does not read: the answer carries the warning now, and
`hydravision cameras add/update` prints it. A camera removed twice had two final rows nothing told apart: each says
when. A line said while the live table drew showed its colour markup raw. A first-time user's: `--help` without the
defaults, a Redis port out of range told about passwords, `demo.safetensors` not found without a word of 'demo'.
The App with stand-ins, no Ray."""

from __future__ import annotations

import argparse
import io
import time
from types import SimpleNamespace

import pytest
import ray

import pipeline.camera_commands as camera_commands
from pipeline.app import CameraHandle
from pipeline.run_commands import Output
from pipeline.status import status_table
from rich.console import Console
from rich.live import Live
from test_controller_edges3 import Process, answer, service
import test_run_final13
from test_run_final13 import counts, running, service as removing_service
from test_run_final13 import Process as FinalProcess

LINE = {"name": "gate", "start": [0.5, 0.3], "end": [0.5, 1.0]}


def test_an_add_or_update_below_the_counting_rate_answers_with_the_warning(monkeypatch):
    app = service(monkeypatch)
    changed = ["fps"]
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: {"changed": list(changed), "restarted": False}
                        if ref == "update" else answer(ref))
    process = Process("hv-camera-gate")
    process.update = SimpleNamespace(remote=lambda camera_id, camera: "update")
    monkeypatch.setattr(app, "_spawn", lambda cams, **kw: [CameraHandle(c.id, c, process, process.name) for c in cams])
    added = app.add_camera({"id": "gate", "url": "synthetic://street", "fps": 2, "lines": [LINE]}, by="api:ops")
    assert [w.split(" is below")[0] for w in added["warnings"]] == ["camera gate: fps 2"]
    assert "warnings" not in app.update_camera("gate", {"fps": 8}, by="api:ops")  # fast enough: nothing to say
    slow = app.update_camera("gate", {"fps": 3}, by="api:ops")
    assert [w.split(" is below")[0] for w in slow["warnings"]] == ["camera gate: fps 3"]
    changed[:] = ["heads"]  # a change that does not touch the rate: not said again on every update
    assert "warnings" not in app.update_camera("gate", {"heads": ["people"]}, by="api:ops")
    assert "warnings" not in app.add_camera({"id": "plain", "url": "synthetic://street", "fps": 1}, by="api:ops")


class Channel:
    """Stands in for the HTTP / Redis channel: answers every command with ``result``."""

    def __init__(self, result: dict) -> None:
        self.result = result

    def send(self, op: str, camera_id: str | None = None, body: dict | None = None) -> dict:
        return {"status": "accepted", "op": op, "camera": "gate", "by": "cli", "result": self.result}


def test_cameras_add_and_update_print_the_answer_s_warnings(monkeypatch, capsys):
    warning = "camera gate: fps 2 is below the 5 fps its lines and zones need to count right"
    monkeypatch.setattr(camera_commands, "_channel", lambda args: Channel({"id": "gate", "changed": ["fps"],
                                                                       "warnings": [warning]}))
    monkeypatch.setattr(camera_commands, "_camera_fields", lambda args: {"id": "gate", "fps": 2})
    for action in ("add", "update"):
        assert camera_commands.main(argparse.Namespace(action=action, camera_id="gate", as_json=False)) == 0
        out, err = capsys.readouterr()
        assert out.startswith(("added camera gate", "updated camera gate")) and warning not in out
        assert err == f"warning: {warning}\n"
    # several cameras (a YAML list): each one's warning under its line
    monkeypatch.setattr(camera_commands, "_camera_fields", lambda args: [{"id": "gate"}, {"id": "gate"}])
    assert camera_commands.main(argparse.Namespace(action="add", camera_id=None, as_json=False)) == 0
    assert capsys.readouterr().err == f"warning: {warning}\n" * 2


def test_each_removal_s_final_row_says_when(monkeypatch):
    test_run_final13.no_ray.__wrapped__(monkeypatch)  # its Ray stand-ins
    app = removing_service()
    for pid in (100, 200):
        process = FinalProcess({"camera": "cam", "state": "running", "pid": pid, **counts(5, 5)})
        running(app, "cam", process, f"hv-camera-cam-{pid}")
        app.stats()
        process.final = {"camera": "cam", "state": "stopped", **counts(6, 6)}
        before = time.time()
        app.remove_camera("cam", by="test")
        assert before - 0.001 <= app.removed[-1]["removed_at"] <= time.time() + 0.001  # rounded to ms
    console = Console(width=200, record=True)
    console.print(status_table(app.removed, title="final", final=True))
    rows = [line for line in console.export_text().splitlines() if "cam " in line]
    times = [time.strftime("%H:%M:%S", time.localtime(r["removed_at"])) for r in app.removed]
    assert len(rows) == 2 and all(f"removed {t}" in row for row, t in zip(rows, times)), rows
    # an entry not of ours (`hydravision status` reads what anyone wrote): no time, no error
    odd = Console(width=200, record=True)
    odd.print(status_table([{"camera": "x", "state": "removed", "removed_at": 1e300}], final=True))
    assert "│ x      │ removed │" in odd.export_text()


def test_a_line_said_while_the_live_table_draws_leaves_its_markup_rendered():
    """The frame drawn with `SIGINT: draining ...` had every row's state as `[green]running[/]` (32 cameras)."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    out = Output(console, json_mode=False)
    with Live(status_table([{"camera": "lot-00", "state": "running"}]), console=console, auto_refresh=False):
        out.say("SIGINT: draining in-flight frames [not markup] :fire:")
        out.status([{"camera": "cam[1]", "state": "running"}])
        out.warning("2 message(s) not delivered [x]", {})
    shown = screen.getvalue()
    assert "[green]" not in shown and "running" in shown
    # what is said stays as written: no markup, no emoji codes
    for text in ("draining in-flight frames [not markup] :fire:", "cam[1]: running", "not delivered [x]"):
        assert text in shown, text


@pytest.mark.parametrize("command, shown", [
    (["run"], ["(default 5)", "relative paths in it are of the working directory"]),
    (["dashboard"], ["(default 127.0.0.1", "default 8765", "(default 1)", "$HYDRAVISION_REDIS_URL", "(default hv)"]),
    (["tail"], ["$HYDRAVISION_REDIS_URL", "(default hv)"]),
    (["status"], ["$HYDRAVISION_REDIS_URL", "(default hv)"]),
    (["cameras", "list"], ["(default 90)", "(default hv)"]),
    (["train"], ["(default 3000)", "(default 16)", "(default 2e-3)", "(default 0)"]),
    (["train-attribute"], ["(default 600)", "checkpoint to write"]),
    (["train-reid"], ["(default 600)", "checkpoint to write"]),
    (["train-demo"], ["models/checkpoints/demo.safetensors"]),
    (["import-detector"], ["models/checkpoints/coco-fcos.safetensors"]),
    (["eval"], ["(default 8)"]),
])
def test_help_says_the_defaults(command, shown, capsys):
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(s in text for s in shown), (command, [s for s in shown if s not in text])


def test_a_redis_port_out_of_range_is_said_so():
    from workers.settings import redis_url_error

    assert redis_url_error("redis://localhost:263910/0").startswith("the port is out of range (a port is a number")
    assert redis_url_error("redis://:ab/cd@db:6379/0").startswith("no readable host:port; a password holding '/'")


def test_a_missing_demo_safetensors_names_the_bundled_checkpoint(tmp_path, monkeypatch):
    from models.metadata import CheckpointError, read_metadata

    with pytest.raises(CheckpointError, match=r"demo.safetensors: no such checkpoint file \(the bundled checkpoint "
                       r"is named 'demo'\)"):
        read_metadata(tmp_path / "demo.safetensors")
    with pytest.raises(CheckpointError, match=r"mine.safetensors: no such checkpoint file$"):
        read_metadata(tmp_path / "mine.safetensors")
    # 'demo' itself missing (a checkout without its checkpoint): no hint to write what was written
    import models.metadata

    monkeypatch.setattr(models.metadata, "__file__", str(tmp_path / "models" / "metadata.py"))
    with pytest.raises(CheckpointError, match=r"demo.safetensors: no such checkpoint file$"):
        read_metadata(tmp_path / "models" / "checkpoints" / "demo.safetensors")


@pytest.mark.parametrize("polygon", [[0.1, 0.1, 0.5, 0.1, 0.5, 0.5], [{"x": 0.1, "y": 0.1}, {"x": 0.5, "y": 0.1},
                                                                     {"x": 0.5, "y": 0.5}]])
def test_a_polygon_in_another_form_is_one_error_naming_the_form(polygon):
    from pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as refused:
        parse_config({"cameras": [{"id": "a", "url": "synthetic://street",
                                   "zones": [{"name": "z", "polygon": polygon}]}]}, "my.yaml")
    lines = str(refused.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith("cameras[0].zones[0].polygon: expected a list of [x, y] points")
