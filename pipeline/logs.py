"""How `hydravision` speaks where services run (docker logs, the systemd journal, a log shipper).

``--log-format json``: one JSON object per line on stdout, for every log record, status line, message of
the controller and line a Ray worker prints: ``{"ts", "level", "logger", "msg", ...}``. Records may carry
more fields (a status line its ``cameras``). Every message passes the redactor on its way out.

Ray's start-up noise that a user cannot act on is held back unless ``-v``: the "Token authentication is
enabled for this Ray cluster" warning of a local cluster. Only that log line is filtered; Ray's token
authentication itself is left exactly as Ray sets it up (on, with a token under ~/.ray). The core worker's
"constructor arguments in the object store" error is avoided at its cause instead: StreamActors get the
inference replicas' names rather than their handles (workers/stream.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from workers.redact import log_to_stderr, redact_text

if TYPE_CHECKING:
    from rich.console import Console

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
# The level in a worker's line, as StreamActor's logging writes it (TEXT_FORMAT), as Ray's Python loggers write
# it (a tab after the time: ray_constants.LOGGER_FORMAT) and as Ray's C++ core writes it ("[date time E pid tid]")
_WORKER_LEVEL = re.compile(r"^\S+ \S+\s(DEBUG|INFO|WARNING|ERROR|CRITICAL) |^\[\S+ \S+ ([TDIWEC]) \d+ \d+\] ")
_CORE_LEVELS = {"T": "debug", "D": "debug", "I": "info", "W": "warning", "E": "error", "C": "critical"}
# Ray prints only what follows this marker of a cluster-level message (the raylet's "Spilled ... MiB")
_INFO_MESSAGE = ":info_message:"


class JsonFormatter(logging.Formatter):
    """A record as one JSON object; fields passed as ``extra={"data": {...}}`` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": redact_text(record.getMessage(), [])}
        if record.exc_info:
            out["exc"] = redact_text(self.formatException(record.exc_info), [])
        if record.stack_info:  # log.warning(..., stack_info=True)
            out["stack"] = redact_text(self.formatStack(record.stack_info), [])
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            out.update({k: v for k, v in data.items() if k not in out})
        return json.dumps(out, default=str)


def drop_stdout() -> None:
    """stdout's reader went away (`run --log-format json | head -1`): what is written there from now on goes to
    /dev/null, as the text output's console does (pipeline/status.py, PipeSafeConsole); the service runs on."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
    except (OSError, ValueError):  # a stdout with no file behind it (a test's capture): nothing to point elsewhere
        pass
    finally:
        os.close(devnull)


class StdoutHandler(logging.StreamHandler):
    """A StreamHandler on stdout that goes quiet once stdout's reader is gone: logging's own handler printed a
    "--- Logging error ---" traceback on stderr for every later record."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            drop_stdout()
        else:
            super().handleError(record)


def setup_logging(verbose: bool = False, log_format: str = "text") -> None:
    """Root logging for the CLI: text on stderr (as before), or JSON lines on stdout."""
    global _ray_in_json
    _ray_in_json = log_format == "json"
    level = logging.DEBUG if verbose else logging.INFO
    route_uvicorn()  # the API's and the dashboard's servers both: uvicorn's own format beside ours otherwise
    if log_format != "json":
        log_to_stderr(level, TEXT_FORMAT, datefmt="%H:%M:%S")
        return
    handler = StdoutHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _route_ray()  # Ray imported already
    # Ray imported later (run_commands imports pipeline/app.py lazily) gives its logger its handler back: routed
    # again at its next record, or its warnings came out as plain text on stderr
    if not getattr(logging.getLogRecordFactory(), "routes_ray", False):
        logging.setLogRecordFactory(_routing_ray(logging.getLogRecordFactory()))
    # A library's warnings.warn() and an exception that ends a thread were printed raw on stderr, in text over
    # several lines: as records they are JSON lines too (logger "py.warnings"; "hydravision" with "exc")
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception


_ray_in_json = False  # setup_logging's JSON lines: Ray's logger goes through them


def _route_ray() -> None:
    """Ray gives its logger a handler of its own (plain text on stderr, not propagated) when it is imported: its
    records go through the root's handler instead. Its level stays Ray's to set (ray.init(logging_level=...))."""
    ray_logger = logging.getLogger("ray")
    if ray_logger.handlers or not ray_logger.propagate:
        ray_logger.handlers.clear()
        ray_logger.propagate = True


