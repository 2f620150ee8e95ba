"""Deployment as a user runs it, where it went wrong: the compose stack's Redis ran as root, its controller was
killed before it had stopped cleanly and its workers missed the ONNX export baked into the image; dev.sh stuck
on a half-made .venv and on a hand-made .env; the Node.js consumer ignored bad option values, hung without
Redis despite --idle-exit-ms, and held what --count left unhandled. No container runs here (FIELD-NOTES):
compose commands run natively with a stand-in for the image's entrypoint, dev.sh with stand-ins for python3
and docker."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import yaml

from pipeline.config import load_config
from servers import free_port, require_binary, skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
NODE_EXAMPLE = ROOT / "examples" / "node-consumer"


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# -- docker-compose.yml and configs/compose.yaml -------------------------------------------------------------

def test_compose_redis_drops_root_and_takes_its_password_from_stdin(tmp_path):
    """The redis service ran `sh -c '... | exec redis-server -'`: the image's entrypoint drops root only for a
    command that starts with redis-server, so the server ran as root. Its script now goes through that
    entrypoint; run natively here with a stand-in for it (on a free port), the password still comes from stdin."""
    require_binary("redis-server")
    script = COMPOSE["services"]["redis"]["command"][2]
    assert "exec docker-entrypoint.sh redis-server -" in script or COMPOSE["services"]["redis"].get("user")
    port = free_port()
    shim = tmp_path / "bin"
    shim.mkdir()
    _script(shim / "docker-entrypoint.sh", f'#!/bin/sh\nexec "$@" --port {port} --bind 127.0.0.1\n')
    script = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: ENV_EXAMPLE.get(m.group(1), m.group(2)),
                    script.replace("$$", "$"))  # as compose passes it, with .env.example's values
    password = "a1" * 16
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "REDIS_PASSWORD": password}
    # its own process group: sh runs the pipe's redis-server as a child of its own, which killing sh left running
    server = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert password not in " ".join(map(str, COMPOSE["services"]["redis"]["command"]))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


def test_compose_workers_find_the_onnx_export_the_image_made(monkeypatch, tmp_path):
    """The image exports the demo model at build (`RUN hydravision export`) so that the CPU worker starts
    without exporting; but on a cluster the checkpoint went through the object store (distribute: auto) and a
    worker loaded it as hydravision-<hash>.safetensors, whose export is named after that file: every fresh
    worker exported the model again."""
    import pipeline.cluster as cluster
    from models.export import cache_path
    from pipeline.model_commands import DEMO_CHECKPOINT
    from workers.inference import local_copy

    assert re.search(r"^RUN hydravision export$", (ROOT / "Dockerfile").read_text(), re.M)  # the demo checkpoint
    for name, value in {**ENV_EXAMPLE, "HV_GPUS": "0", "HV_INFERENCE_REPLICAS": "1"}.items():
        monkeypatch.setenv(name, value)
    config = load_config(ROOT / "configs" / "compose.yaml")
    assert config.ray.cluster
    monkeypatch.setattr(cluster.ray, "put", lambda data: data)  # the object store's copy: the bytes themselves
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the worker's temp dir
    arg = cluster.Placement.checkpoint_arg(SimpleNamespace(config=config, _checkpoint_ref=None))
    loaded = local_copy(arg) if isinstance(arg, bytes) else Path(arg)  # as InferenceService.__init__ does
    assert cache_path(loaded) == cache_path(DEMO_CHECKPOINT)


def test_compose_gives_the_controller_time_to_stop_cleanly():
    """On SIGTERM the controller drains its cameras and waits up to App.shutdown's deadline for their final
    status; Docker kills a container 10 s after SIGTERM unless told otherwise, so `docker compose down` cut
    that short (cameras left `stale` instead of `stopped`, a buffered flush lost)."""
    import inspect

    from pipeline.app import App

    deadline = inspect.signature(App.shutdown).parameters["timeout"].default
    grace = COMPOSE["services"]["ray-head"].get("stop_grace_period", "10s")  # Docker's default
    seconds = sum(int(n) * {"m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([ms])", grace))
    assert seconds >= deadline + 5, grace  # + stopping Ray, + the status loop's last tick


# -- dev.sh ---------------------------------------------------------------------------------------------------

def _dev(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """dev.sh run from a copy of it (it works in its own folder) with stand-ins first on PATH."""
    for name in ("dev.sh", "pyproject.toml", ".env.example"):
        if not (tmp_path / name).exists():
            shutil.copy(ROOT / name, tmp_path / name)
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    _script(shims / "docker", f'#!/bin/sh\necho "$*" >> "{tmp_path}/docker-calls"\n')
    return subprocess.run(["bash", str(tmp_path / "dev.sh"), *args], capture_output=True, encoding="utf-8",
                          timeout=60, env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", **(env or {})})


def test_dev_setup_remakes_a_venv_left_without_pip(tmp_path):
    """`python3 -m venv` without python3-venv leaves a .venv without pip; once the user installed the package
    as told, every later ./dev.sh demo said "pyproject.toml or dev.sh changed" and failed on that .venv's
    missing pip. A healthy .venv is still only updated, not made again."""
    fake_python = _script(tmp_path / "python3", f"""#!/bin/sh
