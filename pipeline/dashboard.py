"""`hydravision dashboard`: a live web page of the cameras, fed from Redis alone, so it runs wherever a consumer
can (and inside the controller, see ``DashboardServer``). ``Hub`` (pipeline/dashboard_hub.py) reads Redis;
this module serves the page, its Server-Sent Events stream, its pictures and its control requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import redis

from pipeline import dashboard_data as data
from pipeline.admission import (MAX_BODY_BYTES, LoopbackHostsOnly, host_header_name, is_loopback_name, slash_hint,
                                strict_json)
from pipeline.camera_commands import redis_url
from pipeline.dashboard_control import add_command, remove_command, send_command
from pipeline.dashboard_hub import Hub, sse
from pipeline.limits import quiet_accept_errors
from workers.publish import keys
from workers.redact import redact_url

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().with_name("dashboard_static")
KEEPALIVE_S = 15.0
MAX_INTERVAL_S = 3600.0  # --interval; the config's dashboard.interval_s stops at 60
# --interval 0.001 polled Redis a thousand times a second and kept 300,000 chart points per camera (history_s / it)
MIN_INTERVAL_S = 0.1


# --- the web app -------------------------------------------------------------------------------------------

def create_app(hub: Hub, allowed_hosts: Sequence[str] = ()):
    """The Starlette app: the page, its static files, the SSE stream, the JSON state and the snapshots.
    ``allowed_hosts``: the names a proxy serves the page under (see ``cross_origin``)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    class PageFiles(StaticFiles):
        """The page's script and style, revalidated at every load (a 304 while unchanged): with no Cache-Control a
        browser kept an old app.js for days after an upgrade (heuristic freshness), beside the new index.html."""

        def file_response(self, *args: Any, **kwargs: Any) -> Response:
            response = super().file_response(*args, **kwargs)
            response.headers["Cache-Control"] = "no-cache"
            return response

    # names this version of the page's files; a page open across an upgrade loads the new ones (see app.js)
    build = f"{zlib.crc32(b''.join(p.read_bytes() for p in sorted(STATIC.iterdir()) if p.is_file())):08x}"

    async def index(request):
        # Text from Redis is only ever put into textContent; the policy is the second line of defence. form-action:
        # default-src does not cover it, and the page's own form is sent by its script (a form injected could post
        # anywhere); frame-ancestors: no other site frames the page to have its Remove buttons clicked.
        return FileResponse(STATIC / "index.html", headers={
            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"})

    async def stream(request):
        q, hello = hub.subscribe()
        # popped when sent: a hello holds every picture inline, and this closure lives as long as the page is open
        opening = ["retry: 1000\n\n" + sse("build", build) + sse("hello", hello)]

        async def events():
            try:
                yield opening.pop()
                while True:
                    try:
                        item = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if item is None:
                        return
                    yield item
            finally:
                hub.unsubscribe(q)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def state(request):
        return Response(hub.hello_text(pictures=False), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    def camera_of(request) -> str | None:
        """The camera a request names: in its path, or in its ``camera`` query parameter (how the page sends the
        ids "." and "..": a browser resolves such a path segment away, written as %2E too)."""
        return request.path_params.get("camera", request.query_params.get("camera"))

    def slash_refusal(request) -> JSONResponse | None:
        hint = slash_hint(request)  # POST /api/cameras/ answered 405; DELETE /api/cameras/ removed camera ""
        return JSONResponse({"status": "rejected", "reason": hint}, status_code=404) if hint else None

    async def method_not_allowed(request, exc):
        return slash_refusal(request) or PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)

    async def snapshot(request):
        found = hub.snapshot(camera_of(request))
        if found is None:
            return JSONResponse({"error": "no snapshot for this camera yet"}, status_code=404)
        version, jpeg = found
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "no-cache", "ETag": f'"{version}"', "X-Snapshot": version})

    allowed = {name.lower().rstrip(".") for name in allowed_hosts}

    def cross_origin(request) -> str | None:
        """Why a control request comes from another site's page (None when it does not): its Origin is neither the
        Host it was sent to nor a name the operator allowed. Behind a proxy that passes its upstream's Host (nginx's
        default), the page served as https://cams.example.org sends that Origin with Host 127.0.0.1:8765."""
        origin, host = request.headers.get("origin"), request.headers.get("host", "")
        if not origin or origin.split("://", 1)[-1] == host:
            return None
        try:
            name = urlsplit(origin).hostname
        except ValueError:  # a port that is no number
            name = None
        if name and name.rstrip(".") in allowed:
            return None
        return (f"cross-origin request: Origin {origin!r} is not the Host it was sent to ({host!r}) nor a name in "
                "dashboard.allowed_hosts (hydravision dashboard --allowed-host NAME), which would allow it")

    def rebound(request) -> str | None:
        """Why a control request that came in over loopback names another Host (None when it does not): a rebound
        page's, whose Origin names the same site (cross_origin lets it by). LoopbackHostsOnly checks no Host where
        the server is bound to every address (0.0.0.0), and such a page reached it through 127.0.0.1."""
        host = request.headers.get("host", "")
        name = host_header_name(host).lower().rstrip(".")
        if not host or not _loopback_address(request.scope) or is_loopback_name(name) or name in allowed:
            return None
        return (f"Host {host!r} is not this machine's loopback, which the request came in over, nor a name in "
                "dashboard.allowed_hosts (DNS rebinding?)")

    async def control(request, command: dict, urls: list[str]):
        """Runs one control command (in a thread: it waits for the controller's answer)."""
        if not hub.allow_control:
            return JSONResponse({"status": "rejected", "reason": "control is off: start the dashboard with "
                                 "--allow-control"}, status_code=403)
        if refusal := rebound(request) or cross_origin(request):
            return JSONResponse({"status": "rejected", "reason": refusal}, status_code=403)

        def send() -> dict:
            with redis.Redis.from_url(hub.url, socket_connect_timeout=2, socket_timeout=5) as client:
                return send_command(client, hub.prefix, command, stop=hub.stopping)
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, send)
            code = ({"accepted": accepted_code(result.get("code")), "timeout": 504}.get(result.get("status"))
                    or refusal_code(result.get("code")))
        except (redis.RedisError, OSError) as e:  # the dashboard's Redis failed: no mistake of the user's
            result, code = {"status": "rejected", "reason": f"Redis: {hub.describe(e)}"}, 503
        return JSONResponse(data.scrub(result, [hub.url, *urls]), status_code=code)

    async def add_camera(request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"status": "rejected", "reason": "send the camera as application/json"},
                                status_code=415)
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:  # a page's form is a few hundred bytes
            return JSONResponse({"status": "rejected", "reason": f"the body must say its length and hold at most "
                                 f"{MAX_BODY_BYTES} bytes"}, status_code=413 if length.isdigit() else 411)
        try:
            camera = strict_json(await request.body())
        except ClientDisconnect:  # gone, or closed with its body not in (pipeline.api.HeadDeadline): none to answer
            return Response(status_code=400)
        except ValueError as e:  # also a key given twice or NaN: the controller would take the last one, or NaN
            return JSONResponse({"status": "rejected", "reason": f"the body is not JSON: {e}"}, status_code=400)
        if not isinstance(camera, dict):
            return JSONResponse({"status": "rejected", "reason": "expected a JSON object with id and url, got "
                                 f"{type(camera).__name__}"}, status_code=400)
        for field in ("id", "url"):  # the rest is the controller's to check (its answer names the field)
            if not isinstance(camera.get(field), str) or not camera[field].strip():
                got = "missing" if field not in camera else f"got {type(camera[field]).__name__}" \
                    if not isinstance(camera[field], str) else "got an empty string"
                return JSONResponse({"status": "rejected", "reason": f"camera {field}: expected a non-empty "
                                     f"string, {got}", "field": field}, status_code=400)
        return await control(request, add_command(camera), [camera["url"]])

    async def remove_camera(request):
        if hint := slash_refusal(request):
            return hint
        if not (camera := camera_of(request)):  # also "": no camera has that id, the controller refused it
            return JSONResponse({"status": "rejected", "reason": "camera: name it in the path or as ?camera= "
                                 "(a non-empty id)", "field": "camera"}, status_code=400)
        return await control(request, remove_command(camera), [])

    async def health(request):
        ok = hub.redis_ok()
        return JSONResponse({"redis": ok}, status_code=200 if ok else 503)

    @asynccontextmanager
    async def lifespan(app):
        hub.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            # first: control requests waiting for an answer hold the executor's threads (30 s each), and with all of
            # them taken hub.stop, queued behind, waited theirs out; told of the stop, they end within a second
            hub.stopping.set()
            await asyncio.get_running_loop().run_in_executor(None, hub.stop)

    routes = [Route("/", index), Route("/api/stream", stream), Route("/api/state", state),
              Route("/api/cameras", add_camera, methods=["POST"]),
              # :path: a camera id may hold a '/' (the page sends it as %2F, which the server decodes first)
              Route("/api/cameras/{camera:path}", remove_camera, methods=["DELETE"]),
              Route("/api/cameras/{camera:path}/snapshot.jpg", snapshot), Route("/healthz", health),
              # ?camera=: the ids "." and ".." (see camera_of)
              Route("/api/cameras", remove_camera, methods=["DELETE"]), Route("/api/snapshot.jpg", snapshot),
              Mount("/static", PageFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={405: method_not_allowed})


def _loopback_address(scope: dict) -> bool:
    """Whether a request came in at a loopback address of this server's (IPv4's as IPv6 too: '::' takes both)."""
    try:
        address = ipaddress.ip_address(str((scope.get("server") or ("",))[0]).split("%", 1)[0])
    except ValueError:  # none, or a Unix socket's path
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def accepted_code(code: Any) -> int:
    """The HTTP status of an accepted command: the controller's own (201 for an add, as the HTTP API's), else 200."""
    return code if type(code) is int and 200 <= code <= 299 else 200


def refusal_code(code: Any) -> int:
    """The HTTP status of a refused command: the controller's own (its answer's ``code``: 409 for an id in use, 404
    for no such camera, 422 for a bad field, ...; every refusal was a 400), where it is an error status."""
    return code if type(code) is int and 400 <= code <= 599 else 400


def control_reachable_refusal(host: str, allow_control: bool, host_setting: str = "--host",
                              control_setting: str = "--allow-control") -> str | None:
    """Why a dashboard must not start (None when it may): control on a page other machines reach. The page has no
    login: anyone on the network added and removed cameras, past the HTTP API's tokens. The API bound there without
    a token is refused at start too (LiveControl.check_api_settings); the dashboard has no token to set."""
    if not allow_control or is_loopback_name(host):
        return None
    return (f"{host_setting}: {host or '(every address)'} is reachable from other machines, and {control_setting} "
            "would let anyone there add and remove cameras (the page has no login): bind 127.0.0.1 (behind a proxy "
            "on this machine that has a login, for other machines), or leave control off and use the HTTP API, "
            "which takes a token")


def _listen(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


class DashboardServer:
    """The dashboard on uvicorn in a thread of its own: for the controller (``dashboard:`` enabled) and tests."""

    def __init__(self, redis_url: str, prefix: str = "hv", host: str = "127.0.0.1", port: int = 0,
                 interval_s: float = 1.0, allow_control: bool = False, sock: socket.socket | None = None,
                 allowed_hosts: Sequence[str] = ()):
        """``sock``: already bound to ``host``/``port`` (the controller binds it before anything starts).
        ``allowed_hosts``: Host names a loopback-bound page also answers (a proxy's; see LoopbackHostsOnly)."""
        import uvicorn

        from pipeline.api import HeadDeadline

        self.hub = Hub(redis_url, prefix, interval_s, allow_control=allow_control)
        self.socket = sock or _listen(host, port)  # bound now: port 0 tells its real port at once
        self.host, self.port = host, self.socket.getsockname()[1]
        app = LoopbackHostsOnly(create_app(self.hub, allowed_hosts), self.socket.getsockname()[0], allowed_hosts)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=HeadDeadline,
                                timeout_graceful_shutdown=2)
        quiet_accept_errors()  # out of file descriptors: one warning, not a traceback per failed accept
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                        name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> "DashboardServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()  # a slow start given up on: its server, poller and socket did not stop with the caller
                raise RuntimeError(f"the dashboard did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.hub.close_pages()  # open SSE streams would hold uvicorn's shutdown up
        self.server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def command(args: Any) -> int:
    """`hydravision dashboard --redis-url ... [--prefix --host --port --interval]`."""
    from pipeline.errors import UserError

    url = redis_url(args.redis_url)
    if args.interval > MAX_INTERVAL_S:  # 1e20 ended the poller: no wait can be that long (threading.TIMEOUT_MAX)
        raise UserError(f"--interval must be at most {MAX_INTERVAL_S:g} seconds, got {args.interval:g}")
    if args.interval < MIN_INTERVAL_S:
        raise UserError(f"--interval must be at least {MIN_INTERVAL_S:g} seconds, got {args.interval:g}")
    if refusal := control_reachable_refusal(args.host, args.allow_control):
        raise UserError(refusal)
    try:
        return serve(url, args.prefix, args.host, args.port, args.interval, args.allow_control,
                     say=lambda m: print(m, file=sys.stderr, flush=True), allowed_hosts=args.allowed_host or ())
    except OSError as e:  # the port is taken, the address is not ours
        raise UserError(f"cannot serve the dashboard on {args.host}:{args.port}: {e.strerror or e}") from None


def serve(redis_url: str, prefix: str, host: str, port: int, interval_s: float, allow_control: bool = False,
          say: Callable[[str], None] = print, allowed_hosts: Sequence[str] = ()) -> int:
    """`hydravision dashboard`: serves until Ctrl-C / SIGTERM."""
    import uvicorn

    from pipeline.api import HeadDeadline

    hub = Hub(redis_url, prefix, interval_s, allow_control=allow_control)
    sock = _listen(host, port)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/"
    say(f"Dashboard of {keys(prefix).cameras} at {redact_url(redis_url)}: {where} (Ctrl-C to stop)")
    app = LoopbackHostsOnly(create_app(hub, allowed_hosts), sock.getsockname()[0], allowed_hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           http=HeadDeadline, timeout_graceful_shutdown=2))
    quiet_accept_errors()
    original = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        hub.close_pages()
        original(sig, frame)
        # uvicorn raises the signal again after its graceful shutdown (exit 130 after Ctrl-C, killed by SIGTERM):
        # a stop is this command's normal end, exit 0 as for `run` (README, exit codes)
        getattr(server, "_captured_signals", []).clear()  # uvicorn >= 0.29 (pyproject); a renamed field: 130 again
    server.handle_exit = handle_exit  # type: ignore[method-assign]
    server.run(sockets=[sock])
    return 0
