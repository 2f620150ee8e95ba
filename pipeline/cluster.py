"""Ray for the controller: start a local Ray or join a cluster, create the actors where ``pipeline/placement.py``
says, ship the checkpoint to the nodes, and notice lost nodes (``node_lost`` events; ``worker_restarted``
says where a worker moved).

``pipeline/app.py`` calls into this module only where it starts Ray and creates actors, so the controller's
lifecycle code stays the same on one machine and on a cluster.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import psutil
import ray

from pipeline.config import absolute_path_url
from pipeline.errors import UserError
from pipeline.limits import raise_open_files_limit
from pipeline.logs import say_at
from pipeline.placement import (Node, ReplicaAssigner, alive_nodes, check_placeable, demand, describe_needs, fits,
                                group_cameras, inference_options, local_cpus, model_in_camera_process, namespace_for,
                                node_needs, replica_count, replica_gpus, replica_room, replicas_per_node,
                                stream_options)
from workers.cores import usable_cores
from workers.publish import event_message
from workers.redact import redact_url
from workers.settings import CameraConfig, refused_setting

log = logging.getLogger(__name__)
# How long a status tick waits for Ray's node list (Ray's own timeout is ~60 s: a slow or restarting GCS held the
# tick, so /metrics, /healthz and the status hash, that long at every poll).
NODES_ANSWER_S = 1.0
# What a local ray.init starts first, by process name: the start cannot finish once one of them has ended
RAY_CORE_PROCESSES = ("gcs_server", "raylet")
# This project's top-level packages (pyproject.toml, packages.find). Ray puts the driver's working directory first
# on every worker's sys.path (ray/_private/worker.py, connect(): py_driver_sys_path), so a folder of the user's
# holding a package of the same common name (an ML project's models/) was imported in the camera processes instead
# and every camera failed; imported as each worker starts (Ray's preload_python_modules, before that path is
# added), they are this installation's whatever the working directory, and what they import after is too.
OWN_PACKAGES = ("pipeline", "workers", "models", "synthetic")
# What a start with model.compile: true needs of ray.placement_timeout_s on a CPU (README, after "Backends")
COMPILE_PLACEMENT_TIMEOUT_S = 600


def init_ray(config: Any, system_config: dict) -> None:
    """Starts a private local Ray (``ray.address: local``) or joins the cluster at ``ray.address`` /
    ``$RAY_ADDRESS``; the pipeline's namespace becomes the driver's."""
    raise_open_files_limit()  # before Ray starts processes: they inherit it (ray.init's own stops at 65536)
    rc = config.ray
    address = rc.resolved_address()
    namespace = namespace_for(rc.namespace, config.redis.prefix)
    if address == "local":
        replicas = replica_count(config.inference, "cpu", 0.0, None)  # the most it can become (no GPU known yet)
        cpus = rc.num_cpus or max(usable_cores(), local_cpus(rc, replicas, len(config.cameras)))
        # The cameras' processes all reserve theirs at start: with fewer logical CPUs the last ones never start,
        # and the start waits its whole budget for them. (Replicas not counted: in the camera processes none starts.)
        if rc.num_cpus and (need := len(config.cameras) * rc.stream_cpus) > rc.num_cpus + 1e-9:
            raise UserError(f"ray.num_cpus: {rc.num_cpus} logical CPU(s), but the {len(config.cameras)} cameras "
                            f"reserve {need:g} (ray.stream_cpus {rc.stream_cpus:g} each): raise ray.num_cpus or lower "
                            "ray.stream_cpus (unset, ray.num_cpus follows the reservations)")
        # Ray's processes inherit it (glibc reads it at their start): a camera process gives each decoder thread
        # a malloc arena of its own, up to 8 per core, and cameras coming and going left their frames' freed
        # memory behind in them, 150-180 MB per process over 26 add/update/remove cycles; with 2, it stayed flat
        # (docs/architecture.md, "Memory of camera processes"). A value set by the user is kept.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        if warning := unguarded_ray():
            log.warning("%s", warning)
        try:
            with _signals_held() as held:
                try:
                    with _exit_if_ray_killed(held):  # left before the stop below, whose end of Ray is no kill
                        # address="local": never join some other Ray that `ray start` left here (ray.init() would).
                        ray.init(address="local", namespace=namespace, num_cpus=cpus, include_dashboard=False,
                                 object_store_memory=rc.object_store_mb * 2**20, _node_ip_address="127.0.0.1",
                                 logging_level=logging.WARNING, configure_logging=True, log_to_driver=True,
                                 _system_config=_with_own_packages(system_config))
                finally:  # also when ray.init failed: the signal is not lost behind its error
                    _stop_if_signalled(held)
        except ValueError as e:  # what we passed: e.g. an object store larger than the machine's memory
            raise UserError(f"ray: cannot start a local Ray with ray.object_store_mb {rc.object_store_mb} and "
                            f"{cpus} logical CPUs (ray.num_cpus): {e}".splitlines()[0]) from None
        except OSError as e:  # Ray's token setup, before anything starts: it writes ~/.ray/auth_token
            ray_dir, path = os.path.expanduser("~/.ray"), os.path.abspath(os.fsdecode(e.filename or "/"))
            if os.path.commonpath([ray_dir, path]) not in (ray_dir, path) or path == "/":
                raise
            raise UserError(f"ray: cannot start a local Ray: it saves its authentication token in {ray_dir}/auth_token"
                            f" and cannot write {path} ({e.strerror}): run hydravision with a writable HOME, or set "
                            "RAY_AUTH_TOKEN_PATH to a file holding a token of your own (`openssl rand -hex 32`), "
                            "which Ray reads instead") from None
        return
    where = "ray.address" if rc.address else "$RAY_ADDRESS"  # the setting the user has to fix
    _check_head(address, where, rc.placement_timeout_s)
    try:
        with _signals_held() as held:
            try:
                ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=True)
            finally:  # also when ray.init failed: the signal is not lost behind its error
                _stop_if_signalled(held)
    # AuthenticationError: RAY_AUTH_MODE=token and no token here (a wrong one is a ConnectionError, after ~20 s);
    # Rays before token auth have no such class
    except (ConnectionError, RuntimeError, ValueError,
            getattr(ray.exceptions, "AuthenticationError", ConnectionError)) as e:
        if _refused_for_token(e):
            raise UserError(f"{where}: cannot join the Ray cluster at {address!r}: {_token_advice()}") from None
        raise UserError(f"{where}: cannot join the Ray cluster at {address!r}: {e}".splitlines()[0]) from None


def _refused_for_token(error: BaseException | None) -> bool:
    """Whether ray.init failed because the cluster's GCS refused this driver's token (InvalidAuthToken): Ray says
    only "Failed to connect to Ray cluster at ..." after ~20 s, and the GCS's refusal is in the text of the
    RuntimeError it raised that from. (No token at all with RAY_AUTH_MODE=token is Ray's own clear error.)"""
    while error is not None:
        if "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _token_advice() -> str:
    """What to set where the cluster requires Ray's token auth (`ray start --head` turns it on by default)."""
    if (os.environ.get("RAY_AUTH_MODE") or "").strip().lower() != "token":
        # with an explicit address and RAY_AUTH_MODE unset, ray.init sends no token, even with ~/.ray/auth_token
        why = "RAY_AUTH_MODE is not 'token' here, so no token was sent"
    else:
        why = "the token here is not the cluster's"
    return (f"the cluster requires Ray's token authentication and {why}: set RAY_AUTH_MODE=token and the "
            "cluster's token (its head's ~/.ray/auth_token, in ~/.ray/auth_token here or in RAY_AUTH_TOKEN), "
            "as docs/scaling.md ('Token auth') says")


def unguarded_ray() -> str | None:
    """What to say where the local Ray starts without authentication: its node's ports (GCS, raylet, workers)
    listen on every interface, and Ray's token authentication, on by default unless RAY_AUTH_MODE says otherwise
    (Ray's own start-up notice tells how to turn it off), is what guards them."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None or mode.strip().lower() == "token":
        return None
    return (f"RAY_AUTH_MODE={mode}: the local Ray's ports (its GCS, raylet and workers) listen on every interface "
            "without authentication, and whoever reaches this machine can run code in it: unset it, or firewall "
            "the machine")


@contextlib.contextmanager
def _signals_held() -> Iterator[list[BaseException]]:
    """``_int_term_held`` with SIGHUP (and SIGQUIT) blocked in this thread meanwhile: the processes ray.init starts
    here (a local Ray's GCS, raylet and agents, in this process group) inherit the mask, so a terminal's hang-up,
    sent to the whole group, leaves them running under a controller that drains on it (pipeline/run_commands.py:
    Signals); with SIGHUP's default action they died under it, and a hang-up during the start hung it 60 s on a dead
    GCS. A SIGHUP meanwhile comes once the mask is back, or sooner through another thread (held, as SIGINT's and
    SIGTERM's)."""
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
    # SIGQUIT alike: Ctrl-\ at a terminal goes to the whole group too, and the controller drains on it (Signals)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGQUIT}) if main else None
    try:
        with _int_term_held() as held:
            yield held
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _int_term_held() -> Iterator[list[BaseException]]:
    """SIGINT and SIGTERM take effect once ray.init has returned: raised inside it while it built the driver's core
    worker, they left that worker's native threads running with no handle to stop them, and the interpreter's exit
    then crashed (exit 139 or 134 instead of 130). The handler in place still runs at once (it says so; a second
    signal still exits at once there); what it raises is held in the list. Ray's own SIGTERM handler (sys.exit)
    is kept out meanwhile through Ray's private ``set_sigterm_handler`` (a Ray without it only holds SIGINT)."""
    held: list[BaseException] = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handlers = {s: h for s, h in handlers.items() if callable(h)}  # a default action ends the process outright
    if threading.current_thread() is not threading.main_thread() or not handlers:
        yield held
        return

    def hold(signum: int, frame: Any) -> None:
        try:
            handlers[signum](signum, frame)
        except (KeyboardInterrupt, SystemExit) as e:
            held.append(e)

    utils = getattr(getattr(ray, "_private", None), "utils", None)
    set_sigterm = getattr(utils, "set_sigterm_handler", None)
    for s in handlers:
        signal.signal(s, hold)
    if set_sigterm is not None and signal.SIGTERM in handlers:
        utils.set_sigterm_handler = lambda _handler: None
    try:
        yield held
    finally:
        if set_sigterm is not None:
            utils.set_sigterm_handler = set_sigterm
        for s, h in handlers.items():
            signal.signal(s, h)


def _stop_if_signalled(held: list[BaseException]) -> None:
    """After ray.init: a signal held meanwhile stops the Ray just started (whole, so nothing native outlives
    Python) and is raised."""
    if held:
        shutdown_ray()  # also what a failed ray.init left started: ray.shutdown cleans up either
        raise held[0]


@contextlib.contextmanager
def _exit_if_ray_killed(held: list[BaseException], poll_s: float = 0.1) -> Iterator[None]:
    """While a local ray.init runs: once a signal is held (``_int_term_held``) and the GCS or the raylet that
    ray.init started here has died, this process exits at once, 130 as for any signal during the start. Such a
    signal went to the whole process group (`kill -- -PGID`, `timeout`, systemd stopping a unit still starting:
    KillMode=control-group) and ended Ray's fresh processes too; ray.init then returned only after Ray's 60 s wait
    for its GCS, and Ray ended the process with exit 1. It cannot be left from Python (it waits in Ray's C++ code,
    and raised inside it a signal crashed the exit), hence os._exit; the run's reaper (pipeline/reaper.py) ends
    what the run had started. SIGTERM is not blocked in Ray's processes as SIGHUP is (``_signals_held``): blocked,
    ray.shutdown's and the reaper's SIGTERM would each wait out their timeout and SIGKILL them (ray.shutdown
    measured 1.8 -> 5.4 s), and a service manager stopping the running service (it signals every process of the
    unit) would leave them to its final SIGKILL."""
    done = threading.Event()
    known = {child.pid for child in psutil.Process().children()}  # an earlier Ray's, stopped: not this start's
    # The signal as it arrives, not when its Python handler runs: that waits until ray.init is back in Python code,
    # and while it waits in Ray's C++ code (for the GCS) the handler, so ``held``, came only with its return (35 s)
    notice, tell = os.pipe()
    os.set_blocking(notice, False)
    os.set_blocking(tell, False)
    try:
        before = signal.set_wakeup_fd(tell, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no handler of ours runs here anyway
        before = None
    watch = threading.Thread(target=_watch_ray_start, args=(held, done, known, poll_s, notice), name="hv-ray-start",
                             daemon=True)
    watch.start()
    try:
        yield
    finally:
        done.set()
        watch.join()
        if before is not None:
            signal.set_wakeup_fd(before)
        os.close(notice)
        os.close(tell)


def _watch_ray_start(held: list[BaseException], done: threading.Event, known: set[int], poll_s: float,
                     notice: int | None = None) -> None:
    """``_exit_if_ray_killed``'s thread: finds the GCS and the raylet among this process's new children (not in
    ``known``) and exits once a signal came (held by its handler, or told through ``notice``, the signal wakeup
    fd's reading end: SIGINT or SIGTERM) and one of them has ended."""
    me, core = psutil.Process(), {}  # process -> its name
    signalled = False
    while not done.wait(poll_s):
        if notice is not None and not signalled:
            with contextlib.suppress(BlockingIOError):
                signalled = bool({signal.SIGINT, signal.SIGTERM} & set(os.read(notice, 64)))
        try:
            for child in me.children():  # named again at each poll: one just forked is "python" until its exec
                if child.pid not in known and child not in core and (name := child.name()) in RAY_CORE_PROCESSES:
                    core[child] = name
        except psutil.Error:  # one ended meanwhile: the others are looked at at the next poll
            pass
        if (held or signalled) and (ended := next((n for c, n in core.items() if _ended(c)), None)) \
                and not done.is_set():
            log.error("interrupted: the signal reached Ray's %s too (sent to the whole process group: `kill -- "
                      "-PGID`, `timeout`, a service manager's stop), and Ray's start could only end in its 60 s wait "
                      "for the GCS: exiting at once; the run's reaper ends what it had started", ended,
                      extra={"data": {"event": "exit", "exit_code": 130}})
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(130)


def _ended(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE  # not yet reaped by Ray
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _with_own_packages(system_config: dict) -> dict:
    """A copy of ``system_config`` (ray.init adds its own keys to the dict) that has each Ray worker process
    import ``OWN_PACKAGES`` as it starts (Ray's ``preload_python_modules``)."""
    preload = list(system_config.get("preload_python_modules", []))
    return {**system_config, "preload_python_modules": preload + [p for p in OWN_PACKAGES if p not in preload]}


def _check_head(address: str, where: str, timeout_s: float) -> None:
    """What ray.init cannot tell apart: given an address where nothing answers, or where a Redis does (Redis and
    `ray start --head` both default to port 6379), it retries for about 14 minutes (20 tries of ~40 s) and then
    blames the GCS. Waits up to ``timeout_s`` for something to answer where ray.init will connect (a head still
    starting), and refuses a Redis at once: it answers PING with + or - (NOAUTH, DENIED), a GCS with HTTP/2; so is
    any other server that answers in text (an HTTP port: ray.init retried one for minutes too)."""
    if "://" in address:  # ray:// (Ray Client): another protocol, left to ray.init
        return
    try:
        resolved = ray._private.services.canonicalize_bootstrap_address(address)  # 127.0.0.1: this machine's IP
    except Exception:  # no head recorded for "auto", a bad address, Ray's private API changed: ray.init says so
        return
    if not resolved:
        return
    port = resolved.rpartition(":")[2]
    if not (port.isdigit() and 0 < int(port) < 65536):  # nothing can ever answer there: no wait
        raise UserError(f"{where}: {address!r} has no usable port ({port!r}, not 1-65535): give host:port, the port "
                        "the head was started with (`ray start --head --port=...`; 6380 in docker-compose.yml)")
    deadline = time.monotonic() + timeout_s
    while True:
        answers = {target: _first_byte(target) for target in dict.fromkeys((address, resolved)) if ":" in target}
        if redis := next((t for t, first in answers.items() if first in (b"+", b"-")), None):
            raise UserError(f"{where}: {address!r} is a Redis server ({redis}), not a Ray cluster's head: Redis and "
                            "`ray start --head` both default to port 6379. Give the port the head was started with "
                            "(`ray start --head --port=...`; 6380 in docker-compose.yml)")
        if text := next((t for t, first in answers.items() if first and 32 <= first[0] < 127), None):
            raise UserError(f"{where}: {address!r} is not a Ray cluster's head: the server there ({text}) answers in "
                            "text, a head's GCS in HTTP/2 (the dashboard's port 8265 is no head address either). Give "
                            "the port the head was started with (`ray start --head --port=...`; 6380 in "
                            "docker-compose.yml)")
        if answers[resolved] is not None:
            return
        if time.monotonic() >= deadline:
            raise UserError(f"{where}: nothing answers at {address!r} ({resolved}) after {timeout_s:g} s "
                            "(ray.placement_timeout_s): is the Ray head running, and is that its port?")
        time.sleep(1)


def _first_byte(target: str, timeout: float = 3.0) -> bytes | None:
    """What a server at host:port says first to a PING (b"" for nothing), or None when nothing takes the call."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            try:
                return sock.recv(1)
            except OSError:  # silent, or it hung up: something is there all the same
                return b""
    except (OSError, ValueError):
        return None


def shutdown_ray() -> None:
    """``ray.shutdown()``, a second sooner when this process started Ray: Ray stops its processes one by one,
    SIGTERM then up to 1 s each, and its autoscaler monitor, stopped after the GCS, spends that whole second
    trying to report its end to the gone GCS before Ray kills it (1.35 s -> 0.35 s, measured). One machine has
    nothing to autoscale, so the monitor is killed first, through Ray's private Node API (left to ray.shutdown
    if that API changes). A process that joined a cluster holds no Ray processes: nothing is killed there."""
    try:
        node = ray._private.worker._global_node  # None unless connected
        if node is not None:
            node.kill_monitor(check_alive=False)
    except Exception:  # a private API: a Ray without it only shuts down slower
        log.debug("could not stop Ray's autoscaler monitor ahead of ray.shutdown", exc_info=True)
    ray.shutdown()


def require_redis_url(config: Any) -> None:
    """On a cluster the cameras' actors run on other machines and outlive nobody: an embedded Redis on the
    controller's loopback would be unreachable for them and die with the controller."""
    if config.ray.cluster:
        raise UserError("redis.url: required when joining a Ray cluster (ray.address or $RAY_ADDRESS): the embedded "
                        "Redis serves one machine only. Run a Redis every node can reach (docker-compose.yml has "
                        "one) and set redis.url, $HYDRAVISION_REDIS_URL or --redis-url")


def redis_warning(url: str, nodes: list[Node]) -> str | None:
    """A loopback Redis URL (or a Unix socket, as local) on a cluster whose nodes have several addresses: actors
    elsewhere cannot reach it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    ips = sorted({n.ip for n in nodes})
    if (loopback or parts.scheme == "unix") and len(ips) > 1:
        where = "a Unix socket of this machine" if parts.scheme == "unix" else "on loopback"
        return (f"Redis at {redact_url(url)} is {where}, but the Ray nodes are at {', '.join(ips)}: actors on "
                "other machines cannot reach it; use an address all nodes can reach")
    return None


def wait_for_resources(wanted: dict[str, float], timeout: float, say: Callable[[str], None]) -> None:
    """Waits until the cluster's totals reach ``wanted`` (nodes of a stack that starts together join after the
    head): the placement rules look at the nodes alive at start, and inference must not settle on a node
    without a GPU because the GPU node was a second late."""
    wanted = {k: v for k, v in wanted.items() if v > 0}

    def missing() -> dict[str, str]:
        have = ray.cluster_resources()
        return {k: f"{have.get(k, 0):g}/{v:g}" for k, v in wanted.items() if have.get(k, 0) + 1e-9 < v}

    if not missing():
        return
    say(f"Waiting up to {timeout:g} s for the Ray cluster to offer " + ", ".join(f"{k}={v:g}" for k, v in wanted.items()))
    deadline = time.monotonic() + timeout
    while (short := missing()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if short:
        nodes = "\n  ".join(n.describe() for n in alive_nodes(ray.nodes())) or "(no alive node)"
        raise UserError(f"ray.wait_for_resources: after {timeout:g} s the cluster offers only "
                        + ", ".join(f"{k} {v}" for k, v in short.items()) + f". Nodes:\n  {nodes}")


def camera_actor_name(camera_id: str) -> str:
    """The name of the StreamActor of a camera (or of cameras, their ids joined by +), unique within the
    pipeline's Ray namespace."""
    return f"hv-camera-{camera_id}"


def actor_camera(camera: CameraConfig) -> CameraConfig:
    """The camera as its StreamActor gets it: a relative file path made absolute from the controller's working
    directory (``ModelConfig.checkpoint_path``'s rule), since on a joined cluster the actor's is where `ray start`
    ran. "~" is left to the source; file:// URLs name absolute paths only."""
    url = absolute_path_url(camera.url)
    return camera if url == camera.url else camera.model_copy(update={"url": url})


def inference_name(index: int) -> str:
    """A replica's actor name, unique within the pipeline's Ray namespace; StreamActors look it up by it."""
    return f"hv-inference-{index}"


def cpu_only_torch(nodes: list[Node]) -> bool:
    """Whether a local Ray counted a GPU that this machine's torch cannot use (a CPU-only build): the replica
    reserving it ran on the CPU all the same, and the model in the camera processes was off. torch is imported
    only where a GPU was counted (the driver does not import it otherwise: start-up time)."""
    if not any(n.resources.get("GPU", 0) for n in nodes):
        return False
    import torch

    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


class Placement:
    """The placement of one pipeline's actors on the Ray this process is connected to."""

    def __init__(self, config: Any, say: Callable[[str], None] = print) -> None:
        self.config, self.say = config, say
        self.namespace = namespace_for(config.ray.namespace, config.redis.prefix)
        wait_for_resources(config.ray.wait_for_resources, config.ray.placement_timeout_s, say)
        self.nodes = alive_nodes(ray.nodes())
        # Every replica's options, once: they decide how many replicas there are and where they go.
        gpus = replica_gpus(config.inference, config.model)
        if gpus is None and not config.ray.cluster and config.model.device == "auto" and cpu_only_torch(self.nodes):
            gpus = 0.0
            say("This machine has a GPU, but this torch build has no CUDA: the model runs on the CPU.")
        self.replica_options = inference_options(config.ray, gpus, self.nodes)
        cores = usable_cores() if not config.ray.cluster else None  # a cluster's nodes: the replica's own count
        self.replicas = replica_count(config.inference, config.model.device, self.replica_options["num_gpus"], cores,
                                      replica_room(self.replica_options, self.nodes))
        # What the cameras' processes spread over: this machine's cores, or all the cluster's CPUs.
        self.cores = cores or int(sum(n.resources.get("CPU", 0) for n in self.nodes)) or 1
        # They split a node's cores (InferenceActor's threads)
        self.per_node = replicas_per_node(self.replicas, self.nodes, self.replica_options)
        self.assigner = ReplicaAssigner(self.replicas)
        self.in_camera_process = model_in_camera_process(config.inference, config.model.device,
                                                         self.replica_options["num_gpus"], config.ray.cluster)
        self._checkpoint_ref: Any = None
        self.reserved: dict[str, dict[str, Any]] = {}  # actor name -> the options it was created with (``spawn``)
        self.node_watch: NodeWatch | None = None  # ``watch``'s, once the service runs
        if len(self.nodes) > 1 or config.ray.cluster:
            self.say(f"Ray cluster: {len(self.nodes)} node(s), namespace {self.namespace}\n  "
                     + "\n  ".join(n.describe() for n in self.nodes))

    # -- options -----------------------------------------------------------------------------
    def inference_options(self, index: int) -> dict[str, Any]:
        opts = self.replica_options
        check_placeable(f"inference replica {index}", opts, self.nodes)
        return {**opts, "name": inference_name(index), "namespace": self.namespace, "lifetime": None}

    def stream_processes(self, cameras: list[CameraConfig]) -> list[tuple[list[CameraConfig], dict[str, Any]]]:
        """The StreamActor processes that host ``cameras`` (started together): (cameras, options) each."""
        self.nodes = alive_nodes(ray.nodes())  # cameras added at run time: nodes may have joined or died since
        for camera in cameras:
            check_placeable(f"camera {camera.id}", stream_options(self.config.ray, camera), self.nodes)
        out = []
        for group, opts in group_cameras(self.config.ray, cameras, self.cores):
            if len(group) > 1 and not any(fits(n, opts) for n in self.nodes):  # their sum fits no node: apart
                out.extend(([camera], stream_options(self.config.ray, camera)) for camera in group)
            else:
                out.append((group, opts))
        return [(group, {**opts, "name": camera_actor_name("+".join(c.id for c in group)),
                         "namespace": self.namespace}) for group, opts in out]

    def replica_index(self, camera: str, live: Any = ()) -> int:
        """The replica a camera sends its frames to: the one serving the fewest of the ``live`` cameras, but for a
        new camera not one that a lost node left waiting for a node (``NodeWatch.waiting``): the camera's start
        pings its replica, and one Ray keeps pending failed every add with ActorUnavailableError, another replica
        running with room. None running: a UserError that says what they wait for."""
        watch = getattr(self, "node_watch", None)
        waiting = {key[1]: needs for key, needs in list(watch.waiting.items())
                   if key[0] == "inference"} if watch is not None else {}
        return self.assigner.assign(camera, live, waiting)

    def checkpoint_arg(self) -> str | Any:
        """What InferenceActor gets as its checkpoint: a path every node reads, or an ObjectRef of its bytes."""
        mc = self.config.model
        mode = mc.distribute if mc.distribute != "auto" else ("object_store" if self.config.ray.cluster else "path")
        if mode == "path":
            return str(mc.checkpoint_path())
        if self._checkpoint_ref is None:  # held here for the run: restarted replicas read it again
            self._checkpoint_ref = ray.put(mc.checkpoint_path().read_bytes())
        return self._checkpoint_ref

    def spawn(self, actor_class: Any, options: dict[str, Any], *args: Any) -> Any:
        """``actor_class.options(**options).remote(*args)``; a name another pipeline holds is a UserError."""
        try:
            actor = actor_class.options(**options).remote(*args)
        except ValueError as e:
            if "already taken" not in str(e):
                raise
            if self.config.ray.namespace:  # chosen, not derived from the prefix: the prefix has no say
                raise UserError(f"actor {options.get('name')} already exists in Ray namespace {self.namespace} "
                                "(ray.namespace): another pipeline uses that namespace on this cluster. Give this one "
                                "its own ray.namespace") from None
            raise UserError(f"actor {options.get('name')} already exists in Ray namespace {self.namespace}: another "
                            f"pipeline with Redis prefix {self.config.redis.prefix!r} runs on this cluster. Give "
                            "this one its own redis.prefix (or ray.namespace)") from None
        # For NodeWatch: what a lost node's actors need of the nodes left (a process reserves its cameras' sum).
        # vars(): stand-ins built without __init__ call this too. One entry per name ever used.
        vars(self).setdefault("reserved", {})[options.get("name")] = options
        return actor

    def ready(self, ref: Any, what: str) -> Any:
        """``ray.get`` within ``ray.placement_timeout_s``; a timeout becomes a UserError that says whether the
        nodes are full or gone, or the actors were placed and were still starting (loading the model)."""
        timeout = self.config.ray.placement_timeout_s
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayActorError as e:
            if reason := refused_setting(e):  # a setting this node cannot honour, e.g. model.device cuda
                raise UserError(f"{what} could not start: {reason}") from None
            raise
        except ray.exceptions.GetTimeoutError:
            # The timeout covers the actor's constructor, the model's load: placed with room to spare, a model
            # that compiles at start (torch.compile: minutes) ran past it, and the error said the nodes may be full.
            if where := _started(ref):
                raise UserError(f"{what} did not start within {timeout:g} s (ray.placement_timeout_s): it was "
                                f"placed ({'; '.join(where)}) and was still starting, {self._start_work()}") from None
            nodes = "\n  ".join(n.describe() for n in alive_nodes(ray.nodes())) or "(no alive node)"
            raise UserError(f"{what} did not start within {timeout:g} s (ray.placement_timeout_s): the nodes "
                            f"that could host it may be full. Free resources now:\n  {_free()}\nNodes:\n  {nodes}") from None

    def _start_work(self) -> str:
        """What the model's start does that can outlast ``ray.placement_timeout_s`` (as far as the config says),
        and what to set."""
        mc = self.config.model
        # 'auto' is the CPU in the camera processes, a GPU in replicas that reserve one
        gpu = mc.device.startswith(("cuda", "mps")) or (
            mc.device == "auto" and not self.in_camera_process and bool(self.replica_options.get("num_gpus")))
        if mc.compile and gpu:  # not measured on a GPU: no figure, and 600 s is the CPU's advice
            return ("compiling the model (model.compile: true: torch.compile's warm-up on the GPU, in each process "
                    "that loads it). Raise ray.placement_timeout_s or set model.compile: false")
        if mc.compile:  # the demo model: 82-143 s on 2 busy cores, for one process alone
            return ("compiling the model (model.compile: true: torch.compile's warm-up, minutes on a CPU, in each "
                    f"process that loads it). Raise ray.placement_timeout_s (e.g. to {COMPILE_PLACEMENT_TIMEOUT_S:g}) "
                    "or set model.compile: false")
        what = "exports and quantizes it to int8" if mc.precision == "int8" else "may export it (ONNX)"
        return f"loading the model (its first start {what}; cached after). Raise ray.placement_timeout_s"

    def watch(self, app: Any) -> "NodeWatch | None":
        """A NodeWatch on a cluster (one node cannot lose another)."""
        if len(self.nodes) > 1 or self.config.ray.cluster:
            self.node_watch = NodeWatch(app, self.nodes, placement=self)  # replica_index reads what waits
            return self.node_watch
        return None


def _started(refs: Any) -> list[str]:
    """Where the actors behind ``refs`` (calls of their methods) not answered yet run: "node IP, pid N" each, if
    every one of them was placed (a process runs its constructor), else []. Read from the GCS's actor table, a
    quick local call: the state API (ray.util.state) needs the dashboard, which a local Ray runs without. Not
    readable (a Ray without that table): [], the "may be full" text as before."""
    refs = refs if isinstance(refs, list) else [refs]
    try:
        from ray._private import state

        where = []
        for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
            actor = state.actors(ref.task_id().actor_id().hex())
            # PENDING_CREATION is also an actor waiting for a node; one placed has a worker process (Pid)
            if actor.get("State") not in ("PENDING_CREATION", "ALIVE") or not actor.get("Pid"):
                return []
            where.append(f"node {actor['Address']['IPAddress']}, pid {actor['Pid']}")
        return where
    except Exception:
        return []


def _free() -> str:
    free = ray.available_resources()
    # Ray leaves a used-up resource out of its answer: nothing listed means nothing free
    return ", ".join(f"{k}={v:g}" for k, v in sorted(free.items())
                     if not k.startswith(("node:", "memory", "object_"))) or "(none)"


class NodeWatch:
    """Follows where each actor runs and which nodes are alive. When a node dies it says which cameras and
    replicas were on it (a ``node_lost`` event; Ray restarts them on the nodes that remain, or, where none of those
    has room for one, it waits for a node that has: said with what that node needs), and once a worker answers
    again ``moved()`` says from where to where. ``placement``: the Placement whose ``reserved`` tells what each
    actor needs (None: not said)."""

    def __init__(self, app: Any, nodes: list[Node], poll_s: float = 1.0, answer_s: float = NODES_ANSWER_S,
                 placement: Any = None) -> None:
        self.app = app
        self.placement = placement
        self.nodes = {n.id: n for n in nodes}
        self.where: dict[tuple[str, Any], str] = {}  # (kind, camera id / replica index) -> node id
        self.lost_from: dict[tuple[str, Any], str] = {}  # moved off a lost node, not yet seen elsewhere
        # Lost with a node and pending in Ray until a node that can host them joins: what that node needs, until
        # they answer again (``waits_for``: the controller said only "still starting" or a timeout meanwhile)
        self.waiting: dict[tuple[str, Any], str] = {}
        self._asked: dict[tuple[str, Any], Any] = {}
        self._whose: dict[tuple[str, Any], Any] = {}  # the actor handle that ``where`` and the rest are about
        self.poll_s, self._last_poll = poll_s, 0.0
        self.answer_s = answer_s
        self._question: concurrent.futures.Future | None = None  # ray.nodes() under way in its thread
        self._asked_at = 0.0
        self._unanswered = False  # said so, until the GCS answers again

    def _actors(self) -> dict[tuple[str, Any], Any]:
        with self.app._lock:  # the control threads add and remove cameras meanwhile
            cameras = dict(self.app.cameras)
        out: dict[tuple[str, Any], Any] = {("camera", cid): h.process for cid, h in cameras.items()}
        out.update({("inference", i): a for i, a in enumerate(self.app.inference)})
        return out

    def tick(self) -> None:
        """Called from the controller's status loop; never blocks for long."""
        actors = self._actors()
        self._learn_locations(actors)
        if time.monotonic() - self._last_poll >= self.poll_s:
            self._poll(actors)

    def _poll(self, actors: dict) -> None:
        """Reports the nodes gone from ``ray.nodes()`` (once each) and notes those that joined."""
        self._last_poll = time.monotonic()
        if (alive := self._alive_now()) is None:
            return
        # One free room for every node lost in this poll: a room one's actors take is not there for the next's
        # (each judged alone, two lost replicas both read as restarted on the one free unit left)
        free: list[Node] | None = None
        for node_id in [n for n in self.nodes if n not in alive]:
            if free is None:
                free = self._free(list(alive.values()), actors)
            self._lost(self.nodes.pop(node_id), actors, free)
        for node_id, node in alive.items():
            if node_id not in self.nodes:
                self.nodes[node_id] = node
                self.app.say(f"Ray node joined: {node.describe()}")

    def _alive_now(self) -> dict[str, Node] | None:
        """The alive nodes by id, from ``ray.nodes()`` asked in a thread of its own and waited for ``answer_s`` in all:
        None while it has not answered (it stays asked, no second question meanwhile; a later poll takes its answer)
        or when it failed, said once until the GCS answers again."""
        if self._question is None:
            self._question, self._asked_at = concurrent.futures.Future(), time.monotonic()
            threading.Thread(target=_ask_nodes, args=(self._question,), name="hv-node-poll", daemon=True).start()
        try:
            nodes = self._question.result(timeout=max(0.0, self._asked_at + self.answer_s - time.monotonic()))
        except Exception as e:
            if not self._question.done():  # by its state: on 3.11 a TimeoutError ray.nodes() raised is the same class
                self._say_unanswered(f"has not answered for {time.monotonic() - self._asked_at:.0f} s")
                return None
            self._question = None
            self._say_unanswered(f"failed ({type(e).__name__}: {str(e)[:200]})")
            return None
        self._question = None
        if self._unanswered:
            self._unanswered = False
            self.app.say("Ray: the node list answers again")
        return {n.id: n for n in nodes}

    def _say_unanswered(self, what: str) -> None:
        if not self._unanswered:
            self._unanswered = True
            self.app.say(f"Ray: the node list (ray.nodes(), from the GCS) {what}: is the GCS slow or restarting? "
                         "Lost nodes are reported once it answers")

    def learn(self, timeout_s: float = 10.0) -> None:
        """Asks every actor where it runs and waits (up to ``timeout_s``) for the answers. Called once the
        service has started: a node lost in its first seconds, before the status loop's ticks have learnt the
        locations, must still be reported with what ran on it."""
        actors = self._actors()
        self._learn_locations(actors)
        if self._asked:
            ray.wait(list(self._asked.values()), num_returns=len(self._asked), timeout=timeout_s)
            self._learn_locations(actors)

    def _learn_locations(self, actors: dict) -> None:
        for known in (self.where, self.lost_from, self._asked, self._whose, self.waiting):  # removed: forgotten
            for key in [k for k in known if k not in actors]:  # (each removed id's entry and process handle stayed)
                del known[key]
        for key, actor in actors.items():
            if self._whose.get(key) is not actor:  # new, or another process now (removed and added again)
                self._whose[key] = actor
                for known in (self.where, self.lost_from, self._asked, self.waiting):
                    known.pop(key, None)
            if key not in self.where and key not in self._asked:
                self._asked[key] = actor.where.remote()
        if not self._asked:
            return
        ready, _ = ray.wait(list(self._asked.values()), num_returns=len(self._asked), timeout=0)
        ready_set = set(ready)
        for key, ref in list(self._asked.items()):
            if ref not in ready_set:
                continue
            del self._asked[key]
            try:
                self.where[key] = ray.get(ref, timeout=0)["node"]
            except Exception:  # died before answering: ask again next tick
                continue
            self.waiting.pop(key, None)  # it runs again: a node took it

    def _lost(self, node: Node, actors: dict, free: list[Node]) -> None:
        """Says what ran on ``node``, lost, and what of it waits for a node to join: ``free`` is ``_free``'s, shared
        by the nodes lost in one poll (what one's actors take is taken off it)."""
        on_it = sorted((k for k, n in self.where.items() if n == node.id and k in actors), key=str)
        for key in on_it:
            self.lost_from[key] = self.where.pop(key)
            self._asked.pop(key, None)
        cameras = [k[1] for k in on_it if k[0] == "camera"]
        replicas = [k[1] for k in on_it if k[0] == "inference"]
        # Ray keeps an actor no alive node can host pending (RESTARTING) until such a node joins, for ever if none
        # does: the controller only saw a camera "still starting" (waiting for its replica) or running at 0 fps.
        # Whether a node can: by what is free there, not by its totals (the one inference node left had its one
        # hydravision_inference unit held by replica 1, and the line said Ray restarts replica 0 there).
        reservations = {key: self._reservation(key) for key in on_it}
        answer: dict[Any, tuple[dict, dict] | None] = {}  # actor name -> its needs (a process's cameras: one answer)
        for name, options in reservations.values():
            if name not in answer:
                answer[name] = self._needs_elsewhere(options, free)
        waiting = {key: needs for key, (name, _) in reservations.items() if (needs := answer[name]) is not None}
        self.waiting.update({key: describe_needs(*needs) for key, needs in waiting.items()})
        say_at(self.app.say, f"Ray node {node.id[:8]} ({node.ip}) lost: cameras {cameras or 'none'}, inference "
               f"replicas {replicas or 'none'}; {self._fate(on_it, waiting, actors)}", logging.WARNING)
        if self.app.events:
            extra = {"waiting": [{key[0]: key[1], "needs": {"resources": r, "labels": labels}}
                                 for key, (r, labels) in waiting.items()]} if waiting else {}
            self.app.events.publish_event(event_message("node_lost", "*", node=node.id, ip=node.ip,
                                                        cameras=cameras, inference=replicas, **extra))

    def _reservation(self, key: tuple[str, Any]) -> tuple[str | None, dict | None]:
        """The Ray name of the actor behind ``key`` and the options it was created with (None: unknown)."""
        if key[0] == "inference":
            name = inference_name(key[1])
        else:
            with self.app._lock:
                name = getattr(self.app.cameras.get(key[1]), "name", None)
        return name, (getattr(self.placement, "reserved", None) or {}).get(name)

    def _free(self, alive: list[Node], actors: dict) -> list[Node]:
        """Copies of the ``alive`` nodes with what this pipeline's actors on each (``where``) reserved taken off
        (``placement.reserved``; cameras sharing a process counted once). Not Ray's free figures: by the time the
        loss is seen Ray may have restarted a lost actor on a node already, and its own room would read as taken.
        Other pipelines' actors are not counted."""
        held: dict[str, dict[Any, dict]] = {}  # node id -> actor name -> its options
        for key, node_id in list(self.where.items()):
            name, options = self._reservation(key)
            if key in actors and options is not None:
                held.setdefault(node_id, {})[name] = options
        out = []
        for n in alive:
            left = dict(n.resources)
            for options in held.get(n.id, {}).values():
                for k, v in demand(options).items():
                    left[k] = left.get(k, 0.0) - v
            out.append(Node(n.id, n.ip, left, n.labels))
        return out

    @staticmethod
    def _needs_elsewhere(options: dict | None, free: list[Node]) -> tuple[dict, dict] | None:
        """What a node must offer for an actor with these options to run again, where none of the ``free`` nodes
        (``_free``'s) has room for it (``placement.fits``); None where one has, which then has that much less for
        the next lost actor, or where its options are unknown."""
        if options is None:
            return None
        if node := next((n for n in free if fits(n, options)), None):
            for k, v in demand(options).items():
                node.resources[k] -= v  # type: ignore[index]  # _free's copy
            return None
        return node_needs(options, free)

    def _fate(self, on_it: list[tuple[str, Any]], waiting: dict, actors: dict) -> str:
        """The node_lost line's end: what Ray restarts on the remaining nodes, and what waits for a node to join."""
        def name(key: tuple[str, Any]) -> str:
            return f"camera {key[1]}" if key[0] == "camera" else f"inference replica {key[1]}"

        restarted = [k for k in on_it if k not in waiting]
        parts = []
        if not waiting:
            parts.append("Ray restarts them on the remaining nodes")
        elif restarted:
            parts.append(f"Ray restarts {', '.join(map(name, restarted))} on the remaining nodes")
        with self.app._lock:  # the adds assign replicas under it
            of = dict(getattr(getattr(self.placement, "assigner", None), "of", {}))  # camera -> its replica
        for key, needs in waiting.items():
            part = f"{name(key)} waits for a node with {describe_needs(*needs)} to join"
            if served := sorted(c for c, r in of.items() if key == ("inference", r) and ("camera", c) in actors):
                part += f" (cameras {served}, which it serves, publish no frames until then)"
            parts.append(part)
        return "; ".join(parts)

    def waits_for(self, camera_id: str) -> str:
        """Why a camera cannot run until a node joins, where a lost node left its process or the replica it sends
        its frames to waiting for one (``_lost``), e.g. "inference replica 0, which it sends its frames to, waits for
        a node with hydravision_inference=1 to join"; "" when neither waits."""
        if needs := self.waiting.get(("camera", camera_id)):
            return f"its process waits for a node with {needs} to join"
        with self.app._lock:  # the adds assign replicas under it
            replica = getattr(getattr(self.placement, "assigner", None), "of", {}).get(camera_id)
        if replica is not None and (needs := self.waiting.get(("inference", replica))):
            return f"inference replica {replica}, which it sends its frames to, waits for a node with {needs} to join"
        return ""

    def moved(self, key: tuple[str, Any]) -> dict[str, str]:
        """For a ``worker_restarted`` event: the node the worker runs on now and, if it ran elsewhere before
        (it left a lost node), that node. Asks the (just restarted, so answering) actor where it is."""
        # Ray may restart a lost node's actors before this tick's node poll: the loss is reported first, while
        # the worker is still known on that node (else node_lost would leave it out).
        actors = self._actors()
        self._poll(actors)
        lost = self.lost_from.pop(key, None)
        previous = lost or self.where.get(key)
        actor = actors.get(key)
        here = None
        try:
            here = ray.get(actor.where.remote(), timeout=10)["node"] if actor is not None else None
        except Exception:  # busy or gone again: report what is known
            log.debug("where() of %s did not answer", key, exc_info=True)
        out: dict[str, str] = {}
        if here:
            self.where[key] = here
            self._asked.pop(key, None)
            self.waiting.pop(key, None)
            out["node"] = here
        # Unknown now, but it surely moved if its node is gone (as of the node poll's last answer).
        if previous and previous != here and (here or lost or previous not in self.nodes):
            out["from_node"] = previous
        return out


def _ask_nodes(answer: concurrent.futures.Future) -> None:
    """``NodeWatch``'s question, in its own thread: the alive nodes, or why not."""
    try:
        answer.set_result(alive_nodes(ray.nodes()))
    except BaseException as e:  # the poll says it
        answer.set_exception(e)
