"""`hydravision run` as an operator reads it, at its end and at its start: a camera removed at run time keeps its
row in the final table and --summary-json, a camera's failure is warned before the final table (not after it), and
the start says what it does before its long waits (Ray, the model). Without Ray, cameras or models: the App with
stand-ins for what it calls (as tests/test_crash_counts10.py), or a stand-in App (as tests/test_run_outcome9.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

import pipeline.app as app_module
import test_live_cli_edges6
from pipeline import cluster, run_commands
from pipeline.app import App, CameraHandle
from pipeline.config import parse_config
from workers.settings import CameraConfig

REPO = Path(__file__).resolve().parent.parent


def counts(decoded: int, published: int) -> dict:
    return {"decoded": decoded, "published": published, "skipped": 0, "in_slot": 0, "in_flight": 0,
            "dropped": {"rate": 0, "budget": 0, "overload": decoded - published, "error": 0, "shutdown": 0},
            "reconnects": 0, "skipped_packets": 0}


class Process:
    """A StreamActor's handle: ``row`` is what its camera reports now, ``final`` what its stop answers."""

    def __init__(self, row: dict):
        self.row, self.final = row, {}
        self.stats_many = SimpleNamespace(remote=lambda ids, model=False: {
            "cameras": {cid: dict(self.row) for cid in ids}, "model": None})
        self.stop = SimpleNamespace(remote=self._stop)

    def _stop(self, camera_id: str, drain: bool = True) -> dict:
        if isinstance(self.final, Exception):
            raise self.final
        return dict(self.final)


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns=1, timeout=None: (list(refs), []))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: None)


def service() -> App:
    app = App(parse_config({"cameras": []}), say=lambda text: None)
    app.events = SimpleNamespace(publish_event=lambda message: None, remove_status=lambda camera_id: None,
                                 stats=lambda: {}, close=lambda timeout: None)
    app._retire_in_redis = lambda camera_id, next_ids, quiet=False: True  # no Redis here
    app._let_go = lambda handle, stop=False: False  # its process hosts others: nothing to kill
    return app


def running(app: App, camera: str, process: Process, name: str) -> None:
    app.cameras[camera] = CameraHandle(camera, CameraConfig(id=camera, url="synthetic://street"), process, name)


# -- 1. a camera removed at run time -------------------------------------------------------------------------------

def test_a_removal_keeps_the_cameras_final_stats_and_one_added_again_under_its_id_is_another_row(no_ray):
    """cam published 55 frames and was removed; added again, it published 9 more. The run's final stats had one row,
    "cam stopped 9": the first run's frames were gone from the summary (only its camera_removed event said them)."""
    app = service()
    first = Process({"camera": "cam", "state": "running", "pid": 100, **counts(50, 45)})
    running(app, "cam", first, "hv-camera-cam")
    app.stats()
    first.final = {"camera": "cam", "state": "stopped", **counts(60, 55), "publisher": {"queued": 3}}
    assert app.remove_camera("cam", by="test")["final"]["published"] == 55
    app.stats()  # the control loop's next tick
    second = Process({"camera": "cam", "state": "running", "pid": 200, **counts(10, 8)})
    running(app, "cam", second, "hv-camera-cam-2")
    app.stats()
    second.final = {"camera": "cam", "state": "stopped", **counts(12, 9)}
    finals = app.shutdown(drain=True)
    # the shutdown's finals are the running set's, as before (the exit code and undelivered messages read them)
    assert [(f["camera"], f["state"], f["decoded"], f["published"]) for f in finals] == [("cam", "stopped", 12, 9)]
    assert [(r["camera"], r["state"], r["decoded"], r["published"], r["publisher"]) for r in app.removed] == [
        ("cam", "removed", 60, 55, {"queued": 3})]


def test_a_camera_whose_process_had_crashed_keeps_a_row_with_why(no_ray):
    app = service()
    gone = Process({"camera": "cam", "state": "running", "pid": 100, **counts(5, 5)})
    gone.final = ray.exceptions.RayActorError()
    running(app, "cam", gone, "hv-camera-cam")
    app.remove_camera("cam", by="test")
    [row] = app.removed
    assert (row["camera"], row["state"]) == ("cam", "removed") and "RayActorError" in row["last_error"], row


