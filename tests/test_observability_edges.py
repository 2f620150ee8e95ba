"""Edge inputs of the observability side: camera statuses read back from Redis (pipeline/status.py), the
controller's telemetry behind /metrics, /healthz and /readyz (pipeline/telemetry.py), and tracking scores
against a synthetic scene (pipeline/scoring.py)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

import pipeline.telemetry
from pipeline.metrics import health, metrics_registry, ready
from pipeline.scoring import mot_scores, scene_truth
from pipeline.status import read_camera_statuses, status_line, status_table
from pipeline.telemetry import Telemetry
from synthetic.scene import CLASS_NAMES
from workers.settings import CameraConfig

HUGE = 10**400  # a JSON integer: Python reads it, no float holds it


class StatusHash:
    """The two calls read_camera_statuses makes of a Redis client, on a dict of raw entries."""

    def __init__(self, entries: dict[bytes, bytes]):
        self.entries = entries

    def hgetall(self, key):
        return self.entries

    def time(self):
        return (2_000_000_000, 0)


def _good() -> bytes:
    return json.dumps({"state": "running", "heartbeat_ts": 2_000_000_000, "fps": 5.0}).encode()


@pytest.mark.parametrize("what, raw", [
    ("a heartbeat too large for a float", b'{"state": "running", "heartbeat_ts": 1' + b"0" * 400 + b"}"),
    ("arrays nested too deep to parse", b"[" * 100_000 + b"]" * 100_000),
    ("objects nested too deep to parse", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
])
def test_one_odd_status_entry_does_not_fail_the_read_of_every_camera(what, raw):
    """`hydravision status`, `tail` and the dashboard's poller read every entry of {prefix}:cameras with
    read_camera_statuses. A heartbeat too large for a float raised OverflowError and JSON nested too deep
    RecursionError: neither was caught, so the table failed with a traceback and the dashboard lost every
    camera's tick, for as long as the entry stayed."""
    statuses = read_camera_statuses(StatusHash({b"good": _good(), b"odd": raw}), "hv")
    by_camera = {s["camera"]: s for s in statuses}
    assert set(by_camera) == {"good", "odd"}, what
    assert by_camera["good"]["state"] == "running" and not by_camera["good"]["stale"]
    assert by_camera["odd"]["state"] in ("stale", "unreadable"), what  # never refreshed, or not a status


def test_the_status_table_shows_numbers_too_large_for_a_float_instead_of_failing():
    """The table skips what is not a number ("-"), but formatted a JSON integer too large for a float as one:
    OverflowError, and `hydravision status` showed no camera at all."""
    odd = {"camera": "odd", "state": "running", "fps": HUGE, "decode_fps": HUGE, "latency_ms_p50": HUGE,
           "latency_ms_p95": 3.0, "published": 7, "dropped": {"rate": HUGE, "overload": 1e308, "error": 1e308}}
    good = {"camera": "good", "state": "running", "fps": 5.0, "decode_fps": 5.0, "latency_ms_p50": 40.0,
            "latency_ms_p95": 60.0, "published": 9, "dropped": {"rate": 2}}
    out = io.StringIO()
    Console(file=out, width=250).print(status_table([odd, good]))
    assert "good" in out.getvalue() and "odd" in out.getvalue()
    line = status_line([odd, good])
    assert "good: running 5.0 fps p50 40 ms pub 9 drop 0 skip 2" in line and "odd: running - fps p50 - ms" in line


# -- telemetry: the counters behind /metrics --------------------------------------------------------------

