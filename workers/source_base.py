"""What every frame source is built on: the ``Source`` interface (``open`` / ``read`` / ``close``), the
``SourceFrame`` it returns, the ``SourceError`` it raises, and the stream clock and pacer sources share.

Every call is bounded: ``open`` by the open timeout, ``read`` by the read timeout (network sources) or by
the file itself; nothing here blocks forever. Failures are ``SourceError`` with a ``kind`` the caller can
act on (retry a refused camera, give up on a wrong path) and a message that names the URL with its
credentials redacted. The sources themselves live in ``workers.av_source`` (PyAV) and
``workers.synthetic_source``, which import only this module; ``workers.sources.open_source`` picks one by
URL.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.letterbox import PAD_VALUE, Letterbox, letterbox
from workers.redact import redact_text, redact_url

if TYPE_CHECKING:
    import av

    from synthetic.scene import FrameTruth

ERROR_KINDS = ("not_found", "refused", "unreachable", "timeout", "auth", "not_video", "decode", "unsupported", "ended")

# frame.reformat()/to_ndarray() build a new swscale context on every call, and initialising its scaling
# filters costs 5-10x the conversion itself (1.3 ms vs 0.19 ms for 640x272 -> 320x136 AREA). A reformatter
# kept per thread reuses its context while the sizes stay the same, which they do for a camera's thread.
_reformatters = threading.local()
_kept_in_forked_child: list = []  # see _ThreadReformatter


class _ThreadReformatter:
    """One thread's VideoReformatter. A child forked to run Python before its exec (a ``preexec_fn``: Ray starts
    its processes so) frees every other thread's thread-locals there; freeing a reformatter waits on FFmpeg's
    scaling locks, which a converting thread may have held at the fork, and one such child hung a test run for
    good. In a child it is kept instead: the child execs at once, and the parent's threads go on using theirs."""

    def __init__(self) -> None:
        from av.video.reformatter import VideoReformatter

        self.reformatter = VideoReformatter()
        self.pid = os.getpid()

    def __del__(self) -> None:
        if os.getpid() != self.pid:
            _kept_in_forked_child.append(self.reformatter)


def _reformatter() -> "av.video.reformatter.VideoReformatter":
    holder = getattr(_reformatters, "holder", None)
    if holder is None:
        holder = _reformatters.holder = _ThreadReformatter()
    return holder.reformatter


