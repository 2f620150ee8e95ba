"""The live status table of `hydravision run`, and a plain one-line form for logs and pipes."""

from __future__ import annotations

from rich.table import Table


def _drops(d: dict | None) -> str:
    if not d:
        return "-"
    total = sum(d.values())
    parts = [f"{k} {v}" for k, v in d.items() if v]
    return f"{total}" + (f" ({', '.join(parts)})" if parts else "")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def status_table(stats: list[dict], title: str = "hydravision") -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    for col, just in [("camera", "left"), ("state", "left"), ("fps", "right"), ("decode fps", "right"),
                      ("latency p50/p95 ms", "right"), ("published", "right"), ("dropped", "right"),
                      ("reconnects", "right"), ("heads", "left"), ("last error", "left")]:
        table.add_column(col, justify=just, no_wrap=col != "last error", overflow="fold")
    for s in stats:
        state = s.get("state", "?")
        style = {"running": "green", "reconnecting": "yellow", "failed": "red", "unavailable": "red"}.get(state, "")
        table.add_row(
            s.get("camera", "?"), f"[{style}]{state}[/]" if style else state, f"{s.get('fps', 0):.1f}",
            f"{s.get('decode_fps', 0):.1f}", f"{_ms(s.get('latency_ms_p50'))}/{_ms(s.get('latency_ms_p95'))}",
            str(s.get("published", 0)), _drops(s.get("dropped")), str(s.get("reconnects", 0)),
            ",".join(s.get("heads", []) or []), (s.get("last_error") or "")[:80],
        )
    return table


def status_line(stats: list[dict]) -> str:
    parts = []
    for s in stats:
        parts.append(f"{s.get('camera')}: {s.get('state')} {s.get('fps', 0):.1f} fps "
                     f"p50 {_ms(s.get('latency_ms_p50'))} ms pub {s.get('published', 0)} drop {_drops(s.get('dropped'))}")
    return " | ".join(parts)
