"""Decoding and reconnecting over the long run (an audit of workers/capture.py, workers/av_source.py and
workers/source_base.py, 2026-12-06): a camera away for hours, a raw H.264 dump played in a loop, a camera
whose clock is stuck.

Captures run without Ray, their frames taken from the slot; clips are made here with PyAV.
"""
from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest

import workers.capture
from workers.capture import Capture, FrameSlot
from workers.settings import CameraConfig
from workers.sources import PtsClock, Source, SourceError, SourceFrame, open_source


def read_n(source: Source, limit: int) -> list[SourceFrame]:
    """Up to ``limit`` frames, fewer at the end of the stream; the source is closed afterwards."""
    frames: list[SourceFrame] = []
    source.open()
    try:
        while len(frames) < limit and (frame := source.read()) is not None:
            frames.append(frame)
    finally:
        source.close()
    return frames


def crc(frame: SourceFrame) -> int:
    return zlib.crc32(frame.to_rgb().tobytes())


# -- a camera away for hours -------------------------------------------------------------------------------------

class Refused(Source):
    """A live camera that refuses every connection, at once."""

    def __init__(self, url: str, **_: object) -> None:
        self.url, self.live, self.nominal_fps = url, True, None

    def open(self) -> None:
        raise SourceError("refused", f"{self.url}: connection refused")

    def close(self) -> None:
        pass


@pytest.mark.timeout(90)
def test_a_camera_away_for_hours_keeps_backing_off_without_crashing(monkeypatch) -> None:
    """The backoff was 0.5 s x 2 ** attempts, capped only after the power: at the 1025th attempt in a row (a camera
    away ~3 hours at the 15 s cap) the power overflowed a float and the decode thread crashed (OverflowError), was
    restarted by the watchdog as a crash, and started backing off from 0.5 s again. Delays shrunk here, not the
    count."""
    monkeypatch.setattr(workers.capture, "open_source", lambda url, **kw: Refused(url))
    monkeypatch.setattr(Capture, "BACKOFF_INITIAL_S", 1e-7)
    monkeypatch.setattr(Capture, "BACKOFF_MAX_S", 1e-6)

    attempts = [0]  # the last stream_reconnecting's attempt: the attempts in a row (reconnects counts outages)

    def on_event(type_: str, fields: dict) -> None:
        if type_ == "stream_reconnecting":
            attempts[0] = fields["attempt"]

    async def main() -> Capture:
        slot = FrameSlot(asyncio.get_running_loop())
        cap = Capture(CameraConfig(id="cam", url="rtsp://127.0.0.1:9/cam"), (96, 160), slot, on_event)
        cap.start()
        deadline = time.monotonic() + 60
        while cap.alive and attempts[0] < 1100 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cap.stop()
        return cap

    cap = asyncio.run(main())
    assert attempts[0] >= 1100, (attempts[0], cap.state, cap.last_error)
    assert cap.state == "stopped", (cap.state, cap.last_error)
    assert "connection refused" in cap.last_error


# -- a raw H.264 dump played in a loop ---------------------------------------------------------------------------

def raw_h264(path: Path, n: int) -> Path:
    """An H.264 elementary stream (what `ffmpeg -i rtsp://... -c copy cam.h264` writes): no container, no
    timestamps. Frame i is a flat grey of level 40 i."""
    with av.open(str(path), "w", format="h264") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")))
        out.mux(video.encode())
    return path


def test_a_raw_h264_file_set_to_loop_loops(tmp_path: Path) -> None:
    """A raw stream has no timestamps to seek by (FFmpeg refuses a seek to time 0, EPERM): the file ended after
    one pass, as a normal end of file, whatever `loop` said."""
    path = raw_h264(tmp_path / "cam.h264", 6)
    frames = read_n(open_source(str(path), realtime=False, loop=True), 15)
    assert len(frames) == 15
    assert [crc(f) for f in frames[6:12]] == [crc(f) for f in frames[:6]]  # it really started over
    assert np.all(np.diff([f.pts for f in frames]) > 0)
    assert [f.index for f in frames] == list(range(15))


def test_normal_path_guard_a_raw_h264_file_not_set_to_loop_ends_normally(tmp_path: Path) -> None:
    path = raw_h264(tmp_path / "cam.h264", 6)
    source = open_source(str(path), realtime=False)
    frames = read_n(source, 15)
    assert [crc(f) for f in frames] == [crc(f) for f in read_n(open_source(str(path), realtime=False, loop=True), 6)]
    assert len(frames) == 6


# -- a clock stuck at one value ----------------------------------------------------------------------------------

def constant_time_mkv(path: Path, n: int) -> Path:
    """An mkv of ``n`` MJPEG pictures that all say time 0 (a camera whose clock is stuck); frame i: grey 20 i."""
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("mjpeg", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuvj420p"
        for i in range(n):
            rgb = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            for packet in video.encode(rgb.reformat(format="yuvj420p")):
                packet.pts = packet.dts = 0
                out.mux(packet)
    return path


def test_a_clock_stuck_at_one_value_still_moves_stream_time(tmp_path: Path) -> None:
    """PtsClock re-anchored a timestamp that went back but passed one that repeated: every frame of such a stream
    got pts 0. A paced file then played as fast as it decoded, and a camera's rate gate (fps: 5) let the first
    frame through and dropped every later one, each "0 s after" the last it let through."""
    path = constant_time_mkv(tmp_path / "stuck.mkv", 10)
    frames = read_n(open_source(str(path), realtime=False), 20)
    assert len(frames) == 10
    assert np.allclose(np.diff([f.pts for f in frames]), 0.04), [f.pts for f in frames]
    gate = workers.capture.RateGate()
    assert sum(gate.admit(f.pts, 5) for f in frames) == 2  # 0.36 s of stream at 5 fps: frames 0 and 5
    # a clock coarser than the frames (each value twice) keeps its own pace, neither stopping nor running ahead
    clock = PtsClock(25)
    assert [clock(t) for t in (0.0, 0.0, 0.08, 0.08, 0.16)] == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])


def test_normal_path_guard_timestamps_that_go_on_or_back_map_as_before() -> None:
    clock = PtsClock(25)
    got = [clock(t) for t in (None, 0.12, 0.16, 0.20, 5.0, 5.04, 0.0, 0.04, None, 0.12)]
    assert got == pytest.approx([0.0, 0.04, 0.08, 0.12, 4.92, 4.96, 5.0, 5.04, 5.08, 5.12])
