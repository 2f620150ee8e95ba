"""Credentials in URLs never reach logs, Redis, metrics or error messages: everything goes through here.

Where the userinfo of ``scheme://userinfo@host/path`` ends
---------------------------------------------------------
RFC 3986 forbids raw ``@ / ? #`` in a password, but users type them (``rtsp://admin:p@ss@cam/x``) and
FFmpeg accepts raw ``@``: it ends the authority at the first ``/ ? #`` after ``scheme://`` and takes the
userinfo up to the LAST ``@`` before that. A password holding a raw ``/ ? #`` does not work with FFmpeg,
but it is still typed, and then printed in the error that follows; the redactor must not lean on the
parse that failed. So the rule here is the most cautious one:

    the userinfo is everything between ``scheme://`` and the LAST ``@`` of the URL,
    unless the URL names a local path (``file:///path@x.mp4``, ``device:``, ``unix:``: ``/`` right after ``://``).

A network URL with ``/`` right after ``://`` (``rtsp:///admin:pw@cam``, a slash too many) is a typo, refused
with the URL in its error: its userinfo is hidden like any other.

The scheme is a ``name:`` at the start (after spaces, a quote or bracket, or ``//``), its ``//`` optional:
a URL still in the quotes of an env file (``"redis://:pw@host"``), one with a slash missing
(``rtsp:/admin:pw@cam``) or without its scheme (``admin:pw@cam``, read as a file name) was printed back in
the error that refuses it; a path (``/v/cam:1@front.mp4``) has none.

Every ``@`` a host can be preceded by is therefore inside the hidden part. The price: a URL without
credentials whose path or query holds an ``@`` (``rtsp://cam/stream@main``) shows as ``rtsp://***@main``.
Hiding too much is the side to err on: ``rtsp://u:a@b/c@cam/x`` (password ``a@b/c``) and
``rtsp://cam/stream@main`` cannot be told apart.

Secret-looking query parameters (``?token=...``, ``&api_key=...``, a Foscam camera's ``&loginpas=...``: the
names are listed at ``_SECRET_WORDS``) are hidden up to the next ``&`` (a raw ``#`` in the value is hidden too).
A query value holding ``%``-escapes is decoded once and read by both rules again: a nested URL
(``?to=http%3A%2F%2Fadmin%3Apw%40host``) shows as ``?to=http%3A%2F%2F***%40host``. All rules mark spans of the
ORIGINAL string and the union is hidden, so a password holding ``&key=`` or a query value holding ``@`` cannot
make one rule expose what the other one hid.
"""

from __future__ import annotations

import logging

import re
from urllib.parse import quote, unquote

MASK = "***"
# The bidirectional controls, as a regex class's body: invisible, they reorder the text around them where it is shown
# (a U+202E turned the dashboard's error text backwards). Refused in camera URLs (workers/settings.py), escaped in
# log lines of what an HTTP client chose (pipeline/api.py).
BIDI_CONTROLS = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
FREE_TEXT_MIN = 3  # a secret this long or longer is hidden wherever it appears in free text
# at the start, after spaces, a quote or bracket, or "//" (a scheme lost): not a path's "/v/cam:1@x.mp4"
_SCHEME = re.compile(r"\s*[\"'<(\[]?/{0,2}(?P<name>[A-Za-z][A-Za-z0-9+.-]*):/{0,2}")
_LOCAL_SCHEMES = ("file", "device", "unix")  # the schemes whose URLs may have no authority (a path after ://)
# How the names of secret parameters END (case ignored; fps, resolution, channel, subtype, user end otherwise), from
# what IP cameras and signed URLs use: password/passwd/pwd/psw/pass/pw (Hikvision, Dahua, Reolink, Blue Iris,
# Xiongmai), Foscam's and Amcrest's CGI loginpas (loginuse is the user), auth (Hikvision's base64 user:password,
# ZoneMinder), token/access_token, key/apikey, sig/signature (Azure SAS, X-Amz-Signature), credential(s), Synology's
# _sid and other session ids.
_SECRET_WORDS = (r"(?:password|passwd|passphrase|pwd|pswd|psw|pass|pas|pw|token|key|secret|auth|signature|sig"
                 r"|credentials?|sid|session(?:[_-]?id)?|jwt)")
_SECRET_NAME = rf"[\w.-]*{_SECRET_WORDS}"
# After "?" or "&" (also a name "p": cgi-bin/snapshot.cgi?u=admin&p=pw), or Xiongmai's "_" (its RTSP path
# user=admin_password=pw_channel=1). A value that is the mask then punctuation ("***:", a URL already redacted, then
# the ":" of an error message) is the mask: read as the value, a second redaction dropped the ":".
_SECRET_PARAMS = re.compile(
    rf"(?i)(?:[?&](?:{_SECRET_NAME}|p)|_{_SECRET_WORDS})=(?P<value>{re.escape(MASK)}(?=[^\w&%]*$)|[^&]*)")
_QUERY_VALUE = re.compile(r"[?&][^=&?]*=(?P<value>[^&]*)")  # names never span a "?": linear in "???..."
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# A URL inside free text ends at whitespace; quotes and punctuation after it stay in its path, which
# can only make the hidden part larger. Its scheme is taken as at most 32 characters (a longer one is matched from
# inside it): unbounded, each letter of a long word began a scan to the word's end, 18 s for 100 KB of letters.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}://\S+")
_NAMED = re.compile(rf"(?i){_SECRET_WORDS}$")  # the end of a secret-looking name ([\w.-]* before it: any)
_PERCENT = re.compile(r"%[0-9A-F]{2}")


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """(start, end) of the userinfo by the rule above, None when the URL has none (or an empty one)."""
    m = _SCHEME.match(url)  # at the start: a path "/v/cam:1@x.mp4" has no userinfo ("1" was masked everywhere)
    if not m or (url.startswith("/", m.end()) and m["name"].lower() in _LOCAL_SCHEMES):
        return None
    at = url.rfind("@", m.end())
    return (m.end(), at) if at > m.end() else None


