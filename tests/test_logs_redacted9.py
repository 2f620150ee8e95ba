"""Text logs redact what they pass on unread: the JSON logs masked any URL's userinfo in a message, an exception or
a stack, the text logs (the default, also the camera and inference processes' lines Ray forwards) printed them."""

from __future__ import annotations

import logging
import subprocess
import sys

from workers.redact import log_to_stderr

SECRET = "rtsp://admin:hunter2@10.0.0.5:554/stream"


def test_a_text_log_line_masks_a_urls_password_in_its_message_and_traceback(monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    log_to_stderr(logging.INFO, "%(levelname)s %(name)s: %(message)s")
    try:
        raise OSError(f"{SECRET}: Connection refused")  # as FFmpeg's text names what it opened
    except OSError:
        logging.getLogger("edge").exception("camera failed: %s", SECRET)
    err = capsys.readouterr().err
    assert "hunter2" not in err and err.count("rtsp://***@10.0.0.5:554/stream") == 2, err


def test_log_to_stderr_leaves_logging_set_up_by_someone_else_alone(monkeypatch):
    root = logging.getLogger()
    theirs = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [theirs])
    log_to_stderr(logging.DEBUG, "%(message)s")
    assert root.handlers == [theirs]


def test_the_cli_text_log_masks_a_password():
    """The CLI's own text logging (setup_logging), as an operator's journal keeps it."""
    code = ("import logging; from pipeline.logs import setup_logging; setup_logging(); "
            f"logging.getLogger('x').warning('could not open %s', {SECRET!r})")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert "could not open rtsp://***@10.0.0.5" in err and "hunter2" not in err, err
