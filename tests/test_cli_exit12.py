"""`hydravision` (pipeline.cli.entry) in a process that imported Ray ends without the interpreter's finalization,
after its own clean-up: atexit hooks run, what it printed is out, its exit code is main()'s. (That finalization,
beside the native threads a ray.init cut short by a signal leaves, aborted the process now and then after it had
said "interrupted": exit -6 instead of 130, tests/test_interrupt_edges8.py.)"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import atexit, sys
import ray  # as `run` imports it
atexit.register(lambda: print("atexit hook ran", flush=True))
sys.argv = ["hydravision", "status", "--redis-url", "redis://127.0.0.1:1/0"]
from pipeline.cli import entry
entry()
print("not reached")
"""


def test_a_process_that_imported_ray_ends_with_mains_code_after_its_clean_up():
    done = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)  # status: no Redis there
    assert "atexit hook ran" in done.stdout and "not reached" not in done.stdout, done.stdout
    assert "127.0.0.1:1" in done.stderr, done.stderr  # the error it printed is out


def test_the_installed_command_is_entry():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'hydravision = "pipeline.cli:entry"' in text
