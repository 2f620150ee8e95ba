"""Signals and logs of `hydravision run` as a service manager runs it (an operator's report, issue 16).

1. With --log-format json, records of Ray's own Python loggers in the controller came out as plain text on stderr:
   setup_logging cleared Ray's handler before Ray was imported, and `import ray` (pipeline/app.py, imported lazily)
   put it back. They are JSON lines now whatever the import order.
2. SIGUSR1 / SIGUSR2 (logrotate's "reopen your logs") and SIGQUIT ended the controller as a crash (exit -10, -3: no
   drain, no final table, statuses left stale). SIGUSR1/2 are now answered with one line and the run goes on;
   SIGQUIT stops it as SIGTERM does.
3. No config reload exists, README did not say so, and SIGHUP (which stops the run) read as a reload to a systemd
   unit's `ExecReload=kill -HUP`.
4. With --log-format json the line saying why the command ended ("error: api: cannot listen ...", "interrupted")
   was plain text on stderr, absent from the JSON lines: now an error record with the exit code.

The signal tests run `hydravision run`'s code (pipeline/cli.py, pipeline/run_commands.py) with the real App's signal
handlers in a child process, its camera work stood in for: the stand-in sends itself the signals where the run is,
so nothing depends on timing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    # prlimit: a signal whose default action dumps core (SIGQUIT, before the fix) leaves no file (no preexec_fn:
    # docs/architecture.md, "Hangs of the test suite", says why)
    return subprocess.run(["prlimit", "--core=0", "--", sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # every line is one JSON object, or this raises


# -- 1. Ray's loggers in JSON mode, Ray imported after setup_logging ------------------------------------------------
RAY_AFTER = r"""
import logging
from pipeline.logs import setup_logging
setup_logging(False, "json")
import ray  # what `import pipeline.app` does, after the CLI set logging up
logging.getLogger("ray._private.authentication.authentication_token_setup").warning("Token authentication is on")
logging.getLogger("ray").warning("a record of Ray's own logger")
logging.getLogger("ray").info("below Ray's level: %s", logging.getLevelName(logging.getLogger("ray").level))
"""


def test_ray_records_are_json_lines_when_ray_is_imported_after_setup_logging():
    done = python(RAY_AFTER)
    assert done.returncode == 0, done.stderr
    assert "Token authentication" not in done.stderr and "Ray's own" not in done.stderr, done.stderr  # plain before
    records = json_lines(done.stdout)
    assert [(r["level"], r["logger"], r["msg"]) for r in records] == [
        ("warning", "ray._private.authentication.authentication_token_setup", "Token authentication is on"),
        ("warning", "ray", "a record of Ray's own logger"),
        ("info", "ray", "below Ray's level: INFO"),  # Ray's level (INFO at import) left as Ray sets it
    ], done.stdout


def test_text_output_leaves_rays_own_handler_alone():
    """The routing is JSON mode's: in text output Ray's records keep Ray's own format, as before, also in a process
    that had JSON lines first (a program calling cli.main twice, a test)."""
    done = python(RAY_AFTER.replace('setup_logging(False, "json")',
                                    'setup_logging(False, "json"); setup_logging(False, "text")'))
    assert done.returncode == 0, done.stderr
    assert re.search(r"\tWARNING <string>:\d+ -- a record of Ray's own logger", done.stderr), done.stderr


# -- 2 and 4. signals, and why a run ended ------------------------------------------------------------------------
# `hydravision run CONFIG` through pipeline.cli.main, the App's cameras stood in for. The stand-in's run() sends
# itself SIGNALS one after the other, saying on stderr after each that it still runs; its shutdown, the drain, sends
# SECOND if any. START: "fails" (a port in use) or "interrupted" ends the start.
RUN = r"""
import os, signal, sys
from pipeline import cli, run_commands
from pipeline.app import App
from pipeline.errors import UserError

SIGNALS = [getattr(signal, name) for name in sys.argv[1].split(",") if name]
SECOND = getattr(signal, sys.argv[2]) if sys.argv[2] != "-" else None
START = sys.argv[3]
TICK = [{"camera": "cam", "state": "running", "published": 5, "in_slot": 1, "in_flight": 2,
         "publisher": {"queued": 4}}]


class StandIn(App):
    def start(self):
        if START == "fails":
            raise UserError("api: cannot listen on 127.0.0.1:16401: Address already in use")
        if START == "interrupted":
            raise KeyboardInterrupt

    def run(self, duration=None, on_tick=None):
        on_tick(TICK)
        for signum in SIGNALS:
            os.kill(os.getpid(), signum)  # its handler runs before the next line
            print("still running after", signal.Signals(signum).name, file=sys.stderr, flush=True)
        while not self._stop.wait(0.05):
            pass
        return TICK

    def shutdown(self, drain=True, timeout=20.0):
        if SECOND is not None:
            os.kill(os.getpid(), SECOND)  # its handler runs before the next line: exits at once
            sys.exit(99)
        return [{"camera": "cam", "state": "stopped", "published": 5, "fps": 5.0}]


