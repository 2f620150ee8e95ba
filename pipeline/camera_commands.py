"""`hydravision cameras list|add|update|remove|export`: change the cameras of a running service, over its HTTP
API (``--api URL``, token from ``$HYDRAVISION_API_TOKEN`` or ``--token``) or its Redis control stream
(``--redis-url``, ``--prefix``; the default when no ``--api`` is given). Either way the service answers
accepted, or rejected with a reason naming the field (exit status 2).

This module imports neither Ray nor FastAPI: the CLI builds its parser from here at every start.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from workers.redact import redact_url
from workers.settings import redis_url_error

API_URL_ENV, API_TOKEN_ENV, REDIS_URL_ENV = "HYDRAVISION_API_URL", "HYDRAVISION_API_TOKEN", "HYDRAVISION_REDIS_URL"
QUIET_S = 3.0  # an answer later than this is waited for with a line saying so
WAIT_READ_S = 2.0  # a read of the answer's wait: control.await_answer blocks 1 s at most, and 1 s for a busy Redis
READ_LATELY_S = 10.0  # a service's control stream consumer reads every 250 ms: one idle longer is taken as stopped


def add_parser(sub: Any) -> None:
    from pipeline.cli import prefix, seconds  # the CLI's own checks; it imports this module only to build its parser

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=None, metavar="URL",
                        help=f"the service's HTTP API, e.g. http://127.0.0.1:8470 (default: ${API_URL_ENV}, unless "
                             "--redis-url is given; without either, the Redis control stream)")
    common.add_argument("--token", default=None, help=f"bearer token for --api (better: ${API_TOKEN_ENV})")
    common.add_argument("--redis-url", default=None, help=f"Redis of the service (default: ${REDIS_URL_ENV})")
    # None unless given: an explicit one is checked against the service behind --api (HttpChannel)
    common.add_argument("--prefix", type=prefix, default=None,
                        help="the service's Redis key prefix (default hv); with --api, the service there must have it")
    # 90: an add's camera may take the service's start budget for one camera (65 s) to start, then answers
    common.add_argument("--timeout", type=seconds, default=90.0, metavar="S",
                        help="wait this long for the answer (default 90)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", dest="as_json", action="store_true", help="print the service's answer as JSON")

    fields = argparse.ArgumentParser(add_help=False)
    fields.add_argument("--url", help="rtsp://..., a file under the media roots, /dev/videoN, synthetic://...")
    fields.add_argument("--fps", type=float, help="frames per second to analyse")
    fields.add_argument("--heads", type=lambda t: [h.strip() for h in t.split(",") if h.strip()],
                        metavar="A,B", help="heads to run (default: all)")
    fields.add_argument("--json", dest="camera_json", metavar="JSON",
                        help="the camera (or the changes) as a JSON object")
    fields.add_argument("--yaml", type=Path, metavar="FILE",
                        help="the camera as YAML ('-': stdin); an add takes a cameras: list too (an export), "
                             "${VAR}s read from this environment")

    c = sub.add_parser("cameras", help="list, add, update, remove or export the cameras of a running service")
    actions = c.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common, output], help="the running cameras")
    a = actions.add_parser("add", parents=[common, fields], help="add a camera; the others keep running")
    a.add_argument("--id", dest="camera_id", help="camera id")
    u = actions.add_parser("update", parents=[common, fields], help="change a camera (url, fps, heads, ...)")
    u.add_argument("camera_id", metavar="ID")
    r = actions.add_parser("remove", parents=[common, output], help="remove a camera (its tracks end)")
    r.add_argument("camera_id", metavar="ID")
    e = actions.add_parser("export", parents=[common], help="the running set as YAML (no credentials)")
    e.add_argument("-o", "--out", type=Path, default=None, help="write to this file instead of stdout")


# -- the two channels ------------------------------------------------------------------------------------------

class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as what it is (the API itself never redirects: a proxy's http -> https, a moved
    host): urllib re-sent a POST as a GET, so an add answered by the list said "added camera", nothing added; and
    it sent the token along to wherever the redirect pointed."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


# How pipeline.api.STARTING begins: the 503 that the API answers while its service starts (asked again, _send);
# another server's 503 (a gateway's) is an answer as it is.
STARTING = "the service is starting"


class HttpChannel:
    def __init__(self, base: str, token: str | None, timeout: float, prefix: str | None = None,
                 source: str = "--api"):
        self.base, self.token, self.timeout = base.rstrip("/"), token, timeout
        # An explicit --prefix, which the service behind the API must have: ignored, `--prefix pa` with pb's API in
        # $HYDRAVISION_API_URL changed pb's camera. Checked once, on a list (it changes nothing), before any command.
        self.prefix, self.source = prefix, source

    def send(self, op: str, camera_id: str | None = None, body: dict | None = None) -> dict:
        self._deadline = time.monotonic() + self.timeout  # the whole command's: --prefix's list and retries within it
        if self.prefix is not None:
            listed = self._send("list")
            if listed.get("status") != "accepted":  # a token refused, say: the command's answer too
                return listed
            self._check_prefix(listed.get("prefix"))
            self.prefix = None
            if op == "list":
                return listed
        return self._send(op, camera_id, body)

    def _check_prefix(self, served: Any) -> None:
        api = f"the HTTP API at {redact_url(self.base)} ({self.source})"
        other = f"give --redis-url to reach prefix {self.prefix!r}'s control stream"
        if served is None:  # a service of a version whose answers do not name it
            raise UserError(f"--prefix {self.prefix}: {api} does not say its service's prefix (an older version): "
                            f"nothing sent. Leave --prefix out to send the command there, or {other}")
        if served != self.prefix:
            raise UserError(f"--prefix {self.prefix}: {api} is the service of prefix {served!r}, not "
                            f"{self.prefix!r}: nothing sent. Give that prefix's own API, or {other}")

    def _send(self, op: str, camera_id: str | None = None, body: dict | None = None) -> dict:
        """One command; asked again while the service answers that it is starting (503 with Retry-After: its API
        is served from the start's first seconds and takes commands once the start is done), within --timeout.
        Before, the request waited in the socket's backlog for the start's end: `run &` then `cameras add` worked."""
        said = False
        while True:
            answer = self._request(op, camera_id, body)
            wait = answer.pop("retry_after", None)
            if wait is None or time.monotonic() + wait > self._deadline:
                return answer
            if not said:
                print(f"the service at {redact_url(self.base)} is starting: waiting for it (up to {self.timeout:g} s, "
                      "--timeout)", file=sys.stderr)
                said = True
            time.sleep(wait)

    def _request(self, op: str, camera_id: str | None = None, body: dict | None = None) -> dict:
        one = f"/cameras/{urllib.parse.quote(camera_id or '', safe='')}"  # 'lobby?x' is not camera lobby
        method, path = {"list": ("GET", "/cameras"), "add": ("POST", "/cameras"),
                        "export": ("GET", "/cameras/export"), "update": ("PATCH", one), "remove": ("DELETE", one)}[op]
        data = None if body is None else json.dumps(body).encode()
        try:  # 'http://[::1' (a ValueError) or 'http://host:port8470' (InvalidURL): the user's URL, not our bug
            req = urllib.request.Request(self.base + path, data=data, method=method)
            req.add_header("Content-Type", "application/json")
            if self.token:  # its UTF-8 bytes, as the API reads them (http.client writes a header as latin-1)
                req.add_header("Authorization", f"Bearer {self.token}".encode().decode("latin-1"))
            left = max(1.0, self._deadline - time.monotonic())  # what --timeout leaves after retries while starting
            with urllib.request.build_opener(_NoRedirects).open(req, timeout=left) as resp:
                raw, code = resp.read(), resp.status
        except urllib.error.HTTPError as e:  # the status is the answer's code, as the control stream's field
            try:
                answer = {**_answer(json.loads(e.read())), "code": e.code}
                if (e.code == 503 and str(answer.get("reason", "")).startswith(STARTING)
                        and (e.headers.get("Retry-After") or "").isdigit()):  # hydravision starting (_send)
                    answer["retry_after"] = max(1, int(e.headers["Retry-After"]))
                return answer
            except ValueError:
                reason = f"HTTP {e.code} {e.reason}"
                if 300 <= e.code < 400:  # not followed (_NoRedirects): the command went no further
                    moved = e.headers.get("Location")
                    reason += f", not followed to {redact_url(moved)}" if moved else ", not followed"
                    reason += " (give the API's own URL as --api)"
                return {"status": "rejected", "reason": reason, "code": e.code}
        except TimeoutError:  # not wrapped in a URLError: the request was sent, its answer is what did not come
            may = ": the command may still be applied (see `cameras list`)" if op in ("add", "update", "remove") else ""
            raise UserError(f"no answer from the HTTP API at {redact_url(self.base)} within {self.timeout:g} s"
                            f"{may}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"cannot reach the HTTP API at {redact_url(self.base)}: {reason}") from None
        except (ValueError, http.client.InvalidURL) as e:  # its text can hold a piece of a password: "port 'pw@h'"
            detail = f" ({e})" if redact_url(self.base) == self.base else ""
            raise UserError(f"--api {redact_url(self.base)}: not a usable URL{detail}") from None
        except http.client.IncompleteRead:  # the request was sent; its answer stopped short (a proxy, a restart)
            may = ": the command may still be applied (see `cameras list`)" if op in ("add", "update", "remove") else ""
            raise UserError(f"the HTTP API at {redact_url(self.base)} cut its answer short{may}") from None
        except http.client.HTTPException as e:  # BadStatusLine: another service's port (SSH, Redis) was "a bug"
            raise UserError(f"{redact_url(self.base + path)} answered something that is not hydravision's API "
                            f"(not HTTP: {str(e).strip()[:60]!r})") from None
        try:  # another server on that port (the dashboard, a proxy's login page) answers 200 with HTML
            return {**_answer(json.loads(raw)), "code": code}
        except ValueError:
            raise UserError(f"{redact_url(self.base + path)} answered something that is not hydravision's API "
                            f"(not a JSON object: {raw[:60]!r})") from None


class RedisChannel:
    def __init__(self, url: str, prefix: str, timeout: float):
        import redis

        from pipeline.control import control_key, results_key

        self.url, self.prefix, self.timeout = url, prefix, timeout
        self.key, self.results = control_key(prefix), results_key(prefix)
        # No command may outlast --timeout either: on a frozen Redis (SIGSTOP) each of them (ACL WHOAMI, TIME,
        # XREVRANGE, XADD) hung 10 s, whatever --timeout said.
        self.client = redis.Redis.from_url(url, socket_connect_timeout=min(3.0, timeout),
                                           socket_timeout=min(10.0, timeout))
        try:
            user = self.client.acl_whoami()
        except redis.ResponseError:
            user = "unknown"  # a Redis without ACLs
        except (redis.RedisError, OSError) as e:
            raise UserError(f"cannot reach Redis at {redact_url(url)}: {type(e).__name__}") from None
        self.user = user.decode() if isinstance(user, bytes) else str(user)

    def send(self, op: str, camera_id: str | None = None, body: dict | None = None) -> dict:
        import redis

        try:
            return self._send(op, camera_id, body)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise UserError(f"lost Redis at {redact_url(self.url)}: {type(e).__name__}") from None
        except redis.RedisError as e:  # NOPERM on XADD (an ACL), WRONGTYPE: the user's Redis, not a bug of ours
            raise UserError(f"Redis at {redact_url(self.url)} refused the command: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None

    def _send(self, op: str, camera_id: str | None, body: dict | None) -> dict:
        import redis

        # only now: the command side's imports are not the CLI's
        from pipeline.control import await_answer, redis_now, take_back

        command: dict[str, Any] = {"op": op, "request_id": uuid.uuid4().hex, "user": self.user,
                                   "expires": redis_now(self.client) + self.timeout}  # the service checks on it
        if op == "add":
            command["camera"] = body
        elif op in ("update", "remove"):
            command["id"] = camera_id
            if op == "update":
                command["changes"] = body
        self._refuse_without_service()
        last = self.client.xrevrange(self.results, count=1)
        after = last[0][0] if last else "0-0"
        try:
            entry_id = self.client.xadd(self.key, {"data": json.dumps(command)})
        except (redis.ConnectionError, redis.TimeoutError) as lost:  # Redis may have added it: the reply is lost
            raise UserError(f"lost Redis at {redact_url(self.url)} while sending the command "
                            f"({type(lost).__name__}): it may have been applied (see `cameras list`)") from None
        # The wait on a client of its own, whose reads on a frozen Redis fail after WAIT_READ_S: with the commands'
        # socket timeout above, a read begun just before --timeout ran out ended up that long after it.
        waiter = redis.Redis.from_url(self.url, socket_connect_timeout=WAIT_READ_S, socket_timeout=WAIT_READ_S)
        try:
            answer = await_answer(waiter, self.results, command["request_id"], after, min(self.timeout, QUIET_S))
            if answer is None and self.timeout > QUIET_S:  # a service starting up answers later: wait, but say so
                print(self._waiting_note(entry_id), file=sys.stderr)
                answer = await_answer(waiter, self.results, command["request_id"], after, self.timeout - QUIET_S)
        except (redis.ConnectionError, redis.TimeoutError) as lost:
            raise UserError(f"lost Redis at {redact_url(self.url)} while waiting for the answer "
                            f"({type(lost).__name__}): the command may have been applied (see `cameras list`)"
                            ) from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main): taken back as at the timeout, not left for ever
            try:  # and what became of it: one a service read already may still be applied
                print(f"interrupted: {take_back(self.client, self.key, entry_id)}", file=sys.stderr)
            except redis.RedisError:
                pass
            raise
        finally:
            waiter.close()
        if answer is not None:
            return answer
        raise UserError(f"no answer on {self.results} within {self.timeout:g} s: "
                        + take_back(self.client, self.key, entry_id))


    def _refuse_without_service(self) -> None:
        """No lease {prefix}:service (pipeline/service_lease.py): no service runs on this prefix now (one starting
        takes it first, one stopped cleanly deletes it), so none will answer: said at once, nothing written. The
        command waited its whole --timeout (90 s) for nobody. Where the lease cannot be read (an ACL), it waits."""
        import redis

        from pipeline.service_lease import lease_key

        try:
            if self.client.exists(lease_key(self.prefix)) or self._read_lately():
                return  # a service runs, busy or starting: its answer is waited for
        except redis.ResponseError:
            return
        held = self._leased_prefixes()
        there = (f"prefixes with a service there: {', '.join(held)}" if held else
                 "no service holds any prefix there" if held is not None else "")
        raise UserError(f"no hydravision service runs on prefix {self.prefix!r} at {redact_url(self.url)} now (no "
                        f"lease {lease_key(self.prefix)}, which a running service holds): nothing sent"
                        + (f"; {there}" if there else ""))

    def _read_lately(self) -> bool:
        """Whether a consumer read {prefix}:control in the last READ_LATELY_S: a service of a version before the
        lease holds none, yet reads it (every 250 ms) and answers."""
        if not self.client.exists(self.key):
            return False
        return any(consumer["idle"] < READ_LATELY_S * 1000 for group in self.client.xinfo_groups(self.key)
                   for consumer in self.client.xinfo_consumers(self.key, group["name"]))

    def _leased_prefixes(self) -> list[str] | None:
        """The prefixes whose lease is held on this Redis, or None where that is not cheap to tell (a SCAN
        refused, or more keys than a few SCANs look through)."""
        import redis

        keys: list[bytes] = []
        cursor = 0
        try:
            for _ in range(10):  # up to ~10,000 keys: a Redis of a few services; a bigger one is not looked through
                cursor, found = self.client.scan(cursor, match="*:service", count=1000)
                keys += found
                if not cursor:
                    break
            else:
                return None
            values = self.client.mget(keys) if keys else []
        except redis.ResponseError:
            return None
        return sorted(k.decode(errors="replace").removesuffix(":service") for k, v in zip(keys, values)
                      if _is_lease(v))

    def _waiting_note(self, entry_id: Any) -> str:
        """What the wait past QUIET_S is for: with no service on this Redis it was 90 s of silence. A service
        that took the command applies it (an add can take tens of seconds); none took it, or none ever read here."""
        import redis

        from workers.publish import entry_order

        left = f"up to {self.timeout - QUIET_S:g} s more"
        try:  # any group: a service may read under another control.group
            groups = self.client.xinfo_groups(self.key)
        except redis.RedisError:
            return f"waiting {left} for the answer on {self.results}"
        if any(entry_order(g["last-delivered-id"]) >= entry_order(entry_id) for g in groups):
            return f"a hydravision service took the command and is applying it: waiting {left} for its answer"
        return (f"waiting {left} for a hydravision service to answer on {self.key}"
                + ("" if groups else f" (no service has read {self.key} on this Redis yet: is one running, with "
                   "this prefix?)"))



def _is_lease(value: Any) -> bool:
    """Whether a key's value is a service lease (pipeline/service_lease.py writes {"run": ..., "pid": ...})."""
    try:
        return isinstance(lease := json.loads(value), dict) and "run" in lease
    except (TypeError, ValueError):
        return False


def _answer(value: Any) -> dict:
    """A decoded answer, which must be a JSON object (ValueError otherwise)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _channel(args: argparse.Namespace) -> HttpChannel | RedisChannel:
    # a --redis-url given is the channel asked for: $HYDRAVISION_API_URL (a shell's default) sent the command to
    # whichever service that names instead, without a word
    api = args.api or (None if args.redis_url else os.environ.get(API_URL_ENV))
    if api:
        return HttpChannel(api, args.token or os.environ.get(API_TOKEN_ENV), args.timeout, args.prefix,
                           "--api" if args.api else f"${API_URL_ENV}")
    return RedisChannel(redis_url(args.redis_url), args.prefix or "hv", args.timeout)


def redis_url(given: str | None) -> str:
    """The Redis URL of a command's --redis-url, else $HYDRAVISION_REDIS_URL, else the local default; refused
    (UserError, the URL redacted) when it is no Redis URL."""
    url = given or os.environ.get(REDIS_URL_ENV) or "redis://127.0.0.1:6379/0"
    if problem := redis_url_error(url):
        raise UserError(f"--redis-url {redact_url(url)}: {problem}")
    return url


# -- the command -----------------------------------------------------------------------------------------------

def _camera_fields(args: argparse.Namespace) -> dict:
    """The camera (add) or the changes (update) from --camera-json / --yaml, then the flags over them."""
    body: dict = {}
    if args.camera_json:
        # Read as the service reads a command: json.loads kept the last of a key given twice, so the service,
        # which refuses such a command (as --yaml's loader does), never saw the duplicate.
        from pipeline.admission import strict_json

        try:
            body = strict_json(args.camera_json)
        except json.JSONDecodeError as e:
            raise UserError(f"--json: not valid JSON ({e})") from None
        except ValueError as e:  # a key given twice, NaN, nesting too deep
            raise UserError(f"--json: {e}") from None
    elif args.yaml:
        import yaml

        from pipeline.config import load_yaml

        stdin = str(args.yaml) == "-"
        name = "stdin" if stdin else str(args.yaml)
        try:
            body = load_yaml(sys.stdin.read() if stdin else args.yaml.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--yaml: cannot read {name}: {getattr(e, 'strerror', None) or e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"--yaml: {name} is not valid YAML: {_yaml_problem(e)}") from None
        cameras = body.get("cameras") if isinstance(body, dict) else None
        if isinstance(cameras, list) and len(cameras) > 1:
            return _several(cameras, name, args)
        body = _interpolated(cameras[0] if isinstance(cameras, list) and len(cameras) == 1 else body, name)
    return _with_flags(body, args)


def _interpolated(value: Any, name: str, path: str = "") -> Any:
    """The camera(s) of --yaml with their ${VAR}s read from the sender's environment, as `run` reads a config (the
    service interpolates nothing it receives): an export's ${HV_<CAMERA>_SECRET} reached the camera as its
    password, "added" all the same. Only the cameras: a whole config's redis: and such are not sent."""
    from pipeline.config import ConfigError, interpolate_env

    try:
        return interpolate_env(value, path)
    except ConfigError as e:
        raise UserError(f"--yaml: {name}: {e}") from None


