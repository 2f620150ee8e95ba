"""Prometheus metrics, liveness and readiness of a running service: ``/metrics``, ``/healthz``, ``/readyz``.

The numbers come from every actor's stats(), which the controller polls on each tick of its loop anyway
(pipeline/telemetry.py keeps them and makes their counters survive actor restarts); a prometheus-client
Collector turns the latest of them into metric families at scrape time. A scrape therefore never waits on
an actor and costs no Ray call; its values are at most one status interval old. Why not Ray's own metrics
export: see docs/architecture.md "Metrics".

Labels are camera ids (validated: letters, digits, '_-.'), head names, roles, outcomes and reasons: never a
URL, so no credential can reach a label.

The HTTP server belongs to the control API: ``App.api_extensions`` holds ``include_metrics`` by default, so
these routes are served whenever the API is on (api.port, --api-port).
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pipeline.telemetry import DROP_OUTCOMES, REJECT_REASONS, Snapshot, Telemetry
from workers.histograms import (BATCH_SECONDS_BUCKETS, BATCH_SIZE_BUCKETS, BATCH_WAIT_BUCKETS, FRAME_AGE_BUCKETS,
                                HEAD_SECONDS_BUCKETS, cumulative, from_counts, merge)
from workers.redact import redact_text

if TYPE_CHECKING:
    from pipeline.app import App

OUTCOMES = ("published", "skipped", *DROP_OUTCOMES, "lost")  # skipped: the motion gate saw no motion


def answered(replica: object) -> bool:
    """Did this inference replica answer the controller's latest call?"""
    return bool(getattr(replica, "answering", False))


def _histogram(family: HistogramMetricFamily, labels: list[str], snapshot: dict | None) -> None:
    if snapshot is None:
        return
    buckets = [(floatToGoString(le), n) for le, n in cumulative(snapshot)]
    family.add_metric(labels, buckets, sum_value=snapshot["sum"])


