"""Deployment edges, round 11: the compose stack's Redis outlived `docker compose stop` (its shell, not the server,
was the process Docker signals), its controller had no health check, the image reinstalled every dependency on
any change to the code, and docs/scaling.md's KubeRay head never started the controller. No container or
Kubernetes runs here (FIELD-NOTES): their commands run natively with stand-ins (the image's entrypoint, `ray`,
`hydravision`), the Dockerfile is read as Docker's build cache reads it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from servers import free_port, require_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
SOURCES = ("pipeline", "workers", "models", "synthetic")  # the packages pyproject.toml installs


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_compose_redis_is_the_process_docker_stop_signals(tmp_path):
    """`docker compose stop` sends SIGTERM to the container's main process. The redis service ran
    `sh -c 'printf ... | exec redis-server -'`: the main process was the shell (as PID 1 it ignores SIGTERM), so
    the server never heard of the stop and was SIGKILLed after the 10 s grace (an append-only file cut short).
    Run natively with a stand-in for the image's entrypoint: the signalled process must be the server, and it
    must shut down by itself."""
    require_binary("redis-server")
    port = free_port()
    shim = tmp_path / "bin"
    shim.mkdir()
    _script(shim / "docker-entrypoint.sh", f'#!/bin/sh\nexec "$@" --port {port} --bind 127.0.0.1\n')
    script = COMPOSE["services"]["redis"]["command"][2]
    script = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: ENV_EXAMPLE.get(m.group(1), m.group(2)),
                    script.replace("$$", "$"))  # as compose passes it, with .env.example's values
    password = "c3" * 16
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "REDIS_PASSWORD": password}
    main = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, password=password, socket_timeout=5)
    try:
        deadline = time.monotonic() + 30
        while not _answers(client):
            assert main.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        main.send_signal(signal.SIGTERM)  # what `docker compose stop` does to the container's main process
        assert main.wait(30) == 0  # the server itself, shut down cleanly (a shell killed by the signal: -15)
        deadline = time.monotonic() + 15
        while _answers(client):  # the original's server went on answering after its shell had gone
            assert time.monotonic() < deadline, "redis-server outlived the stop"
            time.sleep(0.1)
    finally:
        try:
            os.killpg(main.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        main.wait(10)


def _dockerfile_steps() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", "", (ROOT / "Dockerfile").read_text())  # as Docker joins them
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_image_installs_the_dependencies_in_a_layer_the_code_does_not_invalidate(tmp_path):
    """Docker reuses a layer only while every file COPYed before it is unchanged. The Dockerfile copied the code
    and then ran `pip install .`, so an edit to one line of pipeline/ downloaded and installed ray, OpenVINO,
    ONNX Runtime, OpenCV... (~1 GB) again on every `./dev.sh up`. The dependencies now install from
    pyproject.toml alone, before the code; the list that layer installs is pyproject.toml's."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as in the image
    steps = _dockerfile_steps()
    first_code = next(i for i, s in enumerate(steps)
                      if s.startswith("COPY ") and set(s.split()[1:-1]) & set(SOURCES))
    installs = [i for i, s in enumerate(steps[:first_code])
                if s.startswith("RUN ") and re.search(r"pip install .*-r ", s)]
    assert installs, "no layer installs the project's dependencies before the code is copied"
    copied = {src for s in steps[:installs[0]] if s.startswith("COPY ") for src in s.split()[1:-1]}
    assert copied <= {"pyproject.toml"}, copied  # README.md too would reinstall them on every edit of the docs
    argv = shlex.split(steps[installs[0]][len("RUN "):])
    code = argv[argv.index("-c") + 1]  # python -c '...' > requirements: run here as the build runs it
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, encoding="utf-8",
                         timeout=60)
    assert out.returncode == 0, out.stderr
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.stdout.splitlines() == wanted
    last_install = max(i for i, s in enumerate(steps) if s.startswith("RUN ") and "pip install ." in s)
    assert last_install > max(i for i, s in enumerate(steps) if s.startswith("COPY ")
                              and set(s.split()[1:-1]) & set(SOURCES))  # the project itself, after its code


