"""Decoding edges (an audit of workers/capture.py, workers/av_source.py, workers/source_base.py and
workers/sources.py, 2026-12-07): an IP camera's MJPEG stream, which carries no timestamps; a hardware decoder the
stream's codec cannot use; what an http camera's playlist or redirect may make FFmpeg open.

Clips are made here with PyAV; the web server is Python's, on a free port. Each case failed on the code before its
fix; the normal_path_guard tests pass on both and pin what FFmpeg already refuses.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest

from servers import HOST, serving
from workers.capture import RateGate
from workers.sources import SourceError, SourceFrame, open_source


def read_all(url: str, **kwargs: object) -> list[SourceFrame]:
    source = open_source(url, realtime=False, open_timeout_s=5, read_timeout_s=5, **kwargs)
    source.open()
    try:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
        return frames
    finally:
        source.close()


def h264(path: Path, n: int = 10, fmt: str | None = None) -> Path:
    """An H.264 clip of ``n`` 64x48 frames at 10 fps (``fmt``: the container, by default from the suffix)."""
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=10, options={"tune": "zerolatency"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


# -- an MJPEG camera over http: no timestamps ---------------------------------------------------------------------

MJPEG_PICTURES, MJPEG_GAP_S = 16, 0.15  # a ~7 fps camera; FFmpeg guesses 25 fps for a format without timestamps


def jpegs(n: int) -> list[bytes]:
    import cv2

    return [cv2.imencode(".jpg", np.full((48, 64, 3), 15 * i, np.uint8))[1].tobytes() for i in range(n)]


@pytest.fixture
def mjpeg_camera() -> Iterator[str]:
    """The URL of an IP camera's MJPEG stream: a picture every MJPEG_GAP_S (at least), then it hangs up."""
    pictures = jpegs(MJPEG_PICTURES)

    class Camera(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace;boundary=frame")
            self.end_headers()
            for jpg in pictures:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                                 + jpg + b"\r\n")
                self.wfile.flush()
                time.sleep(MJPEG_GAP_S)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Camera) as url:
        yield f"{url}/video.mjpg"


@pytest.mark.timeout(30)
def test_an_mjpeg_camera_over_http_keeps_real_stream_time(mjpeg_camera: str) -> None:
    """MJPEG over http carries no timestamps; FFmpeg numbered its pictures at a guessed 25 fps, so a 10 fps camera's
    stream time ran at 0.4x real time, and everything timed by it with it: fps 10 analysed 4 frames a second (the rate
    gate below lets ~27% of this camera's through at its own rate), dwell times and track durations read 0.4x,
    snapshots came 2.5x apart. The guess was its nominal rate too (the tracker's frame rate): unknown now, so the
    pipeline measures it. Times are compared to when read() returned, so a slow machine only spreads both."""
    source = open_source(mjpeg_camera, read_timeout_s=10)
    source.open()
    frames, read_at = [], []
    try:
        while (frame := source.read()) is not None:
            frames.append(frame)
            read_at.append(time.monotonic())
    except SourceError:  # the camera hanging up after its last picture
        pass
    finally:
        source.close()
    assert len(frames) == MJPEG_PICTURES
    first = MJPEG_PICTURES // 2  # well past the pictures FFmpeg read while probing, handed over at once
    stream_s, real_s = frames[-1].pts - frames[first].pts, read_at[-1] - read_at[first]
    assert real_s > 0.5, f"the last {MJPEG_PICTURES - first} pictures came within {real_s:.2f} s: nothing to compare"
    assert stream_s == pytest.approx(real_s, abs=0.15), f"{stream_s:.2f} s of stream time in {real_s:.2f} s"
    gate, live = RateGate(), frames[first:]
    admitted = sum(gate.admit(f.pts, 1 / MJPEG_GAP_S) for f in live)
    assert admitted >= 0.6 * len(live), f"fps {1 / MJPEG_GAP_S:.3g} let {admitted} of {len(live)} frames through"
    assert source.nominal_fps is None, f"FFmpeg's guess {source.nominal_fps} taken for the camera's rate"


