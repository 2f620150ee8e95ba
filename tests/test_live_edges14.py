"""Live control's output (fourteenth round): a refused command is one warning in the log, not two lines."""

from __future__ import annotations

import logging

import pytest

from pipeline.live_control import CommandRejected
from test_controller_edges3 import fake_ray, service  # noqa: F401 (fake_ray: a fixture)


def test_a_refused_command_is_one_warning_not_two_lines(monkeypatch, fake_ray, caplog):
    """Every refusal was printed twice: a WARNING log line and the said "Control: rejected ..." line (two records
    with --log-format json), seven refused adds made fourteen lines."""
    said: list[str] = []
    app = service(monkeypatch, said)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(CommandRejected):
            app.remove_camera("ghost", by="api:ops")
    lines = said + [r.getMessage() for r in caplog.records]
    assert sum("rejected remove of camera 'ghost'" in line for line in lines) == 1, lines
    assert [r.levelname for r in caplog.records if "rejected remove" in r.getMessage()] == ["WARNING"]
