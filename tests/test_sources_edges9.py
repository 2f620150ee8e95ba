"""workers.av_source edges (audit src9): a phone video's display matrix, a file whose first video track is
not its video, a live MJPEG camera over http. Files and servers are made here; each case failed on the code
before its fix (the normal_path_guard tests pass on both)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest

from servers import HOST, encode_mp4
from synthetic.scene import StreetScene
from workers.sources import SourceError, open_source


def read_all(url: str) -> list:
    source = open_source(url, realtime=False)
    source.open()
    try:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
        return frames
    finally:
        source.close()


def marked(width: int = 160, height: int = 96) -> np.ndarray:
    """A picture that shows which way it is turned: a white block in its top-left corner."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 3, : width // 4] = 255
    return rgb


def remux(src: Path, dst: Path, rotation: int | None = None, still_first: bool = False) -> Path:
    """``src``'s video copied into ``dst``, with a display matrix turning it ``rotation`` degrees
    counterclockwise, or after a one-picture JPEG track (a cover or thumbnail stored as a video track)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        if still_first:
            still = out.add_stream("mjpeg", rate=1)
            still.width, still.height, still.pix_fmt = 64, 64, "yuvj420p"
        video = out.add_stream_from_template(inp.streams.video[0])
        if rotation is not None:
            if not hasattr(video, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display matrix")
            video.set_display_rotation(rotation)
        if still_first:
            picture = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
            picture.pts = 0
            out.mux(still.encode(picture.reformat(format="yuvj420p")))
            out.mux(still.encode(None))
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:  # the flush packet at the end
                continue
            packet.stream = video
            out.mux(packet)
    return dst


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_phone_video_turned_by_its_display_matrix_is_read_upright(tmp_path: Path, rotation: int) -> None:
    # Before: frames came as stored (160x96 sideways); ffmpeg and every player show them turned.
    picture = marked()
    clip = remux(encode_mp4(tmp_path / "stored.mp4", [picture] * 5, fps=25), tmp_path / "phone.mp4", rotation)
    upright = np.rot90(picture, rotation // 90)  # what `ffmpeg -i phone.mp4` shows (it autorotates)
    frames = read_all(str(clip))
    assert len(frames) == 5
    for frame in frames:
        assert frame.size == upright.shape[:2]
        rgb = frame.to_rgb()
        assert rgb.shape == upright.shape
        assert np.abs(rgb.astype(int) - upright).mean() < 8, "turned the wrong way"
        image, lb = frame.to_model_input((128, 128))
        assert image.shape == (3, 128, 128) and lb.src_size == upright.shape[:2]


def test_normal_path_guard_a_video_without_a_display_matrix_stays_a_pyav_frame(tmp_path: Path) -> None:
    clip = encode_mp4(tmp_path / "plain.mp4", [marked()] * 3, fps=25)
    frames = read_all(str(clip))
    assert [f.size for f in frames] == [(96, 160)] * 3
    assert all(isinstance(f.image, av.VideoFrame) for f in frames)


def test_a_file_whose_first_video_track_is_a_still_picture_plays_its_video(tmp_path: Path) -> None:
    # Before: the camera showed the 64x64 still once and ended; the 10 frames of video were never read.
    scene = StreetScene(1, width=320, height=192)
    clip = encode_mp4(tmp_path / "video.mp4", [scene.step()[0] for _ in range(10)], fps=25)
    both = remux(clip, tmp_path / "still-first.mkv", still_first=True)
    with av.open(str(both)) as c:
        assert [(s.index, s.codec_context.name) for s in c.streams.video] == [(0, "mjpeg"), (1, "h264")]
    frames = read_all(str(both))
    assert [f.size for f in frames] == [(192, 320)] * 10


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A web server over ``tmp_path``; ``/live.mjpg`` is an IP camera's MJPEG stream (100 pictures as fast as the
    client reads them, no timestamps: FFmpeg guesses 25 fps), anything else a file."""
    import cv2

    pictures = [cv2.imencode(".jpg", np.full((48, 64, 3), i, np.uint8))[1].tobytes() for i in range(MJPEG_FRAMES)]

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self) -> None:
            if self.path != "/live.mjpg":
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace;boundary=frame")
            self.end_headers()
            for jpg in pictures:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg
                                 + b"\r\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield tmp_path, server.server_address[1]
    server.shutdown()
    server.server_close()


MJPEG_FRAMES = 100  # 4 s of stream time at the 25 fps FFmpeg guesses


def read_timed(url: str) -> tuple[int, float]:
    """(frames read until the stream ends or hangs up, seconds it took) of a realtime source."""
    source = open_source(url, read_timeout_s=10)
    source.open()
    started, n = time.monotonic(), 0
    try:
        while source.read() is not None:
            n += 1
    except SourceError:  # the server hanging up after the last picture: how a live camera ends
        pass
    finally:
        source.close()
    return n, time.monotonic() - started


@pytest.mark.timeout(30)
def test_a_live_mjpeg_camera_over_http_is_not_held_back_to_a_guessed_rate(http_root: tuple[Path, int]) -> None:
    # Before: paced at 25 fps, 100 pictures took 4 s however fast the camera sent them: a 30 fps camera fell
    # further behind live every second.
    n, took = read_timed(f"http://{HOST}:{http_root[1]}/live.mjpg")
    assert n == MJPEG_FRAMES
    assert took < 2.5, f"{n} pictures took {took:.1f} s: paced, not live"


@pytest.mark.timeout(30)
def test_normal_path_guard_a_file_over_http_is_still_paced_at_its_rate(http_root: tuple[Path, int]) -> None:
    root, port = http_root
    scene = StreetScene(1, width=160, height=96)
    # moov first: Python's server has no Range requests to reach an index at the end
    encode_mp4(root / "plain.mp4", [scene.step()[0] for _ in range(25)], fps=25)
    with av.open(str(root / "plain.mp4")) as inp, av.open(str(root / "clip.mp4"), "w",
                                                          options={"movflags": "faststart"}) as out:
        video = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                out.mux(packet)
    n, took = read_timed(f"http://{HOST}:{port}/clip.mp4")
    assert n == 25 and took >= 0.9  # 25 frames at 25 fps: the last is due 0.96 s after the first


@pytest.mark.timeout(30)
def test_a_hardware_open_that_fails_on_the_url_logs_no_password(http_root: tuple[Path, int], caplog,
                                                                 monkeypatch) -> None:
    # Before: the first (hardware) open failing on a camera's glitch and the plain one working logged FFmpeg's text,
    # which names the raw URL: "... failed ([Errno 1094995529] Invalid data ...: 'http://admin:s3cr3tpw@...')".
    root, port = http_root
    encode_mp4(root / "clip.mp4", [marked()] * 3, fps=25)
    real_open = av.open

    def glitch_on_hardware_open(target, *args, **kwargs):
        if kwargs.get("hwaccel") is not None:
            raise av.InvalidDataError(1094995529, "Invalid data found when processing input", target)
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(av, "open", glitch_on_hardware_open)
    source = open_source(f"http://admin:s3cr3tpw@{HOST}:{port}/clip.mp4", realtime=False, hwaccel="cuda")
    source.open()
    try:
        assert source.read() is not None
    finally:
        source.close()
    assert "hardware decoding with cuda failed" in caplog.text
    assert "s3cr3tpw" not in caplog.text
