#!/usr/bin/env node
// A hydravision consumer in Node.js: reads {prefix}:events as a member of a Redis consumer group, validates
// every message against the repo's JSON Schemas (workers/schemas/*.json) with ajv, prints each line
// crossing as one JSON line, and acknowledges a message only after handling it. Messages a dead member of the
// group had taken but not acknowledged are taken over with XAUTOCLAIM, so a crash loses nothing (the same
// protocol as pipeline/consumer.py; see its docstring). Entries the stream's MAXLEN trimmed before they were handled
// (the group read too slowly, or the member holding them died) are said on stderr, as pipeline/consumer.py says them,
// and counted as lost in the summary line at exit.
//
//   npm ci && node index.js --redis-url redis://127.0.0.1:6379/0 --group lines
//
// Options: --redis-url URL (or $REDIS_URL), --prefix hv, --group NAME, --consumer NAME (default host-pid, a name
//   taken out of the group at exit unless it still holds messages; keep one across restarts), --from-start,
//   --count N (exit after N line crossings), --idle-exit-ms MS (exit once nothing arrived for MS),
//   --claim-idle-ms MS (take over messages other members left unacknowledged this long; default 30000),
//   --counts (at exit, also validate the counts hash of every camera seen).
// Exit status: 0, or 1 when a message did not validate (it is reported on stderr and still acknowledged:
// it is the producer's bug, and retrying will not fix it), or 2 on an error. SIGINT or SIGTERM ends the run after
// the message in hand (a second one at once).
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");
const Ajv2020 = require("ajv/dist/2020");
const { createClient } = require("redis");

function parseArgs(argv) {
  const opts = {
    redisUrl: process.env.REDIS_URL || "redis://127.0.0.1:6379/0", prefix: "hv", group: "node-consumer",
    consumer: `${os.hostname()}-${process.pid}`, named: false, fromStart: false, count: null, idleExitMs: null,
    claimIdleMs: 30000, counts: false,
    schemas: process.env.HV_SCHEMAS || path.join(__dirname, "..", "..", "workers", "schemas"),
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    const whole = () => {  // parseInt would take "abc" as NaN, which no count or time ever reaches
      const v = next();
      if (!/^\d+$/.test(v)) throw new Error(`${a}: expected a whole number >= 0, got ${JSON.stringify(v)}`);
      return Number(v);
    };
    if (a === "--redis-url") opts.redisUrl = next();
    else if (a === "--prefix") opts.prefix = next();
    else if (a === "--group") opts.group = next();
    else if (a === "--consumer") [opts.consumer, opts.named] = [next(), true];
    else if (a === "--from-start") opts.fromStart = true;
    else if (a === "--count") opts.count = whole();
    else if (a === "--idle-exit-ms") opts.idleExitMs = whole();
    else if (a === "--claim-idle-ms") opts.claimIdleMs = whole();
    else if (a === "--counts") opts.counts = true;
    else if (a === "--schemas") opts.schemas = next();
    else throw new Error(`unknown option ${a}`);
  }
  return opts;
}

function loadValidators(dir) {
  const ajv = new Ajv2020({ allErrors: true, strict: false });
  const load = (kind) => ajv.compile(JSON.parse(fs.readFileSync(path.join(dir, `${kind}-v1.json`), "utf8")));
  return { event: load("event"), counts: load("counts") };
}

// XGROUP DELCONSUMER only if the consumer holds nothing pending (it would destroy those entries), atomically: the
// script of pipeline/consumer.py. KEYS: stream. ARGV: group, consumer, idle ms. No shebang: Redis 6.2 has none.
const FORGET_IF_IDLE = `
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
`;

// Entries MAXLEN trimmed before the group read them: {the group's last-delivered id, the stream's first id, how many
// (-1: not counted, Redis 6.2)}, or nil; on Redis 7 the group's entries-read is set past the gap, so that it is said
// once. The script of pipeline/consumer.py (_TRIMMED_UNREAD, which says why). KEYS: stream. ARGV: group.
const TRIMMED_UNREAD = `
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
      if last == '0-0' then return nil end
      return {last, first[1], -1}
    end
    local removed = added - s['length']
    if removed <= read then return nil end
    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', removed)
    return {last, first[1], removed - read}
  end
end
return nil
`;
// A pause this long since Redis answered the last read of new entries (the process stopped, a slow handler) may have
// let MAXLEN trim entries the group had not read: the next read checks (as pipeline/consumer.py, _GAP_CHECK_AFTER_S).
const GAP_CHECK_AFTER_MS = 1000;