run_commands.App = StandIn
sys.exit(cli.main(["run", sys.argv[4], *sys.argv[5:]]))
"""


def hydravision_run(tmp_path: Path, signals: str, second: str = "-", start: str = "-",
                    log_format: str = "text") -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    config.write_text("cameras: []\ncontrol: {enabled: true}\n")
    output = ["--log-format", "json"] if log_format == "json" else ["--plain"]
    return python(RUN, signals, second, start, str(config), *output, "--summary-json", str(tmp_path / "summary.json"))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_sigusr1_and_sigusr2_say_so_and_the_run_goes_on(tmp_path, log_format):
    done = hydravision_run(tmp_path, "SIGUSR1,SIGUSR2,SIGUSR1,SIGTERM", log_format=log_format)
    assert done.returncode == 0, done.stdout + done.stderr  # was -10: killed by SIGUSR1, as by a crash
    assert done.stderr.splitlines()[-4:] == [f"still running after {name}" for name in
                                             ("SIGUSR1", "SIGUSR2", "SIGUSR1", "SIGTERM")], done.stderr
    said = ([r["msg"] for r in json_lines(done.stdout)] if log_format == "json" else done.stdout.splitlines())
    for name in ("SIGUSR1", "SIGUSR2"):
        assert f"{name} ignored: no log file to reopen (the logs go to stdout and stderr) and no config to reload " \
               "(a change to it needs a restart)" in said, done.stdout
    assert len([line for line in said if " ignored: no log file to reopen" in line]) == 3, said  # one line each
    assert said.index("SIGTERM: draining in-flight frames and flushing Redis (send it again to exit at once)") \
        < said.index("Stopping: draining in-flight frames, flushing Redis ..."), said
    assert json.loads((tmp_path / "summary.json").read_text())[0]["state"] == "stopped"


def test_sigquit_drains_and_stops_as_sigterm_does(tmp_path):
    done = hydravision_run(tmp_path, "SIGQUIT")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out  # was -3: killed by it, as by a crash
    assert "SIGQUIT: stopping as on SIGTERM" in out and "(the terminal or session closed)" not in out, out
    assert "SIGTERM: draining in-flight frames and flushing Redis" in out, out
    assert out.index("Stopping: draining") < out.index("final"), out
    assert json.loads((tmp_path / "summary.json").read_text())[0]["state"] == "stopped"


def test_a_second_sigquit_during_the_drain_exits_at_once_as_sigterm_does(tmp_path):
    done = hydravision_run(tmp_path, "SIGQUIT", second="SIGQUIT")
    out = done.stdout + done.stderr
    assert done.returncode == 143, out
    assert done.stdout.splitlines()[-1].startswith("A second signal: exiting at once (exit 143), the drain "
                                                   "abandoned"), out
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("start, code, message", [
    ("fails", 2, "error: api: cannot listen on 127.0.0.1:16401: Address already in use"),
    ("interrupted", 130, "interrupted")])
def test_why_a_run_ended_is_a_json_record_in_json_mode(tmp_path, start, code, message):
    done = hydravision_run(tmp_path, "", start=start, log_format="json")
    assert done.returncode == code, done.stdout + done.stderr
    assert message not in done.stderr, done.stderr  # plain text on stderr, beside the JSON lines, before
    last = json_lines(done.stdout)[-1]
    assert (last["level"], last["logger"], last["msg"], last["event"], last["exit_code"]) == \
        ("error", "hydravision", message, "exit", code), done.stdout


@pytest.mark.parametrize("start, code, message", [
    ("fails", 2, "error: api: cannot listen on 127.0.0.1:16401: Address already in use"),
    ("interrupted", 130, "interrupted")])
def test_why_a_run_ended_stays_a_plain_line_on_stderr_in_text_output(tmp_path, start, code, message):
    done = hydravision_run(tmp_path, "", start=start)
    assert done.returncode == code and done.stderr.splitlines()[-1] == message, done.stdout + done.stderr


# -- 3. no reload ------------------------------------------------------------------------------------------------
def test_readme_says_there_is_no_reload_and_that_sighup_stops():
    readme = (ROOT / "README.md").read_text()
    operating = readme[readme.index("\n## Operating it\n"):]
    operating = " ".join(operating[:operating.index("\n## ", 1)].split())
    assert "There is no reload: an edit to the config file takes effect at the next start" in operating
    assert re.search(r"SIGHUP and SIGQUIT \(Ctrl-\\\) stop it as Ctrl-C does", operating), operating
    assert "SIGHUP is no reload" in operating
    # a systemd example that reloads with SIGHUP would stop the service
    assert not re.search(r"^\s*ExecReload\s*=.*(HUP|-1\b)", readme, re.M)
