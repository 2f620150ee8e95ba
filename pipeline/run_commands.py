"""`hydravision run / demo / tail`: the long-running service and a Redis reader."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import stat
import sys
import termios
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console
from rich.live import Live
from rich.text import Text

from pipeline.camera_commands import redis_url
from pipeline.config import load_config
from pipeline.consumer import _stream_entries  # one reading of XREAD(GROUP)'s reply shapes
from pipeline.errors import UserError
from pipeline.logs import json_worker_logs, logs_above, plain_ray_prefix, quiet_ray
from pipeline.status import (ERROR_CELL_CHARS, console as make_console, read_camera_statuses, status_line,
                             status_table, whole_count)
from workers.publish import entry_order, keys, undelivered as publisher_undelivered
from workers.redact import redact_text, redact_url
from workers.redis_writer import _text  # an entry id as text, from a client that decodes or not

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
UNDELIVERED_EXIT = 3  # messages that never reached Redis: dropped, refused, or left at the stop (README: exit codes)
HEAD_LOST_EXIT = 4  # the Ray head (GCS) stopped answering: the run stopped before Ray ended it (App._head_lost)


def App(*args, **kwargs):  # noqa: N802 (stands for the class; tests put a stand-in here)
    """pipeline.app's App, imported when a run starts: its imports (supervision, scipy, the camera actors: ~1.7 s)
    made `status` and `tail`, which only read Redis, take seconds to start, even to fail."""
    from pipeline.app import App as app_class

    return app_class(*args, **kwargs)


class FailureWarnings:
    """Called with each tick's stats: one WARNING when a camera turns failed, with why. The status line was all a
    run said until its final table (nothing on stderr, nothing in the journal of a service run with --plain)."""

    def __init__(self) -> None:
        self.failed: set = set()

    def __call__(self, stats: list[dict]) -> None:
        for s in stats:
            camera = s.get("camera")
            if s.get("state") != "failed":
                self.failed.discard(camera)  # started again (a live update): a new failure is said again
            elif camera not in self.failed:
                self.failed.add(camera)
                why = redact_text(str(s.get("last_error") or "no reason given"), [])
                log.warning("camera %s failed: %s", camera, why)


class Signals:
    """What `run` adds to App's signal handlers (pipeline/app.py: a first SIGINT or SIGTERM drains and stops, a
    second exits at once), each time App puts them in (at the start, and again after ray.init and ray.shutdown
    replaced them):

    - SIGHUP (its terminal closed, an ssh session dropped) stops the run as SIGTERM does: its default action ended
      the controller as a crash does (exit 129: no drain, no final table, no summary, statuses left running until
      they read stale). One ignored from the start (nohup) stays ignored. There is no reload (a config edit needs a
      restart; cameras change live through the API): SIGHUP is no reload either.
    - SIGQUIT (Ctrl-\\ at a terminal) stops the run as SIGTERM does too: its default action was such a crash.
    - SIGUSR1 and SIGUSR2 (logrotate's "reopen your logs") are answered with one line and the run goes on: the logs go
      to stdout and stderr, there is nothing to reopen; their default action ended the controller as a crash does.
    - A second signal says, before App's exit at once, that the drain is abandoned and what it loses: the log ended
      at "Stopping: draining ..." without a word. Its numbers are the last tick's, what the controller holds then
      (the frames and messages themselves are in the camera processes, out of a signal handler's reach)."""

    def __init__(self, app, out: Output) -> None:
        self.app, self.out = app, out
        self.stats: list[dict] | None = None  # the last tick's
        self._ours: dict[int, object] = {}
        self._app_install = app.install_signal_handlers
        app.install_signal_handlers = self.install  # App calls it again after ray.init and ray.shutdown

    def tick(self, stats: list[dict]) -> None:
        self.stats = stats

    def install(self) -> None:
        self._app_install()
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if callable(handler) and handler is not self._ours.get(signum):  # App's, not ours wrapped again
                self._ours[signum] = functools.partial(self._second_said, handler)
                signal.signal(signum, self._ours[signum])
        for signum, handler in ((signal.SIGHUP, self._hang_up), (signal.SIGQUIT, self._hang_up),
                                (signal.SIGUSR1, self._carry_on), (signal.SIGUSR2, self._carry_on)):
            # nohup's ignored SIGHUP stays ignored; the others are ours whatever was inherited (a shell starts a
            # background job of a script with SIGQUIT ignored, as SIGINT, and SIGQUIT then did nothing)
            if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, handler)

    def _second_said(self, handler, signum: int, frame) -> None:
        try:
            if getattr(self.app, "_signalled", False):  # the handler exits at once now (os._exit): no final table
                if self.out.json_mode:  # why the run ended, as the CLI's other early ends say it (cli._fatal)
                    self.out.log.error(self.abandoned(signum),
                                       extra={"data": {"event": "exit", "exit_code": 128 + signum}})
                else:
                    self.out.say(self.abandoned(signum))
        finally:
            handler(signum, frame)

    def _hang_up(self, signum: int, frame) -> None:
        """SIGHUP or SIGQUIT: a stop as on SIGTERM."""
        if not getattr(self.app, "_signalled", False):
            hang_up = signum == signal.SIGHUP
            if hang_up:
                _leave_hung_up_terminal()
            with contextlib.suppress(OSError):
                self.out.say(f"{signal.Signals(signum).name}{' (the terminal or session closed)' if hang_up else ''}"
                             ": stopping as on SIGTERM")
        # Through SIGTERM's handler in place now: ours and App's, or while ray.init runs the one that holds what it
        # raises until ray.init has returned (cluster._signals_held)
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    def _carry_on(self, signum: int, _frame) -> None:
        with contextlib.suppress(OSError):
            self.out.say(f"{signal.Signals(signum).name} ignored: no log file to reopen (the logs go to stdout and "
                         "stderr) and no config to reload (a change to it needs a restart)")

    def abandoned(self, signum: int) -> str:
        exiting = f"A second signal: exiting at once (exit {128 + signum})"
        if self.stats is None:  # no tick yet: the start, or its undo after the first signal
            return f"{exiting}, the stop abandoned: the run's reaper ends the processes it had started"
        frames = sum(whole_count(s.get("in_slot")) + whole_count(s.get("in_flight")) for s in self.stats)
        held = sum(whole_count((s.get("publisher") or {}).get("queued")) for s in self.stats)
        return (f"{exiting}, the drain abandoned: the frames still in flight and the messages not yet in Redis are "
                f"lost (at the last status: {frames} frame(s) in flight, {held} message(s) not yet in Redis); "
                "no final table")


def _leave_hung_up_terminal() -> None:
    """Points stdout and stderr at /dev/null where they were a terminal that hung up: every write to it fails
    (EIO), and the first one, a line of the drain, raised out of it and ended the run before its shutdown."""
    for fd in (1, 2):
        try:
            termios.tcgetattr(fd)
        except termios.error as e:
            if e.args[0] == errno.EIO:  # a terminal, hung up (another file is no terminal: ENOTTY)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)
        except (OSError, ValueError):
            pass


class Output:
    """What `run` tells the operator: messages, status lines, the final table; or, with ``--log-format
    json``, the same as JSON records through logging (pipeline/logs.py), the stats as fields. Text as rich Text,
    not markup=False: a print while the live table draws redraws it with the print's options, and every state's
    colour markup showed raw ("[green]running[/]") in that frame."""

    def __init__(self, console: Console, json_mode: bool):
        self.console, self.json_mode = console, json_mode
        self.log = logging.getLogger("hydravision")

    def say(self, message: str, level: int = logging.INFO) -> None:
        """A line for the operator; in JSON a record at ``level``: App says a crash and restart at WARNING and the
        Ray head lost at ERROR (all were INFO, missed by an alert on level >= warning). Text is the same at any."""
        if self.json_mode:
            self.log.log(level, message)
        else:
            self.console.print(Text(message), highlight=False)

    say.takes_level = True  # App passes a level only to a say that takes one (print and tests' stand-ins do not)

    def status(self, stats: list[dict]) -> None:
        line = status_line(stats) or "no cameras"  # a service run for its control channels: not an empty line
        if self.json_mode:
            self.log.info(line, extra={"data": {"event": "status", "cameras": _compact(stats)}})
        else:
            self.console.print(Text(line), highlight=False)

    def warning(self, message: str, data: dict) -> None:
        """A message beside the final table; in JSON a warning record, ``data`` as its fields."""
        if self.json_mode:
            self.log.warning(message, extra={"data": data})
        else:
            self.console.print(Text(message), highlight=False)

    def final(self, finals: list[dict]) -> None:
        if self.json_mode:
            self.log.info("final", extra={"data": {"event": "final", "cameras": finals}})
        else:
            self.console.print(status_table(finals, title="final", final=True))


def _compact(stats: list[dict]) -> list[dict]:
    keep = ("camera", "state", "fps", "decode_fps", "latency_ms_p50", "latency_ms_p95", "decoded", "published",
            "dropped", "reconnects", "restarts", "last_error", "redis_error")
    return [{k: s.get(k) for k in keep if k in s} for s in stats]


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # checked before anything starts: found at the end of the run, it was a traceback ("a bug"), the stats lost
    if args.summary_json and not Path(args.summary_json).parent.is_dir():
        raise UserError(f"--summary-json {args.summary_json}: no such directory {Path(args.summary_json).parent}")
    if args.summary_json and Path(args.summary_json).is_dir():  # as the write at the end says, but before the run
        raise UserError(f"--summary-json {args.summary_json}: cannot write: Is a directory")
    if getattr(args, "api_port", None) is not None:
        config.api.port = args.api_port
    json_mode = getattr(args, "log_format", "text") == "json"
    console = make_console()
    interactive = not json_mode and console.is_terminal and config.status.table and not args.plain
    out = Output(console, json_mode)
    quiet_ray(getattr(args, "verbose", False))
    plain_ray_prefix()
    app = App(config, redis_url=args.redis_url, say=out.say, on_ray_started=json_worker_logs if json_mode else None)
    signals = Signals(app, out)
    app.install_signal_handlers()  # kept across ray.init() / ray.shutdown() by App (with Signals' beside them)
    try:
        app.start()
    except BaseException:  # what had started stops (cameras write their final status); the start's error shows
        try:
            app.shutdown(drain=False)
        except Exception:
            log.warning("stopping after a failed start failed too", exc_info=True)
        raise
    processes = len({id(h.process) for h in app.cameras.values()})
    out.say(f"Running {len(app.cameras)} camera(s) in {processes} process(es) (ray.cameras_per_process)"
            + (f" for {args.duration:g} s" if args.duration else "") + "; Ctrl-C to stop.")
    warn_failures = FailureWarnings()
    try:
        if interactive:
            with Live(status_table([]), console=console, refresh_per_second=2, transient=False) as live, \
                    logs_above(live.console):
                app.run(args.duration, on_tick=lambda s: (warn_failures(s), signals.tick(s),
                                                          live.update(status_table(s))))
        else:
            last = [0.0]

            def tick(stats: list[dict]) -> None:
                warn_failures(stats)
                signals.tick(stats)
                if time.monotonic() - last[0] >= args.log_every:
                    last[0] = time.monotonic()
                    out.status(stats)
            app.run(args.duration, on_tick=tick)
    finally:
        out.say("Stopping: draining in-flight frames, flushing Redis ...")
        finals = app.shutdown(drain=True)
    # before the table, which is the last thing read: a camera that failed after the last tick (or all of them,
    # the run ending at once)
    warn_failures(finals)
    # The cameras removed at run time have their rows too (state "removed", their counts at the removal), after
    # the running set's. Not in the exit code (neither failed nor not) nor in the undelivered messages: their
    # publisher closed at the removal, whose answer and camera_removed event said what it had not delivered.
    removed = list(getattr(app, "removed", []))
    out.final(finals + removed)
    failed = [f["camera"] for f in finals if f.get("state") == "failed"]
    undelivered = _undelivered(finals, getattr(app, "events", None))
    if undelivered:
        totals = {who: sum(why.values()) for who, why in undelivered.items()}
        reasons = {who: "; ".join(f"{n} {UNDELIVERED_WHY[k]}" for k, n in why.items())
                   for who, why in undelivered.items()}
        out.warning(f"{sum(totals.values())} message(s) not delivered to Redis: "
                    + ", ".join(f"{who} {totals[who]} ({reasons[who]})" for who in undelivered),
                    {"event": "undelivered", "undelivered": totals, "reasons": undelivered})
    if args.summary_json:
        try:
            _write_summary(Path(args.summary_json), json.dumps(finals + removed, indent=2, default=str))
        except OSError as e:  # no permission, a directory of that name: the final table above has the stats
            raise UserError(f"--summary-json {args.summary_json}: cannot write: {e.strerror or e}") from None
    # before exit 1: the cameras whose processes went with the head did not fail, and none that ran on answers now
    if getattr(app, "head_lost", None) is not None:
        from pipeline.cli import _fatal  # the other early ends' last line: in JSON the exit record (event: exit)

        return _fatal(args, f"Ray: the head (GCS) was lost ({app.head_lost:.0f} s unanswered): the run stopped "
                      "before Ray ended it", HEAD_LOST_EXIT)
    if failed and len(failed) == len(finals):
        return 1
    return UNDELIVERED_EXIT if undelivered else 0


UNDELIVERED_WHY = {"dropped": "dropped, its buffer full while Redis was unreachable", "rejected": "refused by Redis",
                   "left": "left in its buffer at the stop"}


def _undelivered(finals: list[dict], events) -> dict[str, dict[str, int]]:
    """The messages of each publisher (camera id; "controller events" for its own) that never reached Redis, by
    why (UNDELIVERED_WHY), those with any. "published" counts frames handed to the publisher: exit 0 read as "all in
    Redis" without it. Not only those left at the stop: a long outage's overflow (dropped) went unsaid at the end,
    only in the summary's publisher.dropped and in a publisher_dropped event once Redis was back, if ever."""
    held = {str(f.get("camera")): publisher_undelivered(f.get("publisher") or {}) for f in finals}
    if events is not None:
        held["controller events"] = publisher_undelivered(events.stats())
    return {who: why for who, why in held.items() if why}


def demo(args: argparse.Namespace) -> int:
    args.config = demo_config()
    return run(args)


def demo_config() -> Path:
    """configs/demo.yaml of the source tree; where hydravision was installed as a package (the Docker image, a
    wheel), the one under the working directory (the image's WORKDIR holds configs/)."""
    for path in (DEMO_CONFIG, Path.cwd() / "configs" / "demo.yaml"):
        if path.is_file():
            return path
    raise UserError("hydravision demo runs configs/demo.yaml of a hydravision checkout, which is neither beside "
                    f"the installed package ({DEMO_CONFIG.parent}) nor under this directory: run it from the "
                    "checkout, or `hydravision run PATH/TO/demo.yaml`")


def _connect(args: argparse.Namespace) -> tuple[redis.Redis | None, str]:
    """A client for --redis-url / $HYDRAVISION_REDIS_URL (default: local Redis), or None after saying why."""
    url = redis_url(args.redis_url)
    try:
        # No retries by redis-py (a URL's ?retry_on_timeout=true asked for them): tail --group's read re-sent after
        # its reply was lost took only new entries, and the lost ones waited --claim-idle-ms, then came out of order.
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10, retry=Retry(NoBackoff(), 0))
        client.ping()
    except ValueError as e:  # not a Redis URL (http://..., a typo in the scheme)
        raise UserError(f"--redis-url {redact_url(url)}: {redact_text(str(e), [url])}") from None
    except (redis.RedisError, OSError) as e:  # the reason too: "DB index is out of range" is no network issue
        print(f"error: cannot reach Redis at {redact_url(url)}: {type(e).__name__}: {redact_text(str(e), [url])}",
              file=sys.stderr)
        return None, url
    return client, url