# python3 -m venv [--clear] DIR: a venv whose python and hydravision log their arguments and succeed
echo "$*" >> "{tmp_path}/venv-calls"
eval dir=\\${{$#}}
rm -rf "$dir" && mkdir -p "$dir/bin"
printf '#!/bin/sh\\necho "$*" >> "$(dirname "$0")/../calls"\\n' > "$dir/bin/python"
cp "$dir/bin/python" "$dir/bin/hydravision" && chmod +x "$dir/bin/python" "$dir/bin/hydravision"
""")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    _script(tmp_path / ".venv" / "bin" / "python", "#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    run = _dev(tmp_path, "setup", env={"PYTHON": str(fake_python)})
    assert run.returncode == 0, run.stderr
    assert "-m pip install -qq -e .[test]" in (tmp_path / ".venv" / "calls").read_text()
    assert (tmp_path / ".venv" / ".hv-installed").is_file()
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    assert _dev(tmp_path, "setup", env={"PYTHON": str(fake_python)}).returncode == 0
    assert len((tmp_path / "venv-calls").read_text().splitlines()) == 1  # made once, then updated in place


def test_dev_up_adds_the_token_on_a_line_of_its_own(tmp_path):
    """A .env whose last line has no newline (written by `printf`, some editors): the HV_METRICS_TOKEN that
    ./dev.sh up adds to an older .env ran into that line ("HV_GPUS=1HV_METRICS_TOKEN=...")."""
    (tmp_path / ".env").write_text(f"REDIS_PASSWORD={'ab' * 16}\nRAY_AUTH_TOKEN={'cd' * 32}\nHV_GPUS=1")
    run = _dev(tmp_path, "up", "-d")
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / ".env").read_text().splitlines()
    assert "HV_GPUS=1" in lines and any(re.fullmatch(r"HV_METRICS_TOKEN=[0-9a-f]{32}", ln) for ln in lines)
    assert (tmp_path / "docker-calls").read_text() == "compose up --build -d\n"


def test_dev_up_refuses_the_placeholders_of_env_example(tmp_path):
    """README: `cp .env.example .env` with your own secrets. One left as copied started the stack with the
    Redis password and Ray token printed in the repository; ./dev.sh up now names them and stops."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    run = _dev(tmp_path, "up")
    assert run.returncode != 0 and not (tmp_path / "docker-calls").exists()
    assert all(name in run.stderr for name in ("REDIS_PASSWORD", "RAY_AUTH_TOKEN", "HV_METRICS_TOKEN")), run.stderr


# -- examples/node-consumer -------------------------------------------------------------------------------------

def _node_example() -> Path:
    """The example with its packages (npm ci when not there yet, as tests/test_analytics_e2e.py does)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            require_binary(tool)
    if not (NODE_EXAMPLE / "node_modules" / "redis").exists():
        install = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_EXAMPLE, capture_output=True,
                                 encoding="utf-8", timeout=150)
        if install.returncode != 0:
            skip_or_fail(f"npm ci failed in {NODE_EXAMPLE}: {install.stderr[-500:]}")
    return NODE_EXAMPLE


def _node(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["node", "index.js", *args], cwd=_node_example(), capture_output=True, encoding="utf-8",
                          timeout=timeout)


@pytest.mark.parametrize("option, value", [("--count", "abc"), ("--idle-exit-ms", "1s"),
                                           ("--redis-url", "localhost:6379")])
def test_node_consumer_names_a_bad_option_value(redis_server, option, value):
    """`--count abc` was NaN, which no count reaches (with --idle-exit-ms, a run that ended well without ever
    counting); `--idle-exit-ms 1s` was 1 ms; a URL without redis:// failed with "Invalid protocol" alone."""
    args = {"--redis-url": redis_server.url, "--idle-exit-ms": "300", option: value}
    run = _node(*[w for kv in args.items() for w in kv])
    assert run.returncode == 2 and option in run.stderr and value in run.stderr, run.stderr


def test_node_consumer_idle_exit_ends_a_run_without_redis():
    """--idle-exit-ms promised an end once nothing arrived for that long, but the client retried an
    unreachable Redis forever (every command waiting for it): the process never exited. It now ends with
    status 2 and an error that names the Redis (credentials masked)."""
    port = free_port()  # nothing listens there
    run = _node("--redis-url", f"redis://:sekrit@127.0.0.1:{port}/0", "--idle-exit-ms", "500")
    assert run.returncode == 2, run.stderr
    assert f"127.0.0.1:{port}" in run.stderr and "--idle-exit-ms" in run.stderr and "sekrit" not in run.stderr


def test_node_consumer_hands_back_what_count_left_unhandled(redis_server):
    """With --count the example stopped in the middle of a batch it had taken: the rest stayed pending under
    its own name, claimable only after --claim-idle-ms (30 s by default). As pipeline/consumer.py does, it now
    hands them back (XCLAIM IDLE JUSTID): another member claims them at once, their delivery count unchanged."""
    from workers.publish import event_message, keys

    client = redis_server.client()
    stream = keys("hv").events
    ids = [client.xadd(stream, {"data": json.dumps(event_message(
        "line_crossed", "cam", head="vehicles", track_id=i, class_="car", line="gate", direction="in", frame=i,
        pts=i / 10, count=i + 1))}).decode() for i in range(3)]
    run = _node("--redis-url", redis_server.url, "--group", "g", "--consumer", "a", "--from-start", "--count", "1",
                "--claim-idle-ms", "60000")
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in run.stdout.splitlines()] == ids[:1]
    claimed = client.xautoclaim(stream, "g", "b", min_idle_time=60_000, start_id="0-0", justid=True)  # ids alone
    assert [c.decode() for c in claimed] == ids[1:]
    rows = client.xpending_range(stream, "g", min="-", max="+", count=10)
    assert {r["message_id"].decode(): int(r["times_delivered"]) for r in rows} == {i: 1 for i in ids[1:]}

