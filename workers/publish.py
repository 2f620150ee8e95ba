"""Versioned JSON messages (schema v1, see DESIGN.md "Redis output") and the Publisher that writes them to Redis.

Delivery guarantees of one Publisher instance (a restarted StreamActor has a new one):
- Order: messages reach Redis in the order publish_* was called, also across outages (one FIFO queue, one
  writer thread, and a batch is retried from its first message).
- Exactly once: each batch is one Lua script call (workers/redis_writer.py) that Redis runs whole or not at
  all (out of memory refuses the whole call), and that skips what this instance already wrote, so a batch
  sent again after a lost reply (a socket timeout on a frozen Redis) writes nothing twice. Every message
  handed to it ends in exactly one of stats()["sent"], ["rejected"] (Redis refused it for good, e.g. WRONGTYPE
  on its key: retrying cannot fix that and would block the rest), ["dropped"] or ["queued"]. Its own
  publisher_dropped / publisher_error events, which report on those messages, are in none of them: Redis holds
  them besides the `sent` ones. Not covered: a Redis that loses what it acknowledged (a restart without
  persistence, a failover to a lagging replica; logged where a resend after a lost reply finds it so), or that
  evicts the Publisher's state hash (under a `volatile-*` maxmemory-policy, the one key of ours with a TTL): a
  resend after a lost reply may then write messages twice, which is logged (workers/redis_writer.py).
- Bounded: at most `buffer` detection+event messages wait; when full the OLDEST is dropped and counted. Once
  the backlog is delivered, a `publisher_dropped` event says how many were lost. Its camera is the camera of
  all dropped messages, or "*" if they came from several. A message dropped after a send that may have
  reached Redis is counted once the next write tells whether it did (at close, as dropped); a send that
  never left (Redis unreachable) or that Redis refused whole (out of memory, read-only) reached nothing.
  Camera status is not buffered: the latest value per camera wins, and it is written even while Redis is out
  of memory.
- Failures are visible: stats() has failing / failing_since / last_error while writes fail, and when they
  succeed again one `publisher_error` event gives the first error (redacted), duration_s and retries.
- publish_*/set_status never block on Redis: they encode JSON and append under a lock held only for
  microseconds; all I/O happens in a daemon thread, a WriterThread, which the Publishers of a camera process
  share: each wake-up sends what all of them queued in one round trip, each one's batch still its own script
  call, judged on its own.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, NamedTuple, Sequence

import jsonschema
import redis
from redis.backoff import FullJitterBackoff
from redis.retry import Retry

from workers.redact import redact_text
from workers.redis_writer import BatchWriter, HashValue, StateGone, WriteResult
from workers.thread_names import worker_thread

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EVENT_TYPES = (
    "track_started", "track_ended", "line_crossed", "zone_entered", "zone_left",
    "stream_up", "stream_down", "stream_reconnecting", "camera_added", "camera_removed", "camera_updated",
    "publisher_dropped", "worker_restarted", "publisher_error", "node_lost", "budget_exceeded", "budget_recovered",
    "analytics_error",
)
MAX_BATCH = 500  # messages per pipeline: one round trip, yet small enough that a retry is cheap
ALL_CAMERAS = "*"
IDLE_PING_S = 10.0  # with nothing to send, check the connection this often
REFUSALS_LOG_S = 60.0  # what Redis refuses is logged at once, then at most this often with the counts since: a
# refusal that comes with every batch (PUBLISH denied to a Redis 7 ACL user made without channels) logged an error
# line per batch, ten a second per camera for as long as the service ran
SchemaKind = Literal["detection", "event", "counts", "snapshot"]


# --- messages -------------------------------------------------------------------------------------------

def _finite(name: str, value: Any) -> float:
    out = float(value)  # also turns numpy scalars into plain floats json can encode
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def detection_message(camera: str, frame: int, pts: float, ts: float, latency_ms: float,
                      size: tuple[int, int], detections: list[dict], heads: list[str]) -> dict:
    """One frame's v1 message. size is (width, height) of the source image; boxes are source pixels.

    Each detection is {head, track_id, class, class_id, conf, box[, attributes]}; a negative track_id (the
    trackers' "not yet confirmed" -1) becomes null. Numbers are rounded to what consumers can use, to keep messages small.
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
        record = {"head": d["head"], "track_id": None if track is None or track < 0 else int(track),
                  "class": str(d["class"]), "class_id": int(d["class_id"]),
                  "conf": round(_finite("conf", d["conf"]), 4), "box": box}
        if d.get("attributes"):  # {name: {label, conf}} from attribute heads
            record["attributes"] = {str(k): {"label": str(v["label"]), "conf": round(_finite("conf", v["conf"]), 4)}
                                    for k, v in d["attributes"].items()}
        out.append(record)
    return _frame_message(camera, frame, pts, ts, latency_ms, size, ran, out)


def _frame_message(camera: str, frame: int, pts: float, ts: float, latency_ms: float, size: tuple[int, int],
                   ran: list[str], detections: list[dict]) -> dict:
    """The message around a frame's detections (already checked and rounded)."""
    # latency_ms is clamped at 0: a wall-clock step (NTP) can make capture time look like the future.
    # pts to the microsecond: a looped file's stitched pts read 23.799999999999997 in every consumer
    return {"v": SCHEMA_VERSION, "camera": camera, "frame": int(frame), "pts": round(_finite("pts", pts), 6),
            "ts": _finite("ts", ts), "latency_ms": round(max(0.0, _finite("latency_ms", latency_ms)), 3),
            "size": [int(size[0]), int(size[1])], "heads": ran, "detections": detections}


def records_message(camera: str, frame: int, pts: float, ts: float, latency_ms: float,
                    size: tuple[int, int], records: list[dict], heads: list[str]) -> dict:
    """``detection_message`` for records as ``workers.frames.detection_records`` makes them, and the same dict:
    their numbers are already plain, rounded as the message rounds them (rounding again changes nothing) and
    their keys in its order, so they go in as they are instead of being built again (a camera's event loop did
    it for every detection of every frame). Where a number is not finite or a head did not run, the message is
    ``detection_message``'s, which raises what it raises."""
    ran = list(dict.fromkeys(heads))
    total = 0.0  # finite only if every number is (NaN and infinities stay in a sum, or make it NaN)
    for d in records:
        if d["head"] not in ran:
            break
        x1, y1, x2, y2 = d["box"]
        total += x1 + y1 + x2 + y2 + d["conf"]
        if "attributes" in d:
            for a in d["attributes"].values():
                total += a["conf"]
    else:
        if math.isfinite(total):
            return _frame_message(camera, frame, pts, ts, latency_ms, size, ran, records)
    return detection_message(camera, frame, pts, ts, latency_ms, size, records, heads)


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


_validators: dict[str, tuple[Any, jsonschema.Draft202012Validator]] = {}


def validate(message: dict, kind: SchemaKind) -> None:
    """Raises jsonschema.ValidationError when message is not a valid v1 message of that kind.

    jsonschema_rs answers valid or not (a frame of 100 detections: 0.02 ms against jsonschema's 10 ms); a
    message it refuses goes through jsonschema too, which names the field and has the last word."""
    if kind not in _validators:
        import jsonschema_rs  # here: the cameras' processes import this module and never validate

        schema = load_schema(kind)
        _validators[kind] = (jsonschema_rs.Draft202012Validator(schema), jsonschema.Draft202012Validator(schema))
    fast, reference = _validators[kind]
    if not fast.is_valid(message):
        reference.validate(message)


def _hash_item(key: str, what: str, value: Any) -> HashValue:
    """A hash field name or value as redis-py sends it. It refuses None, bool and numpy numbers only when the
    send is packed, failing the whole round trip that every camera of the process shares (and every one after
    it), and it writes a numpy float64 as 'np.float64(1.5)': so they are refused or converted here."""
    if isinstance(value, str):
        try:  # a lone surrogate (a non-UTF-8 file or class name as Python reads it) fails the packing as above
            value.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"set_hash {key}: {what} {value!r} holds {value[e.start]!r}, which UTF-8 cannot "
                             "encode") from None
        return value
    if isinstance(value, bytes):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    raise TypeError(f"set_hash {key}: {what} is {type(value).__name__} {value!r}; expected str, bytes, int or float")


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

    def counts(self, camera: str) -> str:
        """Hash of a camera's zone occupancy and line counts (workers/analytics.py; schema counts-v1.json)."""
        return f"{self.prefix}:cam:{camera}:counts"

    def snapshot(self, camera: str) -> str:
        """Hash of a camera's latest annotated JPEG and its frame, pts, ts (schema snapshot-v1.json)."""
        return f"{self.prefix}:cam:{camera}:snapshot"

    def publisher(self, publisher_id: str) -> str:
        """Hash of one Publisher's last applied seq and trip, and refusals a resend must hear of
        (workers/redis_writer.py); deleted by a clean close, else it expires after a day."""
        return f"{self.prefix}:publisher:{publisher_id}"


