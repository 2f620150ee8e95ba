"""Low analysed rates (lat15): the frame-age budget took a busy camera with lines or zones down to 1-2.5 fps, where
the tracker links no vehicle from one frame to the next and its counts silently fell to almost nothing; a camera
configured that low says so when its config loads or it is added or updated. And the status's latency
percentiles, over the last 300 frames, stayed minutes stale at low rates after an overload ended: now over the
last seconds. CameraPipeline without Ray (an in-memory publisher, a simulated clock), the App with stand-ins."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import numpy as np
import ray

import workers.stream
from pipeline.app import CameraHandle
from pipeline.config import parse_config
from synthetic.scene import CLASS_NAMES, StreetScene
from test_capture_recovery import RecordingPublisher
from test_controller_edges3 import Process, answer, service
from workers.budget import COUNTING_MIN_FPS
from workers.settings import CameraConfig
from workers.stream import CameraPipeline

HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}
MODEL_INFO = {"input_size": [192, 320], "heads": HEADS}
LINE = {"name": "gate", "start": [0.5, 0.3], "end": [0.5, 1.0]}
ZONE = {"name": "middle", "polygon": [[0.3, 0.45], [0.7, 0.45], [0.7, 0.95], [0.3, 0.95]]}


class Clock:
    """Stands in for workers.stream's ``time``: its time() and monotonic() run on a simulated clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def time(self) -> float:
        return 1.7e9 + self.t

    def monotonic(self) -> float:
        return self.t

    def __getattr__(self, name: str):
        return getattr(time, name)


# -- the frame-age budget's floor for a camera that counts -------------------------------------------------------

def overloaded(pipe: CameraPipeline, clock: Clock, seconds: float = 120.0) -> list[float]:
    """Feeds the pipeline's budget frames 2 s old (far over its 300 ms) at its analysed rate; the rates it set."""
    rates = []
    while seconds > 0:
        step = 1 / pipe._analysed_fps()
        clock.t += step
        seconds -= step
        pipe._keep_budget(2.0, clock.t)
        rates.append(pipe._analysed_fps())
    return rates


def budgeted(clock: Clock, monkeypatch, **camera) -> CameraPipeline:
    monkeypatch.setattr(workers.stream, "time", clock)
    return CameraPipeline({"id": "cam", "url": "synthetic://street?fps=25", "fps": 25, "max_frame_age_ms": 300,
                           **camera}, None, MODEL_INFO, RecordingPublisher())


def test_the_budget_keeps_a_camera_with_lines_or_zones_at_the_rate_counting_needs(monkeypatch):
    """Overloaded, a 25 fps camera with a counting line went down to 2.5 fps (a 10 fps one to 1), where no vehicle
    is tracked from one frame to the next: its counts fell to almost nothing, and nothing said why. With lines or
    zones it stops at COUNTING_MIN_FPS (said as min_fps); without, it still goes down to a tenth."""
    for extra in ({"lines": [LINE]}, {"zones": [ZONE]}, {"fps": 10, "lines": [LINE]}):
        clock = Clock()
        pipe = budgeted(clock, monkeypatch, **extra)
        rates = overloaded(pipe, clock)
        assert min(rates) == COUNTING_MIN_FPS and pipe.budget.min_fps == COUNTING_MIN_FPS, extra
        assert pipe.budget.actions["min_fps"] == 1 and rates[-1] == COUNTING_MIN_FPS
    clock = Clock()
    plain = budgeted(clock, monkeypatch)
    assert min(overloaded(plain, clock)) == 2.5
    # configured below that rate: never cut below its configuration (only its batch wait goes)
    clock = Clock()
    slow = budgeted(clock, monkeypatch, fps=3, lines=[LINE])
    assert set(overloaded(slow, clock)) == {3.0} and slow.budget.actions["fps"] == 0