def _redis_errors_are_user_errors(command):
    """``status`` and ``tail`` read what others wrote: a key of another type (WRONGTYPE), an ACL that refuses a
    read, Redis going away after the first ping is one line naming it, not a bug's traceback."""
    @functools.wraps(command)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except redis.RedisError as e:
            raise UserError(f"Redis: {type(e).__name__}: {redact_text(str(e), [args.redis_url or ''])}") from None
    return wrapped


@_redis_errors_are_user_errors
def status(args: argparse.Namespace) -> int:
    """The cameras table from Redis, from any machine; entries no service refreshes any more show as stale."""
    client, url = _connect(args)
    if client is None:
        return 2
    statuses = read_camera_statuses(client, args.prefix)
    if args.json:
        print(json.dumps(statuses, indent=2))
        return 0
    console = make_console()
    console.print(status_table(statuses, title=f"cameras in {keys(args.prefix).cameras}",
                               error_chars=ERROR_CELL_CHARS))
    if not statuses:  # an empty table said nothing of why: no service yet, or another --prefix / database
        print(f"no camera in {keys(args.prefix).cameras} at {redact_url(url)}: no service has "
              "published there yet, or it uses another --prefix or database", file=sys.stderr)
    return 0


def _write_summary(path: Path, text: str) -> None:
    """A file written beside and renamed (a full disk left a cut JSON file under the name, the last run's gone), at
    the file a symlink names; anything else (/dev/stdout, a pipe: ``>(jq ...)``) written to as it is."""
    from models.files import aside_of, written_aside  # no torch in there

    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        regular = True  # a new file
    if not regular:
        path.write_text(text)
        return
    real = Path(os.path.realpath(path))
    with written_aside(real, aside_of(real)) as tmp:
        tmp.write_text(text)