def _with_flags(body: Any, args: argparse.Namespace, path: str = "camera") -> dict:
    if not isinstance(body, dict):
        raise UserError("--json / --yaml: expected one camera as a mapping")
    for flag in ("url", "fps", "heads"):
        if getattr(args, flag) is not None:
            body[flag] = getattr(args, flag)
    if args.action == "add" and args.camera_id:
        body["id"] = args.camera_id
    _finite(body, path)
    return body


def _finite(value: Any, path: str) -> None:
    """Refuses NaN and Infinity (``--fps nan``, a YAML ``.inf``) naming the field: sent, they made the body invalid
    JSON, and the service refused it as a whole ("body: NaN is not JSON") without saying which field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{path}: {value!r} is not a finite number (JSON has no NaN or Infinity)")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _finite(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}")


def _several(cameras: list, name: str, args: argparse.Namespace) -> list[dict]:
    """The cameras of a file that lists several (an export): each one added in turn, --fps / --heads over each.
    They were one body with a `cameras` field, refused as a camera without an id."""
    if args.action != "add" or args.camera_id or args.url:
        raise UserError(f"--yaml: {name} lists {len(cameras)} cameras: "
                        + ("give one to update" if args.action != "add" else "--id and --url name one camera"))
    cameras = _interpolated(cameras, name, "cameras")
    return [_with_flags(camera, args, f"cameras[{i}]") for i, camera in enumerate(cameras)]


def _yaml_problem(err: Any) -> str:
    """The parser's problem and where, without its snippet of the file (it can show a password)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None or not getattr(err, "problem", None):
        return str(err).splitlines()[0]
    return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"


