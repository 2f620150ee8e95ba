"""Versioned JSON messages (schema v1, see DESIGN.md "Redis output") and the Publisher that writes them to Redis.

Delivery guarantees of Publisher, per process:
- Order: messages reach Redis in the order publish_* was called, also across outages (one FIFO queue, one
  writer thread, and a batch is retried from its first message).
- At-least-once: if a pipeline fails after Redis applied part of it (e.g. a socket timeout on the reply), the
  whole batch is sent again, so consumers may see a message twice (same `camera`/`frame`, or same event
  fields and `ts`); dedupe on those if it matters. A message Redis itself rejects for good (e.g. WRONGTYPE on
  the key) is lost and counted in stats()["rejected"], as retrying cannot fix it and would block the rest.
- Bounded: at most `buffer` detection+event messages wait; when full the OLDEST is dropped and counted. Once
  the backlog is delivered, a `publisher_dropped` event says how many were lost. Its camera is the camera of
  all dropped messages, or "*" if they came from several. Camera status is not buffered: the latest value
  per camera wins.
- publish_*/set_status never block on Redis: they encode JSON and append under a lock held only for
  microseconds; all I/O happens in a daemon thread.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, NamedTuple, Sequence

import jsonschema
import redis
from redis.backoff import FullJitterBackoff
from redis.retry import Retry

from workers.redact import redact_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EVENT_TYPES = (
    "track_started", "track_ended", "line_crossed", "zone_entered", "zone_left",
    "stream_up", "stream_down", "stream_reconnecting", "camera_added", "camera_removed",
    "publisher_dropped", "worker_restarted", "budget_exceeded", "budget_recovered",
)
MAX_BATCH = 500  # messages per pipeline: one round trip, yet small enough that a retry is cheap
ALL_CAMERAS = "*"
IDLE_PING_S = 10.0  # with nothing to send, check the connection this often
# Error replies that mean "try again later" (full memory, failover, loading, an ACL being fixed) rather than
# "this command can never succeed". redis-py strips these codes from the text and maps them to classes.
_TRANSIENT_ERRORS = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                     redis.exceptions.BusyLoadingError, redis.exceptions.TryAgainError,
                     redis.exceptions.MasterDownError, redis.exceptions.ClusterDownError,
                     redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError)
SchemaKind = Literal["detection", "event"]


# --- messages -------------------------------------------------------------------------------------------

def _finite(name: str, value: Any) -> float:
    out = float(value)  # also turns numpy scalars into plain floats json can encode
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def detection_message(camera: str, frame: int, pts: float, ts: float, latency_ms: float,
                      size: tuple[int, int], detections: list[dict], heads: list[str]) -> dict:
    """One frame's v1 message. size is (width, height) of the source image; boxes are source pixels.

    Each detection is {head, track_id, class, class_id, conf, box}; a negative track_id (the trackers'
    "not yet confirmed" -1) becomes null. Numbers are rounded to what consumers can use, to keep messages small.
    """
    ran = list(dict.fromkeys(heads))
    out = []
    for d in detections:
        if d["head"] not in ran:
            raise ValueError(f"detection of head {d['head']!r} but heads that ran are {ran}")
        box = [round(_finite("box", x), 2) for x in d["box"]]
        if len(box) != 4:
            raise ValueError(f"expected box [x1, y1, x2, y2], got {len(box)} values")
        track = d.get("track_id")
        out.append({"head": d["head"], "track_id": None if track is None or track < 0 else int(track),
                    "class": str(d["class"]), "class_id": int(d["class_id"]),
                    "conf": round(_finite("conf", d["conf"]), 4), "box": box})
    # latency_ms is clamped at 0: a wall-clock step (NTP) can make capture time look like the future.
    return {"v": SCHEMA_VERSION, "camera": camera, "frame": int(frame), "pts": _finite("pts", pts),
            "ts": _finite("ts", ts), "latency_ms": round(max(0.0, _finite("latency_ms", latency_ms)), 3),
            "size": [int(size[0]), int(size[1])], "heads": ran, "detections": out}


def event_message(type: str, camera: str, ts: float | None = None, **fields: Any) -> dict:
    """A v1 event; ts defaults to now (unix seconds). Type-specific fields as keyword arguments; since
    `class` is a Python keyword, pass it as class_ (or **{"class": ...})."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}; expected one of {', '.join(EVENT_TYPES)}")
    if "class_" in fields:
        fields["class"] = fields.pop("class_")
    return {"v": SCHEMA_VERSION, "type": type, "camera": camera,
            "ts": time.time() if ts is None else _finite("ts", ts), **fields}


