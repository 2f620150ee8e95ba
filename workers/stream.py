"""One camera, end to end: decode thread -> frame slot (the newest frame; an unpaced file's backlog) ->
inference (bounded in flight; the frames ready at once go in one call) -> boxes back to source pixels ->
trackers -> Redis. ``CameraPipeline`` is plain asyncio that tests run without Ray; ``CameraHost`` gives it
a Publisher and a status loop, and ``StreamActor`` is the thin Ray actor that hosts one or more of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import statistics
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

import ray
import redis

from workers.analytics import CameraAnalytics, track_horizon_s
from workers.analytics_settings import analytics_errors
from workers.budget import FrameAgeBudget
from workers.capture import END_OF_FILE, Capture, CapturedFrame, FrameSlot, capture_thread_name
from workers.frames import FrameRequest, HeadArrays, detection_records, to_detections
from workers.histograms import FRAME_AGE_BUCKETS, Histogram
from workers.inference import CALL_BYTES, TASK_EVENTS, CallMerger, InferenceService, service_call
from workers.motion import MotionGate
from workers.publish import Publisher, WriterThread, entry_order, event_message, keys, records_message
from workers.redact import log_to_stderr, redact_text, redact_url
from workers.settings import CameraConfig, RedisConfig, refused_setting
from workers.snapshots import Snapshotter
from workers.thread_names import worker_thread
from workers.tracking import CameraTracker

log = logging.getLogger(__name__)

# The same inference failure is logged once per this many seconds per camera, with the count of the frames it failed
# meanwhile: a replica restarting failed every frame in flight, a warning each (20 a camera for a 6 s restart).
FAILURE_LOG_S = 5.0

InferFn = Callable[[FrameRequest], Awaitable[dict[str, HeadArrays]]]
InferManyFn = Callable[[list[FrameRequest]], Awaitable[list["dict[str, HeadArrays] | BaseException"]]]


@dataclass(frozen=True)
class Resume:
    """Where a camera's pipeline starts. A restarted StreamActor (after a crash, or on another node after its
    node died) continues this run's frame numbering after the last frame it published, so no (camera, frame)
    is published twice; a file also continues from there. ``stream_mark`` is the id of the last entry of the
    camera's detection stream before this run first published to it: entries after it are this run's."""

    first_index: int = 0
    first_pts: float = 0.0
    stream_mark: str = "0-0"
    # Where a file resumes and the shift of its timestamps: a live URL change starts a new file while the
    # frame numbering goes on, so the file's position is not the frame number (None: it is; a status written
    # before the position was kept).
    position: int | None = None
    pts_offset: float = 0.0
    # track_ended fields of the tracks the previous run had open as its last status said (it crashed, or its
    # process was killed): ended by this start, before any new track.
    open_tracks: tuple[dict, ...] = ()
    # What the camera's status had counted before this pipeline in this service run (its earlier processes and
    # runs: status_base); the status adds its own counts to it (CameraPipeline.status_counts), stats() does not.
    counts: dict = field(default_factory=dict)


# The cumulative counts of a camera's status in Redis besides ``dropped`` (by reason) and ``restarts``;
# skipped_packets: packets that failed to decode (a UDP camera's loss), in /metrics alone until then.
STATUS_COUNTS = ("decoded", "published", "skipped", "reconnects", "skipped_packets")


def status_base(status: dict) -> dict:
    """The counts a new pipeline's status starts from: those of ``status``, the last one its predecessor in this
    service run wrote (or its final counts), with the frames it held then (decoded, no outcome yet: in its slot or
    in flight) as dropped ``lost``, as telemetry counts them; so decoded = published + skipped + sum(dropped) +
    in_slot + in_flight holds in the status too. A count that is no whole number (no version writes one) is 0."""
    def count(v: Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
    base: dict[str, Any] = {k: count(status.get(k)) for k in STATUS_COUNTS}
    dropped = status.get("dropped")
    base["dropped"] = {str(r): count(n) for r, n in dropped.items()} if isinstance(dropped, dict) else {}
    held = base["decoded"] - base["published"] - base["skipped"] - sum(base["dropped"].values())
    if held > 0:
        base["dropped"]["lost"] = base["dropped"].get("lost", 0) + held
    base["restarts"] = count(status.get("restarts"))
    return base


class CameraPipeline:
    """Runs one camera until its source ends or ``stop()``; all per-camera state lives here.

    Counters add up at all times: decoded = published + skipped + sum(dropped) + in_slot + in_flight, where
    skipped counts frames the motion gate kept from inference (nothing moved; not published) and dropped
    counts by reason: rate (target fps), budget (skipped because the frame-age budget lowered the rate),
    overload (a newer frame replaced it), error (inference failed) and shutdown (abandoned by a stop
    without drain).
    """

    def __init__(self, camera: CameraConfig | dict, infer: InferFn | None, model_info: dict, publisher: Publisher,
                 infer_timeout_s: float = 30.0, track_id_base: dict[str, int] | None = None,
                 instance: str | None = None, resume: Resume | None = None, budget_options: dict | None = None,
                 infer_many: InferManyFn | None = None):
        """``infer``: one frame's inference; ``infer_many`` (what a StreamActor passes, ``service_call``): several
        frames of this camera in one call, each frame's result or exception; unset, ``infer`` per frame."""
        self.camera = camera if isinstance(camera, CameraConfig) else CameraConfig.model_validate(camera)
        self.id = self.camera.id
        self.instance = instance  # the service run this camera belongs to, written with its status
        self.infer_many = infer_many or self._each(infer)
        self.publisher = publisher
        self.infer_timeout_s = infer_timeout_s
        self.model_heads: dict[str, list[str]] = model_info["heads"]
        self.heads, self.classes = self._heads_of(self.camera)
        self.input_size = tuple(model_info["input_size"])
        self.tracker: CameraTracker | None = None
        self.track_id_base = track_id_base or {}
        self.resume = resume or Resume()
        self.submitted = self.published = self.dropped_error = 0
        self.shutdown_held = self.shutdown_inflight = 0  # frames abandoned by a stop without drain
        self._holding = 0  # a frame taken from the slot, waiting for a free inference slot
        # (time.monotonic(), ms capture to publish) of the frames published lately: stats()'s latency percentiles
        self.latencies: collections.deque[tuple[float, float]] = collections.deque()
        self.frame_age = Histogram(FRAME_AGE_BUCKETS)  # capture to publish, seconds: hydravision_frame_age_seconds
        self.budget: FrameAgeBudget | None = None  # made once the source's rate is known (max_frame_age_ms set)
        self._budget_since = 0.0  # time.monotonic() of the last reset: only frames captured since feed the budget
        self._rate_probe: tuple[float, int] | None = None  # (when, frames decoded): _base_fps's measured rate
        self._tracker_rate_guessed = False  # the tracker was built on the 25 fps fallback: retimed once measured
        self.budget_options = budget_options or {}  # FrameAgeBudget's timing, for tests
        self._budget_fps: float | None = None  # the analysed rate the budget imposes; None: the configured one
        self._batch_wait_s: float | None = None  # the budget's per-request batch wait; None: the replica's
        # (publish time, capture time) of the last frames published, for the fps in stats().
        self.publish_times: collections.deque[tuple[float, float]] = collections.deque(maxlen=300)
        # (time.monotonic(), frames decoded) at each stats() call, over the last DECODE_WINDOW_S: decode_fps
        self._decode_samples: collections.deque[tuple[float, int]] = collections.deque()
        # (seconds, frames) of the latest intervals between stats() calls in which frames came, with the quiet ones
        # before them but for an outage (quiet for read_timeout_s or more): _base_fps's rate of a source that does
        # not say its own
        self._delivering: collections.deque[tuple[float, int]] = collections.deque(maxlen=30)
        self._quiet_s = 0.0
        self.last_error: str | None = None
        self._failure_said: tuple[str | None, float, int] = (None, 0.0, 0)  # last logged, when, frames since unsaid
        self.watchdog_restarts = self.capture_crashes = self.past_reconnects = self.past_skipped_packets = 0
        self._crash_streak = 0  # crashes since a capture last delivered a frame: the restart's back-off
        self._left_behind: list[Capture] = []  # captures the watchdog abandoned, their threads maybe still blocked
        self._held: Capture | None = None  # the stalled capture the watchdog said it keeps (one said once)
        self.state = "created"
        self.started_at: float | None = None
        self._stopping = False
        self._drain = True
        self._abandoned: asyncio.Future | None = None  # made by run(); done once a stop without drain is asked for
        self._hashes_gone: set[str] = set()  # counts (no zones or lines), snapshot (off): deleted, not every frame
        self._inflight: asyncio.Semaphore | None = None
        self._capture: Capture | None = None
        self._slot: FrameSlot | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Analytics (workers/analytics.py): built on the first frame, which tells the frame size.
        self.analytics: CameraAnalytics | None = None
        self._analytics_for: tuple | None = None  # the (zones, lines) settings it was built from
        # A new URL's first frame number: frames before it (still in the slot or in inference at the update) are
        # the old scene's; from it, tracks and analytics start afresh. None: no new scene pending.
        self._scene_from: int | None = None
        self._tracker_size: tuple[int, int] | None = None  # the frame size (h, w) the tracker's boxes are in
        self._gate_from: int | None = None  # the same for the motion gate (_motion_gate), which sees frames earlier
        self._gate_size: tuple[int, int] | None = None  # the source size (h, w) of the frames the gate compares
        self.gate = MotionGate(self.camera.motion) if self.camera.motion.enabled else None
        self.skipped = 0
        self.snapshots = Snapshotter(self.camera.snapshot)
        self._tracked: list = []  # the last analysed frame's tracked detections, drawn on skipped frames
        self._analysed_frame = -1  # the last analysed frame's number: tracks not seen on it are lost (_undecided)
        self._counts_since = time.time()

    def _heads_of(self, camera: CameraConfig) -> tuple[list[str], dict[str, list[str]]]:
        heads = camera.heads or list(self.model_heads)
        unknown = [h for h in heads if h not in self.model_heads]
        if unknown:
            raise ValueError(f"camera {camera.id!r}: unknown heads {unknown} (the model has {list(self.model_heads)})")
        problems = analytics_errors(camera.zones, camera.lines, camera.heads, self.model_heads)
        if problems:
            raise ValueError(f"camera {camera.id!r}: " + "; ".join(problems))
        return heads, {h: self.model_heads[h] for h in heads}

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> dict:
        self._loop = loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():  # a main thread's name is its process's
            worker_thread("hv-loop")  # the camera process's event loop: tracking, analytics, messages
        self.started_at = time.time()
        self.state = "starting"
        self._slot = FrameSlot(loop, lossless=self.camera.lossless, depth=self.camera.max_inflight)
        self._abandoned = loop.create_future()
        if self._abandoning:
            self._abandoned.set_result(None)
        r = self.resume
        self._capture = Capture(self.camera, self.input_size, self._slot, self._on_capture_event,
                                first_index=r.first_index, first_pts=r.first_pts,
                                resume_at=r.first_index if r.position is None else r.position, pts_offset=r.pts_offset)
        self._capture.budget_fps = self._budget_fps
        if self._stopping:  # stop() came before this first step (a removal right after the start): nothing to read
            self.stop(self._drain)
        for fields in r.open_tracks:  # subscribers that keep open tracks would keep these for ever
            self._event("track_ended", {**fields, "reason": "restart"})
        self._inflight = asyncio.Semaphore(self.camera.max_inflight)
        results: asyncio.Queue = asyncio.Queue()
        finisher = asyncio.create_task(self._finish_loop(results))
        watchdog = asyncio.create_task(self._watchdog())
        self._capture.start()
        self.state = "running"
        try:
            # A drained stop goes on until the slot, closed by the stop, is empty: what was decoded is analysed.
            while not self._abandoning:
                item = await self._slot.get()
                if item is None:
                    break
                gate = self._motion_gate(item)
                if gate is not None and not self._gate_wants(gate, item):
                    self._queue_skipped(item, results)
                    continue
                self._holding = 1
                await self._inflight.acquire()
                if self._abandoning:
                    self._inflight.release()
                    self._holding, self.shutdown_held = 0, self.shutdown_held + 1
                    break
                self._holding = 0
                self._send([(item, True), *await self._ready_frames(item)], results)
        finally:
            watchdog.cancel()
            results.put_nowait(None)
            await finisher
            # In a thread: a decoder inside a blocking open or read holds the join up to its timeout, and
            # the other cameras of this process share this loop.
            await loop.run_in_executor(None, self._capture.stop)
            self._slot.drop_pending()  # a frame still waiting at shutdown counts as dropped, not lost
            if self.tracker:
                for ev in self.tracker.finish():
                    self._event(ev.pop("type"), ev)
            self.state = self._capture.state if self._capture.state in ("ended", "failed") else "stopped"
            self.publish_status()
        return self.stats()

    async def _ready_frames(self, first: CapturedFrame) -> list[tuple[CapturedFrame, bool]]:
        """Frames already decoded that join ``first``'s call while inference slots are free and the call stays
        under CALL_BYTES, each with whether it goes to inference (False: the motion gate skips it; it keeps its
        place in frame order). A lossless camera's backlog travels in one Ray call instead of one per frame
        (a call costs ~1.5 ms of CPU on each side whatever it carries); a live camera rarely has one."""
        assert self._slot is not None and self._inflight is not None
        more: list[tuple[CapturedFrame, bool]] = []
        size = first.image.nbytes
        while not self._inflight.locked() and not self._abandoning and size + first.image.nbytes <= CALL_BYTES:
            item = self._slot.take_ready()
            if item is None:
                break
            gate = self._motion_gate(item)
            wanted = gate is None or self._gate_wants(gate, item)
            if wanted:
                await self._inflight.acquire()  # free (not locked): returns at once; released per frame as ever
                size += item.image.nbytes
            more.append((item, wanted))
        return more

    def _send(self, items: list[tuple[CapturedFrame, bool]], results: asyncio.Queue) -> None:
        """Sends the wanted frames of ``items`` in one inference call; queues every item, in frame order, with
        the call's future and its place in the reply (a skipped frame: no future)."""
        sent = [item for item, wanted in items if wanted]
        requests = [FrameRequest(self.id, i.index, i.pts, i.wall, i.size, i.letterbox, i.image, self.heads,
                                 max_wait_s=self._batch_wait_s) for i in sent]
        self.submitted += len(sent)
        call = asyncio.ensure_future(self._call(requests))
        place = 0
        for item, wanted in items:
            if wanted:
                results.put_nowait((item, call, place))
                place += 1
            else:
                self._queue_skipped(item, results)

    def _queue_skipped(self, item: CapturedFrame, results: asyncio.Queue) -> None:
        """A frame the motion gate kept from inference: an outcome of its own, in frame order behind the frames
        in flight. Queued without its model input, which nothing reads any more: behind a stalled call (a replica
        restarting) every skipped frame's image was held until that call ended, ~0.3 MB a frame."""
        self.skipped += 1
        item.image = None  # type: ignore[assignment]
        results.put_nowait((item, None, 0))

    async def _watchdog(self) -> None:
        """Brings the decoder back whatever stopped it: a thread stuck beyond its own timeouts (e.g. a hung
        DNS lookup inside FFmpeg) is abandoned (one at a time, see below), a thread that crashed on a bug is restarted
        after a backoff. The new capture continues the frame numbering (and, for files, the position)."""
        while True:
            await asyncio.sleep(min(1.0, self.camera.stall_timeout / 4))
            stall_s = self.camera.stall_timeout  # read each time: a live update of the timeouts applies at once
            cap = self._capture
            if cap is None or self._stopping:
                continue
            if self._held is cap and cap.silent_for() <= stall_s:
                self._held = None  # the held decoder came back: a stall of it again is said again
            if cap.alive and cap.silent_for() > stall_s:
                # A thread blocked where no timeout reaches (an open of a path that never answers) holds its fd for
                # as long as it stays blocked, and a new one blocked the same way: one more per stall period, for
                # ever. One at a time: while the one the watchdog abandoned before is still blocked, this one is kept
                # (it may yet return by itself), said once, and restarted once that one has returned. (A thread a
                # live update replaced is not counted: one per update, and the update's new decoder must start.)
                self._left_behind = [c for c in self._left_behind if c.alive]
                if self._left_behind:
                    if self._held is not cap:
                        self._held = cap
                        stuck_s = time.monotonic() - (self._left_behind[-1].abandoned_at or 0.0)
                        self.last_error = (f"decoder made no progress for {cap.silent_for():.0f} s; not restarted "
                                           f"while the decoder thread abandoned {stuck_s:.0f} s ago is still blocked")
                        log.warning("camera %s: %s", self.id, self.last_error)
                        if not cap.down_said:  # an outage all the same (a decoder that had been up, stalled in a
                            # read): said and counted once, as a restart's, and not running; its next frame says up
                            cap.down_said, cap.state = True, "reconnecting"
                            self.past_reconnects += 1
                            self._event("stream_down", {"reason": self.last_error})
                    continue
                self.watchdog_restarts += 1
                reason = f"decoder made no progress for {cap.silent_for():.0f} s; restarted by the watchdog"
                if not cap.down_said:  # one stream_down per outage: not again for a decoder that never came back
                    self.past_reconnects += 1  # the outage the status counts (its restarts are watchdog_restarts)
                    self._event("stream_down", {"reason": reason})
                cap.abandon()
                self._left_behind.append(cap)
            elif not cap.alive and cap.state == "crashed":
                # Crashing again and again (a bug tied to this stream) must not spin: back off like a reconnect, from
                # the start again once a capture delivered frames (by the whole run's count, every crash after the
                # fifth, days apart, waited 15 s).
                if cap.decoded > cap.first_index:
                    self._crash_streak = 0
                delay = min(Capture.BACKOFF_MAX_S, Capture.BACKOFF_INITIAL_S * 2 ** min(self._crash_streak, 5))
                if time.monotonic() - (cap.ended_at or 0.0) < delay:
                    continue
                self.capture_crashes += 1
                self._crash_streak += 1
                reason = f"{cap.last_error}; decoder restarted"
            else:
                continue
            log.warning("camera %s: %s", self.id, reason)
            self.last_error = reason
            self._replace_capture(resume=True, down_said=True)

    def _replace_capture(self, resume: bool, down_said: bool = False) -> int:
        """A fresh decode thread continuing the frame numbering and pts; ``resume``: a file goes on where
        the old thread was (the watchdog), else the (new) source starts at its beginning (a URL change).
        The old thread is abandoned: it exits whenever it wakes, and its frames no longer count. Returns the
        new thread's first frame number."""
        cap = self._capture
        assert cap is not None and self._slot is not None
        cap.abandon()
        # Retired before its count is read: a frame it counted after the read (it was past its stop check) was
        # numbered like the new thread's first, and the slot took it until the new thread's constructor retired it.
        self._slot.new_generation()
        self.past_reconnects += cap.reconnects
        self.past_skipped_packets += cap.skipped_packets
        self._slot.lossless = self.camera.lossless
        first = cap.decoded
        self._capture = Capture(self.camera, self.input_size, self._slot, self._on_capture_event,
                                first_index=first, first_pts=cap.last_pts, resume_at=None if resume else 0,
                                pts_offset=cap.pts_offset, resume_after=cap.last_stamp if resume else None)
        self._capture.budget_fps = self._budget_fps
        self._capture.down_said = down_said  # its predecessor's end was said: the outage goes on, not a new one
        self._capture.last_frame_mono = cap.last_frame_mono  # a live camera's stream time goes on by the wall clock
        self._capture.start()
        return first

    # Fields whose change needs a new decode thread (at the next open): the source and how it is read.
    # fps is read by the running thread per frame; heads and tracker only concern this side.
    CAPTURE_FIELDS = ("url", "transport", "open_timeout_s", "read_timeout_s", "realtime", "loop",
                      "stall_timeout_s", "hwaccel")

    def update(self, camera: CameraConfig) -> list[str]:
        """Applies a changed config of this camera while it runs (called on the event loop, which owns the
        state); returns the fields that changed. Heads apply from the next frame sent to inference (frames
        already there finish with the heads they were sent with); a dropped head's tracks end. A new URL
        ends every track and restarts only the decoder, and zones and lines start empty from the new source's
        first frame (another scene, as after a change of frame size); fps applies from the next decoded frame."""
        old = self.camera
        if camera.id != old.id:
            raise ValueError(f"camera id cannot change ({old.id!r} -> {camera.id!r})")
        if camera.max_inflight != old.max_inflight:
            raise ValueError("max_inflight cannot change while the camera runs: remove and add it again")
        heads, classes = self._heads_of(camera)  # raises before anything changed
        changed = [f for f in CameraConfig.model_fields if getattr(camera, f) != getattr(old, f)]
        self.camera = camera
        ended: list[dict] = []
        if self.tracker is not None and ("url" in changed or "tracker" in changed or not camera.tracker.enabled):
            ended = self._end_tracker()  # another scene, or other tracker settings
        elif self.tracker is not None and heads != self.heads:
            ended = self.tracker.set_heads(heads)
        if heads != self.heads and self.analytics is not None:  # zones and lines count per head
            self.analytics = self.analytics.with_heads(classes)
        self.heads, self.classes = heads, classes
        for ev in ended:
            self._event(ev.pop("type"), ev)
        if any(f in changed for f in self.BUDGET_FIELDS) or self._counts(camera) != self._counts(old):
            self._reset_budget()
        if self._capture is not None:
            if any(f in changed for f in self.CAPTURE_FIELDS):
                first = self._replace_capture(resume="url" not in changed)
                if "url" in changed:
                    self._scene_from = self._gate_from = first
            else:
                self._capture.camera = camera  # fps: from the next frame
        if "url" in changed:  # the old URL's error (its address in it) is not the new one's: a healthy camera showed it
            self.last_error = None
        if changed:
            self.publish_status()
        return changed

    # Fields the frame-age budget was sized from: a change starts it afresh from the new configuration (as does
    # a change between having lines or zones and having none: its floor, _counts).
    BUDGET_FIELDS = ("url", "fps", "max_frame_age_ms")

    @staticmethod
    def _counts(camera: CameraConfig) -> bool:
        """Whether the camera counts (lines or zones): the frame-age budget keeps the rate counting needs."""
        return bool(camera.lines or camera.zones)

    def _reset_budget(self) -> None:
        """Drops the budget's state and what it imposed (rate, batch wait); the next published frame makes
        a new one from the camera's config if it still has ``max_frame_age_ms``."""
        self.budget, self._budget_fps, self._batch_wait_s = None, None, None
        self._budget_since, self._rate_probe = time.monotonic(), None
        self._delivering.clear()
        self._quiet_s = 0.0
        if self._capture is not None:
            self._capture.budget_fps = None
        self._retime_tracker()  # also what a change of fps itself needs

    def open_tracks(self) -> int:
        return self.tracker.open_tracks() if self.tracker else 0

    @property
    def source_ended(self) -> bool:
        """The source ended or failed for good: the run is finishing (its slot is closed), whatever an update does."""
        return self._capture is not None and self._capture.state in ("ended", "failed")

    @property
    def _abandoning(self) -> bool:
        """Stopped without drain: frames not yet published are dropped (counted as shutdown)."""
        return self._stopping and not self._drain

    def stop(self, drain: bool = True) -> None:
        """Stops reading; with ``drain`` the frames already decoded (in inference, or waiting for it) are still
        analysed, tracked and published."""
        self._stopping, self._drain = True, drain
        if not drain and self._abandoned is not None and not self._abandoned.done():
            self._abandoned.set_result(None)
        if self._capture:
            self._capture.stop_reading()
        if self._slot:
            self._slot.close()

    @staticmethod
    def _each(infer: InferFn | None) -> InferManyFn:
        async def each(requests: list[FrameRequest]) -> list:
            assert infer is not None, "CameraPipeline needs infer or infer_many to run"
            return await asyncio.gather(*(infer(r) for r in requests), return_exceptions=True)
        return each

    async def _call(self, requests: list[FrameRequest]) -> list[dict[str, HeadArrays] | BaseException]:
        for request in requests:
            request.timeout_s = self.infer_timeout_s  # inference drops the request unserved once we stop waiting
        return await asyncio.wait_for(self.infer_many(requests), self.infer_timeout_s)

    # -- results, in frame order ---------------------------------------------------------------
    async def _finish_loop(self, results: asyncio.Queue) -> None:
        while True:
            entry = await results.get()
            if entry is None:
                return
            item, fut, place = entry
            if fut is None:
                try:
                    self._skipped_frame(item)
                except Exception as e:  # a bug in analytics or snapshots: report it, never end the finisher
                    self.last_error = redact_text(f"skipped frame: {type(e).__name__}: {e}", [self.camera.url])
                    log.exception("camera %s frame %d: handling a skipped frame failed", self.id, item.index)
                continue
            if not fut.done():  # a stop without drain ends this wait too: it waits for no inference
                await asyncio.wait((fut, self._abandoned), return_when=asyncio.FIRST_COMPLETED)
            if not fut.done():
                fut.add_done_callback(_seen)
                assert self._inflight is not None
                self._inflight.release()
                self.shutdown_inflight += 1
                continue
            try:
                arrays = fut.result()[place]  # done: a call cancelled under it (a CallMerger's) raises CancelledError
                if isinstance(arrays, Exception):  # this frame failed, not the whole call
                    raise arrays
                if isinstance(arrays, BaseException):  # e.g. its request was cancelled: a failure of this frame
                    raise RuntimeError(f"inference ended without a result: {type(arrays).__name__}")
            # CancelledError too: it is the call's (nothing is awaited here), and ending this loop froze the camera
            except (Exception, asyncio.CancelledError) as e:  # inference failed or timed out: count it, go on
                self.dropped_error += 1
                if self.gate is not None:  # its change was never analysed: no frame may be skipped against it
                    self.gate.failed(item.pts)
                why = refused_setting(e)  # a replica that refused to start: its reason, not Ray's traceback
                why = f"inference replica could not start: {why}" if why else f"{type(e).__name__}: {e}"
                self.last_error = redact_text(f"inference failed: {why}", [self.camera.url])
                self._say_failure(item.index)
                continue
            finally:
                assert self._inflight is not None
                self._inflight.release()
            if self._abandoning:
                self.shutdown_inflight += 1
                continue
            published = self.published
            try:
                self._publish_frame(item, arrays)
            except Exception as e:  # a bug in tracking, analytics or publishing: report it, never freeze the camera
                sent = self.published != published  # it went out: only what follows publishing failed
                if not sent:
                    self.dropped_error += 1
                what = "after publishing" if sent else "publishing failed"
                self.last_error = redact_text(f"{what}: {type(e).__name__}: {e}", [self.camera.url])
                log.exception("camera %s frame %d: %s", self.id, item.index, what)

    def _say_failure(self, index: int) -> None:
        """Logs last_error, an inference failure, unless the same was logged less than FAILURE_LOG_S ago."""
        said, at, unsaid = self._failure_said
        now = time.monotonic()
        if said == self.last_error and now - at < FAILURE_LOG_S:
            self._failure_said = (said, at, unsaid + 1)
            return
        more = f" ({unsaid} more frame(s) failed so since the last such line)" if unsaid and said == self.last_error \
            else ""
        log.warning("camera %s frame %d: %s%s", self.id, index, self.last_error, more)
        self._failure_said = (self.last_error, now, 0)

    def _publish_frame(self, item: CapturedFrame, arrays: dict[str, HeadArrays]) -> None:
        tracks_changed = False  # a track started or ended: the status goes out with this frame (below)
        if self._scene_from is not None and item.index >= self._scene_from:
            self._new_scene()
            tracks_changed = True
        if self.tracker is not None and item.size != self._tracker_size:
            # Another frame size on the same URL (a camera switching resolution, an RTSP stream renegotiating):
            # the tracks' boxes are the old size's pixels, and ByteTrack matched them across the change by IoU.
            for ev in self._end_tracker():
                self._event(ev.pop("type"), ev)
            tracks_changed = True
        self._tracker_size = item.size
        if self.camera.tracker.enabled and self.tracker is None:
            self.tracker = CameraTracker(self.heads, self.camera.tracker, self._analysed_fps(), self.track_id_base)
            self._tracker_rate_guessed = self._budget_fps is None and self._base_fps() is None
        elif self._tracker_rate_guessed and (self._budget_fps is not None or self._base_fps() is not None):
            # A source that says no rate and no fps configured: the tracker counted a lost track's life at 25 fps
            # (a 5 fps camera kept them 5 times too long) until the rate was measured, and without a frame-age
            # budget nothing else told it.
            self._tracker_rate_guessed = False
            self._retime_tracker()
        records: list[dict] = []
        analytics = self._current_analytics(item)
        tracked = []
        # The heads asked for now that ran on this frame (it may have been sent before an update of heads).
        ran = [h for h in self.heads if h in arrays]
        for head in ran:
            det = to_detections(arrays[head], item.letterbox, self.classes[head])
            ids = None
            if self.tracker is not None:
                det, events = self.tracker.update(head, det, item.index, item.pts)
                ids = det.tracker_id
                for ev in events:  # a track's end too: else a crash before the next status ended it twice
                    tracks_changed = True
                    self._event(ev.pop("type"), ev)
                if analytics:
                    for ev in analytics.update(head, det, item.index, item.pts):
                        self._event(ev.pop("type"), ev)
            tracked.append(det)
            records += detection_records(head, det, ids)
        if tracks_changed:
            # Persist the next free ids and the open tracks before this frame's message (same Redis round trip), so
            # a restarted camera never hands out an id consumers have already seen nor ends a track twice; once a
            # frame, however many tracks began or ended.
            self.publish_status()
        now = time.time()
        latency_ms = (now - item.wall) * 1000
        h, w = item.size
        msg = records_message(self.id, item.index, item.pts, item.wall, latency_ms, (w, h), records, ran)
        self.publisher.publish_detections(msg)
        self.published += 1
        self.publish_times.append((now, item.wall))
        self._tracked, self._analysed_frame = tracked, item.index
        self._after_analytics(item, analytics)
        mono = time.monotonic()
        self._keep_latency(latency_ms, mono)
        age_s = max(0.0, mono - item.mono)  # not the wall clock's: a step of it is no age (CapturedFrame.mono)
        self.frame_age.observe(age_s)
        if self.camera.max_frame_age_ms is not None:
            self._keep_budget(age_s, mono)

    def _end_tracker(self) -> list[dict]:
        """Ends every track (their track_ended events, returned); the next tracker continues the numbering."""
        assert self.tracker is not None
        ended, self.track_id_base, self.tracker = self.tracker.finish(), self.tracker.next_ids(), None
        return ended

    def _new_scene(self) -> None:
        """The first frame of a new URL's source. Its zones and lines start empty (their occupants and the
        lines' track sides were the old scene's: an occupant "left" seconds later with a bogus dwell, or a new
        object standing where it stood took it over), without events and with a new ``since``, as after a change
        of frame size. Tracks that the old scene's last frames started since the update end here: an object of
        the old scene must not go on as one of the new."""
        self._scene_from = None
        if self.tracker is not None:
            for ev in self._end_tracker():
                self._event(ev.pop("type"), ev)
        if self.analytics is not None:
            self.analytics, self._counts_since = None, time.time()
        self._tracked = []  # the old scene's boxes: a skipped frame's snapshot drew them on the new scene

    # -- the frame-age budget (workers/budget.py decides, this applies) -------------------------
    def _base_fps(self) -> float | None:
        """The analysed rate the budget starts from: the configured fps, capped by what the source delivers."""
        known = [f for f in (self.camera.fps, self._capture.source_fps if self._capture else None) if f]
        seconds, frames = sum(dt for dt, _ in self._delivering), sum(n for _, n in self._delivering)
        if not known and seconds >= 2.0 and frames >= 10:  # a source that does not say its rate, while it delivers:
            # since its first frame (below), an hour's outage read as a rate near 0, and a tracker retimed then
            # ended lost tracks far too early
            known = [frames / seconds]
        elif not known and self._slot:  # a source that does not say its rate: what it has delivered since its
            # first frame was published (counted from the start, the seconds of opening the source made a
            # 25 fps stream read as a few fps)
            decoded, now = self._slot.snapshot()["decoded"], time.monotonic()
            if self._rate_probe is None:
                self._rate_probe = (now, decoded)
            since, before = self._rate_probe
            known = [(decoded - before) / (now - since)] if decoded - before >= 10 and now > since else []
        return min(known) if known else None

    def _analysed_fps(self) -> float:
        """The rate frames reach the tracker now: the budget's, else the configured one capped by the source's."""
        return self._budget_fps or self._base_fps() or 25.0

    def _retime_tracker(self) -> None:
        """Tells the tracker a new analysed rate: it counts a lost track's life in frames."""
        if self.tracker is not None:
            # On the 25 fps fallback (a source that says no rate, its measurement dropped by _reset_budget): retimed
            # again once measured (_publish_frame), else a 5 fps camera's lost tracks lived 5 times too long for good
            self._tracker_rate_guessed = self._budget_fps is None and self._base_fps() is None
            self.tracker.set_frame_rate(self._analysed_fps())

    def _keep_budget(self, age_s: float, now: float) -> None:
        """Feeds a published frame's age to the budget and applies its decision: the capture's rate gate (no
        restart: the decoder keeps reading every frame) and the batch wait of this camera's next requests.
        ``now`` is time.monotonic(): cameras on one host then decide at the same instants (see FrameAgeBudget),
        and a step of the wall clock (NTP) does not stop the budget for as long as the step."""
        assert self.camera.max_frame_age_ms is not None
        if now - age_s < self._budget_since:  # sent under the settings before a live update: the new budget would
            return  # cut on them at once (a spurious budget_exceeded half a second after the update)
        if self.budget is None:
            base = self._base_fps()
            if base is None:
                return
            # a camera with lines or zones keeps the rate they need to count (workers/budget.py: COUNTING_MIN_FPS)
            self.budget = FrameAgeBudget(self.camera.max_frame_age_ms / 1000, base, counts=self._counts(self.camera),
                                         **self.budget_options)
        self.budget.observe(age_s, now)
        action = self.budget.decide(now)
        if action is None:
            return
        self._batch_wait_s = action.batch_wait_s
        self._budget_fps = None if action.fps >= self.budget.base_fps else action.fps
        if self._capture is not None:
            self._capture.budget_fps = self._budget_fps
        self._retime_tracker()
        log.info("camera %s: frame-age budget %s (p95 %.0f ms, budget %.0f ms): analysing %.2f fps, batch wait %s",
                 self.id, action.action, action.p95_s * 1000, self.budget.budget_s * 1000, action.fps,
                 "replica's" if action.batch_wait_s is None else f"{action.batch_wait_s * 1000:.0f} ms")
        if action.event:
            self._event(action.event, action.event_fields(self.budget.budget_s, self.camera.fps))

    # -- analytics: zones and lines, counts, snapshots (workers/analytics.py, workers/snapshots.py) ----------
    def _current_analytics(self, item: CapturedFrame) -> CameraAnalytics | None:
        """The camera's zones and lines for this frame's size: built on the first frame, rebuilt (keeping the
        state of unchanged zones and lines) when the settings change, anew when the frame size does."""
        if not self.camera.tracker.enabled or not (self.camera.zones or self.camera.lines):
            if self.analytics is not None:  # its last zones went live: their occupants leave, as a removed zone's do
                for ev in self.analytics.ended(item.index, item.pts):
                    self._event(ev.pop("type"), ev)
            self._drop_hash(self.publisher.keys.counts(self.id))
            self.analytics = None
            return None
        h, w = item.size
        prev, want = self._analytics_for, (self.camera.zones, self.camera.lines)
        same_size = self.analytics is not None and self.analytics.size == (w, h)
        # Identity, not equality, of the lists: cheap per frame, and a live change assigns new ones.
        if not same_size or prev[0] is not want[0] or prev[1] is not want[1]:  # (none yet: not same_size)
            if same_size:
                self.analytics = self.analytics.reconfigured(self.camera.zones, self.camera.lines)
            else:
                # Counts from 0, which `since` tells consumers, as after a restart: another size (a new URL, a camera
                # reconfigured), and zones or lines set live on a camera that had none (first, or again)
                self._counts_since = time.time()
                self.analytics = CameraAnalytics(self.camera.zones, self.camera.lines, self.classes, (w, h))
            self._analytics_for = want
            for reason in self.analytics.errors.values():  # pixel points outside the real frame
                self.last_error = reason
                log.warning("camera %s: %s", self.id, reason)
                self._event("analytics_error", {"reason": reason})
        self.analytics.set_horizon(track_horizon_s(self.camera.tracker))  # a track it may give back is remembered
        return self.analytics

    def _motion_gate(self, item: CapturedFrame) -> MotionGate | None:
        """The gate for the camera's current motion settings (a live change replaces ``self.camera``), and a fresh
        one from a new URL's first frame: compared with the old source's last frame, the same view (the camera by
        another path) read as still and went unanalysed for up to max_skip_s, after the change ended every track."""
        if self._gate_from is not None and item.index >= self._gate_from:
            self._gate_from, self.gate = None, None
        if item.size != self._gate_size:  # another source size: its letterboxed input can look the same (same
            # aspect), and the first frames at the new size went unanalysed for max_skip_s behind old-size tracks
            self._gate_size, self.gate = item.size, None
        if self.gate is None or self.gate.settings is not self.camera.motion:
            self.gate = MotionGate(self.camera.motion) if self.camera.motion.enabled else None
        return self.gate

    def _gate_wants(self, gate: MotionGate, item: CapturedFrame) -> bool:
        """Whether the motion gate lets the frame go to inference: always while something is undecided."""
        return gate.force(item.image, item.pts) if self._undecided() else gate.wants(item.image, item.pts)

    def _undecided(self) -> bool:
        """The last analysed frame left an object for the next analysed frames to decide: a lost track not yet
        ended, a new one not yet confirmed (the tracker keeps such a track only while it is seen), a zone occupant
        not yet left or an object inside not yet entered, a crossing not yet counted (CameraAnalytics.undecided).
        The motion gate lets frames through until then: the
        tracker and the zones do not see a skipped frame, so an object that left a still scene left its zone
        max_skip_s late and its track (its lost-track budget counted in analysed frames) ended many max_skip_s
        late, and one that appeared and stood still (lights on) started and entered max_skip_s late."""
        return bool(self.analytics and self.analytics.undecided()) or (
            self.tracker is not None and self.tracker.undecided(self._analysed_frame))

    def _after_analytics(self, item: CapturedFrame, analytics: CameraAnalytics | None) -> None:
        if analytics:
            counts = {"v": 1, "frame": item.index, "pts": round(item.pts, 3), "ts": round(item.wall, 3),
                      "since": round(self._counts_since, 3), **analytics.counts()}
            self._set_hash(self.publisher.keys.counts(self.id), counts)
        if not self.camera.snapshot.enabled:
            self._drop_hash(self.publisher.keys.snapshot(self.id))
        if item.picture is not None:
            if self.snapshots.settings is not self.camera.snapshot:
                self.snapshots = Snapshotter(self.camera.snapshot)
            h, w = item.size
            snap = self.snapshots.render(item.picture, (w, h), self._tracked, analytics, item.index, item.pts,
                                         item.wall)
            item.picture = None
            if snap is not None:
                self._set_hash(self.publisher.keys.snapshot(self.id), snap)

    def _set_hash(self, key: str, fields: dict) -> None:
        self.publisher.set_hash(key, fields)
        self._hashes_gone.discard(key)

    def _drop_hash(self, key: str) -> None:
        """Deletes a hash this camera no longer writes (counts without zones or lines, its snapshot switched off),
        once: an earlier run's or setting's would be read as current forever (the dashboard showed the last
        picture as the camera's view for as long as it ran)."""
        if key not in self._hashes_gone:
            self.publisher.set_hash(key, {})
            self._hashes_gone.add(key)

    def _skipped_frame(self, item: CapturedFrame) -> None:
        """A frame the motion gate kept from inference: nothing moved, so tracks and occupants stay as they
        were (the tracker does not see the frame, see workers/motion.py) and a due snapshot shows them. A new
        URL's frame skipped before any of its frames was analysed starts its scene: the old one's state is not its."""
        if self._scene_from is not None and item.index >= self._scene_from:
            self._new_scene()
        if self.analytics:
            self.analytics.hold(item.pts)
        if self.budget is not None:
            self.budget.alive(time.monotonic())  # the budget's clock (_keep_budget)
        if item.picture is not None:
            self._after_analytics(item, self.analytics)

    # -- events, status, stats -----------------------------------------------------------------
    def _event(self, type_: str, fields: dict) -> None:
        self.publisher.publish_event(event_message(type_, self.id, **fields))

    def _on_capture_event(self, type_: str, fields: dict) -> None:
        """Called from the decode thread. The event goes out at once (the publisher is thread-safe, and this
        keeps the thread's events in order); everything that reads pipeline state runs on the event loop,
        which owns it (stats() iterating deques the loop appends to once killed the decode thread)."""
        self._event(type_, dict(fields))
        try:
            assert self._loop is not None
            reason = fields.get("reason")
            self._loop.call_soon_threadsafe(self._after_capture_event, None if reason == END_OF_FILE else reason)
        except RuntimeError:  # the loop is closed: the camera is gone, nobody reads its status any more
            pass

    def _after_capture_event(self, reason: str | None) -> None:
        if reason:
            self.last_error = reason
        self.publish_status()

    STATUS_FIELDS = ("state", "url", "heads", "fps", "decode_fps", "latency_ms_p50", "latency_ms_p95", "decoded",
                     "published", "skipped", "dropped", "reconnects", "last_frame_ts", "last_error", "track_ids_next",
                     "redis_error", "redis_failing_since")

    def _analytics_stats(self) -> dict:
        a = self.analytics
        return {"zones": sorted(a.zones) if a else [], "lines": sorted(a.lines) if a else [],
                "motion": self.gate.stats() if self.gate else None, "snapshots": self.snapshots.stats()}

    redis_clock: "RedisClock | None" = None  # what heartbeats are timed by (CameraHost sets it); None: time.time()

    def publish_status(self) -> None:
        """The camera's entry in {prefix}:cameras. ``heartbeat_ts`` and ``instance`` let readers tell a live
        entry from one left behind by a service that died (see pipeline/status.py)."""
        s = self.stats()
        status = {k: s[k] for k in self.STATUS_FIELDS}
        status.update(self.status_counts(s))
        beat = self.redis_clock.now() if self.redis_clock else time.time()
        status.update(heartbeat_ts=round(beat, 3), instance=self.instance, stream_mark=self.resume.stream_mark)
        if cap := self._capture:  # where a restarted actor resumes the file (resume_point)
            status["playback"] = {"start": cap.playback_start, "pts_offset": cap.pts_offset}
        # The tracks a restart after a crash ends (Resume.open_tracks); written with the status that goes out every
        # second and on every frame a track starts or ends, so a track is in it from its first frame to its last.
        status["tracks_open"] = self.tracker.open_rows() if self.tracker else {}
        # the dashboard's placeholder says "snapshots off" by it, not "no snapshot yet" for ever (a live switch too)
        status["snapshot_enabled"] = self.camera.snapshot.enabled
        self.publisher.set_status(self.id, status)

    def status_counts(self, s: dict | None = None) -> dict:
        """The status's cumulative counts (STATUS_COUNTS, dropped, restarts): this pipeline's (``s``: its stats())
        added to what this service run's earlier processes and runs of the camera had counted (Resume.counts), so
        that readers of the status (`hydravision status`, the dashboard) see the whole run's, as the final table
        does: a restarted process's said "published 1535" beside the table's 2010. stats() stays this pipeline's
        own: the controller's telemetry folds those per process and run (adding the base there counted it twice)."""
        s = self.stats() if s is None else s
        base = self.resume.counts
        dropped = dict(s["dropped"])
        for reason, n in base.get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + n
        return {**{k: s[k] + base.get(k, 0) for k in STATUS_COUNTS}, "dropped": dropped,
                "restarts": base.get("restarts", 0)}

    DECODE_WINDOW_S = 5.0  # decode_fps is the rate over about this long, like fps
    # fps is the rate of the frames published in the last FPS_WINDOW_S. Fewer than FPS_MIN_SAMPLES in it (a camera
    # analysed below about 0.5 fps, which read 0.0 there, as a stalled one does): the rate over the last that many
    # published within FPS_MAX_AGE_S, as the latency's. One that published nothing for FPS_WINDOW_S and twice its
    # usual gap has stopped, and reads 0 (at most FPS_MAX_AGE_S after its last frame).
    FPS_WINDOW_S, FPS_MIN_SAMPLES, FPS_MAX_AGE_S = 5.0, 3, 30.0
    # The latency percentiles are those of the frames published in the last LATENCY_WINDOW_S, like fps: over the
    # last 300 frames they were 2 minutes old at the budget's 2.5 fps floor (a p95 of 2770 ms said for over a
    # minute after an overload had ended, every frame since <= 250 ms). Fewer frames than LATENCY_MIN_SAMPLES in
    # it (a camera analysing 1 or 2 fps): the latest that many published within LATENCY_MAX_AGE_S.
    LATENCY_WINDOW_S, LATENCY_MIN_SAMPLES, LATENCY_MAX_AGE_S = 5.0, 10, 30.0

    def _keep_latency(self, latency_ms: float, mono: float) -> None:
        """A published frame's latency (capture to publish), kept as long as _latency_percentiles may use it."""
        samples = self.latencies
        samples.append((mono, latency_ms))
        while len(samples) > self.LATENCY_MIN_SAMPLES and samples[0][0] < mono - self.LATENCY_WINDOW_S:
            samples.popleft()

    def _latency_percentiles(self, mono: float) -> list[float] | None:
        """p50 and p95 of recent latencies (see LATENCY_WINDOW_S); with 10 frames the p95 lies between the two
        slowest. None: no frame published in the last LATENCY_MAX_AGE_S (a stalled or ended camera, whose fps reads
        0 too)."""
        recent = [ms for t, ms in self.latencies if t >= mono - self.LATENCY_WINDOW_S]
        if len(recent) < self.LATENCY_MIN_SAMPLES:
            latest = list(self.latencies)[-self.LATENCY_MIN_SAMPLES:]
            recent = [ms for t, ms in latest if t >= mono - self.LATENCY_MAX_AGE_S]
        if len(recent) < 2:  # statistics.quantiles wants two
            return [recent[0]] * 2 if recent else None
        # A status goes out every second and on every frame a track starts or ends: np.percentile was ~35% of its
        # CPU under cProfile; the stdlib's "inclusive" method is numpy's default (linear) at a third of its CPU on a
        # few hundred floats (benchmarks/README.md, round 17)
        cuts = statistics.quantiles(recent, n=20, method="inclusive")
        return [cuts[9], cuts[18]]

    def _decode_fps(self, decoded: int, now: float) -> float:
        """Frames decoded a second lately, not since the start: a camera up an hour that then stopped sending
        showed half its old rate an hour later. Until the samples span a second, the rate since the start."""
        mono, samples = time.monotonic(), self._decode_samples
        if samples and mono > samples[-1][0]:
            dt, frames = mono - samples[-1][0], decoded - samples[-1][1]
            if frames <= 0:
                self._quiet_s += dt
            else:  # a slow camera's quiet seconds between frames count; an outage's do not
                quiet = self._quiet_s if self._quiet_s < self.camera.read_timeout_s else 0.0
                self._delivering.append((dt + quiet, frames))
                self._quiet_s = 0.0
        samples.append((mono, decoded))
        while len(samples) > 2 and mono - samples[1][0] >= self.DECODE_WINDOW_S:
            samples.popleft()
        since, before = samples[0]
        if mono - since >= 1.0:
            return max(0, decoded - before) / (mono - since)
        return decoded / max(1e-6, now - self.started_at) if self.started_at else 0.0

    def stats(self) -> dict[str, Any]:
        cap, slot = self._capture, self._slot
        now = time.time()
        # Frames published lately (FPS_WINDOW_S), over the span of their capture times: the publish times of one
        # batch are all but equal, so the first two frames published would have shown a rate far too high.
        # The span runs on to now, as decode_fps's window does, by however long the camera is overdue (its longest
        # gap between publishes lately counts as usual): ending at its last frame, a camera that stalled read its old
        # rate for 5 s, then 0, and a final table "fps 10.0, decode fps 0.3". A steady camera reads as before.
        recent = [(t, wall) for t, wall in self.publish_times if now - t <= self.FPS_WINDOW_S]
        if len(recent) < self.FPS_MIN_SAMPLES:
            latest = list(self.publish_times)[-self.FPS_MIN_SAMPLES:]
            recent = [(t, wall) for t, wall in latest if now - t <= self.FPS_MAX_AGE_S]
        fps = 0.0
        if len(recent) > 1:
            usual = max(b[0] - a[0] for a, b in zip(recent, recent[1:]))
            quiet = now - recent[-1][0]
            span = recent[-1][1] - recent[0][1] + max(0.0, quiet - usual)
            if quiet <= max(self.FPS_WINDOW_S, 2 * usual) and span > 0:
                fps = (len(recent) - 1) / span
        lat = self._latency_percentiles(time.monotonic())
        state = self.state
        if cap is not None and state == "running" and cap.state in ("reconnecting", "starting", "failed", "crashed"):
            state = "reconnecting" if cap.state == "crashed" else cap.state
        snap = slot.snapshot() if slot else {"decoded": 0, "dropped_rate": 0, "dropped_budget": 0, "replaced": 0,
                                             "abandoned": 0, "pending": 0}
        dropped = {"rate": snap["dropped_rate"], "budget": snap["dropped_budget"], "overload": snap["replaced"],
                   "error": self.dropped_error,
                   "shutdown": self.shutdown_held + self.shutdown_inflight + snap["abandoned"]}
        decoded = snap["decoded"]
        pub = self.publisher.stats()
        return {
            "camera": self.id, "url": redact_url(self.camera.url), "state": state, "heads": self.heads,
            "decoded": decoded, "submitted": self.submitted, "published": self.published, "dropped": dropped,
            "in_slot": snap["pending"] + self._holding,
            "in_flight": self.submitted - self.published - self.dropped_error - self.shutdown_inflight,
            "skipped": self.skipped,
            "analytics": self._analytics_stats(),
            "fps": round(fps, 2), "decode_fps": round(self._decode_fps(decoded, now), 2),
            "latency_ms_p50": round(lat[0], 1) if lat is not None else None,
            "latency_ms_p95": round(lat[1], 1) if lat is not None else None,
            # the watchdog's outages are in past_reconnects (_watchdog): its restarts within one outage are not more
            "reconnects": (cap.reconnects if cap else 0) + self.past_reconnects + self.capture_crashes,
            "watchdog_restarts": self.watchdog_restarts, "capture_crashes": self.capture_crashes,
            # packets that failed to decode and were skipped: a UDP camera's packet loss shows here, nowhere else
            "skipped_packets": (cap.skipped_packets if cap else 0) + self.past_skipped_packets,
            "last_frame_ts": cap.last_frame_wall if cap else None,
            "last_error": self.last_error,
            "track_ids_next": self.tracker.next_ids() if self.tracker else dict(self.track_id_base),
            "appearance": self.tracker.appearance_stats() if self.tracker else {},
            # Why messages are not reaching Redis right now (out of memory, unreachable, ...), else None.
            "redis_error": pub.get("last_error") if pub.get("failing") else None,
            "redis_failing_since": pub.get("failing_since"),
            # For metrics (pipeline/metrics.py): the age histogram, the rate now analysed (None: every frame)
            # and the budget's state.
            "frame_age": self.frame_age.snapshot(),
            "target_fps": self._budget_fps or self.camera.fps,
            "budget": self.budget.stats(time.monotonic()) if self.budget else None,  # the budget's own clock
        }


