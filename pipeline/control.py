"""The Redis control stream: any Redis client adds, removes, updates, lists or exports cameras.

    XADD {prefix}:control * data '{"op": "remove", "id": "lobby", "request_id": "r1", "user": "ops"}'

Each command is answered on ``{prefix}:control:results`` (field ``data``, JSON): ``status`` accepted or
rejected, ``reason`` naming the field, ``code`` (the HTTP API's status for the same answer: 409 for an add of a
running camera), the command's stream ``command`` id and its ``request_id``, ``by``.
Commands are read through a consumer group; each one's result is written and the command acknowledged and
deleted (a camera password in it must not stay in Redis) in one MULTI/EXEC, tried again through a Redis blip
(the answer, never the command). So a command is applied once, also across a controller restart: the group
remembers what it acknowledged, and a command a crashed controller took but never acknowledged is applied by
the next one (the cameras it started died with it).
Commands sent while no controller runs wait for the next one, unless they carry ``expires`` (unix
seconds): `hydravision cameras` sets it to its own timeout, and deletes its command when that passed unanswered.
Commands on different cameras (and list, export) are applied side by side, as the HTTP API's are: a camera that
takes tens of seconds to start holds up no other command; those on one camera are applied in stream order.

Who may send commands is Redis's to decide (ACLs on the key); ``user`` is declared by the sender (the
CLI sends its ``ACL WHOAMI``) and recorded as ``by: redis:<user>`` in the result and the audit event.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any, Literal, get_args

import redis
from pydantic import Field, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.admission import MAX_BODY_BYTES, CommandRejected, strict_json
from pipeline.config import _format_errors
from pipeline.consumer import _stream_entries  # one reading of XREAD(GROUP)'s reply shapes
from workers.publish import encode, entry_order
from workers.redact import redact_text
from workers.settings import Strict

log = logging.getLogger(__name__)

MAX_DELIVERIES = 3  # a command that took the controller down this often is dropped, not tried forever
# Any Redis ACL user name (the CLI sends its WHOAMI: team:ops, ops/eu): printable ASCII without spaces, so it
# cannot forge log lines or audit fields; a narrower set refused every command of such a user
SENDER = r"^[!-~]{1,64}$"
MAX_AT_ONCE = 8  # cameras' commands applied at once, a thread each: a flood waits in Redis, not in threads
MAX_READ = 64  # commands read and not yet answered, also those queued behind one on their camera (memory only)
# How long the reader waits for a command before it goes on with the next beside it: a quick one keeps the
# stream's order, and one that takes the controller down is dropped alone (its neighbours were never started)
IN_ORDER_S = 0.5


def control_key(prefix: str) -> str:
    return f"{prefix}:control"


def redis_now(client: redis.Redis) -> float:
    """Unix seconds on Redis's clock, which a command's ``expires`` is written and checked on: the sender's and
    the service's machines may disagree by minutes (every command expired on arrival, or one its sender had been
    told expires unapplied was applied later); both reach Redis. The local clock where TIME is refused (an ACL
    without it, as docs/architecture.md's example user)."""
    try:
        seconds, micros = client.time()
    except redis.ResponseError:
        return time.time()
    return seconds + micros / 1_000_000


def unanswered(client: redis.Redis, key: str, entry_id: bytes | str) -> str:
    """What became of the command at ``entry_id`` that got no answer in time, for the sender to say: a service
    that read it may still be applying it (starting a camera takes seconds); one that reads it from now on
    rejects it, as senders set ``expires`` to their own timeout."""
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:  # e.g. an ACL without XINFO
        return "a service that read the command may still apply it; if none did, it expires unapplied"
    if any(entry_order(g["last-delivered-id"]) >= entry_order(entry_id) for g in groups):
        return "a service read the command and may still apply it (see the cameras' list)"
    return ("is a hydravision service running on this Redis with this prefix? (no service read the command: "
            "it expires unapplied)")


def await_answer(client: redis.Redis, results: str, request_id: str, after: bytes | str, timeout_s: float,
                 stop: threading.Event | None = None) -> dict | None:
    """The answer (an entry on ``results`` after id ``after`` whose JSON carries ``request_id``) to a command a
    sender just added, or None when none came within ``timeout_s`` or ``stop`` was set (checked every second).
    A Redis restart meanwhile is waited out: the service answers once Redis is back; raises the connection
    error when Redis is still away at the end (the command may have been applied)."""
    deadline, lost = time.monotonic() + timeout_s, None
    while (left := deadline - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
        try:
            reply = client.xread({results: after}, block=max(1, int(min(left, 1.0) * 1000)), count=100)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            lost = e
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            continue
        lost = None
        for _, entries in _stream_entries(reply):  # a RESP3 client's (?protocol=3) is a dict: unpacked, a ValueError
            for result_id, fields in entries:
                after = result_id
                try:  # another writer's entry, not JSON or not an object, is not the answer
                    answer = json.loads(fields.get(b"data", fields.get("data")))  # "data": a decode_responses client
                except (TypeError, ValueError):
                    continue
                if isinstance(answer, dict) and answer.get("request_id") == request_id:
                    return answer
    if lost is not None:
        raise lost
    return None


def take_back(client: redis.Redis, key: str, entry_id: bytes | str) -> str:
    """Deletes a sender's own command that got no answer in time, and returns what became of it (``unanswered``,
    read before the delete): else it stays in the stream for ever, a camera password in it too. A service that
    read it has it; one that reads it later would reject it as expired anyway. An ACL without XDEL leaves it to
    that."""
    what = unanswered(client, key, entry_id)
    try:
        client.xdel(key, entry_id)
    except redis.ResponseError:
        pass
    return what


def results_key(prefix: str) -> str:
    return f"{prefix}:control:results"


class Command(Strict):
    """One command on the control stream (the JSON in its ``data`` field)."""
    op: Literal["add", "remove", "update", "list", "export"]
    camera: dict[str, Any] | None = Field(None, description="add: the camera, as in the config")
    id: str | None = Field(None, description="remove, update: the camera id")
    changes: dict[str, Any] | None = Field(None, description="update: the fields to change")
    request_id: str | None = Field(None, max_length=128, description="echoed in the result")
    user: str | None = Field(None, pattern=SENDER, description="who sends it (declared)")
    expires: float | None = Field(None, description="unix seconds; later, the command is rejected unapplied")


def parse_command(fields: dict) -> Command:
    raw = fields.get(b"data", fields.get("data"))
    if raw is None:
        raise CommandRejected("data: missing (XADD {prefix}:control * data '<JSON command>')")
    if len(raw) > MAX_BODY_BYTES:  # as the HTTP API's body: parsed, a huge one held the loop and its memory
        raise CommandRejected(f"data: larger than {MAX_BODY_BYTES} bytes", 413)
    try:
        data = strict_json(raw)
    except json.JSONDecodeError as e:
        raise CommandRejected(f"data: not valid JSON ({e})") from None
    except ValueError as e:  # a key given twice, NaN, too deep
        raise CommandRejected(f"data: {e}") from None
    if not isinstance(data, dict):
        raise CommandRejected(f"data: expected a JSON object, got {type(data).__name__}")
    try:
        return Command.model_validate(data)
    except ValidationError as e:
        urls = [v for v in (data.get("camera") or {}).values() if isinstance(v, str)] \
            if isinstance(data.get("camera"), dict) else []
        raise CommandRejected(_format_errors(e, urls, root="data")) from None


REQUIRED = {"add": ("camera",), "remove": ("id",), "update": ("id", "changes"), "list": (), "export": ()}


def check_required(cmd: Command) -> None:
    for field in REQUIRED[cmd.op]:
        if getattr(cmd, field) is None:
            raise CommandRejected(f"data.{field}: required for op {cmd.op!r}")
    camera_id = (cmd.camera or {}).get("id")
    if cmd.op == "add" and cmd.id is not None and cmd.id != camera_id:  # the answer named id, the add used camera.id
        raise CommandRejected(f"data.id: {cmd.id!r} is not the added camera's id {camera_id!r} (leave it out)")


def execute(controller: Any, cmd: Command, by: str) -> Any:
    """Runs a (checked) command on the App; CommandRejected when it cannot be applied."""
    if cmd.op == "add":
        return controller.add_camera(cmd.camera, by=by)
    if cmd.op == "remove":
        return controller.remove_camera(cmd.id, by=by)
    if cmd.op == "update":
        return controller.update_camera(cmd.id, cmd.changes, by=by)
    if cmd.op == "list":
        return controller.list_cameras()
    return controller.export_cameras()


class ControlConsumer:
    """Reads {prefix}:control in a thread of the controller and applies each command through the App, in a
    thread per camera (at most MAX_AT_ONCE cameras at once)."""

    def __init__(self, controller: Any, url: str, prefix: str, group: str = "hydravision",
                 results_maxlen: int = 1000, consumer: str = "controller", block_ms: int = 250):
        self.controller, self.url, self.prefix, self.group = controller, url, prefix, group
        self.consumer, self.block_ms, self.results_maxlen = consumer, block_ms, results_maxlen
        self.key, self.results = control_key(prefix), results_key(prefix)
        # A blocking read must return before the socket times out (redis-py's default would be 5 s), and stop()
        # waits for it to return: a short block (an idle round trip every 0.25 s) keeps a shutdown from waiting
        # ~1 s on it, while a command still wakes the read the moment it lands.
        # No retries by redis-py (a URL's ?retry_on_timeout=true asked for them): a read re-sent after its reply was
        # lost read only new commands, and those of the lost reply waited, unapplied, for the next controller.
        self._client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=block_ms / 1000 + 10,
                                            health_check_interval=30, client_name="hydravision-control",
                                            retry=Retry(NoBackoff(), 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-control", daemon=True)
        self.handled = 0
        self._results: dict[str, tuple[int, dict[str, Any]]] = {}  # the latest commands (hash), results by id
        # Commands are applied in threads of their own, one per lane: a camera's commands, or one command that
        # names no camera. Hand-written rather than a ThreadPoolExecutor: a lane must keep its order, and its
        # threads must not hold up the interpreter's exit on a camera that never starts.
        self._lock = threading.Lock()  # guards _lanes, _workers, _results, handled
        self._lanes: dict[tuple[str, str], deque] = {}
        self._workers: set[threading.Thread] = set()
        # A lane's thread holds a room; a command read holds a read until it is answered. Commands queued behind
        # a slow one on its camera hold no room: with one each, eight of them held up every other camera's again.
        self._room, self._reads = threading.Semaphore(MAX_AT_ONCE), threading.Semaphore(MAX_READ)
        self._read_back = threading.Event()  # a command met a Redis error before it was applied: read it back
        self._died: BaseException | None = None  # what took a command's thread down: the reader ends with it

    def start(self) -> "ControlConsumer":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops reading; commands being applied finish first (within ``timeout_s``), those waiting behind one on
        their camera stay pending, for the next controller."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s)
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._client.close()

    def _ensure_group(self) -> None:
        try:
            # From the stream's start: commands sent before the very first controller ran are applied too.
            self._client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _run(self) -> None:
        # backlog: read this consumer's own unacknowledged commands after that id first, then new ones (None)
        failures, backlog = 0, "0"
        failing_since = 0.0  # monotonic time of the first failure in a row: the recovery line says how long
        while not self._stop.is_set():
            try:
                if self._died is not None:
                    raise self._died
                if self._read_back.is_set():
                    self._read_back.clear()
                    backlog = "0"
                if failures or backlog:
                    self._ensure_group()
                # Own unacknowledged commands one at a time: each read counts a delivery of all it returns, and
                # with ten a command that took the controller down had its nine neighbours dropped with it.
                reply = self._client.xreadgroup(self.group, self.consumer, {self.key: backlog or ">"},
                                                count=1 if backlog else 10, block=None if backlog else self.block_ms)
                # any reply shape: a RESP3 client's (?protocol=3 in the URL) is a dict, and reply[0] a KeyError
                # that ended this thread at the first command, leaving every command unapplied
                entries = [entry for _, got in _stream_entries(reply) for entry in got]
                if backlog and not entries:
                    backlog = None
                for entry_id, fields in entries:
                    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    if self._stop.is_set() or not self._submit(entry_id, fields or {}, redelivered=bool(backlog)):
                        break
                    if backlog:
                        backlog = entry_id
                if failures:  # the failure was said once: its end is said too (the publishers' "writes again")
                    log.info("control stream %s reads again after %.1f s and %d failed attempts", self.key,
                             time.monotonic() - failing_since, failures)
                failures = 0
            except (redis.RedisError, OSError) as e:
                failures += 1
                # A read whose reply was lost (a socket timeout, a reset) handed its commands to this consumer all
                # the same: read those back first, or they waited, unapplied, for the next controller's start.
                backlog = "0"
                if failures == 1:
                    failing_since = time.monotonic()
                    log.warning("control stream %s: %s; retrying", self.key,
                                redact_text(f"{type(e).__name__}: {e}", [self.url]))
                self._stop.wait(_backoff(failures))

    def _submit(self, entry_id: str, fields: dict, redelivered: bool) -> bool:
        """Hands a command to its lane, and waits for it: a moment, or to its end when ``redelivered`` (read back
        one at a time, see _run). False when the consumer stopped first (the command stays pending)."""
        if not self._wait_for(self._reads):
            return False
        # A camera's commands keep their order (the App refuses a second command on a camera, 409); a command
        # read again while it is still applied (a Redis blip) waits behind itself, and is answered from _results.
        camera = _camera_of(fields)
        key = ("camera", camera) if camera is not None else ("entry", entry_id)
        done = threading.Event()
        item = (entry_id, fields, redelivered, done)
        with self._lock:  # only this reader thread makes lanes: one absent here stays absent until it makes it
            lane = self._lanes.get(key)
            if queued := lane is not None:
                lane.append(item)
        if not queued:
            if not self._wait_for(self._room):
                self._reads.release()
                return False
            with self._lock:
                self._lanes[key] = lane = deque([item])
                worker = threading.Thread(target=self._work, args=(key, lane), name="redis-control-command",
                                          daemon=True)
                self._workers.add(worker)
            worker.start()
            until = time.monotonic() + IN_ORDER_S
            while not done.wait(0.05) and not self._stop.is_set() and (redelivered or time.monotonic() < until):
                pass
        if self._died is not None:
            raise self._died
        return True

    def _wait_for(self, slots: threading.Semaphore) -> bool:
        """Takes one of ``slots``; False when the consumer stopped first."""
        while not slots.acquire(timeout=0.05):
            if self._stop.is_set():
                return False
        return True

    def _work(self, key: tuple[str, str], lane: deque) -> None:
        """Applies a lane's commands in stream order until it is empty or the consumer stops."""
        try:
            while not self._stop.is_set():
                entry_id, fields, redelivered, done = lane[0]
                try:
                    self._handle(entry_id, fields, redelivered)
                except (redis.RedisError, OSError) as e:
                    # Redis went away while the command was checked, before it was applied (see _apply)
                    log.warning("control stream %s: command %s: %s; reading it back", self.key, entry_id,
                                redact_text(f"{type(e).__name__}: {e}", [self.url]))
                    self._read_back.set()
                except BaseException as e:  # took the controller down: nothing more is applied or answered
                    self._died = e
                    raise
                finally:
                    self._reads.release()
                    done.set()
                with self._lock:
                    lane.popleft()
                    if not lane:
                        del self._lanes[key]
                        return
        finally:
            with self._lock:
                if self._lanes.get(key) is lane:
                    del self._lanes[key]
                self._workers.discard(threading.current_thread())
            self._room.release()

    def _handle(self, entry_id: str, fields: dict, redelivered: bool) -> None:
        # A command read again after it was applied: Redis came back from a restart without its delivery (its
        # persistence a second behind), and without the answer. The same answer again, not a second application;
        # only if it is still pending (read again while it was applied, its answer may have landed since).
        # The same command, not only the same id (its fields' hash: bodies of up to 1 MiB are not kept): a stream
        # deleted (or a Redis restarted empty) takes explicit ids again, and a new command at an old one was
        # answered with the old one's result, unapplied. One deleted since (its sender took it back) has no fields.
        sent = hash(tuple(sorted(fields.items())))
        with self._lock:
            before, result = self._results.pop(entry_id, (None, None))
        again = result is not None and (before == sent or not fields)
        result = result if again else self._apply(entry_id, fields, redelivered)
        with self._lock:
            self._results[entry_id] = (sent, result)
            if len(self._results) > 1000:
                del self._results[next(iter(self._results))]
        if self._answer(entry_id, result, check_first=again):
            with self._lock:
                self.handled += 1

    def _apply(self, entry_id: str, fields: dict, redelivered: bool) -> dict[str, Any]:
        """Checks and applies one command; its answer (accepted or rejected with a reason)."""
        result: dict[str, Any] = {"v": 1, "command": entry_id, "request_id": None, "op": None}
        by, in_app = "redis:unknown", False  # the App logs the rejections it makes itself
        try:
            if not fields:  # trimmed from the stream while pending: nothing left to apply
                raise CommandRejected("data: the command was deleted from the stream before it was applied")
            cmd = parse_command(fields)
            by = f"redis:{cmd.user or 'unknown'}"
            camera = (cmd.camera or {}).get("id") if cmd.op == "add" else cmd.id  # what an add adds is camera.id
            result.update(request_id=cmd.request_id, op=cmd.op, camera=camera)
            # Read first, so that the answer names its request: a dropped command's sender waited out its timeout.
            if redelivered and self._deliveries(entry_id) > MAX_DELIVERIES:
                raise CommandRejected(f"data: dropped after {MAX_DELIVERIES} deliveries that never completed")
            if cmd.expires is not None and (now := redis_now(self._client)) > cmd.expires:
                raise CommandRejected(f"data.expires: the command expired {now - cmd.expires:.0f} s ago, "
                                      "unapplied")
            check_required(cmd)
            in_app = True
            result.update(status="accepted", result=execute(self.controller, cmd, by),
                          code=201 if cmd.op == "add" else 200)
        except CommandRejected as e:
            # a command refused on one of its fields still names its request: its sender waited out its timeout,
            # and was told the command may still apply. Read leniently once, and only where the strict read failed
            # (a body of up to MAX_BODY_BYTES was parsed three more times).
            sent = _lenient(fields) if result["op"] is None else {}
            result.update(status="rejected", reason=e.reason, code=e.status, op=result["op"] or _op_of(sent),
                          request_id=result["request_id"] or _request_id(sent))
            if not in_app:
                self.controller.note_rejected(result["op"] or "command", by, e.reason,
                                              camera=result.get("camera") or _camera_in(sent))
        except Exception as e:  # a bug, or Ray failing: answer anyway, the controller keeps going
            if not in_app and isinstance(e, (redis.RedisError, OSError)):
                # Redis went away while the command was checked (TIME, its deliveries), before it was applied:
                # _run reads it back once Redis answers (it was rejected as an internal error)
                raise
            log.exception("control stream: command %s failed", entry_id)
            result.update(status="rejected", reason=redact_text(f"internal error: {type(e).__name__}: {e}", []),
                          code=500)
        result.update(by=by, ts=round(time.time(), 3))
        return result

    def _answer(self, entry_id: str, result: dict[str, Any], check_first: bool = False) -> bool:
        """Writes the answer and acknowledges the command, trying again through a Redis blip until that lands
        (True) or the consumer stops (False). The command is applied already: ``_run``'s own retry would read
        only new commands, leaving this one unanswered, and pending for the next controller to apply again."""
        failures = 0
        while True:
            try:
                pending = self._pending(entry_id) if failures or check_first else True
                if pending is None:
                    # The group is gone: Redis restarted empty under the failed try (or the stream was deleted), and
                    # the command with it, but not its effect. The answer alone, or its sender waits out its timeout.
                    self._client.xadd(self.results, {"data": encode(result)}, maxlen=self.results_maxlen,
                                      approximate=True)
                    return True
                if not pending and self._answered(entry_id):
                    return True  # the failed try's EXEC ran, only its reply was lost: no second answer
                # Not pending: Redis restarted empty and the reader made the group again (the command is gone, its
                # effect is not), or from persistence a moment behind (the command is there, not read yet: it goes
                # with the answer, or the reader read it again and it was answered twice).
                # The answer and the acknowledgement, both or neither; and the command goes from the stream, so
                # a camera password it carried does not stay in Redis (the answer holds none).
                pipe = self._client.pipeline(transaction=True)
                pipe.xadd(self.results, {"data": encode(result)}, maxlen=self.results_maxlen, approximate=True)
                pipe.xack(self.key, self.group, entry_id)
                pipe.xdel(self.key, entry_id)
                pipe.execute()
                return True
            except (redis.RedisError, OSError) as e:
                failures += 1
                if failures == 1:
                    log.warning("control stream %s: answering command %s: %s; retrying", self.key, entry_id,
                                redact_text(f"{type(e).__name__}: {e}", [self.url]))
                if self._stop.wait(_backoff(failures)):
                    log.warning("control stream %s: stopped before command %s (%s) was answered; it stays "
                                "pending, and the next controller applies it again unless it expired",
                                self.key, entry_id, result.get("status"))
                    return False

    def _answered(self, entry_id: str) -> bool:
        """Whether the results stream holds an answer to command ``entry_id`` (read after a failed try only)."""
        for _, fields in self._client.xrevrange(self.results, count=self.results_maxlen):
            try:
                # "data": a decode_responses client's (?decode_responses=true): never found, the command answered twice
                if json.loads(fields.get(b"data", fields.get("data", b""))).get("command") == entry_id:
                    return True
            except (ValueError, AttributeError):  # another writer's entry
                continue
        return False

    def _pending(self, entry_id: str) -> bool | None:
        """Whether the command still waits for its acknowledgement; None when the group is gone."""
        try:
            return bool(self._client.xpending_range(self.key, self.group, min=entry_id, max=entry_id, count=1))
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):
                return None  # the stream or its group was deleted: nothing is left to acknowledge
            raise

    def _deliveries(self, entry_id: str) -> int:
        info = self._client.xpending_range(self.key, self.group, min=entry_id, max=entry_id, count=1)
        return int(info[0]["times_delivered"]) if info else 0


def _lenient(fields: dict) -> dict:
    """A command's JSON object read leniently, for the answer of one that failed its checks ({} if none, or too
    large to be read at all)."""
    raw = fields.get(b"data", fields.get("data"))
    if raw is not None and len(raw) > MAX_BODY_BYTES:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _request_id(data: dict) -> str | None:
    """The request_id of a command that failed its checks (its ``_lenient`` object), for its answer (None if there
    is none)."""
    request_id = data.get("request_id")
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else None


def _op_of(data: dict) -> str | None:
    """The op of a command that failed its checks (its ``_lenient`` object), if it is one of the ops (an answer said
    "op": null)."""
    op = data.get("op")
    return op if op in get_args(Command.model_fields["op"].annotation) else None


def _camera_of(fields: dict) -> str | None:
    """The camera a command is for (an add's camera.id, else its id), read leniently; None for list, export and
    a command that names none."""
    return _camera_in(_lenient(fields))


def _camera_in(data: dict) -> str | None:
    """``_camera_of`` a command's ``_lenient`` object."""
    camera = data.get("camera") if data.get("op") == "add" else None  # what an add adds is camera.id
    camera_id = camera.get("id") if isinstance(camera, dict) else data.get("id")
    return camera_id if isinstance(camera_id, str) else None


def _backoff(failures: int) -> float:
    return min(5.0, 0.25 * 2 ** min(failures, 5))
