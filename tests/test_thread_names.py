"""hydravision's threads carry their names to the OS (workers/thread_names.py), so `top -H` and the benchmarks'
CPU by thread (benchmarks/measure.py:thread_cpu) can tell decoding, the model, the event loop and Redis writes
apart inside a camera process."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from workers.inference import InferenceService
from workers.publish import Publisher
from workers.stream import CameraPipeline
from workers.thread_names import name_native_thread


def os_names() -> set[str]:
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            names.add(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return names


def test_a_thread_is_named_for_the_os_cut_to_fifteen_bytes():
    seen = []

    def named():
        name_native_thread("hv-cap a-camera-with-a-long-name")
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    t = threading.Thread(target=named)
    t.start()
    t.join()
    assert seen == ["hv-cap a-camera"]


@pytest.mark.timeout(60)
def test_a_camera_process_threads_are_named_by_what_they_do(tiny_checkpoint, redis_server):
    service = InferenceService(tiny_checkpoint, device="cpu", max_batch=4, max_wait_ms=2)
    camera = {"id": "cam-n", "url": "synthetic://street?seed=3&fps=25", "heads": ["people"]}
    names: set[str] = set()
    main_name = Path("/proc/self/comm").read_text().strip()

    async def main():  # on a thread of its own, as in a Ray actor: a main thread's name is its process's
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, service.infer, service.info(), pub)
            task = asyncio.create_task(pipe.run())
            deadline = time.monotonic() + 30
            while pipe.stats()["published"] < 5:
                assert time.monotonic() < deadline and not task.done(), pipe.stats()
                await asyncio.sleep(0.05)
            names.update(os_names())
            pipe.stop()
            await task

    t = threading.Thread(target=asyncio.run, args=(main(),))
    t.start()
    t.join(60)
    assert {"hv-cap cam-n", "hv-loop", "hv-model", "hv-publisher"} <= names, names
    assert Path("/proc/self/comm").read_text().strip() == main_name
