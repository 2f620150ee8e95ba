"""OpenVINO's compile_model with a CACHE_DIR sets the process's locale to "C" while it runs and puts back the one it
found. Two compiles at once on two threads (a session's ExactShapes compiling in the background while another
session, of another export, compiles) could have the second save the first's "C" and put it back last: LC_CTYPE
stayed "C" (seen as conftest's "left LC_CTYPE 'C'" warning after test_openvino_backend's ExactShapes tests). The
sessions' compiles are serialized in the process (workers/model_runner.py, _COMPILE_LOCK)."""
from __future__ import annotations

import locale
import threading
import time

from workers import model_runner
from workers.model_runner import OpenVinoSession


class _Compiled:
    def create_infer_request(self):
        return object()

    def output(self, name):
        return name


class _Core:
    """compile_model as libopenvino's does it with a CACHE_DIR: save LC_CTYPE, set "C", work, put back what it saved."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self._count = threading.Lock()

    def compile_model(self, graph, device, config):
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        saved = locale.setlocale(locale.LC_CTYPE)
        locale.setlocale(locale.LC_CTYPE, "C")
        time.sleep(graph)  # the "graph" is how long this compile takes
        locale.setlocale(locale.LC_CTYPE, saved)
        with self._count:
            self.running -= 1
        return _Compiled()


def _session(folder, seconds: float) -> OpenVinoSession:
    """An OpenVinoSession of its own export (its own cache folder) whose dynamic compile takes ``seconds``."""
    folder.mkdir()
    session = object.__new__(OpenVinoSession)
    session._graph, session.compiled, session.config, session.names = seconds, folder, {"CACHE_DIR": str(folder)}, []
    return session


def test_two_sessions_compiling_at_once_leave_the_locale_as_it_was(monkeypatch, tmp_path):
    core = _Core()
    monkeypatch.setattr(model_runner, "openvino_core", lambda: core)
    first, second = _session(tmp_path / "a.onnx.compiled", 0.3), _session(tmp_path / "b.onnx.compiled", 0.5)
    before = locale.setlocale(locale.LC_CTYPE)
    assert before != "C"  # LANG is C.UTF-8 here; under a plain C locale there is nothing to lose
    try:
        # the second starts while the first holds "C" and ends after it: unserialized, it puts "C" back last
        late = threading.Thread(target=lambda: (time.sleep(0.1), second._compile(None)))
        late.start()
        first._compile(None)
        late.join()
        assert locale.setlocale(locale.LC_CTYPE) == before
        assert core.most == 1, "two compiles ran at once"
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