def test_lines_set_live_on_a_budgeted_camera_raise_its_floor(monkeypatch):
    """A camera that got its first line by a live update was cut as one without: its budget starts afresh."""
    clock = Clock()
    pipe = budgeted(clock, monkeypatch)
    overloaded(pipe, clock, 30)
    assert pipe._analysed_fps() < COUNTING_MIN_FPS
    pipe.update(CameraConfig.model_validate({**pipe.camera.model_dump(), "lines": [LINE]}))
    assert pipe._analysed_fps() == 25
    assert min(overloaded(pipe, clock)) == COUNTING_MIN_FPS


def perfect_boxes(seed: int, fps: float, frames: int):
    """An infer function that finds exactly the synthetic street's objects (those at least 30% visible)."""
    scene = StreetScene(seed, width=640, height=360, fps=fps)
    truths = [scene.step()[1] for _ in range(frames)]

    async def infer(req):
        t, lb = truths[req.frame], req.letterbox
        keep = t.visibility >= 0.3
        offset = np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], np.float32)
        boxes = t.boxes[keep].astype(np.float32) * lb.scale + offset
        classes = [CLASS_NAMES[c] for c in t.class_ids[keep]]
        out = {}
        for head in req.heads:
            names = HEADS[head]
            mine = np.array([c in names for c in classes], bool)
            out[head] = {"boxes": boxes[mine].reshape(-1, 4), "scores": np.full(int(mine.sum()), 0.9, np.float32),
                         "class_ids": np.array([names.index(c) for c, m in zip(classes, mine) if m], np.int64)}
        return out
    return infer


def counted(seed: int, source_fps: float, fps: float | None, seconds: float = 60) -> tuple[int, int]:
    """Line crossings and zone entries of one run over the synthetic street with perfect boxes."""
    frames = int(seconds * source_fps)
    cam = {"id": "cam", "url": f"synthetic://street?seed={seed}&fps={source_fps:g}&frames={frames}&density=1",
           "realtime": False, "snapshot": {"enabled": False}, "lines": [LINE], "zones": [ZONE]}
    if fps:
        cam["fps"] = fps
    pub = RecordingPublisher()
    asyncio.run(CameraPipeline(cam, perfect_boxes(seed, source_fps, frames), MODEL_INFO, pub).run())
    types = pub.event_types()
    return types.count("line_crossed"), types.count("zone_entered")


def test_at_the_counting_rate_lines_and_zones_count_what_every_frame_does():
    """The floor's figure (docs/architecture.md, "Frame-age budget"): at COUNTING_MIN_FPS, with perfect boxes,
    the counts are within 5% of those of every frame analysed, from a 10 and from a 25 fps source (4 fps of this
    25 fps one missed 4 of 61 crossings; at 2 fps of the 10 fps one, seed 32 counted 8 of 69)."""
    for seed, source_fps in ((32, 10), (31, 25)):
        lines, zones = counted(seed, source_fps, None)
        low_lines, low_zones = counted(seed, source_fps, COUNTING_MIN_FPS)
        assert lines > 50 and zones > 50
        assert abs(low_lines - lines) <= 0.05 * lines and abs(low_zones - zones) <= 0.05 * zones, \
            (seed, source_fps, lines, low_lines, zones, low_zones)


# -- the warning for a camera configured below it ----------------------------------------------------------------

def test_a_config_with_a_counting_camera_below_the_rate_is_warned_of_not_refused(caplog):
    caplog.set_level(logging.WARNING)
    config = parse_config({"cameras": [
        {"id": "slow", "url": "synthetic://street", "fps": 2, "lines": [LINE]},
        {"id": "slow-zone", "url": "synthetic://street", "fps": 4.5, "zones": [ZONE]},
        {"id": "fast", "url": "synthetic://street", "fps": COUNTING_MIN_FPS, "lines": [LINE]},
        {"id": "unset", "url": "synthetic://street", "zones": [ZONE]},
        {"id": "no-counts", "url": "synthetic://street", "fps": 1}]}, "run5.yaml")
    assert [c.id for c in config.cameras] == ["slow", "slow-zone", "fast", "unset", "no-counts"]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2, said
    assert said[0].startswith("run5.yaml: camera slow: fps 2 is below the 5 fps") and "not counted" in said[0]
    assert said[1].startswith("run5.yaml: camera slow-zone: fps 4.5 is below the 5 fps")


