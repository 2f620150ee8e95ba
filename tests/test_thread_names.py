"""hydravision's threads carry their names to the OS (workers/thread_names.py), so `top -H` and the benchmarks'
CPU by thread (benchmarks/measure.py:thread_cpu) can tell decoding, the model, the event loop and Redis writes
apart inside a camera process; and they run as SCHED_BATCH (no preemption on wakeup), unless told not to."""

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
from workers.thread_names import name_native_thread, worker_thread


def os_threads() -> dict[str, set[int]]:
    """This process's threads: OS name -> the scheduling policies of the threads of that name."""
    threads: dict[str, set[int]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        threads.setdefault(name, set()).add(int(fields[38]))  # field 41 of proc(5): policy
    return threads


def policy_in_thread(monkeypatch, setting: str | None) -> int:
    if setting is None:
        monkeypatch.delenv("HYDRAVISION_SCHED_BATCH", raising=False)
    else:
        monkeypatch.setenv("HYDRAVISION_SCHED_BATCH", setting)
    seen = []

    def work():
        worker_thread("hv-test")
        seen.append(os.sched_getscheduler(0))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return seen[0]


def test_pipeline_threads_are_batch_threads_unless_told_not_to(monkeypatch):
    assert policy_in_thread(monkeypatch, None) == os.SCHED_BATCH
    assert policy_in_thread(monkeypatch, "0") == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # only the thread that asked


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
def test_a_camera_process_threads_are_named_by_what_they_do(tiny_checkpoint, redis_server, monkeypatch):
    monkeypatch.delenv("HYDRAVISION_SCHED_BATCH", raising=False)
    service = InferenceService(tiny_checkpoint, device="cpu", max_batch=4, max_wait_ms=2)
    camera = {"id": "cam-n", "url": "synthetic://street?seed=3&fps=25", "heads": ["people"]}
    threads: dict[str, set[int]] = {}
    main_name = Path("/proc/self/comm").read_text().strip()

    async def main():  # on a thread of its own, as in a Ray actor: a main thread's name is its process's
        with Publisher(redis_server.url) as pub:
            pipe = CameraPipeline(camera, service.infer, service.info(), pub)
            task = asyncio.create_task(pipe.run())
            deadline = time.monotonic() + 30
            while pipe.stats()["published"] < 5:
                assert time.monotonic() < deadline and not task.done(), pipe.stats()
                await asyncio.sleep(0.05)
            threads.update(os_threads())
            pipe.stop()
            await task

    t = threading.Thread(target=asyncio.run, args=(main(),))
    t.start()
    t.join(60)
    ours = {"hv-cap cam-n", "hv-loop", "hv-model", "hv-publisher"}
    assert ours <= set(threads), threads
    assert all(threads[name] == {os.SCHED_BATCH} for name in ours), threads
    assert Path("/proc/self/comm").read_text().strip() == main_name
