"""Three defects an operator's run on http(s) sources found: files that reconnect, and live HLS.

1. An mp4 over http that reconnected (a server that stalls mid-file) was analysed again from its first frame, as new
   frames, for ever: an http URL counted as live, so nothing skipped what had been handed over, and the first
   (replayed) frame reset the backoff. Now a source that opened as a file goes on where it stopped (its frames
   already handed over are decoded and skipped), and only new frames are progress (stream_up, the backoff reset).
2. A live HLS playlist that then ended (#EXT-X-ENDLIST) said stream_down "end of stream", reconnected, and the
   finished playlist, opened as a file, played its last window again. Now its end ends the camera, as a file's.
3. A live HLS stream came a segment at a time, unpaced: the newest-wins slot dropped most of each burst as
   "overload". Now a live segmented stream is paced to its timestamps; a live socket (MJPEG) stays unpaced.
4. A live HLS playlist that stopped growing past read_timeout_s (an encoder restarting) reconnected, and FFmpeg,
   starting the reopened playlist 3 segments back, had its last segments analysed again as new frames (new stream
   time, tracks and events twice). Now what was handed over is skipped by the stream's own timestamps, within a
   window: an encoder restarted with timestamps from 0 is analysed.

The web server is Python's, on a free port, in a thread of the test; clips and segments are made here with PyAV.
The pipeline runs without Ray, publishing to an in-memory publisher.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest

import workers.av_source
import workers.capture
from servers import HOST
from test_capture_recovery import MODEL_INFO, RecordingPublisher, no_detections, run_until
from test_http_sources14 import jpeg, pictures
from workers.sources import open_source
from workers.stream import CameraPipeline

FPS = 10  # of the clips and segments
FRAMES = 40  # of the mp4
SEGMENT_FRAMES = 10  # 1 s segments


def noise(rng: np.random.Generator) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray((rng.random((120, 160, 3)) * 255).astype(np.uint8), format="rgb24")


def mp4(path: Path) -> bytes:
    """An H.264 mp4 of FRAMES 160x120 pictures of noise (each its own), its index first (plays without Range)."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=FPS, options={"crf": "10", "preset": "ultrafast", "g": "10"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for _ in range(FRAMES):
            out.mux(stream.encode(noise(rng)))
        out.mux(stream.encode(None))
    return path.read_bytes()


