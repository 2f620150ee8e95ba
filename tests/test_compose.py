"""docker-compose.yml and the Dockerfile, checked without a container engine (none runs on these machines, see
FIELD-NOTES): every service's command exists in the image it runs, ports and addresses agree between the
services and the pipeline's config, secrets come from the environment and never sit on a command line, and the
Ray flags are ones `ray start` accepts (tests/test_cluster.py runs a cluster of real raylets)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import av
import pytest
import yaml

from pipeline.app import RAY_SYSTEM_CONFIG
from pipeline.config import RayConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = [name for name, s in SERVICES.items() if str(s.get("image", "")).startswith("hydravision:")]
ENV_EXAMPLE = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
IMAGE_ROOT = "/opt/hydravision"  # WORKDIR of the Dockerfile


def words(service: str) -> list[str]:
    """The service's command as argv; an `sh -c` script split on && into one argv per command."""
    cmd = SERVICES[service]["command"]
    if isinstance(cmd, list) and cmd[:2] == ["sh", "-c"]:
        return shlex.split(cmd[2].replace("&&", " && "))
    return list(cmd) if isinstance(cmd, list) else shlex.split(cmd)


def commands(service: str) -> list[list[str]]:
    out, current = [], []
    for w in words(service):
        if w == "&&":
            out.append(current)
            current = []
        elif w == "|":
            current = []  # `printf ... | exec redis-server -`: the part after the pipe is the server
        else:
            current.append(w)
    return [c[1:] if c and c[0] == "exec" else c for c in out + [current]]


