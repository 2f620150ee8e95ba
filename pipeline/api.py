"""The controller's HTTP API (FastAPI, served by uvicorn in a thread of `hydravision run`; OpenAPI at /openapi.json,
its page at /docs loads from a CDN): list, add, update, remove and export cameras while the others keep running.

Every route under /cameras goes through ``BearerAuth``: when tokens are configured (``api.tokens``,
``$HYDRAVISION_API_TOKEN``) a request needs ``Authorization: Bearer <token>``, and the token's name is
recorded as who sent the command; without tokens the API only binds loopback (App refuses anything else).
``GET /cameras/export`` is the export, so a camera with the (valid) id ``export`` is fetched with ``GET /cameras``;
``PATCH`` and ``DELETE /cameras/export`` change and remove it as any other (RESERVED_NOTE, in the OpenAPI docs).
A slow Ray call (starting a camera's actor takes seconds) never blocks the server's event loop: list and export
are plain ``def`` routes that FastAPI runs in its thread pool, and add, update and remove run in threads of their
own (at most COMMANDS_AT_ONCE), so commands waiting on Ray never hold that pool from /healthz, /readyz, /metrics
or a list. The App does the work and the checks.
A body is read only after the token check: one JSON object (Content-Type: application/json), at most
MAX_BODY_BYTES, without a key given twice or NaN (``_json_object_reader``).

Other modules add routes with ``build_api(..., extensions=[fn])``: ``fn(api, controller)`` is called once
with the FastAPI app, e.g. ``api.include_router(router)``; ``api.state.auth`` is the token check, for
routes that want it (``dependencies=[Depends(api.state.auth)]``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Iterable

import anyio
import h11
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.admission import MAX_BODY_BYTES, CommandRejected, LoopbackHostsOnly, slash_hint, strict_json
from pipeline.limits import quiet_accept_errors
from pipeline.logs import cut_lines, route_uvicorn
from workers.redact import BIDI_CONTROLS, redact_text

log = logging.getLogger(__name__)

Extension = Callable[[FastAPI, Any], None]
CAMERA_EXAMPLE = {"id": "lobby", "url": "rtsp://camera-host:554/stream", "fps": 10, "heads": ["people"]}
# The export kept its path (the CLI and scripts call it) rather than a camera id's one GET route: a camera
# named export stays listed, changed and removed as any other.
RESERVED_NOTE = ("`GET /cameras/export` is the export: a camera with the id `export` is listed by `GET /cameras`, "
                 "and `PATCH`/`DELETE /cameras/export` change and remove it.")
# Commands running at once; more wait without a thread. Not FastAPI's pool (40 threads): 40 adds waiting for
# their turn to place a camera held all of it, and /healthz went unanswered until they were done.
COMMANDS_AT_ONCE = 32
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}
_REJECTED = {"application/json": {"schema": {"type": "object", "required": ["status", "reason"], "properties": {
    "status": {"type": "string", "enum": ["rejected"]}, "reason": {"type": "string"}}}}}
# What a /cameras route answers before it runs, for the OpenAPI schema (FastAPI lists only 200/201 and 422)
COMMAND_ANSWERS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid bearer token, where tokens are configured (the reason says which: missing, "
                         "not 'Bearer <token>', invalid)", "content": _REJECTED},
    403: {"description": "on loopback, a Host that is not loopback's, without a valid token (DNS rebinding?)",
          "content": _REJECTED},
    503: {"description": "the service is starting (its start takes seconds to minutes): nothing changed; ask again "
                         "after Retry-After", "content": _REJECTED}}


# Control characters (C0, C1) and the bidi controls, in what a client chose (a path arrives percent-decoded: a
# %1B[31m in it recoloured the operator's terminal, a %E2%80%AE (U+202E) turned the rest of the log line backwards)
_UNSHOWN = re.compile(rf"[\x00-\x1f\x7f-\x9f{BIDI_CONTROLS}]")


def shown(text: str) -> str:
    """What a client chose (a path, a header), for a log line: those characters escaped as Python writes them
    ('\\x1b', '\\u202e'), and cut as the config's errors are (a path of 100,000 characters was one log line)."""
    return cut_lines(_UNSHOWN.sub(lambda m: ascii(m[0])[1:-1], text))


