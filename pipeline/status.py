"""The live status table of `hydravision run`, and a plain one-line form for logs and pipes."""

from __future__ import annotations

import math
import os
import re
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workers.redact import redact_text


class PipeSafeConsole(Console):
    """rich's Console, except when stdout's reader goes away (`run ... | tee log` ended by the same Ctrl-C,
    `status | head`): rich raised SystemExit(1) out of whichever print it was, in a signal handler or the API's
    thread too, which skipped the run's drain or its final stats and --summary-json (exit 1, not a word). The
    output is dropped from then on instead, as main() does for a BrokenPipeError."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
        except (OSError, ValueError):  # a stdout with no file behind it (a test's capture): nothing to flush
            pass
        finally:
            os.close(devnull)


def console() -> PipeSafeConsole:
    """A terminal gets rich's own width; logs and pipes (docker logs, the journal, tests) get long lines,
    never an address wrapped in two or a table cut to 80 columns."""
    out = PipeSafeConsole()
    return out if out.is_terminal else PipeSafeConsole(width=250, soft_wrap=True)


def _number(v) -> bool:
    """Whether a status value is a number: an entry written by hand or by another program may hold anything,
    such as a JSON integer too large for a float (formatting it as one raised OverflowError)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    # NaN and inf (JSON's 1e999 reads as inf) are no rate or count: the table showed "nan" fps, "inf" drops
    return math.isfinite(v) if isinstance(v, float) else abs(v) <= sys.float_info.max


def whole_count(v) -> int:
    """A count read from a status or stats (written by hand or by another program, it may hold anything): ``v``
    where it is an integer (a bool is none), else 0."""
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _drops(d: dict | None) -> str:
    """Frames lost, by reason; not those the camera's fps setting leaves out by design (``rate``: "not analysed"
    on /metrics), which read as 60% drops for a 25 fps file at fps: 10. Those are ``_rate_skips``."""
    if not isinstance(d, dict) or not d:
        return "-"
    d = {k: v for k, v in d.items() if _number(v) and k != "rate"}
    total = sum(d.values())
    parts = [f"{k} {v}" for k, v in d.items() if v]
    return f"{total}" + (f" ({', '.join(parts)})" if parts else "")


def _rate_skips(d: dict | None):
    """Frames the camera's fps setting left out (``dropped.rate``), None where there is no such number."""
    v = d.get("rate") if isinstance(d, dict) else None
    return v if _number(v) else None


def _count(v) -> str:
    return "-" if v is None else str(v)


def _ms(v: float | None) -> str:
    return f"{v:.0f}" if _number(v) else "-"


def _fps(v: float | None) -> str:
    return f"{v:.1f}" if _number(v) else "-"


def _cell(v) -> str:
    """A value as the table's text: not markup ('[rtsp @ 0x55]' in an FFmpeg error is no tag, '[/x]' no closing
    one), and without control characters: an entry anyone wrote to Redis could retitle or clear the reader's
    terminal with an escape sequence, and the table counted it as width (its columns went askew)."""
    return escape(_CONTROL.sub("?", str(v)))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # newlines and tabs stay: rich lays them out


def _heads(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v or "")


def _error(s: dict) -> str:
    """The camera's last error; first, why its messages are not reaching Redis now (published counts frames
    handed to the publisher, which keeps them while Redis refuses)."""
    redis_error = f"Redis: {s['redis_error']}" if s.get("redis_error") else ""
    return "; ".join(str(e) for e in (redis_error, s.get("last_error")) if e)


def _restarted(s: dict) -> str:
    """Said after the state of a camera whose process crashed and was restarted (its counts span them all)."""
    n = s.get("restarts")
    return f" (restarted {n}x)" if _number(n) and n > 0 else ""


def _removed_when(s: dict) -> str:
    """Said after "removed": the same camera removed, added again and removed again had rows nothing told apart."""
    try:
        return f" {time.strftime('%H:%M:%S', time.localtime(s['removed_at']))}" if _number(s.get("removed_at")) else ""
    except (OverflowError, OSError, ValueError):  # an entry not of ours: a time no clock shows
        return ""


# The column folds. Printed once (the final table, `hydravision status`): cut at 120 (after a URL of 50), an error
# lost what to do about it ("put it in the config file"). Redrawn live, rows past the terminal's height are cut off,
# so an error there takes at most a line or two.
ERROR_CELL_CHARS, LIVE_ERROR_CHARS = 400, 120


def status_table(stats: list[dict], title: str = "hydravision", final: bool = False,
                 error_chars: int | None = None) -> Table:
    """``final``: the stats of a stop (the run's last table), whose rates are those of its last seconds.
    ``error_chars``: where the last error is cut (ERROR_CELL_CHARS for a final table, else LIVE_ERROR_CHARS)."""
    error_chars = error_chars or (ERROR_CELL_CHARS if final else LIVE_ERROR_CHARS)
    table = Table(title=title, title_justify="left", expand=False)
    for col, just in [("camera", "left"), ("state", "left"), ("fps", "right"), ("decode fps", "right"),
                      ("latency p50/p95 ms", "right"), ("published", "right"), ("dropped", "right"),
                      ("skipped (fps)", "right"), ("reconnects", "right"), ("heads", "left"), ("last error", "left")]:
        table.add_column(col, justify=just, overflow="fold")
    for s in stats:
        state = _cell(s.get("state", "?"))
        when = _removed_when(s)
        style = {"running": "green", "reconnecting": "yellow", "failed": "red", "unavailable": "red",
                 "stale": "red"}.get(state, "")
        skipped = f" +{s['skipped']} skipped" if s.get("skipped") else ""  # frames the motion gate kept from inference
        gone = not rates_now(s) and not (final and state in FINAL_STATES)
        now = {"fps": None, "decode_fps": None} if gone else s
        table.add_row(
            _cell(s.get("camera", "?")), (f"[{style}]{state}[/]" if style else state) + when + _cell(_restarted(s)),
            _fps(now.get("fps", 0)),
            _fps(now.get("decode_fps", 0)), f"{_ms(now.get('latency_ms_p50'))}/{_ms(now.get('latency_ms_p95'))}",
            _cell(_count(s.get("published", 0)) + skipped),
            _cell(_drops(s.get("dropped"))), _cell(_count(_rate_skips(s.get("dropped")))),
            _cell(_count(s.get("reconnects", 0))),
            _cell(_heads(s.get("heads"))), _cell(_short(_error(s), error_chars)),
        )
    return table