def segments(directory: Path, n: int, start_s: int = 0, seed: int = 2) -> list[bytes]:
    """``n`` MPEG-TS segments of SEGMENT_FRAMES pictures each, cut by FFmpeg's HLS muxer from one stream whose
    timestamps start at ``start_s`` (an encoder running that long); ``seed``: other pictures."""
    rng = np.random.default_rng(seed)
    options = {"hls_time": str(SEGMENT_FRAMES / FPS), "hls_list_size": "0",
               "hls_segment_filename": str(directory / "seg%d.ts")}
    with av.open(str(directory / "all.m3u8"), "w", format="hls", options=options) as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "g": str(SEGMENT_FRAMES)})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(n * SEGMENT_FRAMES):
            frame = noise(rng)
            frame.pts, frame.time_base = start_s * FPS + i, Fraction(1, FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return [(directory / f"seg{s}.ts").read_bytes() for s in range(n)]


class Web:
    """GET /file/clip.mp4: ``mp4``, whole, without Range support; the first ``stalls`` GETs of it send ``cut``
    bytes and then nothing (until the test ends), as the operator's /stall/. GET /live.m3u8: a live HLS playlist of
    the last three of ``shown`` segments, with #EXT-X-ENDLIST once ``ended``, 404 once ``gone``; GET /segN.ts."""

    def __init__(self) -> None:
        self.mp4 = b""
        self.cut, self.stalls, self.file_gets = 0, 0, 0
        self.segments: list[bytes] = []
        self.shown, self.ended, self.gone = 0, False, False
        self.released = threading.Event()
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def send_body(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the reader gave up on it
                    pass

            def do_GET(self) -> None:
                if self.path == "/file/clip.mp4":
                    web.file_gets += 1
                    if web.file_gets > web.stalls:
                        return self.send_body(web.mp4, "video/mp4")
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", str(len(web.mp4)))
                    self.end_headers()
                    try:
                        self.wfile.write(web.mp4[:web.cut])
                        self.wfile.flush()
                    except OSError:
                        return
                    web.released.wait(60)
                    self.close_connection = True
                elif self.path == "/live.m3u8" and not web.gone:
                    first = max(0, web.shown - 3)
                    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1",
                             f"#EXT-X-MEDIA-SEQUENCE:{first}"]
                    for s in range(first, web.shown):
                        lines += [f"#EXTINF:{SEGMENT_FRAMES / FPS:.3f},", f"seg{s}.ts"]
                    if web.ended:
                        lines.append("#EXT-X-ENDLIST")
                    self.send_body(("\n".join(lines) + "\n").encode(), "application/vnd.apple.mpegurl")
                elif self.path.startswith("/seg") and self.path.endswith(".ts") and not web.gone:
                    self.send_body(web.segments[int(self.path[4:-3])], "video/mp2t")
                else:
                    self.send_error(404)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # a reader hanging up mid-request (a probe, a stop)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"

    def __enter__(self) -> "Web":
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web() -> Iterator[Web]:
    with Web() as server:
        yield server


class Messages(RecordingPublisher):
    """Keeps each published frame's pts too."""

    def __init__(self) -> None:
        super().__init__()
        self.pts: list[float] = []

    def publish_detections(self, message: dict) -> None:
        super().publish_detections(message)
        self.pts.append(message["pts"])

    def of(self, *types: str) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e["type"] in types]


STREAM_EVENTS = ("stream_up", "stream_down", "stream_reconnecting")


def run_camera(camera: dict, until, pub: Messages, images: list[int] | None = None, infer=None,
               timeout: float = 40) -> dict:
    """Runs a CameraPipeline on ``camera`` until ``until(pipe)`` holds or the camera ends; its final stats."""
    pipe = CameraPipeline(camera, infer or no_detections(images), MODEL_INFO, pub)
    return asyncio.run(run_until(pipe, lambda: until(pipe) or pipe.state in ("ended", "failed"), timeout,
                                 "the camera's end or the test's condition"))


# -- 1. a file over http that reconnects goes on where it stopped ---------------------------------------------------

@pytest.fixture
def quick_backoff(monkeypatch) -> None:
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_MAX_S", 1.0)


def file_camera(web: Web) -> dict:
    # a stall is said after 3 s without data: 1 s was reached by a loaded machine not running the server thread
    return {"id": "cam", "url": f"{web.url}/file/clip.mp4", "open_timeout_s": 5, "read_timeout_s": 3}


@pytest.mark.timeout(90)
def test_an_http_file_that_keeps_stalling_is_not_analysed_again_and_backs_off_longer(web, tmp_path,
                                                                                      quick_backoff) -> None:
    """The server sends the first 40% of the mp4 and then nothing, at every GET. The frames of that part are
    analysed once (each picture published once), the attempts after add none, and count up (1, 2, 3: the backoff
    grows) in one outage. Before: each attempt analysed the same frames again as new ones (new pts, new track ids),
    said stream_up with the first of them, and attempt 1 every time."""
    web.mp4 = mp4(tmp_path / "clip.mp4")
    web.cut, web.stalls = len(web.mp4) * 2 // 5, 1000
    pub, images = Messages(), []
    final = run_camera(file_camera(web), lambda pipe: len(pub.of("stream_reconnecting")) >= 3, pub, images)
    assert 0 < final["decoded"] < FRAMES and final["published"], final
    assert len(set(images)) == len(images) == final["published"], images  # no picture analysed twice
    assert pub.pts == sorted(set(pub.pts)), pub.pts
    said = pub.of(*STREAM_EVENTS)
    kinds = [e["type"] for e in said]
    assert kinds[:2] == ["stream_up", "stream_down"] and kinds.count("stream_up") == 1, kinds
    assert kinds.count("stream_down") == 1 and final["reconnects"] == 1, (kinds, final)
    attempts = [e["attempt"] for e in pub.of("stream_reconnecting")]
    assert attempts == list(range(1, len(attempts) + 1)), attempts
    assert web.file_gets >= 3