@_redis_errors_are_user_errors
def tail(args: argparse.Namespace) -> int:
    """Prints messages of one camera (or the events stream) as they arrive in Redis."""
    client, url = _connect(args)
    if client is None:
        return 2
    k = keys(args.prefix)
    stream = k.events if args.events else k.detections(args.camera)
    last = "0-0" if args.from_start else _newest_id(client, stream)
    count = 0
    note = ""
    if args.camera:
        try:  # only notes: an ACL that allows this camera's keys alone may refuse the statuses
            known = {s["camera"]: s for s in read_camera_statuses(client, args.prefix)}
            unheard_of = args.camera not in known and not client.exists(stream)
        except redis.RedisError:
            known, unheard_of = {}, False
        s = known.get(args.camera)
        if s and s["stale"]:
            age = s["heartbeat_age_s"]
            print(f"note: camera {args.camera}'s status is stale (last heartbeat "
                  f"{'never' if age is None else f'{age:.0f} s ago'}, state {s.get('reported_state')!r}): "
                  "no running service publishes it", file=sys.stderr)
        if unheard_of:  # a typo waited in silence for ever; the camera may still be added later, so wait on
            note = (f"note: no camera {args.camera!r} in {k.cameras} at {redact_url(url)} "
                    f"({_camera_names(sorted(known))}); waiting for it in case it is added")
    if args.group:
        return _tail_group(client, url, stream, args, note)
    print(f"tailing {stream} at {redact_url(url)} (Ctrl-C to stop)", file=sys.stderr)
    if note:  # after the "tailing" line, which scripts wait for first
        print(note, file=sys.stderr)
    try:
        # Entries MAXLEN trims before tail reads them are said (a slow or paused terminal): counted by the stream's
        # numbering (entries-added, Redis 7), from the number of the entry read last, known from the start and
        # checked after every read (XINFO STREAM: one more round trip, for a reader that prints anyway)
        number, numbered = _number_of(client, stream, last)
        since = last  # where the entries not yet said trimmed begin (_say_trimmed)
        while args.count is None or count < args.count:
            try:
                reply = client.xread({stream: last}, block=5000, count=100)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # Redis went away (a restart, a network cut): waited out, as tail --group, the dashboard and the
                # Node consumer do (it ended the tail with exit 2). A refused password is no outage: it stays an error.
                if isinstance(e, redis.AuthenticationError):
                    raise
                resumed = _wait_for_redis(client, url, stream, last, e)
                if _text(resumed) != _text(last):  # another stream than the one counted so far: count it anew
                    last = since = resumed
                    number, numbered = _number_of(client, stream, last)
                continue
            for _, entries in _stream_entries(reply):  # any reply shape: a RESP3 client's (?protocol=3) is a dict
                if number is not None:
                    number, since = _say_trimmed(client, stream, since, number, entries)
                elif numbered and len(entries) < 100:  # caught up: count again from here
                    number, _ = _number_of(client, stream, entries[-1][0])
                    since = entries[-1][0]
                for entry_id, fields in entries:
                    last = entry_id
                    _print_line(_shown(entry_id, fields, args.json), args.json)
                    count += 1
                    if args.count is not None and count >= args.count:
                        break
    except KeyboardInterrupt:  # stopped, not finished: a script tells it from a --count reached by 128 + SIGINT
        return 130
    return 0