# A refused request's log lines, per client address: the first few of a minute said (someone fixing a header sees
# each new reason), then how many more with the next line said after that minute (300 requests were 300 lines)
REFUSALS_SAID = 3
REFUSALS_EVERY_S = 60.0
# Client addresses remembered, the one whose minute began first forgotten first once that minute is over; past it, a
# new address's refusals are counted with the other addresses', one line a minute for all (from an IPv6 /64's worth
# the whole table was rebuilt for each new address, 35 s of the event loop for 20,480, and each one was said)
_REFUSERS_KEPT = 4096


class BearerAuth(HTTPBearer):
    """FastAPI dependency: the sender's name ("api:<token name>", or "api:anonymous" without tokens). An HTTPBearer
    only for the OpenAPI schema (its security scheme: /docs' "Authorize" and generated clients send the token);
    the check, its answers and its log lines are its own."""

    def __init__(self, tokens: dict[str, str]):
        super().__init__(scheme_name="BearerAuth", auto_error=False,
                         description="`Authorization: Bearer <token>`, a token of `api.tokens` (or "
                                     "`$HYDRAVISION_API_TOKEN`); needed only where tokens are configured")
        self._tokens = {name: token.encode() for name, token in tokens.items()}
        self._clock = time.monotonic
        # client address: (when its minute began, lines said in it, refusals held back), in the order their minutes
        # began (an address moves to the end as a new one begins): the first is the one to forget
        self._refusers: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        self._others: tuple[float | None, int, int] = (None, 0, 0)  # the same, of the addresses not remembered
        self._refusers_lock = threading.Lock()  # __call__ runs in FastAPI's threads, vouches in the event loop

    def _say_refused(self, client: str, message: str, *args: Any) -> None:
        """Logs a refusal from ``client`` unless REFUSALS_SAID were said in its minute: then it is counted, and the
        count said with its next line after that minute (as pipeline.limits says a full file table). With
        _REFUSERS_KEPT addresses refused within a minute, a new one's are counted with the other addresses': one
        line a minute for them all."""
        now = self._clock()
        with self._refusers_lock:
            refusers, others = self._refusers, False
            if client not in refusers and len(refusers) >= _REFUSERS_KEPT:
                if now - next(iter(refusers.values()))[0] >= REFUSALS_EVERY_S:
                    refusers.popitem(last=False)  # the first minute to begin is over: its address is forgotten
                else:
                    others = True
            most = 1 if others else REFUSALS_SAID
            began, said, held = self._others if others else refusers.get(client, (None, 0, 0))
            if began is None or now - began >= REFUSALS_EVERY_S:  # its first, or a minute on: a new minute
                began, said = now, 0
                refusers.pop(client, None)  # back in at the end, where the latest minutes are
            entry = (began, said, held + 1) if said >= most else (began, said + 1, 0)
            if others:
                self._others = entry
            else:
                refusers[client] = entry
        if said >= most:
            return
        if not held:
            more = ""
        elif others:
            more = (f" ({held} more from other addresses held back: past {_REFUSERS_KEPT} addresses refused in a "
                    "minute, one line a minute for them)")
        else:
            more = f" ({held} more from this address held back: said at most {REFUSALS_SAID} a minute)"
        log.warning(message + "%s", *args, more)

    def _check(self, header: str) -> tuple[str | None, str]:
        """The name of the token an Authorization header carries, or None and why not."""
        scheme, _, value = header.partition(" ")
        if not header:
            return None, "Authorization: missing bearer token"
        if scheme.lower() != "bearer" or not value.strip():
            return None, "Authorization: expected 'Bearer <token>'"
        given = value.encode("latin-1").strip()  # the bytes sent (Starlette decodes headers as latin-1)
        matched = [name for name, token in self._tokens.items() if hmac.compare_digest(given, token)]
        return (matched[0], "") if matched else (None, "Authorization: invalid token")

    def vouches(self, scope: dict) -> bool | str:
        """For LoopbackHostsOnly, a request through a Host not loopback's: True where it carries a valid token (a
        rebound page has none), False where none, else why its token is refused (said in the log, as __call__ does:
        a rotated token behind a proxy read "DNS rebinding?" and left no trace)."""
        headers = Headers(scope=scope)
        header = headers.get("authorization", "")
        if not header.lower().startswith("bearer "):  # none, or another scheme: the Host refusal, unlogged, as before
            return False
        name, reason = self._check(header)
        if name is not None:
            return True
        client = str((scope.get("client") or ("?",))[0])
        self._say_refused(client, "HTTP API: refused %s from %s through Host %s: %s",
                          shown(f"{scope.get('method')} {scope.get('path')}"), shown(client),
                          shown(headers.get("host", "")), reason)
        return reason

    def __call__(self, request: Request) -> str:
        if not self._tokens:
            return "api:anonymous"
        name, reason = self._check(request.headers.get("authorization", ""))
        if name is not None:
            return f"api:{name}"
        client = request.client.host if request.client else "?"  # X-Forwarded-For's, from a proxy on the machine
        self._say_refused(client, "HTTP API: refused %s from %s: %s", shown(f"{request.method} {request.url.path}"),
                          shown(client), reason)
        raise HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