class HydravisionCollector(Collector):
    """Builds every hydravision_* family from a Telemetry snapshot (see the module docstring)."""

    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        snap = self.telemetry.snapshot()
        yield from self._cameras(snap)
        yield from self._inference(snap)
        yield from self._redis(snap)
        restarts = CounterMetricFamily("hydravision_actor_restarts_total",
                                       "Actor processes Ray restarted after a crash, by role (stream: one for all "
                                       "the cameras of a process; inference)", labels=["role"])
        for role, n in sorted(snap.restarts.items()):
            restarts.add_metric([role], n)
        yield restarts

    def _cameras(self, snap: Snapshot) -> Iterator[Metric]:
        decoded = CounterMetricFamily("hydravision_frames_decoded_total", "Frames decoded, per camera",
                                      labels=["camera"])
        frames = CounterMetricFamily(
            "hydravision_frames_total", "Decoded frames by outcome: published, or not analysed (skipped: "
            "nothing moved; rate: the camera's fps; budget: its frame-age budget lowered the rate), or dropped (overload, error, "
            "shutdown, lost: held by an actor that crashed); decoded = sum of outcomes + pending",
            labels=["camera", "outcome"])
        pending = GaugeMetricFamily("hydravision_frames_pending", "Decoded frames without an outcome yet "
                                    "(waiting in the camera's slot or in inference)", labels=["camera"])
        age = HistogramMetricFamily("hydravision_frame_age_seconds", "Age of published frames, capture to "
                                    "publish", labels=["camera"])
        up = GaugeMetricFamily("hydravision_camera_up", "1 when the camera's stream is being read", labels=["camera"])
        reconnects = CounterMetricFamily("hydravision_camera_reconnects_total",
                                         "Reconnects and decoder restarts, per camera", labels=["camera"])
        packets = CounterMetricFamily("hydravision_camera_skipped_packets_total", "Packets that failed to decode "
                                      "and were skipped, and pictures decoded damaged (concealed, still analysed): "
                                      "lost RTP packets, a damaged file; per camera", labels=["camera"])
        fps = GaugeMetricFamily("hydravision_camera_fps", "Frames published per second (frames of the last 5 s over their capture span)", labels=["camera"])
        target = GaugeMetricFamily("hydravision_camera_target_fps", "Frames per second the camera analyses at "
                                   "most: its fps setting, or lower while its frame-age budget is exceeded "
                                   "(absent: every frame)", labels=["camera"])
        last = GaugeMetricFamily("hydravision_camera_last_frame_timestamp_seconds",
                                 "Unix time of the camera's last decoded frame", labels=["camera"])
        budget = GaugeMetricFamily("hydravision_frame_age_budget_seconds", "The camera's max_frame_age_ms",
                                   labels=["camera"])
        actions = CounterMetricFamily("hydravision_budget_actions_total", "Actions of a camera's frame-age budget "
                                      "(batch_wait, fps, min_fps, fps_up, restored)", labels=["camera", "action"])
        for cid, rec in sorted(snap.cameras.items()):
            s, c = rec.stats, rec.counters
            up.add_metric([cid], 1.0 if s.get("state") == "running" else 0.0)
            if not c.keys():
                continue  # never reported counters yet (starting, or unavailable since the start)
            decoded.add_metric([cid], c.value("decoded"))
            for outcome in OUTCOMES:
                n = rec.lost if outcome == "lost" else c.value(f"outcome.{outcome}")
                frames.add_metric([cid, outcome], n)
            held = max(0.0, c.value("decoded") - sum(c.value(f"outcome.{o}") for o in OUTCOMES if o != "lost")
                       - rec.lost)
            pending.add_metric([cid], held)
            _histogram(age, [cid], c.histogram("age", FRAME_AGE_BUCKETS))
            reconnects.add_metric([cid], c.value("reconnects"))
            packets.add_metric([cid], c.value("skipped_packets"))
            if s.get("fps") is not None:
                fps.add_metric([cid], float(s["fps"]))
            if s.get("target_fps"):
                target.add_metric([cid], float(s["target_fps"]))
            if rec.last_frame_ts:  # kept while its actor is unavailable or its decoder replaced: staleness alerts
                last.add_metric([cid], float(rec.last_frame_ts))
            if s.get("budget"):
                budget.add_metric([cid], s["budget"]["max_frame_age_ms"] / 1000)
            for key in sorted(k for k in c.keys() if k.startswith("budget.")):
                actions.add_metric([cid, key.split(".", 1)[1]], c.value(key))
        yield from (decoded, frames, pending, age, up, reconnects, packets, fps, target, last, budget, actions)

    def _inference(self, snap: Snapshot) -> Iterator[Metric]:
        replicas = list(snap.replicas.values())
        up = GaugeMetricFamily("hydravision_inference_replicas_up", "Models (inference replicas, or camera "
                               "processes running the model themselves) that answered the controller's latest call")
        up.add_metric([], sum(answered(r) for r in replicas))
        yield up
        counters = [r.counters for r in replicas] + [snap.retired]  # models that have gone still count
        if not any(c.keys() for c in counters):
            return
        sizes = HistogramMetricFamily("hydravision_inference_batch_size", "Frames per batch the model ran")
        sizes_by = {}
        for c in counters:
            for key in c.keys():
                if key.startswith("bs."):
                    size = int(key[3:])
                    sizes_by[size] = sizes_by.get(size, 0) + int(c.value(key))
        _histogram(sizes, [], from_counts(sizes_by, BATCH_SIZE_BUCKETS))
        yield sizes
        wait = HistogramMetricFamily("hydravision_inference_batch_wait_seconds",
                                     "Time a frame waited in the inference queue for its batch to start")
        _histogram(wait, [], merge(c.histogram("wait", BATCH_WAIT_BUCKETS) for c in counters))
        yield wait
        seconds = HistogramMetricFamily("hydravision_inference_batch_seconds",
                                        "Time the model took per batch (backbone, heads, decoding, NMS)")
        _histogram(seconds, [], merge(c.histogram("bsec", BATCH_SECONDS_BUCKETS) for c in counters))
        yield seconds
        heads = sorted({k.split(".")[1] for c in counters for k in c.keys() if k.startswith("head.")})
        head_seconds = HistogramMetricFamily("hydravision_head_seconds", "Time of one head's forward pass per "
                                             "batch (the frames of the batch that asked for it; torch backend "
                                             "only)", labels=["head"])
        head_frames = CounterMetricFamily("hydravision_head_frames_total", "Frames each head ran on", labels=["head"])
        for head in heads:
            _histogram(head_seconds, [head], merge(c.histogram(f"head.{head}", HEAD_SECONDS_BUCKETS)
                                                   for c in counters))
            head_frames.add_metric([head], sum(c.value(f"head_frames.{head}") for c in counters))
        yield head_seconds
        yield head_frames
        depth = GaugeMetricFamily("hydravision_queue_depth", "Frames waiting in the inference queues for a batch")
        depth.add_metric([], sum(r.stats.get("queue_depth", 0) or 0 for r in replicas))
        yield depth
        limit = GaugeMetricFamily("hydravision_inference_batch_limit", "The largest batch a model takes now "
                                  "(it grows while larger batches run faster per frame); replica: its index, or "
                                  "the camera process's name", labels=["replica"])
        for key, r in sorted(snap.replicas.items()):
            if "batch_limit" in r.stats:
                limit.add_metric([str(key)], r.stats["batch_limit"])
        yield limit
        rejected = CounterMetricFamily("hydravision_inference_rejected_total", "Frames the inference queue "
                                       "answered without computing them, by reason", labels=["reason"])
        for reason in REJECT_REASONS:
            if any(f"rejected.{reason}" in c.keys() for c in counters):
                rejected.add_metric([reason], sum(c.value(f"rejected.{reason}") for c in counters))
        yield rejected

    def _redis(self, snap: Snapshot) -> Iterator[Metric]:
        errors = CounterMetricFamily("hydravision_redis_errors_total", "Failed Redis write attempts (each is "
                                     "retried), by publisher: a camera id or '_controller' (the controller's "
                                     "events)", labels=["publisher"])
        dropped = CounterMetricFamily("hydravision_redis_messages_dropped_total", "Messages dropped because the "
                                      "buffer for an unreachable Redis was full", labels=["publisher"])
        for cid, rec in sorted(snap.cameras.items()):
            if rec.counters.keys():
                errors.add_metric([cid], rec.counters.value("redis.errors"))
                dropped.add_metric([cid], rec.counters.value("redis.dropped"))
        for name, stats in sorted(snap.publishers.items()):
            errors.add_metric([name], stats.get("retries", 0))
            dropped.add_metric([name], stats.get("dropped", 0))
        yield errors
        yield dropped