class StandInApp(test_live_cli_edges6.StandInApp):
    """What `run` calls on the App: ``finals`` its shutdown's, ``removed`` the removals' rows (App.removed)."""

    finals: list = []
    removed: list = []
    ticks: list = []
    events = None

    def shutdown(self, drain: bool = True) -> list[dict]:
        return self.finals


def args(**kw) -> argparse.Namespace:
    base = dict(config=str(REPO / "configs/demo.yaml"), summary_json=None, redis_url=None, plain=True,
                duration=None, log_every=0.0, log_format="text", verbose=False)
    return argparse.Namespace(**{**base, **kw})


def final(camera: str, state: str = "stopped", published: int = 60, queued: int = 0, **more) -> dict:
    return {"camera": camera, "state": state, "published": published, "fps": 9.9,
            "publisher": {"sent": published - queued, "queued": queued}, **more}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInApp]:
    monkeypatch.setattr(run_commands, "App", StandInApp)
    for name, value in (("finals", []), ("removed", []), ("ticks", []), ("events", None)):
        monkeypatch.setattr(StandInApp, name, value)
    return StandInApp


def test_a_removed_camera_is_in_the_final_table_and_the_summary_and_its_lost_messages_are_not_left_ones(
        stand_in, capsys, tmp_path):
    """street-2 was removed while Redis refused writes (268 messages lost then, said by its camera_removed event):
    its row is there, marked removed, with its counts; the run's messages left at the stop are the others' only."""
    stand_in.finals = [final("street-1")]
    stand_in.removed = [final("street-2", "removed", published=247, queued=268)]
    summary = tmp_path / "summary.json"
    assert run_commands.run(args(summary_json=str(summary))) == 0
    out = capsys.readouterr().out
    row = next((line for line in out.splitlines() if "street-2" in line), "")
    assert "removed" in row and "247" in row and "9.9" not in row, out  # its rates were those before its removal
    assert "not delivered" not in out, out
    assert [(f["camera"], f["state"], f["published"]) for f in json.loads(summary.read_text())] == [
        ("street-1", "stopped", 60), ("street-2", "removed", 247)]


@pytest.mark.parametrize("finals, expected", [
    ([final("street-1", "failed")], 1),  # every running camera failed: a removed one does not make it exit 0
    ([final("street-1", "failed"), final("street-3")], 0),  # nor counts as failed
    ([], 0),  # every camera removed (a service run for its control channels)
])
def test_a_removed_camera_counts_neither_as_failed_nor_as_not_failed(finals, expected, stand_in):
    stand_in.finals = finals
    stand_in.removed = [final("street-2", "removed", queued=5)]
    assert run_commands.run(args()) == expected


def test_the_json_final_record_has_the_removed_camera(stand_in, caplog):
    stand_in.finals = [final("street-1")]
    stand_in.removed = [final("street-1", "removed", published=7)]  # removed, then added again under its id
    with caplog.at_level(logging.INFO, logger="hydravision"):
        assert run_commands.run(args(log_format="json")) == 0
    [record] = [r for r in caplog.records if r.getMessage() == "final"]
    assert [(c["camera"], c["state"], c["published"]) for c in record.data["cameras"]] == [
        ("street-1", "stopped", 60), ("street-1", "removed", 7)]


# -- 2. the failure warnings before the final table -------------------------------------------------------------

@pytest.mark.parametrize("ticks", [
    [[{"camera": "street-1", "state": "running"}]],  # failed after the last tick: warned at the end
    [[{"camera": "street-1", "state": "failed", "last_error": "boom"}]],  # warned at its tick, not again
])
def test_a_failure_is_warned_once_and_before_the_final_table(ticks, stand_in, capsys):
    """The warning of a camera that failed after the last tick came after the final table, the last thing read."""
    stand_in.ticks = ticks
    stand_in.finals = [final("street-1", "failed", last_error="boom"), final("street-2")]
    handler = logging.StreamHandler(sys.stdout)  # the log's stderr, here in one stream with the table
    logging.getLogger(run_commands.__name__).addHandler(handler)
    try:
        assert run_commands.run(args()) == 0
    finally:
        logging.getLogger(run_commands.__name__).removeHandler(handler)
    out = capsys.readouterr().out
    assert out.count("camera street-1 failed: boom") == 1, out
    assert out.index("camera street-1 failed: boom") < out.index("last error"), out  # the table's header