def scrape(telemetry: Telemetry) -> dict:
    """{sample name: {frozenset(labels): value}} from the text a scrape returns."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(generate_latest(metrics_registry(telemetry)).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def file_camera(state: str, decoded: int, published: int, retries: int, dropped: int, pid: int = 100) -> dict:
    """A file camera's stats(): every decoded frame published or in flight; its Publisher's counters."""
    return {"camera": "yard", "pid": pid, "state": state, "decoded": decoded, "published": published,
            "skipped": 0, "dropped": {"rate": 0, "budget": 0, "overload": 0, "error": 0, "shutdown": 0},
            "reconnects": 0, "publisher": {"retries": retries, "dropped": dropped}}


def test_publisher_counters_do_not_double_when_a_camera_starts_again_in_its_process():
    """A file camera updated after its file ended starts a new pipeline (its frame counters from 0) in the same
    process, with the same Publisher (its counters go on). Telemetry took the frame counters going backwards
    for a restart and folded every last value into the base, the Publisher's too: redis_errors_total and
    redis_messages_dropped_total jumped to twice what the Publisher had counted."""
    t = Telemetry()
    t.record_cameras([file_camera("running", 50, 50, retries=4, dropped=1)])
    t.record_cameras([file_camera("ended", 100, 100, retries=6, dropped=2)])
    t.record_cameras([file_camera("running", 10, 9, retries=6, dropped=2)])  # updated: a new run of the file
    m = scrape(t)
    yard = frozenset({("camera", "yard")})
    assert m["hydravision_frames_decoded_total"][yard] == 110  # the frame counters start a new account
    assert m["hydravision_frames_total"][frozenset({("camera", "yard"), ("outcome", "published")})] == 109
    assert m["hydravision_redis_errors_total"][frozenset({("publisher", "yard")})] == 6
    assert m["hydravision_redis_messages_dropped_total"][frozenset({("publisher", "yard")})] == 2
    t.record_cameras([file_camera("running", 20, 20, retries=7, dropped=2)])
    assert scrape(t)["hydravision_redis_errors_total"][frozenset({("publisher", "yard")})] == 7
    # a new process has a new Publisher: its counts add to the old one's
    t.record_cameras([file_camera("running", 5, 5, retries=1, dropped=0, pid=101)])
    m = scrape(t)
    assert m["hydravision_redis_errors_total"][frozenset({("publisher", "yard")})] == 8
    assert m["hydravision_frames_decoded_total"][yard] == 125


class FakeProbe:
    def check(self):
        return True, None


def test_a_step_of_the_wall_clock_fails_neither_healthz_nor_a_reconnecting_camera(monkeypatch):
    """Telemetry timed the control loop's ticks and each camera's time down with time.time. When NTP stepped
    the clock an hour forward (an edge box without a clock battery syncing after the service started, a VM
    resumed), /healthz said the loop had not ticked for an hour and a camera reconnecting for a moment was
    past its stall budget: not ready. (Stepped back, a camera down for good stayed ready for that hour.)"""
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    # A fresh copy of the module made while time.time is the fake: a default clock bound to it follows the steps.
    spec = importlib.util.spec_from_file_location("telemetry_under_a_stepped_clock", pipeline.telemetry.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    telemetry = module.Telemetry()
    cam = CameraConfig(id="a", url="rtsp://cam/a", read_timeout_s=2, open_timeout_s=2)  # 8 s stall budget
    app = SimpleNamespace(telemetry=telemetry, model_holders=lambda: {0: "replica-0"}, model_info={"heads": {}},
                          cameras={"a": SimpleNamespace(config=cam)}, stopping=False, redis_settings=None,
                          config=SimpleNamespace(status=SimpleNamespace(interval_s=1.0)))
    telemetry.record_inference(0, {"pid": 1})
    telemetry.record_cameras([{"camera": "a", "pid": 5, "state": "reconnecting", "decoded": 0}])
    assert health(app)[0] and ready(app, FakeProbe())[0]
    wall[0] += 3600
    ok, details = health(app)
    assert ok, details
    ok, details = ready(app, FakeProbe())
    assert ok, details


# -- scoring ------------------------------------------------------------------------------------------------

def test_a_detection_of_a_class_the_scene_does_not_have_is_a_false_positive():
    """mot_scores looked each detection's class up in the scene's CLASS_NAMES: a model that knows another
    class (a fine-tuned head, an imported COCO detector in bench_reid --checkpoint) ended the scoring with
    "ValueError: tuple.index(x): x not in tuple" (a 'truck') after the whole run, instead of counting a false
    positive."""
    truths = scene_truth(3, 1)
    good = truths[0].visibility >= 0.5
    assert good.any()
    found = [{"head": "h", "track_id": i, "class": CLASS_NAMES[c], "box": [float(v) for v in box]}
             for i, (box, c) in enumerate(zip(truths[0].boxes[good], truths[0].class_ids[good]))]
    truck = {"head": "h", "track_id": 99, "class": "truck", "box": [float(v) for v in truths[0].boxes[good][0]]}
    base = mot_scores([{"frame": 0, "detections": found}], truths)
    scores = mot_scores([{"frame": 0, "detections": [*found, truck]}], truths)
    assert base["FP"] == 0 and base["TP"] == int(np.count_nonzero(good))
    assert scores["TP"] == base["TP"] and scores["FP"] == 1 and scores["tracks"] == base["tracks"] + 1