@pytest.mark.timeout(90)
def test_an_http_file_that_stalls_once_resumes_after_the_frames_it_handed_over(web, tmp_path, quick_backoff) -> None:
    """The first GET stalls at 40% of the mp4, the next one sends it whole: every frame is analysed exactly once, in
    order, its stream time the file's, then it ends ("end of file") after one outage. Before: its first part was
    analysed twice (FRAMES + that part decoded)."""
    web.mp4 = mp4(tmp_path / "clip.mp4")
    web.cut, web.stalls = len(web.mp4) * 2 // 5, 1
    pub, images = Messages(), []
    final = run_camera(file_camera(web), lambda pipe: False, pub, images)
    # a loaded machine drops a few as overload (the newest-wins slot): none twice, none missing otherwise
    assert final["state"] == "ended" and final["decoded"] == FRAMES, final
    assert final["published"] + final["dropped"]["overload"] == FRAMES, final
    assert final["dropped"]["overload"] <= FRAMES // 4, final
    assert len(set(images)) == len(images) == final["published"], (len(set(images)), final)
    assert pub.frames == sorted(set(pub.frames)) and set(pub.frames) <= set(range(FRAMES)), pub.frames
    assert np.allclose(pub.pts, np.array(pub.frames) / FPS, atol=1e-3), pub.pts
    kinds = [e["type"] for e in pub.of(*STREAM_EVENTS)]
    assert kinds == ["stream_up", "stream_down", "stream_reconnecting", "stream_up", "stream_down"], kinds
    assert pub.of("stream_down")[-1]["reason"] == workers.capture.END_OF_FILE
    assert final["reconnects"] == 1 and web.file_gets == 2, (final, web.file_gets)


# -- 2. a live HLS playlist that ends ends the camera ---------------------------------------------------------------

def hls_camera(web: Web, realtime: bool) -> dict:
    return {"id": "cam", "url": f"{web.url}/live.m3u8", "open_timeout_s": 5, "read_timeout_s": 5,
            "realtime": realtime}


@pytest.mark.timeout(90)
def test_a_live_hls_playlist_that_ends_ends_the_camera_without_a_replay(web, tmp_path, quick_backoff) -> None:
    """Live with three segments; once its first frame is in, the playlist gains three more and #EXT-X-ENDLIST. The
    six segments are analysed once each, then the camera ends with "end of file": no reconnect. Before: "end of
    stream", a reconnect, and the finished playlist's last three segments analysed again, then "end of file"."""
    web.segments = segments(tmp_path, 6)
    web.shown = 3

    def grown(pipe: CameraPipeline) -> bool:
        if pipe.stats()["decoded"] and not web.ended:
            web.shown, web.ended = 6, True
        return False

    pub, images = Messages(), []
    final = run_camera(hls_camera(web, realtime=False), grown, pub, images)
    assert final["state"] == "ended" and final["decoded"] == 6 * SEGMENT_FRAMES, final
    assert final["reconnects"] == 0, final
    assert len(set(images)) == len(images), "a picture analysed twice"
    kinds = [e["type"] for e in pub.of(*STREAM_EVENTS)]
    assert kinds == ["stream_up", "stream_down"], kinds
    assert pub.of("stream_down")[0]["reason"] == workers.capture.END_OF_FILE


