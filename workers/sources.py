"""Frame sources a camera's decode thread reads from: RTSP/RTSPS, files, local V4L2 devices, http(s) and
``synthetic://`` scenes, behind one small interface (``open`` / ``read`` / ``close``).

This is the module callers use: ``open_source`` picks the Source for a URL, and the types it returns and
raises are re-exported from ``workers.source_base``. The dependency runs one way: this factory imports the
PyAV sources (``workers.av_source``) and the synthetic ones (``workers.synthetic_source``); they import only
``workers.source_base``, never this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from workers.settings import is_device_path
from workers.source_base import ERROR_KINDS, Pacer, PtsClock, Source, SourceError, SourceFrame

__all__ = ["ERROR_KINDS", "Pacer", "PtsClock", "Source", "SourceError", "SourceFrame", "open_source"]

TRANSPORTS = ("tcp", "udp", "udp_multicast", "http", "https")  # FFmpeg's rtsp_transport values
THREAD_TYPES = ("AUTO", "FRAME", "SLICE", "NONE")


def open_source(
    url: str,
    *,
    transport: str = "tcp",
    open_timeout_s: float = 10,
    read_timeout_s: float = 10,
    realtime: bool = True,
    loop: bool = False,
    threads: str = "AUTO",
    ffmpeg_options: Mapping[str, str] | None = None,
    hwaccel: str | None = None,
    untrusted: bool = False,
) -> Source:
    """Picks the Source for ``url`` without opening it.

    ``transport``: RTSP lower transport (tcp, udp, ...). Timeouts in seconds. ``realtime`` paces files (also over
    http), live HLS/DASH (a segment comes at once) and synthetic scenes at their frame rate (False: as fast as
    they decode, for batch jobs and benchmarks); a live stream over a socket (MJPEG, FLV) comes at its own rate.
    ``loop``: files seek back to the start at their end. ``threads``: decoder threading, "AUTO"/"FRAME"
    (fastest, a few frames of delay), "SLICE" (lowest latency) or "NONE". ``ffmpeg_options`` override the
    demuxer options (e.g. {"fflags": "nobuffer"} for latency, "buffer_size" for UDP at high bitrates).
    ``hwaccel``: decode on an FFmpeg hardware device ("cuda" for NVDEC, "vaapi", "qsv", ...); a device that
    cannot be created falls back to the CPU decoder with a warning. Ignored by synthetic sources.
    ``untrusted``: a camera added at run time (CameraConfig.untrusted): over http(s) it follows no redirect and opens
    no playlist (av_source.confined_options), which would take FFmpeg to hosts admission did not check.
    Raises SourceError("unsupported") for an unknown scheme or bad synthetic parameters, ValueError for a
    bad argument.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if threads not in THREAD_TYPES:
        raise ValueError(f"threads must be one of {', '.join(THREAD_TYPES)}, got {threads!r}")
    if not (open_timeout_s > 0 and read_timeout_s > 0):
        raise ValueError(f"timeouts must be positive, got open={open_timeout_s!r} read={read_timeout_s!r}")
    if not isinstance(url, str) or not url.strip():
        raise SourceError("unsupported", f"{url!r}: empty source URL")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep else ""
    url = f"{scheme}://{rest}" if sep else url  # FFmpeg knows "rtsp://", not "RTSP://" (a protocol not found)
    # Imported here, not at the top: the controller imports this module (through workers.stream) but never
    # decodes, and PyAV would cost it 16 MB and a few hundred ms at start-up.
    if scheme == "synthetic":
        from workers.synthetic_source import SyntheticSource

        return SyntheticSource(url, realtime=realtime)

    from workers.av_source import AVSource, confined_options

    if untrusted and scheme in ("http", "https"):
        ffmpeg_options = {**(ffmpeg_options or {}), **confined_options()}
    common: dict[str, Any] = dict(open_timeout_s=open_timeout_s, read_timeout_s=read_timeout_s, threads=threads,
                                  ffmpeg_options=ffmpeg_options, hwaccel=hwaccel)
    if scheme in ("rtsp", "rtsps"):
        return AVSource(url, "rtsp", transport=transport, **common)
    if scheme in ("http", "https"):
        return AVSource(url, "http", realtime=realtime, **common)
    if scheme == "device" or (not sep and is_device_path(url)):
        return AVSource(url, "device", path=rest if sep else url, **common)
    if scheme == "file" or not sep:
        # A plain path is never parsed as a URL, so "clip:1.mp4" stays a file name.
        # "~/clips/a.mp4" as the checkpoint's path reads it (FFmpeg took "~" for a folder of the working directory)
        return AVSource(url, "file", path=file_url_path(url) if sep else os.path.expanduser(url), realtime=realtime,
                        loop=loop, **common)
    raise SourceError.for_url("unsupported", url, f"unsupported scheme {scheme!r} (use rtsp://, rtsps://, "
                              "http(s)://, file://, a path, /dev/videoN or synthetic://)")


def file_url_path(url: str) -> str:
    """The local path a file:// URL names (percent-decoded); SourceError for another host, or a raw '?' or '#'.
    Admission (pipeline/admission.py) checks run-time cameras' files with the same reading."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError as e:  # "file://[x]/a.mp4": a '[' or ']' reads as an IPv6 host; it crashed the decoder thread
        raise SourceError.for_url("unsupported", url, f"unreadable URL ({e}); give the plain path") from None
    if parts.netloc not in ("", "localhost"):
        # The URL (redacted) heads the message; its netloc is not quoted: a password with a raw '/' splits it.
        raise SourceError.for_url("unsupported", url, "file:// URLs must be local (this one names a host)")
    if "?" in url or "#" in url:
        # urlsplit ends the path at either: "file:///v/cam #2.mp4" opened "/v/cam " (or another file there)
        raise SourceError.for_url("unsupported", url, "a file:// URL ends its path at '?' or '#': write them "
                                  "%3F and %23, or give the plain path")
    path = unquote(parts.path)
    if path in ("", "/"):  # "file://" (a ${VAR} left empty): accepted at load, it failed only in the camera
        raise SourceError.for_url("unsupported", url, "names no file (e.g. file:///videos/a.mp4)")
    if "\0" in path:  # "%00": os.path and FFmpeg raise a bare "embedded null byte" ValueError
        raise SourceError.for_url("unsupported", url, "a file path cannot hold a NUL byte (%00)")
    return path
