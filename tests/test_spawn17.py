"""Servers started by tests and the embedded Redis: no Python between fork and exec (round 17)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pipeline import embedded_redis


@pytest.mark.skipif(embedded_redis._SETPRIV is None, reason="needs Linux and util-linux's setpriv")
def test_a_server_is_tied_to_us_without_a_preexec_fn(monkeypatch):
    """A full suite hung for good: a test process's forked child, running the preexec_fn that set PR_SET_PDEATHSIG,
    freed a PyAV reformatter (a decoder thread's, gone in the child) and waited in FFmpeg's thread pool teardown
    before its exec (py-spy: do_fork_exec -> VideoReformatter dealloc -> avpriv_slicethread_free). setpriv ties it."""
    made: list[tuple[list[str], dict]] = []
    real = subprocess.Popen

    def popen(args, **kwargs):
        made.append((list(args), kwargs))
        return real(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    sleeper = embedded_redis.popen_tied_to_us([shutil.which("sleep") or "sleep", "30"])
    try:
        [(args, kwargs)] = made
        assert kwargs.get("preexec_fn") is None
        assert args[:4] == [embedded_redis._SETPRIV, "--pdeathsig", "KILL", "--"]
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_program_not_found_is_still_popens_own_error():
    with pytest.raises(FileNotFoundError):
        embedded_redis.popen_tied_to_us(["no-such-program-hv17"])


def test_a_program_not_found_is_refused_without_a_fork(monkeypatch):
    """The fallback for a program setpriv could not find forked with the preexec_fn: the very hang setpriv avoids
    (a fresh clone's suite hung in that fork, after this file's test of a missing program)."""
    if embedded_redis._SETPRIV is None:
        pytest.skip("needs Linux and util-linux's setpriv")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("forked"))
    with pytest.raises(FileNotFoundError):
        embedded_redis.popen_tied_to_us(["no-such-program-hv17"])
    with pytest.raises(FileNotFoundError):
        embedded_redis.popen_tied_to_us(["./no-such-program-hv17"])
