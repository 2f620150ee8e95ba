"""Credentials in URLs never reach logs, Redis, metrics or error messages: everything goes through here."""

from __future__ import annotations

import re

# scheme://user:password@host  or  scheme://token@host ; the query string may hold secrets too.
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/?#]*)@")
_SECRET_PARAMS = re.compile(r"(?i)([?&](?:password|passwd|pwd|pass|token|key|secret|auth|signature|sig)=)[^&#]*")


def redact_url(url: str) -> str:
    """rtsp://admin:hunter2@cam/stream -> rtsp://***@cam/stream (also secret-looking query params)."""
    if not isinstance(url, str):
        return url
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", url)
    return _SECRET_PARAMS.sub(lambda m: f"{m.group(1)}***", out)


def redact_text(text: str, urls: list[str]) -> str:
    """Replaces every given URL (and its password alone) inside free text, e.g. an FFmpeg error message."""
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        m = _USERINFO.match(url)
        if m and ":" in m.group("userinfo"):
            password = m.group("userinfo").split(":", 1)[1]
            if password:
                text = text.replace(password, "***")
    return text
