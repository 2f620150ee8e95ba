"""What a camera added or changed at run time must pass, on top of the config's own validation.

A control channel (the HTTP API, the Redis control stream) is an attack surface: whoever reaches it would
otherwise make the service read any file it can (``/etc/passwd``, a key under ``~/.ssh``), open any device
(``/dev/mem``), or connect to its own Redis or API and speak to it. So a camera from a control channel:

- is validated by the same pydantic ``CameraConfig`` as the YAML, errors naming the field (``camera.fps``);
- gets no ``${VAR}`` interpolation: a remote user must not read the controller's environment through it;
- may read only regular files under ``api.media_roots`` (symlinks and ``..`` resolved first, and the camera
  then reads the resolved path), and no text file (HLS playlists, concat scripts and SDP files make FFmpeg
  open further files and URLs), nor one with a playlist's mark before a NUL byte;
- may open only the devices listed in ``api.devices``;
- may not connect to this service's own Redis, HTTP API, dashboard or Ray GCS (the host is resolved, and so are theirs,
  at each check; loopback, the unspecified address and this machine's interface addresses all count as "here");
  only the host the URL names is checked, so over http(s) the camera follows no redirect and opens no playlist or
  manifest (HLS, DASH, concat, SDP), which would take FFmpeg to any host: ``check`` marks it
  (``CameraConfig.untrusted``) and its source refuses them (workers/av_source.py). Left: a name that resolves
  elsewhere when FFmpeg looks it up itself (DNS rebinding), and an rtsp:// server's redirect, which FFmpeg follows
  with no option to refuse it (its OPTIONS request is no command Redis knows, nor HTTP our API and dashboard take);
- may run a synthetic scene of at most a 4K camera's pixels, and give a URL of at most 4096 characters;
- may ask only for heads the model has, and count (zones, lines) only classes those heads have.

Cameras from the config file are the operator's and trusted: none of the run-time checks apply to them.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import math
import os
import socket
import threading
from typing import Any, Callable
from urllib.parse import urlsplit

import psutil
from pydantic import ValidationError

from pipeline.config import ApiConfig, _format_errors
from pipeline.errors import UserError
from workers.analytics_settings import analytics_errors
from workers.redact import redact_text, redact_url
from workers.settings import CameraConfig, is_device_path
from workers.source_base import SourceError
from workers.sources import file_url_path
from workers.synthetic_source import parse_synthetic_url

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
RESOLVE_TIMEOUT_S = 3.0
_LOCAL = "this machine"
MAX_BODY_BYTES = 1 << 20  # a command's body: a camera with zones and lines is a few kB; uvicorn would buffer any
# FFmpeg cuts a longer URL's path at 4095 bytes (its MAX_URL_SIZE); the camera's status carries the URL every
# second: a 1 MiB one (the API's body limit; the control stream has none) is 1 MiB/s into Redis per camera
MAX_URL_CHARS = 4096
# A 4K camera's picture: a scene of 8192x8192 took 2.8 GB and 27 s of CPU to start, in a process it may share
MAX_SYNTHETIC_PIXELS = 3840 * 2160
# Playlists and scripts whose demuxers open further files (HLS, ffconcat, DASH), as FFmpeg's probes find them
PLAYLIST_MARKS = (b"#extm3u", b"ffconcat", b"<mpd")


def is_loopback_name(host: str) -> bool:
    """Whether a host name or address names this machine's loopback ('localhost', '127.0.0.5', '::1', ...)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_header_name(header: str) -> str:
    """The name in an HTTP Host header, without its port: 'example.com:80' -> 'example.com', '[::1]:80' -> '::1'."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def slash_hint(request: Any) -> str | None:
    """For a request whose path ends in '/' and routes without it, what to answer (404) instead of Starlette's 307
    redirect (curl without -L showed an empty answer, the command not applied) or a 405 where a route's
    ``{camera:path}`` took the empty rest; None otherwise. By the raw path: an id ending in '/' is sent as %2F.
    The HTTP API's and the dashboard's (Starlette requests)."""
    from starlette.routing import Match

    path = request.url.path
    if len(path) < 2 or not request.scope.get("raw_path", path.encode()).endswith(b"/"):
        return None
    scope = {**request.scope, "path": path.rstrip("/") or "/"}
    if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
        return f"{request.method} {path}: no such path; without the trailing slash: {request.method} {scope['path']}"
    return None


class LoopbackHostsOnly:
    """ASGI middleware for a server bound to loopback (the HTTP API's and the dashboard's default): a request
    whose Host header names anything else is refused (403). DNS rebinding: any web page can have its own name
    resolve to 127.0.0.1, and the browser then lets its script read and drive a loopback server as if it were
    the page's own site (no token is needed on loopback); its requests still name that site in Host. A request
    without a Host header (not a browser's) is let through, and so are the names in ``allowed`` (a proxy on the
    same machine that passes its own Host on). Bound to anything else, the server checks nothing unless names are
    ``allowed``: then it answers those, loopback's and any address (a rebound page names its site, never an IP:
    a LAN user or a load balancer's health check by address is no rebinding) (a container's server, bound to
    0.0.0.0 and published on the host's loopback, as the Compose stack's dashboard: a rebound page reached it
    through the host). ``vouched(scope)``: whether a request passes whatever its Host (the HTTP API's: it carries
    a valid token, which a rebound page has not; its probes and schema, which need none, stay behind the check);
    a text instead: it carries a token that is not valid, refused 401 with that reason (a proxy's client with a
    rotated token read "DNS rebinding?", and its refusal went unlogged)."""

    def __init__(self, app: Any, bound_host: str, allowed: Any = (),
                 vouched: Callable[[dict], bool | str] | None = None,
                 hint: str = "a proxy's name can be allowed") -> None:
        self.allowed = {name.lower().rstrip(".") for name in allowed}
        self.on_loopback = is_loopback_name(bound_host)
        self.app, self.active = app, self.on_loopback or bool(self.allowed)
        self.vouched, self.hint = vouched, hint  # hint: what a refused Host can do (the dashboard: allow a name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.active and scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            name = host_header_name(host)
            vouched = bool(host) and not self._allowed(name) and self.vouched is not None and self.vouched(scope)
            if host and not self._allowed(name) and vouched is not True:
                from starlette.responses import JSONResponse

                bound = " (which this server is bound to)" if self.on_loopback else ""
                response = JSONResponse({"status": "rejected", "reason": f"Host {host!r} is neither this machine's "
                                         f"loopback{bound} nor a name it is given (DNS rebinding?); {self.hint}"},
                                        status_code=403)
                if isinstance(vouched, str):
                    response = JSONResponse({"status": "rejected", "reason": vouched}, status_code=401,
                                            headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, name: str) -> bool:
        if is_loopback_name(name) or name.lower().rstrip(".") in self.allowed:
            return True
        try:  # an address (bound elsewhere than loopback): reached by IP, no rebound name
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return not self.on_loopback


class CommandRejected(UserError):
    """A control command refused; the message starts with the field it is about. ``status``: HTTP status."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason, self.status = reason, status