@pytest.mark.timeout(90)
def test_normal_path_guard_a_live_hls_playlist_that_goes_away_is_reconnected(web, tmp_path, quick_backoff) -> None:
    """A live playlist whose server stops serving it (404) is a dropped stream, not an end: reconnected as before."""
    web.segments = segments(tmp_path, 3)
    web.shown = 3

    def gone(pipe: CameraPipeline) -> bool:
        web.gone = web.gone or pipe.stats()["decoded"] >= 2 * SEGMENT_FRAMES
        return len(pub.of("stream_reconnecting")) >= 2

    pub = Messages()
    final = run_camera(hls_camera(web, realtime=False), gone, pub)
    assert final["state"] == "stopped" and final["reconnects"] == 1, final
    assert pub.of("stream_down")[0]["reason"] != workers.capture.END_OF_FILE


# -- 3. a live HLS stream is paced, a live socket is not -------------------------------------------------------------

@pytest.mark.timeout(90)
def test_a_live_hls_stream_is_analysed_evenly_without_overload_drops(web, tmp_path) -> None:
    """Three 1 s segments at 10 fps, analysed at 5 fps by a model taking 50 ms a frame, one frame in flight: the
    frames come at their pace, every one the rate wants is analysed (none dropped as overload), 0.2 s apart in
    stream time, and 2.5 s of frames take (about) 2.5 s. Before: each segment came at once, most of it replaced
    in the slot ("overload"), the pts of the frames analysed jumping by up to a second."""
    web.segments = segments(tmp_path, 3)
    web.shown = 3
    inner = no_detections()

    async def slow(request):
        await asyncio.sleep(0.05)
        return await inner(request)

    pub = Messages()
    camera = {**hls_camera(web, realtime=True), "fps": 5, "max_inflight": 1}
    started = time.monotonic()
    # the window's last frame waits for the next segment (FFmpeg's demuxer ends a packet at the next one's start)
    final = run_camera(camera, lambda pipe: pipe.stats()["decoded"] >= 25, pub, infer=slow)
    took = time.monotonic() - started
    assert final["dropped"]["overload"] <= 1 and final["published"] >= 11, final  # 13 wanted
    gaps = np.diff(pub.pts)
    assert np.median(gaps) == pytest.approx(1 / 5, abs=0.02) and gaps.max() < 0.5, gaps
    assert took > 1.8, took  # 2.4 s of stream time: paced (a generous bound: it only has to be slow enough)


class CountingPacer(workers.av_source.Pacer):
    waits = 0

    def wait(self, pts: float) -> None:
        type(self).waits += 1
        super().wait(pts)


@pytest.mark.timeout(60)
def test_normal_path_guard_a_live_mjpeg_stream_stays_unpaced_and_live_hls_is_paced(web, tmp_path,
                                                                                  monkeypatch) -> None:
    """A live socket (an IP camera's MJPEG over http) comes at the camera's rate: never paced. Live HLS is."""
    from test_http_sources14 import Web as MjpegWeb

    monkeypatch.setattr(workers.av_source, "Pacer", CountingPacer)
    with MjpegWeb() as cam:
        cam.parts = [jpeg(p) for p in pictures(5)]
        source = open_source(f"{cam.url}/mjpeg", open_timeout_s=5, read_timeout_s=5)
        source.open()
        try:
            assert source.live and source.read() is not None and source.read() is not None
        finally:
            source.close()
    assert CountingPacer.waits == 0
    web.segments, web.shown = segments(tmp_path, 3), 3
    source = open_source(f"{web.url}/live.m3u8", open_timeout_s=5, read_timeout_s=5)
    source.open()
    try:
        assert source.live and source.read() is not None and source.read() is not None
    finally:
        source.close()
    assert CountingPacer.waits == 2


# -- 4. a live HLS stream that reconnects goes on after the frames it handed over -------------------------------------

def fed(web: Web, pub: Messages, last: int):
    """A run_camera condition: once the camera reconnected, adds segments to the playlist two ahead of the one the
    camera is at (FFmpeg finds the next listed when it needs it: none waits for a reload, its last frame held), up
    to ``last`` segments, then #EXT-X-ENDLIST. Never true."""
    def feed(pipe: CameraPipeline) -> bool:
        if (pub.of("stream_reconnecting") and web.shown < last
                and pipe.stats()["decoded"] >= (web.shown - 2) * SEGMENT_FRAMES):
            web.shown += 1
            web.ended = web.shown == last
        return False
    return feed