def test_a_failure_is_warned_before_the_final_record_in_json(stand_in, caplog):
    stand_in.finals = [final("street-1", "failed", last_error="boom")]
    with caplog.at_level(logging.INFO):
        assert run_commands.run(args(log_format="json")) == 1
    said = [r.getMessage() for r in caplog.records]
    assert said.index("camera street-1 failed: boom") < said.index("final"), said


# -- 3. the start says what it waits for ---------------------------------------------------------------------------

@pytest.mark.parametrize("address, line", [
    (None, "Starting a local Ray ..."),
    ("ray://user:secret@head:10001", "Joining the Ray cluster at ray://***@head:10001 ..."),
])
def test_the_start_says_it_starts_ray_before_it_waits_for_it(address, line, monkeypatch):
    """Seconds to tens of seconds (measured 2.5-17 s on 2 busy cores) without a word after the "Redis:" line."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    said: list[str] = []
    app = App(parse_config({"cameras": [], "ray": {"address": address}}), say=said.append)
    when_init: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "init_ray", lambda config, system_config: when_init.append(list(said)))
    app.start_ray()
    assert when_init == [[line]]


class Started(Exception):
    """Ends a start where the model's processes would be created."""


@pytest.mark.parametrize("in_camera_process, cameras, line", [
    (False, 1, "Loading the model demo.safetensors in 2 inference replica(s) ..."),
    (True, 1, "Loading the model demo.safetensors in the camera processes ..."),
    (True, 0, None),  # no camera yet: nothing loads it (the "Model:" line says "loaded with its first camera")
])
def test_the_start_says_it_loads_the_model_before_it_waits_for_it(in_camera_process, cameras, line, monkeypatch):
    """The other long wait before the "Model:" line (3-9 s measured): new processes' imports and the model's load."""
    said: list[str] = []
    config = parse_config({"cameras": [{"id": f"c{i}", "url": "synthetic://street"} for i in range(cameras)]})
    app = App(config, say=said.append)
    app.check_model = lambda: {"input_size": [256, 448], "heads": {"people": ["person"]}}
    app.resolve_redis = lambda: "redis://127.0.0.1:1/0"
    app.start_ray = lambda: None
    app._say_replica_wait = app._say_camera_wait = lambda: None

    def spawn(*args, **kwargs):
        raise Started

    placement = SimpleNamespace(nodes=[], replicas=2, in_camera_process=in_camera_process, spawn=spawn,
                                inference_options=spawn)
    monkeypatch.setattr(app_module, "Reaper", SimpleNamespace(start=lambda: None))
    monkeypatch.setattr(cluster, "Placement", lambda config, say: placement)
    monkeypatch.setattr(cluster, "redis_warning", lambda url, nodes: None)
    monkeypatch.setattr(app_module, "publisher_for", spawn)  # next, with the model in the camera processes
    with pytest.raises(Started):
        app.start()
    assert said == ([line] if line else []), said


def test_a_removed_camera_whose_process_was_restarted_has_its_whole_runs_counts(no_ray):
    """cam's first process published 40 frames and crashed; Ray restarted it, the new one published 7 and the
    camera was removed: its row said "published 7" (the last process's), the final table of a camera stopped at the
    end says 47 (the whole run's, telemetry.whole_run)."""
    app = service()
    process = Process({"camera": "cam", "state": "running", "pid": 100, **counts(45, 40)})
    running(app, "cam", process, "hv-camera-cam")
    app.stats()
    process.row = {"camera": "cam", "state": "running", "pid": 101, **counts(6, 5)}  # the restarted process
    app.cameras["cam"].restarts = 1
    app.stats()
    process.final = {"camera": "cam", "state": "stopped", **counts(8, 7)}
    app.remove_camera("cam", by="test")
    [row] = app.removed
    assert (row["state"], row["decoded"], row["published"], row["restarts"]) == ("removed", 53, 47, 1), row