def main(args: argparse.Namespace) -> int:
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:  # as Ctrl-C: a command waiting for its answer is taken back
        terminated.append(signum)
        raise KeyboardInterrupt

    # the main thread only can set a handler (a program calling main() from another thread keeps SIGTERM's)
    # an inherited SIG_IGN (nohup-like launchers) stays ignored
    handled = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    previous = signal.signal(signal.SIGTERM, on_sigterm) if handled else None
    try:
        return _command(args)
    finally:
        if handled:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            if terminated:  # then ended by SIGTERM, as before
                os.kill(os.getpid(), signal.SIGTERM)


def _command(args: argparse.Namespace) -> int:
    channel = _channel(args)
    camera_id = getattr(args, "camera_id", None)
    body = _camera_fields(args) if args.action in ("add", "update") else None
    if isinstance(body, list):
        return _add_each(channel, body)
    if args.action == "add" and not (body or {}).get("id"):
        raise UserError("cameras add: give the camera's --id (or an id in --json / --yaml)")
    answer = channel.send(args.action, camera_id, body)
    if answer.get("status") != "accepted":
        if getattr(args, "as_json", False):  # a script reads the refusal's code and reason too (exit 2 still)
            print(json.dumps(answer, indent=2))
        raise UserError(f"rejected: {answer.get('reason', answer)}")
    result = answer.get("result")
    if getattr(args, "as_json", False):
        print(json.dumps(answer, indent=2))
    elif args.action == "list":
        _print_list(result or [])
    elif args.action == "export":
        if args.out:
            try:
                args.out.write_text(result["yaml"])
            except OSError as e:  # no such directory, no permission: the user's path
                raise UserError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(result["yaml"], end="")
        if result.get("variables"):
            print(f"note: set {', '.join(result['variables'])} before loading it", file=sys.stderr)
    else:
        verb = {"add": "added", "update": "updated", "remove": "removed"}[args.action]
        detail = f" ({', '.join(result['changed']) or 'nothing changed'})" if args.action == "update" else ""
        print(f"{verb} camera {answer.get('camera') or camera_id}{detail} (as {answer.get('by')})")
        _print_warnings(result)
    return 0


