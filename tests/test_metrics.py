"""pipeline/metrics.py without Ray: stats dicts as the actors report them -> Telemetry -> the Prometheus text a
scrape returns, parsed back with prometheus-client's own parser; /healthz and /readyz decisions."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import health, metrics_registry, ready
from pipeline.telemetry import Telemetry
from workers.histograms import (BATCH_WAIT_BUCKETS, FRAME_AGE_BUCKETS, HEAD_SECONDS_BUCKETS, Histogram)
from workers.settings import CAMERA_ID, CameraConfig

SECRET = "hunter2-secret"


def hist(edges, values):
    h = Histogram(edges)
    h.observe_many(values)
    return h.snapshot()


def camera_stats(cid="lobby", pid=100, decoded=105, published=80, skipped=5, rate=10, budget=3, overload=4, error=1,
                 in_slot=1, in_flight=1, ages=(0.02, 0.2, 0.3, 2.0), state="running", **extra):
    assert decoded == published + skipped + rate + budget + overload + error + in_slot + in_flight
    return {"camera": cid, "pid": pid, "state": state, "url": f"rtsp://admin:***@cam/{cid}",
            "decoded": decoded, "published": published, "skipped": skipped, "in_slot": in_slot, "in_flight": in_flight,
            "dropped": {"rate": rate, "budget": budget, "overload": overload, "error": error, "shutdown": 0},
            "reconnects": 2, "fps": 12.5, "last_frame_ts": 1.7e9, "target_fps": 20.0,
            "last_error": f"cannot open rtsp://admin:{SECRET}@cam/{cid}",
            "frame_age": hist(FRAME_AGE_BUCKETS, ages),
            "budget": {"max_frame_age_ms": 300.0, "fps": 20.0, "actions": {"batch_wait": 1, "fps": 1}},
            "publisher": {"retries": 3, "dropped": 0, "connected": True, "last_error": None}, **extra}


def inference_stats(pid=200, **extra):
    return {"pid": pid, "batches": 10, "frames": 30, "batch_sizes": {1: 2, 4: 7},  # 2 + 28 = 30 frames
            "head_frames": {"people": 30, "vehicles": 12},
            "batch_wait": hist(BATCH_WAIT_BUCKETS, [0.001] * 30), "batch_seconds": hist((0.05, 0.1), [0.04] * 10),
            "head_seconds": {"people": hist(HEAD_SECONDS_BUCKETS, [0.004] * 10),
                             "vehicles": hist(HEAD_SECONDS_BUCKETS, [0.006] * 4)}, **extra}


def scrape(telemetry: Telemetry) -> dict:
    """{sample name: {frozenset(labels): value}} from the text a scrape returns."""
    text = generate_latest(metrics_registry(telemetry)).decode()
    assert SECRET not in text and "admin" not in text  # no credential, and no URL at all, in any label
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[name][frozenset(labels.items())]


def test_camera_counters_histograms_and_the_counting_invariant():
    t = Telemetry()
    t.record_cameras([camera_stats("lobby"), camera_stats("dock", decoded=50, published=40, skipped=0, rate=5, budget=0,
                                                          overload=3, error=0, in_slot=0, in_flight=2)])
    m = scrape(t)
    assert value(m, "hydravision_frames_decoded_total", camera="lobby") == 105
    outcomes = {o: value(m, "hydravision_frames_total", camera="lobby", outcome=o)
                for o in ("published", "skipped", "rate", "budget", "overload", "error", "shutdown", "lost")}
    assert outcomes == {"published": 80, "skipped": 5, "rate": 10, "budget": 3, "overload": 4, "error": 1, "shutdown": 0, "lost": 0}
    for cid in ("lobby", "dock"):  # decoded = sum of outcomes + pending, as docs/architecture.md says
        total = sum(v for k, v in m["hydravision_frames_total"].items() if ("camera", cid) in k)
        assert value(m, "hydravision_frames_decoded_total", camera=cid) == \
            total + value(m, "hydravision_frames_pending", camera=cid)
    # the frame-age histogram: cumulative buckets in seconds, +Inf = count, sum of the ages
    assert value(m, "hydravision_frame_age_seconds_bucket", camera="lobby", le="0.025") == 1
    assert value(m, "hydravision_frame_age_seconds_bucket", camera="lobby", le="0.3") == 3  # 0.3 is <= 0.3
    assert value(m, "hydravision_frame_age_seconds_bucket", camera="lobby", le="+Inf") == 4
    assert value(m, "hydravision_frame_age_seconds_count", camera="lobby") == 4
    assert value(m, "hydravision_frame_age_seconds_sum", camera="lobby") == pytest.approx(2.52)
    assert value(m, "hydravision_camera_up", camera="lobby") == 1
    assert value(m, "hydravision_camera_target_fps", camera="lobby") == 20
    assert value(m, "hydravision_frame_age_budget_seconds", camera="lobby") == 0.3
    assert value(m, "hydravision_budget_actions_total", camera="lobby", action="fps") == 1
    assert value(m, "hydravision_redis_errors_total", publisher="lobby") == 3


def test_inference_histograms_sum_over_replicas_and_newer_counters_are_read_when_present():
    t = Telemetry()
    t.record_inference(0, inference_stats(pid=1))
    t.record_inference(1, inference_stats(pid=2, queue_depth=5, shed=4, expired=1, cancelled=0, batch_limit=16))
    t.record_cameras([])
    m = scrape(t)
    assert value(m, "hydravision_inference_batch_size_count") == 18  # batches of both replicas
    assert value(m, "hydravision_inference_batch_size_sum") == 60  # frames
    assert value(m, "hydravision_inference_batch_size_bucket", le="1.0") == 4
    assert value(m, "hydravision_inference_batch_size_bucket", le="4.0") == 18
    assert value(m, "hydravision_inference_batch_wait_seconds_count") == 60
    assert value(m, "hydravision_head_seconds_count", head="people") == 20
    assert value(m, "hydravision_head_seconds_bucket", head="vehicles", le="0.005") == 0
    assert value(m, "hydravision_head_seconds_bucket", head="vehicles", le="0.01") == 8
    assert value(m, "hydravision_head_frames_total", head="vehicles") == 24
    assert value(m, "hydravision_queue_depth") == 5
    assert value(m, "hydravision_inference_batch_limit", replica="1") == 16  # the replica that reports one
    assert ("replica", "0") not in {k for labels in m["hydravision_inference_batch_limit"] for k in labels}
    assert value(m, "hydravision_inference_rejected_total", reason="shed") == 4
    assert value(m, "hydravision_inference_replicas_up") == 2


def test_counters_never_go_backwards_when_an_actor_restarts():
    t = Telemetry()
    t.record_cameras([camera_stats(pid=100)])
    before = scrape(t)
    # Ray restarted the camera's actor: a new process counting from zero.
    t.record_cameras([camera_stats(pid=101, decoded=10, published=8, skipped=0, rate=1, budget=0, overload=0, error=0,
                                   in_slot=1, in_flight=0, ages=(0.1,))])
    after = scrape(t)
    for name in ("hydravision_frames_decoded_total", "hydravision_frames_total", "hydravision_frame_age_seconds_count",
                 "hydravision_redis_errors_total", "hydravision_camera_reconnects_total"):
        for labels, v in before[name].items():
            assert after[name][labels] >= v, (name, labels)
    assert value(after, "hydravision_frames_decoded_total", camera="lobby") == 115
    assert value(after, "hydravision_frames_total", camera="lobby", outcome="published") == 88
    # the 2 frames the dead process held (slot + in flight) are counted once, as lost: the invariant holds
    assert value(after, "hydravision_frames_total", camera="lobby", outcome="lost") == 2
    outcomes = sum(v for k, v in after["hydravision_frames_total"].items())
    assert 115 == outcomes + value(after, "hydravision_frames_pending", camera="lobby")
    assert value(after, "hydravision_frame_age_seconds_count", camera="lobby") == 5
    # same for an inference replica
    t.record_inference(0, inference_stats(pid=1))
    t.record_inference(0, inference_stats(pid=2))
    assert value(scrape(t), "hydravision_inference_batch_size_count") == 18


def test_a_budget_dropped_by_a_live_update_is_no_restart_and_its_actions_count_on():
    t = Telemetry()
    t.record_cameras([camera_stats(pid=100)])  # its budget took actions batch_wait 1, fps 1
    # The same process a tick later: a live update (fps, url or max_frame_age_ms) dropped the budget.
    dropped = camera_stats(pid=100, decoded=110, published=85)
    dropped["budget"] = None
    t.record_cameras([dropped])
    m = scrape(t)
    assert value(m, "hydravision_frames_decoded_total", camera="lobby") == 110
    assert value(m, "hydravision_frames_total", camera="lobby", outcome="published") == 85
    assert value(m, "hydravision_frames_total", camera="lobby", outcome="lost") == 0
    assert value(m, "hydravision_frame_age_seconds_count", camera="lobby") == 4
    assert value(m, "hydravision_redis_errors_total", publisher="lobby") == 3
    assert value(m, "hydravision_budget_actions_total", camera="lobby", action="batch_wait") == 1
    # The new budget counts its actions from zero: they add to the old one's.
    renewed = camera_stats(pid=100, decoded=115, published=90)
    renewed["budget"] = {"max_frame_age_ms": 300.0, "fps": 10.0, "actions": {"fps": 1}}
    t.record_cameras([renewed])
    m = scrape(t)
    assert value(m, "hydravision_frames_decoded_total", camera="lobby") == 115
    assert value(m, "hydravision_budget_actions_total", camera="lobby", action="fps") == 2
    assert value(m, "hydravision_budget_actions_total", camera="lobby", action="batch_wait") == 1


def test_a_budget_replaced_between_two_reads_is_no_restart_either():
    """The new budget acted before the next status tick saw the old one gone: its count of an action, lower
    than the old one's, read as a counter going backwards, i.e. a restarted process, and every counter of the
    camera was added a second time (decoded 215 for 115)."""
    t = Telemetry()
    t.record_cameras([camera_stats(pid=100)])  # its budget took actions batch_wait 1, fps 1
    renewed = camera_stats(pid=100, decoded=115, published=90)
    renewed["budget"] = {"max_frame_age_ms": 300.0, "fps": 10.0, "actions": {"batch_wait": 0, "fps": 1}}
    t.record_cameras([renewed])
    m = scrape(t)
    assert value(m, "hydravision_frames_decoded_total", camera="lobby") == 115
    assert value(m, "hydravision_frames_total", camera="lobby", outcome="published") == 90
    assert value(m, "hydravision_budget_actions_total", camera="lobby", action="batch_wait") == 1
    # fps 1 -> 1 cannot be told from a counter that stood still: 1, where the two budgets took 2 (a new budget
    # takes as many actions as the old one within one tick: rare, and the count is low, never doubled)
    assert value(m, "hydravision_budget_actions_total", camera="lobby", action="fps") == 1


def test_a_model_that_goes_away_keeps_its_counts_in_the_sums():
    t = Telemetry()
    t.record_inference("hv-stream-0", inference_stats(pid=1))
    t.record_inference("hv-stream-1", inference_stats(pid=2, shed=4, expired=1, cancelled=0, batch_limit=16))
    t.record_cameras([])
    before = scrape(t)
    t.keep_inference(["hv-stream-0"])  # the process that ran its own model ended with its last camera
    t.record_inference("hv-stream-0", inference_stats(pid=1))
    after = scrape(t)
    summed = [name for name in before if name.startswith(("hydravision_inference_batch_", "hydravision_head_",
                                                          "hydravision_inference_rejected_"))]
    assert "hydravision_head_frames_total" in summed and "hydravision_inference_batch_size_count" in summed
    for name in summed:
        if name != "hydravision_inference_batch_limit":  # a gauge per model: it goes with the model
            assert after[name] == before[name], name
    assert "hydravision_inference_batch_limit" not in after
    assert value(after, "hydravision_inference_replicas_up") == 1
    # once no model is left, the sums stay too
    t.keep_inference([])
    assert value(scrape(t), "hydravision_head_frames_total", head="people") == 60


def test_a_camera_that_is_restarting_keeps_its_counters_and_a_removed_one_disappears():
    t = Telemetry()
    t.record_cameras([camera_stats("lobby"), camera_stats("dock")])
    t.record_cameras([{"camera": "lobby", "state": "unavailable", "last_error": "RayActorError"},
                      camera_stats("dock")], present=["lobby", "dock"])
    m = scrape(t)
    assert value(m, "hydravision_frames_decoded_total", camera="lobby") == 105
    assert value(m, "hydravision_camera_up", camera="lobby") == 0
    t.record_cameras([camera_stats("dock")], present=["dock"])
    m = scrape(t)
    assert all(("camera", "lobby") not in labels for labels in m["hydravision_frames_decoded_total"])


# -- /healthz and /readyz ---------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    def __init__(self) -> None:
        self.ok = True

    def check(self):
        return (True, None) if self.ok else (False, "ConnectionError: refused")


def service(clock: Clock, cameras: dict[str, CameraConfig]):
    """What ready() reads of an App: telemetry, the replicas, model info, the cameras' configs, stopping."""
    return SimpleNamespace(telemetry=Telemetry(clock), model_holders=lambda: {0: "replica-0"}, model_info={"heads": {}},
                           cameras={cid: SimpleNamespace(config=c) for cid, c in cameras.items()},
                           stopping=False, redis_settings=None, config=SimpleNamespace(status=SimpleNamespace(interval_s=1.0)))


