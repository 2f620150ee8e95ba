"""Reading hydravision's Redis streams without ever losing a message: consumer groups, at least once.

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from pipeline.consumer import GroupConsumer

    # retry=...: no retries by redis-py itself (see "How nothing is lost"); the consumer waits out outages
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=10, retry=Retry(NoBackoff(), 0))
    consumer = GroupConsumer(client, "hv:events", group="alerts", consumer="alerts-1")
    for message in consumer:                      # blocks; a message is acknowledged once the loop body ends
        if message.data["type"] == "line_crossed":
            print(message.data["line"], message.data["direction"], message.data["class"])

How nothing is lost (Redis streams with consumer groups; FIELD-NOTES.md "Redis"):
- XREADGROUP hands each new entry to one consumer of the group and keeps it in that consumer's pending list
  until XACK. A message is acknowledged only AFTER it was handled (``ack`` / the iterator / ``run``), so a
  consumer that dies mid-batch leaves the rest of its batch pending, not lost.
- A consumer starting under a name it used before first re-reads its own pending entries (id 0), then new ones.
- Every ``claim_every_s`` a consumer takes over entries that another consumer (or itself) left pending for
  longer than ``claim_idle_ms`` (XAUTOCLAIM): a consumer killed with SIGKILL under a name that never comes back
  loses nothing; its entries go to a live one. Set claim_idle_ms above twice the slowest handler, or a slow but
  live consumer's entries are handled twice (the rest of a batch is renewed every claim_idle_ms / 2 while it waits).
- At least once, not exactly once: a message handled but not yet acknowledged when the consumer died is
  handled again by whoever claims it. Make handlers idempotent (e.g. by the message's stream id).
- Poison messages: an entry delivered more than ``max_deliveries`` times (its handler keeps failing or
  crashing the consumer), or one that is not valid JSON, is copied to ``{stream}:dead`` with its id and
  delivery count, and acknowledged, so it stops blocking the group. Redis counts a delivery of a whole batch at
  once, so an entry delivered no more often than an older one of its batch is buried only once this consumer saw
  it fail: a consumer crash-looping on one message does not bury the rest of its batch with it.
- Entries trimmed away (MAXLEN) while still pending (delivered, never acknowledged: their consumer died) are
  acknowledged, counted in ``stats["trimmed"]`` and said as a WARNING once per read that meets them (how many,
  which stream): they were lost to the stream's length limit, not to a crash; size ``redis.maxlen`` for the longest
  outage.
  Entries trimmed before the group read them at all (a consumer stopped, or too slow) are said once per gap, with
  how many on Redis 7 (``stats["skipped"]``), and the consumer goes on from the oldest entry left.
- A group that is gone (a Redis restarted without persistence, redis-py reconnecting by itself; XGROUP DESTROY) is
  created again by the first member to find it gone: after the last entry it saw the group deliver (to itself, or
  before it started) where the stream still holds that, else from the start of the new stream (id 0), losing
  nothing published since. All after that entry is handed out again: what other members read after it, handled and
  acknowledged or not, may be handled twice; what was still pending from before it (a dead member's entries waiting
  for a claim) went with the group. Each member says it once, and which.
- A failover behind one address (the old master, now a replica, answers READONLY, or wakes a read blocked on it with
  "UNBLOCKED ... instance state changed") is waited out as an outage: the consumer drops its connections, and the
  next ones reach the new master.
- A read whose reply was lost (a reset, a socket timeout) handed its entries to this consumer all the same: the
  next read takes own pending entries first. A client that re-sends a failed command itself (redis-py's
  ``Redis(host=...)`` does by default) re-sends such a read for new entries only: the lost ones wait claim_idle_ms,
  then come late and out of order. Build it as above, with ``retry=Retry(NoBackoff(), 0)`` (a warning says so).

Any Redis client in any language can do the same (examples/node-consumer/ does it in Node.js).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import redis

from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    stream: str
    id: str  # the stream entry id: unique and ordered within its stream
    data: Any  # the decoded JSON of field "data" (a hydravision message)
    claimed: bool = False  # taken over from another consumer (or redelivered): it may have been handled before


_default_names = itertools.count(1)

# XGROUP DELCONSUMER only if the consumer still holds nothing pending and is still idle, atomically.
# KEYS: stream. ARGV: group, consumer, idle_ms. No shebang: Redis 6.2 cannot compile one.
_FORGET_IF_IDLE = """
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] == ARGV[2] then
    if f['pending'] ~= 0 or f['idle'] < tonumber(ARGV[3]) then return 0 end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