def _add_each(channel: HttpChannel | RedisChannel, cameras: list[dict]) -> int:
    """Adds the cameras one by one, a line for each; a refused one does not stop the others, and the exit
    status (2) and last line name every camera not added. One that runs already is left as it is, and said."""
    refused: list[str] = []
    running: list | None = None  # the service's cameras, listed once at the first 409 (not one list per camera)
    for i, camera in enumerate(cameras):
        camera_id = str(camera.get("id") or f"cameras[{i}]")
        try:
            answer = channel.send("add", None, camera)
        except UserError as e:  # no answer in time, Redis lost: it may apply yet; the rest are still tried
            answer = {"reason": str(e)}
        if answer.get("status") == "accepted":
            print(f"added camera {answer.get('camera') or camera_id} (as {answer.get('by')})")
            _print_warnings(answer.get("result"))
            continue
        code = answer.get("code")
        if code is None and "already exists" in str(answer.get("reason", "")):  # a service from before answers had one
            code = 409
        if code == 409:  # by the code, not by the reason's text (which is for people)
            running = _running(channel) if running is None else running
            if camera_id in running:  # an export put back beside the cameras still running: no failure
                print(f"camera {camera_id} already runs: left as it is (`cameras update` changes it)")
                continue
        refused.append(camera_id)
        print(f"camera {camera_id} rejected: {answer.get('reason', answer)}", file=sys.stderr)
    if refused:
        raise UserError(f"{len(refused)} of {len(cameras)} cameras not added: {', '.join(refused)}")
    return 0


