"""Sources that PyAV (FFmpeg) demuxes and decodes: RTSP/RTSPS cameras, files, V4L2 devices, http(s) streams.

FFmpeg reports failures as a handful of errno-like exceptions whose text embeds the URL (credentials
included); ``classify`` turns them into a SourceError kind and a plain-words cause without the URL.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any, TypeVar

import av
import numpy as np

from workers.redact import redact_text, redact_url
from workers.source_base import Pacer, PtsClock, Source, SourceError, SourceFrame

T = TypeVar("T")
log = logging.getLogger(__name__)
DECODER_THREADS = 1  # the box decoding many cameras has few cores: more threads per camera only contend
MAX_CONSECUTIVE_DECODE_ERRORS = 50  # ~2 s of garbage at 25 fps: a broken stream, not a glitch
# A live camera joined mid-GOP sends video packets that decode to nothing until its next key frame, which a camera
# with a long GOP (a "smart codec") sends every 20 s or more: while its packets keep coming, its first picture may
# take up to this long (read_timeout_s where that is longer). One sending nothing still fails in read_timeout_s.
FIRST_PICTURE_WAIT_S = 30.0
MAX_NOMINAL_FPS = 1000.0  # above: a time base taken for a frame rate (90000 for RTSP), not a camera's rate
AVFMT_NOTIMESTAMPS = 0x0080  # FFmpeg's flag of a format whose packets carry no timestamps (MJPEG, raw H.264)
V4L_MAJOR = 81  # Linux's device number of video4linux devices: a capture device under a name of its own (a udev link)
MAX_SAR = 8  # a pixel aspect beyond 8:1 (or 1:8) is a damaged header's, not a format's (HDV's is 4:3, a DVD's 64:45)
# Tags are not always UTF-8 (a damaged file, a camera's SDP title in GBK or Latin-1). PyAV < 19 decodes them
# strictly unless told otherwise, raising UnicodeDecodeError out of av.open; 19 decodes them with
# surrogateescape and no longer takes the argument (a TypeError). Nothing here reads the tags.
_TAGS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EIO,
                   errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}


def classify(exc: BaseException, *, network: bool, elapsed_s: float, timeout_s: float,
             device: bool = False, opened: bool = False, transport: str | None = None) -> tuple[str, str]:
    """(kind, cause) for an exception PyAV raised; ``elapsed_s`` is how long the failed call took, because a
    timeout on open surfaces as InvalidDataError, told apart from a garbled answer only by the time it took.
    ``opened``: the source had opened (the host answered), so the failure came while reading. ``transport``: an
    RTSP source's (tcp, udp), None for others."""
    strerror = getattr(exc, "strerror", None) or type(exc).__name__
    code = getattr(exc, "errno", None)
    if code in (errno.EMFILE, errno.ENFILE):  # this process's, or the machine's, not the camera's
        return ("unreachable" if network else "decode"), open_files_cause(code)
    if isinstance(exc, av.HTTPUnauthorizedError):
        return "auth", "not authorized (401): wrong or missing user name or password"
    if isinstance(exc, av.HTTPForbiddenError):
        return "auth", "access forbidden (403)"
    if isinstance(exc, av.HTTPNotFoundError):
        return "not_found", "no such stream on the server (404): check the path"
    if isinstance(exc, av.HTTPError):
        return "unreachable", f"the server answered with an error: {strerror}"
    if isinstance(exc, (av.ExitError, TimeoutError)):  # ExitError: PyAV's own timeout interrupted FFmpeg
        return "timeout", f"no answer within {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused (nothing listens on that port)"
    if isinstance(exc, FileNotFoundError):
        return "not_found", "no such device" if device else "no such file"
    if isinstance(exc, IsADirectoryError):
        return "not_video", "is a directory, not a video"
    if isinstance(exc, PermissionError) and not network:
        return "auth", "permission denied"  # a file's or a device's
    # FFmpeg's RTSP code fails with a bare -1, which PyAV raises as EPERM, where the server hangs up (or says nothing
    # until the timeout) after PLAY: no permission was asked for, and it read "permission denied"
    if isinstance(exc, (av.InvalidDataError, av.EOFError, PermissionError)):
        if network and elapsed_s >= 0.9 * timeout_s:
            return "timeout", f"no answer within {timeout_s:g} s"
        if network:
            return "unreachable", "the server closed the connection or did not answer as a video server"
        return "not_video", "not a video FFmpeg can read (or truncated before its first picture)"
    if isinstance(exc, av.ProtocolNotFoundError):
        return "unsupported", "FFmpeg in this build does not support that protocol"
    if transport is not None and code == errno.EPROTONOSUPPORT:  # FFmpeg's word for an RTSP SETUP's 461
        other = "udp" if transport == "tcp" else "tcp"
        return "unreachable", (f"the camera does not offer this transport (461 Unsupported transport): try "
                               f"transport: {other}")
    if device and code == errno.ENOTTY:
        return "not_video", "not a video capture device"
    if network and (code in _NETWORK_ERRNOS or isinstance(exc, ConnectionError)):
        # FFmpeg reports an unknown host name, and an http body cut short, as EIO; details only in its log.
        if opened:  # it answered as a video server: not an unknown host. A seek the server refused is EIO too
            return "unreachable", ("the connection failed after the stream opened: the server hung up, or cannot "
                                   f"seek in a file (no Range support; an mp4 with its index at its end) ({strerror})")
        return "unreachable", f"connection failed: host unknown or unreachable, or it hung up ({strerror})"
    return ("unreachable" if network else "decode"), strerror


