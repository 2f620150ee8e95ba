"""Sources and the capture thread on odd but legal input: a TS that gains a track mid-file, a paced synthetic scene
of N frames, a looping file resumed after many passes, AVIs of H.264 with B-frames (a time base of half a frame,
pts in decode order).

Clips are made here with PyAV (small, in milliseconds); captures run without Ray, their frames taken from the slot.
"""
from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from pathlib import Path
from unittest.mock import ANY

import av
import numpy as np
import pytest

from servers import encode_mp4
from synthetic.scene import StreetScene
from workers.capture import Capture, FrameSlot
from workers.settings import CameraConfig
from workers.sources import SourceError, SourceFrame, open_source


def read_all(source, limit: int = 100_000) -> tuple[list[SourceFrame], BaseException | None]:
    """Frames until the end (None) or an exception, which is returned (any kind: read() may raise only SourceError)."""
    frames: list[SourceFrame] = []
    try:
        source.open()
        while len(frames) < limit and (frame := source.read()) is not None:
            frames.append(frame)
    except Exception as exc:  # noqa: BLE001 - the test says which kind it got
        return frames, exc
    finally:
        source.close()
    return frames, None


def street(n: int, width: int = 160, height: int = 96) -> list[np.ndarray]:
    scene = StreetScene(1, width=width, height=height, fps=25)
    return [scene.step()[0] for _ in range(n)]


def run_capture(camera: dict, deadline_s: float, until=None, **kwargs) -> tuple[Capture, list, list]:
    """Runs a Capture until its slot closes (the source ended or failed), ``until(events)`` holds or ``deadline_s``
    passes; returns it, the frames it handed over (a lossless slot: every one) and its events."""
    async def main() -> tuple[Capture, list, list]:
        slot, frames, events = FrameSlot(asyncio.get_running_loop(), lossless=True), [], []
        cap = Capture(CameraConfig(id="cam", **camera), (96, 160), slot, lambda t, f: events.append((t, f)), **kwargs)
        cap.start()
        end = time.monotonic() + deadline_s
        try:
            while time.monotonic() < end and not (until and until(events)):
                try:
                    item = await asyncio.wait_for(slot.get(), 0.2)
                except asyncio.TimeoutError:
                    continue
                if item is None:
                    break
                frames.append(item)
        finally:
            cap.stop()
        return cap, frames, events

    return asyncio.run(main())


# -- a TS whose program gains a track mid-file ------------------------------------------------------------------

def _ts_gaining_a_track(tmp: Path) -> tuple[Path, int]:
    """Video only, then (after what opening the file probes at its start and its end) a stretch whose program also
    has audio, then video only again: FFmpeg's demuxer adds the audio stream when it gets there. And its frame count."""
    def write(path: Path, seconds: float, audio: bool) -> bytes:
        with av.open(str(path), "w", format="mpegts") as out:
            video = out.add_stream("mpeg2video", rate=25)
            video.width = video.height = 64
            video.pix_fmt = "yuv420p"
            sound = out.add_stream("mp2", rate=48000) if audio else None
            for i in range(round(seconds * 25)):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i % 255, np.uint8), format="rgb24")
                frame.pts = i
                out.mux(video.encode(frame))
            out.mux(video.encode())
            if sound is not None:
                for i in range(round(seconds * 48000 / 1152)):
                    samples = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 1152), np.int16), format="s16",
                                                         layout="stereo")
                    samples.sample_rate, samples.pts = 48000, i * 1152
                    out.mux(sound.encode(samples))
                out.mux(sound.encode())
        return path.read_bytes()

    head = write(tmp / "head.ts", 10, False)  # 250 frames
    middle = write(tmp / "middle.ts", 1, True)  # 25
    tail = write(tmp / "tail.ts", 40, False)  # 1000, more than the 250 kB FFmpeg reads at the end for the duration
    path = tmp / "gains-a-track.ts"
    path.write_bytes(head + middle + tail)
    return path, 250 + 25 + 1000