"""


# Entries MAXLEN trimmed before the group read them: {the group's last-delivered id, the stream's first id, how many
# (-1: not counted, Redis 6.2 or an invalid group counter)}, or nil. KEYS: stream. ARGV: group. On Redis 7 the
# count is entries-added - length - the group's entries-read, which is then set to what it would be had they been
# read (SETID to the same id, ENTRIESREAD): Redis 7.0 counts on from the old value, so the group's lag read the
# gap for ever and a later gap would be said with this one in it.
_TRIMMED_UNREAD = """
local function fields(t) local m = {} for i = 1, #t, 2 do m[t[i]] = t[i + 1] end return m end
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local s = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
local first = s['first-entry']
if not first then return nil end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  g = fields(g)
  if g['name'] == ARGV[1] then
    local last, added, read = g['last-delivered-id'], s['entries-added'], g['entries-read']
    if not older(last, first[1]) then return nil end
    if not added or not read then
      if last == '0-0' then return nil end  -- nothing tells a trimmed stream from one the group began at 0
      return {last, first[1], -1}
    end
    local removed = added - s['length']
    if removed <= read then return nil end
    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', removed)
    return {last, first[1], removed - read}
  end
end
return nil
"""

# A pause this long since Redis answered the last read of new entries (a slow handler, a consumer stopped, under its
# read too) may have let MAXLEN trim entries the group had not read: the next read checks. Back-to-back reads (the
# steady state) do not, nor those after a read that waited out block_ms on a quiet stream.
_GAP_CHECK_AFTER_S = 1.0


def default_consumer_name() -> str:
    """host-pid, and host-pid-N for the N-th in one process: consumers under one name share one pending list, so a
    second one (one per thread) re-read the first's unacknowledged messages as its own and handled them too."""
    n = next(_default_names)
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{n}" if n > 1 else "")


def _retries(client: redis.Redis) -> int:
    """How often the client's connections re-send a command that failed (as redis-py's Connection decides it)."""
    kwargs = getattr(client.connection_pool, "connection_kwargs", {})
    if kwargs.get("retry") is not None:
        return getattr(kwargs["retry"], "_retries", 0)  # get_retries() is redis-py 6+; -1 is for ever
    return 1 if kwargs.get("retry_on_timeout") or kwargs.get("retry_on_error") else 0


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _raw(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def _stream_entries(reply) -> list[tuple]:
    """XREADGROUP's reply as (stream, entries) pairs, whichever shape redis-py gave it: pairs (RESP2), or a dict of
    stream -> [entries] (``protocol=3``) or stream -> entries (``legacy_responses=False``). Iterating a dict as pairs
    unpacked each stream's name (ValueError), and the entries the read had handed to this consumer were never seen."""
    if not isinstance(reply, dict):
        return reply or []
    return [(stream, value[0] if _wrapped(value) else value) for stream, value in reply.items()]


def _wrapped(value) -> bool:
    """Whether ``value`` is [entries] (RESP3's), not the entries themselves (each [id, fields], its id a string)."""
    return bool(value) and isinstance(value[0], list) and (not value[0] or isinstance(value[0][0], (list, tuple)))


def _decodes(client) -> bool:
    return bool(getattr(client.connection_pool, "connection_kwargs", {}).get("decode_responses"))


class _Undecoded:
    """The stream reads of a client (or pipeline) with their replies left as bytes (redis-py's NEVER_DECODE): a
    ``decode_responses=True`` client decoded a foreign entry that is not UTF-8 while parsing the reply, and the
    UnicodeDecodeError ended the read loop, on every restart again (own pending entries are read first)."""

    xreadgroup, xautoclaim, xrange = redis.Redis.xreadgroup, redis.Redis.xautoclaim, redis.Redis.xrange

    def __init__(self, client) -> None:
        self._client = client

    def execute_command(self, *args, **options):
        return self._client.execute_command(*args, **options, NEVER_DECODE=True)


# What a consumer waits out: Redis unreachable, or a replica now (a failover behind one address: a new connection
# reaches the new master, as redis-py's Sentinel client and the Publisher do).
_OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)


