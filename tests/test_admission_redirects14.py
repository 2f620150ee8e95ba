"""A camera added at run time passed admission by the host its URL names, and FFmpeg then went wherever the server
sent it: a 302, or an HLS playlist's segment, at this service's own Redis (redis-server logged "Possible SECURITY
ATTACK detected"). Such a camera now follows no redirect and opens no playlist; a config camera is unchanged.
A real redis-server and a local web server; the camera's decode thread (Capture) as the camera's process runs it."""

from __future__ import annotations

import asyncio
import http.server
import io
import pickle
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import av
import numpy as np
import pytest

from pipeline.admission import Admission, merge_changes, parse_camera
from pipeline.config import ApiConfig
from servers import HOST, RedisServer, serving
from workers.capture import Capture, FrameSlot
from workers.settings import CameraConfig

HEADS = {"people": ["person"]}


def mjpeg_stream(frames: int = 25) -> bytes:
    """What an IP camera sends over http: JPEG pictures in a multipart reply (boundary "ffmpeg")."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpjpeg") as out:
        video = out.add_stream("mjpeg", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuvj420p"
        for i in range(frames):
            out.mux(video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i, np.uint8), format="rgb24")))
        out.mux(video.encode())
    return buf.getvalue()


class Web(http.server.BaseHTTPRequestHandler):
    """/redirect?to=URL: a 302 to it; /hls/cam.m3u8?segment=URL: a playlist of that one segment; /x.mjpeg: a camera's
    stream."""

    stream = mjpeg_stream()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/redirect":
            self.reply(302, b"", Location=query["to"])
        elif parts.path.endswith(".m3u8"):
            playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{query['segment']}\n#EXT-X-ENDLIST\n"
            self.reply(200, playlist.encode(), **{"Content-Type": "application/vnd.apple.mpegurl"})
        else:
            self.reply(200, self.stream, **{"Content-Type": "multipart/x-mixed-replace;boundary=ffmpeg"})

    def reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def web() -> Iterator[str]:
    with serving(Web) as url:
        yield url


def accepted(client) -> int:
    """Connections the client's Redis accepted so far (the client's own one included)."""
    return client.info("stats")["total_connections_received"]


def first_failure(camera: CameraConfig) -> Capture:
    """Runs the camera's decode thread until its first open has failed (or it has read a picture), then stops it."""
    async def main() -> Capture:
        cap = Capture(camera, (48, 64), FrameSlot(asyncio.get_running_loop()), lambda type_, fields: None)
        cap.start()
        deadline = time.monotonic() + 120  # a condition, not a time: a failed open is well under a second
        while cap.alive and cap.last_error is None and not cap.decoded and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        cap.stop()
        return cap

    return asyncio.run(main())


def added_at_run_time(redis: RedisServer, url: str) -> CameraConfig:
    """The camera as admission lets it run, for a service whose Redis is ``redis``."""
    admission = Admission(ApiConfig(), HEADS, {"Redis": (HOST, redis.port)})
    return admission.check(parse_camera({"id": "cam", "url": url}))


def refused_sparing_redis(redis_server, url: str):
    """The capture of a camera added at run time at ``url``, at its first failure, which must be a refusal (failed,
    not an outage retried for ever) made without any connection to the service's own Redis."""
    camera = added_at_run_time(redis_server, url)
    with redis_server.client() as client:
        before = accepted(client)
        cap = first_failure(camera)
        assert accepted(client) == before, "the camera connected to the service's own Redis"
    assert cap.state == "failed", (cap.state, cap.last_error)
    return cap


def test_a_camera_added_at_run_time_does_not_follow_a_redirect_to_the_services_own_redis(redis_server, web):
    """POST /cameras {"url": "http://web/redirect?to=http://<its Redis>/x.mjpeg"} was accepted (the web server is
    not the service), and FFmpeg followed the 302 into Redis within a millisecond; the camera retried for ever."""
    cap = refused_sparing_redis(redis_server, f"{web}/redirect?to=http://{HOST}:{redis_server.port}/x.mjpeg")
    assert "redirects are not followed for a camera added at run time" in (cap.last_error or ""), cap.last_error
    assert "put it in the config file" in cap.last_error


def test_a_camera_added_at_run_time_does_not_open_a_playlist_naming_the_services_own_redis(redis_server, web):
    """An HLS playlist passed admission by the web server's host; FFmpeg's HLS demuxer then fetched its segment,
    http://<its Redis>/probe.ts."""
    segment = f"http://{HOST}:{redis_server.port}/probe.ts"
    cap = refused_sparing_redis(redis_server, f"{web}/hls/evil2.m3u8?segment={segment}")
    assert "a playlist or manifest" in (cap.last_error or ""), cap.last_error
    assert "a camera added at run time does not open" in cap.last_error