class RedisClock:
    """The Redis server's time as this process sees it, which heartbeats are written on: readers compare them
    with Redis's TIME (pipeline/status.py), and this host's clock may be off by more than their 10 s (a camera
    host 30 s behind read stale for ever, one 30 s ahead never read stale after it died). TIME is asked in a
    thread at most every ``every_s`` (the heartbeat is written every second, no round trip of its own); the
    offset is kept against the monotonic clock, so a step of this host's wall clock changes nothing. Until the
    first answer (``asked``: a camera starts once it came), and where Redis is away or refuses TIME (an ACL),
    this host's clock. One per Redis in a process (``shared``): its cameras share the measurement."""

    def __init__(self, url: str, every_s: float = 60.0) -> None:
        self.url, self.every_s = url, every_s
        self.offset: float | None = None  # Redis's time minus time.monotonic()
        self.asked = threading.Event()  # the first question was answered (or refused, or failed)
        self._due, self._asking = 0.0, False
        self.now()

    @classmethod
    def shared(cls, url: str) -> "RedisClock":
        """This process's clock of the Redis at ``url``."""
        if url not in _CLOCKS:
            _CLOCKS[url] = cls(url)
        return _CLOCKS[url]

    def now(self) -> float:
        mono = time.monotonic()
        if mono >= self._due and not self._asking:
            self._due, self._asking = mono + self.every_s, True
            threading.Thread(target=self._ask, name="hv-redis-clock", daemon=True).start()
        return time.time() if self.offset is None else mono + self.offset

    def _ask(self) -> None:
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()  # connected first: only TIME's own round trip is in the measurement
                before = time.monotonic()
                seconds, micros = client.time()
                self.offset = seconds + micros / 1e6 - (before + time.monotonic()) / 2
            finally:
                client.close()
        except (redis.RedisError, OSError, ValueError):  # kept as it was; asked again in every_s
            pass
        finally:
            self._asking = False
            self.asked.set()


