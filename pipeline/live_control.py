"""Live control: the App's methods that change the running set of cameras while the others keep running.

Both control channels call these (the HTTP API from its worker threads, the Redis control stream from its
own thread), and nothing else mutates ``App.cameras`` after start. Invariants:

- ``App._lock`` guards ``cameras`` and ``_busy`` and is held for dict operations only, never across a Ray
  call: the control loop's ticks and the other cameras never wait for a camera to start or stop.
- A camera id in ``_busy`` is being added, removed or updated: a second command for it is refused (409)
  rather than queued, so two commands never interleave on one camera.
- Every command names who sent it (``by``): an accepted one becomes an audit event (camera_added,
  camera_removed, camera_updated, field ``by``), a refused one a log line; neither holds a credential.
- A camera from a control channel passes ``Admission`` first (see pipeline/admission.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import ray
import redis

from pipeline.admission import Admission, CommandRejected, merge_changes, parse_camera
from pipeline.camera_export import export_cameras, export_yaml
from pipeline.config import API_TOKEN_ENV, ConfigError, counting_rate_warning
from pipeline.errors import UserError
from pipeline.status import FINAL_STATES, mark_stale
from workers.publish import event_message, keys, undelivered as publisher_undelivered
from workers.redact import redact_text, redact_url
from workers.settings import CameraConfig
from workers.stream import merge_next_ids, retired_track_ids_key
from workers.tracking import CameraTracker

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
LATE_UPDATE_POLL_S = 0.25  # how soon a late update's wait sees a shutdown


class LiveControl:
    """Mixed into App (pipeline/app.py), whose fields and helpers (_spawn, _let_go, _describe, say) it uses."""

    # -- the control channels ------------------------------------------------------------------------------
    def check_api_settings(self) -> None:
        """Before anything starts: an API reachable from other machines must demand a token, and its port
        must be free (it is bound here, and served right after the start's checks: start_api)."""
        api = self.config.api
        if api.port is None:
            return
        tokens = api.all_tokens()  # also now, not only in start_control: a weak token must stop the start here
        if not api.loopback and not tokens:
            raise ConfigError(f"api.host: {api.host} is reachable from other machines: configure a token "
                              f"(api.tokens, or ${API_TOKEN_ENV}) or bind 127.0.0.1")
        from pipeline.api import bind

        self._api_socket = bind(api.host, api.port)

    def check_dashboard_settings(self) -> None:
        """Before anything starts: a dashboard reachable from other machines must not offer control (its page has
        no login, no token to set: anyone there added and removed cameras, past the API's tokens)."""
        d = self.config.dashboard
        if not (d.enabled and d.allow_control):
            return
        from pipeline.dashboard import control_reachable_refusal  # the web stack only when the page is served

        if refusal := control_reachable_refusal(d.host, True, "dashboard.host", "dashboard.allow_control"):
            raise ConfigError(refusal)

    def _own_endpoints(self) -> dict[str, tuple[str, int]]:
        own = {}
        parts = urlsplit(self.redis_settings.url)
        if parts.scheme in ("redis", "rediss") and parts.hostname:
            own["Redis"] = (parts.hostname, parts.port or 6379)
        try:
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
            own["Ray GCS"] = (host, int(port))
        except Exception:  # Ray client mode, or no GCS address to tell: nothing to add
            log.debug("no Ray GCS address to protect", exc_info=True)
        return own

    def start_api(self) -> None:
        """The HTTP API (when api.port is set), on the socket check_api_settings bound. App._start serves it right
        after its checks: until the start is done its probes answer "starting" and its commands 503 (App.starting)."""
        api = self.config.api
        if api.port is None or self.api_server is not None:
            return
        from pipeline.api import ApiServer, build_api  # FastAPI and uvicorn load only when the API is on

        tokens = api.all_tokens()
        sock, self._api_socket = self._api_socket, None
        # the Host check stays on with tokens: a request with one passes through any Host (a proxy), but
        # /readyz, /openapi.json and /docs need none, and a rebound page read them
        server = ApiServer(build_api(self, tokens, self.api_extensions))
        try:
            self.api_server = server.start(sock)
        except BaseException:  # a signal while it waits for uvicorn (the first second): no thread, no socket left
            server.stop()
            sock.close()
            raise
        auth = f"bearer tokens: {', '.join(tokens)}" if tokens else "no token, loopback only"
        self.say(f"HTTP API: {self.api_server.url} (OpenAPI: {self.api_server.url}/openapi.json; {auth})")

    def start_control(self) -> None:
        """The HTTP API (when api.port is set; already served where App._start began it) and the Redis control
        stream (when control.enabled)."""
        api, ctl = self.config.api, self.config.control
        # before any command is taken: App._start's API refuses them until the start returns
        self.admission = Admission(api, self.model_heads, self._own_endpoints())
        dashboard = getattr(self, "_dashboard_socket", None)  # bound at the start, served after the control stream:
        if dashboard is not None:  # an add read from the stream meanwhile could point a camera at it
            self.admission.forbid("dashboard", self.config.dashboard.host, dashboard.getsockname()[1])
        self.start_api()
        if self.api_server is not None:
            self.admission.forbid("HTTP API", api.host, self.api_server.port)
        if ctl.enabled:
            from pipeline.control import ControlConsumer, control_key, results_key

            prefix = self.redis_settings.prefix
            self.control = ControlConsumer(self, self.redis_settings.url, prefix, ctl.group,
                                           ctl.results_maxlen).start()
            self.say(f"Control stream: {control_key(prefix)} (answers on {results_key(prefix)})")

    def stop_control(self) -> None:
        if self._api_socket is not None:  # bound, never served (the start failed on the way)
            self._api_socket.close()
            self._api_socket = None
        if self.api_server is not None:
            self.api_server.stop()
            self.api_server = None
        if self.control is not None:
            self.control.stop()
            self.control = None

    # -- commands ------------------------------------------------------------------------------------------
    def note_rejected(self, op: str, by: str, reason: str, camera: Any = None) -> None:
        """A refused command, one warning in the log (reasons never hold credentials: see pipeline/admission.py),
        naming its camera where the command named one (the reason starts with the field at fault, not the camera).
        Not said besides: that printed every refusal twice (two records in JSON, one at INFO). A camera id that is
        none (a remove's of 5000 characters) is not named: its reason names it, cut as the config's errors are."""
        from pipeline.logs import cut_lines
        from workers.settings import CAMERA_ID

        what = f"{op} of camera {camera!r}" if isinstance(camera, str) and CAMERA_ID.match(camera) else op
        log.warning("control: rejected %s from %s: %s", what, by, cut_lines(reason))

    def _claim(self, camera_id: Any, new: bool = False) -> Any:
        """Marks a camera busy for one command; its handle (None when ``new``)."""
        if self._stop.is_set():
            raise CommandRejected("the service is shutting down", 503)
        if not isinstance(camera_id, str):
            raise CommandRejected(f"camera.id: expected a string, got {type(camera_id).__name__}")
        with self._lock:
            if camera_id in self._busy:
                raise CommandRejected(f"camera.id: camera {camera_id!r} is being changed by another command "
                                      "(or restarted after a crash)", 409)
            handle = self.cameras.get(camera_id)
            if new and handle is not None:
                raise CommandRejected(f"camera.id: camera {camera_id!r} already exists", 409)
            if not new and handle is None:
                raise CommandRejected(f"camera.id: no camera {camera_id!r} is running", 404)
            # a running camera that a command is updating or removing is in both: count it once
            if new and len(self.cameras) + len(self._busy - self.cameras.keys()) >= self.config.api.max_cameras:
                raise CommandRejected(f"camera: {self.config.api.max_cameras} cameras already run "
                                      "(api.max_cameras)", 409)
            self._busy.add(camera_id)
        return handle

    def _release(self, camera_id: str) -> None:
        with self._lock:
            self._busy.discard(camera_id)

    def add_camera(self, camera: dict | CameraConfig, by: str) -> dict:
        """Starts a camera beside the running ones; returns it (URL without credentials)."""
        try:
            cam = camera if isinstance(camera, CameraConfig) else parse_camera(camera)
            # the id before the checks: a config camera that reads a file, added back from an export, was refused
            # as outside the media roots rather than named as running
            with self._lock:
                if cam.id in self.cameras:
                    raise CommandRejected(f"camera.id: camera {cam.id!r} already exists", 409)
            cam = self.admission.check(cam)
            self._claim(cam.id, new=True)
        except CommandRejected as e:
            self.note_rejected("add", by, e.reason, camera.id if isinstance(camera, CameraConfig) else
                               camera.get("id") if isinstance(camera, dict) else None)
            raise
        started = time.monotonic()
        try:
            try:
                handle = self._spawn([cam])[0]
            except (UserError, ray.exceptions.RayError) as e:
                reason = f"camera: {e}" if isinstance(e, UserError) else \
                    f"camera: its stream actor failed to start: {self._describe(e, cam.id)}"
                self.note_rejected("add", by, reason, cam.id)
                raise CommandRejected(reason, 503) from None
            handle.added_by = by
            with self._lock:
                stopping = self._stop.is_set()
                if not stopping:
                    self.cameras[cam.id] = handle
                    # a camera of that id removed earlier had its refused constructor said: this one's is said too
                    # (dropped here, not at the removal, which a status tick under way may follow with its say)
                    self._said_dead.discard(f"camera {cam.id}")
                self._registered([cam.id])
            if stopping:  # the service began to shut down while this camera started: shutdown no longer sees it
                self._let_go(handle, stop=True)  # claimed still: the shutdown waits for it before it stops Ray
            else:  # while its id is claimed: the next command's event on it comes after this one
                self._audit("camera_added", cam, by, heads=cam.heads or list(self.model_heads), fps=cam.fps)
                if warning := counting_rate_warning(cam):  # as at the config's load: said, not refused
                    log.warning("control: %s", warning)
        finally:  # only once it is in ``cameras``: a second add of its id in between was let through
            self._release(cam.id)
        if stopping:
            self.note_rejected("add", by, "the service is shutting down", cam.id)  # a refusal as any other
            raise CommandRejected("the service is shutting down", 503)
        # the warning in the answer too: the client that asked is who can act on it, not only the service's log
        answer = {**self.public(cam), "start_s": round(time.monotonic() - started, 2)}
        return answer | _warnings(counting_rate_warning(cam))

    def remove_camera(self, camera_id: str, by: str) -> dict:
        """Stops a camera: it leaves the running set (its id stays claimed), in-flight frames drain, its tracks
        end (track_ended), its decoder closes, its status entry goes from {prefix}:cameras, its actor is killed
        (or, when it hosts other cameras too, forgets it); then camera_removed."""
        try:
            handle = self._claim(camera_id)
        except CommandRejected as e:
            if e.status == 404 and (gone := self._remove_leftover(camera_id, by)) is not None:
                return gone
            self.note_rejected("remove", by, e.reason, camera_id)
            raise
        try:
            # Out of ``cameras`` before its source stops: its drained run ends before the stop's answer comes
            # (the final status, a publisher flush of up to 5 s while Redis is down), and until then the
            # control loop took it for a source that had ended (the last camera's removal stopped the service)
            # and /readyz for a stopped camera.
            with self._lock:
                self.cameras.pop(camera_id, None)
                self._leaving[camera_id] = handle  # until its process is gone or hosts it no more
            stop = None  # the stop's ObjectRef (see _undrained)
            try:
                # {}: Ray re-created its process and the camera was not started again (the answer's final
                # stats were all null), as in App.shutdown
                stop = handle.process.stop.remote(camera_id, drain=True)
                final = ray.get(stop, timeout=STOP_TIMEOUT_S)
                gone = not final  # the process that ran it is gone: its tracks never end but here
                final = final or \
                    {"state": "unavailable", "last_error": "its process was restarted and the camera not started again"}
            except Exception as e:  # a crashed actor: there is nothing left to drain, remove it anyway
                # Its process gone (died, with its node or in a crash) or not: late (GetTimeoutError), its stop
                # failed (a RayTaskError, also one of a RayActorError the stop met), or out of reach for now
                # (ActorUnavailableError), it is alive and its own drain ends its tracks (twice, ended here too)
                gone = isinstance(e, ray.exceptions.RayActorError) and not isinstance(
                    e, (ray.exceptions.RayTaskError, ray.exceptions.ActorUnavailableError))
                # its URL's secrets by name: out of ``cameras`` already, _describe no longer knows them
                final = {"state": "unavailable",
                         "last_error": redact_text(self._describe(e, camera_id), [handle.config.url])}
                log.warning("camera %s: no final stats at removal", camera_id, exc_info=True)
            handle.final = final  # drained: a neighbour's removal may take its process along now (see _let_go)
            # Its counts over its processes, as the final table has a stopped camera's (a process restarted before
            # the removal counted from 0 again: the row had only the last one's frames), while its id is claimed.
            row = {**final, "camera": camera_id}
            self.telemetry.record_cameras([row], final=True, tick=False)
            [row] = self.telemetry.whole_run([row])
            # A run that did not drain (its process died, with its node or in a crash, or Ray re-created it and the
            # camera was not started again) ended none of its tracks, and its final stats count nothing: its last
            # status, read before it goes, names the tracks it had open (ended below only where its process is
            # gone) and what it had published (the whole run's, for one no tick saw; the answer said null,
            # camera_removed 0 where the status line had said 129).
            last = None if "open_tracks" in final else self._stored_status(camera_id)
            if row.get("published") is None and last is not None and _count(last.get("published")) is not None:
                row["published"] = last["published"]
            with self._lock:  # a row of its own: the same id added again is another camera's run, not this one's
                self.removed.append({**row, "state": "removed", "restarts": handle.restarts,
                                     "removed_at": round(time.time(), 3)})
            # Killed (hosting no other camera) or let live, decided once: a second look after the first could differ
            # (two cameras of one hung process removed together: each saw the other, then one killed it) and no one
            # ended the first's tracks.
            try:
                killed = self._let_go(handle)
            except Exception:  # Ray out of reach (its GCS): the Redis side of the removal is done all the same
                log.warning("camera %s: could not let its process go", camera_id, exc_info=True)
                killed = False
            with self._lock:  # the lock a neighbour's kill notes the name under (App._killing), before its ray.kill
                # killed by a neighbour's removal while this one forgot it: as killed here
                killed = killed or handle.name in self._killed_names
                if not (killed or gone) and last is not None:  # let live, undrained: until its drain or a kill
                    self._undrained.setdefault(handle.name, {})[camera_id] = (last, stop)
            if killed:  # the cameras removed from it earlier whose drain never came
                self._end_undrained(handle.name)
            # before its status goes: it reads it. Not kept (Redis down or full): the status, which holds the next
            # ids too, stays until a retry keeps them (deleted, a camera added again under the id reused ids)
            if self._retire_in_redis(camera_id, final.get("track_ids_next")):
                # as a leftover's (_remove_leftover): queued before the status's removal. Alive, its process drains
                # it and ends them; killed, that drain was cut short
                if last is not None and (gone or killed):
                    if ended := self._end_left_open(camera_id, last):
                        log.info("camera %s: the %d track(s) its last status named open ended (its run did not "
                                 "drain)", camera_id, len(ended))
                self.events.remove_status(camera_id)
            else:
                with self._lock:
                    self._unretired[camera_id] = final.get("track_ids_next")
            if killed:
                self._wait_gone(handle)
            # before it leaves ``_leaving``: a shutdown waiting for it closes the events' Publisher next (the event,
            # sent after, was dropped)
            # Messages its publisher could not deliver before it stopped (Redis down or full): lost with it, and said
            # (the answer and the event said only what it had published)
            # (dropped, refused, left: as the end of a run counts them; None: no publisher stats, a crash)
            publisher = final.get("publisher")
            undelivered = sum(publisher_undelivered(publisher).values()) if publisher else None
            # as its row (whole-run); unknown (no tick saw it, no status): not said, where it said 0
            said = {"published": _count(row.get("published")), "undelivered": undelivered or None}
            self._audit("camera_removed", handle.config, by, **{k: v for k, v in said.items() if v is not None})
        finally:
            with self._lock:
                self._leaving.pop(camera_id, None)
                # the same id added again is another camera; under the lock a tick records its stats with (App.stats)
                self.telemetry.forget(camera_id)
            self._release(camera_id)
        keep = ("state", "last_error", "decoded", "published", "dropped", "decoder_threads", "open_tracks",
                "track_ids_next")
        # the counts of its row (whole-run; not null for a process that died: the telemetry or its status knew them)
        return {"id": camera_id, "final": {**{k: row.get(k) for k in keep}, "undelivered": undelivered}}

    def _remove_leftover(self, camera_id: str, by: str) -> dict | None:
        """A camera this service does not run whose status an earlier run left in Redis (its final word, or one
        gone stale): a remove takes that status out, its next track ids kept as at any removal. A camera added at
        run time and not in the config stayed 'down' on the dashboard for good after the service restarted, and
        its remove was refused ("no camera is running"). None where there is no such status."""
        if self.redis_settings is None:  # not started: no Redis known yet
            return None
        # unreadable, none, or not a status (null, a number, a list): the refusal as before says no camera runs
        if (status := self._stored_status(camera_id)) is None:
            return None
        status = mark_stale(status, time.time())
        if not (status["stale"] or status.get("state") in FINAL_STATES):
            return None  # refreshed by someone: not ours to remove
        with self._lock:  # taken as a command's camera: no add of this id meanwhile
            if camera_id in self._busy or camera_id in self.cameras:
                return None
            self._busy.add(camera_id)
        try:
            if not self._retire_in_redis(camera_id, None):
                raise CommandRejected(f"camera.id: {camera_id!r} is not running, and the status an earlier run "
                                      "left could not be removed (Redis): send it again", 503)
            ended = self._end_left_open(camera_id, status)
            self.events.remove_status(camera_id)
        finally:
            self._release(camera_id)
        # an accepted command is an audit event as any other (and the dashboard drops a tile at camera_removed)
        why = "not running: the status an earlier run left"
        self.events.publish_event(event_message("camera_removed", camera_id, by=by, reason=why))
        self.say(f"Camera {camera_id} removed by {by}: {why}"
                 + (f" (the {len(ended)} track(s) it had open ended)" if ended else ""))
        return {"id": camera_id, "final": {"state": status.get("reported_state") or status.get("state"),
                                           "last_error": status.get("last_error"), "leftover": True}}

    def _stored_status(self, camera_id: str) -> dict | None:
        """The camera's status in Redis; None where there is none, or it cannot be read, or it is no object."""
        if self.redis_settings is None:  # not started: no Redis known yet
            return None
        try:
            client = redis.Redis.from_url(self.redis_settings.url, socket_connect_timeout=2, socket_timeout=2)
            try:
                raw = client.hget(keys(self.redis_settings.prefix).cameras, camera_id)
            finally:
                client.close()
            status = json.loads(raw) if raw else None
        except (redis.RedisError, OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def _end_left_open(self, camera_id: str, status: dict) -> list[dict]:
        """track_ended (``reason: restart``) for the tracks a run that never finished them left open in its status
        (tracks_open), as the camera's next start ends them (workers/stream.py): none comes, and their list goes with
        the status (they never ended). Call it before the status's removal: queued on the one publisher, the batch
        that deletes it writes them first. The fields of each."""
        ended = CameraTracker.ended_from_rows(status.get("tracks_open"))
        for fields in ended:
            self.events.publish_event(event_message("track_ended", camera_id, **fields, reason="restart"))
        return ended

    def update_camera(self, camera_id: str, changes: dict, by: str) -> dict:
        """Changes a running camera: heads from its next frame, a new URL reconnects it alone (see
        CameraPipeline.update); the others are not touched."""
        try:
            handle = self._claim(camera_id)
        except CommandRejected as e:
            self.note_rejected("update", by, e.reason, camera_id)
            raise
        late = False  # its call timed out: the claim is released when it answers (_settle_late_update)
        warning = None
        try:
            old = handle.config
            new = merge_changes(old, changes)
            new = self.admission.check(new, url_changed=new.url != old.url)
            # fixed when the camera starts: its frame slots, and its process's Ray options (where it runs)
            for field in ("max_inflight", "placement"):
                if getattr(new, field) != getattr(old, field):
                    raise CommandRejected(f"camera.{field}: cannot change while the camera runs "
                                          "(remove it and add it again)")
            result: dict = {"changed": [], "restarted": False}
            if new != old:
                ref = None
                try:
                    ref = handle.process.update.remote(camera_id, new)
                    result = ray.get(ref, timeout=STOP_TIMEOUT_S)
                except ray.exceptions.RayTaskError as e:  # the camera refused the change
                    # A camera Ray re-created and the control loop has not started yet cannot take one: no 422
                    # ("your change is wrong"), the change is fine once the camera runs again.
                    if self._awaiting_restart(handle):
                        raise CommandRejected(f"camera.id: camera {camera_id!r} is being restarted after a crash; "
                                              "nothing was changed: send the change again", 409) from None
                    raise CommandRejected(f"camera: {self._describe(e, camera_id)}") from None
                except ray.exceptions.GetTimeoutError:  # the call still waits in the actor and may yet apply
                    late = ref is not None and self._settle_late_update(handle, ref, new, by)
                    raise CommandRejected(f"camera: its stream actor did not answer in {STOP_TIMEOUT_S:g} s; the "
                                          "change may still apply: the camera takes no other command until it "
                                          f"answers (up to {STOP_TIMEOUT_S:g} s more); read it back then",
                                          503) from None
                except ray.exceptions.RayError as e:  # its actor is gone: nothing was changed
                    raise CommandRejected(f"camera: its stream actor did not answer: "
                                          f"{self._describe(e, camera_id)}", 503) from None
                handle.config = new
                if result["restarted"]:
                    handle.done = handle.process.wait.remote(camera_id)
            if result["changed"]:  # while its id is claimed: an update sent next was audited before this one
                self._audit("camera_updated", new, by, changes=result["changed"])
            if {"fps", "lines", "zones"} & set(result["changed"]) and (warning := counting_rate_warning(new)):
                log.warning("control: %s", warning)
        except CommandRejected as e:
            self.note_rejected("update", by, e.reason, camera_id)
            raise
        finally:
            if not late:
                self._release(camera_id)
        return {**self.public(new), **result} | _warnings(warning)

    def _settle_late_update(self, handle: Any, ref: Any, new: CameraConfig, by: str) -> bool:
        """An update whose call timed out may still apply in the actor: its camera stays claimed (a next command
        would interleave with it there) until the call answers, or another STOP_TIMEOUT_S passes; an answer that
        applied it puts its settings in the handle (what list and export show) and is audited; a shutdown ends the
        wait (it stops Ray once the claim is gone: a Ray call after that started a new local Ray). True."""
        def settle() -> None:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            try:
                while True:  # short waits, not one of STOP_TIMEOUT_S: the shutdown waited that out, or stopped Ray
                    try:
                        result = ray.get(ref, timeout=LATE_UPDATE_POLL_S)
                        break
                    except ray.exceptions.GetTimeoutError:
                        if self._stop.is_set() or time.monotonic() >= deadline:
                            raise
            except Exception as e:  # refused, its actor gone, or still no answer: the handle keeps what it had
                log.warning("camera %s: the update that timed out failed or still has not answered: %s", handle.id,
                            self._describe(e, handle.id))
            else:
                handle.config = new
                if result["restarted"]:
                    handle.done = handle.process.wait.remote(handle.id)
                if result["changed"]:
                    self._audit("camera_updated", new, by, changes=result["changed"])
            finally:
                self._release(handle.id)

        threading.Thread(target=settle, name=f"late-update-{handle.id}", daemon=True).start()
        return True

    def list_cameras(self) -> list[dict]:
        """The running cameras as configured (URLs without credentials), with their last known state."""
        with self._lock:
            handles = list(self.cameras.values())
        out = []
        for h in handles:
            s = self._last_stats.get(h.id, {})
            out.append({**self.public(h.config), "state": s.get("state"), "published": s.get("published"),
                        "added_by": h.added_by})
        return out

    def export_cameras(self) -> dict:
        """The running set as the cameras: section of a config; credentials as ${VAR} (see camera_export)."""
        with self._lock:
            configs = [h.config for h in self.cameras.values()]
        cameras, variables = export_cameras(configs, self.config._written_urls)
        return {"cameras": cameras, "variables": variables, "yaml": export_yaml(cameras, variables)}

    def public(self, cam: CameraConfig) -> dict:
        data = cam.as_json()
        return {**data, "id": cam.id, "url": redact_url(cam.url), "heads": cam.heads or list(self.model_heads)}

    # -- helpers -------------------------------------------------------------------------------------------
    def _audit(self, type_: str, cam: CameraConfig, by: str, **fields: Any) -> None:
        url = redact_url(cam.url)
        self.events.publish_event(event_message(type_, cam.id, by=by, url=url, **fields))
        verb = type_.removeprefix("camera_")
        detail = f" ({', '.join(fields['changes'])})" if "changes" in fields else ""
        if fields.get("undelivered"):
            detail += f" ({fields['undelivered']} of its messages not delivered to Redis: lost)"
        self.say(f"Camera {cam.id} {verb} by {by}: {url}{detail}")

    def retire_pending(self) -> None:
        """The control loop's retry of removals whose next track ids Redis did not take: kept now, the status goes.
        One added again meanwhile (or being added) goes on from that status itself, and is retired at its own
        removal. Until the first failure, then after a back-off (a frozen Redis cost each a 2 s timeout a tick)."""
        if not self._unretired or time.monotonic() < self._retire_at:
            return
        with self._lock:
            for cid in [c for c in self._unretired if c in self.cameras]:
                del self._unretired[cid]
            # one in _busy is being added again, or its removal is still under way (retried once that is done)
            pending = {cid: ids for cid, ids in self._unretired.items() if cid not in self._busy}
        for cid, ids in pending.items():
            if not self._retire_in_redis(cid, ids, quiet=True):
                self._retire_failures += 1
                self._retire_at = time.monotonic() + min(60.0, 2.0 ** self._retire_failures)
                return
            self._retire_failures = 0
            with self._lock:
                done = self._unretired.pop(cid, None) is not None and cid not in self.cameras and cid not in self._busy
            if done:
                self.events.remove_status(cid)

    def _retire_in_redis(self, camera_id: str, next_ids: dict | None, quiet: bool = False) -> bool:
        """Keeps the removed camera's next track ids, so that one added again under its id goes on from them:
        per head the highest of its final stats' (none when its process had crashed or was restarting), its
        last status' and an earlier removal's (in Redis, or remembered by this service run). Deletes its snapshot
        and zone/line counts, what a camera shows now, of one that is no more (they stayed for every id ever
        removed, ~100 KB each); its detections stream stays, which consumers may still be reading."""
        retired_key = retired_track_ids_key(self.redis_settings.prefix)
        # Remembered for this service run as well, Redis or not (App._create hands them to the camera added again):
        # a Redis without persistence that restarted had lost them, and that camera numbered from 0 again.
        with self._lock:
            remembered = merge_next_ids(self._retired_ids.setdefault(camera_id, {}), _next_ids(next_ids)).copy()
        try:
            client = redis.Redis.from_url(self.redis_settings.url, socket_connect_timeout=2, socket_timeout=2)
            try:
                status, before = client.hget(keys(self.redis_settings.prefix).cameras, camera_id), \
                    client.hget(retired_key, camera_id)
                merged: dict[str, int] = {}
                for ids in (remembered, _next_ids(status, "track_ids_next"), _next_ids(before)):
                    merge_next_ids(merged, ids)
                with self._lock:
                    merge_next_ids(self._retired_ids[camera_id], merged)
                if merged:
                    client.hset(retired_key, camera_id, json.dumps(merged))
                k = keys(self.redis_settings.prefix)
                client.delete(k.snapshot(camera_id), k.counts(camera_id))
            finally:
                client.close()
        except (redis.RedisError, OSError, ValueError) as e:  # rare (Redis down right now); the log says so
            if not quiet:
                log.warning("camera %s: could not keep its track ids or delete its snapshot (retried while the "
                            "service runs): %s", camera_id, redact_text(str(e), [self.redis_settings.url]))
            return False
        return True

    def _end_undrained(self, name: str) -> None:
        """The process ``name`` was killed: the cameras removed from it earlier while it hung (their stop not
        answered, the process let live for the others: ``_undrained``) whose drain has not answered since never end
        their tracks but here (a second removal killed it seconds or minutes after the first)."""
        with self._lock:
            left = self._undrained.pop(name, {})
        for camera_id, (status, stop) in left.items():
            try:  # answered meanwhile: its drain ended them
                drained = "open_tracks" in (ray.get(stop, timeout=0) or {})
            except Exception:  # still not (killed now), or failed: none ended
                drained = False
            if not drained and (ended := self._end_left_open(camera_id, status)):
                log.info("camera %s (removed before): the %d track(s) its last status named open ended (its process "
                         "was killed before it drained)", camera_id, len(ended))

    def _awaiting_restart(self, handle: Any) -> bool:
        """Whether Ray re-created the camera's process and the control loop has not started the camera again."""
        try:
            return ray.get(handle.process.stats.remote(handle.id), timeout=5).get("state") == "created"
        except Exception:  # no answer: nothing to tell
            return False

    def _wait_gone(self, handle: Any, timeout_s: float = 10.0) -> None:
        """Until Ray has released the actor's name, so the same id can be added again at once (one added while Ray
        still holds it starts under a suffixed name: App._name_held)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get_actor(handle.name, namespace=self.placement.namespace if self.placement else None)
            except ValueError:
                return
            time.sleep(0.05)
        log.warning("camera %s: Ray still holds the name %s %g s after its process was killed; a camera added "
                    "again meanwhile takes another", handle.id, handle.name, timeout_s)


def _warnings(*said: str | None) -> dict:
    """An answer's "warnings" (what was accepted but will not work as the caller may think), where there are any."""
    return {"warnings": [w for w in said if w]} if any(said) else {}


def _count(value: Any) -> int | None:
    """A count as an event carries it (an integer, at least 0), or None: a status edited by hand or of another
    version must not fail the removal."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _next_ids(raw: Any, field: str | None = None) -> dict[str, int]:
    """Next track id per head from final stats or a Redis entry (JSON, ``field`` of it); {} for anything else:
    an entry edited by hand raised in the middle of a removal, which then never let the camera's process go."""
    try:
        data = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        if field is not None:
            data = data.get(field) if isinstance(data, dict) else None
        return {str(head): int(n) for head, n in data.items()} if isinstance(data, dict) else {}
    except (ValueError, TypeError, OverflowError):
        return {}