def strict_json(text: str | bytes) -> Any:
    """json.loads for commands from outside (the HTTP API, the dashboard, the Redis control stream), stricter:
    a key given twice (the last one silently won; the config's YAML refuses it), NaN and Infinity (Python
    reads them, JSON has none; nor a number too large for a float, such as 1e999, which Python reads as
    Infinity) and nesting too deep for the parser are ValueErrors that name them; so is a lone UTF-16 surrogate
    ("\ud800" reads as one, and no answer, log line or Redis write can encode it: a camera added with one in its
    URL made every later list answer 500)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"{e.object[e.start]!r} is a lone UTF-16 surrogate, not a character") from None
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice in one object")
        out[key] = value
    return out


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"{number} is out of range for a number (it would be read as Infinity)")
    return value


def _validated(data: dict, urls: list[str]) -> CameraConfig:
    try:
        return CameraConfig.model_validate(data)
    except ValidationError as e:
        raise CommandRejected(_format_errors(e, urls, root="camera")) from None


def parse_camera(data: Any) -> CameraConfig:
    """A camera from a control channel, validated like the YAML's (no ${VAR} interpolation)."""
    if not isinstance(data, dict):
        raise CommandRejected(f"camera: expected a JSON object, got {type(data).__name__}")
    return _validated(data, [data["url"]] if isinstance(data.get("url"), str) else [])