def tick(app, clock, states: dict[str, str], replica_answers: bool = True):
    app.telemetry.record_inference(0, inference_stats() if replica_answers else None)
    app.telemetry.record_cameras([camera_stats(cid, state=s) for cid, s in states.items()], present=list(states))


def test_ready_needs_redis_the_model_and_every_camera_up_or_within_its_reconnect_budget():
    clock, probe = Clock(), FakeProbe()
    cams = {"a": CameraConfig(id="a", url="rtsp://cam/a", read_timeout_s=2, open_timeout_s=2),  # grace 8 s
            "b": CameraConfig(id="b", url="rtsp://cam/b")}
    app = service(clock, cams)
    tick(app, clock, {"a": "running", "b": "running"})
    assert ready(app, probe)[0]
    tick(app, clock, {"a": "reconnecting", "b": "running"})
    clock.now += 7
    tick(app, clock, {"a": "reconnecting", "b": "running"})
    ok, details = ready(app, probe)
    assert ok, details  # 7 s of the 8 s budget
    clock.now += 2
    tick(app, clock, {"a": "reconnecting", "b": "running"})
    ok, details = ready(app, probe)
    assert not ok and not details["checks"]["cameras"]["cameras"]["a"]["ok"]
    assert details["checks"]["cameras"]["cameras"]["a"]["down_for_s"] == 9
    tick(app, clock, {"a": "running", "b": "ended"})  # back; a file that ended is done, not failing
    assert ready(app, probe)[0]
    probe.ok = False
    ok, details = ready(app, probe)
    assert not ok and details["checks"]["redis"] == {"ok": False, "error": "ConnectionError: refused"}
    probe.ok = True
    tick(app, clock, {"a": "running", "b": "running"}, replica_answers=False)  # the model is restarting
    ok, details = ready(app, probe)
    assert not ok and details["checks"]["model"]["answering"] == 0
    tick(app, clock, {"a": "failed", "b": "running"})
    assert not ready(app, probe)[0]
    tick(app, clock, {"a": "running", "b": "running"})
    app.stopping = True
    assert not ready(app, probe)[0]