_CLOCKS: dict[str, RedisClock] = {}  # RedisClock.shared: Redis URL -> its clock in this process


def _seen(fut: asyncio.Future) -> None:
    """A call nobody awaits any more (its camera stopped without drain): its late error is not 'never retrieved'."""
    if not fut.cancelled():
        fut.exception()


def retired_track_ids_key(prefix: str) -> str:
    """Hash camera id -> JSON next free track id per head, of cameras removed at run time: their status entry
    is gone, and a camera added again under the same id must not hand out ids consumers have seen."""
    return f"{prefix}:track_ids"


def merge_next_ids(into: dict[str, int], ids: dict[str, int]) -> dict[str, int]:
    """``into`` with each head's next track id the larger of its own and ``ids``' (what a camera added again
    numbers from: the removal's, Redis's, the controller's memory of them)."""
    for head, n in ids.items():
        into[head] = max(into.get(head, 0), int(n))
    return into


def publisher_for(settings: RedisConfig, name: str, writer: WriterThread | None = None) -> Publisher:
    """A (not yet started) Publisher for resolved Redis settings: the cameras' and the controller's. ``writer``:
    the thread and connection it shares with the other cameras of its process; None: its own."""
    assert settings.url, "the controller resolves the Redis URL before anything publishes"
    if writer is not None:
        return writer.publisher(prefix=settings.prefix, maxlen=settings.maxlen, buffer=settings.buffer, name=name)
    return Publisher(settings.url, prefix=settings.prefix, maxlen=settings.maxlen, buffer=settings.buffer, name=name)


