"""A camera's decoder and where its actor opens it (an audit of workers/capture.py, pipeline/app.py and
pipeline/cluster.py, 2026-12-06): a source slower to open than the stall timeout, a relative file path on a joined
Ray cluster.

CameraPipeline without Ray, with sources that take their time on cue; the controller's hand-over of cameras to
StreamActors with a stand-in placement (no Ray).
"""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import pipeline.cluster as cluster
import workers.capture
from pipeline.app import App
from pipeline.config import parse_config
from servers import encode_mp4
from test_capture_recovery import MODEL_INFO, RecordingPublisher, ScriptedCamera, no_detections, run_until
from workers.settings import CameraConfig
from workers.sources import SourceFrame, open_source
from workers.stream import CameraPipeline

# -- a source slower to open than the stall timeout ---------------------------------------------------------------


class SlowCamera(ScriptedCamera):
    """A live camera behind a slow link: each open takes ``open_s``, the first picture after it ``first_s``
    (waiting for a keyframe); ``hang_first_open`` holds the first open until released (a hung DNS lookup)."""

    open_s = first_s = 0.0
    opens = 0
    hang_first_open: threading.Event | None = None

    def open(self) -> None:
        type(self).opens += 1
        if type(self).opens == 1 and self.hang_first_open is not None:
            self.hang_first_open.wait(30)
        time.sleep(self.open_s)
        super().open()

    def read(self) -> SourceFrame | None:
        if self._index == 0:
            time.sleep(self.first_s)
        return super().read()


@pytest.fixture
def slow(monkeypatch):
    ScriptedCamera.script = {}
    ScriptedCamera.reads = SlowCamera.reads = StuckAfterFive.reads = 0  # counted per class (type(self).reads)
    SlowCamera.open_s = SlowCamera.first_s = 0.0
    SlowCamera.opens = 0
    SlowCamera.hang_first_open = None
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: SlowCamera(url))
    yield SlowCamera
    if SlowCamera.hang_first_open is not None:
        SlowCamera.hang_first_open.set()


def run_slow_camera(camera: dict) -> tuple[dict, RecordingPublisher]:
    """Runs the camera until 10 frames were published or the watchdog restarted its decoder 3 times."""
    pub = RecordingPublisher()
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/slow", **camera}, no_detections(), MODEL_INFO, pub)
    final = asyncio.run(run_until(pipe, lambda: len(pub.frames) >= 10 or pipe.watchdog_restarts >= 3, 30,
                                  "10 frames or 3 watchdog restarts"))
    return final, pub


@pytest.mark.timeout(60)
def test_an_open_slower_than_the_stall_timeout_is_not_a_stall(slow):
    """The heartbeat was set before source.open() and nothing refreshed it during the open: a camera whose open
    takes longer than its stall_timeout_s (an RTSP camera behind a slow link, opening within its open_timeout_s)
    was called stalled mid-open, abandoned, and opened again, for ever, without a single frame."""
    slow.open_s = 0.8
    final, pub = run_slow_camera({"stall_timeout_s": 0.3, "open_timeout_s": 5, "read_timeout_s": 5})
    assert final["watchdog_restarts"] == 0 and slow.opens == 1, final
    assert len(pub.frames) >= 10


@pytest.mark.timeout(60)
def test_a_first_picture_slower_than_the_stall_timeout_is_not_a_stall(slow):
    """The same for the first picture after the open (a live camera's first keyframe), within read_timeout_s."""
    slow.first_s = 0.8
    final, pub = run_slow_camera({"stall_timeout_s": 0.3, "open_timeout_s": 5, "read_timeout_s": 5})
    assert final["watchdog_restarts"] == 0 and slow.opens == 1, final
    assert len(pub.frames) >= 10


@pytest.mark.timeout(60)
def test_normal_path_guard_an_open_stuck_past_its_open_timeout_is_still_restarted(slow):
    """An open that outlasts its own open_timeout_s (FFmpeg stuck where its timeout does not reach) is still the
    watchdog's: abandoned, and the next open delivers."""
    slow.hang_first_open = threading.Event()
    final, pub = run_slow_camera({"stall_timeout_s": 0.3, "open_timeout_s": 0.3, "read_timeout_s": 5})
    assert final["watchdog_restarts"] >= 1 and slow.opens >= 2, final
    assert len(pub.frames) >= 10 and "no progress" in final["last_error"]


class StuckAfterFive(SlowCamera):
    """Hangs 10 s inside its 6th read (counted over every connection), once."""

    def read(self) -> SourceFrame | None:
        if type(self).reads == 5:
            type(self).reads += 1
            time.sleep(10)
        return super().read()