def test_normal_path_guard_an_mjpeg_file_still_plays_at_the_rate_ffmpeg_gives_it(tmp_path: Path) -> None:
    """A file has no arrival to time it by: its pictures keep FFmpeg's 25 fps."""
    clip = tmp_path / "clip.mjpeg"
    clip.write_bytes(b"".join(jpegs(10)))
    frames = read_all(str(clip))
    assert len(frames) == 10 and np.allclose(np.diff([f.pts for f in frames]), 0.04)


# -- a hardware decoder the codec cannot use ------------------------------------------------------------------------


def test_a_hwaccel_the_codec_cannot_use_says_so_and_stops_naming_it(tmp_path: Path, caplog) -> None:
    """PyAV decodes on the CPU without a word when the stream's decoder has no configuration for the device (FFmpeg's
    own H.264 decoder on qsv, drm or amf, all of which pass the config's check where the build lists them): the
    warning README promises ("falls back to the CPU decoder with a warning") never came, and the source went on
    naming the device."""
    from av.codec.hwaccel import HWDeviceType, hwdevices_available

    usable = {HWDeviceType(config.device_type).name for config in av.Codec("h264", "r").hardware_configs}
    unusable = [device for device in hwdevices_available() if device not in usable]
    if not unusable:
        pytest.skip(f"every device this FFmpeg lists ({hwdevices_available()}) decodes H.264")
    clip = h264(tmp_path / "clip.mp4")
    source = open_source(str(clip), realtime=False, hwaccel=unusable[0])
    source.open()
    try:
        assert source.read() is not None
    finally:
        source.close()
    assert source.hwaccel is None, f"still names {source.hwaccel!r} while decoding on the CPU"
    assert f"hardware decoding with {unusable[0]} is not available" in caplog.text


# -- what an http camera can make FFmpeg open -------------------------------------------------------------------


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    """(web root, a clip outside it, port): Python's file server over the root; ``/moved`` answers 302 to the clip's
    file:// URL."""
    root, outside = tmp_path / "www", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    local = h264(outside / "local.ts", fmt="mpegts")
    (root / "remote.ts").write_bytes(local.read_bytes())

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            if self.path != "/moved":
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", local.as_uri())
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield root, local, server.server_address[1]
    server.shutdown()
    server.server_close()


def playlist(root: Path, name: str, segment: str) -> str:
    (root / name).write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n"
                             f"{segment}\n#EXT-X-ENDLIST\n")
    return name


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["file:// segment", "absolute path segment", "redirect to file://"])
def test_normal_path_guard_an_http_camera_cannot_make_ffmpeg_read_local_files(web, how: str) -> None:
    """The audit's question: av_source sets no protocol_whitelist, so may an http camera's HLS playlist (or a
    redirect) name a local file and have FFmpeg read it? No: what an http URL opens inherits FFmpeg's http
    whitelist (http,https,tls,rtp,tcp,udp,crypto,httpproxy,data), and a relative path stays on the server. An RTSP
    redirect to file:// is refused too (tried by hand: FFmpeg dials the new URL over TCP)."""
    root, local, port = web
    path = {"file:// segment": lambda: playlist(root, "a.m3u8", local.as_uri()),
            "absolute path segment": lambda: playlist(root, "b.m3u8", str(local)),
            "redirect to file://": lambda: "moved"}[how]()
    with pytest.raises(SourceError):
        read_all(f"http://{HOST}:{port}/{path}")


@pytest.mark.timeout(30)
def test_normal_path_guard_hls_over_http_with_its_segments_on_the_server_plays(web) -> None:
    root, _, port = web
    frames = read_all(f"http://{HOST}:{port}/{playlist(root, 'ok.m3u8', 'remote.ts')}")
    assert len(frames) == 10 and np.all(np.diff([f.pts for f in frames]) > 0)
