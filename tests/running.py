"""Test helper: a hydravision App running in a background thread, with waits on what Redis shows."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from mot import read_stream
from pipeline.app import App
from pipeline.config import parse_config
from workers.publish import keys


class RunningApp:
    """Starts an App, runs its control loop in a thread (as `hydravision run` does), stops it on exit."""

    def __init__(self, redis_url: str, checkpoint: Path, cameras: list[dict], redis: dict | None = None,
                 interval: float = 0.5, api: dict | None = None, control: dict | None = None, ray: dict | None = None,
                 **inference):
        config = parse_config({
            "redis": {"url": redis_url, **(redis or {})},
            "model": {"checkpoint": str(checkpoint), "device": "cpu"},
            # One model process unless a test asks for more (test_replicas, test_metrics_live): the default's
            # second replica on a CPU cost 1.3-1.5 s more per start here, and the suite starts an App ~35 times.
            "inference": {"max_batch": 8, "max_wait_ms": 5, "replicas": 1, **inference},
            "status": {"interval_s": interval},
            "api": api or {},
            "control": control or {},
            "ray": ray or {},
            "cameras": cameras,
        })
        self.log: list[str] = []
        self.app = App(config, say=self.log.append)
        self.finals: list[dict] | None = None
        self._thread: threading.Thread | None = None
        self.latest: list[dict] = []

    def __enter__(self) -> "RunningApp":
        self.app.start()
        self._thread = threading.Thread(target=self.app.run, kwargs={"on_tick": self._tick}, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Waits until the App's run loop returned (every camera's source ended); True if it did."""
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _tick(self, stats: list[dict]) -> None:
        self.latest = stats

    def stop(self) -> list[dict]:
        if self.finals is None:
            self.app.request_stop()
            if self._thread:
                self._thread.join(30)
            self.finals = self.app.shutdown()
        return self.finals

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def camera(self, cid: str) -> dict:
        return next((s for s in self.latest if s.get("camera") == cid), {})


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events(client, camera: str | None = None, type_: str | None = None, prefix: str = "hv") -> list[dict]:
    return [e for e in read_stream(client, keys(prefix).events)
            if (camera is None or e["camera"] == camera) and (type_ is None or e["type"] == type_)]


def messages(client, camera: str, prefix: str = "hv") -> list[dict]:
    return read_stream(client, keys(prefix).detections(camera))