def _routing_ray(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """A log record factory around ``make`` that routes Ray's logger before each record of a ``ray.*`` logger is
    handled, whenever Ray was imported: the record factory is the one hook every record passes, those of a logger
    that does not propagate included (Ray's own factory, set at its import, calls this one)."""
    def factory(name: str, *args: Any, **kwargs: Any) -> logging.LogRecord:
        if _ray_in_json and (name == "ray" or name.startswith("ray.")):
            _route_ray()
        return make(name, *args, **kwargs)

    factory.routes_ray = True  # type: ignore[attr-defined]
    return factory


_ALREADY_CUT = re.compile(r"(.*)\.\.\. \(\d+ characters\)", re.S)


def cut_lines(text: str) -> str:
    """``text`` with each line cut as the config's errors are (pipeline/config.py:_cut): a reason that quotes what
    was sent (a remove's id of 5000 characters) in an answer or a log line. A line cut already (a refusal's
    _format_errors) is left as it is: cut again, it told its cut length, not the length sent."""
    from pipeline.config import MAX_ERROR_LINE, _cut

    def cut(line: str) -> str:
        done = len(line) > MAX_ERROR_LINE and _ALREADY_CUT.fullmatch(line)
        return line if done and len(done[1]) == MAX_ERROR_LINE else _cut(line)

    return "\n".join(cut(line) for line in text.split("\n"))


class _ThroughService(logging.Filter):
    """On uvicorn's logger "uvicorn.error" (its server's and connections' records): each record goes to the service's
    handlers, the root logger's, and no further. A uvicorn.Config made with uvicorn's default logging (the
    dashboard's, made after the API's) gives logger "uvicorn" a handler of its own, not propagated, that wrote
    "ERROR:    Cancel 1 running task(s), ..." in its own format on stderr beside the JSON lines; a logger's
    filters outlast that. That ERROR, requests still running when a stop's grace period ends, is part of a
    normal stop, a WARNING: they are answered 503, saying so (pipeline/api.py:AnswerCutRequests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and "timeout graceful shutdown exceeded" in str(record.msg):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        logging.getLogger().handle(record)
        return False


def route_uvicorn() -> None:
    """uvicorn's records through the service's logging (JSON lines with --log-format json), as Ray's are."""
    errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ThroughService) for f in errors.filters):
        errors.addFilter(_ThroughService())


def _log_thread_exception(hook: threading.ExceptHookArgs) -> None:
    """threading.excepthook with --log-format json: the exception that ended a thread as one error record."""
    if hook.exc_type is not SystemExit:  # as threading's own hook: a thread's SystemExit is no error
        name = hook.thread.name if hook.thread is not None else "?"
        logging.getLogger("hydravision").error("thread %s failed", name,
                                               exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))


@contextlib.contextmanager
def logs_above(console: Console) -> Iterator[None]:
    """While a rich Live draws on ``console``: log lines meant for the terminal print above its table. Handlers
    keep the stream they were given (stderr, before Live put its proxy in sys.stderr): their lines went between
    the table's redraws and tore it. rich's FileProxy hands each line to the console; a log redirected to a file
    (``2>log``) stays there."""
    from rich.file_proxy import FileProxy  # here: the CLI imports this module for every command, rich only for some

    loggers = (logging.getLogger(), logging.getLogger("ray"))  # Ray's has a handler of its own, not propagated
    handlers = list(dict.fromkeys(h for logger in loggers for h in logger.handlers if _on_terminal(h)))
    streams = [h.setStream(FileProxy(console, h.stream)) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)  # flushes what the proxy held of a line