def _print_warnings(result: Any) -> None:
    """What the service accepted but warned of (a rate too low for the camera's lines to count)."""
    for warning in result.get("warnings", []) if isinstance(result, dict) else []:
        print(f"warning: {warning}", file=sys.stderr)


def _running(channel: HttpChannel | RedisChannel) -> "list[str] | _Everyone":
    """The ids of the running cameras, which tell an add answered 409 for a running camera from one refused for
    api.max_cameras or "being changed" (409 too); where no list can be had, every 409 is taken as running."""
    try:
        answer = channel.send("list")
    except UserError:
        return _Everyone()
    cameras = answer.get("result") if answer.get("status") == "accepted" else None
    if not isinstance(cameras, list):
        return _Everyone()
    return [c.get("id") for c in cameras if isinstance(c, dict)]


class _Everyone:
    def __contains__(self, camera_id: object) -> bool:
        return True


def _print_list(cameras: list[dict]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from pipeline.status import console as make_console  # without run_commands' Ray, for a table

    console = make_console()
    table = Table(title="cameras", title_justify="left")
    for col in ("id", "state", "url", "fps", "heads", "added by"):
        table.add_column(col)
    for c in cameras:
        cells = (c["id"], str(c.get("state") or "-"), c["url"], str(c.get("fps") or "all"),
                 ",".join(c.get("heads") or []), c.get("added_by") or "config")
        table.add_row(*map(escape, cells))  # as text: 'rtsp://[fd00::5]:554/x' is no markup tag
    console.print(table)