class CameraHost:
    """One camera inside a StreamActor: its CameraPipeline, its Publisher and its status loop."""

    def __init__(self, camera: CameraConfig, inference: list[str], model_info: dict, redis: RedisConfig,
                 instance: str | None = None, merger_for: Callable[[Any, Any], CallMerger] | None = None,
                 model: InferenceService | None = None, writer: Callable[[], WriterThread] | None = None):
        """``inference``: names of the InferenceActors (not handles: a handle among the constructor arguments
        of a restartable actor makes Ray's core worker log an error at every start, see ray#53727);
        ``redis.url`` is resolved by the controller (never None here); ``instance`` names the service run;
        ``model``: the process's own model (``inference.in_camera_process``), used instead of a replica;
        ``writer``: gives the WriterThread its Publisher shares with the process's other cameras (None: its own)."""
        # Validated once more where they arrive: a model passes through unchanged, a dict is checked.
        self.camera = camera if isinstance(camera, CameraConfig) else CameraConfig.model_validate(camera)
        self.redis = redis if isinstance(redis, RedisConfig) else RedisConfig.model_validate(redis)
        self.inference, self.model_info, self.instance = inference, model_info, instance
        self.merger_for = merger_for  # the process's CallMerger of a replica; None: a call per camera
        self.model, self.writer = model, writer
        self.restarted = False  # the next start is the controller's restart of it after a crash: see _previous_state
        # Next track ids the controller remembers of this id's camera removed earlier in its run: at least these
        # (Redis restarted without persistence had lost them, and the camera added again numbered from 0).
        self.retired_ids: dict[str, int] = {}
        self.runs = 0  # pipelines started in this process (an update starts an ended file again): in stats as "run"
        self.merger: CallMerger | None = None
        self.pipeline: CameraPipeline | None = None
        self.task: asyncio.Task | None = None
        self.publisher: Publisher | None = None
        self.status_task: asyncio.Task | None = None
        # One start at a time: the controller retries a start that outlived its call's timeout (a replica
        # still loading its model), and two must not both get past the waits below and run the camera twice.
        self._starting = asyncio.Lock()
        self._stop_asked = False  # a stop came while a start waited: that start runs nothing (the latest call wins)

    async def start(self, camera: CameraConfig | None = None) -> None:
        """Starts the camera and returns at once; ``wait`` returns when it ends. ``camera``: its current
        config, when the controller restarts an actor Ray re-created with the constructor's (older) one."""
        self._stop_asked = False
        async with self._starting:
            if self.task is None:
                await self._start(camera)

    async def _start(self, camera: CameraConfig | None) -> None:
        if camera is not None:
            self.camera = camera
        if self.publisher is None:
            self.publisher = publisher_for(self.redis, f"hydravision-{self.camera.id}",
                                           self.writer() if self.writer else None).start()
        clock = RedisClock.shared(self.redis.url)  # asks TIME (once per process) while the start waits below
        if self.model is not None:
            ref, replica = None, self.model
        else:  # stable spread of cameras over replicas (str hash() differs per process)
            ref = self.inference[zlib.crc32(self.camera.id.encode()) % len(self.inference)]
            replica = _replica(ref)
        # At a service's start the replica may still be loading its model (the controller starts cameras
        # beside it): the source opens once it answers, so no frame waits on a model that is not there yet.
        if hasattr(replica, "ping"):
            await replica.ping.remote()
        id_base, resume = await asyncio.get_running_loop().run_in_executor(None, self._previous_state)
        if self.pipeline is not None:  # a new run in this process (an update started an ended file again): its
            # status counts on from the last run's, as from a crashed process's (_previous_state)
            resume = replace(resume, counts=status_base(self.pipeline.status_counts()))
        # The first heartbeat (the source's stream_up, within ms) on this host's clock read stale where it is
        # behind Redis's by more than STALE_AFTER_S: the start waits for the answer, which normally came meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, clock.asked.wait, 5.0)
        if self._stop_asked:  # stopped (removed, a start given up on) while waiting: it must not run unseen
            log.info("camera %s: stopped before it started", self.camera.id)
            await asyncio.get_running_loop().run_in_executor(None, self.publisher.close, 5.0)
            self.publisher = None  # detached from the process's writer; a later start makes a new one
            return
        if resume.first_index:
            log.info("camera %s: restarted; continuing after frame %d", self.camera.id, resume.first_index - 1)
        self._leave_merger()
        if self.merger_for is not None and self.model is None:  # an in-process model takes no Ray calls
            self.merger = self.merger_for(ref, replica)
            self.merger.cameras.add(self.camera.id)
        self.runs += 1
        self.pipeline = CameraPipeline(self.camera, None, self.model_info, self.publisher,
                                       track_id_base=id_base, instance=self.instance, resume=resume,
                                       infer_many=self.merger.call if self.merger else service_call(replica))
        self.pipeline.redis_clock = clock  # heartbeats on the readers' clock
        self.task = asyncio.get_running_loop().create_task(self._run(self.pipeline))
        self.task.add_done_callback(lambda task: self._leave_merger() if task is self.task else None)
        self.status_task = asyncio.get_running_loop().create_task(self._status_loop())

    async def _run(self, pipeline: CameraPipeline) -> dict:
        """``pipeline.run()``; a bug that ends it is this camera's failure, said as one: its status went on saying
        running with fresh heartbeats, its ``wait`` raised (a service over files never ended) and so did its stop."""
        try:
            return await pipeline.run()
        except Exception as e:
            log.exception("camera %s: its pipeline failed", self.camera.id)
            pipeline.last_error = redact_text(f"pipeline failed: {type(e).__name__}: {e}", [self.camera.url])
            pipeline.state = "failed"
            with contextlib.suppress(Exception):  # the status loop says it within a second anyway
                pipeline.publish_status()
            return pipeline.stats()

    def _leave_merger(self) -> None:
        """This camera sends no more frames through its merger, whose calls stop waiting for it."""
        if self.merger is not None:
            self.merger.cameras.discard(self.camera.id)
            self.merger = None

    def _previous_state(self, attempts: int = 3) -> tuple[dict[str, int], Resume]:
        """Next free track id per head from this camera's last status in Redis (after a restart or a new
        run), so consumers never see an id reused for another object ({} when there is none); and, when that
        status is this run's own (the actor was restarted, on this node or another), where to resume.

        When Redis cannot be read, numbering from 0 could reuse ids consumers have already seen, so every
        head starts above any id a previous run can have handed out (ids from the clock, in ms). A camera whose
        process Ray re-created waits for an unreachable Redis instead, at the controller's restart of it (while not
        stopped): numbered from 0, it published its run's frames a second time (Redis paused while a camera process
        crashed)."""
        names = keys(self.redis.prefix)
        attempt = 0
        while True:
            try:
                client = redis.Redis.from_url(self.redis.url, socket_connect_timeout=2, socket_timeout=2)
                try:
                    raw = client.hget(names.cameras, self.camera.id)
                    last = client.xrevrange(names.detections(self.camera.id), count=1)
                    status = json.loads(raw) if raw else {}
                    ids = status.get("track_ids_next")
                    if pipeline := self.pipeline:  # restarted by an update: this process knows best
                        ids = pipeline.tracker.next_ids() if pipeline.tracker else pipeline.track_id_base
                    elif ids is None:  # removed earlier in this or a previous run, now added again
                        retired = client.hget(retired_track_ids_key(self.redis.prefix), self.camera.id)
                        ids = json.loads(retired) if retired else None
                finally:
                    client.close()
                if self.pipeline:  # an update restarts the source: a new playback, numbered afresh
                    resume = Resume(stream_mark=last[0][0].decode() if last else "0-0")
                else:  # a crash or a lost node: continue after this run's own last frame
                    # the controller's restart only: the same id added again after a removal whose status Redis
                    # kept started its file where the removed camera had stopped, and counted on from its counts
                    own = self.instance if self.restarted else None
                    resume = resume_point(own, status, last)
                    # Tracks left open by a run that never finished them (crashed, or killed with its service).
                    ended = CameraTracker.ended_from_rows(status.get("tracks_open"))
                    resume = replace(resume, open_tracks=tuple(ended))
                    if own and status.get("instance") == own:  # this run's: the status counts on from the crashed one's
                        base = status_base(status)
                        resume = replace(resume, counts={**base, "restarts": base["restarts"] + 1})
                ids = merge_next_ids({str(k): int(v) for k, v in (ids or {}).items()}, self.retired_ids)
                return ids, resume
            # TypeError, KeyError, ArithmeticError: an entry holding what no version writes (a null, Infinity, a
            # message without its frame) is as unreadable as a Redis that does not answer; it failed every start.
            except (redis.RedisError, OSError, ValueError, AttributeError, TypeError, KeyError, ArithmeticError) as e:
                error, attempt = e, attempt + 1
                unreachable = isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)) and \
                    not isinstance(e, redis.AuthenticationError)  # a wrong password does not pass with time
                waits = self.restarted and self.pipeline is None and unreachable and not self._stop_asked
                if attempt >= attempts and not waits:
                    break
                if attempt == attempts:
                    log.warning("camera %s: restarted while Redis cannot be read (%s); waiting for it, so that its "
                                "frames are numbered on from the last one published", self.camera.id,
                                redact_text(str(e), [self.redis.url or ""]))
                time.sleep(min(0.5 * attempt, 5.0))
        base = int(time.time() * 1000)
        log.warning("camera %s: could not read previous track ids (%s: %s); numbering from %d so that no "
                    "id is reused", self.camera.id, type(error).__name__,
                    redact_text(str(error), [self.redis.url or ""]), base)
        # every head of the model: one added later by a live update must not number from 0 either
        return {head: base for head in self.model_info["heads"]}, Resume()

    async def _status_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(1.0)
            if not self.pipeline:
                continue
            try:
                self.pipeline.publish_status()
                failing = False
            except Exception:  # a bug in stats(): one error ended the heartbeat for good, a live camera read stale
                if not failing:  # once per spell, not every second
                    log.exception("camera %s: publishing its status failed", self.camera.id)
                failing = True

    async def wait(self) -> dict:
        assert self.task is not None
        return await asyncio.shield(self.task)

    async def update(self, camera: CameraConfig) -> dict:
        """Applies a changed config (see CameraPipeline.update). A camera whose source had ended or failed
        for good starts again with it (``restarted``: the controller waits on the new run)."""
        if self.pipeline is None or self.task is None:
            raise RuntimeError(f"camera {camera.id}: update before start")
        if not self.task.done() and self.pipeline.source_ended:
            # Its source ended for good just now and the run is finishing: a new decoder would find the slot
            # closed and the update would be lost. Wait for the run's end, then start it again below.
            await asyncio.wait([self.task])
        if not self.task.done():
            changed = self.pipeline.update(camera)
            self.camera = camera
            return {"changed": changed, "restarted": False}
        changed = [f for f in CameraConfig.model_fields if getattr(camera, f) != getattr(self.camera, f)]
        CameraPipeline(camera, None, self.model_info, None)  # raises on unknown heads, before anything stops
        if self.status_task:
            self.status_task.cancel()
        self.camera, self.task = camera, None
        await self.start()
        return {"changed": changed, "restarted": True}

    async def stop(self, drain: bool = True, timeout: float = 10.0) -> dict:
        if self.pipeline is None or self.task is None:
            self._stop_asked = True  # a start still waiting (for its replica, for Redis) gives up
            if self.publisher is not None and not self._starting.locked():
                # A start that failed (its replica refused or absent) left its Publisher attached to the writer the
                # process's cameras share: one more for every failed add. Detached first: a later start makes its own.
                publisher, self.publisher = self.publisher, None
                await asyncio.get_running_loop().run_in_executor(None, publisher.close, 5.0)
            return {}
        self.pipeline.stop(drain)
        try:
            stats = await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except asyncio.TimeoutError:  # inference holds the drain up: what is left is dropped, not waited for
            self.pipeline.stop(drain=False)
            try:
                stats = await asyncio.wait_for(asyncio.shield(self.task), 5.0)
            except asyncio.TimeoutError:  # a decoder stuck in a blocking call: its process is killed next
                self.pipeline.state = "stopped"  # the final status must not say running
                stats = self.pipeline.stats()
        if self.status_task:
            self.status_task.cancel()
        self.pipeline.publish_status()
        if self.publisher:
            await asyncio.get_running_loop().run_in_executor(None, self.publisher.close, 5.0)
            stats["publisher"] = self.publisher.stats()
        # What a removal leaves behind of this camera in its process: should be nothing.
        mine = capture_thread_name(self.camera.id, "")
        stats["decoder_threads"] = sum(t.name.startswith(mine) for t in threading.enumerate())
        stats["open_tracks"] = self.pipeline.open_tracks()
        stats["pid"], stats["run"] = os.getpid(), self.runs  # as stats()
        return stats

    async def stats(self) -> dict:
        s = self.pipeline.stats() if self.pipeline else {"camera": self.camera.id, "state": "created"}
        if self.publisher:
            s["publisher"] = self.publisher.stats()
        s["pid"] = os.getpid()  # the controller tells a restarted actor's counters from the old one's by it
        if self.pipeline:
            s["run"] = self.runs  # and a run started again in the same process (telemetry.Accumulated)
        return s