def test_healthy_while_the_control_loop_ticks_even_when_not_ready():
    clock = Clock()
    app = service(clock, {"a": CameraConfig(id="a", url="rtsp://cam/a")})
    assert health(app)[0]  # not started yet: alive
    tick(app, clock, {"a": "failed"})
    assert health(app)[0] and not ready(app, FakeProbe())[0]
    clock.now += 31
    ok, details = health(app)
    assert not ok and details["control_loop_age_s"] == 31


def test_router_status_codes_and_content_type():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.metrics import include_metrics

    clock = Clock()
    app = service(clock, {"a": CameraConfig(id="a", url="rtsp://cam/a")})
    tick(app, clock, {"a": "running"})
    api = FastAPI()
    include_metrics(api, app)
    with TestClient(api) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'hydravision_frames_total{camera="a",outcome="published"} 80.0' in r.text
        r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n") and 'hydravision_frames_total{camera="a",outcome="published"} 80.0' in r.text
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")  # no Redis configured: not ready, and it says why
        assert r.status_code == 503 and r.json()["checks"]["redis"]["ok"] is False
        # uptime monitors probe with HEAD: 405 Method Not Allowed read as down
        assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 503
        assert "/healthz" in api.openapi()["paths"]  # one GET operation each: no duplicate operation ids