def _rejected(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"status": "rejected", "reason": cut_lines(reason)}, status_code=status, headers=headers)


# What the command routes answer while the App starts (the API is served from the start's first seconds: its probes
# answer "starting"); a start takes seconds to minutes, and the answer changes nothing
STARTING = "the service is starting: it takes commands once its start is done (its /readyz says when)"
STARTING_RETRY_S = 5

CUT_SHORT = ("the service is shutting down; the command was still running when the API stopped (an add is undone, "
             "an update or a removal may have applied)")


class AnswerCutRequests:
    """ASGI middleware: a request still running when the server stops is cancelled by uvicorn after its grace
    period (a SIGTERM while a camera starts, which takes seconds); it is answered 503 with the reason, not with
    uvicorn's bare 500 and a traceback in the service's log. The App's thread still finishes the command."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            if scope["type"] != "http" or started:
                raise
            await _rejected(503, CUT_SHORT)(scope, receive, send)


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET without the body (HTTP requires it of every server; FastAPI's routes,
    unlike Starlette's, take GET alone: a monitor probing /healthz with HEAD, as uptime checkers do by default, was
    answered 405 and took the service for down). A new scope: the server's own still says HEAD, and it sends no body."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def _routes(request: Request, **changes: str) -> bool:
    """Whether a route takes ``request`` with ``changes`` to its scope (another method, another path)."""
    from starlette.routing import Match

    scope = {**request.scope, **changes}
    return any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes)


def _allowed(request: Request) -> str:
    """The methods a path takes, for a 405's Allow, each method tried: Starlette names those of the first route on
    the path only (``Allow: GET`` for PUT /cameras/lobby, whose PATCH and DELETE are routes of their own), and an
    included router's routes sit behind one entry with no ``methods`` (/healthz, /readyz, /metrics: ``Allow:``)."""
    methods = {m for m in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT") if _routes(request, method=m)}
    return ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))


def _not_found(request: Request) -> str | None:
    """What a 404 names where a route was meant (Starlette's bare "Not Found" named nothing; None elsewhere): a path
    with a doubled '/' that routes with single ones, or a camera id holding '/' (sent as %2F or not: no route's
    {camera_id} takes it, and no camera id holds one), as the control stream names it."""
    path, method = request.url.path, request.method
    single = re.sub("/{2,}", "/", path)
    if single != path and _routes(request, path=single):
        return f"{method} {path}: no such path; with single slashes: {method} {single}"
    camera_id = path.removeprefix("/cameras/")
    if camera_id != path and _routes(request, path="/cameras/id"):
        return f"camera.id: no camera {camera_id!r} is running"
    return None