class SourceError(Exception):
    """A source could not be opened or read. ``kind`` is one of ERROR_KINDS; ``str(e)`` is
    "<redacted url>: <cause in plain words>" and never holds credentials.

    For a live camera refused / unreachable / timeout / decode are worth retrying with backoff, and so is
    not_found (RTSP relays such as MediaMTX answer 404 until the camera has connected to them); auth,
    not_video and unsupported need a config change. "ended": read() on a source that is closed or not open.
    """

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown SourceError kind {kind!r}")
        super().__init__(message)
        self.kind = kind

    @classmethod
    def for_url(cls, kind: str, url: str, cause: str) -> "SourceError":
        """The error for ``url`` (raw, may hold credentials): both the URL and the cause are redacted."""
        return cls(kind, f"{redact_url(url)}: {redact_text(cause, [url])}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions across actors; the default would call __init__(message) without kind.
        return (type(self), (self.kind, self.args[0]))


@dataclass
class SourceFrame:
    """One decoded picture and where it sits in its stream."""

    index: int  # 0-based count of frames this Source object has returned since open() (or skipped: see AVSource)
    pts: float  # seconds from the start of the stream; always increases, also when a file loops
    wall: float  # time.time() when it was decoded
    size: tuple[int, int]  # (height, width) of the picture as players show it: turned, and at its display aspect
    # where its pixels are not square (AVSource.open); the conversions below scale ``image`` to it
    image: "av.VideoFrame | np.ndarray"  # PyAV frame (not converted), or RGB uint8 HWC (synthetic; a turned video)
    truth: "FrameTruth | None" = None  # synthetic sources only

    def to_rgb(self) -> np.ndarray:
        """The full-size picture as RGB uint8 (H, W, 3), of ``size``."""
        if isinstance(self.image, np.ndarray):
            return self.image
        h, w = self.size  # the frame's own where its pixels are square (the same call as without them)
        return _reformatter().reformat(self.image, width=w, height=h, format="rgb24", threads=1).to_ndarray()

    def to_picture(self, max_width: int) -> np.ndarray:
        """The picture for a snapshot: BGR uint8 (h, w, 3), scaled down to at most ``max_width`` (a copy, never a
        view of a buffer the decoder reuses). A PyAV frame is scaled and converted in one swscale call."""
        h, w = self.size
        scale = min(1.0, max_width / w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if isinstance(self.image, np.ndarray):
            import cv2  # only where snapshots are made: the sources themselves do not need it

            small = cv2.resize(self.image, (nw, nh), interpolation=cv2.INTER_AREA) if scale < 1 else self.image
            return cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
        return _reformatter().reformat(self.image, width=nw, height=nh, format="bgr24", interpolation="AREA",
                                       threads=1).to_ndarray()

    def to_model_input(self, dst_size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
        """Letterboxed (3, H, W) uint8 C-contiguous image of ``dst_size`` (height, width), and its transform.

        Same geometry and padding as ``models.letterbox.letterbox``. A PyAV frame is scaled and converted to RGB
        in one swscale call at the letterbox's resized size: converting a 1080p frame to RGB first and then
        shrinking it costs several times more. Pixels differ slightly from cv2's resize (a different filter).

        swscale writes planar G, B, R, each plane copied into its channel of the canvas: half the CPU of packed
        rgb24 and a transpose into CHW (0.34 against 0.65 ms for 640x360 -> 448x252), and as close to cv2's
        resize of the whole frame (mean difference 1.05 against 0.99 levels, the largest 37 against 74).
        """
        if isinstance(self.image, np.ndarray):
            return letterbox(self.image, dst_size)
        lb = Letterbox.fit(self.size, dst_size)
        nh, nw = lb.resized_size
        # AREA averages when shrinking (no aliasing), BILINEAR when growing: what letterbox.resize does with cv2.
        interpolation = "AREA" if lb.scale < 1 else "BILINEAR"
        # threads=1: swscale's default spawns a thread per core, which only contends when many cameras decode.
        gbr = _reformatter().reformat(self.image, width=nw, height=nh, format="gbrp", interpolation=interpolation,
                                      threads=1)
        out = np.full((3, *lb.dst_size), PAD_VALUE, dtype=np.uint8)
        for channel, plane in zip((1, 2, 0), gbr.planes):  # gbrp's planes: G, B, R
            rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:nh, :nw]  # rows padded to line_size
            out[channel, lb.pad_y:lb.pad_y + nh, lb.pad_x:lb.pad_x + nw] = rows
        return out, lb


class Source:
    """A stream of frames. Not thread-safe: one thread opens, reads and closes it (close() while another
    thread is inside read() would free FFmpeg state under it; reads are bounded, so stop between them)."""

    url: str  # redacted, for display
    live: bool  # True for cameras, devices, live http(s) streams and realtime synthetic scenes; False for files
    # (also one over http(s), whose container has a duration: AVSource.open)
    nominal_fps: float | None  # frames per second the stream announces; None until known
    decode_errors: int = 0  # packets that failed to decode and were skipped (for metrics)
    unpaced_until: int = 0  # a paced file returns frames before this index at once (a resume skips them)

    def open(self) -> None:
        """Connects / opens; raises SourceError within the open timeout."""
        raise NotImplementedError

    def read(self) -> SourceFrame | None:
        """The next frame; None at a normal end of stream (for a live source: it disconnected).
        Raises SourceError within the read timeout."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases everything; idempotent, never raises."""
        raise NotImplementedError

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class PtsClock:
    """Maps decoder timestamps (seconds, or None when a frame has none) to stream time that starts at 0 and
    always moves forward. A backward jump (a camera restarting its clock, a file looping) re-anchors the clock
    so the next frame comes one frame period after the previous one; a timestamp that repeats the last one
    comes one period after it too (a stuck clock: every frame once said 0 s, and stream time stood still)."""

    def __init__(self, fps: float | None) -> None:
        self.period = 1.0 / fps if fps and fps > 0 else 0.04  # 25 fps when the stream does not say
        self.origin: float | None = None  # decoder time that maps to the current anchor
        self.last: float | None = None

    def restart(self) -> None:
        """The decoder's timestamps start over (a seek back to the start): re-anchor at the next frame."""
        self.origin = None

    def __call__(self, t: float | None) -> float:
        expected = 0.0 if self.last is None else self.last + self.period
        if t is None:
            pts = expected
        else:
            if self.origin is None:
                self.origin = t - expected
            pts = t - self.origin
            if self.last is not None and pts <= self.last:
                if pts < self.last:
                    self.origin = t - expected
                pts = expected  # a repeat (a stuck clock, or one coarser than the frames) is one period on
        self.last = pts
        return pts


class Pacer:
    """Sleeps so that frames go out at their stream time (realtime playback of files and synthetic scenes).

    When the consumer falls behind by more than ``max_lag_s`` it re-anchors instead of bursting to catch up;
    a forward jump in pts longer than ``max_gap_s`` (or two frame periods of a slow stream) is skipped over
    rather than slept through, so a gap in a file cannot stall read() for minutes.
    """

    def __init__(self, fps: float | None = None, max_lag_s: float = 1.0, max_gap_s: float = 2.0) -> None:
        self.max_lag_s = max_lag_s
        self.max_gap_s = max(max_gap_s, 2.0 / fps) if fps and fps > 0 else max_gap_s
        self._start: float | None = None  # time.monotonic() at which pts 0 is due

    def wait(self, pts: float) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now - pts
        delay = self._start + pts - now
        if delay < -self.max_lag_s or delay > self.max_gap_s:
            self._start, delay = now - pts, 0.0
        if delay > 0:
            time.sleep(delay)