@ray.remote(num_cpus=0, max_restarts=-1)
class StreamActor:
    """The Ray actor, one process, that hosts one or more cameras (``ray.cameras_per_process``): every
    Ray actor process wakes up 100 times a second whatever it does, so cameras sharing one spend less CPU per
    frame (docs/architecture.md, "Cameras per process"). Calls name the camera; Ray re-runs the constructor
    after a crash and the controller then starts each camera again with its current config."""

    def __init__(self, cameras: list[tuple[CameraConfig, list]], model_info: dict, redis: RedisConfig,
                 instance: str | None = None, merge_window_s: float = 0.0, model: dict | None = None):
        """``cameras``: (config, names of its InferenceActors) each, see CameraHost; more may join later
        (``start`` with both). ``merge_window_s``: see CallMerger (``inference.merge_window_ms``); 0: a call
        per camera. ``model``: InferenceService's arguments when this process runs the model for its cameras
        itself (``inference.in_camera_process``; their InferenceActors are then unused): loaded here, before
        any camera starts; ``checkpoint``: a path, or a reference to the file's bytes in Ray's object store
        (``model.distribute``), as an InferenceActor takes it."""
        log_to_stderr(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.model_info, self.instance = model_info, instance
        self.redis = redis if isinstance(redis, RedisConfig) else RedisConfig.model_validate(redis)
        self.merge_window_s = merge_window_s
        self.model: InferenceService | None = None
        if model is not None:
            if isinstance(model["checkpoint"], ray.ObjectRef):  # Ray resolves top-level arguments only
                # bounded, as every ray.get here (tests/test_hang_guards18.py): its owner gone, it would wait for ever
                model = {**model, "checkpoint": ray.get(model["checkpoint"], timeout=300)}
            self.model = InferenceService(**model, exit_on_device_loss=True)  # its cameras restart with the process
        self.hosts: dict[str, CameraHost] = {}
        self.mergers: dict[Any, CallMerger] = {}  # per inference replica, shared by this process's cameras
        self.writer: WriterThread | None = None  # the Redis connection and thread of its cameras' Publishers
        for camera, inference in cameras:
            self._add(camera, inference)

    def _add(self, camera: CameraConfig, inference: list) -> None:
        host = CameraHost(camera, inference, self.model_info, self.redis, self.instance,
                          self._merger if self.merge_window_s > 0 else None, self.model, self._writer)
        self.hosts[host.camera.id] = host

    def _writer(self) -> WriterThread:
        """One writer for all cameras of the process: a wake-up and a round trip to Redis for what they all
        published since the last, not one per camera (docs/architecture.md, "One Redis writer per process")."""
        if self.writer is None:
            assert self.redis.url, "the controller resolves the Redis URL before anything publishes"
            self.writer = WriterThread(self.redis.url, name=f"hydravision-cameras-{os.getpid()}")
        return self.writer

    def _merger(self, ref: Any, replica: Any) -> CallMerger:
        key = tuple(ref) if isinstance(ref, list) else ref
        if key not in self.mergers:
            self.mergers[key] = CallMerger(replica, self.merge_window_s)
        return self.mergers[key]

    def _host(self, camera_id: str) -> CameraHost:
        try:
            return self.hosts[camera_id]
        except KeyError:
            raise KeyError(f"camera {camera_id} is not hosted by this process ({sorted(self.hosts)})") from None

    async def start(self, camera_id: str, camera: CameraConfig | None = None, inference: list | None = None,
                    restart: bool = False, track_ids: dict[str, int] | None = None) -> None:
        """Starts a camera; one this process does not host yet joins it when ``camera`` and ``inference`` come
        along (a camera added at run time, or one that had joined before Ray restarted this process). ``restart``:
        the controller's start of a camera whose process Ray re-created (it waits for Redis to number on).
        ``track_ids``: next track id per head it numbers from at least (its id's removal earlier in the run)."""
        if camera_id not in self.hosts and camera is not None and inference is not None:
            self._add(camera, inference)
        host = self._host(camera_id)
        host.restarted = restart
        if track_ids:  # a camera removed earlier in the controller's run, added again: see CameraHost.retired_ids
            host.retired_ids = track_ids
        if inference is not None and host.task is None:  # the replica it has now, not the constructor's
            host.inference = inference
        await host.start(camera)

    async def wait(self, camera_id: str) -> dict:
        return await self._host(camera_id).wait()

    async def update(self, camera_id: str, camera: CameraConfig) -> dict:
        return await self._host(camera_id).update(camera)

    async def stop(self, camera_id: str, drain: bool = True, timeout: float = 10.0) -> dict:
        return await self._host(camera_id).stop(drain, timeout)

    async def stats(self, camera_id: str) -> dict:
        if camera_id not in self.hosts:  # it had joined this process, which Ray has restarted since
            return {"camera": camera_id, "state": "created", "pid": os.getpid()}
        return await self._host(camera_id).stats()

    @ray.method(enable_task_events=TASK_EVENTS)  # polled every tick: see TASK_EVENTS
    async def stats_many(self, camera_ids: list[str], model: bool = False) -> dict:
        """The controller's tick: ``stats`` of each camera and (``model``) ``model_stats``, in one call (a call per
        camera and per model cost 10-23 ms more CPU per tick at 8 cameras in 2 processes: docs/architecture.md)."""
        cameras = {}
        for cid in camera_ids:
            try:
                cameras[cid] = await self.stats(cid)
            except Exception as e:  # that camera's failure only, as when each camera had a call of its own
                host = self.hosts.get(cid)
                text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                cameras[cid] = {"camera": cid, "state": "unavailable",
                                "last_error": redact_text(text, [host.camera.url] if host else [])}
        try:
            numbers = await self.model_stats() if model else None
        except Exception:  # as a model_stats call that failed: no numbers this tick
            log.warning("model stats failed", exc_info=True)
            numbers = None
        return {"cameras": cameras, "model": numbers}

    async def model_info(self) -> dict | None:
        """This process's own model (``inference.in_camera_process``), as InferenceActor.info; else None."""
        return self.model.info() if self.model else None

    @ray.method(enable_task_events=TASK_EVENTS)  # polled every tick: see TASK_EVENTS
    async def model_stats(self) -> dict | None:
        """This process's own model's numbers, as InferenceActor.stats (batches, model CPU, queue); else None."""
        return self.model.stats() if self.model else None

    async def forget(self, camera_id: str) -> int:
        """Drops a stopped camera (removed at run time); returns how many cameras this process still hosts."""
        self.hosts.pop(camera_id, None)
        return len(self.hosts)

    @ray.method(enable_task_events=TASK_EVENTS)  # polled every tick: see TASK_EVENTS
    async def where(self) -> dict:
        """The node and process this actor runs in (it moves when its node dies)."""
        return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}