@pytest.mark.parametrize("path", ["/x.mjpeg", "/redirect?to={web}/x.mjpeg"])
def test_normal_path_guard_a_config_camera_still_follows_redirects(web, path):
    """Config cameras are the operator's: a redirect (here to the same server's stream) is followed as before."""
    cap = first_failure(CameraConfig(id="cam", url=web + path.format(web=web)))
    assert cap.decoded, (cap.state, cap.last_error)  # (its error, if any: the short stream's end)


def test_normal_path_guard_a_camera_added_at_run_time_reads_a_plain_stream(redis_server, web):
    """The confinement (no redirects, no fetching demuxers) leaves an IP camera's MJPEG over http as it was."""
    cap = first_failure(added_at_run_time(redis_server, f"{web}/x.mjpeg"))
    assert cap.decoded, (cap.state, cap.last_error)  # (its error, if any: the short stream's end)


def test_a_camera_added_at_run_time_stays_untrusted_and_the_mark_shows_nowhere():
    """The mark travels with the camera to its process (a pickle, as Ray's) and through updates that keep its URL;
    a config camera stays trusted until a control channel gives it a URL. No export, status or answer shows it,
    and no command can set it."""
    admission = Admission(ApiConfig(), HEADS)
    added = admission.check(parse_camera({"id": "cam", "url": "rtsp://192.0.2.1/cam"}))
    assert added.untrusted and pickle.loads(pickle.dumps(added)).untrusted
    changed = merge_changes(added, {"fps": 5})
    assert admission.check(changed, url_changed=False).untrusted
    assert "untrusted" not in str(added.as_json()) and "untrusted" not in str(added.model_dump())

    configured = CameraConfig(id="cam", url="rtsp://192.0.2.1/cam")
    assert not admission.check(merge_changes(configured, {"fps": 5}), url_changed=False).untrusted
    assert admission.check(merge_changes(configured, {"url": "rtsp://192.0.2.2/cam"})).untrusted

    with pytest.raises(Exception, match="_untrusted"):
        parse_camera({"id": "cam", "url": "rtsp://192.0.2.1/cam", "_untrusted": False})


class Guarded(http.server.BaseHTTPRequestHandler):
    """A camera behind Digest authentication that redirects once logged in: records every Authorization header."""

    seen: list[str | None] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        Guarded.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Digest realm="cam", nonce="abc", qop="auth"')
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_the_second_look_at_a_refused_open_sends_no_credentials_and_keeps_the_opens_error():
    """The look that tells a redirect or a playlist apart (FFmpeg says EIO) sent the camera's user and password in
    Basic on its first request, over plain http, where FFmpeg sends them only when asked, in the scheme asked for
    (Digest here): the password went out readable. It sends none now; a server that asks for them leaves the open's
    own error, retried as before (made final, a camera behind a login whose backend failed a moment stayed failed)."""
    from workers.av_source import confined_refusal

    Guarded.seen = []
    with serving(Guarded) as url:
        why = confined_refusal(url.replace("http://", "http://admin:s3cret@") + "/cam.mjpeg", 5.0)
    assert Guarded.seen == [None], Guarded.seen
    assert why is None, why


def test_the_second_look_is_bounded_by_its_deadline_whatever_the_server_drips():
    """http.client's timeout is per read: a server dripping a byte at a time held the capture thread as long as it
    liked (the watchdog then started another capture, which did the same). The look ends at its deadline."""
    import socket

    from workers.av_source import confined_refusal

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen()
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 40:  # ~6 s in all, then it hangs up
                if stop.wait(0.1):
                    return
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    try:
        why = confined_refusal(f"http://{HOST}:{listener.getsockname()[1]}/cam.mjpeg", 1.0)
    finally:
        stop.set()
        listener.close()
    assert why is None and time.monotonic() - started < 5.0, time.monotonic() - started


class LoginThenDown(http.server.BaseHTTPRequestHandler):
    """A camera behind a login whose backend is down (rebooting): 401 without credentials, 502 with them."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Authorization") is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="cam"')
        else:
            self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_camera_behind_a_login_failing_for_a_moment_stays_retried():
    """The second look sends no credentials, so a camera behind a login answers it 401: taken for a redirect or a
    playlist, a passing 502 of a camera added at run time failed it for good (no reconnect)."""
    from workers.av_source import AVSource, confined_options
    from workers.source_base import SourceError

    with serving(LoginThenDown) as url:
        source = AVSource(url.replace("http://", "http://admin:pw@") + "/video.mjpeg", "http", open_timeout_s=3,
                          read_timeout_s=3, ffmpeg_options=confined_options())
        with pytest.raises(SourceError) as failed:
            source.open()
    assert failed.value.kind != "unsupported", (failed.value.kind, str(failed.value))