def undelivered(stats: dict) -> dict[str, int]:
    """What a Publisher's ``stats()`` counted as never reaching Redis, by why, those with any: dropped (its buffer
    full during an outage), rejected (refused by Redis), left (in its buffer at the stop). The end of a run and a
    camera's removal both count these (pipeline/run_commands.py, pipeline/live_control.py)."""
    why = {"dropped": stats.get("dropped"), "rejected": stats.get("rejected"), "left": stats.get("queued")}
    return {k: n for k, n in why.items() if n}


def keys(prefix: str) -> Keys:
    return Keys(prefix)


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A Redis stream entry id ("ms-seq") as a tuple that sorts as Redis orders the entries."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


# --- publisher ------------------------------------------------------------------------------------------

class _Entry(NamedTuple):
    seq: int
    camera: str
    stream: str
    live: str | None  # channel for detection messages, None for events
    data: str
    own: dict[str, int] | None = None  # set for the Publisher's own events; a drop report holds its counts


@dataclass
class _Episode:
    """A run of failed writes, from the first failure to the next success (a write's, see ``writes``)."""
    since: float  # unix seconds when the first failed attempt began
    start: float  # the same, monotonic
    reason: str  # the first error, redacted
    failures: int = 0
    writes: bool = False  # a failed round carried something: only a write ends it then, not a PING that Redis
    # answers (out of memory, it answers PINGs and refuses writes; its statuses may have been written alone)
    cameras: set[str] = field(default_factory=set)
    dropped_before: int = 0  # the publisher's dropped count when it began: its drops are said at its end