def _replica(ref: Any) -> Any:
    """An inference replica from what the controller passed: (namespace, name) of a named actor, looked up
    here (an ActorHandle as a constructor argument makes Ray keep it in the object store and warn), or a
    handle / in-process service as tests pass it."""
    if isinstance(ref, (tuple, list)):
        namespace, name = ref
        return ray.get_actor(name, namespace=namespace)
    return ref


def resume_point(instance: str | None, status: dict, last: list) -> Resume:
    """Where a camera starts, from its status in Redis and the last entry of its detection stream
    (``XREVRANGE ... COUNT 1``): fresh on this run's first start; after this run's own last frame when the
    status is this run's and the stream holds frames published since this run's mark."""
    last_id = last[0][0].decode() if last else "0-0"
    if not instance or status.get("instance") != instance:
        return Resume(stream_mark=last_id)  # this run's first start: every entry after last_id is ours
    mark = str(status.get("stream_mark") or "0-0")
    if not last or entry_order(last_id) <= entry_order(mark):
        return Resume(stream_mark=mark)  # started before, published nothing yet
    message = json.loads(last[0][1][b"data"])
    first = int(message["frame"]) + 1
    playback = status.get("playback")
    if not isinstance(playback, dict):  # a status of a version that did not keep it
        return Resume(first, float(message["pts"]), mark)
    # The file's position: the frames published since this playback of it (a live URL change) began. None
    # yet (the last frame was the previous URL's): the file starts at 0 with its pts after the last frame's.
    position = max(0, first - int(playback.get("start", 0)))
    return Resume(first, float(message["pts"]), mark, position,
                  float(playback.get("pts_offset", 0.0)) if position else 0.0)