@pytest.fixture(scope="module")
def ts_gaining_a_track(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    return _ts_gaining_a_track(tmp_path_factory.mktemp("ts"))


def test_a_ts_file_that_gains_a_track_mid_file_ends_normally(ts_gaining_a_track: tuple[Path, int]) -> None:
    """PyAV's demux() raised IndexError at the end of such a file (its flush looks streams up in the list it had at
    open): not a SourceError, so the capture thread "crashed", was restarted, skipped to the end and crashed again,
    forever, instead of ending the file."""
    path, count = ts_gaining_a_track
    with av.open(str(path)) as probe:
        assert len(probe.streams) == 1  # the audio is met only while reading, as the test means
    frames, error = read_all(open_source(str(path), realtime=False))
    assert error is None, repr(error)
    assert len(frames) == count
    assert np.all(np.diff([f.pts for f in frames]) > 0)


def test_a_capture_of_a_ts_file_that_gains_a_track_ends_not_crashes(ts_gaining_a_track: tuple[Path, int]) -> None:
    path, count = ts_gaining_a_track
    cap, frames, events = run_capture({"url": str(path), "realtime": False}, 60)
    assert cap.state == "ended", (cap.state, cap.last_error)
    assert len(frames) == count
    assert events[-1] == ("stream_down", {"reason": "end of file"})


# -- a paced synthetic scene of N frames ------------------------------------------------------------------------

def test_a_paced_synthetic_scene_of_n_frames_ends_like_a_file() -> None:
    """``frames=N`` ends the scene; paced (realtime, the default) it is a live source, whose end was taken for a
    dropped connection: the capture reconnected and played the same N frames again, forever."""
    url = "synthetic://street?fps=100&frames=5&size=160x96"
    cap, frames, events = run_capture({"url": url}, 20, until=lambda evs: ("stream_reconnecting", ANY) in evs)
    assert cap.state == "ended", (cap.state, [t for t, _ in events])
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert events == [("stream_up", {}), ("stream_down", {"reason": "end of file"})]


def test_normal_path_guard_a_live_camera_that_hangs_up_is_still_reconnected(monkeypatch) -> None:
    """The end of a live camera's stream stays a dropped connection: backed off and reconnected."""
    import workers.capture

    opened = []

    def one_frame_camera(url: str, **_: object):
        source = open_source("synthetic://street?fps=100&frames=1&size=160x96")
        opened.append(source)
        return source

    monkeypatch.setattr(workers.capture, "open_source", one_frame_camera)
    cap, frames, events = run_capture({"url": "rtsp://127.0.0.1:9/cam"}, 20,
                                      until=lambda evs: [t for t, _ in evs].count("stream_up") >= 2)
    assert [t for t, _ in events][:4] == ["stream_up", "stream_down", "stream_reconnecting", "stream_up"]
    assert len(opened) >= 2 and len(frames) >= 2


# -- a looping file resumed after many passes -------------------------------------------------------------------

def test_a_looping_file_resumed_after_many_passes_skips_them_at_once(tmp_path: Path) -> None:
    """A looping file's position counts every frame of every pass: a decoder replaced (watchdog, a live update) or an
    actor restarted after a day of passes decoded them all again, unpaced, before its first frame (hours of nothing
    published for a long clip). Whole passes are now counted without decoding, pts as if played."""
    clip = encode_mp4(tmp_path / "loop.mp4", street(12, 64, 64), fps=25, gop=4)
    reference, _ = read_all(open_source(str(clip), realtime=False, loop=True), limit=30)
    pass_s = reference[12 + 5].pts - reference[5].pts
    assert pass_s == pytest.approx(12 / 25)
    target = 12 * 1_000_000 + 5  # a million passes of this 0.48 s clip: 5.5 days of playing it

    source = open_source(str(clip), realtime=False, loop=True)
    source.unpaced_until = target
    source.open()
    deadline = time.monotonic() + 10
    try:
        while (frame := source.read()).index < target:
            assert time.monotonic() < deadline, f"still skipping at frame {frame.index} of {target}"
    finally:
        source.close()
    assert frame.index == target
    assert frame.pts == pytest.approx(reference[5].pts + 1_000_000 * pass_s, abs=1e-6)
    assert np.array_equal(frame.to_rgb(), reference[5].to_rgb())


def test_normal_path_guard_a_short_resume_of_a_looping_file_matches_playing_it_through(tmp_path: Path) -> None:
    clip = encode_mp4(tmp_path / "loop.mp4", street(12, 64, 64), fps=25, gop=4)
    reference, _ = read_all(open_source(str(clip), realtime=False, loop=True), limit=40)
    for target in (0, 7, 12, 30):  # 30: one whole pass counted, not decoded
        source = open_source(str(clip), realtime=False, loop=True)
        source.unpaced_until = target
        source.open()
        while (frame := source.read()).index < target:
            pass
        source.close()
        assert frame.index == target and frame.pts == pytest.approx(reference[target].pts)
        assert np.array_equal(frame.to_rgb(), reference[target].to_rgb())


# -- an AVI whose time base is half a frame ---------------------------------------------------------------------

def _avi(path: Path, n: int, ticks_per_frame: int = 2) -> Path:
    """H.264 with B-frames in AVI, by default at a time base of half a frame: what `ffmpeg -i in.mp4 -c copy out.avi`
    writes."""
    tick = Fraction(1, 25 * ticks_per_frame)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        video.options = {"preset": "veryfast"}  # B-frames
        video.codec_context.time_base = tick
        for i, rgb in enumerate(street(n)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = ticks_per_frame * i, tick
            out.mux(video.encode(frame))
        out.mux(video.encode())
    return path


def test_an_intact_avi_with_a_half_frame_time_base_is_not_called_truncated(tmp_path: Path) -> None:
    """AVI's stream length counts ticks of its time base: 80 for these 40 frames. Compared with the 40 packets read,
    the whole file was reported "truncated: it ends after 40 frames of the 80 its index lists" and the camera
    failed at its normal end."""
    path = _avi(tmp_path / "b-frames.avi", 40)
    with av.open(str(path)) as probe:
        assert probe.streams.video[0].frames == 80 and probe.streams.video[0].time_base == Fraction(1, 50)
    frames, error = read_all(open_source(str(path), realtime=False))
    assert error is None, str(error)
    assert len(frames) == 40


def test_normal_path_guard_a_cut_avi_is_still_reported_truncated(tmp_path: Path) -> None:
    data = _avi(tmp_path / "b-frames.avi", 40).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 6 // 10])
    frames, error = read_all(open_source(str(cut), realtime=False))
    assert isinstance(error, SourceError) and error.kind == "decode", repr(error)
    assert f"ends after {len(frames)} frames of the 40 its index lists" in str(error)


def test_an_avi_whose_b_frames_carry_pts_in_decode_order_keeps_stream_time(tmp_path: Path) -> None:
    """AVI has no presentation times: FFmpeg hands its B-frames' pts over in decode order (ffmpeg and ffprobe use
    the dts there, FFmpeg's best_effort_timestamp). Each backward step re-anchored the pts clock one frame on, so
    stream time ran at about twice the clock: a paced file played at half speed, dwell times doubled."""
    path = _avi(tmp_path / "b-frames.avi", 40, ticks_per_frame=1)  # one tick a frame: its length is right
    frames, error = read_all(open_source(str(path), realtime=False))
    assert error is None and len(frames) == 40, str(error)
    pts = np.array([f.pts for f in frames])
    assert np.allclose(np.diff(pts[2:-2]), 0.04), pts  # the first and last frames: pts before enough is known
    assert pts[-1] < 40 * 0.04 * 1.25


# -- snapshots of an overloaded camera ---------------------------------------------------------------------------

def test_a_due_picture_on_a_replaced_frame_goes_to_the_next_frame() -> None:
    """A snapshot's picture rides on one frame; a live slot whose frames are replaced before they are taken (an
    overloaded camera) threw it away with its frame, and the next picture came only at the next due time: at 25 fps
    analysed at 5 the dashboard got about one snapshot in five. Nothing is taken here: every frame is replaced."""
    async def main() -> tuple[Capture, object]:
        slot = FrameSlot(asyncio.get_running_loop(), lossless=False)
        camera = CameraConfig(id="cam", url="synthetic://street?frames=30&fps=25", realtime=False,
                              snapshot={"fps": 1})
        cap = Capture(camera, (96, 160), slot, lambda t, f: None)
        cap.start()
        end = time.monotonic() + 30
        while cap.state not in ("ended", "failed") and time.monotonic() < end:
            await asyncio.sleep(0.02)
        item = await asyncio.wait_for(slot.get(), 5)
        cap.stop()
        return cap, item

    cap, last = asyncio.run(main())
    assert cap.state == "ended" and cap.slot.replaced == 29
    # frame 25 (1.0 s) was due and replaced unseen, as was every frame after it: the frame left still carries one
    assert last.index == 29 and last.picture is not None


def test_a_time_base_taken_for_a_frame_rate_is_no_rate():
    """A stream that says no rate can get its time base's as one (90000 for RTSP): read as the camera's rate,
    the tracker kept lost tracks for hours; unknown, the pipeline measures the rate it delivers."""
    from types import SimpleNamespace

    from workers.av_source import nominal_rate

    assert nominal_rate(SimpleNamespace(average_rate=None, guessed_rate=Fraction(90000), base_rate=None)) is None
    assert nominal_rate(SimpleNamespace(average_rate=None, guessed_rate=None, base_rate=None)) is None
    assert nominal_rate(SimpleNamespace(average_rate=Fraction(30000, 1001), guessed_rate=None, base_rate=None)) \
        == pytest.approx(29.97, abs=0.01)
    assert nominal_rate(SimpleNamespace(average_rate=None, guessed_rate=Fraction(240), base_rate=None)) == 240