def test_a_tick_while_the_removed_camera_drains_keeps_its_earlier_processes_counts(no_ray):
    """The control loop ticks every second and a drain takes up to 30 s: a tick then dropped the camera's telemetry
    record (no longer in ``cameras``), and with it the 40 frames of its first process (row: "published 7")."""
    app = service()
    process = Process({"camera": "cam", "state": "running", "pid": 100, **counts(45, 40)})
    running(app, "cam", process, "hv-camera-cam")
    app.stats()
    process.row = {"camera": "cam", "state": "running", "pid": 101, **counts(6, 5)}
    app.stats()
    process.final = {"camera": "cam", "state": "stopped", **counts(8, 7)}
    stop = process._stop

    def draining(camera_id: str, drain: bool = True) -> dict:
        app.stats()  # the control loop's tick, while the camera drains
        return stop(camera_id, drain)
    process.stop = SimpleNamespace(remote=draining)
    app.remove_camera("cam", by="test")
    [row] = app.removed
    assert (row["decoded"], row["published"]) == (53, 47), row


def test_a_removal_is_no_tick_of_the_control_loop_and_the_same_id_added_again_is_another_camera(no_ray):
    """/healthz reads the control loop's age from telemetry's last tick: a removal's final stats set it, so removals
    kept a wedged loop 'live'. And the id added again before the next tick was taken for a restart of the removed
    camera's process: the new camera's row said published 64 (55 + its own 9)."""
    app = service()
    first = Process({"camera": "cam", "state": "running", "pid": 100, **counts(50, 45)})
    running(app, "cam", first, "hv-camera-cam")
    app.stats()
    app.telemetry.last_tick = wedged = app.telemetry.last_tick - 100
    first.final = {"camera": "cam", "state": "stopped", **counts(60, 55)}
    app.remove_camera("cam", by="test")
    assert app.telemetry.last_tick == wedged
    second = Process({"camera": "cam", "state": "running", "pid": 200, **counts(12, 9)})
    running(app, "cam", second, "hv-camera-cam-2")  # no tick in between
    second.final = {"camera": "cam", "state": "stopped", **counts(12, 9)}
    [final] = app.shutdown(drain=True)
    assert (final["decoded"], final["published"]) == (12, 9), final


def test_a_killed_camera_process_leaves_what_it_reserved_out_of_the_placements_book():
    """NodeWatch reads each actor's options from Placement.reserved to say what a lost node's actors need; a
    service adding and removing cameras for months kept every process name's options there."""
    app = service()
    app.placement = SimpleNamespace(reserved={"hv-camera-a": {"num_cpus": 1}, "hv-inference-0": {"num_cpus": 1}})
    app._killing(["hv-camera-a"])
    assert list(app.placement.reserved) == ["hv-inference-0"]


def test_a_removal_ending_during_a_ticks_calls_leaves_no_record_for_the_same_id_added_again(no_ray):
    """The tick takes its list of cameras, then waits for their processes' answers (up to 5 s where one hangs): a
    removal that ended meanwhile had its camera's stats of before recorded again after it forgot them, and the same
    id added back before the next tick counted on from the removed camera's (62 decoded, not 12)."""
    app = service()
    first = Process({"camera": "cam", "state": "running", "pid": 100, **counts(50, 45)})
    running(app, "cam", first, "hv-camera-cam")
    app.stats()
    first.final = {"camera": "cam", "state": "stopped", **counts(60, 55)}
    answer = first.stats_many.remote

    def removed_meanwhile(ids, model=False):
        reply = answer(ids, model)
        app.remove_camera("cam", by="test")  # the whole removal, while this tick waits for the answers
        return reply
    first.stats_many = SimpleNamespace(remote=removed_meanwhile)
    app.stats()
    second = Process({"camera": "cam", "state": "running", "pid": 200, **counts(12, 9)})
    running(app, "cam", second, "hv-camera-cam-2")
    [row] = app.stats()
    assert (row["decoded"], row["published"]) == (12, 9), row
