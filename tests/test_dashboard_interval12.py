"""The dashboard's polling period has a floor: `--interval 0.001` polled Redis a thousand times a second and kept
history_s / interval (300,000) chart points per camera."""
from __future__ import annotations

from pipeline import dashboard
from pipeline.cli import main

NOWHERE = "redis://127.0.0.1:1/0"


def test_an_interval_below_a_tenth_of_a_second_is_refused_naming_it(capsys, monkeypatch):
    monkeypatch.setattr(dashboard, "serve", lambda *a, **k: 0)  # not reached when refused; served, returns 0
    assert main(["dashboard", "--interval", "0.001", "--redis-url", NOWHERE]) == 2
    assert "--interval must be at least 0.1 seconds, got 0.001" in capsys.readouterr().err
    assert main(["dashboard", "--interval", "0.1", "--redis-url", NOWHERE]) == 0
