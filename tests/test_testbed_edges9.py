"""What a newcomer and CI run first (dev.sh, .ci/run) and the clips the tests and benchmarks share. dev.sh and
.ci/run run here on copies, with stand-ins (shell scripts first on PATH) for apt-get, sudo, Python and the rest."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest
import redis

from synthetic.clips import encode_mp4

ROOT = Path(__file__).resolve().parents[1]


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _copy_dev_sh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dev.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, folder / name)
    return folder / "dev.sh"


def test_two_runs_making_one_clip_at_once_both_end_with_a_whole_clip(tmp_path):
    """Both wrote into one fixed partial file: the first to finish renamed it from under the other, which then
    failed (FileNotFoundError) after writing its frames into the finished clip (benchmarks cache clips in /tmp)."""
    path = tmp_path / "street.mp4"

    def frames(count: int, value: int, meanwhile=None):
        for i in range(count):
            yield np.full((64, 64, 3), value, np.uint8)
            if i == 2 and meanwhile:
                meanwhile()  # the other run makes the same clip while this one is half-way

    encode_mp4(path, frames(10, 60, lambda: encode_mp4(path, frames(20, 200), fps=25)), fps=25)
    with av.open(str(path)) as clip:
        pictures = [f.to_ndarray(format="rgb24") for f in clip.decode(video=0)]
    assert len(pictures) == 10 and all(abs(int(p.mean()) - 60) < 8 for p in pictures)  # the last rename's clip
    assert [p.name for p in tmp_path.iterdir()] == ["street.mp4"]  # no partial file left


def test_dev_sh_run_from_another_folder_prints_its_usage(tmp_path):
    """dev.sh works in its own folder (cd at the start), but printed its usage from "$0" read relative to the
    caller's: `bash "my checkout/dev.sh" help` (or a mistyped command) said "sed: can't read ..." instead."""
    _copy_dev_sh(tmp_path / "my checkout")
    run = subprocess.run(["bash", "my checkout/dev.sh", "help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert "./dev.sh demo" in run.stdout and "./dev.sh test" in run.stdout, run.stderr
    assert run.stderr == ""


def test_dev_sh_apt_get_gets_debian_frontend_through_sudo(tmp_path):
    """`DEBIAN_FRONTEND=noninteractive sudo apt-get ...` sets the variable for sudo, which resets the environment
    (env_reset): apt-get never saw it. Stand-ins: a non-root user, a sudo that resets the environment, an apt-get
    that records what it got, and a missing x264enc so that system-deps installs."""
    dev_sh = _copy_dev_sh(tmp_path / "repo")
    shims = tmp_path / "shims"
    shims.mkdir()
    _script(shims / "id", '#!/bin/sh\n[ "$1" = -u ] && echo 1000 && exit 0\nexec /usr/bin/id "$@"\n')
    _script(shims / "sudo", '#!/bin/sh\nexec /usr/bin/env -i PATH="$PATH" "$@"\n')  # sudo's env_reset
    _script(shims / "apt-get", f'#!/bin/sh\necho "${{DEBIAN_FRONTEND:-unset}} $1" >> "{tmp_path}/apt-calls"\n')
    _script(shims / "gst-inspect-1.0", "#!/bin/sh\nexit 1\n")
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(dev_sh), "system-deps"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert "noninteractive install" in calls, calls


def test_dev_sh_refuses_a_python_older_than_the_project_needs(tmp_path):
    """A python3 older than 3.10 (Debian 11's 3.9) made .venv, failed on torch ("no matching distribution", not
    the Python), and every later run kept that .venv, PYTHON=python3.11 included. Stand-in: a Python 3.9 whose
    venv is made; its python answers -V and the version check as 3.9 would, and logs anything else (pip)."""
    dev_sh = _copy_dev_sh(tmp_path / "repo")
    old = _script(tmp_path / "python3.9", f"""#!/bin/sh
# python3.9 -m venv --clear DIR
eval dir=\\${{$#}}
mkdir -p "$dir/bin"
cat > "$dir/bin/python" <<'PY'
#!/bin/sh
case "$1" in
    -V) echo "Python 3.9.2" ;;
    -c) exit 1 ;;  # sys.exit(sys.version_info < (3, 10)) on 3.9
    *) echo "$*" >> "{tmp_path}/pip-calls" ;;
esac
PY
chmod +x "$dir/bin/python"
""")
    run = subprocess.run(["bash", str(dev_sh), "setup"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHON": str(old)})
    assert run.returncode == 1
    assert "needs Python >= 3.10" in run.stderr and "Python 3.9.2" in run.stderr, run.stderr
    assert not (tmp_path / "pip-calls").exists() and not (tmp_path / "repo" / ".venv").exists()


def test_dev_sh_installs_the_rtsp_servers_plugins_when_one_is_missing(tmp_path):
    """system-deps took GStreamer for installed when x264enc was there: without plugins-bad (h264parse) or -good
    (qtdemux, rtph264pay) it installed nothing and the RTSP tests skipped (failed on CI). Stand-ins: a gst-inspect
    without h264parse, an apt-get that records its calls."""
    gi = subprocess.run(["/usr/bin/python3", "-c", 'import gi; gi.require_version("GstRtspServer", "1.0")'],
                        capture_output=True)
    if gi.returncode != 0:  # dev.sh checks the bindings with the real /usr/bin/python3
        pytest.skip("no GStreamer RTSP server bindings for /usr/bin/python3: system-deps installs anyway")
    dev_sh = _copy_dev_sh(tmp_path / "repo")
    shims = tmp_path / "shims"
    shims.mkdir()
    _script(shims / "id", '#!/bin/sh\n[ "$1" = -u ] && echo 0 && exit 0\nexec /usr/bin/id "$@"\n')  # root: no sudo
    _script(shims / "apt-get", f'#!/bin/sh\necho "$1" >> "{tmp_path}/apt-calls"\n')
    _script(shims / "gst-inspect-1.0", '#!/bin/sh\n[ "$1" != h264parse ]\n')
    for name in ("redis-server", "ffmpeg", "node", "npm", "chromium"):  # the rest is there
        _script(shims / name, "#!/bin/sh\nexit 0\n")
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(dev_sh), "system-deps"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "apt-calls").read_text().split() == ["update", "install"]
    _script(shims / "gst-inspect-1.0", "#!/bin/sh\nexit 0\n")  # all there now: nothing more to install
    assert subprocess.run(["bash", str(dev_sh), "system-deps"], env=env, timeout=60).returncode == 0
    assert (tmp_path / "apt-calls").read_text().split() == ["update", "install"]


def test_dev_sh_run_with_sh_runs_under_bash(tmp_path):
    """`sh dev.sh test` (a CI config, a habit) ran it under dash, which stopped at once on `set -o pipefail`
    ("Illegal option -o pipefail") and did nothing else."""
    if shutil.which("dash") is None:
        pytest.skip("no dash: the sh that lacks bash's options")
    dev_sh = _copy_dev_sh(tmp_path / "repo")
    run = subprocess.run(["dash", str(dev_sh), "help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "./dev.sh demo" in run.stdout and run.stderr == "", run.stderr


def test_ci_run_makes_a_missing_server_fail_the_tests(tmp_path):
    """tests/servers.py fails instead of skipping a test whose server is missing only when $CI is set; .ci/run
    installs them all first, but on a CI host that does not set $CI a broken install skipped them and went green.
    Stand-in: a dev.sh that records what it got."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    _script(tmp_path / "dev.sh", f'#!/bin/sh\necho "$1 ${{CI:-unset}}" >> "{tmp_path}/calls"\n')
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    run = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "calls").read_text().splitlines() == ["system-deps true", "setup true", "test true"]
    env["CI"] = "1"  # a host's own value is kept
    subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, timeout=60, check=True)
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "test 1"


def test_dev_sh_updates_the_venv_of_a_copied_checkout(tmp_path):
    """The stamp of a set-up .venv held only pyproject.toml and dev.sh: in a copied (or moved) checkout setup did
    nothing, and its .venv's editable install and scripts went on running the first checkout's code. Stand-in: a
    .venv whose python logs what it is asked."""
    first = tmp_path / "first"
    _copy_dev_sh(first)
    (first / ".venv" / "bin").mkdir(parents=True)
    for name in ("python", "hydravision"):
        _script(first / ".venv" / "bin" / name, '#!/bin/sh\necho "$*" >> "$(dirname "$0")/../calls"\n')
    assert subprocess.run(["bash", "dev.sh", "setup"], cwd=first, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(["bash", "dev.sh", "setup"], cwd=first, capture_output=True, timeout=60).returncode == 0
    installs = (first / ".venv" / "calls").read_text().count("-e .[test]")
    assert installs == 1  # a second run in place does nothing
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, symlinks=True)
    (copy / ".venv" / "calls").unlink()
    run = subprocess.run(["bash", "dev.sh", "setup"], cwd=copy, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "-e .[test]" in (copy / ".venv" / "calls").read_text()


def test_a_server_that_ended_by_itself_starts_again(redis_server):
    """A server that crashed or shut down on its own (not through kill()/stop()) could not be started again:
    start() said it "is already running on port ..." about a dead process."""
    port = redis_server.port
    with redis_server.client() as client:
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:  # the server closes the connection as it goes
            pass
    deadline = time.monotonic() + 30
    while redis_server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not redis_server.running
    redis_server.start()
    assert redis_server.port == port and redis_server.client().ping()


def test_a_killed_runs_partial_clip_is_removed_by_the_next_one(tmp_path):
    """Each run writes its own partial file (a random name), which a SIGKILL leaves behind for good: nothing
    overwrites it as the fixed name was. One an hour old goes when the clip is made again; a fresh one (another
    run's, under way) stays."""
    import os
    import time

    import numpy as np

    from synthetic.clips import encode_mp4

    old, fresh = tmp_path / ".street.0badc0de.partial.mp4", tmp_path / ".street.1234abcd.partial.mp4"
    for leftover in (old, fresh):
        leftover.write_bytes(b"half a clip")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    encode_mp4(tmp_path / "street.mp4", (np.zeros((32, 32, 3), np.uint8) for _ in range(3)), 10)
    assert not old.exists() and fresh.exists() and (tmp_path / "street.mp4").is_file()