def test_a_camera_added_or_updated_below_the_rate_is_warned_of(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    app = service(monkeypatch)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: {"changed": ["fps"], "restarted": False}
                        if ref == "update" else answer(ref))
    process = Process("hv-camera-gate")
    process.update = SimpleNamespace(remote=lambda camera_id, camera: "update")
    monkeypatch.setattr(app, "_spawn", lambda cams, **kw: [CameraHandle(c.id, c, process, process.name) for c in cams])
    app.add_camera({"id": "gate", "url": "synthetic://street", "fps": 2, "lines": [LINE]}, by="api:ops")
    app.update_camera("gate", {"fps": 8}, by="api:ops")  # fast enough: nothing to say
    app.update_camera("gate", {"fps": 3}, by="api:ops")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [s.split(" is below")[0] for s in said] == ["control: camera gate: fps 2", "control: camera gate: fps 3"]


# -- the status's latency percentiles: the last seconds --------------------------------------------------------

def published(pipe: CameraPipeline, clock: Clock, fps: float, seconds: float, latency_ms: float) -> None:
    """Publishes frames (nothing detected) at ``fps`` for ``seconds`` of the simulated clock, each ``latency_ms``
    old at its publish."""
    for _ in range(round(fps * seconds)):
        clock.t += 1 / fps
        index = pipe.published
        item = SimpleNamespace(index=index, pts=index / fps, wall=clock.time() - latency_ms / 1000,
                               mono=clock.t - latency_ms / 1000, size=(360, 640), letterbox=None, picture=None)
        pipe._publish_frame(item, {})


def pipeline_on(clock: Clock, monkeypatch) -> CameraPipeline:
    monkeypatch.setattr(workers.stream, "time", clock)
    return CameraPipeline({"id": "cam", "url": "synthetic://street", "snapshot": {"enabled": False}}, None,
                          MODEL_INFO, RecordingPublisher())


def test_latency_percentiles_after_an_overload_are_those_of_the_last_seconds(monkeypatch):
    """At the budget's 2.5 fps floor the last 300 frames were 2 minutes: after the load was cut the status said
    p95 2770 ms for over a minute while every frame since was at most 250 ms old."""
    clock = Clock()
    pipe = pipeline_on(clock, monkeypatch)
    published(pipe, clock, 2.5, 120, 2770)
    assert pipe.stats()["latency_ms_p95"] == 2770
    published(pipe, clock, 2.5, 6, 240)  # 6 s after the load was cut
    s = pipe.stats()
    assert s["latency_ms_p50"] == s["latency_ms_p95"] == 240
    # a fast camera: its last 5 s (250 frames at 50 fps), not its last 300 frames
    fast = pipeline_on(clock, monkeypatch)
    published(fast, clock, 50, 2, 900)
    published(fast, clock, 50, 5, 40)
    assert fast.stats()["latency_ms_p95"] == 40


def test_latency_percentiles_of_a_slow_camera_take_its_last_ten_frames_and_none_past_thirty_seconds(monkeypatch):
    """At 1 fps the last 5 s hold 5 frames: the percentiles take the last 10 (its last 10 s); a camera that has
    published nothing for 30 s has no latency to show (as its fps reads 0), not the one of long ago."""
    clock = Clock()
    pipe = pipeline_on(clock, monkeypatch)
    published(pipe, clock, 1, 30, 1500)
    published(pipe, clock, 1, 9, 100)
    s = pipe.stats()  # the last 10 frames: one of 1500 ms and nine of 100
    assert s["latency_ms_p50"] == 100 and s["latency_ms_p95"] == round(float(np.percentile([1500] + [100] * 9, 95)), 1)
    published(pipe, clock, 1, 1, 100)
    assert pipe.stats()["latency_ms_p95"] == 100
    clock.t += 29
    assert pipe.stats()["latency_ms_p95"] == 100
    clock.t += 2
    s = pipe.stats()
    assert s["latency_ms_p50"] is None and s["latency_ms_p95"] is None
    assert len(pipe.latencies) <= CameraPipeline.LATENCY_MIN_SAMPLES  # what it keeps stays bounded