def _spans(url: str, nested: bool = True) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(hidden, secrets) of ``url``: the spans to hide, and those of the secrets alone (a userinfo's password, not
    its user name). With ``nested``, also those of each query value that holds ``%``-escapes, decoded once (not
    again: an escape left in it is text, whatever it encodes), and read as a URL of its own."""
    params = [m.span("value") for m in _SECRET_PARAMS.finditer(url) if m.group("value")]
    hidden, secrets = list(params), list(params)
    userinfo = _userinfo_span(url)
    if userinfo:
        hidden.append(userinfo)
        colon = url.find(":", *userinfo)
        secrets.append((colon + 1, userinfo[1]) if colon >= 0 else userinfo)
    for m in _QUERY_VALUE.finditer(url) if nested else ():
        if "%" in m.group("value"):
            decoded, where = _decode_once(m.group("value"), m.start("value"))
            inner_hidden, inner_secrets = _spans(decoded, nested=False)
            hidden += [(where[start], where[end]) for start, end in inner_hidden]
            secrets += [(where[start], where[end]) for start, end in inner_secrets]
    return hidden, secrets


def _decode_once(value: str, offset: int) -> tuple[str, list[int]]:
    """``value`` with each ``%XX`` decoded to one character (so that ``%3A%2F%2F`` reads ``://``), and where each
    character of that, and its end, is in the original (``offset`` + its index in ``value``)."""
    chars, where, pos = [], [], 0
    for m in _ESCAPE.finditer(value):
        chars += [value[pos:m.start()], chr(int(m.group()[1:], 16))]
        where += [offset + i for i in range(pos, m.start())] + [offset + m.start()]
        pos = m.end()
    chars.append(value[pos:])
    where += [offset + i for i in range(pos, len(value) + 1)]
    return "".join(chars), where


def _hidden_spans(url: str) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(_spans(url)[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact_url(url: str) -> str:
    """rtsp://admin:p@ss@cam/stream -> rtsp://***@cam/stream (also secret-looking query params)."""
    if not isinstance(url, str):
        return url
    out, pos = [], 0
    for start, end in _hidden_spans(url):
        out += [url[pos:start], MASK]
        pos = end
    out.append(url[pos:])
    return "".join(out)


def url_secrets(url: str) -> list[str]:
    """The secrets of ``url`` in every form a message may print them: as written, %-decoded, %-encoded
    (upper- and lower-case hex); longest first. The password of ``user:password`` (not the user name),
    a whole userinfo without ``:`` (a token), and the values of secret-looking query parameters, also those of a
    URL %-encoded in a query value."""
    found = [url[start:end] for start, end in _spans(url)[1]]
    forms: set[str] = set()
    for secret in filter(None, found):
        decoded = unquote(secret)
        for form in (secret, decoded, quote(decoded, safe="")):
            forms |= {form, _PERCENT.sub(lambda m: m.group().lower(), form)}
    return sorted(forms, key=len, reverse=True)


def redact_text(text: str, urls: list[str]) -> str:
    """Hides the credentials of the given URLs inside free text, e.g. an FFmpeg error message: each URL as
    a whole, then its secrets alone in any form (FFmpeg may echo a decoded password), then the userinfo of
    any other URL in the text. A secret shorter than ``FREE_TEXT_MIN`` characters is hidden only where it stands
    as a credential (``user:1@``, ``//1@``, `` 1@``): hidden everywhere, a password "1" turned every 1 of a line
    into ***."""
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        for secret in url_secrets(url):
            if len(secret) >= FREE_TEXT_MIN:
                text = text.replace(secret, MASK)
            else:  # before a userinfo's "@", or a secret-looking parameter's whole value
                text = re.sub(rf"(?<![^\s:/\"'(<\[]){re.escape(secret)}(?=@)", MASK, text)
                text = _hide_named_value(text, secret)
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)


def _hide_named_value(text: str, secret: str) -> str:
    """``secret`` where it is the whole value of a secret-looking name (``pwd=1``, ``camera_token=1``), masked. Found
    by its ``=``, the name by how it ends (the 10 characters before): one pattern from any word start (\\b)
    rescanned the text after each, quadratic in a long "a.a.a..." (11 s for 10 KB)."""
    out, done = [], 0
    for m in re.finditer(rf"={re.escape(secret)}(?![\w.~%+/-])", text):
        if _NAMED.search(text, max(0, m.start() - 10), m.start()):
            out += [text[done:m.start() + 1], MASK]
            done = m.end()
    return "".join(out) + text[done:]


class RedactingFormatter(logging.Formatter):
    """Text log lines with the userinfo of any URL in them masked (message, exception, stack), as the JSON logs
    have it: the code redacts the URLs it knows, this is the net for text it passes on unread (FFmpeg's, Ray's)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), [])


def log_to_stderr(level: int, fmt: str, datefmt: str | None = None) -> None:
    """``logging.basicConfig(level=, format=, datefmt=)`` with a RedactingFormatter: nothing where the root logger
    has a handler already (pytest, a program embedding us), as basicConfig."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(fmt, datefmt))
    root.addHandler(handler)
    root.setLevel(level)