def _validation_reason(exc: RequestValidationError) -> str:
    """FastAPI's validation errors (bad JSON, not an object) in the config's style: field path first."""
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            lines.append(f"body: not valid JSON ({detail})" if detail else "body: not valid JSON")
        else:
            lines.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "\n".join(lines)



def _json_body(example: dict, description: str) -> dict:
    """The OpenAPI entry of a body that ``_json_object_reader`` reads (FastAPI documents only its own Body)."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True}, "example": example}}}}


def _json_object_reader(auth: BearerAuth) -> Callable:
    """The dependency that reads a route's body: a JSON object of at most MAX_BODY_BYTES, read only after the
    token check (FastAPI reads a declared Body first: a sender without a token was told what was wrong with
    its JSON, and any body, however large, was held in memory), strict JSON, and an answer that says what
    is wrong with it (415 for a form or text, 413 past the limit, 422 naming the bad key)."""

    async def json_object(request: Request, by: str = Depends(auth)) -> dict[str, Any]:  # the token first
        def refuse(status: int, reason: str) -> HTTPException:
            log.warning("HTTP API: rejected %s: %s", shown(f"{request.method} {request.url.path}"), shown(reason))
            return HTTPException(status, reason)

        content_type = request.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            got = f"got {content_type!r}" if content_type else "none was sent"
            raise refuse(415, f"body: expected Content-Type: application/json, {got}")
        length = request.headers.get("content-length", "")
        too_large = f"body: larger than {MAX_BODY_BYTES} bytes"
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise refuse(413, too_large)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise refuse(413, too_large)
                chunks.append(chunk)
        except ClientDisconnect:  # the sender went away mid-body: no bug (it was a 500 and a traceback in the log)
            raise refuse(400, "body: the client disconnected before sending all of it") from None
        try:
            value = strict_json(b"".join(chunks).decode())
        except json.JSONDecodeError as e:
            reason = f"body: not valid JSON ({e.msg})" if size else "body: empty (expected a JSON object)"
            raise refuse(422, reason) from None
        except UnicodeDecodeError:
            raise refuse(422, "body: not valid JSON (not UTF-8)") from None
        except ValueError as e:  # a key given twice, NaN, too deep (strict_json)
            raise refuse(422, f"body: {e}") from None
        if not isinstance(value, dict):
            raise refuse(422, f"body: expected a JSON object, got {_JSON_TYPES.get(type(value), 'a value')}")
        return value

    return json_object


def build_api(controller: Any, tokens: dict[str, str], extensions: Iterable[Extension] = ()) -> FastAPI:
    """The FastAPI app over ``controller`` (a started App); ``extensions`` add their own routes."""
    api = FastAPI(title="hydravision control API", version="1", redirect_slashes=False,  # see slash_hint
                  description="Add, update, remove and export cameras of a running hydravision service.\n\n"
                              + RESERVED_NOTE)
    auth = BearerAuth(tokens)
    api.state.auth = auth
    json_object = _json_object_reader(auth)

    async def taking_commands(by: str = Depends(auth)) -> str:
        """``auth`` (the token's answers first, as ever), then 503 while the App starts (App.starting): no command may
        reach it while its start builds what the commands use (the admission, the placement, the running set)."""
        if getattr(controller, "starting", False):
            raise HTTPException(503, STARTING, headers={"Retry-After": str(STARTING_RETRY_S)})
        return by

    commands: list = []  # the limiter, made in the server's event loop: anyio < 4.2 refuses one made outside it

    async def command(fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn`` in a thread of the commands' own (see COMMANDS_AT_ONCE)."""
        if not commands:
            commands.append(anyio.CapacityLimiter(COMMANDS_AT_ONCE))
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=commands[0])

    @api.exception_handler(CommandRejected)
    async def _on_rejected(request: Request, exc: CommandRejected) -> JSONResponse:
        return _rejected(exc.status, exc.reason)

    @api.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reason = _validation_reason(exc)
        log.warning("HTTP API: rejected %s: %s", shown(f"{request.method} {request.url.path}"), shown(reason))
        return _rejected(422, reason)

    @api.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
        hint = (slash_hint(request) or _not_found(request)) if exc.status_code == 404 else None
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed(request)}
            hint = f"{request.method} {request.url.path}: method not allowed (allowed: {headers['Allow']})"
        return _rejected(exc.status_code, hint or str(exc.detail), headers)

    @api.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return _rejected(500, redact_text(f"internal error: {type(exc).__name__}: {exc}", []).splitlines()[0])

    def accepted(op: str, camera: str | None, by: str, result: Any) -> dict:
        return {"status": "accepted", "op": op, "camera": camera, "by": by, "result": result}

    @api.get("/cameras", summary="the running cameras (URLs without credentials) and their last state",
             responses=COMMAND_ANSWERS)
    def list_cameras(by: str = Depends(taking_commands)) -> dict:
        # and the service's redis.prefix: `cameras --api URL --prefix P` refuses another prefix's service
        prefix = getattr(getattr(getattr(controller, "config", None), "redis", None), "prefix", None)
        return {**accepted("list", None, by, controller.list_cameras()),
                "prefix": prefix if isinstance(prefix, str) else None}

    @api.post("/cameras", status_code=201, summary="add a camera; the others keep running", responses=COMMAND_ANSWERS,
              openapi_extra=_json_body(CAMERA_EXAMPLE, "a camera, as in the config's cameras: list"))
    async def add_camera(by: str = Depends(taking_commands), camera: dict[str, Any] = Depends(json_object)) -> dict:
        result = await command(controller.add_camera, camera, by=by)
        return accepted("add", result["id"], by, result)

    @api.get("/cameras/export", summary="the running set as a config's cameras: section (no credentials)",
             description=RESERVED_NOTE, responses=COMMAND_ANSWERS)
    def export_cameras(by: str = Depends(taking_commands)) -> dict:
        return accepted("export", None, by, controller.export_cameras())

    @api.get("/cameras/{camera_id}", summary="one camera", description=RESERVED_NOTE, responses=COMMAND_ANSWERS)
    def get_camera(camera_id: str, by: str = Depends(taking_commands)) -> dict:
        found = [c for c in controller.list_cameras() if c["id"] == camera_id]
        if not found:
            raise CommandRejected(f"camera.id: no camera {camera_id!r} is running", 404)
        return accepted("get", camera_id, by, found[0])

    @api.patch("/cameras/{camera_id}", summary="change fields of a camera (url, fps, heads, tracker, ...)",
               openapi_extra=_json_body({"fps": 5, "heads": ["people"]}, "the fields to change"),
               responses=COMMAND_ANSWERS)
    async def update_camera(camera_id: str, by: str = Depends(taking_commands),
                            changes: dict[str, Any] = Depends(json_object)) -> dict:
        return accepted("update", camera_id, by, await command(controller.update_camera, camera_id, changes, by=by))

    @api.delete("/cameras/{camera_id}", summary="remove a camera: its tracks end, its status entry goes",
                responses=COMMAND_ANSWERS)
    async def remove_camera(camera_id: str, by: str = Depends(taking_commands)) -> dict:
        return accepted("remove", camera_id, by, await command(controller.remove_camera, camera_id, by=by))

    for extend in extensions:
        extend(api, controller)
    api.add_middleware(HeadAsGet)
    return api


