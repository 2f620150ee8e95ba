"""A forked child that runs Python before its exec (Ray starts its processes with a preexec_fn) must not free a
decoding thread's PyAV state: FFmpeg's teardown there can wait for ever (round 18)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = """
import os, subprocess, sys, threading
import av
from workers import source_base
from workers.source_base import SourceFrame

with av.open(sys.argv[1]) as container:
    picture = next(container.decode(video=0))
converted, release = threading.Event(), threading.Event()

used = []  # the id of the thread's reformatter (no reference: the thread-local must hold the only one)

def camera_thread():  # converts as a decode thread does, then lives on (its reformatter kept in its thread-local)
    SourceFrame(index=0, pts=0.0, wall=0.0, size=(picture.height, picture.width), image=picture).to_model_input(
        (256, 448))
    used.append(id(source_base._reformatter()))
    converted.set()
    release.wait(60)

threading.Thread(target=camera_thread, daemon=True).start()
assert converted.wait(60)

def in_child():  # after CPython freed the other threads' thread-locals in this child: is that reformatter alive?
    kept = getattr(source_base, "_kept_in_forked_child", [])  # (before the fix: no such list, it was freed)
    os._exit(0 if [id(r) for r in kept] == used else 3)

print("child exit", subprocess.run(["true"], preexec_fn=in_child).returncode)
release.set()
"""


def test_a_forked_child_keeps_a_decoding_threads_reformatter(bikes_mp4: Path) -> None:
    """A test run hung for good in such a child: it freed the thread's VideoReformatter (py-spy: do_fork_exec ->
    VideoReformatter dealloc -> sws_freeContext -> avpriv_slicethread_free -> pthread_cond_destroy). Run in a
    process of its own: a fork here could hang this test worker if the fix were gone."""
    done = subprocess.run([sys.executable, "-c", SCENARIO, str(bikes_mp4)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "child exit 0" in done.stdout, done.stdout + done.stderr
