"""The dashboard's reading of Redis: ``Hub`` reads in two threads and fans what it read out to the open pages.

A poller every ``interval_s`` (camera statuses, each camera's latest detection message, counts and snapshot)
and an events reader blocked on ``XREAD {prefix}:events`` (an event reaches the pages within a round trip
of its XADD). What they read is shaped by pipeline/dashboard_data.py, scrubbed of credentials, encoded once,
and handed to the web server's event loop (``loop.call_soon_threadsafe``), which puts it into every open
page's queue (pipeline/dashboard.py streams those as Server-Sent Events). Pages never poll: the JPEG of a
snapshot is fetched when a pushed tile names a new one, from the Hub's copy (one Redis read per snapshot,
whatever the number of pages). A page that falls behind is disconnected and, as EventSource does,
reconnects and starts again from a fresh ``hello``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections import deque
from typing import Any

import redis

from pipeline import dashboard_data as data
from pipeline.dashboard_control import control_reachable
from pipeline.status import read_camera_statuses
from workers.publish import entry_order, keys
from workers.redact import redact_text

log = logging.getLogger(__name__)

EVENTS_BACKLOG = 300  # events a page gets when it opens
CLIENT_QUEUE = 256  # messages waiting for one page; more and it is disconnected (it reconnects afresh)
CLIENT_QUEUE_BYTES = 32 * 2**20  # and their size (JSON, ASCII): 256 ticks of 2000 cameras are 300 MB
MAX_DEPTH = 32  # arrays/objects nested deeper in an entry are refused: encoding them for the pages recurses per level
MAX_EVENT_BYTES = 64 * 1024  # an event larger is kept cut down (the pipeline's are under 2 kB; 300 go in every hello)
SNAPSHOT_READS_PER_TRIP = 100  # changed pictures read in one pipeline: 10 MB of 100 kB JPEGs, not all in one reply
HELLO_PICTURES_BYTES = 8 * 2**20  # JPEG bytes inlined in one hello (32 cameras of 100 kB); the page fetches the rest


# chart points per camera in a hello: a chart is ~260 px wide (960 in the detail view), and the page adds one a tick.
# All of them, 2000 cameras' 5 minutes at 1 s were 600,000 points and 0.7 s of the server's loop per page opened.
HELLO_CHART_POINTS = 100


def sse(kind: str, payload: str) -> str:
    return f"event: {kind}\ndata: {payload}\n\n"


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failed reads in a row: 0.5, 1, then 2 (the power is capped: 0.25 * 2 **
    1024 is an OverflowError, which ended the reader threads half an hour into a Redis outage)."""
    return 0.25 * 2 ** min(failures, 3)