def load_schema(kind: SchemaKind) -> dict:
    """The JSON Schema (draft 2020-12) of a v1 message kind, from workers/schemas/."""
    text = resources.files("workers").joinpath("schemas", f"{kind}-v{SCHEMA_VERSION}.json").read_text()
    return json.loads(text)


_validators: dict[str, jsonschema.Draft202012Validator] = {}


def validate(message: dict, kind: SchemaKind) -> None:
    """Raises jsonschema.ValidationError when message is not a valid v1 message of that kind."""
    if kind not in _validators:
        _validators[kind] = jsonschema.Draft202012Validator(load_schema(kind))
    _validators[kind].validate(message)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def encode(message: dict) -> str:
    """Compact JSON; NaN/inf are refused because other languages' JSON parsers reject them."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False, default=_json_default)


@dataclass(frozen=True)
class Keys:
    """Redis key names under one prefix (DESIGN.md "Redis output")."""
    prefix: str

    def detections(self, camera: str) -> str:
        return f"{self.prefix}:cam:{camera}:detections"

    def live(self, camera: str) -> str:
        return f"{self.prefix}:live:{camera}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def cameras(self) -> str:
        return f"{self.prefix}:cameras"


def keys(prefix: str) -> Keys:
    return Keys(prefix)


# --- publisher ------------------------------------------------------------------------------------------

class _Entry(NamedTuple):
    seq: int
    camera: str
    stream: str
    live: str | None  # channel for detection messages, None for events
    data: str


class Publisher:
    """Writes messages to Redis from a background thread; callers never block on Redis."""

    def __init__(self, url: str, prefix: str = "hv", maxlen: int = 10_000, buffer: int = 2_000,
                 name: str = "hydravision", connect_timeout_s: float = 2.0, socket_timeout_s: float = 2.0,
                 max_backoff_s: float = 5.0, **redis_kwargs: Any) -> None:
        """redis_kwargs go to redis.Redis.from_url, e.g. ssl_ca_certs for rediss:// URLs."""
        if buffer < 1 or maxlen < 1:
            raise ValueError(f"buffer and maxlen must be >= 1, got {buffer} and {maxlen}")
        self._url, self.keys, self.maxlen, self.buffer = url, Keys(prefix), maxlen, buffer
        try:
            # Retries are ours (ordered, bounded, backoff): redis-py must fail fast, not retry inside a call.
            self._client = redis.Redis.from_url(
                url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
                health_check_interval=30, client_name=name, retry=Retry(FullJitterBackoff(), 0),
                **redis_kwargs)
        except ValueError as exc:
            raise ValueError(self._redact(str(exc))) from None
        self._backoff = FullJitterBackoff(cap=max_backoff_s, base=0.05)
        self._cond = threading.Condition()  # guards everything below; never held during I/O
        self._queue: deque[_Entry] = deque()
        self._status: dict[str, str | None] = {}  # camera -> JSON, or None to delete
        self._status_gen = self._status_done = 0
        self._seq = self._acked = 0
        self._inflight_max = 0  # highest seq of the batch being sent, 0 when none
        self._dropped_inflight: list[str] = []  # cameras of in-flight entries dropped meanwhile
        self._unreported: dict[str, int] = {}  # camera -> drops not yet announced by publisher_dropped
        self._stats = {"sent": 0, "dropped": 0, "rejected": 0, "retries": 0, "reconnects": 0,
                       "round_trips": 0}
        self._connected, self._last_error = False, None
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"publisher-{prefix}", daemon=True)

    def start(self) -> "Publisher":
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    def __enter__(self) -> "Publisher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- callers' side: no I/O here
    def publish_detections(self, message: dict) -> None:
        """XADD {prefix}:cam:{camera}:detections and PUBLISH {prefix}:live:{camera}, asynchronously."""
        camera = message["camera"]
        self._enqueue(camera, self.keys.detections(camera), self.keys.live(camera), encode(message))

    def publish_event(self, message: dict) -> None:
        """XADD {prefix}:events, asynchronously."""
        self._enqueue(message["camera"], self.keys.events, None, encode(message))

    def set_status(self, camera: str, status: dict) -> None:
        """HSET {prefix}:cameras camera <json>; only the latest status per camera is written."""
        self._set_status(camera, encode(status))

    def remove_status(self, camera: str) -> None:
        self._set_status(camera, None)

    def _set_status(self, camera: str, data: str | None) -> None:
        with self._cond:
            self._status[camera] = data
            self._status_gen += 1
            self._cond.notify()

    def _enqueue(self, camera: str, stream: str, live: str | None, data: str) -> None:
        with self._cond:
            if self._closed:
                self._drop(camera)  # a late publish during shutdown is counted, not raised
                return
            self._seq += 1
            self._queue.append(_Entry(self._seq, camera, stream, live, data))
            while len(self._queue) > self.buffer:
                oldest = self._queue.popleft()
                if oldest.seq <= self._inflight_max:  # its fate depends on the send now in progress
                    self._dropped_inflight.append(oldest.camera)
                else:
                    self._drop(oldest.camera)
            self._cond.notify()

    def _drop(self, camera: str) -> None:
        self._stats["dropped"] += 1
        self._unreported[camera] = self._unreported.get(camera, 0) + 1

    # --- flushing and shutdown
    def flush(self, timeout: float = 5.0) -> bool:
        """True when everything queued before this call has reached Redis (or was dropped, see stats)."""
        with self._cond:
            target, status_target = self._seq, self._status_gen
            return self._cond.wait_for(  # no writer thread (not started, or closed): nothing will change
                lambda: self._acked >= target and self._status_done >= status_target,
                timeout if self._thread.is_alive() else 0)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, then stop the thread; returns within about `timeout` even if Redis is gone. Idempotent."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            self.flush(timeout * 0.8)
        with self._cond:
            self._closed = True
            self._stop.set()
            self._cond.notify_all()
            left = len(self._queue)
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("publisher closed with %d messages not delivered to Redis", left)
        if not self._thread.is_alive():
            self._client.close()

    def stats(self) -> dict:
        with self._cond:
            return {**self._stats, "connected": self._connected, "last_error": self._last_error,
                    "queued": len(self._queue), "statuses_pending": len(self._status)}

    # --- the writer thread
    def _run(self) -> None:
        failures, last_ok = 0, time.monotonic()
        while not self._stop.is_set():
            with self._cond:
                if self._connected or failures:  # the very first round goes at once: it tells if Redis is up
                    self._cond.wait_for(lambda: self._queue or self._status or self._stop.is_set(), 1.0)
                if self._stop.is_set():
                    break
                batch = list(itertools.islice(self._queue, MAX_BATCH))
                statuses, status_gen = dict(self._status), self._status_gen
                self._status.clear()
                self._inflight_max = batch[-1].seq if batch else 0
                # Announce drops with the batch that empties the backlog: after what was kept, same trip.
                report = dict(self._unreported) if len(batch) == len(self._queue) else {}
                idle = not (batch or statuses or report)
            # When idle, a PING now and then keeps stats()["connected"] true to what a send would find.
            if idle and self._connected and time.monotonic() - last_ok < IDLE_PING_S:
                continue
            try:
                rejected = self._send(batch, statuses, report)
            except Exception as exc:  # noqa: BLE001 - any failure means "retry later"; the thread must not die
                failures += 1
                self._failed(exc, statuses, failures)
                self._stop.wait(self._backoff.compute(failures))
                continue
            failures, last_ok = 0, time.monotonic()
            self._succeeded(batch, rejected, status_gen, report)
        with self._cond:
            self._connected = False
        self._client.close()

    def _send(self, batch: Sequence[_Entry], statuses: dict[str, str | None], report: dict[str, int]) -> int:
        """One pipelined round trip for the whole batch; returns how many entries Redis rejected for good."""
        pipe = self._client.pipeline(transaction=False)
        owner: list[int] = []  # command index -> batch index, to map a failed reply back to its message
        for i, e in enumerate(batch):
            pipe.xadd(e.stream, {"data": e.data}, maxlen=self.maxlen, approximate=True)
            owner.append(i)
            if e.live is not None:
                pipe.publish(e.live, e.data)
                owner.append(i)
        if report:
            camera = next(iter(report)) if len(report) == 1 else ALL_CAMERAS
            event = event_message("publisher_dropped", camera, dropped=sum(report.values()))
            pipe.xadd(self.keys.events, {"data": encode(event)}, maxlen=self.maxlen, approximate=True)
        sets = {cam: data for cam, data in statuses.items() if data is not None}
        if sets:
            pipe.hset(self.keys.cameras, mapping=sets)
        if deletes := [cam for cam, data in statuses.items() if data is None]:
            pipe.hdel(self.keys.cameras, *deletes)
        if not len(pipe):
            pipe.ping()
        replies = pipe.execute(raise_on_error=False)
        with self._cond:
            self._stats["round_trips"] += 1
        errors = [(i, r) for i, r in enumerate(replies) if isinstance(r, redis.ResponseError)]
        if not errors:
            return 0
        texts = [self._redact(f"{type(reply).__name__}: {reply}") for _, reply in errors]
        for _, reply in errors:
            if isinstance(reply, _TRANSIENT_ERRORS) or str(reply).startswith("BUSY "):
                raise reply  # the whole batch is tried again
        # Permanent (wrong key type, bad argument): retrying cannot help and would block everything behind
        # it, so those messages (or that status write) are lost, counted and logged.
        rejected = {owner[i] for i, _ in errors if i < len(owner)}
        with self._cond:
            self._last_error = texts[0]
        log.error("Redis rejected %d message(s) and %d other write(s) of a batch: %s",
                  len(rejected), sum(i >= len(owner) for i, _ in errors), texts[0])
        return len(rejected)

    def _succeeded(self, batch: Sequence[_Entry], rejected: int, status_gen: int, report: dict[str, int]) -> None:
        with self._cond:
            if not self._connected and self._stats["retries"]:
                self._stats["reconnects"] += 1
                log.warning("publisher reconnected to Redis")
            self._connected = True
            if batch:
                while self._queue and self._queue[0].seq <= batch[-1].seq:
                    self._queue.popleft()
                self._stats["sent"] += len(batch) - rejected
                self._stats["rejected"] += rejected
                self._acked = max(self._acked, batch[-1].seq)
            self._dropped_inflight.clear()  # they were sent after all
            self._inflight_max = 0
            for camera, count in report.items():  # drops that came during this send stay unreported
                left = self._unreported.pop(camera, 0) - count
                if left > 0:
                    self._unreported[camera] = left
            self._status_done = max(self._status_done, status_gen)
            self._cond.notify_all()

    def _failed(self, exc: Exception, statuses: dict[str, str | None], failures: int) -> None:
        text = self._redact(f"{type(exc).__name__}: {exc}")
        with self._cond:
            for camera in self._dropped_inflight:  # dropped while in flight and the send failed: truly lost
                self._drop(camera)
            self._dropped_inflight.clear()
            self._inflight_max = 0
            for camera, data in statuses.items():  # put back unless a newer status came meanwhile
                self._status.setdefault(camera, data)
            self._stats["retries"] += 1
            was_connected, self._connected, self._last_error = self._connected, False, text
        if was_connected or failures == 1:
            log.warning("publisher cannot write to Redis (%s); keeping up to %d messages, retrying",
                        text, self.buffer)

    def _redact(self, text: str) -> str:
        return redact_text(text, [self._url])