function redact(url) {
  // Credentials never reach the output: all up to the last @, as a password may hold / or @.
  return url.replace(/\/\/.*@/, "//***@");
}

function describe(errors) {
  return (errors || []).map((e) => `${e.instancePath || "/"} ${e.message}`).join("; ");
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const validate = loadValidators(opts.schemas);
  const stream = `${opts.prefix}:events`;
  let lastMessage = Date.now();
  let gaveUp = null; // why the client stopped reconnecting
  // The client retries forever while commands wait for it: with --idle-exit-ms an unreachable Redis ends the
  // run as well, and a password or database that Redis refuses ends it at once (it retried them forever).
  // Until then it retries as its default strategy does (50 ms doubling to 2 s, plus jitter).
  const reconnectStrategy = (retries, cause) => {
    const text = String(cause && cause.message);
    if (/WRONGPASS|NOAUTH|NOPERM|DB index is out of range/.test(text)) {
      gaveUp = new Error(`Redis at ${redact(opts.redisUrl)} refused the connection: ${text}`);
    } else if (opts.idleExitMs !== null && Date.now() - lastMessage >= opts.idleExitMs) {
      gaveUp = new Error(`no answer from Redis at ${redact(opts.redisUrl)} for --idle-exit-ms ${opts.idleExitMs}`);
    }
    return gaveUp || Math.min(2 ** retries * 50, 2000) + Math.floor(Math.random() * 200);
  };
  let client;
  try {
    client = createClient({ url: opts.redisUrl, socket: { reconnectStrategy } });
  } catch (err) {
    throw new Error(`--redis-url ${redact(opts.redisUrl)}: ${err.message}`);
  }
  client.on("error", (err) => console.error(`redis: ${err.message}`));
  clients.push(client);
  await client.connect();
  const ensureGroup = async (id) => {
    try {
      await client.xGroupCreate(stream, opts.group, id, { MKSTREAM: true });
    } catch (err) {
      if (!String(err.message).includes("BUSYGROUP")) throw err;
    }
  };
  await ensureGroup(opts.fromStart ? "0" : "$");

  let stopping = false;
  for (const signal of ["SIGINT", "SIGTERM"]) {
    // Without a handler Node dies at once (and ignores SIGTERM as a container's PID 1): the rest of the batch
    // stayed pending under a name that does not come back, for --claim-idle-ms.
    process.on(signal, () => {
      if (stopping) process.exit(130);
      console.error(`${signal}: stopping after the message in hand`);
      stopping = true;
      // Redis away: node-redis holds every command until it is back, and the loop waited with them (the signal
      // was seen only once Redis returned). Its commands fail now; what it holds stays pending (at least once).
      if (client.isOpen && !client.isReady) client.destroy();
    });
  }

  let crossings = 0, invalid = 0, handled = 0;
  // Lost to MAXLEN: trimmed before the group read them (skipped; uncounted: gaps Redis 6.2 does not count), or
  // trimmed while pending under a member that never acknowledged them (trimmed); said as pipeline/consumer.py does.
  let skipped = 0, trimmed = 0, uncounted = 0;
  const cameras = new Set();
  const handle = async (id, fields) => {
    let msg = null, valid = false; // a flag, not msg === null: the JSON "null" was counted invalid unreported
    try {
      msg = JSON.parse(fields.data);
      valid = true;
    } catch (err) {
      console.error(`${id}: not JSON: ${err.message}`);
    }
    if (valid && !validate.event(msg)) {
      console.error(`${id}: does not match event-v1.json: ${describe(validate.event.errors)}`);
      valid = false;
    }
    if (!valid) invalid++;
    else {
      cameras.add(msg.camera);
      if (msg.type === "line_crossed") {
        crossings++;
        console.log(JSON.stringify({ id, camera: msg.camera, line: msg.line, direction: msg.direction,
          head: msg.head, class: msg.class, track_id: msg.track_id, frame: msg.frame, count: msg.count }));
      }
    }
    await client.xAck(stream, opts.group, id);  // after handling: a crash before this leaves it pending
    handled++;
  };

  // XREADGROUP by hand: node-redis' xReadGroup throws a TypeError on the nil that Redis 6.2 gives for an own
  // pending entry deleted from the stream (MAXLEN), and each restart under the same --consumer failed on it again.
  const readGroup = async (id) => {
    const reply = await client.sendCommand(["XREADGROUP", "GROUP", opts.group, opts.consumer, "COUNT", "100",
      ...(id === ">" ? ["BLOCK", "500"] : []), "STREAMS", stream, id]);
    return (reply ? reply[0][1] : []).map(([entryId, fields]) => {
      const message = fields ? Object.create(null) : null; // as node-redis builds it
      for (let i = 0; fields && i < fields.length; i += 2) message[fields[i]] = fields[i + 1];
      return { id: entryId, message };
    });
  };

  // Before a read of new entries: says the entries MAXLEN trimmed before the group read them, which that read jumps
  // without a word (its output jumped, and the run counted nothing lost). Checked on the first read, after a pause
  // (GAP_CHECK_AFTER_MS since Redis can have answered the last one) or after a full batch (behind the producers).
  let answered = -Infinity, behind = false, checkGaps = true;
  const sayTrimmedUnread = async () => {
    let gap;
    try {
      gap = await client.eval(TRIMMED_UNREAD, { keys: [stream], arguments: [opts.group] });
    } catch (err) {
      const text = String(err && err.message);
      if (text.includes("no such key")) return; // the stream is gone: the read finds the group gone too
      if (!/NOPERM|NOSCRIPT|unknown command/i.test(text)) throw err;
      console.error(`redis: cannot check ${stream} for entries trimmed unread (${text}): not checking again`);
      checkGaps = false;
      return;
    }
    if (!gap) return;
    const [last, first, n] = gap;
    if (n >= 0) skipped += n; else uncounted++;
    const what = n >= 0 ? `${n} entries were trimmed (MAXLEN) before group '${opts.group}' read them (it had read up `
      + `to ${last})` : `entries after ${last}, if there were any, were trimmed (MAXLEN) before group '${opts.group}' `
      + "read them (Redis did not count them)";
    console.error(`warning: ${stream}: ${what}: going on from ${first}; size redis.maxlen for the slowest consumer`);
  };
  const sayTrimmedPending = (n) => {
    trimmed += n;
    console.error(`warning: ${stream}: ${n} entries delivered to group '${opts.group}' but never acknowledged (their `
      + "consumer died or stopped before handling them) were trimmed (MAXLEN) or deleted while pending: they are "
      + "gone, never handled; size redis.maxlen for the longest outage");
  };
  const readNew = async () => {
    if (checkGaps && (behind || performance.now() - answered > GAP_CHECK_AFTER_MS)) await sayTrimmedUnread();
    const sent = performance.now();
    const messages = await readGroup(">");
    // Timed from the earliest moment Redis can have answered (see pipeline/consumer.py's _xread): a read that waited
    // out its BLOCK on a quiet stream is no pause, and one answered while the process was stopped (SIGSTOP) is.
    answered = messages.length ? sent : Math.min(performance.now(), sent + 500);
    behind = messages.length >= 100;
    return messages;
  };

  let cursor = "0"; // own pending first (a restart under the same --consumer), then new messages
  let claimFrom = "0-0";
  const enough = () => stopping || (opts.count !== null && crossings >= opts.count);
  const done = () => enough() || (opts.idleExitMs !== null && Date.now() - lastMessage >= opts.idleExitMs);
  const handleAll = async (messages) => {
    let gone = 0;
    for (const [i, m] of messages.entries()) {
      if (enough()) {
        // The rest was taken but not handled: claimable by any member now instead of after --claim-idle-ms
        // (XCLAIM ... IDLE JUSTID keeps owner and delivery count), as pipeline/consumer.py hands it back.
        const rest = messages.slice(i).filter((r) => r.message).map((r) => r.id);
        if (rest.length) {
          await client.xClaimJustId(stream, opts.group, opts.consumer, 0, rest, { IDLE: opts.claimIdleMs });
        }
        break;
      }
      if (!m.message) {  // pending, but trimmed from the stream (MAXLEN): nothing left to handle
        await client.xAck(stream, opts.group, m.id);
        gone++;
        continue;
      }
      await handle(m.id, m.message);
      lastMessage = Date.now();
    }
    if (gone) sayTrimmedPending(gone);
  };
  while (!done()) {
    try {
      // Take over what dead members of the group left unacknowledged.
      const claimed = await client.xAutoClaim(stream, opts.group, opts.consumer, opts.claimIdleMs, claimFrom,
        { COUNT: 100 });
      claimFrom = claimed.nextId;
      // Redis 7 takes entries deleted while pending (MAXLEN trimmed them) out of the pending list itself, and lists
      // them third: they went without a word.
      if (claimed.deletedMessages && claimed.deletedMessages.length) sayTrimmedPending(claimed.deletedMessages.length);
      // Redis 6.2 gives an entry deleted while pending as nil, without its id, and keeps it pending: the read
      // of own pending entries acknowledges it.
      if (claimed.messages.some((m) => !m)) cursor = "0";
      await handleAll(claimed.messages.filter((m) => m));
      if (enough()) continue;
      const messages = cursor === ">" ? await readNew() : await readGroup(cursor);
      if (cursor !== ">") cursor = messages.length ? messages[messages.length - 1].id : ">";
      await handleAll(messages);
    } catch (err) {
      const text = String(err && err.message);
      if (stopping && !client.isOpen) break; // the signal handler closed it: Redis was away
      if (text.includes("NOGROUP") || text.includes("stream key no longer exists")) {
        // Redis restarted without persistence (the client reconnected on its own) or the stream was deleted (Redis 7
        // wakes a read blocked on it with "UNBLOCKED the stream key no longer exists", not NOGROUP): everything the
        // stream holds now is new, so the group starts again from its beginning.
        console.error(`redis: group ${opts.group} of ${stream} is gone; creating it again from the start`);
        await ensureGroup("0");
      } else if (/^READONLY|instance state changed/.test(text)) {
        // A failover behind one address: the old master, a replica now, refuses this connection's writes for good
        // (and woke its blocked read with "UNBLOCKED ... instance state changed"); a new connection reaches the new
        // master, as pipeline/consumer.py does. It ended the run (status 2).
        console.error(`redis: ${text}; connecting again`);
        client.destroy();
        await client.connect();
      } else if (!client.isOpen) {  // the reconnect strategy gave up
        throw new Error(`${gaveUp ? gaveUp.message : "the Redis client closed"} (${text})`);
      } else if (client.isReady && !/socket closed|ECONN|EPIPE|connection|closed|^LOADING/i.test(text)) {
        // LOADING: a Redis restarted with persistence answers so until its data is back (redis-py waits it out)
        throw err;
      } else {
        console.error(`redis: ${text}; going on once reconnected`);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      // Own pending entries first again: a read whose reply was lost left them pending under this name.
      cursor = "0";
      claimFrom = "0-0";
    }
  }

  if (opts.counts && !client.isOpen) console.error("counts not checked: stopped while Redis was away");
  else if (opts.counts) {
    for (const camera of cameras) {
      if (camera === "*") continue;
      const counts = await client.hGetAll(`${opts.prefix}:cam:${camera}:counts`);
      if (Object.keys(counts).length === 0) continue; // a camera without zones or lines
      if (!validate.counts(counts)) {
        invalid++;
        console.error(`counts of ${camera}: do not match counts-v1.json: ${describe(validate.counts.errors)}`);
      } else console.log(JSON.stringify({ counts: camera, fields: Object.keys(counts).length }));
    }
  }
  const notCounted = uncounted ? ` and ${uncounted} gaps Redis did not count` : "";
  console.error(`handled ${handled} events, ${crossings} line crossings, ${invalid} invalid, `
    + `${skipped + trimmed} lost to MAXLEN (${skipped} trimmed unread${notCounted}, ${trimmed} trimmed while pending)`);
  if (!opts.named && client.isReady) {
    // A host-pid name never comes back: each run left one behind in the group (as `hydravision tail --group` did).
    try {
      await client.eval(FORGET_IF_IDLE, { keys: [stream], arguments: [opts.group, opts.consumer, "0"] });
    } catch (err) {
      console.error(`redis: could not take ${opts.consumer} out of group ${opts.group}: ${err.message}`);
    }
  }
  if (client.isReady) await client.quit();
  else if (client.isOpen) client.destroy(); // stopped by a signal while Redis is away: QUIT would wait for it
  process.exitCode = invalid ? 1 : 0;
}

const clients = [];

main().catch((err) => {
  console.error(`error: ${err.stack || err}`);
  process.exitCode = 2;
  // A client left reconnecting would keep the process alive forever, consuming nothing.
  for (const client of clients) if (client.isOpen) client.destroy();
});
