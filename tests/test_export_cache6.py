"""The ONNX export cache under several processes and over a long run: one export per checkpoint content whatever
its names, no lock or half-written export left by a maker that failed or died, the key hashed in chunks, and the
files a running service uses kept by the cache's pruning."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from models import export
from models.checkpoint import load_checkpoint
from models.export import CACHE_MAX_AGE_DAYS, EXPORTER, OPSET, cache_path, cached, cached_export
from workers import model_runner
from workers.model_runner import ModelRunner

DEADLINE_S = 120.0  # generous: a shared 2-core machine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """A cache holding the tiny model's export, made once for the tests that copy it (an export takes seconds)."""
    seed = tmp_path_factory.mktemp("seed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRAVISION_CACHE", str(seed))
        cached_export(load_checkpoint(tiny_checkpoint)[0], tiny_checkpoint)
    return seed / "onnx"


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_thread(call) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_two_names_of_the_same_weights_starting_together_export_once(tiny_checkpoint, tmp_path, cache, monkeypatch):
    """Two replicas' temp copies of one checkpoint (named differently) starting on an empty cache: the lock was
    the file name's, so the second did not wait and exported again beside the first (seconds to minutes, and
    its compiled forms built twice). Now it waits for the first's export and takes it. (Threads and a stand-in
    exporter: the lock is across open files, and torch's TorchScript exporter is not thread-safe.)"""
    a = shutil.copy(tiny_checkpoint, tmp_path / "a.safetensors")
    b = shutil.copy(tiny_checkpoint, tmp_path / "b.safetensors")
    locking, made = [], []
    real_lock = export.file_lock
    monkeypatch.setattr(export, "file_lock", lambda path, **kw: (locking.append(path), real_lock(path, **kw))[1])

    def exporting(model, path, **kwargs):
        made.append(path)
        wait_for(lambda: len(locking) >= 2, "the second replica to reach the lock")  # it starts meanwhile
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setattr(export, "export_onnx", exporting)
    first, got_a = in_thread(lambda: cached_export(None, a))
    wait_for(lambda: made, "the first export to begin")
    second, got_b = in_thread(lambda: cached_export(None, b))
    for thread in (first, second):
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
    assert made == [cache / f"a-{cache_path(a).stem[-16:]}.onnx"] and got_a == got_b == made
    assert sorted(p.name for p in cache.iterdir()) == [made[0].name]  # no lock file left either


KILLED_MAKER = """
import fcntl, os, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
with open(sys.argv[2] + f".{os.getpid()}.tmp", "wb") as half:  # as export_onnx writes, then renames
    half.write(b"half an export")
print("exporting", flush=True)
time.sleep(600)
"""


def test_a_failed_or_killed_export_leaves_no_lock_or_half_file_and_a_later_start_exports(tiny_checkpoint, cache,
                                                                                         monkeypatch):
    """An export that raised left its lock file for good (never pruned: locks were 'removed by their holders');
    one killed half-way (OOM, a replica's restart) left its temporary file, hundreds of MB for a large backbone,
    for a day each. A later start never waited on either nor took the half file: it exports again, and now
    clears what the dead maker left. (A stand-in exporter: what is tested is the cache around it.)"""

    def failing(*args, **kwargs):
        raise RuntimeError("the exporter failed")

    monkeypatch.setattr(export, "export_onnx", failing)
    with pytest.raises(RuntimeError, match="the exporter failed"):
        cached_export(None, tiny_checkpoint)
    assert list(cache.iterdir()) == []

    key = cache_path(tiny_checkpoint).stem[-16:]
    path = cache / f"tiny-{key}.onnx"
    with subprocess.Popen([sys.executable, "-c", KILLED_MAKER, str(cache / f"{key}.lock"), str(path)],
                          stdout=subprocess.PIPE, encoding="utf-8") as maker:
        try:
            assert maker.stdout.readline().strip() == "exporting"
        finally:
            maker.send_signal(signal.SIGKILL)
    monkeypatch.setattr(export, "export_onnx", lambda model, path, **kwargs: path.write_bytes(b"a whole export"))
    later, got = in_thread(lambda: cached_export(None, tiny_checkpoint))  # a thread: a hang fails, not blocks
    later.join(DEADLINE_S)
    assert not later.is_alive() and got == [path] and path.read_bytes() == b"a whole export"
    assert sorted(p.name for p in cache.iterdir()) == [path.name]