def thin(points: list, most: int = HELLO_CHART_POINTS) -> list:
    """At most ``most`` of a camera's chart points, evenly spaced, the newest kept."""
    step = -(-len(points) // most)
    return points[(len(points) - 1) % step::step] if step > 1 else points


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays or objects nest deeper than ``limit`` in ``value`` (by hand, without recursion: a few hundred
    levels that json.loads took failed scrub's recursion later, in every page's hello)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth >= limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


class PageQueue(asyncio.Queue):
    """One page's messages, full at CLIENT_QUEUE of them or CLIENT_QUEUE_BYTES: counted in messages alone, a page
    that stopped reading (a laptop asleep) held 256 ticks, 1.2 MB each with 2000 cameras, for minutes."""

    def __init__(self) -> None:
        super().__init__(CLIENT_QUEUE)
        self.chars = 0

    def full(self) -> bool:
        return super().full() or self.chars >= CLIENT_QUEUE_BYTES

    def _put(self, item: str | None) -> None:
        self.chars += len(item or "")
        super()._put(item)

    def _get(self) -> str | None:
        item = super()._get()
        self.chars -= len(item or "")
        return item


class Hub:
    """Reads Redis in two threads and fans what it read out to the pages' queues on the web server's loop."""

    def __init__(self, redis_url: str, prefix: str = "hv", interval_s: float = 1.0, history_s: float = 300.0,
                 events_backlog: int = EVENTS_BACKLOG, allow_control: bool = False):
        self.url, self.prefix, self.interval_s = redis_url, prefix, interval_s
        self.allow_control = allow_control
        self.control = False  # a controller reads the control stream now (only looked at when allowed)
        self.keys = keys(prefix)
        self.board = data.Board(history_s)
        self.events: deque[dict] = deque(maxlen=events_backlog)
        self.snapshots: dict[str, tuple[str, bytes]] = {}  # camera -> (version, jpeg)
        # camera -> (marker, (version, frame, ts) or None, jpeg) of the picture last read whole (the poller's own)
        self._snapshot_reads: dict[str, tuple[tuple, tuple | None, bytes | None]] = {}
        self.redis: dict[str, Any] = {"ok": None, "error": None, "since": None}
        self._lock = threading.Lock()  # guards board, events, snapshots, redis
        self._queues: set[asyncio.Queue] = set()  # touched on the loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.polls = 0

    # --- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> "Hub":
        self._loop = loop
        for target, name in ((self._poll_loop, "dashboard-poll"), (self._events_loop, "dashboard-events")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.close_pages()

    @property
    def stopping(self) -> threading.Event:
        """Set once the Hub stops (a control request waiting for its answer then gives up)."""
        return self._stop

    def close_pages(self) -> None:
        """Ends every page's stream (from any thread); their EventSource reconnects to whoever serves next."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fanout, None)
            except RuntimeError:  # the loop closed in between
                pass

    def _client(self) -> redis.Redis:
        # The events reader blocks 1 s in XREAD: the socket timeout must be longer.
        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5,
                                    client_name="hydravision-dashboard")

    def describe(self, exc: BaseException) -> str:
        """An exception as one line, with the Redis URL's credentials hidden."""
        return redact_text(f"{type(exc).__name__}: {exc}", [self.url])[:300]

    # --- pages (on the loop)
    def subscribe(self) -> tuple[asyncio.Queue, str]:
        """A queue for a new page and the ``hello`` it starts from; call on the loop, with no await between
        the two (the fan-out also runs on the loop, so nothing falls between them; events may come twice and
        the page drops repeats by their stream id)."""
        q = PageQueue()
        self._queues.add(q)
        return q, self.hello_text()

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._queues.discard(q)

    def hello(self) -> dict:
        with self._lock:
            return {"prefix": self.prefix, "interval_s": self.interval_s, "redis": dict(self.redis),
                    "control": self.control,
                    "cameras": self.board.all(), "history": self.board.histories(), "events": list(self.events),
                    "now": time.time()}

    def hello_text(self, pictures: bool = True) -> str:
        """The hello, with the cameras' current pictures inline (as data: URLs) up to HELLO_PICTURES_BYTES: a page
        opening on 32 cameras draws them all from this one response instead of 32 requests queued behind the
        browser's six connections per host (one of them held by the stream). Past it the page fetches them as for
        a tick: with every picture inline, 2000 cameras' hello was 150 MB, built on the server's loop per page."""
        hello = self.hello()
        history = {data.scrub(c, [self.url]): thin(points) for c, points in hello.pop("history").items()}
        # the chart points are numbers only (Board.update): scrubbed with the rest they took seconds per page
        text = f'{self._encode(hello)[:-1]},"history":{json.dumps(history, separators=(",", ":"), allow_nan=False)}}}'
        if not pictures:
            return text
        with self._lock:
            inline, budget = {}, HELLO_PICTURES_BYTES
            for c in sorted(self.snapshots):  # by camera id, as the page lays its tiles out: the first come inline
                v, jpeg = self.snapshots[c]
                if len(jpeg) > budget:
                    break
                budget -= len(jpeg)
                inline[c] = (v, base64.b64encode(jpeg).decode())
        extra = json.dumps({data.scrub(c, [self.url]): {"v": v, "data": f"data:image/jpeg;base64,{b64}"}
                            for c, (v, b64) in inline.items()}, separators=(",", ":"))  # ids as in the tiles
        return f'{text[:-1]},"pictures":{extra}}}'

    def redis_ok(self) -> bool:
        with self._lock:
            return bool(self.redis["ok"])

    def snapshot(self, camera: str) -> tuple[str, bytes] | None:
        with self._lock:
            return self.snapshots.get(camera)

    def _fanout(self, message: str | None) -> None:
        for q in list(self._queues):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:  # a page that cannot keep up starts again from a fresh hello
                self._queues.discard(q)
                while not q.empty():  # of no use to it now: not held while its connection stalls, maybe for hours
                    q.get_nowait()
                q.put_nowait(None)

    def _publish(self, kind: str, payload: Any) -> None:
        """From a reader thread: encode once, scrubbed, and queue for every page."""
        message = sse(kind, self._encode(payload))
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fanout, message)
            except RuntimeError:
                pass

    def _encode(self, payload: Any) -> str:
        return json.dumps(data.scrub(payload, [self.url]), separators=(",", ":"), allow_nan=False, default=str)

    def _redis_state(self, ok: bool, error: str | None = None) -> None:
        """The poller's view of Redis; a change is pushed to the pages (they show a notice)."""
        with self._lock:
            if self.redis["ok"] == ok:
                return
            self.redis = {"ok": ok, "error": error, "since": round(time.time(), 3)}
            state = dict(self.redis)
        (log.info if ok else log.warning)("dashboard: Redis %s", "reachable" if ok else f"unreachable: {error}")
        self._publish("redis", state)

    # --- the poller
    def _poll_loop(self) -> None:
        client, failures = self._client(), 0
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.poll(client)
                failures = 0
                self._redis_state(True)
            except (redis.RedisError, OSError) as e:
                failures += 1
                self._redis_state(False, self.describe(e))
            except Exception:  # a bug must not end the page's data: log it, keep polling
                log.exception("dashboard: poll failed")
            wait = self.interval_s if not failures else backoff(failures)
            self._stop.wait(max(0.0, wait - (time.monotonic() - began)))
        client.close()

    def poll(self, client: redis.Redis) -> list[dict]:
        """One read of every camera; pushes the tiles (and returns them)."""
        now, clock = time.time(), time.monotonic()  # wall time for the chart, monotonic for the removals
        statuses = read_camera_statuses(client, self.prefix)  # heartbeats against Redis's clock, not this host's
        pipe = client.pipeline(transaction=False)
        for s in statuses:
            pipe.xrevrange(self.keys.detections(s["camera"]), count=1)
            pipe.hgetall(self.keys.counts(s["camera"]))
            data.queue_snapshot_marker(pipe, self.prefix, s["camera"])
        replies = pipe.execute(raise_on_error=False) if statuses else []
        marks = [data.snapshot_marker(replies[3 * i + 2]) for i in range(len(statuses))]
        kept = self._snapshot_reads  # a picture whose marker is the one last read is not read again
        snaps = self._read_snapshots(client, [s["camera"] for s, mark in zip(statuses, marks)
                                              if mark is None or kept.get(s["camera"], (None,))[0] != mark])
        tiles, pictures, reads = [], {}, {}
        for i, s in enumerate(statuses):
            cam = s["camera"]
            latest, counts, mark = replies[3 * i], replies[3 * i + 1], marks[i]
            detection = None
            if isinstance(latest, list) and latest:
                try:
                    detection = json.loads(latest[0][1][b"data"])
                except (KeyError, ValueError, IndexError, RecursionError):  # RecursionError: nested too deep
                    detection = None
            try:
                if cam not in snaps:  # unchanged
                    _, meta, jpeg = kept[cam]
                else:
                    snap = snaps[cam]
                    if isinstance(snap, Exception):
                        raise snap
                    meta, jpeg = None, None
                    if snap is not None and len(snap[0]) <= data.MAX_SNAPSHOT_BYTES:
                        meta, jpeg = (data.snapshot_version(snap[0], snap[1]), snap[1], snap[2]), snap[0]
                if mark is not None:
                    reads[cam] = (mark, meta, jpeg)
                if meta is not None:
                    pictures[cam] = (meta[0], jpeg)
                tile = data.make_tile(s, detection if isinstance(detection, dict) else None,
                                      data.parse_counts(counts) if isinstance(counts, dict) else None, meta)
                if too_deep(tile):  # kept on the board, it would fail every page's hello
                    raise ValueError(f"arrays or objects nested more than {MAX_DEPTH} deep")
                tiles.append(tile)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                raise  # Redis went away: the poller says so
            except Exception as e:  # one odd entry (another program's, a hand-made one) fails its tile, not the board
                log.warning("dashboard: camera %r: unreadable entry: %s", cam, self.describe(e))
                tiles.append(data.make_tile({"camera": cam, "state": "unreadable",
                                             "last_error": f"unreadable Redis entry: {self.describe(e)}"},
                                            None, None, None))
        control = self.allow_control and control_reachable(client, self.prefix)
        with self._lock:
            self.control = control
            shown = self.board.update(tiles, now, clock)
            # the last picture is kept only for a camera this poll did not read (its tile kept the grace): one whose
            # snapshot went (switched off) was still served, and went inline in every hello
            read = {t["camera"] for t in tiles}
            self.snapshots = {c: pictures.get(c, self.snapshots.get(c)) for c in self.board.tiles
                              if c in pictures or (c in self.snapshots and c not in read)}
            self.polls += 1
        self._snapshot_reads = reads
        self._publish("tick", {"cameras": shown, "now": now, "control": control})
        return shown

    def _read_snapshots(self, client: redis.Redis, cameras: list[str]) -> dict[str, Any]:
        """Each camera's snapshot as ``read_snapshot`` reads it, or the error it raised: their reads pipelined,
        SNAPSHOT_READS_PER_TRIP a round trip (a trip each, 2000 new pictures added 0.6 s to a poll due every 1 s)."""
        snaps: dict[str, Any] = {}
        for start in range(0, len(cameras), SNAPSHOT_READS_PER_TRIP):
            chunk = cameras[start:start + SNAPSHOT_READS_PER_TRIP]
            pipe = client.pipeline(transaction=False)
            for cam in chunk:
                data.queue_snapshot(pipe, self.prefix, cam)
            for cam, reply in zip(chunk, pipe.execute(raise_on_error=False)):
                try:
                    snaps[cam] = data.snapshot_reply(client, self.prefix, cam, reply)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    raise
                except Exception as e:  # that camera's tile says so
                    snaps[cam] = e
        return snaps

    # --- the events reader
    def _events_loop(self) -> None:
        client, last, failures = self._client(), None, 0
        while not self._stop.is_set():
            try:
                if last is None:
                    last = self._backlog(client)
                elif failures:
                    last = self._resume_after(client, last)
                # short: stop() joins this thread, and an event still wakes the read the moment it lands
                reply = client.xread({self.keys.events: last}, block=250, count=500)
                failures = 0
            except (redis.RedisError, OSError) as e:
                failures += 1  # the poller tells the pages of an outage; this one just comes back
                if failures == 1:  # said once: an events key of another type, or one this user may not read, was silent
                    log.warning("dashboard: cannot read %s: %s", self.keys.events, self.describe(e))
                self._stop.wait(backoff(failures))
                continue
            except Exception:  # a bug must not end the events feed until a restart: log it, keep reading
                log.exception("dashboard: reading events failed")
                self._stop.wait(1.0)
                continue
            batch = []
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = self._event(entry_id, fields)
                    if event is not None:
                        batch.append(event)
            if batch:
                try:
                    self._take_events(batch)
                except Exception:  # read past them (``last``): the same entries would fail again
                    log.exception("dashboard: events %s..%s failed", batch[0]["id"], batch[-1]["id"])
        client.close()

    def _backlog(self, client: redis.Redis) -> bytes | str:
        entries = client.xrevrange(self.keys.events, count=self.events.maxlen)
        events = [e for e in (self._event(i, f) for i, f in reversed(entries)) if e is not None]
        with self._lock:
            self.events.extend(events)
        if events:  # old ones: a page opened while Redis was down must not take a camera_removed in them as news
            self._publish("events", {"events": events, "backlog": True})
        return entries[0][0] if entries else "0-0"

    def _resume_after(self, client: redis.Redis, last: bytes | str) -> bytes | str:
        """After an outage: a Redis that restarted empty has a new stream whose ids may lie below ours, read from
        its start; one restored from disk short of its last seconds has ours up to its top: read on from there
        (from the start, every old event went to the pages again as new, old camera_removed ones too)."""
        top = client.xrevrange(self.keys.events, count=1)
        if not top:
            return "0-0"
        top_id = top[0][0]
        if entry_order(top_id) >= entry_order(last):
            return last
        text = top_id.decode() if isinstance(top_id, bytes) else top_id
        with self._lock:
            known = any(e["id"] == text for e in self.events)
        return top_id if known else "0-0"

    def _event(self, entry_id: bytes | str, fields: dict) -> dict | None:
        try:
            event = json.loads(fields[b"data"])
            if not isinstance(event, dict) or too_deep(event):  # kept, it would fail every page's hello
                return None
            if len(fields[b"data"]) > MAX_EVENT_BYTES:  # to what the page shows of it: no list or object, text cut
                event = data.scrub({k: v for k, v in event.items() if not isinstance(v, (dict, list))}, [self.url])
        except (KeyError, ValueError, RecursionError):  # RecursionError: nested too deep to parse
            return None
        event_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return {**event, "id": event_id, "group": data.event_group(str(event.get("type")))}

    def _take_events(self, events: list[dict]) -> None:
        with self._lock:
            self.events.extend(events)
            removed = [e["camera"] for e in events
                       if e.get("type") == "camera_removed" and isinstance(e.get("camera"), str)]
            for cam in removed:  # removed for good: no need to wait for its status to age out
                self.board.remove(cam, at=time.monotonic())  # the poll's clock: no NTP step in between
                self.snapshots.pop(cam, None)
        self._publish("events", {"events": events})
