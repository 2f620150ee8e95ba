"""A camera's run ended by a bug (an exception out of CameraPipeline.run) is that camera's failure, said as one:
its status went on saying running with fresh heartbeats, the controller's wait on it raised (so a service over
files never ended: App.finished took it for a crashed process, which Ray never restarted) and its stop raised."""
from __future__ import annotations

import asyncio
import pytest

from test_stream_edges import MODEL_INFO, Replica, decoder_threads
from pipeline.status import read_camera_statuses
from workers.settings import CameraConfig, RedisConfig
from workers.stream import CameraHost, CameraPipeline


@pytest.mark.timeout(60)
def test_a_pipeline_that_raises_ends_failed_and_says_why(redis_server, monkeypatch):
    gate = CameraPipeline._motion_gate

    def broken(self, item):
        if item.index >= 3:
            raise RuntimeError("boom in the main loop")
        return gate(self, item)

    monkeypatch.setattr(CameraPipeline, "_motion_gate", broken)
    camera = CameraConfig(id="buggy", url="synthetic://street?seed=1&fps=20&size=160x96", heads=["people"])

    async def main() -> tuple[dict, dict]:
        host = CameraHost(camera, [Replica()], MODEL_INFO, RedisConfig(url=redis_server.url), instance="run-1")
        await host.start()
        final = await asyncio.wait_for(host.wait(), 20)
        stopped = await asyncio.wait_for(host.stop(), 20)
        return final, stopped

    final, stopped = asyncio.run(main())
    assert final["state"] == stopped["state"] == "failed", final
    assert "pipeline failed: RuntimeError: boom in the main loop" in final["last_error"]
    assert decoder_threads("buggy") == 0
    [status] = read_camera_statuses(redis_server.client(), "hv")
    assert status["state"] == "failed" and "boom in the main loop" in status["last_error"], status