def status_line(stats: list[dict]) -> str:
    parts = []
    for s in stats:
        skips = _rate_skips(s.get("dropped"))
        now = s if rates_now(s) else {}
        parts.append(f"{s.get('camera')}: {s.get('state')}{_restarted(s)} {_fps(now.get('fps'))} fps "
                     f"p50 {_ms(now.get('latency_ms_p50'))} ms pub {s.get('published', 0)} "
                     f"drop {_drops(s.get('dropped'))}"
                     + (f" skip {skips}" if skips else "")
                     + (f" NOT IN REDIS: {_short(s['redis_error'], 80)}" if s.get("redis_error") else "")
                     + (f" error: {_short(s['last_error'])}" if s.get("state") in DOWN_STATES and s.get("last_error")
                        else ""))
    return " | ".join(parts)


# why is news: the line said "failed" and no more; "starting" with an error is a decoder restarted by the watchdog,
# or held stalled (an open that blocks): the line said "starting" for ever where `hydravision status` said why
DOWN_STATES = ("failed", "reconnecting", "unavailable", "starting")


def _short(error, limit: int = 100) -> str:
    """An error for the one-line status: redacted before it is cut (a cut URL's userinfo is no longer found)."""
    text = redact_text(" ".join(str(error).split()), [])
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- camera statuses as stored in Redis ({prefix}:cameras), for readers on any machine ------------------------

STALE_AFTER_S = 10.0  # cameras refresh their status every second; ten missed refreshes means nobody runs it
FINAL_STATES = ("stopped", "ended", "failed")  # written once by a camera that finished: never stale


def rates_now(status: dict) -> bool:
    """Whether a status's rates and frame ages are what its camera does now: not a stale one's (a service gone, maybe
    for days) nor a finished camera's (stopped, ended, failed: those of its last seconds, which an ended file's tile
    and `hydravision status` showed as live for as long as the entry stayed); nor a camera removed at run time (a row
    of `run`'s final table: its rates were those of its last seconds before the removal, maybe hours before the end)."""
    return not status.get("stale") and status.get("state") not in ("stale", "removed", *FINAL_STATES)


def mark_stale(status: dict, now: float, stale_after_s: float = STALE_AFTER_S) -> dict:
    """A copy of a stored status with ``stale`` set, and state "stale" when its service stopped refreshing it
    without a final word (the driver was killed, the machine died). Statuses without a heartbeat come from
    a version that wrote none: stale too, as nothing refreshes them."""
    out = dict(status)
    beat = _seconds(status.get("heartbeat_ts"))
    final = status.get("state") in FINAL_STATES
    out["heartbeat_age_s"] = None if beat is None else round(max(0.0, now - beat), 1)
    out["stale"] = not final and (beat is None or now - beat > stale_after_s)
    if out["stale"]:
        out["reported_state"], out["state"] = status.get("state"), "stale"
    return out


def _seconds(value) -> float | None:
    """A heartbeat as unix seconds; None where it is not a finite number (such an entry is never refreshed)."""
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer too large for a float
        return None
    return out if math.isfinite(out) else None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")  # Python's json reads NaN and Infinity, other parsers do not


def _finite(text: str) -> float | None:
    """A JSON number too large for a float (1e999) as None, not inf: `status --json` wrote inf out as Infinity,
    which JSON parsers other than Python's refuse (the dashboard's scrub makes it None too)."""
    value = float(text)
    return value if math.isfinite(value) else None


def redis_now(client) -> float:
    """The Redis server's clock, which heartbeats are compared with: this machine's may be off by more than
    STALE_AFTER_S (a laptop reading a server's Redis), which showed every live camera stale or a dead one
    running. This machine's clock where TIME is refused (an ACL that allows reads only)."""
    import time

    import redis

    try:
        seconds, micros = client.time()
    except redis.ResponseError:
        return time.time()
    return seconds + micros / 1e6


def read_camera_statuses(client, prefix: str, now: float | None = None) -> list[dict]:
    """Every camera entry of {prefix}:cameras, sorted by camera id, each passed through ``mark_stale`` (at
    ``now``, default the Redis server's time). Entries that are not JSON objects are reported as such instead
    of failing the whole read."""
    import json

    from workers.publish import keys

    now = redis_now(client) if now is None else now
    out = []
    for cam, raw in sorted(client.hgetall(keys(prefix).cameras).items()):
        cam = cam.decode(errors="replace") if isinstance(cam, bytes) else cam
        try:
            status = json.loads(raw.decode() if isinstance(raw, bytes) else raw, parse_constant=_not_json,
                                parse_float=_finite)
            if not isinstance(status, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:  # RecursionError: arrays or objects nested too deep to parse
            status = {"state": "unreadable", "last_error": f"status is not valid JSON: {e}"}
        out.append({**mark_stale(status, now), "camera": cam})  # the hash's field names it, not what the entry says
    return out
