"""What the dashboard shows, read from Redis alone and shaped for the page: one tile per camera (its status,
its latest detection message, its zone/line counts, its snapshot) and the events feed.

Plain functions and one small class (``Board``) that the tests call without a web server. The Redis layouts
read here, besides the camera statuses and streams of schema v1 (workers/publish.py):

- ``{prefix}:cam:{camera}:snapshot``: the latest annotated JPEG. Read by ``read_snapshot`` and
  ``queue_snapshot_marker`` ONLY, which take a hash (``jpeg``, ``frame``, ``ts``, ...; schema snapshot-v1) or a plain
  string holding the JPEG.
- ``{prefix}:cam:{camera}:counts``: a hash, ``zone:{zone}:{head}:{class}`` -> objects inside now and
  ``line:{line}:{head}:{class}:{in|out}`` -> crossings so far (schema counts-v1); other fields are ignored.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from typing import Any

import redis

from pipeline.status import rates_now, whole_count
from workers.publish import keys
from workers.redact import redact_text, url_secrets

# A tile's state, as an operator reads it; the camera's own state stays in the tile as ``detail``.
UP, RECONNECTING, DOWN = "up", "reconnecting", "down"
_STATE = {"running": UP, "reconnecting": RECONNECTING, "starting": RECONNECTING, "created": RECONNECTING}
# Event types by the group the feed filters on; a type not listed here is "other".
EVENT_GROUPS = {"track_started": "track", "track_ended": "track", "zone_entered": "zone", "zone_left": "zone",
                "line_crossed": "line", "stream_up": "stream", "stream_down": "stream",
                "stream_reconnecting": "stream", "camera_added": "stream", "camera_removed": "stream",
                "camera_updated": "stream", "budget_exceeded": "budget", "budget_recovered": "budget"}
MAX_SNAPSHOT_BYTES = 4 * 2**20  # larger values are not a dashboard snapshot: not cached, not served
GONE_AFTER_S = 10.0  # a camera whose status vanished keeps its tile this long (a Redis restart empties it)
MAX_TEXT = 1000  # characters of one string sent to the page (an error, a name, an event field): longer ones are cut


def _number(raw: Any, kind: type) -> Any:
    try:
        return kind(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError, AttributeError):
        return None


def chart_value(v: Any) -> float | None:
    """``v`` as a finite float for a chart point, else None (a status field may hold anything another program wrote)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:  # an int past any float
        return None
    return v if math.isfinite(v) else None


def read_snapshot(client: redis.Redis, prefix: str, camera: str) -> tuple[bytes, int | None, float | None] | None:
    """(jpeg bytes, frame index, capture unix seconds) of a camera's latest snapshot, or None when it has none.
    ``client`` must return bytes (no decode_responses)."""
    try:
        reply = client.hgetall(keys(prefix).snapshot(camera))
    except redis.ResponseError as e:
        reply = e
    return snapshot_reply(client, prefix, camera, reply)


def queue_snapshot(pipe: Any, prefix: str, camera: str) -> None:
    """Queues on ``pipe`` the read of a camera's snapshot (a poll reads the changed ones in pipelines); its reply
    goes to ``snapshot_reply``."""
    pipe.hgetall(keys(prefix).snapshot(camera))


def snapshot_reply(client: redis.Redis, prefix: str, camera: str, reply: Any) -> tuple | None:
    """``read_snapshot``'s answer from the snapshot key's HGETALL reply (its error too, as a pipeline hands it back).
    The one place that knows the snapshot's layout: a hash with ``jpeg``/``frame``/``ts`` fields, or a plain
    string value (then frame and ts are None, read with a GET on ``client``)."""
    if isinstance(reply, Exception):
        if not isinstance(reply, redis.ResponseError) or "WRONGTYPE" not in str(reply):
            raise reply
        try:
            value = client.get(keys(prefix).snapshot(camera))
        except redis.ResponseError as e:  # a list, a set...: not a snapshot, and no reason to fail the whole poll
            if "WRONGTYPE" not in str(e):
                raise
            return None
        return (value, None, None) if isinstance(value, bytes) and value else None
    jpeg = reply.get(b"jpeg")
    if not jpeg:
        return None
    return jpeg, _number(reply.get(b"frame"), int), _number(reply.get(b"ts"), float)


def queue_snapshot_marker(pipe: Any, prefix: str, camera: str) -> None:
    """Queues on ``pipe`` the cheap read that tells whether a camera's snapshot changed: its ``frame`` and ``ts``,
    not its JPEG (every poll read every picture whole, changed or not: 3 MB a poll for 32 cameras of 100 kB). Its
    reply goes to ``snapshot_marker``."""
    pipe.hmget(keys(prefix).snapshot(camera), "frame", "ts")


def snapshot_marker(reply: Any) -> tuple | None:
    """What a ``queue_snapshot_marker`` read answered, to compare with the last poll's; None when it cannot tell (no
    hash, a plain string, a hash with no frame): then the picture is read whole, as before."""
    return tuple(reply) if isinstance(reply, list) and reply and reply[0] is not None else None


