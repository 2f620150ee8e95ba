"""How the controller starts its local Ray: a SIGTERM sent to the whole process group while ray.init runs, and
Ray's workers importing this installation's packages whatever the controller's working directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# cluster.init_ray with a stand-in for ray.init: it starts "the GCS" (a copy of sleep named as Ray's binary is) in
# this process group, then a SIGTERM comes to the group (`kill -TERM -- -PGID`, GNU timeout, systemd stopping the
# unit) or to this process alone, and ray.init goes on waiting for its GCS as Ray's does (60 s, then exit 1).
START = """
import logging, os, signal, subprocess, sys, time
import psutil, ray
from pipeline import cluster
from pipeline.config import parse_config

gcs_binary, to = sys.argv[1], sys.argv[2]
logging.basicConfig(format="%(levelname)s %(message)s")


def stop_the_start(signum, frame):  # App's handler while the start runs (pipeline/app.py)
    print(f"{signal.Signals(signum).name}: stopping the start", flush=True)
    raise KeyboardInterrupt


def ray_init(**kwargs):
    global gcs
    gcs = subprocess.Popen([gcs_binary, "300"])
    while psutil.Process(gcs.pid).name() != "gcs_server":  # started: not a fork still named python
        time.sleep(0.01)
    if to == "group-in-c":  # as Ray's: the signal comes while ray.init waits in C code, where no Python signal
        # handler runs until it returns
        import ctypes
        subprocess.Popen([sys.executable, "-c", "import os, signal, sys, time; time.sleep(0.5); "
                          "os.killpg(int(sys.argv[1]), signal.SIGTERM)", str(os.getpgid(0))])
        mutex = ctypes.create_string_buffer(64)  # a pthread_mutex_t (40 bytes on Linux x86-64), default kind
        libc = ctypes.CDLL(None)
        libc.pthread_mutex_init(mutex, None)
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # a default mutex locked again: waits for ever, no signal interrupts it
    if to == "group":
        os.killpg(0, signal.SIGTERM)  # the GCS gets it too
        while True:  # Ray's wait for its GCS: left only by an exit (Ray's own after 60 s, with exit 1)
            time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2)  # the GCS lives: ray.init finishes
    print("ray.init returned", flush=True)


signal.signal(signal.SIGTERM, stop_the_start)
ray.init = ray_init
try:
    cluster.init_ray(parse_config({"cameras": []}), {})
except KeyboardInterrupt:
    print("interrupted after ray.init", flush=True)
    sys.exit(130)
finally:
    gcs.kill()
"""


def start(tmp_path: Path, to: str) -> subprocess.CompletedProcess:
    gcs = tmp_path / "gcs_server"
    shutil.copy(shutil.which("sleep"), gcs)
    # A session of its own: the group signal reaches the stand-in and its "GCS", not pytest
    return subprocess.run([sys.executable, "-c", START, str(gcs), to], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, start_new_session=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("to", ["group", "group-in-c"])
def test_a_sigterm_to_the_whole_group_while_ray_init_runs_exits_130_at_once(tmp_path, to):
    """It ended Ray's fresh GCS too, and ray.init waited out Ray's 60 s for it: the start hung a minute and ended
    with Ray's exit 1 (`timeout 20 hydravision run`: 80 s). Now the start exits 130 as soon as the GCS is gone."""
    try:
        done = start(tmp_path, to)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still waiting for the dead GCS after {e.timeout} s: {e.stdout!r} {e.stderr!r}")
    out = done.stdout + done.stderr
    assert done.returncode == 130, out
    if to == "group":  # in C code (review) the handler has not run yet: the exit comes first
        assert "SIGTERM: stopping the start" in out, out
    assert "ERROR interrupted: the signal reached Ray's gcs_server too" in out, out
    assert "interrupted after ray.init" not in out, out


@pytest.mark.timeout(120)
def test_a_sigterm_to_the_controller_alone_still_waits_for_ray_init_and_stops_the_ray_it_started(tmp_path):
    """Ray's processes did not get it: ray.init finishes and the held signal stops the start as before (the
    documented way: the Ray it started is stopped whole, then exit 130), not the exit at once."""
    done = start(tmp_path, "alone")
    out = done.stdout + done.stderr
    assert done.returncode == 130, out
    assert "ray.init returned\ninterrupted after ray.init" in out, out
    assert "reached Ray's" not in out, out


# What a Ray worker process does (ray/_private/workers/default_worker.py, then the job's config): it runs as a
# script from Ray's folder, imports the modules of the system config's preload_python_modules, and before the
# first task puts the driver's working directory first on sys.path (py_driver_sys_path); then the actor's module
# (workers/inference.py, workers/stream.py) is imported, and what it imports.
WORKER = """
import os, sys
from ray._private.utils import try_import_each_module
try_import_each_module([m for m in sys.argv[1].split(",") if m])
sys.path.insert(0, os.getcwd())
import models.files, workers
print(models.files.__file__)
print(workers.__file__)
"""


def test_ray_workers_import_this_installations_packages_from_a_folder_holding_packages_of_the_same_names(
        tmp_path, monkeypatch):
    """`hydravision run my.yaml` in an ML project's folder with a models/ package: every camera failed, its
    process importing `from models.files import ...` from the user's models/ (an ImportError, "This is a bug in
    hydravision"); run from a second checkout, the actors mixed both checkouts' files in one traceback."""
    import ray

    from pipeline import cluster
    from pipeline.config import parse_config

    given: dict = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: given.update(kwargs))
    cluster.init_ray(parse_config({"cameras": []}), {"worker_niceness": 0})
    system_config = given["_system_config"]
    assert system_config["worker_niceness"] == 0  # the caller's keys are kept

    project = tmp_path / "project"  # the user's folder, the controller's working directory
    for package in ("models", "workers"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"raise ImportError('the user project {package}')\n")
    script = tmp_path / "ray_workers" / "default_worker.py"
    script.parent.mkdir()
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script), ",".join(system_config.get("preload_python_modules", []))],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(ROOT / "models" / "files.py"), str(ROOT / "workers" / "__init__.py")]