# -- health and readiness --------------------------------------------------------------------------------

class RedisProbe:
    """PINGs the service's Redis for /readyz: a short timeout, and the answer cached briefly so that a storm of
    probes costs one round trip per ``cache_s``."""

    def __init__(self, url: str, timeout_s: float = 1.0, cache_s: float = 0.5):
        import redis  # here: the HTTP side only needs it when it probes
        from redis.connection import parse_url

        self.url, self.cache_s = url, cache_s
        # The probe's timeouts and one try, whatever the URL's query says: from_url lets a ?socket_timeout= (set for
        # the writers) or ?retry_on_timeout= win, and /readyz waited that long on a frozen Redis, the other probes
        # queued behind the lock. No retries otherwise (redis-py 8): a stopped server fails at once.
        options = {**parse_url(url), "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
                   "retry_on_timeout": False, "retry_on_error": []}
        self.client = redis.Redis(connection_pool=redis.ConnectionPool(**options))
        self._errors = (redis.RedisError, OSError)
        self._lock = threading.Lock()
        self._cached: tuple[float, bool, str | None] | None = None

    def check(self) -> tuple[bool, str | None]:
        with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.cache_s:
                return self._cached[1], self._cached[2]
            try:
                ok, error = bool(self.client.ping()), None
            except self._errors as e:
                ok, error = False, redact_text(f"{type(e).__name__}: {e}", [self.url])
            self._cached = (time.monotonic(), ok, error)
            return ok, error


def health(app: App) -> tuple[bool, dict]:
    """Liveness: the process answers, and its control loop (which restarts actors and feeds the metrics) has
    ticked recently. Not ready is not unhealthy: a missing Redis or camera never fails /healthz."""
    now = app.telemetry.clock()
    last = app.telemetry.last_tick
    limit = max(30.0, 10 * app.config.status.interval_s)
    if last is None:
        return True, {"control_loop": "not started yet"}
    age = now - last
    return age <= limit, {"control_loop_age_s": round(age, 2), "control_loop_limit_s": limit}