@pytest.mark.timeout(60)
def test_normal_path_guard_a_decoder_stuck_after_its_first_frames_is_restarted_within_the_stall_timeout(
        slow, monkeypatch):
    """Past the first picture the stall timeout alone decides (no grace of an open or a read timeout)."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: StuckAfterFive(url))
    started = time.monotonic()
    final, pub = run_slow_camera({"stall_timeout_s": 0.3, "open_timeout_s": 5, "read_timeout_s": 5})
    assert final["watchdog_restarts"] >= 1 and len(pub.frames) >= 10, final
    # open_timeout_s and read_timeout_s are 5 s: a watchdog that granted either to every read would come later
    assert time.monotonic() - started < 4, "the watchdog waited longer than the stall timeout"


# -- a relative file path on a joined Ray cluster -----------------------------------------------------------------


class FakeProcess:
    """A StreamActor handle that records what the controller hands it."""

    def __init__(self, cameras: list) -> None:
        self.cameras = [cam for cam, _ in cameras]
        self.start = SimpleNamespace(remote=self._start)

    def _start(self, camera_id: str, camera: CameraConfig | None = None, inference: list | None = None,
               restart: bool = False) -> str:
        if camera is not None:  # a camera joining a running process
            self.cameras.append(camera)
        return camera_id


def app_without_ray(cameras: list[dict]) -> tuple[App, list[FakeProcess]]:
    """An App whose placement creates FakeProcesses: ``_create`` as at the start, without Ray."""
    spawned: list[FakeProcess] = []

    def spawn(actor_class, options, cameras, *args):
        spawned.append(FakeProcess(cameras))
        return spawned[-1]

    app = App(parse_config({"cameras": cameras, "ray": {"cameras_per_process": 4}}), say=lambda text: None)
    app.model_info = {"input_size": [96, 160], "heads": {"people": ["person"]}}
    app.placement = SimpleNamespace(
        cores=2, in_camera_process=False, namespace="ns", replica_index=lambda camera, live: 0, spawn=spawn,
        stream_processes=lambda cams: [([cam], {"name": cluster.camera_actor_name(cam.id)}) for cam in cams])
    return app, spawned


def test_a_relative_file_path_reaches_the_stream_actor_absolute(tmp_path, monkeypatch):
    """`url: clips/a.mp4` went to the StreamActor as written, and the actor opened it in its own working directory:
    on a joined cluster the folder `ray start` ran in ("no such file"). It is made absolute from the controller's,
    as model.checkpoint is, for new processes and for processes a camera joins; the handle keeps what the actor got
    (a live update is compared with it)."""
    (tmp_path / "clips").mkdir()
    clip = encode_mp4(tmp_path / "clips" / "a.mp4", (np.full((48, 64, 3), 90, np.uint8) for _ in range(3)), 10)
    monkeypatch.chdir(tmp_path)
    app, spawned = app_without_ray([{"id": "a", "url": "clips/a.mp4"}])
    (handle, _), = app._create(app.config.cameras)
    app.cameras[handle.id] = handle
    (joined, _), = app._create([CameraConfig(id="b", url="clips/a.mp4")], run_time=True)
    assert joined.joined and len(spawned) == 1
    assert [cam.url for cam in spawned[0].cameras] == [str(clip)] * 2
    assert handle.config.url == joined.config.url == str(clip)
    assert app.config.cameras[0].url == "clips/a.mp4"  # the config keeps what the user wrote
    elsewhere = tmp_path / "ray-worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the actor's process
    source = open_source(spawned[0].cameras[0].url, realtime=False)
    source.open()
    try:
        assert source.read() is not None
    finally:
        source.close()


@pytest.mark.parametrize("url", ["/videos/a.mp4", "~/videos/a.mp4", "file:///videos/a.mp4", "rtsp://cam.local/1",
                                 "synthetic://street?seed=1", "/dev/video0", "device:///dev/video0"])
def test_normal_path_guard_other_urls_reach_the_stream_actor_as_written(url):
    app, spawned = app_without_ray([{"id": "a", "url": url}])
    (handle, _), = app._create(app.config.cameras)
    assert spawned[0].cameras[0].url == handle.config.url == url


def test_a_relative_path_written_with_a_variable_exports_as_written(monkeypatch, tmp_path):
    """The camera runs with its path made absolute (actor_camera): the export compared that with the file's
    relative URL, found them different, and wrote the absolute path as literal text, losing the ${VAR}."""
    from pipeline.camera_export import export_cameras
    from pipeline.config import parse_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPS", "clips")
    config = parse_config({"cameras": [{"id": "a", "url": "${CLIPS}/a.mp4"}]})
    running = cluster.actor_camera(config.cameras[0])
    assert running.url == str(tmp_path / "clips" / "a.mp4")
    cameras, needed = export_cameras([running], config._written_urls)
    assert cameras[0]["url"] == "${CLIPS}/a.mp4", (cameras, needed)