class _Round(NamedTuple):
    """What one send of a Publisher carries (taken under the lock, written outside it)."""
    trip: int
    batch: list[_Entry]
    statuses: dict[str, str | None]
    status_gen: int
    hashes: dict[str, dict[str, HashValue]]
    drained: bool  # after this batch, the backlog is delivered
    keep_from: int  # the oldest seq whose refusal Redis must keep and report (an undecided entry's, or the batch's)
    # not 0: it carries again what a send carried (up to this seq), and one was applied: the dedup state must be in
    # Redis, and where it is not, the script looks for what those sends wrote (workers/redis_writer.py)
    expected: int
    sent_max_before: int  # the Publisher's _sent_max before this round
    forget: bool = False  # the DEL of its dedup state at a clean close, and nothing else

    @property
    def idle(self) -> bool:  # nothing to write: the send is a PING that tells whether Redis answers
        return not (self.batch or self.statuses or self.hashes or self.forget)


_UNSENT = object()


class WriterThread:
    """One Redis connection and one thread that write for one or more Publishers: a camera process's cameras
    share one, so a wake-up sends what all of them queued in one round trip (their script calls pipelined)
    instead of a wake-up and a round trip per camera. Each Publisher keeps its own queue, counters, backoff
    and exactly-once state (its script call is still all-or-nothing on its own); only the I/O is shared."""

    def __init__(self, url: str, name: str = "hydravision", connect_timeout_s: float = 2.0,
                 socket_timeout_s: float = 2.0, **redis_kwargs: Any) -> None:
        """redis_kwargs go to redis.Redis.from_url, e.g. ssl_ca_certs for rediss:// URLs."""
        self.url = url
        try:
            # Retries are ours (ordered, bounded, backoff): redis-py must fail fast, not retry inside a call.
            self.client = redis.Redis.from_url(
                url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s,
                health_check_interval=30, client_name=name, retry=Retry(FullJitterBackoff(), 0),
                **redis_kwargs)
        except ValueError as exc:
            raise ValueError(redact_text(str(exc), [url])) from None
        lock = threading.RLock()  # guards the Publishers' state as well; never held during I/O
        self.work = threading.Condition(lock)  # the thread waits on it; publish_* notify it
        self.done = threading.Condition(lock)  # flush() and close() wait on it; notified after each send
        self._publishers: list[Publisher] = []
        self._stopping = False
        self.round_trips = 0  # sends, each carrying what every due Publisher had (written by the thread only)
        # The last round trip failed, or none was made yet (Redis may be down at start): the next send begins
        # with a PING (see _send)
        self._ping_first = True
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def publisher(self, prefix: str = "hv", maxlen: int = 10_000, buffer: int = 2_000,
                  max_backoff_s: float = 5.0, name: str = "hydravision") -> "Publisher":
        """A (not yet started) Publisher that writes through this thread and connection; ``name`` is in its log
        lines (a camera's: the cameras of a process share the thread, and each one's outage and drops are its own)."""
        return Publisher(self.url, prefix, maxlen, buffer, name=name, max_backoff_s=max_backoff_s, writer=self)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _attach(self, publisher: "Publisher") -> None:
        with self.work:
            if self._stopping:
                raise RuntimeError("this WriterThread is closed")
            self._publishers.append(publisher)
            if not self._thread.is_alive():
                self._thread.start()
            self.work.notify()

    def _detach(self, publisher: "Publisher") -> None:
        with self.work:
            if publisher in self._publishers:
                self._publishers.remove(publisher)
                publisher._disconnected()

    def close(self, timeout: float = 5.0) -> None:
        """Stops the thread (its Publishers write no more); returns within about ``timeout``. Idempotent."""
        with self.work:
            self._stopping = True
            self.work.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.client.close()

    def _run(self) -> None:
        worker_thread("hv-publisher")
        while True:
            with self.work:
                rounds = self._wait_for_rounds()
            if rounds is None:
                break
            began = time.monotonic()
            outcomes, sent = self._send(rounds)
            for (publisher, round_), outcome in zip(rounds, outcomes):
                try:
                    publisher._finish(round_, outcome, began, sent)
                except Exception:  # a bug in one camera's bookkeeping must not stop the other cameras' writes
                    log.exception("publisher %s: settling a send failed", publisher.name)
                    with self.work:
                        publisher._in_flight = False
        with self.work:
            for publisher in self._publishers:
                publisher._disconnected()
        self.client.close()

    def _wait_for_rounds(self) -> list[tuple["Publisher", _Round]] | None:
        """Under the lock: waits until a Publisher is due to send (None once closing), and takes its round."""
        while not self._stopping:
            now = time.monotonic()
            due = [p for p in self._publishers if p._due(now)]
            if due:
                return [(p, p._take()) for p in due]
            later = [p._retry_at - now for p in self._publishers if p._retry_at > now]
            self.work.wait(min([1.0, *later]))
        return None

    def _send(self, rounds: list[tuple["Publisher", _Round]]) -> tuple[list[Any], bool]:
        """One round trip for all rounds (another after a script load): each round's WriteResult, None for an
        idle round when Redis answered, or the exception its send failed with; and whether the calls were sent.
        After a failed round trip (and before the first) a PING goes first: while Redis cannot be reached no send
        goes out, so the messages the retries carry are not kept as maybe in Redis (for as long as the outage
        lasts). Else the connection is made ready first (``_connect``): a send refused there did not leave either."""
        outcomes: list[Any] = [_UNSENT] * len(rounds)
        todo = [i for i, (_, r) in enumerate(rounds) if not r.idle]
        sent = False
        try:
            if self._ping_first and todo:
                self.client.ping()
            elif todo:
                self._connect()
            sent = True
            for attempt in range(3):  # a script load, then a switch to the bodies without shebang: twice at most
                commands = [p._batch_writer.forget_command() if r.forget else
                            p._batch_writer.batch_command(r.trip, r.batch, r.statuses, r.hashes, r.keep_from,
                                                          r.expected)
                            for p, r in (rounds[i] for i in todo)]
                replies = self._execute(commands)
                outcomes = [None if o is _UNSENT and r.idle else o for o, (_, r) in zip(outcomes, rounds)]
                for i, reply in zip(todo, replies):
                    outcomes[i] = self._outcome(rounds[i], reply, last=attempt == 2)
                todo = [i for i in todo if outcomes[i] is _UNSENT]
                if not todo:
                    break
            self._ping_first = False
        except Exception as exc:  # noqa: BLE001 - the round trip failed (connection, timeout): what it carried failed
            outcomes = [exc if o is _UNSENT else o for o in outcomes]
            self._ping_first = True
        if any(isinstance(o, redis.exceptions.ReadOnlyError) for o in outcomes):
            # A replica now (a failover): a new connection reaches what the URL names now, as redis-py's
            # Sentinel client does; this one would be refused until the process restarts.
            self.client.connection_pool.disconnect()
        return outcomes, sent

    def _connect(self) -> None:
        """Checks out a connection and gives it back: the pool makes it again where Redis closed it (a restart).
        A failure here sent nothing, which one inside the call cannot tell: the first batch after a restart,
        refused at connecting, counted as a send whose reply was lost, and its state outlived a clean close."""
        pool = self.client.connection_pool
        try:
            connection = pool.get_connection()
        except TypeError:  # redis-py before 5.3 asks for a command name
            connection = pool.get_connection("PING")
        pool.release(connection)

    @staticmethod
    def _outcome(item: tuple["Publisher", _Round], reply: Any, last: bool) -> Any:
        """A reply as a WriteResult or an exception; _UNSENT when the call must be sent again (script loaded)."""
        publisher, round_ = item
        try:
            if isinstance(reply, redis.exceptions.ResponseError):
                publisher._batch_writer.send_again_after(reply)  # raises unless the call applied nothing
                return reply if last else _UNSENT
            if round_.forget:
                return None
            return publisher._batch_writer.batch_result(round_.trip, reply)
        except Exception as exc:  # noqa: BLE001 - this Publisher's send failed (out of memory, a stale trip)
            return exc

    def _execute(self, commands: list[tuple]) -> list[Any]:
        """The replies of ``commands`` in one round trip (a ResponseError where Redis refused one); none: a PING."""
        self.round_trips += 1
        if not commands:
            return [self.client.ping()]  # raises what a refused PING gets, as any failed round trip
        if len(commands) == 1:  # no pipeline to build
            try:
                return [self.client.execute_command(*commands[0])]
            except redis.exceptions.ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)