def _wait_for_redis(client: redis.Redis, url: str, stream: str, last: bytes | str, error: Exception) -> bytes | str:
    """Says that Redis went away, retries (backoff up to 2 s) until it answers again, and returns where tail reads on
    (``_resume_after``, which says what was lost)."""
    print(f"note: lost Redis at {redact_url(url)} ({type(error).__name__}: {redact_text(str(error), [url])}); "
          f"waiting for it to come back, then reading on after {_text(last)} (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    began, failures = time.monotonic(), 0
    while True:
        time.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
        try:
            client.ping()
            resumed = _resume_after(client, stream, last)
            break
        except redis.AuthenticationError:  # the Redis that came back refuses our password: no outage
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            failures += 1
    print(f"note: Redis is back after {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    return resumed


def _resume_after(client: redis.Redis, stream: str, last: bytes | str) -> bytes | str:
    """Where tail reads on after an outage, having printed up to ``last``, saying what it cannot show. Entry ids are
    the writer's clock: a stream that still holds ``last``, or whose top is past it (trimmed past it, or Redis
    restarted without its data and written to since), reads on after ``last``; one whose top is older (restored
    from disk short of its last entries, or a clock stepped back) after its top; an empty one from its start."""
    if _text(last) == "0-0" or client.xrange(stream, last, last, count=1):
        return last
    top = client.xrevrange(stream, count=1)
    if not top:
        print(f"note: {stream} is empty (Redis restarted without its data): reading it from its start; what the old "
              f"one held after {_text(last)} that tail had not read yet, if anything, is lost", file=sys.stderr,
              flush=True)
        return "0-0"
    top_id = top[0][0]
    if entry_order(top_id) >= entry_order(last):
        print(f"note: {stream} no longer holds {_text(last)}, the last entry tail printed (MAXLEN trimmed past it, "
              "or Redis restarted without its data): reading on after it; what it held after that entry that tail "
              "had not read yet, if anything, is lost", file=sys.stderr, flush=True)
        return last
    print(f"note: Redis came back with {stream} only up to {_text(top_id)}, older than {_text(last)}, the last entry "
          "tail printed (restored from disk short of its last entries): reading on after it", file=sys.stderr,
          flush=True)
    return top_id


def _number_of(client: redis.Redis, stream: str, last: bytes | str) -> tuple[int | None, bool]:
    """The stream's number (entries-added) of entry ``last`` ("0-0": before the first), None where not known now;
    and whether this server numbers entries at all (Redis 7)."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:  # no stream yet: its first entry will be number 1
        return (0 if _text(last) == "0-0" else None), True
    except redis.RedisError:
        return None, False
    added, length = info.get("entries-added"), info["length"]
    if added is None:
        return None, False
    if _text(last) == "0-0":
        return added - length, True
    newest = info["last-entry"][0] if info["last-entry"] else None
    return (added if newest is not None and entry_order(newest) == entry_order(last) else None), True


def _say_trimmed(client: redis.Redis, stream: str, since: bytes | str, number: int,
                 entries: list) -> tuple[int | None, bytes | str]:
    """Says how many entries after ``since`` MAXLEN trimmed before tail read them, once the read that returned
    ``entries`` tells. ``number``: the stream's number of ``since`` plus the entries tail read after it (the number of
    the entry read last, where nothing was trimmed). Returns the same pair after ``entries`` (None: no longer told)."""
    try:
        info = client.xinfo_stream(stream)
    except redis.RedisError:
        return None, since
    ids = [entry_order(entry_id) for entry_id, _ in entries]
    first = entry_order(info["first-entry"][0]) if info.get("first-entry") else None
    if first is not None and first <= entry_order(since):  # ``since`` is still there: the read went on from it
        return number + len(entries), entries[-1][0]
    if first is None or first > ids[-1]:
        # All of the reply trimmed since Redis sent it: it waited in the socket while tail was stopped (SIGSTOP, a
        # laptop asleep). Counted at the next read, which begins at the stream's oldest entry, from ``since`` still
        return number + len(entries), since
    if first not in ids:  # between the reply's entries but none of them: not the stream that sent it (deleted, made
        # again), whose numbers tell nothing of what tail missed
        print(f"note: tail fell behind {stream}: entries after {_text(since)} may have been trimmed (MAXLEN) "
              "before it read them (not counted: the stream was made again since)", file=sys.stderr, flush=True)
        return None, entries[-1][0]
    # The reply's entries are consecutive in the stream, whose oldest one now is the one numbered
    # entries-added - length + 1: that numbers the reply's first one, trimmed since or not (a reply that sat in the
    # socket while tail was stopped, or one trimmed into before this XINFO)
    numbered = info["entries-added"] - info["length"] + 1 - ids.index(first)
    if (lost := numbered - number - 1) > 0:
        print(f"note: {lost} entries of {stream} after {_text(since)} were trimmed (MAXLEN) before tail read them "
              f"(it prints slower than they arrive, or was stopped); going on from {_text(entries[0][0])}",
              file=sys.stderr, flush=True)
    return numbered + len(entries) - 1, entries[-1][0]


def _camera_names(names: list[str], shown: int = 20) -> str:
    if not names:
        return "no camera there yet"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return "cameras there: " + ", ".join(names[:shown]) + more


def _shown(entry_id: bytes | str, fields: dict, as_json: bool) -> str:
    """One stream entry as tail prints it; one not in our format (no data, not JSON, fields missing) says so
    on its line instead of ending the tail with a traceback."""
    try:
        return _message_line(entry_id, json.loads(fields[b"data"]), as_json)
    except (KeyError, ValueError, TypeError) as e:
        return _unreadable(entry_id, e)


def _message_line(entry_id: bytes | str, msg, as_json: bool) -> str:
    """A decoded message as tail prints it (tail --group gets them decoded)."""
    try:  # allow_nan=False: a NaN that json.loads took in is no JSON for `| jq`
        return json.dumps(msg, allow_nan=False) if as_json else _summarize(msg)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        return _unreadable(entry_id, e)


class _Unreadable(str):
    """The line tail prints for an entry it cannot show; with --json it goes to stderr, stdout is JSON only."""


def _unreadable(entry_id: bytes | str, e: Exception) -> str:
    text = entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id
    return _Unreadable(f"entry {text}: unreadable ({type(e).__name__}: {str(e)[:200]})")


def _print_line(line: str, as_json: bool) -> None:
    print(line, file=sys.stderr if as_json and isinstance(line, _Unreadable) else sys.stdout, flush=True)


def _newest_id(client: redis.Redis, stream: str) -> bytes | str:
    """The id of the stream's newest entry ("0-0": empty or missing). Reading on from it, not from "$" at every
    XREAD, prints what arrives between two reads."""
    newest = client.xrevrange(stream, count=1)
    return newest[0][0] if newest else "0-0"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, ending tail --group as Ctrl-C does: its default action killed the process where it stood, so the
    messages it held were not handed back and its host-pid consumer name stayed in the group."""


@contextlib.contextmanager
def _sigterm_interrupts():
    def interrupt(signum, frame):
        raise _Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _tail_group(client: redis.Redis, url: str, stream: str, args: argparse.Namespace, note: str = "") -> int:
    """tail --group: at least once, through pipeline/consumer.py; a message is acknowledged once printed."""
    from pipeline.consumer import GroupConsumer

    consumer = GroupConsumer(client, stream, args.group, args.consumer, start="0" if args.from_start else "$",
                             block_ms=2000, claim_idle_ms=args.claim_idle_ms or 30_000)
    print(f"tailing {stream} at {redact_url(url)} as {consumer.consumer!r} of group {args.group!r} "
          "(Ctrl-C to stop)", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)

    def show(m) -> None:
        try:
            _print_line(_message_line(m.id, m.data, args.json), args.json)  # decoded by the consumer already
        except BrokenPipeError:  # `| head -1`: run() reads on after an Exception; this ends it, unacknowledged
            raise _ReaderGone from None

    try:
        with _sigterm_interrupts():
            consumer.run(show, max_messages=args.count)
    except _Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # as the plain tail: 128 + SIGINT
        return 130
    except _ReaderGone:
        raise BrokenPipeError from None  # the CLI ends quietly, as the plain tail does
    finally:
        if args.consumer is None:  # its host-pid name is never used again
            with contextlib.suppress(redis.RedisError):
                consumer.leave()
    return 0


class _ReaderGone(BaseException):
    """What tail --group's handler raises when its output closed: a BaseException, so that GroupConsumer.run
    (which logs an Exception and goes on) stops and hands the rest of its batch back."""


# Control characters (newlines too: one line per message) shown as "?": an entry anyone wrote to Redis could retitle
# or clear the reader's terminal with an escape sequence in a camera id or an event's type (status's _cell does so)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _summarize(msg: dict) -> str:
    return _CONTROL.sub("?", _summary(msg))


def _summary(msg: dict) -> str:
    if "type" in msg:
        extra = {k: v for k, v in msg.items() if k not in ("v", "type", "camera", "ts")}
        return f"{msg['ts']:.3f} {msg['camera']} {msg['type']} {json.dumps(extra)}"
    dets = ", ".join(
        f"{d['head']}/{d['class']}#{d['track_id'] if d['track_id'] is not None else '-'} {d['conf']:.2f}"
        for d in msg["detections"]
    )
    return f"{msg['camera']} frame {msg['frame']} pts {msg['pts']:.2f} latency {msg['latency_ms']:.0f} ms: {dets or 'nothing'}"