def _kuberay_cluster() -> dict:
    """The RayCluster sketch of docs/scaling.md."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "kind: RayCluster" in b)
    return yaml.safe_load(block)


def _kuberay_start_cmd(params: dict, head: bool) -> str:
    """KUBERAY_GEN_RAY_START_CMD as KubeRay writes it (ray-operator/controllers/ray/common/pod.go): `--block`
    forced on every node, the keys sorted, each value pasted in as it is (a "true" one as a bare switch)."""
    params = {**params, "block": "true", **({} if head else {"address": "hydravision-head-svc:6379"})}
    flags = "".join(f" --{k} " if str(v).lower() == "true" else f" --{k}={v} " for k, v in sorted(params.items()))
    return ("ray start --head " if head else "ray start ") + flags


def _run_pod_command(tmp_path: Path, container: dict, start_cmd: str,
                     blocks: bool) -> subprocess.CompletedProcess | None:
    """The container's command and args under bash, with stand-ins for `ray` (records its argv; given --block it
    blocks as the real one does if ``blocks``) and `hydravision`; None if it still ran after a generous deadline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _script(bin_dir / "ray", f"#!{sys.executable}\nimport json, sys, time\n"
            f"open({str(tmp_path / 'ray-argv')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
            f"if {blocks!r} and '--block' in sys.argv:\n    time.sleep(120)\n")
    _script(bin_dir / "hydravision", f'#!/bin/sh\necho "$*" > "{tmp_path}/hydravision-argv"\n')
    command = container["command"]
    argv = [command[0], "-c", *command[2:], *container["args"]]  # bash -lc: -c without the login profile here
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBERAY_GEN_RAY_START_CMD": start_cmd}
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            encoding="utf-8", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=20)
        return subprocess.CompletedProcess(argv, proc.returncode, out)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_kuberay_sketch_starts_the_controller_and_passes_rays_json_whole(tmp_path):
    """docs/scaling.md's RayCluster ran `$KUBERAY_GEN_RAY_START_CMD && exec hydravision run ...` on the head, but
    KubeRay always puts --block in that command: `ray start` never returned and the controller never started.
    And the command reached `ray start` word-split, unquoted: --system-config's JSON (it has spaces) and the
    workers' --resources came apart. Run here under bash with stand-ins for `ray` and `hydravision`."""
    from pipeline.app import RAY_SYSTEM_CONFIG
    from pipeline.config import RayConfig

    cluster = _kuberay_cluster()
    head = cluster["spec"]["headGroupSpec"]
    done = _run_pod_command(tmp_path, head["template"]["spec"]["containers"][0],
                            _kuberay_start_cmd(head["rayStartParams"], head=True), blocks=True)
    assert done is not None, "the head's command never got past `ray start --block`"
    assert done.returncode == 0, done.stdout
    ray_argv = json.loads((tmp_path / "ray-argv").read_text())
    assert ray_argv[:2] == ["start", "--head"] and "--block" not in ray_argv
    config = next(a.split("=", 1)[1] for a in ray_argv if a.startswith("--system-config="))
    assert json.loads(config) == RAY_SYSTEM_CONFIG, ray_argv
    assert (tmp_path / "hydravision-argv").read_text().split() == ["run", "/etc/hydravision/config.yaml", "--plain"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        (tmp_path / "ray-argv").unlink()
        start_cmd = _kuberay_start_cmd(group["rayStartParams"], head=False)
        done = _run_pod_command(tmp_path, group["template"]["spec"]["containers"][0], start_cmd, blocks=False)
        assert done is not None and done.returncode == 0, done and done.stdout
        ray_argv = json.loads((tmp_path / "ray-argv").read_text())
        assert ray_argv[0] == "start" and "--block" in ray_argv, ray_argv
        resources = [a.split("=", 1)[1] for a in ray_argv if a.startswith("--resources=")]
        if "resources" in group["rayStartParams"]:
            assert RayConfig().inference_resource in json.loads(resources[0]), ray_argv
        assert all(a.startswith("--") for a in ray_argv[1:]), ray_argv  # no JSON torn into stray words


def _seconds(duration: str) -> int:
    return sum(int(n) * {"m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([ms])", duration))


def test_compose_controller_has_a_liveness_check_on_its_api(monkeypatch):
    """The ray-head service had no healthcheck: a controller whose loop had stuck showed `Up` in `docker compose ps`
    for ever (and `up --wait` waited for nothing). Its check asks the API's /healthz on the port configs/compose.yaml
    serves it on; run here against a stand-in server: 200 passes, 503 and nothing listening fail, and so does 200
    "starting" (the API answers during the start; `up --wait` must still wait for its end, round 18)."""
    import http.server
    import threading

    from pipeline.config import load_config

    check = COMPOSE["services"]["ray-head"].get("healthcheck")
    assert check, "ray-head has no healthcheck"
    for name, value in {**ENV_EXAMPLE, "HV_GPUS": "0", "HV_INFERENCE_REPLICAS": "1"}.items():
        monkeypatch.setenv(name, value)
    config = load_config(ROOT / "configs" / "compose.yaml")
    assert check["test"][0] == "CMD" and check["test"][1] == "python"  # the image's python; no shell needed
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", check["test"][-1])
    assert url and int(url.group(1)) == config.api.port and url.group(2) == "/healthz", check["test"]
    assert _seconds(check["start_period"]) >= config.ray.placement_timeout_s  # a start waiting for the workers
    status = {"code": 200, "body": b'{"ok": true}'}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(status["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def probe(port: int) -> int:
        code = check["test"][-1].replace(f":{url.group(1)}/", f":{port}/")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode

    try:
        assert probe(server.server_address[1]) == 0
        status["body"] = b'{"ok": true, "starting": true}'
        assert probe(server.server_address[1]) != 0
        status["code"], status["body"] = 503, b'{"ok": false}'
        assert probe(server.server_address[1]) != 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe(free_port()) != 0
