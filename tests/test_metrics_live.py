"""/metrics, /healthz and /readyz of a running service (Ray, real redis-server), served by the App's own HTTP
API (api.port 0: a free port; the routes come from App.api_extensions' default) and scraped over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from running import RunningApp, wait_for


class ApiClient:
    """The running App's HTTP API, as Prometheus and an orchestrator's probes reach it."""

    def __init__(self, app) -> None:
        assert app.api_server is not None, "the App serves no HTTP API"
        self.url = app.api_server.url

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


def scrape(api: ApiClient) -> dict:
    """{sample name: {frozenset(labels): value}}, parsed with prometheus-client's text parser."""
    r = api.get("/metrics")
    assert r.status_code == 200
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def get(samples: dict, name: str, **labels) -> float:
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def ready(api: ApiClient) -> tuple[int, dict]:
    r = api.get("/readyz")
    return r.status_code, r.json()


@pytest.mark.timeout(180)
def test_metrics_grow_between_scrapes_and_readyz_follows_redis(ray_local, redis_server, tiny_checkpoint):
    cams = [{"id": "cam-a", "url": "synthetic://street?seed=1&fps=10", "fps": 5},
            {"id": "cam-b", "url": "synthetic://street?seed=2&fps=10", "max_frame_age_ms": 2000}]
    with RunningApp(redis_server.url, tiny_checkpoint, cams, api={"port": 0}, replicas=None) as run:  # the default
        api = ApiClient(run.app)
        ids = [c["id"] for c in cams]
        published = "hydravision_frames_total"

        def published_everywhere(samples: dict) -> bool:
            return all(get(samples, published, camera=c, outcome="published") > 0 for c in ids)

        first = wait_for(lambda: (lambda m: published_everywhere(m) and m)(scrape(api)), 60, "frames on /metrics")
        second = wait_for(lambda: (lambda m: all(get(m, published, camera=c, outcome="published")
                                                 > get(first, published, camera=c, outcome="published") + 3
                                                 for c in ids) and m)(scrape(api)), 30, "more frames on /metrics")
        for c in ids:
            assert get(second, "hydravision_frames_decoded_total", camera=c) > \
                get(first, "hydravision_frames_decoded_total", camera=c)
            assert get(second, "hydravision_frame_age_seconds_count", camera=c) >= \
                get(second, published, camera=c, outcome="published") > 0
            assert get(second, "hydravision_frame_age_seconds_bucket", camera=c, le="+Inf") == \
                get(second, "hydravision_frame_age_seconds_count", camera=c)
            outcomes = sum(v for k, v in second[published].items() if ("camera", c) in k)
            assert get(second, "hydravision_frames_decoded_total", camera=c) == \
                outcomes + get(second, "hydravision_frames_pending", camera=c)  # one stats() per camera: exact
            assert get(second, "hydravision_camera_up", camera=c) == 1
        assert get(second, published, camera="cam-a", outcome="rate") > 0  # 5 of the scene's 10 fps analysed
        assert get(second, "hydravision_frame_age_budget_seconds", camera="cam-b") == 2.0
        assert get(second, "hydravision_inference_batch_size_count") > 0
        assert get(second, "hydravision_inference_batch_wait_seconds_count") > 0
        # Heads are timed by torch's forward hooks; ONNX Runtime (the CPU default) runs them in one graph.
        timed = run.app.model_info["backend"] == "torch"
        assert (get(second, "hydravision_head_seconds_count", head="people") > 0) == timed
        # On one machine's CPUs each camera process runs the model (two processes of one camera each here).
        assert run.app.inference == [] and get(second, "hydravision_inference_replicas_up") == 2
        assert sorted(run.app.model_holders()) == ["hv-camera-cam-a", "hv-camera-cam-b"]
        assert get(second, "hydravision_actor_restarts_total", role="stream") == 0
        print({c: (get(first, published, camera=c, outcome="published"),
                   get(second, published, camera=c, outcome="published")) for c in ids})

        status, body = wait_for(lambda: (lambda r: r[0] == 200 and r)(ready(api)), 30, "ready")
        assert body["checks"]["cameras"]["ok"] and body["checks"]["model"]["ok"]
        errors_before = get(second, "hydravision_redis_errors_total", publisher="cam-a")

        t_stop = time.monotonic()
        redis_server.stop()
        status, body = wait_for(lambda: (lambda r: r[0] == 503 and r)(ready(api)), 15, "not ready without Redis")
        noticed = time.monotonic() - t_stop
        assert body["checks"]["redis"]["ok"] is False and body["checks"]["cameras"]["ok"]
        assert api.get("/healthz").status_code == 200  # alive, just not ready
        wait_for(lambda: get(scrape(api), "hydravision_redis_errors_total", publisher="cam-a") > errors_before, 20,
                 "failed Redis writes counted")

        t_start = time.monotonic()
        redis_server.start()
        wait_for(lambda: ready(api)[0] == 200, 30, "ready again after Redis restarted")
        back = time.monotonic() - t_start
        print(f"readyz: not ready {noticed:.1f} s after Redis stopped, ready {back:.1f} s after it restarted")
        before = get(scrape(api), published, camera="cam-a", outcome="published")
        wait_for(lambda: get(scrape(api), published, camera="cam-a", outcome="published") > before + 3, 30,
                 "frames after the outage")

        # A camera's actor crashes and Ray restarts it: its counters start from zero in the new process, and
        # /metrics must neither go backwards nor lose the invariant.
        before = scrape(api)
        ray.kill(run.app.cameras["cam-a"].process, no_restart=False)
        # the first scrape after the restart: the new process has counted (almost) nothing yet
        after = wait_for(lambda: (lambda m: get(m, "hydravision_actor_restarts_total", role="stream") == 1
                                  and m)(scrape(api)), 40, "the restart on /metrics")
        for name in ("hydravision_frames_decoded_total", published, "hydravision_frame_age_seconds_count"):
            for labels, v in before[name].items():
                assert after[name][labels] >= v, (name, labels, v, after[name][labels])
        outcomes = sum(v for k, v in after[published].items() if ("camera", "cam-a") in k)
        assert get(after, "hydravision_frames_decoded_total", camera="cam-a") == \
            outcomes + get(after, "hydravision_frames_pending", camera="cam-a")
        wait_for(lambda: get(scrape(api), published, camera="cam-a", outcome="published")
                 > get(after, published, camera="cam-a", outcome="published") + 3, 30, "frames after the restart")