def open_files_cause(code: int) -> str:
    """EMFILE's or ENFILE's cause: "Too many open files" named neither the process nor the limit nor its fix.
    (The controller says the same of its own: pipeline/limits.py.)"""
    if code == errno.ENFILE:
        return "too many open files on this machine: its open-file table is full (sysctl fs.file-max)"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"too many open files: this camera process (pid {os.getpid()}) has reached its open-file limit ({soft}, "
            f"hard limit {hard}): raise it where the service starts (`ulimit -n 65536` before `hydravision run` "
            "or `ray start`, LimitNOFILE= in a systemd unit, --ulimit nofile=65536 for docker), or put fewer "
            "cameras in each process (ray.cameras_per_process)")


def nominal_rate(stream: Any) -> float | None:
    """The frame rate a video stream says it has, None when it says none. One that says none can get its time
    base's as one (90000 for RTSP): no camera runs at that, and read as one a tracker kept lost tracks for hours;
    unknown, the pipeline measures the rate it delivers."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate and float(rate) <= MAX_NOMINAL_FPS else None


_WIDENED: set[str] = set()  # the URLs whose widening was said (AVSource.open), once a process


def shown_size(height: int, width: int, sar: Fraction) -> tuple[int, int]:
    """(height, width) of a picture of non-square pixels as players show it (mpv's rule): wider where its pixels are
    wide, taller where they are narrow, never smaller (480x272 at 4:3 is 640x272, 720x480 at 8:9 is 720x540)."""
    if sar > 1:
        return height, max(1, round(width * sar))
    return max(1, round(height / sar)), width


# A camera added at run time was checked for the host its URL names (pipeline/admission.py), and FFmpeg goes on to
# any other: a redirect's, or those a playlist (HLS), a manifest (DASH, IMF), a script (concat) or a session
# description (SDP) names. These demuxers fetch further URLs (or open devices and sockets); FFmpeg has a format
# whitelist but no blacklist.
FETCHING_FORMATS = frozenset({"hls", "dash", "imf", "concat", "sdp", "rtp", "rtsp", "sap", "lavfi"})
# How an http(s) reply that is one of them starts (FFmpeg's probes find them so)
_FETCHING_MARKS = (b"#extm3u", b"ffconcat", b"<mpd", b"v=0")
SEGMENTED_FORMATS = frozenset({"hls", "dash"})  # live, they come a segment (seconds of frames) at a time
# How far back a live HLS/DASH stream reopened after a reconnect may replay what was handed over (FFmpeg starts it
# live_start_index, 3, segments before its live edge): a frame further back is new (an encoder restarted from 0)
REPLAY_WINDOW_S = 60


def confined_options() -> dict[str, str]:
    """The demuxer options of an http(s) source that must stay on the host its URL names: no redirect (FFmpeg fails a
    3xx with EIO) and every demuxer of this build but FETCHING_FORMATS (one of those probed: EINVAL)."""
    formats = (name for name in av.formats_available if not FETCHING_FORMATS & set(name.split(",")))
    return {"max_redirects": "0", "format_whitelist": ",".join(sorted(formats))}


def confined_refusal(url: str, timeout_s: float) -> str | None:
    """Why a source with confined_options failed to open, where the cause is them: FFmpeg says only EIO or EINVAL,
    so its server is asked once more (same host, path and query; no certificate check, as FFmpeg's default). None
    when it neither redirects nor serves a playlist, or does not say within ``timeout_s``: the open's own error
    stands. No credentials are sent: FFmpeg sends them only when asked and in the scheme asked for (a Digest
    camera's password went out in Basic, readable, over plain http); a camera that wants them keeps its own error.
    Asked in a daemon thread, its socket shut at the deadline: http.client's timeout is
    per read, and a server dripping bytes held the capture thread as long as it liked."""
    import http.client
    import socket
    import ssl
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s,
                                                                        context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    answer: list[tuple[int, bytes]] = []

    def ask() -> None:
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
            reply = conn.getresponse()
            answer.append((reply.status, b"" if 300 <= reply.status < 400 else reply.read(16).lstrip().lower()))
        except (OSError, http.client.HTTPException, ValueError):
            pass

    asking = threading.Thread(target=ask, name="hv-confined-probe", daemon=True)
    asking.start()
    asking.join(timeout_s)
    if asking.is_alive():  # past the deadline: its socket shut, so that the thread ends now
        with contextlib.suppress(OSError, AttributeError):
            conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    if not answer:
        return None
    status, head = answer[0]
    if 300 <= status < 400:
        return (f"the server redirects it (HTTP {status}), and redirects are not followed for a camera added at "
                "run time; put it in the config file, or add the camera by the URL it redirects to")
    if head.startswith(_FETCHING_MARKS):
        return ("a playlist or manifest (HLS, DASH, concat, SDP), which a camera added at run time does not open: "
                "FFmpeg would fetch the URLs it names from any host; put it in the config file")
    return None  # also a 401: the server wants the credentials this look does not send; the open's error stands,
    # retried as it was (a camera behind a login whose server failed for a moment is not failed for good)


class AVSource(Source):
    """One PyAV container; ``kind`` is "rtsp", "http", "file" or "device" (``path`` for the last two)."""

    def __init__(self, url: str, kind: str, *, path: str | None = None, transport: str = "tcp",
                 open_timeout_s: float = 10, read_timeout_s: float = 10, realtime: bool = True, loop: bool = False,
                 threads: str = "AUTO", ffmpeg_options: Mapping[str, str] | None = None,
                 hwaccel: str | None = None) -> None:
        self._raw_url, self._kind, self._path = url, kind, path
        self.hwaccel = hwaccel  # FFmpeg hardware device type ("cuda", "vaapi", ...); None after a fallback
        self.url = redact_url(url)
        self.live = kind != "file"
        self.nominal_fps: float | None = None
        self._network = kind in ("rtsp", "http")
        self._transport, self._threads = transport, threads
        self.open_timeout_s, self.read_timeout_s = float(open_timeout_s), float(read_timeout_s)
        # Devices and RTSP cameras deliver at their own rate; pacing them would only add latency. Over http, open()
        # tells a file or live HLS/DASH (paced) from a live stream over a socket.
        self._realtime = realtime
        self._pace = realtime and kind in ("file", "http")
        self._loop = loop and kind == "file"
        self._extra = dict(ffmpeg_options or {})
        self.decode_errors = 0
        # Pictures FFmpeg decoded damaged (lost RTP packets, a damaged file: the H.264 decoder conceals the loss
        # from neighbouring pictures and flags the picture); analysed all the same. Capture adds them to
        # skipped_packets, which counted decode exceptions alone: a UDP camera losing 2% of its packets read 0.
        self.corrupt_frames = 0
        self._container: av.container.InputContainer | None = None
        self._closed = False
        # A live HLS/DASH stream's own time (exact, seconds) of the last frame its user handed over before a reconnect,
        # set before reading the reopened stream: the frames up to it are skipped (_replayed). Kept across open().
        self.resume_after: Fraction | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._stream: av.VideoStream | None = None
        self._packets: Iterator[av.Packet] | None = None
        self._pending: deque[av.VideoFrame] = deque()
        self._eof = False
        self._index = 0
        self._since_seek = 0  # frames decoded since the last (re)start: a file without frames must not loop
        self._sought = False  # a loop's seek came (after a pass with frames): a pass without any then is the end
        self._file_id: tuple[int, int, int] | None = None  # the open file's (device, inode, mtime): _replaced
        self._sar: Fraction | None = None  # the stream's pixel aspect where its pixels are not square (open)
        self._pass_start: float | None = None  # pts of the first frame since the last (re)start
        self._restart_timestamps()
        self._consecutive_errors = 0
        self._arrival = False  # frames timed as they arrive (see open)
        self._segmented = False  # an HLS or DASH stream (see open)
        # A live segmented stream that said its end (an HLS playlist's #EXT-X-ENDLIST): Capture ends the camera
        # instead of reconnecting (see _at_end)
        self.finished = False
        self.last_stamp: Fraction | None = None  # a live HLS/DASH stream's own time of the last frame read returned
        # The stream's own time from resume_after to the first frame after it, where that follows on within
        # REPLAY_WINDOW_S (the stream resumed: its user's stream time can go on by it); else None
        self.resumed_s: float | None = None
        self._video_packets = 0  # non-empty video packets demuxed since the last (re)start
        self._last_video_packet: float | None = None  # monotonic: when the last of them came (read)
        self._opened_at = time.monotonic()  # the first picture's allowance counts from here (read)
        self._last_packet_corrupt = False  # FFmpeg flags a packet cut short by the end of the file
        self._end_error: SourceError | None = None  # raised instead of the normal end (a broken file)
        self._quiet_since: float | None = None  # monotonic: the start of a wait FFmpeg's own timeout ended (read)
        self._clock = PtsClock(None)
        self._pacer = Pacer()

    def _restart_timestamps(self) -> None:
        """What _frame_time counts, reset where FFmpeg resets it: at open and at a seek."""
        self._last_pts: int | None = None
        self._last_dts: int | None = None
        self._faulty_pts = self._faulty_dts = 0

    def _frame_time(self, frame: av.VideoFrame) -> Fraction | None:
        """The frame's time in seconds, exact (a count of its time base), as FFmpeg's best_effort_timestamp picks it
        (PyAV does not expose that): its pts, or its packet's dts once pts has gone backwards more often than dts. An
        AVI's B-frames carry their pts in decode order: read as they are, each backward step re-anchored the clock
        and stream time ran ~2x fast."""
        pts, dts = frame.pts, frame.dts
        if dts is not None:
            self._faulty_dts += self._last_dts is not None and dts <= self._last_dts
            self._last_dts = dts
        if pts is not None:
            self._faulty_pts += self._last_pts is not None and pts <= self._last_pts
            self._last_pts = pts
        best = pts if pts is not None and (dts is None or self._faulty_pts <= self._faulty_dts) else dts
        return None if best is None or frame.time_base is None else best * frame.time_base

    def _error(self, kind: str, cause: str) -> SourceError:
        return SourceError.for_url(kind, self._raw_url, cause)

    def _call(self, fn: Callable[..., T], timeout_s: float, *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), with FFmpeg's exceptions turned into SourceError."""
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except (av.FFmpegError, OSError) as exc:
            kind, cause = classify(exc, network=self._network, elapsed_s=time.monotonic() - started,
                                   timeout_s=timeout_s, device=self._kind == "device",
                                   opened=self._container is not None,
                                   transport=self._transport if self._kind == "rtsp" else None)
        # Raised outside the except block, so the FFmpeg exception (its text holds the raw URL, credentials
        # included) is neither the cause nor the context of ours and no traceback can print it.
        raise self._error(kind, cause)

    def _options(self) -> tuple[str, str | None, dict[str, str]]:
        """(what to open, FFmpeg format or None, demuxer options)."""
        # FFmpeg's socket I/O timeout (microseconds) bounds every wait of the open too: set to read_timeout_s, an open
        # failed after read_timeout_s whatever open_timeout_s said. The longer of the two: PyAV's timeout=(open, read)
        # ends each wait first (the open's, and every read's, on TCP and UDP alike); FFmpeg's stays as the bound
        # where PyAV sets none (the TEARDOWN of a close).
        socket_timeout = str(int(max(self.open_timeout_s, self.read_timeout_s) * 1e6))
        if self._kind == "rtsp":
            opts = {
                "rtsp_transport": self._transport,
                "timeout": socket_timeout,
                "fflags": "+genpts+discardcorrupt",
                "allowed_media_types": "video",  # no audio SETUP: less traffic, no packets to skip
                "analyzeduration": "500000",  # 0.5 s probing instead of up to 5 s: opens ~2x faster
            }
            return self._raw_url, None, {**opts, **self._extra}
        if self._kind == "http":
            opts = {"timeout": socket_timeout, "fflags": "+genpts+discardcorrupt"}
            return self._raw_url, None, {**opts, **self._extra}
        assert self._path is not None
        if self._kind == "device":
            return self._path, "v4l2", dict(self._extra)
        # "file:" keeps FFmpeg from reading "name:with:colons.mp4" as a protocol.
        return "file:" + os.path.abspath(self._path), None, {"fflags": "+genpts", **self._extra}

    def _check_file(self) -> tuple[int, int, int] | None:
        """The file's (device, inode, mtime) before FFmpeg opens it, None where it cannot be looked at (FFmpeg's open
        says why: no such file, permission denied). SourceError for a path that is neither a regular file nor a
        capture device: FFmpeg's open() of a FIFO without a writer, or of a terminal, blocks, and PyAV's timeout
        cannot interrupt it (a config camera said `starting` for ever, and each watchdog restart left a blocked
        thread and an fd behind; admission refuses such paths for cameras added at run time)."""
        assert self._path is not None
        try:
            st = os.stat(self._path)  # stat opens nothing: it cannot block on a FIFO
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == V4L_MAJOR:
            return st.st_dev, st.st_ino, st.st_mtime_ns
        if stat.S_ISDIR(st.st_mode):
            cause = "is a directory, not a video"
        elif stat.S_ISFIFO(st.st_mode):
            cause = "is a FIFO (named pipe), not a file: opening it waits for a writer, past any timeout"
        elif stat.S_ISCHR(st.st_mode):
            cause = "is a character device, not a file nor a video capture device (/dev/videoN, device://)"
        else:
            cause = "is not a regular file (a block device or a socket)"
        raise self._error("not_video", cause)

    def _replaced(self) -> bool:
        """The path names another file than the open one (a new file renamed over it, log-rotation style), or none
        (deleted: the next open says so; it played for ever, its disk space held), or the open one was written since
        it was opened. False where the path cannot be looked at now (no permission): the open one goes on."""
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return self._file_id is not None
        except OSError:
            return False
        return self._file_id is not None and (st.st_dev, st.st_ino, st.st_mtime_ns) != self._file_id

    def open(self) -> None:
        """Opens (or reopens) the container; raises SourceError within the open timeout."""
        self.close()
        self._closed = False
        self._reset_state()
        if self._kind == "file":
            self._file_id = self._check_file()
        target, fmt, options = self._options()
        common = dict(format=fmt, options=options, timeout=(self.open_timeout_s, self.read_timeout_s), **_TAGS)
        container = None
        hw_failed: Exception | None = None
        if self.hwaccel:
            from av.codec.hwaccel import HWAccel

            # Any failure falls through to the plain open below, which classifies the URL's own problems (a
            # bad URL is thus tried twice; only cameras with hwaccel set pay that).
            # CUDA: the device's primary context, shared by the process's decoders (and torch), where FFmpeg made
            # a context of its own per decoder, hundreds of MB of GPU memory each
            device_options = {"primary_ctx": "1"} if self.hwaccel == "cuda" else None
            try:
                container = av.open(target, hwaccel=HWAccel(self.hwaccel, allow_software_fallback=True,
                                                            options=device_options), **common)
            except OSError as e:
                if e.errno == errno.EPERM:  # FFmpeg could not create the device (no GPU, no driver)
                    log.warning("%s: hardware decoding with %s is unavailable (%s); decoding on the CPU",
                                self.url, self.hwaccel, e.strerror)
                    self.hwaccel = None
            except av.FFmpegError as e:  # e.g. ExternalError: the CUDA library loads but cuInit fails
                hw_failed = e
        if container is None:
            # PyAV's open timeout ends the wait (FFmpeg's socket timeout is no shorter: _options)
            try:
                container = self._call(av.open, self.open_timeout_s, target, **common)
            except SourceError as e:
                refused = None  # with confined_options (a camera added at run time): a redirect or playlist, said so
                if e.kind == "unreachable" and options.get("max_redirects") == "0":
                    refused = confined_refusal(self._raw_url, self.open_timeout_s)
                if refused is None:
                    raise
                raise self._error("unsupported", refused) from None
            # The URL opens without it, so the device failed: once said here, not a silent CPU decoder that the
            # camera's stats still named as hardware decoding.
            if hw_failed is not None:
                # FFmpeg's text names what it opened: the raw URL, password and all (text logs are not redacted).
                log.warning("%s: hardware decoding with %s failed (%s); decoding on the CPU",
                            self.url, self.hwaccel, redact_text(str(hw_failed), [self._raw_url]))
                self.hwaccel = None
        try:
            if not container.streams.video:
                raise self._error("not_video", "has no video stream")
            # FFmpeg's pick, as ffmpeg's: not a cover picture or a one-frame track that happens to come first.
            stream = container.streams.best("video") or container.streams.video[0]
            # PyAV has segfaulted decoding streams it found no codec for (truncated files): never try.
            if stream.codec_context is None:
                raise self._error("unsupported", "no decoder for its video stream (unknown codec or damaged)")
            stream.thread_type = self._threads
            stream.thread_count = DECODER_THREADS
            if stream.codec_context.name == "mjpeg":
                # Each picture stands alone: one cut short (an IP camera's MJPEG part truncated, lost RTP packets)
                # fails to decode and is skipped and counted (decode_errors), instead of FFmpeg concealing the
                # damage with the previous picture's data, analysed as a whole picture. A whole picture decodes as
                # before, also without its EOI marker or with bytes after it.
                stream.codec_context.options = {**stream.codec_context.options, "err_detect": "explode"}
        except BaseException:
            container.close()
            raise
        if self.hwaccel and not stream.codec_context.is_hwaccel:
            # PyAV decodes on the CPU in silence where the codec has no decoder on that device (FFmpeg's own H.264
            # decoder on qsv or drm, a raw webcam's frames): said here, as for a device that cannot be created.
            log.warning("%s: hardware decoding with %s is not available to its %s decoder; decoding on the CPU",
                        self.url, self.hwaccel, stream.codec_context.name)
            self.hwaccel = None
        self.nominal_fps = nominal_rate(stream)
        # Non-square pixels (a DVD's 720x576, HDV's 1440x1080, a 480x272 at 4:3): players show the picture widened
        # (or, below 1, made taller) to its display aspect, and so does read(), in each frame's size: to_model_input and
        # to_picture scale to it in the conversion they make anyway, so that the model, the snapshot and pixel zones
        # see what the user sees. Square pixels: None, nothing changes.
        sar = stream.sample_aspect_ratio  # FFmpeg's guess, as ffprobe's: the container's, else the codec's
        self._sar = sar if sar and sar != 1 and 1 / MAX_SAR <= sar <= MAX_SAR else None
        if self._sar is not None and self.url not in _WIDENED:  # said once a URL: its pixel zones are of this size
            _WIDENED.add(self.url)
            shown = shown_size(stream.height, stream.width, self._sar)
            log.info("%s: non-square pixels (%s): frames shown %dx%d, stored %dx%d; boxes and pixel zones and "
                     "lines are of the shown picture", self.url, self._sar, shown[1], shown[0], stream.width,
                     stream.height)
        self._container, self._stream = container, stream
        self._clock = PtsClock(self.nominal_fps)
        self._pacer = Pacer(self.nominal_fps)
        if self._kind == "http":
            # A file on a web server (an mp4, a finished HLS playlist) has a length and downloads faster than its
            # rate; a live stream (an IP camera's MJPEG, live HLS) has none and comes at the camera's rate: paced at
            # the 25 fps FFmpeg guesses for MJPEG, a 30 fps camera fell further behind every second. A file is not
            # live: its end is the end (Capture), not a dropped connection replayed from the start, an outage a pass.
            self.live = not (container.duration or 0) > 0  # a live FLV says duration 0
            # A live HLS or DASH stream comes a segment at a time, faster than real time: unpaced, each segment's
            # frames came at once and the newest-wins slot dropped most of them as "overload" (2.6 of 5 fps analysed,
            # pts jumping 1-2 s). Paced to its timestamps as a file is; a live socket (MJPEG, FLV) stays unpaced.
            self._segmented = bool(SEGMENTED_FORMATS & set(container.format.name.split(",")))
            self._pace = self._realtime and (not self.live or self._segmented)
        # A live stream in a format without timestamps (an IP camera's MJPEG over http, a raw H.264 feed): FFmpeg
        # numbers its frames at a guessed 25 fps, and a 5 fps camera's stream time ran at a fifth of real time (the
        # analysed fps, dwell times and snapshots follow it). Its frames are timed as they arrive, its rate measured.
        self._arrival = (self.live and container.duration is None
                         and bool(int(container.format.flags) & AVFMT_NOTIMESTAMPS))
        if self._arrival:
            self.nominal_fps = None  # FFmpeg's guess, not the camera's rate
        self._packets = container.demux()  # every stream: a video-less flood still reaches our deadline check
        self._opened_at = time.monotonic()

    def read(self) -> SourceFrame | None:
        """Next frame, None at the end; raises SourceError (no frame within the read timeout, a broken
        stream, a closed source)."""
        if self._container is None:
            raise self._error("ended", "the source is closed" if self._closed else "the source is not open")
        while True:  # until a frame not handed over before a reconnect (_replayed; each skipped one is a picture)
            # Counted from when the source went quiet: a frozen camera's last frame, held by FFmpeg's parser until the
            # next one began, came out only when FFmpeg's own timeout ended the wait, and restarted the count (the
            # camera was found frozen after twice read_timeout_s)
            deadline = (self._quiet_since or time.monotonic()) + self.read_timeout_s
            while not self._pending:
                if self._eof:
                    if self._end_error is not None:
                        raise self._end_error
                    return None
                now = time.monotonic()
                if now > deadline and not self._awaiting_key_frame(now):
                    raise self._error("timeout", self._no_picture(now))
                self._decode_next_packet()
            frame = self._pending.popleft()
            stamp = None if self._arrival else self._frame_time(frame)
            if not self._replayed(stamp):
                break
        if self.live and self._segmented:
            self.last_stamp = stamp
        # came before the source went quiet (held, see above): its age counts from then, not from its release
        arrived = self._quiet_since or time.monotonic()
        pts = self._clock(arrived if self._arrival else None if stamp is None else float(stamp))
        if self._pass_start is None:
            self._pass_start = pts
        # A paced file's picture is "taken" when it is due, not when it was decoded ahead (the first paced frame
        # anchors the clock, so frames a resume skips first cost no waiting).
        if self._pace and self._index >= self.unpaced_until:
            self._pacer.wait(pts)
        size = (frame.height, frame.width) if self._sar is None else shown_size(frame.height, frame.width, self._sar)
        out = SourceFrame(self._index, pts, time.time() - (time.monotonic() - arrived), size, frame)
        # A phone records sideways and says how to show it (display matrix); players and ffmpeg turn the picture,
        # and so must we: sideways people are not detected, and zones drawn on the shown picture would not fit.
        turns = round(getattr(frame, "rotation", 0) / 90) % 4  # an older PyAV has no rotation: as before
        if turns:
            out.image = np.ascontiguousarray(np.rot90(out.to_rgb(), turns))  # rotation is counterclockwise, as rot90
            out.size = out.image.shape[:2]
        self._index += 1
        return out

    def _replayed(self, stamp: Fraction | None) -> bool:
        """Whether a frame of a live HLS/DASH stream reopened after a reconnect was handed over before it: FFmpeg
        starts a live playlist a few segments back, and they were analysed again as new frames (new stream time,
        new tracks, zone and line events again). By the stream's own time (MPEG-TS timestamps run on across
        segments, exact in its time base): at or before resume_after and within REPLAY_WINDOW_S of it; the first
        frame past it ends the resume, so an encoder restarted from 0 or timestamps that jumped skip nothing more."""
        if self.resume_after is None or not (self.live and self._segmented):
            return False
        if stamp is not None and self.resume_after - REPLAY_WINDOW_S < stamp <= self.resume_after:
            return True
        gap = None if stamp is None else stamp - self.resume_after
        self.resumed_s = float(gap) if gap is not None and 0 < gap <= REPLAY_WINDOW_S else None
        self.resume_after = None
        return False

    @property
    def first_picture_wait_s(self) -> float:
        """How long the first picture after an open may take while video packets keep coming (FIRST_PICTURE_WAIT_S)."""
        return max(self.read_timeout_s, FIRST_PICTURE_WAIT_S)

    def _awaiting_key_frame(self, now: float) -> bool:
        """No picture since the open, video packets still coming (the last within read_timeout_s) and the first
        picture's allowance not spent: a camera joined mid-GOP, its packets undecodable until its next key frame."""
        return (not self._since_seek and self._last_video_packet is not None
                and now - self._last_video_packet <= self.read_timeout_s
                and now - self._opened_at <= self.first_picture_wait_s)

    def _no_picture(self, now: float) -> str:
        """Why read() gave up waiting for a picture."""
        flowing = self._last_video_packet is not None and now - self._last_video_packet <= self.read_timeout_s
        if not self._since_seek and flowing:
            waited = self.first_picture_wait_s
            return (f"{self._video_packets} video packets received but no decodable picture within {waited:g} s: "
                    f"waiting for a key frame (GOP longer than {waited:g} s? shorten the camera's key frame interval)")
        return f"no picture within {self.read_timeout_s:g} s"

    def _decode_next_packet(self) -> None:
        assert self._container is not None and self._stream is not None and self._packets is not None
        asked = time.monotonic()
        try:
            packet = self._call(next, self.read_timeout_s, self._packets, None)
        except IndexError:
            # PyAV's demux() ends with a flush packet per stream, found by index in the streams it knew at open: a
            # stream the demuxer met mid-file (a TS whose program gained a track) fails that lookup. Ours came first.
            packet = None
        if time.monotonic() - asked >= 0.95 * self.read_timeout_s:  # a wait FFmpeg's timeout ended: quiet since then
            self._quiet_since = self._quiet_since or asked
        else:
            self._quiet_since = None
        if packet is None:
            self._at_end()
            return
        # by its stream, not stream_index: PyAV's demux() ends with each stream's empty flush packet, all of them with
        # stream_index 0: an audio stream's reached the video decoder (a decode error per pass of a file with audio),
        # and where video was not stream 0 its own was dropped, its decoder never drained (the last frames lost)
        if getattr(packet.stream, "index", packet.stream_index) != self._stream.index:
            return
        if packet.size:
            self._video_packets += 1
            self._last_video_packet = time.monotonic()
            self._last_packet_corrupt = packet.is_corrupt
        cause = None
        try:
            frames = self._stream.decode(packet)  # the empty packet at the end flushes the decoder
        except av.FFmpegError as exc:
            # A corrupt packet (lost RTP packets, a damaged file): skip it, as ffmpeg does, unless the stream
            # is broken for good.
            self.decode_errors += 1
            self._consecutive_errors += 1
            if self._consecutive_errors < MAX_CONSECUTIVE_DECODE_ERRORS:
                return
            cause = (f"{self._consecutive_errors} packets in a row failed to decode "
                     f"({getattr(exc, 'strerror', None) or type(exc).__name__})")
        if cause is not None:
            raise self._error("decode", cause)
        if frames:
            self._consecutive_errors = 0
            self.corrupt_frames += sum(frame.is_corrupt for frame in frames)  # a flag of each: cheap
            self._since_seek += len(frames)
            self._pending.extend(frames)

    def _at_end(self) -> None:
        assert self._container is not None and self._stream is not None
        # First: a pass cut short or failing because its file changed under it (overwritten in place) reads it anew
        if self._loop and (self._since_seek or self._sought) and self._replaced():
            # The next pass reads the file now at the path (a new one renamed over it, log-rotation style): the
            # open one, deleted, played for ever and held its disk space. Numbering and stream time go on; the new
            # file's own failure (not a video, no such file) is the source's, as at a first open.
            index, clock, pacer = self._index, self._clock, self._pacer
            self.open()
            self._index, self._clock, self._pacer = index, clock, pacer
            clock.restart()
            return
        if self._sought and not self._since_seek and not self._consecutive_errors:
            # No picture after the loop's seek, where the pass before had some: a demuxer that took the seek and
            # did not go back. A normal end, not a file that "holds no pictures" (one whose packets failed is).
            self._eof = True
            return
        if not (self._loop and self._since_seek):
            self._eof = True
            if self._kind == "file":
                self._end_error = self._broken_file()
            elif self.live and self._segmented:
                self.finished = self._playlist_ended()
            return
        try:
            # seek() also flushes the decoder, which the end-of-file flush left draining.
            self._container.seek(0, backward=True, any_frame=False, stream=self._stream)
            if self._container.format.name == "image2":
                # image2 seeks by picture number but reads a lone picture (a .jpg) through the handle the
                # pass left at its end: the next pass had no packets and "held no pictures" (PNG's demuxer reads
                # bytes, and looped). Its first byte too.
                self._container.seek(0, unsupported_byte_offset=True)
        except (av.FFmpegError, OSError):
            try:
                # A raw stream (an .h264 dump) has no timestamps to seek by (EPERM): its start is its first byte.
                self._container.seek(0, unsupported_byte_offset=True)
            except (av.FFmpegError, OSError):
                self._eof = True  # not seekable (a pipe): a normal end
                return
        frames, clock = self._since_seek, self._clock
        self._since_seek, self._sought = 0, True
        clock.restart()
        self._restart_timestamps()
        self._packets = self._container.demux()
        # A resume far into a looping file (a day of passes) would decode every pass only to skip it: count whole
        # passes, and their stream time, without decoding them.
        passes = (self.unpaced_until - self._index) // frames
        if passes > 0 and clock.last is not None and self._pass_start is not None:
            self._index += passes * frames
            clock.last += passes * (clock.last - self._pass_start + clock.period)
        self._pass_start = None

    def _playlist_ended(self) -> bool:
        """At the end of a live HLS (or DASH) stream: whether its playlist now says it ended (#EXT-X-ENDLIST; it then
        opens as a file, with a duration) rather than a dropped connection. FFmpeg ends both alike and keeps the
        playlist to itself: it is opened once more to look (where it does not open, the stream dropped)."""
        target, fmt, options = self._options()
        try:
            probe = self._call(av.open, self.open_timeout_s, target, format=fmt, options=options,
                               timeout=(self.open_timeout_s, self.read_timeout_s), **_TAGS)
        except SourceError:
            return False
        try:
            return (probe.duration or 0) > 0
        finally:
            probe.close()

    def _broken_file(self) -> SourceError | None:
        """At the end of a file: the error that says why it ended early, None for a normal end.

        Without this a file whose every packet fails to decode, or a recording cut mid-write (the frames
        before the cut decode fine), would end like a complete one and nobody would learn why."""
        assert self._stream is not None
        if not self._since_seek:
            if self._consecutive_errors:
                return self._error("decode", f"none of its {self._video_packets} video packets could be decoded "
                                   "(damaged, or not the codec it claims)")
            return self._error("not_video", "its video stream holds no pictures")
        listed = self._stream.frames or 0  # from the container's index; 0 when it has none (TS, raw, fragmented)
        rate = self._stream.guessed_rate
        if self._container.format.name == "avi" and rate:
            # AVI's length counts ticks of its time base, a frame only where that is one: FFmpeg writes H.264 with
            # B-frames at half a frame, and an intact file read as half missing.
            listed = round(listed * self._stream.time_base * rate)
        if listed > self._video_packets or self._last_packet_corrupt:
            of = f" of the {listed} its index lists" if listed > self._video_packets else ""
            return self._error("decode", f"the file is truncated: it ends after {self._since_seek} frames{of}")
        return None

    def close(self) -> None:
        container, self._container = self._container, None
        self._closed = True
        self._pending.clear()
        self._packets = None
        self._stream = None
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - close must never raise; the container is gone either way
                pass