def bind(host: str, port: int, what: str = "api") -> socket.socket:
    """The API's (or the dashboard's) listening socket, bound and listening at once: a port in use fails before
    anything starts, and port 0 gets a free port; uvicorn serves it later (the API right after the start's checks,
    the dashboard once the cameras run), and until then connections wait in its backlog. (Not inherited by child
    processes: Python sockets are not, PEP 446.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening now, not when uvicorn starts (a minute later on a loaded machine): a socket only bound
        # (SO_REUSEADDR) does not hold the port, and another program that bound and listened on it in between
        # took it, the API's start failing with EADDRINUSE. uvicorn's default backlog, as it would set.
        sock.listen(2048)
    except OSError as e:
        sock.close()
        from pipeline.config import ConfigError

        raise ConfigError(f"{what}: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


# How long a request's head (its request line and headers) may take to arrive, from its connection or from the
# answer before it on a kept-alive one, and its body (at most MAX_BODY_BYTES) from its head (see HeadDeadline)
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol (the HTTP API's and the dashboard's), closing a connection whose next request's head
    is not complete within HEAD_TIMEOUT_S, or whose body is not within BODY_TIMEOUT_S of its head. uvicorn has
    neither (its keep-alive timer starts after a first answer, and any byte stops it): connections that never
    finished a head (slowloris, or connect and send nothing), or a body they declared, stayed open for good, and 200
    of them locked a dashboard under `ulimit -n 160` out. A request that is all in has no deadline here: a command
    waiting on Ray, the dashboard's event stream. One answered before its body was all in (a 401 or a 413 before
    the body is read) goes on once the rest is in (dropped by uvicorn), or is closed at the body's deadline."""

    _deadline: asyncio.TimerHandle | None = None
    _deadline_of: Any = None  # the client's h11 state the deadline is for: IDLE (a head) or SEND_BODY (a body)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        # one answered before its body was all in (a 401, a 413): uvicorn drops the rest of it and reads the next
        # request on the connection (a keep-alive client's); the body deadline still bounds a body that never comes
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """A deadline while the client owes a request's head (h11: the client IDLE), from when the wait began, or
        its body (SEND_BODY), from its head; none once the request is all in."""
        state = None if self.transport.is_closing() else self.conn.their_state
        if state is self._deadline_of:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._deadline_of = state
        if state is h11.IDLE:
            # uvicorn's own idle close: the connection has sent no request yet, nothing is cut short
            self._deadline = self.loop.call_later(HEAD_TIMEOUT_S, self.timeout_keep_alive_handler)
        elif state is h11.SEND_BODY:
            # the route reading the body is told the client disconnected (Starlette's ClientDisconnect)
            self._deadline = self.loop.call_later(BODY_TIMEOUT_S, self.transport.close)


