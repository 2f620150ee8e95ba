"""The decode thread of one camera: read frames, keep the ones the target rate wants, letterbox them,
hand them to the asyncio side through a one-frame slot; reconnect live sources with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from models.letterbox import Letterbox
from workers.redact import redact_text, redact_url
from workers.settings import CameraConfig
from workers.snapshots import picture_due
from workers.sources import Source, SourceError, open_source
from workers.thread_names import worker_thread

log = logging.getLogger(__name__)

END_OF_FILE = "end of file"  # the reason of a file's last stream_down: the normal end, not an error


@dataclass
class CapturedFrame:
    index: int  # position in this camera's decoded stream (keeps counting across reconnects)
    pts: float
    wall: float
    size: tuple[int, int]  # source (height, width)
    image: np.ndarray  # (3, H, W) uint8 letterboxed
    letterbox: Letterbox
    truth: Any = None
    picture: np.ndarray | None = None  # BGR source picture, only on frames a snapshot is due on (workers/snapshots.py)
    # ``wall`` on the monotonic clock, for the frame's age (the budget, the histogram): with the wall clock, an
    # NTP step or a resume from suspend aged every frame in flight by the step, and the budget cut the rate
    mono: float | None = None

    def __post_init__(self) -> None:
        if self.mono is None:  # made right after the decode: the offset between the clocks is today's
            self.mono = time.monotonic() - (time.time() - self.wall)


class FrameSlot:
    """Hand-off between the decode thread and the event loop, and the decode-side counters.

    Live sources: a one-frame slot, newest frame wins; a frame replaced before it was taken is counted in
    ``replaced`` (a drop). Lossless mode (unpaced files): up to ``depth`` frames wait, ``put`` blocks while
    they are all there, so nothing is dropped and decoding runs at the pipeline's pace; the frames waiting
    can go to inference in one call (``take_ready``: a Ray call costs ~1.5 ms of CPU on each side whatever
    it carries, docs/architecture.md "Transport between actors"). A frame decoded after a stop, or left in
    the slot by it, is counted in ``abandoned`` (dropped by the shutdown, not by overload).
    Counters change under one lock, so ``snapshot()`` always adds up:
    decoded = dropped_rate + dropped_budget + replaced + abandoned + taken + pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, lossless: bool = False, depth: int = 1):
        self.loop, self.lossless, self.depth = loop, lossless, max(1, depth)
        self.decoded = self.dropped_rate = self.dropped_budget = self.replaced = self.abandoned = self.taken = 0
        # The source position after the last frame a capture handed over (put or skipped): where the capture
        # replacing it resumes a file. Kept here, under the lock that retires the old capture, so a frame the
        # old one had decoded but not handed over is read again instead of lost.
        self.resume_position = 0
        # Which capture owns the slot: a capture abandoned by the watchdog may wake up later, and its
        # frames (already re-read by its replacement) must neither count nor reach the pipeline.
        self.generation = 0
        self._items: collections.deque[CapturedFrame] = collections.deque()
        self._waiting = 0  # frames decoded and blocked in put() (lossless mode)
        self._closed = False
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        # get() waits on _ready: only then does put() wake the loop (a cross-thread wake-up is a write to the
        # loop's self-pipe and an epoll return; an unpaced file's decoder is mostly ahead of the loop).
        self._awaited = False

    def new_generation(self, resume_position: int | None = None) -> tuple[int, int]:
        """Hands the slot to a new capture; the previous one's puts are refused from now on. Returns the new
        generation and where the new capture starts a file: ``resume_position``, or where the previous capture
        stopped handing frames over when None."""
        with self._cond:
            self.generation += 1
            self._cond.notify_all()  # a retired capture blocked in put() wakes and leaves
            if resume_position is not None:
                self.resume_position = resume_position
            return self.generation, self.resume_position

    def skip(self, generation: int = 0, budget: bool = False, position: int = 0) -> bool:
        """From the decode thread: a decoded frame the rate gate does not want (``budget``: one the camera's
        configured rate wanted, skipped because its frame-age budget lowered the rate). False: retired capture.
        ``position``: the frame's source index + 1 (see resume_position)."""
        with self._cond:
            if generation != self.generation:
                return False
            self.decoded += 1
            self.resume_position = position
            if budget:
                self.dropped_budget += 1
            else:
                self.dropped_rate += 1
            return True

    def put(self, item: CapturedFrame, generation: int = 0, position: int = 0) -> bool:
        """From the decode thread. False when the slot was closed (stop requested) or the capture retired.
        ``position``: the frame's source index + 1 (see resume_position)."""
        with self._cond:
            if generation != self.generation:
                return False
            self.decoded += 1
            if self.lossless:
                self._waiting += 1
                while len(self._items) >= self.depth and not self._closed and generation == self.generation:
                    self._cond.wait(0.5)
                self._waiting -= 1
            if self._closed:
                self.abandoned += 1  # decoded but never analysed: counted as a drop, not lost
                return False
            if generation != self.generation:
                self.replaced += 1
                return False
            if not self.lossless:  # newest wins (also what a camera switched from lossless to live keeps)
                self.replaced += len(self._items)
                self._items.clear()
            self._items.append(item)
            self.resume_position = position
            wake, self._awaited = self._awaited, False
        if wake:
            self.loop.call_soon_threadsafe(self._ready.set)
        return True

    def holds_picture(self) -> bool:
        """Whether the next put() replaces a frame that carries a snapshot's picture (a live slot whose frame was
        not taken yet): the next frame must carry one in its place, or an overloaded camera, most of its frames
        replaced, drew a snapshot only every few due times."""
        with self._cond:
            return not self.lossless and any(item.picture is not None for item in self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # loop already closed: nobody is waiting any more
            pass

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return {"decoded": self.decoded, "dropped_rate": self.dropped_rate, "dropped_budget": self.dropped_budget,
                    "replaced": self.replaced, "abandoned": self.abandoned, "taken": self.taken,
                    "pending": len(self._items) + self._waiting}

    def drop_pending(self) -> int:
        """Counts the frames left in the slot at shutdown as dropped by the shutdown; returns how many."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self.abandoned += n
            self._cond.notify_all()
            return n

    def _take(self) -> CapturedFrame:  # under the lock, with a frame there
        self.taken += 1
        self._cond.notify_all()  # a decoder blocked in put() (lossless) may go on
        return self._items.popleft()

    def take_ready(self) -> CapturedFrame | None:
        """The oldest waiting frame without waiting for one; None when there is none."""
        with self._cond:
            return self._take() if self._items else None

    async def get(self) -> CapturedFrame | None:
        """Next frame (the oldest waiting), or None once closed and empty."""
        while True:
            with self._cond:
                if self._items:
                    return self._take()
                if self._closed:
                    return None
                self._ready.clear()
                self._awaited = True
            await self._ready.wait()


class RateGate:
    """Lets frames through at ``fps`` of stream time (pts), evenly: at 10 fps from a 25 fps source it keeps
    frames 0, 3, 5, 8, 10, ... A gap in the stream (reconnect, pause) restarts the phase instead of bursting.

    Counted in credit (frames' worth of stream time since the last frame let through), not by a due time: the
    budget's gate runs behind the configured one, whose output is unevenly spaced (20 of 25 fps: gaps of 40
    and 80 ms), and a due time missed by 5 ms waited a whole gap for the next frame (16 fps let 10 through)."""

    def __init__(self) -> None:
        self.credit = 0.0
        self.last_pts: float | None = None

    def admit(self, pts: float, fps: float | None) -> bool:
        if not fps:
            self.last_pts = None  # a rate set later starts afresh
            return True
        if self.last_pts is None or pts - self.last_pts > 2.0 / fps or pts < self.last_pts:
            self.credit = 1.0  # the first frame, or after a gap: let it through, no burst of what was missed
        else:
            self.credit = min(3.0, self.credit + (pts - self.last_pts) * fps)  # gaps up to 2 frames add <= 2
        self.last_pts = pts
        if self.credit < 1.0 - 1e-6:
            return False
        self.credit -= 1.0
        return True


def capture_thread_name(camera_id: str, url: str) -> str:
    """A camera's decoder thread is named after it: several cameras can share a process (StreamActor)."""
    return f"capture {camera_id}: {redact_url(url)}"


class Capture:
    """Runs the decode loop of one camera in a daemon thread.

    ``on_event(type, fields)`` is called from that thread (never after the capture was abandoned). A
    replacement capture (``first_index`` > 0) continues the frame numbering; on a source that is not live
    it first skips the frames its predecessor already handed over (fast: unpaced), so nothing is analysed
    twice and nothing it had decoded but not handed over is lost. The frame numbering and the position in
    the file are not the same number: a new URL continues the one and starts the other at 0.
    States: starting, running, reconnecting, then ended (file done), failed (gave up: bad file, bad URL),
    stopped (asked to), or crashed (a bug in this loop: the owner restarts it, see CameraPipeline).
    ``budget_fps`` (settable from another thread at any time) lowers the analysed rate below the camera's
    ``fps`` without restarting anything; None: the configured rate.
    """

    BACKOFF_INITIAL_S = 0.5
    BACKOFF_MAX_S = 15.0

    def __init__(self, camera: CameraConfig, input_size: tuple[int, int], slot: FrameSlot,
                 on_event: Callable[[str, dict], None], first_index: int = 0, first_pts: float = 0.0,
                 resume_at: int | None = None, pts_offset: float = 0.0, resume_after: Any = None):
        """``resume_at``: the source position a file starts at (0: a new source, e.g. the camera's URL
        changed; None: where the capture this one replaces stopped handing frames over); the frame numbering
        and pts continue from ``first_index`` and ``first_pts`` either way. ``pts_offset``: what the resumed
        file's own timestamps are shifted by (the predecessor's). ``resume_after``: the predecessor's
        ``last_stamp`` (None: a new source). ``camera`` may be replaced while running:
        its ``fps`` and ``snapshot`` apply from the next frame, everything else at the next (re)open."""
        self.camera, self.input_size, self.slot, self._on_event = camera, input_size, slot, on_event
        self.generation, position = slot.new_generation(resume_at)
        self.decoded = self.first_index = first_index  # frames read so far (a replacement continues the numbering)
        # frames to skip after opening a file: those its predecessor already handed over. An http(s) URL may be a
        # file (known at the open, which zeroes this for a live source): from 0, the file played again as new frames.
        self.resume_at = position if not camera.is_live or camera.url.lower().startswith(("http:", "https:")) else 0
        # The frame number of the file's first frame (frame number - position, for every frame this capture
        # reads): kept in the status, so a restarted actor resumes a file whose URL changed live at its position.
        self.playback_start = first_index - self.resume_at
        self.pts_offset = pts_offset  # keeps pts increasing across reconnects and new URLs
        self.last_pts = first_pts
        # A live HLS/DASH stream's own time of the last frame handed over (AVSource.last_stamp), its reopening skips up
        # to. A replacement starts from its predecessor's: FFmpeg opens a live playlist ~3 segments back, and a thread
        # the watchdog or a crash replaced had those analysed again (tracks, zone and line events twice).
        self.last_stamp = resume_after
        # time.monotonic() when the last frame came (a replacement gets its predecessor's, set before start()): a live
        # source's stream time goes on by the wall time since then across an outage (_run)
        self.last_frame_mono: float | None = None
        self.heartbeat = time.monotonic()  # last sign of life of the thread, for the stall watchdog
        # The outages this capture said, one per stream_down (their first failure) however many attempts each took: it
        # counted attempts, and one 20 s outage read 6. The owner counts those it says itself (watchdog, crash).
        self.reconnects = 0
        self._closed_skipped = 0  # packets the sources this capture closed skipped (see skipped_packets)
        self._skipped_lock = threading.Lock()  # that and _source change together: a reader never counts one twice
        self.state = "starting"
        # a stream_down went out since the last stream_up: one per outage (see _run). Set before start() for a
        # capture that replaces one whose end was just said (a crash, the watchdog), in the middle of an outage
        self.down_said = False
        self.last_error: str | None = None
        self.last_frame_wall: float | None = None
        self.source_fps: float | None = None
        self.budget_fps: float | None = None
        self.ended_at: float | None = None  # time.monotonic() when the thread finished
        self._in_put = False  # blocked handing a frame to a busy pipeline (lossless): alive, not stalled
        self._stop = threading.Event()
        self._abandoned = False
        self.abandoned_at: float | None = None  # time.monotonic() when abandoned (its owner waits on a blocked one)
        self._thread = threading.Thread(target=self._run, name=capture_thread_name(camera.id, camera.url), daemon=True)
        self._source: Source | None = None
        self._picture_due: float | None = None  # stream time of the next frame that keeps a picture for a snapshot

    @staticmethod
    def _damage(source: Source | None) -> int:
        """A source's packets that failed to decode and were skipped, and pictures it decoded damaged (AVSource's
        corrupt_frames: FFmpeg concealed the loss and the picture is analysed all the same)."""
        return 0 if source is None else source.decode_errors + getattr(source, "corrupt_frames", 0)

    @property
    def skipped_packets(self) -> int:
        """Packets that failed to decode and were skipped (lost RTP packets, a damaged file), and pictures decoded
        damaged (FFmpeg concealed the loss: still analysed), over reconnects."""
        with self._skipped_lock:
            return self._closed_skipped + self._damage(self._source)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_reading()
        self.slot.close()
        self._thread.join(timeout)

    def stop_reading(self) -> None:
        """No frame read from now on is handed over (or counted): what a stop asks of the decoder at once,
        before the pipeline has finished with the frames it already has."""
        self._stop.set()

    def abandon(self) -> None:
        """Tells a stuck thread to exit whenever it wakes, without closing the shared slot."""
        self._abandoned = True
        self.abandoned_at = self.abandoned_at or time.monotonic()
        self._stop.set()

    def silent_for(self) -> float:
        """Seconds since the thread last showed progress (a frame, an open attempt, a retry). Waiting for
        the pipeline to take a frame (lossless sources under a slow model) is progress deferred, not a stall."""
        return 0.0 if self._in_put else time.monotonic() - self.heartbeat

    def on_event(self, type_: str, fields: dict) -> None:
        if not self._abandoned:  # a thread the watchdog gave up on speaks no more
            self._on_event(type_, fields)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        worker_thread(f"hv-cap {self.camera.id}")
        attempt = 0
        up = False  # a stream_up went out, and no stream_down since
        configured, budget = RateGate(), RateGate()  # the camera's fps, then the budget's lower one
        last_pts = self.last_pts
        try:
            while not self._stop.is_set():
                source: Source | None = None
                cam = self.camera
                position = self.resume_at  # the source's index after the last frame handed over (a file's resume)
                # Opening is not a stall: the source answers or fails within its open timeout, and its first picture
                # (a live camera's first keyframe) comes within the read timeout; the watchdog's limit runs after.
                self.heartbeat = time.monotonic() + cam.open_timeout_s
                try:
                    source = open_source(cam.url, transport=cam.transport, open_timeout_s=cam.open_timeout_s,
                                         read_timeout_s=cam.read_timeout_s, realtime=cam.realtime,
                                         loop=cam.loop, hwaccel=cam.hwaccel, untrusted=cam.untrusted)
                    self._source = source
                    source.open()
                    # a camera joined mid-GOP may wait longer for its first key frame while its packets come
                    self.heartbeat = time.monotonic() + getattr(source, "first_picture_wait_s", cam.read_timeout_s)
                    if source.live:  # a camera (or a paced scene) shows what it shows now: skip nothing, only
                        self.resume_at = 0  # continue the numbering (skipping through a paced source takes real time)
                        # but live HLS/DASH reopens a few segments back: it skips what was handed over, by its own
                        # timestamps (analysed again, ~3 segments' tracks and zone and line events came twice)
                        if hasattr(source, "resume_after"):
                            source.resume_after = self.last_stamp
                    self.source_fps = source.nominal_fps
                    # The predecessor's offset is right for the frames we resume at; else continue after last_pts.
                    period = 1 / self.source_fps if self.source_fps else 0.04
                    if not self.resume_at:
                        self.pts_offset = last_pts + period if self.decoded else 0.0
                    # A live camera went on showing while we were away: its first frame now is as far after the last
                    # one in stream time as in wall time (one period on, an outage of 50 s vanished from dwell times
                    # and zone timeouts). A file (looping too) goes on where it was.
                    clock_from = self.last_frame_mono if source.live and cam.is_live else None
                    source.unpaced_until = self.resume_at  # skipping what was handed over takes no real time
                    decoded_at_open = self.decoded
                    while not self._stop.is_set():
                        frame = source.read()
                        self.heartbeat = time.monotonic()
                        if frame is None or self._stop.is_set():
                            break
                        if frame.index < self.resume_at:  # handed over already: by the capture this one replaced,
                            continue  # or before this file's reconnect. Not progress: no stream_up, the backoff grows
                        if not up or self.down_said:  # down_said: the watchdog said its stall an outage (held)
                            # Up with its first picture, not at the open: a source that opened and failed before one
                            # (an mp4 over http from a server without Range, its index at its end) said stream_up and
                            # stream_down at every attempt.
                            self.state = "running"
                            self.on_event("stream_up", {"attempt": attempt} if attempt else {})
                            self.down_said, up = False, True
                        # Only a source that gives frames counts as up again: one that opens and hangs up at
                        # once keeps backing off (and does not flood the events with stream_up/down).
                        attempt = 0
                        self.decoded += 1
                        self.last_frame_wall = time.time()
                        came = time.monotonic() - max(0.0, self.last_frame_wall - frame.wall)  # when it came (wall)
                        if clock_from is not None:  # the first frame after a live source's reconnect
                            # one that went on after the frames handed over (live HLS/DASH) follows them by its own
                            # timestamps: nothing of it was missed, and the outage's wall time is no gap in it
                            resumed = getattr(source, "resumed_s", None)
                            gap = resumed if resumed is not None else max(period, came - clock_from)
                            self.pts_offset = last_pts + gap - frame.pts
                            clock_from = None
                        self.last_frame_mono = came
                        pts = self.pts_offset + frame.pts
                        last_pts = self.last_pts = pts
                        # self.camera read per frame: a live update of fps applies from the next one
                        position = frame.index + 1
                        self.last_stamp = getattr(source, "last_stamp", None)
                        if not configured.admit(pts, self.camera.fps):
                            if not self.slot.skip(self.generation, position=position):
                                return
                            continue
                        if not budget.admit(pts, self.budget_fps):
                            if not self.slot.skip(self.generation, budget=True, position=position):
                                return
                            continue
                        image, lb = frame.to_model_input(self.input_size)
                        item = CapturedFrame(self.decoded - 1, pts, frame.wall, frame.size, image, lb,
                                             getattr(frame, "truth", None))
                        snapshot = self.camera.snapshot  # per frame too: a live change applies at once
                        # the due picture would be replaced unseen: this one keeps it (the slot's lock only where
                        # snapshots are on)
                        if snapshot.enabled and self.slot.holds_picture():
                            self._picture_due = None
                        due, self._picture_due = picture_due(snapshot, pts, self._picture_due)
                        if due:  # at most snapshot.fps pictures a second are kept, never one per frame
                            item.picture = frame.to_picture(snapshot.max_width)
                        self._in_put = True
                        try:
                            if not self.slot.put(item, self.generation, position):
                                return
                        finally:
                            self._in_put = False
                            self.heartbeat = time.monotonic()
                    if self._stop.is_set():
                        return
                    # A file's end, or a synthetic scene's of N frames: pacing makes it a live source, whose end
                    # is otherwise a dropped connection (reconnected, and the same N frames played again, forever).
                    # A live stream that said its end (an HLS playlist's #EXT-X-ENDLIST: AVSource.finished) ends too:
                    # reopened, the finished playlist was a file, its last window played again.
                    finished = getattr(source, "finished", False)
                    if not source.live or not cam.is_live or finished:
                        # A file over http(s) (not live once open: AVSource.open) does not seek back by itself (a
                        # server may not take Range requests): `loop` opens it again, no outage said. Not a pass
                        # without pictures (a resumed pass's skipped ones count): that would open it again and again.
                        if cam.loop and cam.is_live and not finished and (self.decoded > decoded_at_open
                                                                          or self.resume_at):
                            self.resume_at, self.playback_start = 0, self.decoded  # the next pass from its start
                            continue
                        self.state = "ended"
                        self.on_event("stream_down", {"reason": END_OF_FILE})
                        return
                    reason = "end of stream"
                except SourceError as e:
                    reason = redact_text(str(e), [cam.url])
                    self.last_error = reason
                    # A file over http(s) that fails is retried as a camera is (the network may come back)
                    if (source is None or (not source.live and not cam.is_live)
                            or e.kind in ("unsupported", "not_video")):
                        self.state = "failed"
                        self.on_event("stream_down", {"reason": reason, "final": True})
                        return
                    if not source.live:  # a file over http(s) cut short: the next open goes on where this one stopped
                        self.resume_at = position
                finally:
                    if source is not None:
                        source.close()
                    with self._skipped_lock:
                        self._closed_skipped += self._damage(source)
                        self._source = None
                # A live camera that dropped or never answered: back off, then try again, forever.
                attempt, up = attempt + 1, False
                self.state = "reconnecting"
                # attempt grows for as long as the camera stays away: 2 ** attempt past 1023 overflows a float (a
                # camera away ~3 h crashed the thread), and 2 ** 20 is past the cap from any sane initial delay.
                delay = min(self.BACKOFF_MAX_S, self.BACKOFF_INITIAL_S * 2 ** min(attempt - 1, 20))
                delay = random.uniform(delay / 2, delay)  # jitter: cameras behind one switch don't retry in lockstep
                # One stream_down per outage (its first failure), each attempt a stream_reconnecting with its reason:
                # one at every attempt made an alert on it count one 36 s freeze as five outages.
                if not self.down_said:
                    self.reconnects += 1  # before the event: the status it sends counts this outage
                    self.on_event("stream_down", {"reason": reason})
                    self.down_said = True
                self.on_event("stream_reconnecting", {"attempt": attempt, "delay_s": round(delay, 2), "reason": reason})
                # Waiting out the backoff is not a stall: the thread promises its next sign of life by then.
                self.heartbeat = time.monotonic() + delay
                if self._stop.wait(delay):
                    return
                self.heartbeat = time.monotonic()
        except Exception as e:  # a bug here must not kill the camera for good: the owner restarts us
            self.state = "crashed"
            self.last_error = redact_text(f"decoder thread crashed: {type(e).__name__}: {e}", [self.camera.url])
            log.exception("capture of %s crashed", redact_url(self.camera.url))
            self.on_event("stream_down", {"reason": self.last_error})
        finally:
            self.ended_at = time.monotonic()
            if self.state not in ("ended", "failed", "crashed"):
                self.state = "stopped"
            # A crashed capture leaves the slot open for its replacement; so does an abandoned one.
            if self.state != "crashed" and not self._abandoned:
                self.slot.close()