def test_the_cache_key_hashes_the_checkpoint_in_chunks_and_still_finds_the_old_exports(tmp_path, cache):
    """The key read the whole checkpoint into memory to hash it (a 1 GB backbone: 1 GB more at every start of
    every replica, cache hit or not). It is the same digest, so the files exported before are still found."""
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        for i in range(48):
            f.write(i.to_bytes(1, "little") * (1 << 20))
    tracemalloc.start()
    try:
        path = cache_path(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB to hash a 48 MB checkpoint"
    old = hashlib.sha256(big.read_bytes())  # what the key was (and the names of the files in the caches)
    old.update(f"{torch.__version__}/{OPSET}/{EXPORTER}/export".encode())
    assert path == cache / f"big-{old.hexdigest()[:16]}.onnx"


def test_a_service_running_past_the_cache_age_keeps_its_export_and_compiled_forms(tiny_checkpoint, exported,
                                                                                  cache, monkeypatch):
    """Using a file marked it only when a service started: 30 days into its run, another export on the machine
    pruned the export and OpenVINO compiled forms it ran (then each batch size compiled since failed, and a
    restart exported again). A session marks its files used while it runs."""
    shutil.copytree(exported, cache)
    runner = ModelRunner(tiny_checkpoint, backend="openvino", precision="fp32", threads=1)
    session = runner.session
    started = time.time() - (CACHE_MAX_AGE_DAYS + 1) * 86400
    for path in (session.path, session.compiled):
        os.utime(path, (started, started))
    monkeypatch.setattr(model_runner, "MARK_USED_EVERY_S", 0.0, raising=False)  # it has run every day since
    runner.run([np.zeros((3, *runner.input_size), np.uint8)], [None])
    cached(cache / "other-0123456789abcdef.onnx", lambda p: p.write_bytes(b"x"), "another export")
    assert session.path.is_file() and session.compiled.is_dir()


def test_a_batch_size_compiles_after_its_compiled_forms_folder_was_removed(tiny_checkpoint, exported, cache):
    """The cache cleared while a service runs (by hand, a tmp cleaner): each batch size compiled after it failed
    for good ("No such file or directory: .../lock", the size left at the dynamic shape). The folder is made
    again and the size compiled."""
    shutil.copytree(exported, cache)
    runner = ModelRunner(tiny_checkpoint, backend="openvino", precision="fp32", threads=1)
    shutil.rmtree(cache)
    image = np.zeros((3, *runner.input_size), np.uint8)
    assert not runner.steady(2)
    runner.run([image, image], [None, None])
    runner.session.exact_shapes.wait()
    assert runner.exact_shapes() == [2]


def test_a_lock_file_removed_while_another_waits_for_it_is_never_held_twice(tmp_path, monkeypatch):
    """Removing a lock file when its holder is done (now also when its make failed) leaves a waiter holding the
    removed file while a newcomer makes and locks a new one: both would make the export. A waiter that gets a
    removed file takes the one at the path instead."""
    path = tmp_path / "key.lock"
    opened, holding, release = threading.Event(), threading.Event(), threading.Event()
    real_flock = export.fcntl.flock

    def flock(lock, how):  # the waiter has opened the file that is about to be removed
        if threading.current_thread() is waiter:
            opened.set()
        return real_flock(lock, how)

    def wait_in_line():
        with export.file_lock(path):
            holding.set()
            release.wait(DEADLINE_S)

    with export.file_lock(path):
        monkeypatch.setattr(export.fcntl, "flock", flock)
        waiter = threading.Thread(target=wait_in_line, daemon=True)
        waiter.start()
        assert opened.wait(DEADLINE_S)
        path.unlink()  # as its holder does when it is done
    try:
        assert holding.wait(DEADLINE_S)
        monkeypatch.setattr(export.fcntl, "flock", real_flock)
        with open(path, "a") as newcomer:
            with pytest.raises(BlockingIOError):
                real_flock(newcomer, export.fcntl.LOCK_EX | export.fcntl.LOCK_NB)
    finally:
        release.set()
        waiter.join(DEADLINE_S)


def test_a_process_waiting_for_another_ones_export_says_so(tmp_path, caplog):
    """A replica waiting on another's export of a large model (minutes) said nothing meanwhile."""
    import logging

    path, got = tmp_path / "key.lock", threading.Event()

    def wait_in_line():
        with export.file_lock(path):
            got.set()

    with caplog.at_level(logging.INFO, logger=export.log.name):
        with export.file_lock(path):
            waiter = threading.Thread(target=wait_in_line, daemon=True)
            waiter.start()
            deadline = time.monotonic() + DEADLINE_S
            while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "waiting for another process that holds" in caplog.text and not got.is_set()
        assert got.wait(DEADLINE_S)
    waiter.join(DEADLINE_S)  # it let the lock go (got is set while it still holds it)
    # the normal path: a free lock is taken without a word
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=export.log.name), export.file_lock(path):
        pass
    assert "waiting" not in caplog.text