def snapshot_version(jpeg: bytes, frame: int | None) -> str:
    """Names one picture for the page's image URL: the frame, or (no frame given) a checksum of the bytes."""
    return f"f{frame}" if frame is not None else f"c{zlib.crc32(jpeg):08x}"


def parse_counts(fields: dict) -> dict | None:
    """{"zones": [{zone, head, class, inside}], "lines": [{line, head, class, in, out}]} from a counts hash, or
    None when it holds no zone or line (the page then hides the row)."""
    zones, lines = [], {}
    for raw_name, raw_value in fields.items():
        name = raw_name.decode(errors="replace") if isinstance(raw_name, bytes) else str(raw_name)
        value = _number(raw_value, int)
        parts = name.split(":")
        if value is None:
            continue
        if parts[0] == "zone" and len(parts) >= 4:
            zones.append({"zone": parts[1], "head": parts[2], "class": ":".join(parts[3:]), "inside": value})
        elif parts[0] == "line" and len(parts) >= 5 and parts[-1] in ("in", "out"):
            k = (parts[1], parts[2], ":".join(parts[3:-1]))
            lines.setdefault(k, {"line": k[0], "head": k[1], "class": k[2], "in": 0, "out": 0})[parts[-1]] = value
    if not zones and not lines:
        return None
    # a zone named "" (a hand-written field) is a name too: `or` made it None, and sorting failed the whole tile
    order = lambda d: (d["zone"] if "zone" in d else d["line"], d["head"], d["class"])  # noqa: E731
    return {"zones": sorted(zones, key=order), "lines": sorted(lines.values(), key=order)}


def tracks_by_head(message: dict | None) -> dict[str, int] | None:
    """Confirmed tracks per head in a detection message (heads that ran and found nothing: 0); None without one."""
    if not message:
        return None
    out = {h: 0 for h in _names(message.get("heads"))}
    detections = message.get("detections")
    for d in detections if isinstance(detections, list) else []:
        # a message written by another program may hold anything: count only what reads as a tracked detection
        if isinstance(d, dict) and d.get("track_id") is not None and isinstance(d.get("head"), str):
            out[d["head"]] = out.get(d["head"], 0) + 1
    return out


def _names(value: Any) -> list[str]:
    """A list of head names from an entry that should hold one (anything else: none)."""
    return [str(v) for v in value if isinstance(v, (str, int, float))] if isinstance(value, (list, tuple)) else []


def event_group(type_: str) -> str:
    return EVENT_GROUPS.get(type_, "other")


def tile_state(status: dict) -> str:
    state = status.get("state")  # a list or an object in a hand-written status is no state (and no dict key)
    return _STATE.get(state, DOWN) if isinstance(state, str) else DOWN


def _behind(detection: dict | None, ts: Any) -> float | None:
    """Seconds a picture taken at ``ts`` is older than the camera's newest published frame, both capture times on
    the camera's own clock (no other host's): a running camera whose pictures stopped (snapshots switched off
    live leave the last one in Redis) showed that one as live."""
    newest = (detection or {}).get("ts")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (newest, ts))
    return round(max(0.0, newest - ts), 1) if numbers else None


def make_tile(status: dict, detection: dict | None, counts: dict | None,
              snapshot: tuple[str, int | None, float | None] | None) -> dict:
    """One camera tile from its status (as read_camera_statuses returns it), latest detection message, parsed
    counts and snapshot (version, frame, ts). Only what the page shows: a status's other fields stay out."""
    s = status
    live = rates_now(s)
    current = live and tile_state(s) == UP  # what its last frame saw is what is there now
    return {
        "camera": s["camera"], "state": tile_state(s), "detail": s.get("state"),
        "error": s.get("last_error") or None, "redis_error": s.get("redis_error") or None,
        "fps": s.get("fps") or 0.0 if live else 0.0, "decode_fps": s.get("decode_fps") or 0.0 if live else 0.0,
        # frame age: capture to Redis (the StreamActor's latency percentiles)
        "age_p50": s.get("frame_age_ms_p50", s.get("latency_ms_p50")) if live else None,
        "age_p95": s.get("frame_age_ms_p95", s.get("latency_ms_p95")) if live else None,
        "dropped": {k: v for k, v in (s.get("dropped") if isinstance(s.get("dropped"), dict) else {}).items()
                    if isinstance(v, (int, float))},
        "published": s.get("published", 0), "reconnects": s.get("reconnects", 0),
        # its process restarted this many times in this service run (its counts span them): "(restarted Nx)"
        "restarts": whole_count(s.get("restarts")),
        "heads": _names(s.get("heads")) or _names((detection or {}).get("heads")),
        # its last message's tracks are tracks now only while it runs: a camera reconnecting for an hour (or added
        # again, starting) showed the tracks of its last frame as the objects in view
        "tracks": tracks_by_head(detection) if current else {},
        "size": (detection or {}).get("size"),
        "counts": counts,
        # the same for its zones' occupancy (objects inside now), which the page marks "(last frame)" when false: a
        # car park camera stopped for minutes read "mid: 2 car" as if now; line totals are crossings so far, history
        "occupancy_now": current,
        "snapshot": None if snapshot is None else {"v": snapshot[0], "frame": snapshot[1], "ts": snapshot[2]},
        # its snapshots switched off (only where its status says so): the page said "no snapshot yet" for ever
        "snapshots_off": s.get("snapshot_enabled") is False,
        "picture_behind_s": None if snapshot is None else _behind(detection, snapshot[2]),
        "heartbeat_age_s": s.get("heartbeat_age_s"), "stale": bool(s.get("stale")),
        "url": s.get("url"),  # redacted by the camera already; scrubbed again on the way out
    }