class Publisher:
    """Writes messages to Redis from a background thread; callers never block on Redis."""

    def __init__(self, url: str, prefix: str = "hv", maxlen: int = 10_000, buffer: int = 2_000,
                 name: str = "hydravision", connect_timeout_s: float = 2.0, socket_timeout_s: float = 2.0,
                 max_backoff_s: float = 5.0, writer: WriterThread | None = None, **redis_kwargs: Any) -> None:
        """redis_kwargs go to redis.Redis.from_url, e.g. ssl_ca_certs for rediss:// URLs. ``writer``: a
        WriterThread shared with other Publishers (``WriterThread.publisher``; its URL and connection options
        then apply); None: one of its own, closed with it."""
        if buffer < 1 or maxlen < 1:
            raise ValueError(f"buffer and maxlen must be >= 1, got {buffer} and {maxlen}")
        self._url, self.keys, self.maxlen, self.buffer = url, Keys(prefix), maxlen, buffer
        self.name = name  # in its log lines: whose messages (a camera's publisher is "hydravision-<camera id>")
        self._own_writer = writer is None
        self._writer = writer or WriterThread(url, name, connect_timeout_s, socket_timeout_s, **redis_kwargs)
        self.id = secrets.token_hex(8)  # names this instance's dedup state in Redis (workers/redis_writer.py)
        self._batch_writer = BatchWriter(self._writer.client, self.keys.publisher(self.id), self.keys.cameras,
                                         maxlen)
        self._backoff = FullJitterBackoff(cap=max_backoff_s, base=0.05)
        # The lock guards everything below and is the WriterThread's (shared by its Publishers); never held
        # during I/O. _work wakes the thread; _done wakes flush() and close() after a send.
        self._lock, self._work, self._done = self._writer.work, self._writer.work, self._writer.done
        self._queue: deque[_Entry] = deque()
        self._own_queued = 0  # of them the Publisher's own events, which stats()["queued"] leaves out as "sent" does
        self._status: dict[str, str | None] = {}  # camera -> JSON, or None to delete
        self._hashes: dict[str, dict[str, HashValue]] = {}  # key -> fields, see set_hash
        self._status_gen = self._status_done = 0
        self._seq = self._acked = self._own_seq = self._trip = 0
        self._sent_max = 0  # highest seq any send carried: an entry dropped at or below it may be in Redis
        self._undecided: list[_Entry] = []  # such entries, until the next write tells which reached Redis
        self._unreported: dict[str, int] = {}  # camera -> drops not yet announced by publisher_dropped
        self._episode: _Episode | None = None
        self._stats = {"sent": 0, "dropped": 0, "rejected": 0, "retries": 0, "reconnects": 0,
                       "round_trips": 0}
        self._connected, self._last_error = False, None
        self._started = self._closed = False
        # The WriterThread's view, written by it: a send in flight, failures in a row, when the next try may
        # go (monotonic), the last send that reached Redis (monotonic).
        self._in_flight, self._failures, self._retry_at, self._last_ok = False, 0, 0.0, 0.0
        self._applied = False  # a batch of it was applied: its dedup state must be in Redis from now on
        # A send failed after it left (no reply): it may still reach Redis (a frozen one), so its dedup state
        # must outlive close, unless Redis is found to have lost its data since (_settle). _forget: close asks
        # the thread to delete that state (nothing can need it).
        self._unanswered = self._forget = False
        self._refusals_logged_at = -math.inf  # monotonic; see REFUSALS_LOG_S
        self._refusals = Counter()  # refused messages, other writes and batches not logged yet
        self._refusal_texts: list[str] = []  # the reasons of the latest batch with refusals

    def start(self) -> "Publisher":
        """From now on the WriterThread sends what this Publisher queued (also what it queued before)."""
        if not self._started and not self._closed:
            self._writer._attach(self)
            self._started = True
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

    def set_hash(self, key: str, fields: dict[str, HashValue]) -> None:
        """Replaces the hash ``key`` with ``fields`` (bytes allowed): latest value wins, like set_status, and it
        is written inside the next batch's atomic script, so it never shows counts older than the events sent
        with them. Not buffered beyond that latest value; not written while Redis is out of memory. Values are
        str, bytes, int or float (numpy numbers are taken as theirs); others raise TypeError here."""
        fields = {_hash_item(key, "field name", name): _hash_item(key, f"field {name!r}", value)
                  for name, value in fields.items()}
        with self._lock:
            self._hashes[key] = fields
            self._status_gen += 1
            self._work.notify()

    def _set_status(self, camera: str, data: str | None) -> None:
        with self._lock:
            self._status[camera] = data
            self._status_gen += 1
            self._work.notify()

    def _enqueue(self, camera: str, stream: str, live: str | None, data: str) -> None:
        with self._lock:
            if self._closed:
                self._drop(camera)  # a late publish during shutdown is counted, not raised
                return
            self._append(camera, stream, live, data)

    def _append(self, camera: str, stream: str, live: str | None, data: str,
                own: dict[str, int] | None = None) -> None:
        self._seq += 1
        self._queue.append(_Entry(self._seq, camera, stream, live, data, own))
        self._own_queued += own is not None
        while len(self._queue) > self.buffer:
            oldest = self._popleft()
            if oldest.seq <= self._sent_max:  # a send that may have reached Redis carried it
                self._undecided.append(oldest)
            else:
                self._lost(oldest)
        self._work.notify()

    def _popleft(self) -> _Entry:
        entry = self._queue.popleft()
        self._own_queued -= entry.own is not None
        return entry

    def _publish_own(self, event: dict, drops: dict[str, int] | None = None) -> None:
        """Queue one of the Publisher's own events; flush() waits for it too. Call with the lock held. A closed
        Publisher sends nothing more: the event would only push a message out of its queue, counted dropped."""
        if self._closed:
            return
        self._append(event["camera"], self.keys.events, None, encode(event), drops or {})
        self._own_seq = self._seq

    def _lost(self, entry: _Entry) -> None:
        if entry.own is None:
            self._drop(entry.camera)
            return
        for camera, count in entry.own.items():  # a lost drop report: its drops go into the next one
            self._unreported[camera] = self._unreported.get(camera, 0) + count

    def _drop(self, camera: str) -> None:
        self._stats["dropped"] += 1
        self._unreported[camera] = self._unreported.get(camera, 0) + 1

    # --- flushing and shutdown
    def flush(self, timeout: float = 5.0) -> bool:
        """True when everything queued before this call has reached Redis (or was dropped, see stats), and so
        have the publisher_dropped / publisher_error events that the delivery itself caused."""
        with self._lock:
            target, status_target = self._seq, self._status_gen
            writing = self._started and not self._closed and self._writer.alive
            return self._done.wait_for(  # nothing sends for it (not started, or closed): nothing will change
                lambda: self._acked >= max(target, self._own_seq) and self._status_done >= status_target,
                timeout if writing else 0)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, then stop writing (and the thread, if it is this Publisher's own); returns within about
        `timeout` even if Redis is gone. Idempotent."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        with self._lock:  # a retry after a failure may be due later than the timeout: one goes now
            self._retry_at = 0.0
            self._work.notify()
        self.flush(timeout * 0.8)
        with self._lock:
            self._closed = True
            # A send in flight decides what of it reached Redis: wait for it, within the time left.
            self._done.wait_for(lambda: not self._in_flight, max(0.0, deadline - time.monotonic()))
            if self._refusals:  # counted since the last such line: said before the end, not never
                self._say_refusals()
            left = len(self._queue) - self._own_queued  # after that send: what it delivered is no longer queued
            if not self._in_flight and self._clean():
                self._forget = True
                self._work.notify()
                self._done.wait_for(lambda: not (self._forget or self._in_flight),
                                    max(0.0, deadline - time.monotonic()))
                self._forget = False
            abandoned = self._in_flight
        if abandoned:
            # Redis froze mid-send. What it received already runs when it wakes, before anything written after
            # close (camera_removed); the send's next step (its call after a reconnect or a PING) must never leave:
            # cutting the connection fails the step blocked on it, and so the send, at once (the others retry).
            self._writer.client.connection_pool.disconnect()
        self._writer._detach(self)
        if self._own_writer:
            self._writer.close(max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("publisher %s closed with %d messages not delivered to Redis", self.name, left)

    def _clean(self) -> bool:
        """Under the lock: everything reached Redis and every send was answered (or lost with a Redis that restarted
        without its data since: _settle), so none can still apply and nothing needs the dedup state any more (a
        service adding and removing cameras left one per camera)."""
        return (self._started and self._writer.alive and not self._unanswered
                and not (self._queue or self._status or self._hashes or self._undecided))

    def stats(self) -> dict:
        """Counters, plus what a camera status needs: failing (writes fail now), failing_since (unix seconds of
        the first failure of this episode, else None), last_error (redacted; kept after recovery)."""
        with self._lock:
            return {**self._stats, "connected": self._connected, "last_error": self._last_error,
                    "failing": self._episode is not None,
                    "failing_since": self._episode.since if self._episode else None,
                    "queued": len(self._queue) - self._own_queued, "statuses_pending": len(self._status),
                    "hashes_pending": len(self._hashes)}

    # --- the WriterThread's side: _due and _take under the lock, the send outside it, then _finish
    def _due(self, now: float) -> bool:
        """Whether to send now: something waits, or (nothing waits) a PING tells whether Redis answers: at
        once for a new Publisher, after the backoff while failing, every IDLE_PING_S while connected."""
        if self._in_flight or now < self._retry_at:
            return False
        if self._closed:
            return self._forget
        return bool(self._queue or self._status or self._hashes) or not self._connected \
            or now - self._last_ok >= IDLE_PING_S

    def _take(self) -> _Round:
        batch = list(itertools.islice(self._queue, MAX_BATCH))
        statuses, status_gen = dict(self._status), self._status_gen
        hashes, self._hashes = self._hashes, {}
        sent_max_before = self._sent_max
        expected = sent_max_before if self._applied and batch and batch[0].seq <= sent_max_before else 0
        self._status.clear()
        self._sent_max = max(self._sent_max, batch[-1].seq if batch else 0)
        self._trip += 1
        self._in_flight = True
        keep_from = min([batch[0].seq] + [e.seq for e in self._undecided]) if batch else 0
        forget, self._forget = self._forget, False
        return _Round(self._trip, batch, statuses, status_gen, hashes, len(batch) == len(self._queue), keep_from,
                      expected, sent_max_before, forget)

    def _finish(self, round_: _Round, outcome: WriteResult | Exception | None, began: float,
                sent: bool = True) -> None:
        """The outcome of a send that began at ``began`` (monotonic): its result, None (a PING answered) or
        the exception it failed with; ``sent``: False when it never left (Redis could not be reached). Called
        by the WriterThread without the lock."""
        if round_.forget:  # the state's DEL at a clean close: if it failed, the state expires as before
            with self._lock:
                self._in_flight = False
                self._done.notify_all()
            if isinstance(outcome, Exception):
                log.debug("publisher %s: state %s not deleted: %s", self.name, self._batch_writer.state_key,
                          self._redact(f"{type(outcome).__name__}: {outcome}"))
            return
        if not isinstance(outcome, Exception):
            self._failures, self._last_ok = 0, time.monotonic()
            self._succeeded(round_, outcome)
        else:
            self._failures += 1
            left = round_.statuses
            if round_.statuses and isinstance(outcome, redis.exceptions.OutOfMemoryError):
                left = self._write_statuses_despite_oom(round_.statuses)
            # Neither a send that never left nor one Redis answered with an error (refused whole: out of memory,
            # a read-only replica, MISCONF, NOREPLICAS; or stopped at the script's first write) applied anything.
            self._failed(outcome, began, round_, left,
                         applied=sent and not round_.idle  # a PING alone carried nothing
                         and not isinstance(outcome, redis.exceptions.ResponseError))
        with self._lock:
            if self._closed and self not in self._writer._publishers:  # detached while this send was in flight
                self._disconnected()

    def _disconnected(self) -> None:
        """Detached from its WriterThread, or the thread stopped. Under the lock."""
        self._connected = False
        if not self._in_flight:  # else that send decides them (it may carry them), and _finish comes back here
            for entry in self._undecided:  # never to be known: count them lost rather than claim them sent
                self._lost(entry)
            self._undecided.clear()
        self._done.notify_all()

    def _write_statuses_despite_oom(self, statuses: dict[str, str | None]) -> dict[str, str | None]:
        """Redis is out of memory: write the statuses alone (they say why nothing else arrives). Returns
        those still to write: none, or all of them if this failed too."""
        with self._lock:
            self._trip += 1
            trip = self._trip
        try:
            errors = self._batch_writer.write_statuses(trip, statuses)
        except Exception as exc:  # noqa: BLE001 - they stay pending, like the batch
            with self._lock:
                self._unanswered = True
            log.debug("publisher %s: camera statuses not written either: %s", self.name,
                      self._redact(f"{type(exc).__name__}: {exc}"))
            return statuses
        if errors:
            log.error("publisher %s: Redis rejected a camera status write: %s", self.name, self._redact(errors[0]))
        return {}

    def _succeeded(self, round_: _Round, result: WriteResult | None) -> None:
        with self._lock:
            self._in_flight = False
            self._stats["round_trips"] += 1
            if not self._connected and self._stats["retries"]:
                self._stats["reconnects"] += 1
                log.warning("publisher %s reconnected to Redis", self.name)
            self._connected = True
            if result is not None:
                self._applied = True
                self._settle(round_.batch, result)
            self._status_done = max(self._status_done, round_.status_gen)
            if self._episode is not None and not (round_.idle and self._episode.writes):
                self._end_episode()
            if round_.drained and self._unreported:  # announce drops after what was kept
                report, self._unreported = self._unreported, {}
                camera = next(iter(report)) if len(report) == 1 else ALL_CAMERAS
                self._publish_own(event_message("publisher_dropped", camera, dropped=sum(report.values())), report)
            self._done.notify_all()

    def _settle(self, batch: Sequence[_Entry], result: WriteResult) -> None:
        """Count a written batch, and decide the fate of entries dropped after an earlier send carried them."""
        rejected = {i for i, _ in result.rejected}
        if batch:
            while self._queue and self._queue[0].seq <= batch[-1].seq:
                self._popleft()
            self._acked = max(self._acked, batch[-1].seq)
            mine = [i not in rejected for i, e in enumerate(batch) if e.own is None]
            self._stats["sent"] += sum(mine)
            self._stats["rejected"] += len(mine) - sum(mine)
        for entry in self._undecided:
            if batch and batch[0].seq <= entry.seq <= batch[-1].seq:
                continue  # this very send carried it: counted above
            if entry.seq <= result.prior_seq:  # an earlier send reached Redis after all
                self._stats["rejected" if -entry.seq in rejected else "sent"] += int(entry.own is None)
            else:  # no send applied it, and none older can now (they are stale): lost
                self._lost(entry)
        self._undecided.clear()
        errors = [e for e in result.errors if not isinstance(e, StateGone)]
        for gone in result.errors:
            if isinstance(gone, StateGone):  # no refusal: said apart, at the level of what it may have done
                self._log_state_gone(gone)
                if not gone.doubled:  # Redis lost its data (a restart): the sends whose reply was lost went with
                    # the Redis that had them, none can still apply, so the state this batch wrote anew need not
                    # outlive a clean close (a flush with one still on its way: a loss not covered, module docstring).
                    # Evicted alone, they may still come: it must.
                    self._unanswered = False
        if result.rejected or errors:
            # Permanent (wrong key type): retrying cannot help and would block everything behind it, so
            # those messages are lost, counted and logged. A failed PUBLISH or status write is logged.
            texts = [self._redact(t) for t in [r for _, r in result.rejected] + errors]
            self._last_error = texts[0]
            self._log_refusals(len(result.rejected), len(errors), texts)
        elif self._refusals and time.monotonic() - self._refusals_logged_at >= REFUSALS_LOG_S:
            self._say_refusals()  # refusals that stopped: those counted since the last line, said once

    def _log_state_gone(self, gone: StateGone) -> None:
        """A resend found the dedup state gone. Under the lock."""
        if not gone.doubled:  # a restart without persistence took the lost send's writes too: a loss, not a double
            log.warning("publisher %s: Redis lost its data: %s", self.name, gone)
            return
        self._last_error = str(gone)
        log.error("publisher %s: %s", self.name, gone)

    def _log_refusals(self, messages: int, writes: int, texts: list[str]) -> None:
        """Logs a batch's refusals (``texts``, redacted): the first at once, then at most every REFUSALS_LOG_S,
        counting the batches in between. Under the lock."""
        self._refusals.update(messages=messages, writes=writes, batches=1)
        self._refusal_texts = texts
        if time.monotonic() - self._refusals_logged_at >= REFUSALS_LOG_S:
            self._say_refusals()

    def _say_refusals(self) -> None:
        """The refusals counted since the last such line, in one (the latest batch's reasons). Under the lock."""
        n, self._refusals, self._refusals_logged_at = self._refusals, Counter(), time.monotonic()
        log.error("publisher %s: Redis rejected %d message(s) and %d other write(s) of %s: %s",
                  self.name, n["messages"], n["writes"],
                  "a batch" if n["batches"] == 1 else f"{n['batches']} batches since the last such report",
                  "; ".join(list(dict.fromkeys(self._refusal_texts))[:3]))

    def _end_episode(self) -> None:
        episode, self._episode = self._episode, None
        assert episode is not None
        duration = round(time.monotonic() - episode.start, 3)
        camera = next(iter(episode.cameras)) if len(episode.cameras) == 1 else ALL_CAMERAS
        self._publish_own(event_message("publisher_error", camera, reason=episode.reason, duration_s=duration,
                                        retries=episode.failures))
        # the drops too: counted in stats and publisher_dropped events, no log line said them (a buffer that overflowed
        # during an outage read as a clean recovery)
        dropped = self._stats["dropped"] - episode.dropped_before
        log.warning("publisher %s writes to Redis again after %.1f s and %d failed attempts (first error: %s)%s",
                    self.name, duration, episode.failures, episode.reason,
                    f"; {dropped} messages dropped meanwhile (its buffer of {self.buffer} was full)" if dropped else "")

    def _failed(self, exc: Exception, began: float, round_: _Round, left: dict[str, str | None],
                applied: bool = True) -> None:
        """began: monotonic time the failed attempt started (a timeout is noticed seconds later); left: the
        round's statuses still to write (none when written despite the error, see _finish); applied: False
        when the send certainly applied nothing."""
        text = self._redact(f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._in_flight = False
            self._unanswered |= applied
            if not applied:  # what only this send carried is not in Redis: dropped meanwhile, it is lost now
                self._sent_max = round_.sent_max_before
                lost = [e for e in self._undecided if e.seq > self._sent_max]
                self._undecided = [e for e in self._undecided if e.seq <= self._sent_max]
                for entry in lost:
                    self._lost(entry)
            # at most 2**32 x base, far past the cap: redis-py 5.0 computed base * 2**failures, a float overflow
            # (OverflowError in the writer thread) after ~1000 failures in a row, some 40 minutes of an outage
            self._retry_at = time.monotonic() + self._backoff.compute(min(self._failures, 32))
            for camera, data in left.items():  # put back unless a newer value came meanwhile
                self._status.setdefault(camera, data)
            for key, fields in round_.hashes.items():
                self._hashes.setdefault(key, fields)
            if round_.statuses and not left and not round_.hashes:  # written despite the error (out of memory)
                self._status_done = max(self._status_done, round_.status_gen)
            self._stats["retries"] += 1
            # Redis answered with a refusal (out of memory, MISCONF): still connected, so no PING is due and no
            # "reconnected" follows; a read-only replica's connection is cut (WriterThread._send). An answer after a
            # lost connection, a refusal too (Redis back, and full), is its reconnect: counted and said once.
            answered = (isinstance(exc, redis.exceptions.ResponseError)
                        and not isinstance(exc, redis.exceptions.ReadOnlyError))
            if answered and not self._connected and self._stats["retries"] > 1:  # a failure before this one
                self._stats["reconnects"] += 1
                log.warning("publisher %s reconnected to Redis", self.name)
            self._connected = answered
            self._last_error = text
            first = self._episode is None
            if first:
                self._episode = _Episode(since=time.time() - (time.monotonic() - began), start=began, reason=text,
                                         dropped_before=self._stats["dropped"])
            self._episode.failures += 1
            self._episode.writes |= not round_.idle
            self._episode.cameras.update([e.camera for e in round_.batch if e.own is None] + list(round_.statuses))
            self._done.notify_all()
        if first:
            log.warning("publisher %s cannot write to Redis (%s); keeping up to %d messages, retrying",
                        self.name, text, self.buffer)

    def _redact(self, text: str) -> str:
        return redact_text(text, [self._url])
