#!/usr/bin/python3
"""A small GStreamer RTSP server that the tests and benchmarks start on a free port (``pipeline.testbed.RtspServer``).

Run it with Debian's interpreter (it needs the ``gi`` bindings, the project venv has none):

    /usr/bin/python3 pipeline/testbed_rtsp.py --port 8554 --file clip.mp4 [--loop]
    /usr/bin/python3 pipeline/testbed_rtsp.py --port 8554 --pattern --width 640 --height 360 --fps 25
    /usr/bin/python3 pipeline/testbed_rtsp.py --port 8554 --mount /a --file a.mp4 --mount /b --pattern

Each ``--mount`` is paired, in order, with the next ``--file``/``--pattern``. Once listening it prints
exactly one line, ``READY rtsp://127.0.0.1:PORT/mount`` (several URLs on that line when there are several
mounts), and it exits cleanly on SIGTERM/SIGINT.

How an mp4 is served, and why (``--loop`` in particular):
The file is demuxed ONCE at start-up into its H.264 access units, kept in memory, and every client gets its
own (non-shared) media whose ``appsrc`` replays them; with ``--loop`` it goes on with the same units shifted
by one clip length, so timestamps (hence RTP timestamps) keep increasing as a live camera's do. Without
``--loop`` the appsrc sends EOS after the last unit, the RTP session sends RTCP BYE and FFmpeg reports end
of stream. The RTSP media's sinks sync to the clock, so units go out at the file's native rate. Nothing is
re-encoded.
The alternative was a shared media that seeks back to 0 on EOS. A flushing seek restarts running time, from
which the payloader derives RTP timestamps, so they would jump backwards unless compensated; and the server
makes its own seeks for PLAY requests carrying a Range. Replaying units through appsrc sidesteps both and
keeps every timestamp explicit. Per-client media also makes tests deterministic: every connection starts
at the clip's first keyframe (unlike a real camera, which a client joins mid-stream).
Memory: the whole clip is held in RAM, fine for test clips (bikes.mp4 is 0.5 MB).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

HOST = "127.0.0.1"


@dataclass(frozen=True)
class AccessUnit:
    data: bytes
    pts: int  # nanoseconds
    dts: int  # nanoseconds or Gst.CLOCK_TIME_NONE
    duration: int
    keyframe: bool


@dataclass(frozen=True)
class Clip:
    caps: Gst.Caps  # stream-format=avc with codec_data: the SPS/PPS travel in the caps
    units: list[AccessUnit]
    period: int  # ns between a unit and its copy in the next loop


def demux_h264(path: str) -> Clip:
    """Read every H.264 access unit of an mp4 (no decoding) with GStreamer's own demuxer."""
    pipeline = Gst.parse_launch(
        "filesrc name=src ! qtdemux ! h264parse "
        "! video/x-h264,stream-format=avc,alignment=au ! appsink name=sink sync=false"
    )
    pipeline.get_by_name("src").set_property("location", path)  # a property: no quoting problems
    sink, bus = pipeline.get_by_name("sink"), pipeline.get_bus()
    caps, units = None, []
    pipeline.set_state(Gst.State.PLAYING)
    try:
        while not sink.get_property("eos"):
            # An error (missing file, not an mp4) never reaches the appsink: watch the bus as well.
            msg = bus.pop_filtered(Gst.MessageType.ERROR)
            if msg is not None:
                raise RuntimeError(f"cannot demux {path}: {msg.parse_error()[0].message}")
            sample = sink.emit("try-pull-sample", Gst.SECOND // 10)
            if sample is None:
                continue
            if caps is None:
                caps = sample.get_caps()
            buf = sample.get_buffer()
            ok, info = buf.map(Gst.MapFlags.READ)
            if not ok:
                raise RuntimeError(f"cannot map a buffer of {path}")
            try:
                data = bytes(info.data)
            finally:
                buf.unmap(info)
            keyframe = not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
            units.append(AccessUnit(data, buf.pts, buf.dts, buf.duration, keyframe))
    finally:
        pipeline.set_state(Gst.State.NULL)
    if not units or caps is None:
        raise RuntimeError(f"no H.264 video found in {path}")
    frame = next((u.duration for u in units if u.duration != Gst.CLOCK_TIME_NONE), Gst.SECOND // 25)
    end = max(u.pts + (u.duration if u.duration != Gst.CLOCK_TIME_NONE else frame) for u in units)
    return Clip(caps=caps, units=units, period=end - min(u.pts for u in units))


class ClipFeeder:
    """Feeds one client's appsrc with a clip's access units, looping when asked."""

    def __init__(self, clip: Clip, loop: bool) -> None:
        self.clip, self.loop = clip, loop
        self.index = 0
        self.offset = 0  # added to every timestamp: grows by one period per loop

    def on_need_data(self, appsrc: Gst.Element, _length: int) -> None:
        # Called from appsrc's streaming thread whenever its queue runs empty; one unit per call keeps
        # the feeder trivial, and the sinks' clock sync (not this callback) sets the pace.
        if self.index == len(self.clip.units):
            if not self.loop:
                appsrc.emit("end-of-stream")
                return
            self.index, self.offset = 0, self.offset + self.clip.period
        unit = self.clip.units[self.index]
        self.index += 1
        buf = Gst.Buffer.new_wrapped(unit.data)
        buf.pts = unit.pts + self.offset
        buf.dts = unit.dts + self.offset if unit.dts != Gst.CLOCK_TIME_NONE else Gst.CLOCK_TIME_NONE
        buf.duration = unit.duration
        if not unit.keyframe:
            buf.set_flags(Gst.BufferFlags.DELTA_UNIT)
        appsrc.emit("push-buffer", buf)


def file_factory(clip: Clip, loop: bool) -> GstRtspServer.RTSPMediaFactory:
    factory = GstRtspServer.RTSPMediaFactory()
    # format=time: the timestamps we set are used as they are; is-live=false: the media prerolls and its
    # sinks sync buffers to the clock, which is what makes the rate native.
    factory.set_launch(
        "( appsrc name=src format=time is-live=false "
        "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )"
    )
    factory.set_shared(False)  # every client starts at the first frame (see the module docstring)

    def configure(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_by_name("src")
        appsrc.set_property("caps", clip.caps)
        appsrc.connect("need-data", ClipFeeder(clip, loop).on_need_data)

    factory.connect("media-configure", configure)
    return factory


def pattern_factory(width: int, height: int, fps: int) -> GstRtspServer.RTSPMediaFactory:
    factory = GstRtspServer.RTSPMediaFactory()
    # key-int-max=fps: a keyframe every second, so a client joining a live stream gets a picture quickly.
    factory.set_launch(
        f"( videotestsrc is-live=true ! video/x-raw,width={width},height={height},framerate={fps}/1 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
        "! rtph264pay name=pay0 pt=96 )"
    )
    # Not shared either: each client gets its own encoder, whose first frame is a keyframe, so a reader's
    # first picture comes at once and no test depends on what an earlier client did.
    factory.set_shared(False)
    return factory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mount", action="append", default=[], help="default /cam; repeat with sources")
    p.add_argument("--file", dest="sources", action="append", type=lambda s: ("file", s), metavar="PATH",
                   help="H.264 mp4 served without re-encoding")
    p.add_argument("--pattern", dest="sources", action="append_const", const=("pattern", ""),
                   help="live videotestsrc encoded with x264")
    p.add_argument("--loop", action="store_true", help="files restart at their end instead of EOS")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--exit-with-parent", action="store_true",
                   help="quit when the parent process dies (test helpers pass it: no orphans)")
    args = p.parse_args(argv)
    args.mount = args.mount or ["/cam"]
    if not args.sources or len(args.sources) != len(args.mount):
        p.error("give one --file or --pattern per --mount")
    if any(not m.startswith("/") for m in args.mount):
        p.error("a mount starts with '/'")
    # x264's yuv420p needs even sizes: an odd one was READY and then answered every client 503, saying nothing
    if any(kind == "pattern" for kind, _ in args.sources):
        if args.width < 2 or args.height < 2 or args.width % 2 or args.height % 2:
            p.error(f"--width and --height must be even and positive, got {args.width}x{args.height}")
        if args.fps < 1:
            p.error(f"--fps must be at least 1, got {args.fps}")
    return args


def add_mounts(server: GstRtspServer.RTSPServer, args: argparse.Namespace) -> None:
    # Without a pool the RTP/RTCP sockets of UDP clients bind to 0.0.0.0 and [::]. A unicast pool (TTL 0)
    # on 127.0.0.1 keeps them on loopback; ports in use are skipped, so parallel servers coexist.
    udp_pool = GstRtspServer.RTSPAddressPool()
    udp_pool.add_range(HOST, HOST, 20000, 32767, 0)
    clips: dict[str, Clip] = {}  # a file mounted twice is demuxed once
    for mount, (kind, value) in zip(args.mount, args.sources):
        if kind == "file":
            if value not in clips:
                clips[value] = demux_h264(value)
            factory = file_factory(clips[value], args.loop)
        else:
            factory = pattern_factory(args.width, args.height, args.fps)
        factory.set_address_pool(udp_pool)
        server.get_mount_points().add_factory(mount, factory)


def quit_on_signals_and_orphaning(loop: GLib.MainLoop, watch_parent: bool) -> None:
    def stop(*_: object) -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    for sig in (signal.SIGTERM, signal.SIGINT):
        # GLib's handler, not Python's: Python signal handlers only run when the C main loop returns to
        # the interpreter, i.e. never.
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, stop)
    if watch_parent:
        parent = os.getppid()

        def parent_alive() -> bool:
            # Reparenting (to init or a subreaper) means the test run died without stopping us,
            # e.g. pytest killed by SIGKILL or pytest-timeout's os._exit.
            return stop() if os.getppid() != parent else GLib.SOURCE_CONTINUE

        GLib.timeout_add(500, parent_alive)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(HOST)
    server.set_service(str(args.port))
    try:
        add_mounts(server, args)
    except RuntimeError as exc:
        print(f"testbed_rtsp: {exc}", file=sys.stderr, flush=True)
        return 2
    # attach() binds and listens at once, so READY after it is true; 0 means the bind failed.
    if server.attach(None) == 0:
        print(f"testbed_rtsp: cannot listen on {HOST}:{args.port} (address in use?)", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    quit_on_signals_and_orphaning(loop, args.exit_with_parent)
    urls = " ".join(f"rtsp://{HOST}:{args.port}{m}" for m in args.mount)
    sys.stdout.write(f"READY {urls}\n")
    sys.stdout.flush()
    loop.run()
    # Close client connections so their media pipelines go to NULL before the process exits.
    server.client_filter(lambda *_: GstRtspServer.RTSPFilterResult.REMOVE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