def scrub(value: Any, urls: list[str]) -> Any:
    """A copy of a JSON-able value with the credentials of ``urls`` (and of any URL) hidden in every string:
    string by string, so that a URL in one field cannot swallow the JSON around it. Non-finite floats (a
    ``1e999`` or ``NaN`` that Python's json read from an entry) become None: JSON has no such number. A string
    longer than MAX_TEXT is cut there (after redaction, so that no cut hides a URL from it): a megabyte error or
    event field went to every page at every tick and into a feed that keeps 500 events."""
    # redact_text changes only strings holding one of these or a "://": the others (nearly all) skip it
    needles = [u for u in urls if u] + [x for u in urls if u for x in url_secrets(u)]

    def walk(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):  # NaN/Infinity in an entry: no JSON, would fail the page
            return None
        if isinstance(v, str):
            v = redact_text(v, urls) if "://" in v or any(n in v for n in needles) else v
            return v if len(v) <= MAX_TEXT else v[:MAX_TEXT - 1] + "…"
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v
    return walk(value)


class Board:
    """The tiles of the page and each camera's recent fps and frame age (for its chart). Fed by ``update`` once
    per poll; a camera whose status vanished stays GONE_AFTER_S (marked ``missing``), unless it was removed."""

    def __init__(self, history_s: float = 300.0, gone_after_s: float = GONE_AFTER_S):
        self.history_s, self.gone_after_s = history_s, gone_after_s
        self.tiles: dict[str, dict] = {}
        # camera -> the first poll that read Redis and did not find its status: counted from there, not from the
        # last poll that did, a Redis outage longer than gone_after_s removed every tile at its first poll back
        self.missing_since: dict[str, float] = {}
        self.removed_at: dict[str, float] = {}  # camera -> when its camera_removed arrived, until a poll after it
        self.history: dict[str, deque] = {}  # camera -> (t, fps, age_p50, age_p95)

    def update(self, tiles: list[dict], now: float | None = None, clock: float | None = None) -> list[dict]:
        """Takes this poll's tiles; returns every tile to show, sorted by camera. ``now``: wall time, on the chart's
        points (people read it); ``clock``: when the poll began on a monotonic clock (``now`` when only that is
        given), which removals and vanished cameras are timed on: on wall time an NTP step kept a re-added camera
        hidden, or a removed one shown, until the clock caught up."""
        clock = (time.monotonic() if now is None else now) if clock is None else clock
        now = time.time() if now is None else now
        # a removal matters only to polls that began before it (kept longer: one entry per camera ever removed)
        self.removed_at = {cam: at for cam, at in self.removed_at.items() if at >= clock}
        for t in tiles:
            cam = t["camera"]
            if self.removed_at.get(cam, clock - 1) >= clock:  # a poll that read it before its removal landed
                continue
            self.removed_at.pop(cam, None)  # read after it: added again
            self.tiles[cam] = t
            self.missing_since.pop(cam, None)
            h = self.history.setdefault(cam, deque())
            if h and h[-1][0] > round(now, 1):  # the wall clock stepped back: a chart on both would draw backwards
                h.clear()
            # numbers only: sent in every hello without scrub (scrubbed, 2000 cameras' points took 5 s per page)
            h.append((round(now, 1), *(chart_value(t[k]) for k in ("fps", "age_p50", "age_p95"))))
            while h and h[0][0] < now - self.history_s:
                h.popleft()
        current = {t["camera"] for t in tiles}
        for cam in list(self.tiles):
            if cam not in current:
                if clock - self.missing_since.setdefault(cam, clock) > self.gone_after_s:
                    self.remove(cam)
                else:
                    self.tiles[cam] = {**self.tiles[cam], "missing": True}
        return self.all()

    def remove(self, camera: str, at: float | None = None) -> None:
        """``at``: when the camera was removed for good (its camera_removed event), on ``update``'s ``clock``: a
        poll that began earlier does not bring it back."""
        for d in (self.tiles, self.missing_since, self.history):
            d.pop(camera, None)
        if at is not None:
            self.removed_at[camera] = at

    def all(self) -> list[dict]:
        return [self.tiles[c] for c in sorted(self.tiles)]

    def histories(self) -> dict[str, list]:
        return {c: list(h) for c, h in self.history.items()}