@pytest.mark.timeout(90)
def test_a_live_hls_playlist_that_pauses_past_the_read_timeout_analyses_every_frame_once(web, tmp_path,
                                                                                        quick_backoff) -> None:
    """Live with three segments that stop there (an encoder restarting) past read_timeout_s: the camera reconnects,
    and FFmpeg starts the reopened playlist 3 segments back, at what was analysed already. Then the playlist goes
    on to 8 segments and ends. Every frame is read once and analysed at most once, in order, its stream time the
    stream's own (no gap for the outage: nothing of the video was missed), in one outage. Before: the reopened
    window's frames were analysed again as new ones, their stream time seconds later (the outage's wall time)."""
    web.segments = segments(tmp_path, 8)
    web.shown = 3
    pub, images = Messages(), []
    camera = {**hls_camera(web, realtime=True), "read_timeout_s": 3}
    final = run_camera(camera, fed(web, pub, 8), pub, images)
    # each frame read once; analysed, or (a loaded machine) replaced unseen in the newest-wins slot
    assert final["state"] == "ended" and final["decoded"] == 8 * SEGMENT_FRAMES, final
    assert final["published"] + final["dropped"]["overload"] == final["decoded"], final
    assert len(set(images)) == len(images) == final["published"], "a picture analysed twice"
    assert pub.frames == sorted(set(pub.frames)) and pub.frames[-1] == 8 * SEGMENT_FRAMES - 1, pub.frames
    assert np.allclose(pub.pts, np.array(pub.frames) / FPS, atol=1e-3), pub.pts  # no gap, no replay: its own time
    kinds = [e["type"] for e in pub.of(*STREAM_EVENTS) if e["type"] != "stream_reconnecting"]
    assert kinds == ["stream_up", "stream_down", "stream_up", "stream_down"], kinds
    assert pub.of("stream_down")[-1]["reason"] == workers.capture.END_OF_FILE and final["reconnects"] == 1, final


@pytest.mark.timeout(90)
def test_normal_path_guard_a_live_hls_encoder_restarted_with_timestamps_from_0_is_analysed(web, tmp_path,
                                                                                         quick_backoff) -> None:
    """An encoder whose timestamps had reached 100 s has its playlist gone (404) after three segments; back, the
    playlist lists a restarted encoder's segments, timestamps from 0, and ends after five of them. All five are
    analysed: far more than a few segments back from the last frame handed over, they are new, not a replay of it
    to skip (skipping every frame up to it would skip the restarted stream's first 100 s)."""
    old = segments(tmp_path, 3, start_s=100)
    (tmp_path / "restarted").mkdir()
    restarted = segments(tmp_path / "restarted", 5, seed=3)
    web.segments = old
    web.shown = 3

    def switch(pipe: CameraPipeline) -> bool:
        if web.segments is not old:
            return feed(pipe)
        web.gone = web.gone or pipe.stats()["decoded"] >= 3 * SEGMENT_FRAMES - 1
        if web.gone and pub.of("stream_reconnecting"):
            # back with the restarted encoder's first three segments (the playlist's window)
            web.segments, web.shown, web.gone = old + restarted, 6, False
        return False

    pub, images = Messages(), []
    feed = fed(web, pub, 8)
    final = run_camera({**hls_camera(web, realtime=True), "read_timeout_s": 3}, switch, pub, images)
    assert final["state"] == "ended" and final["reconnects"] == 1, final
    assert len(set(images)) == len(images) == final["published"], "a picture analysed twice"
    # all 50 of the restarted encoder's; the old one's last frame may be held by FFmpeg when the playlist went
    assert 3 * SEGMENT_FRAMES - 1 + 5 * SEGMENT_FRAMES <= final["decoded"] <= 8 * SEGMENT_FRAMES, final
    assert pub.pts == sorted(set(pub.pts)), pub.pts