def merge_changes(current: CameraConfig, changes: Any) -> CameraConfig:
    """The camera with ``changes`` (a partial camera object) applied, validated as a whole."""
    if not isinstance(changes, dict) or not changes:
        raise CommandRejected("changes: expected a JSON object with the fields to change")
    if "id" in changes and changes["id"] != current.id:
        raise CommandRejected(f"camera.id: cannot change (remove {current.id!r} and add a camera instead)")
    urls = [current.url] + ([changes["url"]] if isinstance(changes.get("url"), str) else [])
    merged = _validated(_merged(current.model_dump(), changes), urls)
    # a camera added at run time stays untrusted through any change (a config camera, until its URL changes: check)
    return merged.as_untrusted() if current.untrusted else merged


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied; a nested object (tracker, tracker.appearance) field by field too."""
    out = dict(base)
    for field, value in changes.items():
        nested = isinstance(out.get(field), dict) and isinstance(value, dict)
        out[field] = _merged(out[field], value) if nested else value
    return out


def _canonical(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def resolve(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> set[str]:
    """Every address ``host`` resolves to (empty when it does not resolve within the timeout)."""
    answer: concurrent.futures.Future = concurrent.futures.Future()
    # A lookup stuck in the resolver is left to finish on its own, in a daemon thread: the interpreter's exit joins
    # a ThreadPoolExecutor's threads, and a service told to stop waited out every lookup still stuck (a DNS timeout)
    threading.Thread(target=_lookup, args=(answer, host, port), name="hv-resolve", daemon=True).start()
    try:
        infos = answer.result(timeout_s)
    except (OSError, UnicodeError, concurrent.futures.TimeoutError):
        return set()
    return {str(_canonical(info[4][0])) for info in infos}


def _lookup(answer: concurrent.futures.Future, host: str, port: int) -> None:
    """``resolve``'s question, in its own thread: getaddrinfo's answer, or its error."""
    try:
        answer.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except BaseException as e:  # resolve says it
        answer.set_exception(e)


def _local_ips() -> set[str]:
    """This machine's interface addresses now: a long-running service gains and loses them (one started before
    DHCP or a VPN gave it its address, and read them once, counted only loopback as "here")."""
    return {str(_canonical(a.address)) for addrs in psutil.net_if_addrs().values()
            for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}


class Admission:
    """The run-time checks, for one running service: its policy, its model's heads, its own endpoints."""

    def __init__(self, api: ApiConfig, model_heads: dict[str, list[str]],
                 own_endpoints: dict[str, tuple[str, int]] | None = None):
        """``own_endpoints``: what a camera must not connect to, e.g. {"Redis": (host, port)}."""
        self.api, self.model_heads = api, model_heads
        self._own: list[tuple[str, str, int, set[str]]] = []
        for name, (host, port) in (own_endpoints or {}).items():
            self.forbid(name, host, port)

    def forbid(self, name: str, host: str, port: int) -> None:
        """Adds an endpoint of this service that cameras must not point at."""
        self._own.append((name, host, port, resolve(host, port) or {host}))

    def _own_now(self) -> dict[tuple[str, int], str]:
        """This service's endpoints at the addresses their names resolve to now, and did when forbidden: resolved
        once, a Redis named 'redis' (compose) whose container was re-created elsewhere was let through by name."""
        own = {}
        for name, host, port, first in self._own:
            for ip in first | resolve(host, port):
                own[(self._where(ip), port)] = name
        return own

    def _where(self, ip: str) -> str:
        try:
            addr = _canonical(ip)
        except ValueError:
            return ip
        local = addr.is_loopback or addr.is_unspecified or str(addr) in _local_ips()
        return _LOCAL if local else str(addr)

    # -- the checks ----------------------------------------------------------------------------------------
    def check(self, camera: CameraConfig, url_changed: bool = True) -> CameraConfig:
        """The camera as it may run (a file's path resolved), or CommandRejected naming the field. A new URL is
        marked untrusted: its source follows no redirect and opens no playlist (see CameraConfig.untrusted)."""
        unknown = [h for h in camera.heads or [] if h not in self.model_heads]
        if unknown:
            raise CommandRejected(f"camera.heads: unknown heads {unknown} (the model has {list(self.model_heads)})")
        problems = analytics_errors(camera.zones, camera.lines, camera.heads, self.model_heads)
        if problems:  # zones and lines against the model's heads and classes
            raise CommandRejected("; ".join(f"camera.{p}" for p in problems))
        if not url_changed:
            return camera
        camera = camera.as_untrusted()
        if len(camera.url) > MAX_URL_CHARS:  # not quoted: it may hold a password
            raise CommandRejected(f"camera.url: at most {MAX_URL_CHARS} characters, got {len(camera.url)}")
        url = camera.url.strip()
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower() if sep else ""
        if scheme in DEFAULT_PORTS:
            self._check_network(url, scheme)
        elif scheme == "device" or (not sep and is_device_path(url)):
            self._check_device(rest if sep else url, redact_url(url))
        elif scheme == "file" or not sep:
            return camera.model_copy(update={"url": self._check_file(url, scheme == "file")})
        elif scheme == "synthetic":  # generated in-process, reads nothing; but its size is its cost
            self._check_synthetic(url)
        return camera

    def _check_file(self, url: str, is_url: bool) -> str:
        if is_url:
            if urlsplit(url).netloc not in ("", "localhost"):
                raise CommandRejected(f"camera.url: file:// URLs must be local (got {redact_url(url)!r})")
            try:  # the decoder's reading of the URL: what is checked here is what it will open
                path = file_url_path(url)
            except SourceError as e:
                raise CommandRejected(f"camera.url: {e}") from None  # the URL in it is redacted
        else:
            path = url
        shown = redact_text(path, [])
        if "\0" in path:  # a %00 in a file:// URL: os.path raised ValueError, answered as an internal error
            raise CommandRejected(f"camera.url: a file path cannot hold a NUL byte (%00) (got {shown!r})")
        if not os.path.isabs(path):
            raise CommandRejected(f"camera.url: a file must be given by its absolute path (got {shown!r})")
        roots = [os.path.realpath(r) for r in self.api.media_roots]
        if not roots:
            raise CommandRejected("camera.url: cameras added at run time may not read files "
                                  "(no api.media_roots configured)", 403)
        resolved = os.path.realpath(path)
        if not any(resolved == r or resolved.startswith(r.rstrip("/") + "/") for r in roots):
            raise CommandRejected(f"camera.url: {shown!r} is outside the media roots (api.media_roots: "
                                  f"{', '.join(self.api.media_roots)}; symlinks and '..' are resolved)", 403)
        if not os.path.isfile(resolved):
            raise CommandRejected(f"camera.url: {shown!r} is not a regular file")
        try:
            with open(resolved, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise CommandRejected(f"camera.url: {shown!r} cannot be read ({e.strerror})") from None
        if not head:  # it has no NUL byte either: it was refused (403) as "a text file", which pointed at permissions
            raise CommandRejected(f"camera.url: {shown!r} is empty (0 bytes), not a video")
        if _is_text(head):
            raise CommandRejected(f"camera.url: {shown!r} is a text file, not a video (playlists and "
                                  "scripts could make the decoder open other files and URLs)", 403)
        return resolved

    def _check_synthetic(self, url: str) -> None:
        try:
            params = parse_synthetic_url(url)
        except SourceError as e:
            raise CommandRejected(f"camera.url: {e}") from None
        width, height = params["width"], params["height"]
        if width * height > MAX_SYNTHETIC_PIXELS:
            raise CommandRejected(f"camera.url: a synthetic scene added at run time has at most "
                                  f"{MAX_SYNTHETIC_PIXELS} pixels (3840x2160, a 4K camera's); got {width}x{height}",
                                  403)

    def _check_device(self, path: str, shown: str) -> None:
        allowed = {os.path.realpath(d) for d in self.api.devices}
        if os.path.realpath(path) not in allowed:
            listed = ", ".join(self.api.devices) or "none"
            raise CommandRejected(f"camera.url: device {shown!r} is not in api.devices (allowed: {listed})", 403)

    def _check_network(self, url: str, scheme: str) -> None:
        # urlsplit takes a password holding a raw '/ ? #' for a host or a port (see workers/redact.py): a
        # message names the host only where the redacted URL shows the same one, and never quotes urlsplit
        shown = redact_url(url)
        found = _host_port(url, scheme)
        if found is None:
            raise CommandRejected(f"camera.url: invalid host or port in {shown!r} (a port out of range 1-65535 or "
                                  "not a number, or a '/', '?' or '#' in a password that is not %-encoded)")
        host, port = found
        if not host:
            raise CommandRejected(f"camera.url: no host in {shown!r}")
        visible = _host_port(shown, scheme) == found
        ips = resolve(host, port)
        if not ips:
            named = f"host {host!r}" if visible else f"the host of {shown!r}"
            raise CommandRejected(f"camera.url: {named} does not resolve (a camera added at run time must, "
                                  "so that it can be checked not to point at this service)")
        own = self._own_now()
        for ip in ips:
            what = own.get((self._where(ip), port))
            if what:
                # an IPv6 address bracketed, as in a URL ('::1:16417' read as one address)
                named = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}") if visible else repr(shown)
                raise CommandRejected(f"camera.url: {named} is this service's own {what}; a camera "
                                      "may not point at it", 403)


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes are text rather than a video. Every video container has a NUL byte in its
    first 512 (sizes, start codes, header fields) except raw YUV4MPEG2, whose header line is text; a text file
    has none, whatever its encoding: an HLS playlist is still one to FFmpeg with a Latin-1 byte in a comment,
    or with a UTF-8 character cut at byte 512, neither of which decodes as UTF-8. A playlist's or script's mark
    before its first NUL makes it one too: FFmpeg's probes read C strings, which end there, and its parsers take
    a NUL for a line's end (an HLS playlist with one in a comment, let through, read a video outside the roots)."""
    before_nul = head.split(b"\0", 1)[0].lower()
    return (b"\0" not in head and not head.startswith(b"YUV4MPEG2 ")) or any(m in before_nul for m in PLAYLIST_MARKS)


def _host_port(url: str, scheme: str) -> tuple[str | None, int] | None:
    """The host and port a network URL connects to, as urlsplit (and FFmpeg) read them; None when they are
    malformed (a port that is not a number up to 65535, a broken IPv6 address)."""
    try:
        parts = urlsplit(url)
        return parts.hostname, parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None