def ready(app: App, probe: RedisProbe | None = None) -> tuple[bool, dict]:
    """Readiness: Redis answers a PING, the model is loaded (every inference replica answered the controller's
    latest call), and every enabled camera is up, or down (starting, reconnecting) for no longer than its
    ``stall_timeout`` (3 x read_timeout_s + open_timeout_s by default), and never less than open_timeout_s +
    read_timeout_s. A file camera whose file has ended is done, not failing. A service shutting down is not ready."""
    snap = app.telemetry.snapshot()
    checks: dict[str, dict] = {}
    if probe is None and app.redis_settings and app.redis_settings.url:
        probe = RedisProbe(app.redis_settings.url)
    if probe is None:
        checks["redis"] = {"ok": False, "error": "no Redis configured yet"}
    else:
        ok, error = probe.check()
        checks["redis"] = {"ok": ok} if ok else {"ok": False, "error": error}
    replies = [answered(snap.replicas.get(key)) for key in app.model_holders()]
    # Where the camera processes run the model, it loads with their cameras: with none yet there is nothing to wait
    # for (a service started empty on CPUs answered 503 until a first camera came, through the API that 503 gated).
    none_needed = not replies and getattr(app, "in_camera_process", False)
    checks["model"] = {"ok": bool(app.model_info) and (none_needed or bool(replies) and all(replies)),
                       "replicas": len(replies), "answering": sum(replies)}
    cameras: dict[str, dict] = {}
    for cid, handle in list(app.cameras.items()):
        if not getattr(handle.config, "enabled", True):
            continue
        rec = snap.cameras.get(cid)
        state = rec.stats.get("state") if rec else "unknown"
        down_for = 0.0 if rec is None else (snap.taken_at - rec.down_since if rec.down_since is not None else 0.0)
        # An open may take its whole timeout and the first picture its read timeout before the capture's watchdog
        # counts a stall (workers/capture.py): a stall_timeout_s set shorter read a camera still opening not ready.
        cfg = handle.config
        grace = max(cfg.stall_timeout, cfg.open_timeout_s + cfg.read_timeout_s)
        ok = state in ("running", "ended") or (state not in ("failed", "stopped") and down_for <= grace)
        # stall_timeout_s: .inf is no number in JSON (the whole answer failed: 500)
        cameras[cid] = {"ok": ok, "state": state, "down_for_s": round(down_for, 1),
                        "grace_s": grace if math.isfinite(grace) else None}
    # None yet is ready: a service started empty waits for its first camera through the API it serves (an
    # orchestrator's readiness gate in front of that API kept it unreachable)
    checks["cameras"] = {"ok": all(c["ok"] for c in cameras.values()), "cameras": cameras}
    stopping = app.stopping
    ok = not stopping and all(c["ok"] for c in checks.values())
    return ok, {"checks": checks, **({"stopping": True} if stopping else {})}


# -- HTTP --------------------------------------------------------------------------------------------------

def metrics_registry(telemetry: Telemetry) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one): several services in one process (tests)
    do not collide. It also exports the controller's process_* metrics (CPU, memory, open files)."""
    registry = CollectorRegistry()
    registry.register(HydravisionCollector(telemetry))
    ProcessCollector(registry=registry)
    return registry


def metrics_router(app: App, auth: Callable[..., Any] | None = None) -> APIRouter:
    """GET /metrics (Prometheus text), /healthz and /readyz (JSON; 200 when ok, else 503). ``auth``: a FastAPI
    dependency /metrics requires (the control API's bearer token); the probes stay open."""
    registry = metrics_registry(app.telemetry)
    probes: dict[str, RedisProbe] = {}
    router = APIRouter()

    def probe() -> RedisProbe | None:
        url = app.redis_settings.url if app.redis_settings else None
        if url and url not in probes:
            probes[url] = RedisProbe(url)
        return probes.get(url) if url else None

    # Plain def: FastAPI runs them in its thread pool, so a slow PING never blocks the event loop.
    @router.get("/metrics", dependencies=[Depends(auth)] if auth else [])
    def metrics(request: Request) -> Response:
        # The format the scraper asks for: Prometheus text 0.0.4 by default, OpenMetrics when accepted.
        try:
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
        except (TypeError, ValueError):  # a version that is no number (version=abc, version="1.0.0"): prometheus-
            # client compares its parts with ints and raises; the default format, not a 500 that loses the scrape
            encode, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        return Response(encode(registry), headers={"Content-Type": content_type})

    # While the App starts (App.starting: Ray, the model, the cameras; seconds to minutes), the API already answers:
    # alive (the start has budgets of its own and fails the run past them), not ready, and nothing else to check yet.
    @router.get("/healthz")
    def healthz() -> JSONResponse:
        if getattr(app, "starting", False):
            return JSONResponse({"ok": True, "starting": True})
        ok, details = health(app)
        return JSONResponse({"ok": ok, **details}, status_code=200 if ok else 503)

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        if getattr(app, "starting", False):
            return JSONResponse({"ok": False, "starting": True, **({"stopping": True} if app.stopping else {})},
                                status_code=503)
        ok, details = ready(app, probe())
        return JSONResponse({"ok": ok, **details}, status_code=200 if ok else 503)

    for path, probe_route in (("/healthz", healthz), ("/readyz", readyz)):  # uptime monitors probe with HEAD: a
        router.add_api_route(path, probe_route, methods=["HEAD"], include_in_schema=False)  # 405 read as down

    return router


def include_metrics(api: FastAPI, app: App) -> None:
    """Mounts /metrics, /healthz and /readyz on the control API (an ``extensions`` entry of build_api). With
    tokens configured, /metrics needs one like the /cameras routes (``api.state.auth``): it names every camera
    and its load, and Prometheus sends a bearer token natively (scrape_config ``authorization``). Orchestrator
    probes carry no token, and the probes' answers hold nothing a control route guards."""
    api.include_router(metrics_router(app, getattr(api.state, "auth", None)))