class GroupConsumer:
    """One consumer of a consumer group over one or more streams. Not thread-safe: one per thread."""

    def __init__(self, client: redis.Redis, streams: str | list[str], group: str, consumer: str | None = None, *,
                 start: str = "$", block_ms: int = 2000, count: int = 100, claim_idle_ms: int = 30_000,
                 claim_every_s: float | None = None, max_deliveries: int = 5):
        """``start``: where a NEW group begins: "$" (only what arrives from now on) or "0" (everything the
        stream still holds). ``block_ms`` must stay below the client's socket_timeout."""
        self.client, self.group = client, group
        self._reads = _Undecoded(client) if _decodes(client) else client
        # Names as redis-py hands them back (SCAN, KEYS) are bytes: list(b"hv:events") would be a list of ints,
        # and a bytes name never matched the (decoded) names of XREADGROUP's reply, so its entries went pending
        # unseen. A name given twice would hand out each of its entries twice.
        names = [streams] if isinstance(streams, (str, bytes)) else list(streams)
        self.streams = list(dict.fromkeys(_text(s) for s in names))
        if not self.streams:
            raise ValueError("streams must name at least one stream, got none")
        self.consumer = consumer or default_consumer_name()
        self.start, self.block_ms, self.count = start, block_ms, count
        self.claim_idle_ms, self.max_deliveries = claim_idle_ms, max_deliveries
        for name, value, least in (("block_ms", block_ms, 1), ("count", count, 1),
                                   ("max_deliveries", max_deliveries, 1), ("claim_idle_ms", claim_idle_ms, 0)):
            # Redis reads BLOCK 0 as "forever": stop() would never be seen while idle. None or a float failed
            # later, in arithmetic or in redis-py, with an error that did not name the setting.
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
        if claim_every_s is not None and (isinstance(claim_every_s, bool) or not isinstance(claim_every_s, (int, float))
                                          or not math.isfinite(claim_every_s) or claim_every_s < 0):
            # NaN never claimed again (every comparison with it is false): a dead member's entries stayed its own
            raise ValueError(f"claim_every_s must be a finite number of seconds >= 0 (or None), got {claim_every_s!r}")
        self.claim_every_s = claim_every_s if claim_every_s is not None else max(0.05, claim_idle_ms / 2000)
        timeout = getattr(client.connection_pool, "connection_kwargs", {}).get("socket_timeout")
        if timeout is not None and block_ms / 1000 >= timeout:
            raise ValueError(f"block_ms {block_ms} must be shorter than the client's socket_timeout ({timeout} s)")
        if retries := _retries(client):
            log.warning("consumer %s of group %r: its Redis client re-sends a failed command itself (retries: %d): the "
                        "messages of a read whose reply was lost wait claim_idle_ms (%d ms), then come late and out "
                        "of order; build the client with retry=Retry(NoBackoff(), 0)", self.consumer, group, retries,
                        claim_idle_ms)
        # Own pending entries first (a restart under the same name), then new ones.
        self._cursor = {s: "0" for s in self.streams}
        self._claim_cursor = {s: "0-0" for s in self.streams}
        self._next_claim = 0.0
        self._tried: set[tuple[str, str]] = set()  # handed out here, not acknowledged nor handed back, still its own
        self._answered: dict[str, float] = {}  # the earliest Redis can have answered each stream's last new read
        self._check_gaps: set[str] = set()  # streams whose last read of new entries was a full batch (a backlog)
        self._trimmed_unread: Callable | None = client.register_script(_TRIMMED_UNREAD)
        self._member: set[str] = set()  # streams where this consumer read in the group
        self._looking = True  # False once Redis refused XGROUP CREATECONSUMER (see _look)
        self._look_due = False  # after a failed command: Redis may have restarted empty
        self.stats = {"delivered": 0, "acked": 0, "claimed": 0, "dead": 0, "trimmed": 0, "skipped": 0}
        self.ensure_groups()
        # The last entry this consumer knows the group delivered, per stream: where a lost group is created again
        self._last = self._groups_last_delivered()

    def ensure_groups(self) -> None:
        """XGROUP CREATE ... MKSTREAM for every stream; an existing group is left as it is."""
        for s in self.streams:
            try:
                self.client.xgroup_create(s, self.group, id=self.start, mkstream=True)
            except redis.ResponseError as e:
                if "Invalid stream ID" in str(e):
                    raise ValueError(f'start must be "$", "0" or a stream id, got {self.start!r}') from None
                if "BUSYGROUP" not in str(e):
                    e.args = (f"{s}: {e}",)  # WRONGTYPE, NOPERM name no key: which of the streams? (its type kept)
                    raise

    def _groups_last_delivered(self) -> dict[str, str]:
        """The group's last-delivered id on each stream now (none where XINFO is refused): a consumer that has read
        nothing yet (a quiet stream) knows where a lost group was all the same."""
        pipe = self.client.pipeline(transaction=False)
        for s in self.streams:
            pipe.xinfo_groups(s)
        last = {}
        for s, groups in zip(self.streams, pipe.execute(raise_on_error=False)):
            for g in [] if isinstance(groups, Exception) else groups:
                if _text(g["name"]) == self.group:
                    last[s] = _text(g["last-delivered-id"])
        return last

    # --- reading
    def read(self, limit: int | None = None) -> list[Message]:
        """The next batch: entries claimed from dead consumers when a claim is due, else own pending entries
        (after a restart), else new entries (blocking up to block_ms). Possibly empty. ``limit``: at most that
        many entries in all, over all streams (a consumer that stops after N messages must not take more: what
        it took and did not handle would wait claim_idle_ms for another consumer)."""
        try:
            while True:  # the group can go again during the read after it was created again (DEL twice, eviction)
                try:
                    out = self._read(limit)  # its reply can be lost too: the handler below covers it
                    break
                except redis.ResponseError as e:
                    if "instance state changed" in str(e):
                        # A failover woke the read blocked on the old master ("UNBLOCKED force unblock ... (master ->
                        # replica?)"): a replica now, as when it answers READONLY (the steady state of an idle one)
                        raise redis.exceptions.ReadOnlyError(*e.args) from None
                    # Redis 7 wakes a reader blocked on a stream that was deleted with "UNBLOCKED the stream key no
                    # longer exists" (not NOGROUP): the group went with the stream.
                    if "NOGROUP" not in str(e) and "stream key no longer exists" not in str(e):
                        raise
                    self._group_lost(e)
        except _OUTAGES as e:
            # A read whose reply was lost (a socket timeout, a reset) handed its entries to this consumer all the
            # same: read own pending entries first, or they waited claim_idle_ms for a claim, late and out of order.
            self._lost(e)
            raise
        if limit is not None and len(out) > limit:
            # XREADGROUP's and XAUTOCLAIM's COUNT is per stream: with several streams a batch can hold more
            # than the caller will handle. Hand the rest back at once instead of leaving it to wait
            # claim_idle_ms under this consumer's name.
            self._release(out[limit:])
            out = out[:limit]
        self._tried.update((m.stream, m.id) for m in out)
        return out

    def _lost(self, error: Exception) -> None:
        """After a failed command: own pending entries are read first; a connection to a replica is dropped (it
        would answer READONLY until the process restarts)."""
        self._cursor = {s: "0" for s in self.streams}
        self._look_due = True
        if isinstance(error, redis.exceptions.ReadOnlyError):
            self.client.connection_pool.disconnect()

    def _group_lost(self, error: redis.ResponseError) -> None:
        """The group (or the stream) is gone: someone destroyed it (XGROUP DESTROY, DEL), or Redis restarted without
        persistence (redis-py reconnected on its own). It is created again after the last entry this consumer saw the
        group deliver (its own reads, the group's place when it started) where the stream still holds an entry that
        old (created from the start, it handed out all the stream held once more), else from the start (id 0): a new
        stream, whose entries all arrived after that, so nothing published meanwhile is lost. What other members read
        after that entry is handed out again, acknowledged or not: this consumer does not see their reads (and from
        the group's own last-delivered id, were it known, the entries they still held pending after this one's last, a
        dead member's among them, were lost for good). Each member that finds it gone says so once."""
        made = []
        for s in self.streams:
            last = self._last.get(s, "0-0")
            held = last != "0-0" and self._reads.xrange(s, "-", last, count=1)
            try:
                self.client.xgroup_create(s, self.group, id=last if held else "0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
                continue  # never gone here, or another member created it again first
            made.append(f"on {s} after {last}, the last entry it saw the group deliver: all after it is handed out "
                        "again, what other members read since too" if held else
                        f"on {s} from the start: no entry there is as old as {last}, the last it saw the group deliver "
                        "(Redis restarted empty, or MAXLEN trimmed past it)" if last != "0-0" else
                        f"on {s} from the start (it saw the group deliver nothing)")
        log.warning("consumer %s: group %r is gone (%s): %s", self.consumer, self.group, error,
                    "created again " + "; ".join(made) if made else "another member created it again")
        self._member.difference_update(self.streams)  # so that _look does not take the group it made for another's
        self._cursor = {s: "0" for s in self.streams}
        self._claim_cursor = {s: "0-0" for s in self.streams}

    def _release(self, messages: list[Message]) -> None:
        """Makes taken but unhandled messages claimable by any consumer now (XCLAIM ... IDLE claim_idle_ms
        JUSTID: their owner and delivery count stay, their idle time jumps)."""
        by_stream: dict[str, list[str]] = {}
        for m in messages:
            by_stream.setdefault(m.stream, []).append(m.id)
            self.stats["claimed" if m.claimed else "delivered"] -= 1
            self._tried.discard((m.stream, m.id))
        for s, ids in by_stream.items():
            self.client.xclaim(s, self.group, self.consumer, 0, ids, idle=self.claim_idle_ms, justid=True)

    def _forget_tried(self) -> None:
        """Drops from ``_tried`` the entries no longer pending under this consumer (another consumer claimed them,
        then acknowledged or buried them), so that it holds no more than this consumer's pending list; one that comes
        back from another consumer is buried once it failed here again."""
        if not self._tried:
            return
        tried = list(self._tried)
        pipe = self.client.pipeline(transaction=False)
        for stream, entry_id in tried:
            pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1, consumername=self.consumer)
        for key, rows in zip(tried, pipe.execute()):
            if not rows:
                self._tried.discard(key)

    def _read(self, limit: int | None) -> list[Message]:
        count = self.count if limit is None else max(1, min(self.count, limit))
        if self._look_due and self._looking and self._member:
            self._look()
        self._look_due = False
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_every_s
            self._forget_tried()
            claimed = self.claim(count, total=limit)
            if claimed:
                return claimed
        if limit is None or len(self.streams) == 1:
            out, history = self._xread(self.streams, count, blocking=True)
            if history and not out and all(c == ">" for c in self._cursor.values()):
                return self._read(limit)  # own history was empty: go straight on to new entries
            return out
        # A limit over several streams: COUNT is per stream, so one stream at a time, without blocking, each
        # for what is still needed; block on all of them only when none had anything.
        out = []
        for s in self.streams:
            while len(out) < limit:
                was = self._cursor[s]
                got = self._xread([s], max(1, min(self.count, limit - len(out))), blocking=False)[0]
                out += got
                if got or was == ">" or self._cursor[s] != ">":
                    break  # else its own history just ended empty: go on to its new entries
        if out or any(c != ">" for c in self._cursor.values()):
            return out
        return self._xread(self.streams, count, blocking=True)[0]  # read() hands back any excess

    def _xread(self, streams: list[str], count: int, blocking: bool) -> tuple[list[Message], bool]:
        """One XREADGROUP over ``streams``; (the messages, whether it read own pending entries)."""
        cursors = {s: self._cursor[s] for s in streams}
        history = {s for s, c in cursors.items() if c != ">"}
        new = [s for s in streams if s not in history]
        now = time.monotonic()
        self._say_gaps([s for s in new if now - self._answered.get(s, -math.inf) > _GAP_CHECK_AFTER_S
                        or s in self._check_gaps])
        block = self.block_ms if blocking and not history else None
        sent = time.monotonic()
        reply = self._reads.xreadgroup(self.group, self.consumer, cursors, count=count, block=block)
        returned = time.monotonic()
        self._member.update(streams)
        got = {_text(stream): entries for stream, entries in _stream_entries(reply)}
        # The next pause is timed from the earliest moment Redis can have answered this read. From its return, a read
        # blocked in Redis while the process was stopped (SIGSTOP, a long GC pause, a laptop asleep) hid the stop, and
        # the next read jumped the entries trimmed meanwhile without a word; from when it was sent, every read that
        # waited out block_ms on a quiet stream counted as a pause, and the next one checked each stream. Redis
        # answers a blocked read as soon as an entry comes: one that returned none waited block_ms there (or less:
        # CLIENT UNBLOCK), one that returned some may have been answered at once.
        answered = sent if not block or any(got.get(s) for s in streams) else min(returned, sent + block / 1000)
        self._answered.update((s, answered) for s in new)
        out: list[Message] = []
        for stream in streams:
            entries = got.get(stream) or []
            if stream in history:
                # Own pending entries, oldest first: go on after the last one seen (a message whose handler
                # failed stays pending, and must not come back at once), then switch to new entries.
                self._cursor[stream] = _text(entries[-1][0]) if entries else ">"
            elif len(entries) >= count:
                self._check_gaps.add(stream)  # behind: trimming may overtake the group before its next read
            else:
                self._check_gaps.discard(stream)
            if entries and stream not in history:
                self._last[stream] = _text(entries[-1][0])
            out += self._decode(stream, entries, history=stream in history)
        self.stats["delivered"] += len(out)
        return out, bool(history)

    def _say_gaps(self, streams: list[str]) -> None:
        """``_say_trimmed_unread`` for each of ``streams``, and once more for those checked over _GAP_CHECK_AFTER_S
        before the checks ended (a stop under them, or many streams at a long round trip: MAXLEN may have trimmed
        more meanwhile). Once more only: checked again until one round took less, 25 streams at 40 ms a check (a
        remote Redis) were checked for ever, and the read never came."""
        began = {}
        for s in streams:
            began[s] = time.monotonic()
            self._say_trimmed_unread(s)
        ended = time.monotonic()
        for s in streams:
            if ended - began[s] > _GAP_CHECK_AFTER_S:
                self._say_trimmed_unread(s)

    def _say_trimmed_unread(self, stream: str) -> None:
        """Says entries MAXLEN trimmed before the group read them (a gap the next read of new entries jumps)."""
        if self._trimmed_unread is None:
            return
        try:
            gap = self._trimmed_unread(keys=[stream], args=[self.group])
        except redis.exceptions.ReadOnlyError:
            raise
        except redis.ResponseError as e:
            if "no such key" not in str(e):  # the stream is gone: the read that follows finds the group gone too
                # an ACL without EVALSHA or XINFO: reading goes on, unchecked
                log.warning("consumer %s cannot check %s for entries trimmed unread (%s): not checking again",
                            self.consumer, stream, e)
                self._trimmed_unread = None
            return
        if not gap:
            return
        last, first, n = _text(gap[0]), _text(gap[1]), int(gap[2])
        self.stats["skipped"] += max(n, 0)
        what = (f"{n} entries were trimmed (MAXLEN) before group {self.group!r} read them (it had read up to {last})"
                if n >= 0 else f"entries after {last}, if there were any, were trimmed (MAXLEN) before group "
                               f"{self.group!r} read them (Redis did not count them)")
        log.warning("%s: %s: going on from %s; size redis.maxlen for the slowest consumer", stream, what, first)

    def _server_version(self) -> str:
        try:
            return f"Redis {self.client.info('server')['redis_version']}"
        except redis.RedisError:  # INFO may be refused to an ACL user
            return "version unknown"

    def claim(self, count: int | None = None, total: int | None = None) -> list[Message]:
        """XAUTOCLAIM entries idle for claim_idle_ms from any consumer of the group (one page per stream);
        ``total``: stop once that many were claimed over all streams."""
        out: list[Message] = []
        for s in self.streams:
            page = count or self.count
            if total is not None:
                if len(out) >= total:
                    break
                page = max(1, min(page, total - len(out)))
            try:
                reply = self._reads.xautoclaim(s, self.group, self.consumer, self.claim_idle_ms,
                                               start_id=self._claim_cursor[s], count=page)
            except redis.ResponseError as e:
                if "unknown command" not in str(e).lower():
                    raise
                raise UserError(f"{s}: the Redis server ({self._server_version()}) has no XAUTOCLAIM, which a "
                                "consumer group reader needs to take over the messages of a consumer that died: "
                                "use Redis 6.2 or newer") from None
            # Redis 7 lists entries deleted while pending third; 6.2 gives nil among the entries, without an id
            next_id, entries, deleted = reply[0], reply[1], list(reply[2]) if len(reply) > 2 else []
            start, self._claim_cursor[s] = self._claim_cursor[s], _text(next_id)
            if any(entry_id is None for entry_id, _ in entries):  # Redis 6.2: nil, without its id
                entries = [e for e in entries if e[0] is not None]
                deleted += self._claimed_deleted(s, start, _text(next_id), {_text(i) for i, _ in entries}, page)
            if deleted:  # trimmed by MAXLEN while pending: nothing left to hand out
                self.client.xack(s, self.group, *deleted)
                self.stats["trimmed"] += len(deleted)
                self._say_trimmed_pending(s, len(deleted))
            if entries:
                out += self._decode(s, entries, history=True)
        self.stats["claimed"] += len(out)
        return out

    def _claimed_deleted(self, stream: str, start: str, next_id: str, returned: set[str], page: int) -> list[str]:
        """The ids of entries that Redis 6.2's XAUTOCLAIM just gave this consumer as nil (deleted from the
        stream while pending): this consumer's pending entries in the range it scanned, less those it
        returned, that the stream no longer holds."""
        # XAUTOCLAIM scans at most 10 * COUNT pending entries: the cap follows the COUNT it was given (a claim(count)
        # above self.count scanned past a cap of self.count's, and the nils beyond it stayed pending for good)
        rows = self.client.xpending_range(stream, self.group, min=start, max="+" if next_id == "0-0" else next_id,
                                          count=10 * page + 100, consumername=self.consumer)
        candidates = [_text(r["message_id"]) for r in rows if _text(r["message_id"]) not in returned]
        if not candidates:
            return []
        pipe = self.client.pipeline(transaction=False)
        reads = _Undecoded(pipe) if _decodes(self.client) else pipe
        for entry_id in candidates:
            reads.xrange(stream, entry_id, entry_id, count=1)
        return [i for i, found in zip(candidates, pipe.execute()) if not found]

    def _decode(self, stream: str, entries: list, history: bool) -> list[Message]:
        out = []
        deliveries = self._deliveries(stream, [_text(i) for i, _ in entries]) if history and entries else {}
        most = 0  # the most deliveries of an entry older in this batch
        gone = 0
        for entry_id, fields in entries:
            entry_id = _text(entry_id)
            if not fields:  # pending but trimmed or deleted from the stream: redis-py gives {} (XADD needs a field)
                self.client.xack(stream, self.group, entry_id)
                self.stats["trimmed"] += 1
                gone += 1
                continue
            try:
                data = json.loads(fields.get(b"data", fields.get("data")))
            except (KeyError, ValueError, TypeError, RecursionError) as e:  # RecursionError: nested too deep
                self._bury(stream, entry_id, fields, 0, f"not a JSON message: {type(e).__name__}")
                continue
            n = deliveries.get(entry_id, 1)
            older, most = most, max(most, n)
            # Redis counts a delivery of each entry a read returns, while the handler takes them one at a time: a
            # consumer crash-looping on one had the younger ones of its batch, never handed to it, counted with it
            # and buried with it. One delivered no more often than an older one is buried if it was seen to fail.
            if n > self.max_deliveries and (n > older or (stream, entry_id) in self._tried):
                self._bury(stream, entry_id, fields, n, f"delivered {n} times without being acknowledged")
                continue
            out.append(Message(stream, entry_id, data, claimed=history))
        if gone:
            self._say_trimmed_pending(stream, gone)
        return out

    def _say_trimmed_pending(self, stream: str, n: int) -> None:
        """Says entries trimmed (MAXLEN) or deleted while pending, once per read that meets them: handed to a member
        that never acknowledged them (it died or was stopped first), they are gone unhandled. Only counted in
        stats["trimmed"], they vanished without a word, beside the WARNING for entries trimmed before any read."""
        log.warning("%s: %d entries delivered to group %r but never acknowledged (their consumer died or stopped "
                    "before handling them) were trimmed (MAXLEN) or deleted while pending: they are gone, never "
                    "handled; size redis.maxlen for the longest outage", stream, n, self.group)

    def _deliveries(self, stream: str, ids: list[str]) -> dict[str, int]:
        # One XPENDING per id: over the range ids[0]..ids[-1], the other pending entries (another consumer's,
        # or this one's own that were not idle enough to be claimed) used up the count and hid some of these,
        # whose count then read as 1: a poison message among them was never buried.
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1, consumername=self.consumer)
        return {_text(r["message_id"]): int(r["times_delivered"]) for rows in pipe.execute() for r in rows}

    def _bury(self, stream: str, entry_id: str, fields: dict, deliveries: int, reason: str) -> None:
        """Moves a poison entry to {stream}:dead (same fields plus where it came from) and acknowledges it."""
        # bytes names: a foreign entry's field name need not be UTF-8 (decoding it raised, and the loop died on it)
        dead = {**{_raw(k): v for k, v in fields.items()}, b"source_id": entry_id, b"deliveries": deliveries,
                b"reason": reason}
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(f"{stream}:dead", dead, maxlen=10_000, approximate=True)
        pipe.xack(stream, self.group, entry_id)
        pipe.execute()
        self._tried.discard((stream, entry_id))
        self.stats["dead"] += 1
        log.warning("%s %s moved to %s:dead: %s", stream, entry_id, stream, reason)

    # --- acknowledging
    def ack(self, *messages: Message) -> None:
        by_stream: dict[str, list[str]] = {}
        for m in messages:
            by_stream.setdefault(m.stream, []).append(m.id)
            self._tried.discard((m.stream, m.id))
        for s, ids in by_stream.items():
            self.stats["acked"] += int(self.client.xack(s, self.group, *ids))

    # --- loops
    def __iter__(self) -> Iterator[Message]:
        """Messages forever; each is acknowledged when the loop asks for the next one, so a message whose
        loop body raised (or whose process died) stays pending and is delivered again. Leaving the loop
        (break, return, an exception) hands the rest of the batch back at once, as ``read(limit)`` does: it would
        otherwise wait claim_idle_ms under this consumer's name."""
        while True:
            batch = self._read_through_outages(None, lambda: False)
            for m, rest in self._in_turn(batch):
                try:
                    yield m
                except GeneratorExit:
                    self._release_quietly(list(rest))
                    raise
                if not self._acked(m, last=not rest):
                    break

    def _read_through_outages(self, limit: int | None, stop: Callable[[], bool]) -> list[Message]:
        """``read``, waiting out a Redis that went away (``stop`` ends the wait): a restart fails the read blocked
        in it, and redis-py connects again only on the next command, so the loop ended there. Once Redis is
        back, ``read`` creates the group again if the restart lost it."""
        failures = 0
        while True:
            try:
                batch = self.read(limit)
            except _OUTAGES as e:
                failures += 1
                if failures == 1:
                    log.warning("consumer %s of group %r lost Redis (%s): retrying", self.consumer, self.group, e)
                if stop():
                    return []
                time.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
                continue
            if failures:
                log.warning("consumer %s of group %r reads again", self.consumer, self.group)
            return batch

    def _acked(self, m: Message, last: bool = False) -> bool:
        """``ack``, or False where Redis went away while the message was handled (the loops waited out an outage
        met by a read only, and ended on one met here): the message stays pending and is handled again (at least
        once), and once Redis is back own pending entries, the rest of its batch with them, are read first.
        ``last``: the last of its batch, acknowledged with a look at the group (``_look``)."""
        try:
            if last and self._looking and self._member:
                self._look(m)
            else:
                self.ack(m)
            return True
        except _OUTAGES as e:
            log.warning("could not acknowledge %s %s (%s): it will be handled again", m.stream, m.id, e)
            self._lost(e)
            return False

    def _look(self, ack: Message | None = None) -> None:
        """XGROUP CREATECONSUMER on each stream this consumer read, in one round trip with the acknowledgement of
        ``ack`` if given. It answers 1 where the consumer is no member (any more): another member found the group gone
        and created it again since this one last read; NOGROUP where the group is gone. A member that was handling
        its batch when the group was destroyed, or Redis restarted, read on in the group another member made without
        a word, while the batch it held was handed out again."""
        streams = sorted(self._member)
        pipe = self.client.pipeline(transaction=False)
        if ack:
            pipe.xack(ack.stream, self.group, ack.id)
        for s in streams:
            pipe.xgroup_createconsumer(s, self.group, self.consumer)
        answers = pipe.execute(raise_on_error=False)
        if ack:
            acked, answers = answers[0], answers[1:]
            if isinstance(acked, Exception):
                raise acked
            self._tried.discard((ack.stream, ack.id))
            self.stats["acked"] += int(acked)
        errors = [a for a in answers if isinstance(a, redis.ResponseError)]
        if replica := [e for e in errors if isinstance(e, redis.exceptions.ReadOnlyError)]:
            raise replica[0]  # an outage: waited out
        if gone := [e for e in errors if "NOGROUP" in str(e) or "requires the key to exist" in str(e)]:
            self._group_lost(gone[0])  # now: another member may create it again before this one's next read
        elif again := [s for s, a in zip(streams, answers) if a == 1]:
            log.warning("consumer %s: group %r was created again on %s by another member since this one last read "
                        "(destroyed, or Redis restarted empty): all after the last entry that member had seen it "
                        "deliver is handed out again, so what this one held then, or handled since that entry, may "
                        "be handled twice", self.consumer, self.group, ", ".join(again))
        elif refused := [e for e in errors if "NOPERM" in str(e)]:  # an ACL without XGROUP CREATECONSUMER
            log.warning("consumer %s cannot tell whether group %r was created again (%s): not asking again",
                        self.consumer, self.group, refused[0])
            self._looking = False

    def _in_turn(self, batch: list[Message]) -> Iterator[tuple[Message, deque[Message]]]:
        """The messages of a batch one at a time, each with those after it. Once the batch has waited claim_idle_ms / 2
        here (slow handlers), the rest is renewed first: idle for claim_idle_ms, a batch's tail was claimed by another
        member and handled by both at once, with every handler well under claim_idle_ms."""
        rest, held = deque(batch), time.monotonic()
        while rest:
            waited_ms = (time.monotonic() - held) * 1000
            if self.claim_idle_ms and waited_ms >= self.claim_idle_ms / 2:
                rest, held = deque(self._renew(list(rest), waited_ms)), time.monotonic()
                continue
            yield rest.popleft(), rest

    def _renew(self, messages: list[Message], waited_ms: float) -> list[Message]:
        """Those of ``messages`` still pending under this consumer, their idle time restarted (XCLAIM JUSTID: the
        delivery count stays); the others another member took. An outage keeps none (pending: read again first)."""
        by_stream: dict[str, list[str]] = {}
        for m in messages:
            by_stream.setdefault(m.stream, []).append(m.id)
        # Ours have been idle for waited_ms at least; one that another member claimed since, for claim_idle_ms less.
        min_idle = max(0, int(waited_ms) - self.claim_idle_ms // 2)
        pipe = self.client.pipeline(transaction=True)
        for s, ids in by_stream.items():
            for entry_id in ids:  # before the XCLAIM: Redis 7 drops an entry trimmed while pending from the list
                pipe.xpending_range(s, self.group, min=entry_id, max=entry_id, count=1, consumername=self.consumer)
            pipe.xclaim(s, self.group, self.consumer, min_idle, ids, justid=True)
        try:
            replies = iter(pipe.execute())
        except _OUTAGES as e:
            log.warning("could not renew %d messages in hand (%s): they will be read again", len(messages), e)
            self._lost(e)
            return []
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            return messages  # the group is gone: the next read creates it again
        own: set[tuple[str, str]] = set()
        for s, ids in by_stream.items():
            own.update((s, _text(r["message_id"])) for _ in ids for r in next(replies))
            next(replies)  # the XCLAIM's
        kept = [m for m in messages if (m.stream, m.id) in own]
        if taken := [m for m in messages if (m.stream, m.id) not in own]:
            for m in taken:
                self.stats["claimed" if m.claimed else "delivered"] -= 1
                self._tried.discard((m.stream, m.id))
            log.warning("consumer %s: %d messages of its batch were taken by another member while it handled the "
                        "ones before (a handler slower than claim_idle_ms / 2 = %d ms?)", self.consumer, len(taken),
                        self.claim_idle_ms // 2)
        return kept

    def _release_quietly(self, messages: list[Message]) -> None:
        """``_release`` where raising is no help (a generator being closed): a failure leaves them pending."""
        if not messages:
            return
        try:
            self._release(messages)
        except redis.RedisError as e:
            log.warning("could not hand back %d unhandled messages (%s): they wait claim_idle_ms", len(messages), e)

    def run(self, handle: Callable[[Message], None], stop: Callable[[], bool] = lambda: False,
            max_messages: int | None = None) -> int:
        """Calls ``handle`` for each message and acknowledges it after ``handle`` returned; returns how many
        were handled. A handler that raises leaves its message pending (retried after claim_idle_ms, buried
        after max_deliveries) and the loop goes on. One that raises KeyboardInterrupt or SystemExit ends the loop,
        and the rest of the batch is handed back at once (as when an iterator's loop is left)."""
        handled = 0
        while not stop() and (max_messages is None or handled < max_messages):
            batch = self._read_through_outages(None if max_messages is None else max_messages - handled, stop)
            for m, rest in self._in_turn(batch):
                try:
                    handle(m)
                except Exception:  # noqa: BLE001 - a bad message must not stop the consumer
                    log.exception("handler failed on %s %s; it stays pending", m.stream, m.id)
                    continue
                except BaseException:
                    self._release_quietly(list(rest))
                    raise
                if not self._acked(m, last=not rest):
                    break
                handled += 1
                if max_messages is not None and handled >= max_messages:
                    break
        return handled

    def leave(self) -> bool:
        """Takes this consumer's name out of the group if it holds nothing pending (a name made of host and pid
        never comes back: each run of ``tail --group`` left one behind); True if it went. Entries it still holds
        keep it, for another consumer to claim (DELCONSUMER would destroy them)."""
        forget = self.client.register_script(_FORGET_IF_IDLE)
        self._member.clear()  # read again, it joins anew: no group created again behind it
        return all([forget(keys=[s], args=[self.group, self.consumer, 0]) for s in self.streams])

    def forget_idle_consumers(self, idle_ms: int = 3_600_000) -> list[str]:
        """Removes consumers of the group that hold nothing pending and were idle for ``idle_ms`` (the names of
        consumers that died and whose entries were claimed); returns their names."""
        gone = []
        forget = self.client.register_script(_FORGET_IF_IDLE)
        for s in self.streams:
            for c in self.client.xinfo_consumers(s, self.group):
                name = _text(c["name"])
                if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) >= idle_ms:
                    # checked again inside the delete: one that came back since XINFO and took entries keeps them
                    # (XGROUP DELCONSUMER destroys a consumer's pending entries: lost to the group for good)
                    if forget(keys=[s], args=[self.group, name, idle_ms]):
                        gone.append(name)
        return gone
