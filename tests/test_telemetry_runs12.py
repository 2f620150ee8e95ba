"""A file camera started again by an update runs a new pipeline in the same process: its counters start from 0.
Telemetry told that restart only by a counter going backwards, so when the new run had already counted past the
old run's totals by the next tick (a short file), the old run's frames vanished from /metrics and the final
table. The camera's stats now name the run (CameraHost.runs)."""
from __future__ import annotations

from pipeline.telemetry import Telemetry


def stats(run: int, decoded: int, published: int, redis_errors: int = 0) -> dict:
    return {"camera": "file", "state": "running", "pid": 4242, "run": run, "decoded": decoded,
            "published": published, "skipped": 0, "dropped": {}, "reconnects": 0,
            "publisher": {"retries": redis_errors}}


def test_a_new_run_in_the_same_process_adds_to_the_old_runs_totals():
    t = Telemetry()
    t.record_cameras([stats(1, 40, 40, redis_errors=2)])
    t.record_cameras([stats(2, 55, 55, redis_errors=3)])  # the new run is past the old one's 40 already
    [whole] = t.whole_run([stats(2, 55, 55)])
    assert (whole["decoded"], whole["published"]) == (95, 95)
    assert t._cameras["file"].counters.value("redis.errors") == 3  # the Publisher's, which outlives runs


def test_the_same_run_counting_on_is_no_restart():
    t = Telemetry()
    t.record_cameras([stats(1, 40, 40)])
    t.record_cameras([stats(1, 55, 55)])
    [whole] = t.whole_run([stats(1, 55, 55)])
    assert (whole["decoded"], whole["published"]) == (55, 55)


def test_a_camera_host_names_its_run_and_an_update_of_an_ended_file_starts_the_next(redis_server):
    import asyncio

    from test_camera_update import until
    from test_stream_edges import MODEL_INFO, Replica
    from workers.settings import CameraConfig, RedisConfig
    from workers.stream import CameraHost

    camera = CameraConfig(id="file", url="synthetic://street?seed=1&frames=2&size=160x96", realtime=False,
                          heads=["people"])

    async def main() -> list:
        host = CameraHost(camera, [Replica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        try:
            await asyncio.wait_for(host.wait(), 20)
            first = await host.stats()
            second = camera.model_copy(update={"url": "synthetic://street?seed=2&frames=3&size=160x96"})
            assert (await host.update(second))["restarted"]
            await until(lambda: host.pipeline.state == "ended", 20, "the second file to end")
            return [first["run"], (await host.stats())["run"], (await host.stop())["run"]]
        finally:
            await host.stop()

    assert asyncio.run(main()) == [1, 2, 2]