def interpolated(text: str) -> str:
    """${VAR}, ${VAR:-default}, ${VAR:?message} as compose resolves them with .env.example."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in ENV_EXAMPLE:
            return ENV_EXAMPLE[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} has no default and is not in .env.example")
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, text)


def test_the_stack_has_its_services():
    assert {"redis", "rtsp", "camera", "ray-head", "ray-worker", "ray-worker-gpu"} <= set(SERVICES)
    assert SERVICES["ray-worker-gpu"]["profiles"] == ["gpu"] and SERVICES["prometheus"]["profiles"] == ["metrics"]
    default = [n for n, s in SERVICES.items() if "profiles" not in s]  # what a plain `docker compose up` starts
    assert sorted(default) == ["camera", "ray-head", "ray-worker", "redis", "rtsp"]
    gpu = SERVICES["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu", "compute", "utility", "video"] and gpu["count"] == 1  # video: NVDEC
    assert "--num-gpus=1" in words("ray-worker-gpu")


def test_every_variable_has_a_default_or_an_example():
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated(text)  # raises on a variable compose would leave empty
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text):  # required: the secrets
        assert name in ENV_EXAMPLE and "change-me" in ENV_EXAMPLE[name], name


def test_secrets_stay_off_command_lines_and_ray_requires_its_token():
    redis_cmd = " ".join(words("redis"))
    assert "requirepass" in redis_cmd and "$$REDIS_PASSWORD" in redis_cmd  # from the environment, through stdin
    assert not re.search(r"--requirepass|\$\{REDIS_PASSWORD", redis_cmd)
    for name in OURS:
        if name == "camera":
            continue
        env = SERVICES[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    for name, service in SERVICES.items():  # nothing is published beyond this host
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def ray_start_flags() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for p in start.params for opt in p.opts}


@pytest.mark.parametrize("service", ["ray-head", "ray-worker", "ray-worker-gpu"])
def test_ray_start_flags_exist_and_agree(service):
    ray_start = next(c for c in commands(service) if c[:2] == ["ray", "start"])
    flags = dict((w.split("=", 1) + [""])[:2] for w in ray_start[2:])
    assert set(flags) <= ray_start_flags(), set(flags) - ray_start_flags()
    head = dict((w.split("=", 1) + [""])[:2] for w in next(c for c in commands("ray-head") if c[:2] == ["ray", "start"]))
    assert head["--port"] != "6379"  # Redis's port; Ray's default
    if service == "ray-head":
        # the cluster-wide settings pipeline/app.py gives a local Ray; only the head takes them
        assert json.loads(flags["--system-config"]) == RAY_SYSTEM_CONFIG
    else:
        host, port = flags["--address"].split(":")
        assert host == "ray-head" and port == head["--port"] and "--block" in flags
        assert RayConfig().inference_resource in json.loads(flags["--resources"])  # the model may run here
        assert "--system-config" not in flags


def test_the_pipeline_config_matches_the_services(monkeypatch):
    head = commands("ray-head")
    run = next(c for c in head if c[:2] == ["hydravision", "run"])
    path = Path(run[2])
    assert path.is_relative_to(IMAGE_ROOT) and "--plain" in run
    for name, value in {**ENV_EXAMPLE, **{k: interpolated(str(v)) for k, v in SERVICES["ray-head"]["environment"].items()}}.items():
        monkeypatch.setenv(name, value)
    config = load_config(ROOT / path.relative_to(IMAGE_ROOT))  # COPY configs configs
    assert config.ray.address == "auto"  # the head this container started
    assert config.redis.url == f"redis://:{ENV_EXAMPLE['REDIS_PASSWORD']}@redis:6379/0"
    assert config.model.checkpoint_path().is_file()
    rtsp = [c.url for c in config.cameras if c.url.startswith("rtsp://")]
    publisher = next(c for c in commands("camera") if c[0] == "ffmpeg")
    assert rtsp == [publisher[-1]] == ["rtsp://rtsp:8554/street"]  # the sample camera, served by the rtsp service
    offered = {k for s in ("ray-worker", "ray-worker-gpu")
               for k in json.loads(next(w.split("=", 1)[1] for w in words(s) if w.startswith("--resources=")))}
    assert {k for k, v in config.ray.wait_for_resources.items() if v > 0} <= offered | {"GPU"}


def test_every_command_exists_in_the_image(tmp_path):
    dockerfile = (ROOT / "Dockerfile").read_text()
    apt = re.search(r"apt-get install[^\n]*", dockerfile).group(0)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in OURS:
        for cmd in commands(name):
            program = cmd[0]
            if program == "python":
                assert cmd[1] == "-m"
                out = subprocess.run([sys.executable, *cmd[1:3], str(tmp_path / "clip.mp4"), "1"], cwd=ROOT,
                                     capture_output=True, encoding="utf-8", timeout=120)
                assert out.returncode == 0, out.stderr
                with av.open(str(tmp_path / "clip.mp4")) as clip:  # the sample clip really is a video
                    assert clip.streams.video[0].codec_context.name == "h264"
            elif program == "ffmpeg":
                assert " ffmpeg " in apt
            else:
                # `ray` comes with the ray wheel; ours are [project.scripts]
                assert program == "ray" or re.search(rf'^{program} = "', pyproject, re.M), program
    for src in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / src).exists(), src
    assert "max_direct_call_object_size" in (ROOT / "docker-compose.yml").read_text()


def test_prometheus_scrapes_a_service_of_the_stack():
    prom = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in SERVICES, target
    source = SERVICES["prometheus"]["volumes"][0].split(":")[0]
    assert (ROOT / source).resolve() == (ROOT / "configs" / "prometheus.yml").resolve()


def test_the_controller_serves_what_prometheus_and_the_host_reach_with_the_token_prometheus_sends(monkeypatch):
    """configs/compose.yaml had no api: section: nothing listened where Prometheus scraped, and an API on a
    non-loopback address needs a token, which Prometheus then has to send."""
    for name, value in {**ENV_EXAMPLE, **{k: interpolated(str(v)) for k, v in SERVICES["ray-head"]["environment"].items()}}.items():
        monkeypatch.setenv(name, value)
    config = load_config(ROOT / "configs" / "compose.yaml")
    job = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())["scrape_configs"][0]
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host == "ray-head" and config.api.port == int(port) and config.api.host == "0.0.0.0"
    assert config.api.all_tokens() == {"prometheus": ENV_EXAMPLE["HV_METRICS_TOKEN"]}
    # Prometheus sends the token from the file its entrypoint writes from the same variable
    token_file = job["authorization"]["credentials_file"]
    entry = " ".join(SERVICES["prometheus"]["entrypoint"])
    assert f'"$$HV_METRICS_TOKEN" > {token_file}' in entry and "exec /bin/prometheus" in entry
    assert SERVICES["prometheus"]["environment"]["HV_METRICS_TOKEN"] == "${HV_METRICS_TOKEN}"
    published = {p.split(":")[-1] for p in SERVICES["ray-head"]["ports"]}
    assert config.dashboard.enabled and {str(config.api.port), str(config.dashboard.port)} <= published
    dev = (ROOT / "dev.sh").read_text()  # ./dev.sh up writes a fresh one, also into an older .env
    assert "s/^HV_METRICS_TOKEN=.*/HV_METRICS_TOKEN=" in dev and 'echo "HV_METRICS_TOKEN=' in dev


def _with_free_agent_ports(argv: list[str]) -> list[str]:
    """In the stack every node is its own container; here they share one host, so each node's agents need
    ports of their own (Ray's defaults are fixed numbers)."""
    from pipeline.embedded_redis import free_port

    return argv + [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}"]


def _kill_ray_under(tmp: Path) -> None:
    """Ray processes started by `ray start` daemonize; this test's are the ones whose command line names its
    temp dir (never `ray stop`: it stops every Ray on the machine)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != __import__("os").getpid() and str(tmp) in " ".join(p.info["cmdline"] or []):
                p.kill()
        except psutil.Error:
            continue


def _scrape(url: str, token: str, proc: subprocess.Popen, timeout_s: float = 120) -> tuple[int, int]:
    """(status without the token, status with it) of /metrics, once the controller's API answers."""
    import time
    import urllib.error
    import urllib.request

    def status(headers: dict) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return status({}), status({"Authorization": f"Bearer {token}"})
        except OSError:  # not listening yet
            time.sleep(0.5)
    return 0, 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_stacks_ray_and_controller_commands_run_natively():
    """The ray-head and ray-worker commands of docker-compose.yml (flags, --system-config, labels, resources,
    token auth) and the controller on configs/compose.yaml, run on this machine: only the hosts differ (no
    container network here: `redis` and `rtsp` do not resolve, so the RTSP camera keeps reconnecting)."""
    import os
    import shutil
    import tempfile

    from pipeline.embedded_redis import free_port
    from pipeline.testbed import RedisServer
    from running import messages

    tmp = Path(tempfile.mkdtemp(prefix="hvn", dir="/tmp"))  # short: Ray's socket paths
    (tmp / "ray").mkdir()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex(), "REDIS_PASSWORD": "b" * 32,
           "HV_GPUS": "0", "HV_INFERENCE_REPLICAS": "1", "HV_METRICS_TOKEN": "c" * 32,
           "HV_API_PORT": str(free_port()), "HV_DASHBOARD_PORT": str(free_port())}
    head = next(c for c in commands("ray-head") if c[:2] == ["ray", "start"])
    head = [ray_bin, "start", *(f"--port={port}" if w.startswith("--port=") else interpolated(w) for w in head[2:])]
    worker = [ray_bin, "start", *(f"--address=127.0.0.1:{port}" if w.startswith("--address=") else interpolated(w)
                                  for w in words("ray-worker")[2:] if w != "--block")]
    try:
        with RedisServer(password=env["REDIS_PASSWORD"]) as redis_server:
            for argv in (head, worker):
                out = subprocess.run(_with_free_agent_ports(argv), env=env, capture_output=True, encoding="utf-8",
                                     timeout=180)
                assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            run = next(c for c in commands("ray-head") if c[:2] == ["hydravision", "run"])
            config = ROOT / Path(run[2]).relative_to(IMAGE_ROOT)
            url = f"redis://:{env['REDIS_PASSWORD']}@127.0.0.1:{redis_server.port}/0"
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), *run[3:],
                                     "--redis-url", url, "--duration", "30"], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8")
            scraped = _scrape(f"http://127.0.0.1:{env['HV_API_PORT']}/metrics", env["HV_METRICS_TOKEN"], proc)
            text, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, text[-3000:]
            assert scraped == (401, 200), text[-3000:]  # Prometheus' token opens /metrics, none does not
            assert f"Dashboard: http://0.0.0.0:{env['HV_DASHBOARD_PORT']}/" in text
            assert "Ray cluster: 2 node(s), namespace hydravision-hv" in text and "hydravision_inference=1" in text
            published = messages(redis_server.client(), "street-synthetic")
            assert len(published) >= 20, text[-3000:]
            assert env["REDIS_PASSWORD"] not in text
    finally:
        _kill_ray_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