def _on_terminal(handler: logging.Handler) -> bool:
    try:
        return isinstance(handler, logging.StreamHandler) and handler.stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _DropLine(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_ray(verbose: bool) -> None:
    """Holds back the token-authentication notice of a local Ray cluster unless ``verbose``."""
    if not verbose:
        logging.getLogger(RAY_TOKEN_LOGGER).addFilter(_DropLine(RAY_TOKEN_NOTICE))


def plain_ray_prefix() -> None:
    """Where stdout or stderr is no terminal (a file, a pipe, the journal), the "(StreamActor pid=...)" prefix of the
    lines Ray forwards from its workers comes without colour codes: they were written raw into log files. Ray reads
    RAY_COLOR_PREFIX as it prints each line (ray/_private/worker.py, print_worker_logs); a value the user set stays."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def worker_lines_apart() -> None:
    """Before Ray is imported (it reads RAY_DEDUP_LOGS once, at import): every line a camera process logs reaches the
    controller's output. Ray's deduplication takes words with digits for noise, so "camera street-1: ..." and
    "camera street-2: ..." were one line, "[repeated 9x across cluster]": 67 budget actions of five cameras showed
    as 16 lines, most cameras' none (and the marker came with colour codes in files). A value the user set stays."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def json_worker_logs() -> bool:
    """After ray.init(log_to_driver=True): the lines Ray forwards from its workers become JSON records too
    (Ray prints them raw, prefixed "(StreamActor pid=...)"). Uses Ray's log dispatcher, which is not a
    public API: when it is missing, Ray's own printing stays and False is returned."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return False

    def emit(batch: dict) -> None:
        lines = batch.get("lines", [])
        if batch.get("pid") == "autoscaler":  # cluster status every few seconds: only its events, as Ray does
            lines = list(filter_autoscaler_events(lines))
        who = batch.get("actor_name") or batch.get("task_name") or batch.get("pid") or "ray-worker"
        stream = "stderr" if batch.get("is_err") else "stdout"
        for line in lines:
            m = _WORKER_LEVEL.match(line)
            if m:
                level = m.group(1).lower() if m.group(1) else _CORE_LEVELS[m.group(2)]
            elif batch.get("pid") == "raylet":  # a notice ("A worker died ...", yellow in Ray's print) a warning,
                level = "info" if _INFO_MESSAGE in line else "warning"  # an ":info_message:" ("Spilled ...") info
            else:
                level = "warning" if stream == "stderr" else "info"
            if _INFO_MESSAGE in line:
                line = line.split(_INFO_MESSAGE, 1)[1]
            record = {"ts": round(time.time(), 3), "level": level, "logger": f"ray.worker.{who}",
                      "pid": batch.get("pid"), "stream": stream, "msg": redact_text(line, [])}
            sys.stdout.write(json.dumps(record, default=str) + "\n")
        sys.stdout.flush()

    def emit_or_drop(batch: dict) -> None:
        try:
            emit(batch)
        except BrokenPipeError:  # raised into Ray's log thread, it ended the thread with an error record
            drop_stdout()

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("hydravision_json")  # Ray started again in this process: one handler, not two
    dispatcher.add_handler("hydravision_json", emit_or_drop)
    # The raylet's notices ("A worker died or was killed ...": a camera's or a replica's process crashed) pass no
    # dispatcher: Ray's error listener thread (listen_error_messages) calls print_to_stdstream itself, which
    # printed them as plain text among the JSON lines. Ray looks that function up at each call.
    ray_print = getattr(ray_worker, "print_to_stdstream", None)
    if ray_print is not None and not getattr(ray_print, "through_dispatcher", False):
        ray_worker.print_to_stdstream = _through_dispatcher(ray_print, dispatcher)
    return True


def _through_dispatcher(ray_print: Callable[..., None], dispatcher: Any) -> Callable[..., None]:
    """Ray's print_to_stdstream, which hands each batch to json_worker_logs' handler while that is on Ray's
    dispatcher (Ray's printing again once it is not: a test's dispatcher put back as it was)."""
    def print_to_stdstream(data: dict, ignore_prefix: bool = False) -> None:
        ours = dict(dispatcher.handlers).get("hydravision_json")
        if ours is None:
            ray_print(data, ignore_prefix=ignore_prefix)
        else:
            ours(data)

    print_to_stdstream.through_dispatcher = True  # type: ignore[attr-defined]
    return print_to_stdstream


def say_at(say: Callable[..., Any], text: str, level: int) -> None:
    """``say(text)`` at ``level`` where that say takes one (`run`'s Output.say: a JSON record's level, what an alert
    on level >= warning watches), else the text alone (print, tests' stand-ins)."""
    say(text, **({"level": level} if getattr(say, "takes_level", False) else {}))
