"""The test servers are real: Redis answers, restarts on its port; RTSP serves over TCP and UDP in real time."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import pytest
import redis

from servers import RedisServer, RtspServer, encode_mp4, require_binary

# Per test, so a hung socket cannot stall CI; the whole file takes ~30 s.
pytestmark = pytest.mark.timeout(60)

BIKES_SIZE = (640, 272)


def moving_box_frames(count: int, width: int = 160, height: int = 120) -> Iterator[np.ndarray]:
    """A white box sliding right on a dark background: each frame differs, so decoding can be checked."""
    for i in range(count):
        frame = np.full((height, width, 3), 30, np.uint8)
        x = (i * 4) % (width - 40)
        frame[40:80, x : x + 40] = 230
        yield frame


def open_rtsp(url: str, transport: str = "tcp", read_timeout: float = 10.0) -> av.container.InputContainer:
    return av.open(
        url,
        options={"rtsp_transport": transport, "timeout": str(int(read_timeout * 1_000_000))},
        timeout=(10, read_timeout),
    )


def read_frames(url: str, count: int, transport: str = "tcp") -> tuple[list[av.VideoFrame], list[float]]:
    """Up to `count` decoded frames and, for each, the seconds since before av.open."""
    start = time.monotonic()
    frames, times = [], []
    with open_rtsp(url, transport) as container:
        for frame in container.decode(video=0):
            frames.append(frame)
            times.append(time.monotonic() - start)
            if len(frames) == count:
                break
    return frames, times


# --- Redis


def test_redis_kill_and_restart_on_same_port(redis_server: RedisServer) -> None:
    port = redis_server.port
    with redis_server.client() as client:
        client.set("k", "v")
        redis_server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        redis_server.start()
        assert redis_server.port == port
        assert client.ping()  # the same client reconnects to the same address
        assert client.get("k") is None  # no persistence: a restarted Redis is empty


def test_redis_password() -> None:
    require_binary("redis-server")
    with RedisServer(password="s3cret") as server:
        assert server.url.startswith("redis://:s3cret@127.0.0.1:")
        with server.client() as client:
            assert client.ping()
        # from_url, not Redis(host=...): in redis-py 8 the latter retries ConnectionError 10 times with
        # backoff (~4 s), and AuthenticationError is a ConnectionError.
        with redis.Redis.from_url(f"redis://127.0.0.1:{server.port}/0") as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()


# --- encode_mp4


def test_encode_mp4_round_trips(tmp_path: Path) -> None:
    source = list(moving_box_frames(30))
    path = encode_mp4(tmp_path / "box.mp4", source, fps=15)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 15
        decoded = list(container.decode(stream))
    assert len(decoded) == 30
    assert (decoded[0].width, decoded[0].height) == (160, 120)
    assert [i for i, f in enumerate(decoded) if f.key_frame] == [0, 15]  # gop defaults to one second
    for original, frame in zip(source, decoded):
        error = np.abs(frame.to_ndarray(format="rgb24").astype(int) - original).mean()
        assert error < 4, "the decoded picture must be the encoded one"


def test_encode_mp4_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        encode_mp4(tmp_path / "odd.mp4", [np.zeros((121, 160, 3), np.uint8)], fps=10)
    with pytest.raises(ValueError, match="no frames"):
        encode_mp4(tmp_path / "empty.mp4", [], fps=10)


# --- RTSP


def test_rtsp_file_over_tcp_at_native_rate(rtsp_server: Callable[..., RtspServer], bikes_mp4: Path) -> None:
    server = rtsp_server(bikes_mp4)
    frames, times = read_frames(server.url, 75, "tcp")
    assert len(frames) == 75
    assert {(f.width, f.height) for f in frames} == {BIKES_SIZE}
    # 50 frames are 2 s of video. The client's probing at open lets a burst through, so check both the
    # total and the steady state after it; a server sending as fast as it can takes well under 0.5 s.
    assert times[49] >= 1.5, f"50 frames in {times[49]:.2f} s: not served in real time"
    assert times[74] - times[49] >= 0.8, "25 frames (1 s) after the open burst came too fast"


def test_rtsp_file_over_udp(rtsp_server: Callable[..., RtspServer], bikes_mp4: Path) -> None:
    server = rtsp_server(bikes_mp4)
    frames, times = read_frames(server.url, 50, "udp")
    assert len(frames) == 50
    assert {(f.width, f.height) for f in frames} == {BIKES_SIZE}
    assert times[49] >= 1.5


def test_rtsp_file_ends_at_eof_without_loop(rtsp_server: Callable[..., RtspServer], tmp_path: Path) -> None:
    clip = encode_mp4(tmp_path / "one_second.mp4", moving_box_frames(25), fps=25)
    server = rtsp_server(clip)
    frames, _ = read_frames(server.url, 1000, "tcp")  # returns when the stream ends (RTCP BYE -> EOF)
    assert len(frames) == 25


def test_rtsp_loop_serves_past_the_end(rtsp_server: Callable[..., RtspServer], tmp_path: Path) -> None:
    clip = encode_mp4(tmp_path / "one_second.mp4", moving_box_frames(25), fps=25)
    server = rtsp_server(clip, loop=True)
    frames, times = read_frames(server.url, 75, "tcp")  # three passes over a one-second clip
    assert len(frames) == 75
    assert times[-1] >= 2.0, "looping must keep the native rate"
    pts = [f.pts for f in frames if f.pts is not None]  # over RTSP the first frame can lack a pts
    assert all(b > a for a, b in zip(pts, pts[1:])), "timestamps must keep increasing across loops"


def test_rtsp_pattern_at_requested_size(rtsp_server: Callable[..., RtspServer]) -> None:
    server = rtsp_server("pattern", pattern_size=(320, 240), fps=15)
    frames, _ = read_frames(server.url, 10, "tcp")
    assert len(frames) == 10
    assert {(f.width, f.height) for f in frames} == {(320, 240)}


def test_rtsp_several_mounts(rtsp_server: Callable[..., RtspServer], bikes_mp4: Path) -> None:
    server = rtsp_server("pattern", mount="/live", pattern_size=(320, 180), extra_mounts={"/bikes": bikes_mp4})
    assert server.url.endswith("/live")
    live, _ = read_frames(server.url, 3)
    bikes, _ = read_frames(server.url_for("/bikes"), 3)
    assert (live[0].width, live[0].height) == (320, 180)
    assert (bikes[0].width, bikes[0].height) == BIKES_SIZE


def test_rtsp_pause_stalls_reader_and_resume_serves_again(
    rtsp_server: Callable[..., RtspServer], bikes_mp4: Path
) -> None:
    server = rtsp_server(bikes_mp4, loop=True)
    with open_rtsp(server.url, "tcp", read_timeout=1.0) as container:
        frames = container.decode(video=0)
        for _ in range(5):
            next(frames)
        server.pause()
        paused_at = time.monotonic()
        # Frames already buffered in the client still come out; then the read times out (ExitError from
        # PyAV's timeout, TimeoutError from FFmpeg's) about 2 x read_timeout after the pause.
        with pytest.raises((av.FFmpegError, OSError)):
            for _ in frames:
                assert time.monotonic() - paused_at < 15, "a stalled server kept delivering frames"
        assert time.monotonic() - paused_at < 10
    server.resume()
    frames_after, _ = read_frames(server.url, 5)
    assert len(frames_after) == 5


def test_rtsp_kill_and_restart_on_same_port(rtsp_server: Callable[..., RtspServer], bikes_mp4: Path) -> None:
    server = rtsp_server(bikes_mp4)
    url = server.url
    server.kill()
    with pytest.raises((av.FFmpegError, OSError)):
        read_frames(url, 1)
    server.start()
    assert server.url == url
    frames, _ = read_frames(url, 5)
    assert (frames[0].width, frames[0].height) == BIKES_SIZE
