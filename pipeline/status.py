"""The live status table of `hydravision run`, and a plain one-line form for logs and pipes."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table


def _drops(d: dict | None) -> str:
    if not d:
        return "-"
    total = sum(d.values())
    parts = [f"{k} {v}" for k, v in d.items() if v]
    return f"{total}" + (f" ({', '.join(parts)})" if parts else "")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _error(s: dict) -> str:
    """The camera's last error; first, why its messages are not reaching Redis now (published counts frames
    handed to the publisher, which keeps them while Redis refuses)."""
    redis_error = f"Redis: {s['redis_error']}" if s.get("redis_error") else ""
    return "; ".join(e for e in (redis_error, s.get("last_error")) if e)


def status_table(stats: list[dict], title: str = "hydravision") -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    for col, just in [("camera", "left"), ("state", "left"), ("fps", "right"), ("decode fps", "right"),
                      ("latency p50/p95 ms", "right"), ("published", "right"), ("dropped", "right"),
                      ("reconnects", "right"), ("heads", "left"), ("last error", "left")]:
        table.add_column(col, justify=just, no_wrap=col != "last error", overflow="fold")
    for s in stats:
        # Values are text, not markup: '[rtsp @ 0x55]' in an FFmpeg error is no tag, '[/x]' no closing one.
        state = escape(str(s.get("state", "?")))
        style = {"running": "green", "reconnecting": "yellow", "failed": "red", "unavailable": "red",
                 "stale": "red"}.get(state, "")
        table.add_row(
            escape(str(s.get("camera", "?"))), f"[{style}]{state}[/]" if style else state, f"{s.get('fps', 0):.1f}",
            f"{s.get('decode_fps', 0):.1f}", f"{_ms(s.get('latency_ms_p50'))}/{_ms(s.get('latency_ms_p95'))}",
            str(s.get("published", 0)) + (f" +{s['skipped']} skipped" if s.get("skipped") else ""),  # motion gate
            _drops(s.get("dropped")), str(s.get("reconnects", 0)),
            escape(",".join(s.get("heads", []) or [])), escape(_error(s)[:120]),
        )
    return table


def status_line(stats: list[dict]) -> str:
    parts = []
    for s in stats:
        parts.append(f"{s.get('camera')}: {s.get('state')} {s.get('fps', 0):.1f} fps "
                     f"p50 {_ms(s.get('latency_ms_p50'))} ms pub {s.get('published', 0)} drop {_drops(s.get('dropped'))}"
                     + (f" NOT IN REDIS: {s['redis_error'][:80]}" if s.get("redis_error") else ""))
    return " | ".join(parts)


# --- camera statuses as stored in Redis ({prefix}:cameras), for readers on any machine ------------------------

STALE_AFTER_S = 10.0  # cameras refresh their status every second; ten missed refreshes means nobody runs it
FINAL_STATES = ("stopped", "ended", "failed")  # written once by a camera that finished: never stale


def mark_stale(status: dict, now: float, stale_after_s: float = STALE_AFTER_S) -> dict:
    """A copy of a stored status with ``stale`` set, and state "stale" when its service stopped refreshing it
    without a final word (the driver was killed, the machine died). Statuses without a heartbeat come from
    a version that wrote none: stale too, as nothing refreshes them."""
    out = dict(status)
    beat = status.get("heartbeat_ts")
    final = status.get("state") in FINAL_STATES
    out["heartbeat_age_s"] = None if beat is None else round(max(0.0, now - float(beat)), 1)
    out["stale"] = not final and (beat is None or now - float(beat) > stale_after_s)
    if out["stale"]:
        out["reported_state"], out["state"] = status.get("state"), "stale"
    return out


def read_camera_statuses(client, prefix: str, now: float | None = None) -> list[dict]:
    """Every camera entry of {prefix}:cameras, sorted by camera id, each passed through ``mark_stale``.
    Entries that are not JSON objects are reported as such instead of failing the whole read."""
    import json
    import time

    from workers.publish import keys

    now = time.time() if now is None else now
    out = []
    for cam, raw in sorted(client.hgetall(keys(prefix).cameras).items()):
        cam = cam.decode() if isinstance(cam, bytes) else cam
        try:
            status = json.loads(raw)
            if not isinstance(status, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            status = {"state": "unreadable", "last_error": f"status is not valid JSON: {e}"}
        out.append({"camera": cam, **mark_stale(status, now)})
    return out
