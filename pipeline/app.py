"""The controller: Redis (or an embedded one), Ray, the inference replicas and one StreamActor per camera;
watches them, shows status, and shuts everything down cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from models.checkpoint import CheckpointError, read_metadata
from pipeline.config import Config, ConfigError
from pipeline.embedded_redis import EmbeddedRedis, reachable
from pipeline.errors import UserError
from pipeline.reaper import Reaper
from workers.analytics_settings import analytics_errors
from workers.inference import InferenceActor
from workers.publish import Publisher, event_message
from workers.redact import redact_text, redact_url
from workers.settings import CameraConfig, RedisConfig
from workers.stream import StreamActor, publisher_for

# A letterboxed frame (3x256x448 uint8, 344 KB) travels inside the actor call instead of through the
# object store (Ray's default limit is 100 KB): measured 1.4 -> 0.3 ms of raylet/GCS CPU per frame and +4%
# frames/s with 8 cameras on 2 cores (benchmarks/README.md). A Ray cluster needs the same setting at `ray start`.
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 2 * 2**20}

log = logging.getLogger(__name__)

REDIS_URL_ENV = "HYDRAVISION_REDIS_URL"


@dataclass
class CameraHandle:
    id: str
    config: CameraConfig
    actor: Any
    done: Any = None  # ObjectRef of actor.wait(), ready when the camera's source has ended
    final: dict | None = None
    restarts: int = 0


@dataclass
class App:
    config: Config
    redis_url: str | None = None  # overrides config and environment
    say: Callable[[str], None] = print
    cameras: dict[str, CameraHandle] = field(default_factory=dict)
    inference: list = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    embedded: EmbeddedRedis | None = None
    started_ray: bool = False
    events: Publisher | None = None  # the controller's own events (worker_restarted)
    inference_pids: list = field(default_factory=list)
    # Names this run in every camera status it writes, so readers can tell its entries from a dead run's.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    redis_settings: RedisConfig | None = None  # config.redis with the URL resolved
    reaper: Reaper | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _signals_installed: bool = False

    # -- start -------------------------------------------------------------------------------
    def resolve_redis(self) -> str:
        url = self.redis_url or os.environ.get(REDIS_URL_ENV) or self.config.redis.url
        if url is None:
            self.embedded = EmbeddedRedis().start()
            self.say(f"Redis: no URL configured, started an embedded redis-server at {self.embedded.url} "
                     f"(read it with: hydravision tail CAMERA --redis-url {self.embedded.url})")
            return self.embedded.url
        if not reachable(url):
            self.say(f"Redis at {redact_url(url)} is not reachable yet; publishers will retry and buffer "
                     f"up to {self.config.redis.buffer} messages per camera")
        else:
            self.say(f"Redis: {redact_url(url)}")
        return url

    def check_model(self) -> dict:
        path = self.config.model.checkpoint_path()
        try:
            meta = read_metadata(path)
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint: {e}") from None
        heads = {name: spec["classes"] for name, spec in meta["config"]["heads"].items()}
        for i, cam in enumerate(self.config.cameras):
            unknown = [h for h in (cam.heads or []) if h not in heads]
            if unknown:
                raise ConfigError(f"cameras[{i}].heads: unknown heads {unknown} for camera {cam.id!r} "
                                  f"(the model {path.name} has {list(heads)})")
            problems = analytics_errors(cam.zones, cam.lines, cam.heads, heads)  # zones/lines vs the model
            if problems:
                raise ConfigError("\n".join(f"cameras[{i}].{p}" for p in problems))
        return heads

    def start_ray(self) -> None:
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from an offline service
        rc = self.config.ray
        if rc.address == "local":
            ray.init(num_cpus=rc.num_cpus or os.cpu_count(), include_dashboard=False,
                     object_store_memory=rc.object_store_mb * 2**20, _node_ip_address="127.0.0.1",
                     logging_level=logging.WARNING, configure_logging=True, log_to_driver=True,
                     _system_config=RAY_SYSTEM_CONFIG)
        else:
            ray.init(address=rc.address, logging_level=logging.WARNING, log_to_driver=True)
        self.started_ray = True
        self._reinstall_signal_handlers()

    def start(self) -> None:
        if not self.config.cameras:
            raise ConfigError("cameras: no cameras configured")
        self.check_model()
        # First, before any child process exists: whatever this run starts dies with it, even on SIGKILL.
        self.reaper = Reaper.start()
        redis_url = self.resolve_redis()
        self.start_ray()
        ic, mc = self.config.inference, self.config.model
        gpus = ic.num_gpus if ic.num_gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
        for i in range(ic.replicas):
            actor = InferenceActor.options(num_cpus=0, num_gpus=gpus, name=f"hv-inference-{i}",
                                           lifetime=None).remote(
                str(mc.checkpoint_path()), mc.device, mc.precision, ic.max_batch, ic.max_wait_ms, ic.threads,
                mc.score_threshold, mc.compile, ic.max_pending, ic.max_pending_per_camera)
            self.inference.append(actor)
        self.model_info = ray.get(self.inference[0].info.remote(), timeout=120)
        self.inference_pids = ray.get([a.ping.remote() for a in self.inference], timeout=120)
        self.say(f"Model: {mc.checkpoint_path().name} on {self.model_info['device']} "
                 f"({self.model_info['autocast']}), heads {self.model_info['heads']}, "
                 f"{ic.replicas} inference replica(s), batches up to {ic.max_batch} / {ic.max_wait_ms} ms")
        self.redis_settings = self.config.redis.model_copy(update={"url": redis_url})
        self.events = publisher_for(self.redis_settings, name="hydravision-controller").start()
        self.add_cameras(self.config.cameras)

    def add_cameras(self, cams: list[CameraConfig]) -> None:
        """Starts one StreamActor per camera, all at once: each is a process, and starting 20 of them one
        after the other takes minutes on a small machine; together they overlap their imports."""
        spawned = []
        for cam in cams:
            actor = StreamActor.options(name=f"hv-camera-{cam.id}").remote(
                cam, self.inference, self.model_info, self.redis_settings, self.instance)
            spawned.append((cam, actor, actor.start.remote()))
        budget_s = 60 + 5 * len(cams)
        deadline = time.monotonic() + budget_s
        for cam, actor, started in spawned:
            try:
                ray.get(started, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise UserError(f"camera {cam.id}: its stream actor did not start within "
                                   f"{budget_s} s (is the Ray cluster short of CPUs or memory?)") from None
            self.cameras[cam.id] = CameraHandle(cam.id, cam, actor, actor.wait.remote())
            self.say(f"Camera {cam.id}: {redact_url(cam.url)} heads={cam.heads or list(self.model_info['heads'])}")

    # -- run ---------------------------------------------------------------------------------
    def stats(self, timeout: float = 5.0) -> list[dict]:
        """Per-camera stats; also restarts cameras whose actor Ray has restarted, and reports restarts."""
        refs = {cid: h.actor.stats.remote() for cid, h in self.cameras.items()}
        out = []
        for cid, ref in refs.items():
            try:
                s = ray.get(ref, timeout=timeout)
            except Exception as e:  # an actor being restarted: show it, don't stop the loop
                out.append({"camera": cid, "state": "unavailable", "last_error": self._describe(e, cid)})
                log.debug("camera %s: stats unavailable", cid, exc_info=True)
                continue
            if s.get("state") == "created" and not self._stop.is_set():
                s = self._restart_camera(self.cameras[cid]) or s
            out.append(s)
        self._check_inference()
        return out

    def _restart_camera(self, h: CameraHandle) -> dict | None:
        """Ray re-ran the actor's constructor after a crash; give it its camera again."""
        try:
            ray.get(h.actor.start.remote(), timeout=30)
        except Exception as e:
            log.warning("camera %s: restart failed: %s", h.id, self._describe(e, h.id), exc_info=True)
            return None
        h.restarts += 1
        h.done = h.actor.wait.remote()
        self._report_restart("stream", h.id, f"stream actor of camera {h.id} crashed and was restarted")
        return ray.get(h.actor.stats.remote(), timeout=10)

    def _check_inference(self) -> None:
        for i, actor in enumerate(self.inference):
            try:
                pid = ray.get(actor.ping.remote(), timeout=2)
            except Exception:  # restarting right now; the next tick will see the new process
                continue
            if i < len(self.inference_pids) and pid != self.inference_pids[i]:
                self.inference_pids[i] = pid
                self._report_restart("inference", "*", f"inference replica {i} crashed and was restarted")

    def _describe(self, exc: BaseException, camera: str) -> str:
        """An exception as one line with its cause (Ray wraps the actor's own error), credentials masked."""
        cause = getattr(exc, "cause", None) or exc
        text = f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
        return redact_text(text, [self.cameras[camera].config.url] if camera in self.cameras else [])

    def _report_restart(self, worker: str, camera: str, reason: str) -> None:
        self.say(f"{reason}")
        if self.events:
            self.events.publish_event(event_message("worker_restarted", camera, worker=worker, reason=reason))

    def finished(self) -> bool:
        """True when every camera's source has ended (files); a crashed actor is not an ended camera."""
        pending = [h for h in self.cameras.values() if h.done is not None]
        if not pending:
            return False
        ready, _ = ray.wait([h.done for h in pending], num_returns=len(pending), timeout=0)
        if len(ready) < len(pending):
            return False
        for h in pending:
            try:
                ray.get(h.done, timeout=0)
            except Exception:  # the actor died; Ray restarts it and stats() re-arms it
                h.done = None
                return False
        return True

    def run(self, duration: float | None = None, on_tick: Callable[[list[dict]], None] | None = None,
            interval: float | None = None) -> list[dict]:
        """Runs until ``duration`` seconds pass, every camera's source has ended, or stop() is called."""
        interval = interval or self.config.status.interval_s
        deadline = time.monotonic() + duration if duration else None
        while not self._stop.is_set():
            if deadline and time.monotonic() >= deadline:
                break
            if self.finished():
                break
            stats = self.stats()
            if on_tick:
                on_tick(stats)
            wait = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            self._stop.wait(wait)
        return self.stats()

    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: drain and stop cleanly. Second: exit at once."""
        def handler(signum: int, _frame: Any) -> None:
            if self._stop.is_set():
                os._exit(128 + signum)
            self.say(f"{signal.Signals(signum).name}: draining in-flight frames and flushing Redis "
                     "(send it again to exit at once)")
            self._stop.set()
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
        finals = []
        refs = {cid: h.actor.stop.remote(drain=drain) for cid, h in self.cameras.items()}
        for cid, ref in refs.items():
            try:
                final = ray.get(ref, timeout=timeout)
            except Exception as e:
                final = {"camera": cid, "state": "unavailable", "last_error": self._describe(e, cid)}
                log.warning("camera %s: no final stats", cid, exc_info=True)
            self.cameras[cid].final = final
            finals.append(final)
        for h in self.cameras.values():
            ray.kill(h.actor, no_restart=True)
        for actor in self.inference:
            ray.kill(actor, no_restart=True)
        if self.events:
            self.events.close(5.0)
        if self.started_ray:
            ray.shutdown()
            self._reinstall_signal_handlers()
        if self.embedded:
            self.embedded.stop()
        if self.reaper:
            self.reaper.release()  # everything is down: nothing left for it to clean up
        return finals
