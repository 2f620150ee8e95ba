"""Four defects an operator's run on HTTP sources (MJPEG, progressive mp4, stalls) found in the capture.

1. A source that opens and fails before its first picture (an mp4 whose index is at its end, from a server without
   Range support) said ``stream_up`` then ``stream_down`` at every attempt, with the cause "connection failed: host
   unknown or unreachable, or it hung up". Now ``stream_up`` comes with the first picture, so the attempts are one
   outage (one stream_down, reconnects 1), and a failure after the open says so, not that the host is unknown.
2. The analysed fps was frames over the span of their capture times, ending at the last frame: a camera that
   stalled kept its old rate for 5 s (the status, the dashboard, hydravision_camera_fps), then read 0. Now the span
   runs on to now by however long the camera is overdue, so the rate falls; a steady camera reads as before.
3. A truncated JPEG part of an MJPEG stream was analysed as a whole picture (FFmpeg concealed the missing part
   with the previous picture's data) and counted nowhere. This PyAV has no decode_error_flags and its
   ``frame.is_corrupt`` stays False for them; FFmpeg's ``err_detect=explode`` makes the MJPEG decoder refuse them,
   so they are skipped and counted (decode_errors, the status's skipped_packets); whole pictures decode as before.
4. A progressive mp4 over http replayed for ever whatever ``loop`` said, each pass an outage (stream_down "end of
   stream", reconnecting, stream_up). An http source whose container says it has a duration is a file: it ends
   (state ended) or, with ``loop: true``, plays again, without an outage said.

The web server is Python's, on a free port, in a thread of the test; clips and pictures are made here.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest

import workers.capture
from mot import read_stream
from servers import HOST
from test_camera_update import until
from test_capture_recovery import MODEL_INFO, RecordingPublisher, no_detections
from workers.publish import Publisher, keys
from workers.sources import SourceError, open_source
from workers.stream import CameraPipeline

FRAMES = 10  # a clip's pictures, at 10 fps


def clip(path: Path, faststart: bool) -> bytes:
    """An H.264 mp4 of FRAMES 320x240 pictures of noise (~1 MB: more than FFmpeg's read buffer, which a seek back
    to the pictures could otherwise stay within); without ``faststart`` its index (moov) is at its end, as PyAV and
    ffmpeg write it by default."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=10, options={"tune": "zerolatency", "crf": "10", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for _ in range(FRAMES):
            frame = av.VideoFrame.from_ndarray((rng.random((240, 320, 3)) * 255).astype(np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path.read_bytes()


def pictures(n: int) -> list[np.ndarray]:
    """Textured 320x240 pictures, each its own brightness: a JPEG of them has a scan worth cutting short."""
    import cv2

    noise = cv2.GaussianBlur((np.random.default_rng(0).random((240, 320, 3)) * 120).astype(np.uint8), (9, 9), 3)
    return [noise + np.uint8(10 * i) for i in range(n)]


def jpeg(picture: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".jpg", picture)[1].tobytes()


class Web:
    """GET /norange/NAME: media[NAME], whole, without Range support (no Accept-Ranges, Range ignored), as a plain web
    server or a camera's built-in one serves a recording; GET /mjpeg: the ``parts`` as an IP camera's
    multipart/x-mixed-replace stream, then it hangs up."""

    def __init__(self) -> None:
        self.media: dict[str, bytes] = {}
        self.parts: list[bytes] = []
        self.gets = 0
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                web.gets += 1
                name = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/norange/") and name in web.media:
                    body = web.media[name]
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        self.wfile.write(body)
                    except OSError:  # the reader gave up on it
                        pass
                elif self.path == "/mjpeg":
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace;boundary=frame")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    for part in web.parts:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(part) + part + b"\r\n")
                    self.wfile.flush()
                else:
                    self.send_error(404)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"

    def __enter__(self) -> "Web":
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web() -> Iterator[Web]:
    with Web() as server:
        yield server


def events(client, *types: str) -> list[dict]:
    return [e for e in read_stream(client, keys("hv").events) if e["type"] in types]


def status(client) -> dict:
    raw = client.hget(keys("hv").cameras, "cam")
    return json.loads(raw) if raw else {}


STREAM_EVENTS = ("stream_up", "stream_down", "stream_reconnecting")


# -- 1. up with the first picture, not at the open --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_source_that_opens_and_fails_before_its_first_picture_is_one_outage(web, tmp_path, redis_server,
                                                                             monkeypatch) -> None:
    """An mp4 with its index at its end, from a server without Range: FFmpeg reads the index, opens, and cannot
    seek back to the pictures (EIO). Four attempts: one stream_down, four stream_reconnecting, no stream_up, and
    reconnects 1. Before: "stream_up / stream_down / stream_reconnecting" at every attempt (reconnects 4), the
    cause "host unknown or unreachable"."""
    web.media["clip.mp4"] = clip(tmp_path / "clip.mp4", faststart=False)
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_INITIAL_S", 0.01)
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_MAX_S", 0.05)
    client = redis_server.client()
    camera = {"id": "cam", "url": f"{web.url}/norange/clip.mp4", "open_timeout_s": 10, "read_timeout_s": 10}

    async def main() -> None:
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, no_detections(), MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            try:
                await until(lambda: len(events(client, "stream_reconnecting")) >= 4, 40, "four attempts")
            finally:
                pipe.stop()
                await task
            assert pub.flush(5)

    asyncio.run(main())
    said = events(client, *STREAM_EVENTS)
    kinds = [e["type"] for e in said]
    assert "stream_up" not in kinds and kinds.count("stream_down") == 1, kinds
    down = said[kinds.index("stream_down")]
    assert "host unknown" not in down["reason"] and "Range" in down["reason"], down
    assert status(client)["reconnects"] == 1, status(client)


def test_a_source_that_opens_says_a_read_failure_is_not_an_unknown_host(web, tmp_path) -> None:
    """The same at the source: the open works, the read fails, and the cause names what can fail after an open."""
    web.media["clip.mp4"] = clip(tmp_path / "clip.mp4", faststart=False)
    source = open_source(f"{web.url}/norange/clip.mp4", open_timeout_s=10, read_timeout_s=10)
    source.open()
    try:
        with pytest.raises(SourceError) as info:
            source.read()
    finally:
        source.close()
    assert info.value.kind == "unreachable", info.value
    assert "host unknown" not in str(info.value) and "after the stream opened" in str(info.value), info.value


# -- 2. the analysed fps falls during a stall ------------------------------------------------------------------------

def fps_at(monkeypatch, pipe: CameraPipeline, now: float) -> float:
    monkeypatch.setattr(time, "time", lambda: now)
    return pipe.stats()["fps"]


def test_the_analysed_fps_falls_while_a_camera_stalls_and_stays_steady_while_it_sends(monkeypatch) -> None:
    """10 fps, published 0.3 s after capture in batches of 4 (0.4 s apart), then nothing. Between two batches the
    rate reads 10 whenever it is looked at (not noisier than before); once a batch is overdue it falls, lower the
    longer the stall (before: 10 until 5 s had passed, then 0)."""
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://cam/x"}, no_detections(), MODEL_INFO, RecordingPublisher())
    start = 1_000_000.0
    for i in range(40):  # 4 s of frames
        wall = start + i / 10
        pipe.publish_times.append((start + (i // 4 * 4 + 3) / 10 + 0.3, wall))  # each batch when its last is in
    last = pipe.publish_times[-1][0]
    steady = [fps_at(monkeypatch, pipe, last + dt) for dt in (0.0, 0.1, 0.2, 0.3, 0.4)]
    assert steady == [10.0] * 5, steady
    stalled = [fps_at(monkeypatch, pipe, last + dt) for dt in (1.0, 2.0, 3.0, 4.5)]
    assert all(a > b for a, b in zip(stalled, stalled[1:])), stalled
    assert stalled[0] < 9.0 and stalled[-1] < 2.0, stalled
    assert fps_at(monkeypatch, pipe, last + 5.5) == 0.0  # nothing published within 5 s: as before


# -- 3. a truncated MJPEG part is skipped and counted ----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_truncated_jpeg_parts_of_an_mjpeg_stream_are_skipped_and_counted(web) -> None:
    """Nine parts: whole pictures (one without its EOI marker, one with bytes after it, as some cameras send them)
    and every third cut to a third of its bytes. The six whole ones come out, each its own picture; the three cut
    ones are counted in decode_errors. Before: nine pictures, the cut ones FFmpeg's concealment of them, and
    decode_errors 0."""
    shots = pictures(9)
    parts = [jpeg(p) for p in shots]
    parts[1] = parts[1][:-2]  # no EOI marker
    parts[4] = parts[4] + b"\r\n\0\0"  # bytes after it
    cut = {2, 5, 8}
    for i in cut:
        parts[i] = parts[i][:len(parts[i]) // 3]
    web.parts = parts
    source = open_source(f"{web.url}/mjpeg", open_timeout_s=10, read_timeout_s=10)
    source.open()
    frames = []
    try:
        while (frame := source.read()) is not None:
            frames.append(frame.to_rgb())
    except SourceError:  # the camera hanging up after its last part
        pass
    finally:
        source.close()
    # each picture shown is a whole one: by brightness (JPEG changes pixels a little, pictures differ by 10)
    shown = [int(np.argmin([abs(float(f.mean()) - float(p.mean())) for p in shots])) for f in frames]
    assert shown == [i for i in range(9) if i not in cut], shown
    assert source.decode_errors == len(cut), source.decode_errors


# -- 4. an http source that is a file ends, or loops ----------------------------------------------------------------

def run_file_camera(web: Web, redis_server, loop: bool, done) -> tuple[dict, list[dict]]:
    """Runs an http camera on a faststart mp4 (it plays without Range) until ``done(pipe, client)``; returns its final
    stats and its published detections messages."""
    client = redis_server.client()
    camera = {"id": "cam", "url": f"{web.url}/norange/clip.mp4", "realtime": False, "loop": loop}

    async def main() -> dict:
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, no_detections(), MODEL_INFO, pub)
            task = asyncio.create_task(pipe.run())
            try:
                await until(lambda: task.done() or done(pipe, client), 40, "the file's end or its passes")
            finally:
                pipe.stop()
                final = await task
            assert pub.flush(5)
            return final

    final = asyncio.run(main())
    return final, read_stream(client, keys("hv").detections("cam"))


@pytest.mark.timeout(60)
def test_an_mp4_over_http_ends_at_its_end(web, tmp_path, redis_server) -> None:
    """Its FRAMES pictures once, then state ended with stream_down "end of file", no reconnect. Before: "end of
    stream", reconnecting, stream_up, and the same pictures again, for ever."""
    web.media["clip.mp4"] = clip(tmp_path / "clip.mp4", faststart=True)
    client = redis_server.client()
    final, _ = run_file_camera(web, redis_server, False,
                               lambda pipe, c: bool(events(c, "stream_reconnecting")))
    kinds = [e["type"] for e in events(client, *STREAM_EVENTS)]
    assert kinds == ["stream_up", "stream_down"], kinds
    assert events(client, "stream_down")[0]["reason"] == workers.capture.END_OF_FILE
    assert final["state"] == "ended" and final["decoded"] == FRAMES and final["reconnects"] == 0, final
    assert status(client)["state"] == "ended"


@pytest.mark.timeout(60)
def test_an_mp4_over_http_with_loop_plays_again_without_an_outage(web, tmp_path, redis_server) -> None:
    """``loop: true``: a frame of its third pass published, one stream_up, no stream_down or reconnecting,
    reconnects 0, frame numbers and stream time going on across the passes. Before: each pass an outage."""
    web.media["clip.mp4"] = clip(tmp_path / "clip.mp4", faststart=True)
    client = redis_server.client()

    def third_pass_published(pipe: CameraPipeline, c) -> bool:
        return any(m["frame"] >= 2 * FRAMES for m in read_stream(c, keys("hv").detections("cam")))

    final, messages = run_file_camera(web, redis_server, True, third_pass_published)
    kinds = [e["type"] for e in events(client, *STREAM_EVENTS)]
    assert kinds == ["stream_up"], kinds
    assert final["state"] == "stopped" and final["decoded"] > 2 * FRAMES and final["reconnects"] == 0, final
    assert web.gets >= 3
    frames, pts = [m["frame"] for m in messages], [m["pts"] for m in messages]
    assert frames == sorted(set(frames)) and pts == sorted(set(pts)) and frames[-1] >= 2 * FRAMES, (frames, pts)


def test_normal_path_guard_an_mjpeg_stream_over_http_stays_live(web) -> None:
    """A live stream has no duration: its end is a dropped connection, reconnected as before."""
    web.parts = [jpeg(p) for p in pictures(3)]
    source = open_source(f"{web.url}/mjpeg", open_timeout_s=10, read_timeout_s=10)
    source.open()
    try:
        assert source.live and source.read() is not None
    finally:
        source.close()
