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


def test_a_start_given_up_on_stops_what_it_started(monkeypatch):
    """A dashboard slower to start than its timeout (a loaded machine) raised and left its server thread, the
    Hub's poller and the listening socket running under a controller that went on without them."""
    import threading

    import pytest
    import uvicorn

    def slow_run(self, sockets=None):  # never says it started; ends when told to
        while not self.should_exit:
            threading.Event().wait(0.01)

    monkeypatch.setattr(uvicorn.Server, "run", slow_run)
    server = dashboard.DashboardServer(NOWHERE, interval_s=5)
    with pytest.raises(RuntimeError, match="the dashboard did not start"):
        server.start(timeout=0.3)
    server._thread.join(5)
    assert not server._thread.is_alive() and server.socket.fileno() == -1


def test_the_configs_dashboard_interval_has_the_same_floor():
    import pytest

    from pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"dashboard\.interval_s"):
        parse_config({"cameras": [], "dashboard": {"enabled": True, "interval_s": 0.001}})
    assert parse_config({"cameras": [], "dashboard": {"interval_s": 0.1}}).dashboard.interval_s == 0.1