class ApiServer:
    """uvicorn serving an app in a daemon thread, on a socket from ``bind``."""

    def __init__(self, app: FastAPI):
        self.app = app
        self.host, self.port = "", 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, sock: socket.socket, timeout_s: float = 10.0, check_host: bool = True) -> "ApiServer":
        """``check_host``: on loopback, refuse requests naming another Host (LoopbackHostsOnly), but for those with
        a valid token (tokens configured): a rebound page has none, and a proxy on the machine may pass its own Host
        on. The probes and the schema need no token: with the check off, a rebound page read /readyz's cameras."""
        host, self.port = sock.getsockname()[:2]
        self.host = host
        auth = getattr(getattr(self.app, "state", None), "auth", None)  # build_api's; another ASGI app has none
        vouched = auth.vouches if isinstance(auth, BearerAuth) and auth._tokens else None  # tokenless: none vouch
        # what a refused Host can do (the API has no allowed-hosts setting, as the dashboard has)
        hint = ("a request with a valid bearer token is answered through any Host" if vouched else
                "have a proxy send a loopback Host (proxy_set_header Host localhost), or set api.tokens: a request "
                "with a valid bearer token is answered through any Host")
        app = AnswerCutRequests(LoopbackHostsOnly(self.app, host, vouched=vouched, hint=hint) if check_host
                                else self.app)
        # log_config None: uvicorn sets up no logging of its own; its records go through the service's (route_uvicorn)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, http=HeadDeadline,
                                lifespan="off", timeout_graceful_shutdown=5)
        route_uvicorn()
        quiet_accept_errors()  # out of file descriptors: one warning, not a traceback per failed accept
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http-api",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            # a slow start given up on: its server and socket must not go on under a caller that went on without them
            self.stop()
            sock.close()
            raise RuntimeError(f"the HTTP API did not start on {self.url} within {timeout_s:g} s")
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 8.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
