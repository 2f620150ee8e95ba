"""/metrics, /healthz, /readyz and the telemetry behind them (pipeline/metrics.py, pipeline/telemetry.py), found in
an audit: edge cases an operator of a long-running service meets. No Ray: stats dicts as the actors report them,
and the stand-ins of tests/test_metrics.py."""

from __future__ import annotations

from test_metrics import Clock, FakeProbe, service, tick

from pipeline.metrics import ready
from workers.settings import CameraConfig


def test_a_file_camera_started_again_by_an_update_long_after_it_ended_is_ready_while_it_opens():
    """A file camera that ended is done, not failing: ready. An update (a new file) starts it again, and while its
    new run opened (created, starting) /readyz said not ready at once: its time down was counted from the end of
    the old run, an hour before, not from the new run's start, so it was past its stall budget before it began."""
    clock, probe = Clock(), FakeProbe()
    app = service(clock, {"f": CameraConfig(id="f", url="rtsp://cam/f", read_timeout_s=2, open_timeout_s=2)})
    tick(app, clock, {"f": "running"})
    tick(app, clock, {"f": "ended"})
    clock.now += 3600
    tick(app, clock, {"f": "ended"})
    assert ready(app, probe)[0]
    tick(app, clock, {"f": "starting"})  # updated: the new run opens its file
    ok, body = ready(app, probe)
    assert ok, body
    assert body["checks"]["cameras"]["cameras"]["f"]["down_for_s"] == 0
    # the normal path: a new run that does not come up within its budget (8 s here) is not ready
    clock.now += 9
    tick(app, clock, {"f": "starting"})
    assert not ready(app, probe)[0]