def test_telemetry_snapshots_are_copies():
    t = Telemetry()
    stats = camera_stats()
    t.record_cameras([stats])
    snap = t.snapshot()
    stats["decoded"] = 10**6
    snap.cameras["lobby"].stats["state"] = "changed"
    assert t.snapshot().cameras["lobby"].stats["state"] == "running"
    assert copy.deepcopy(snap).cameras["lobby"].counters.value("decoded") == 105


def test_a_camera_named_controller_and_the_controllers_publisher_are_two_series():
    """The controller's Publisher was labelled publisher="controller", a valid camera id: two samples with
    the same labels and different values, of which a scraper keeps one."""
    from pipeline.app import CONTROLLER_PUBLISHER

    t = Telemetry()
    t.record_cameras([camera_stats("controller")])
    t.record_publisher(CONTROLLER_PUBLISHER, {"retries": 7, "dropped": 2})
    m = scrape(t)
    assert value(m, "hydravision_redis_errors_total", publisher="controller") == 3
    assert value(m, "hydravision_redis_errors_total", publisher=CONTROLLER_PUBLISHER) == 7
    assert value(m, "hydravision_redis_messages_dropped_total", publisher=CONTROLLER_PUBLISHER) == 2
    assert not CAMERA_ID.match(CONTROLLER_PUBLISHER)
