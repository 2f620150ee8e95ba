"""The model runner's batch size over a service's life, found by an audit (round 10): each test failed before its
fix."""

from __future__ import annotations

import pytest

from workers.batch_size import BatchSizer


def test_the_record_of_limit_changes_stays_bounded_while_the_count_goes_on():
    """16 faster than 8 on trial and slower as the limit: the step up is tried and undone every ~1000 full batches
    at the longest backoff, for the service's life, and every change was kept in a list that grew with it (~1900
    entries a million batches, ~1 MB a day at 100 batches/s). The count in the stats still counts them all."""
    sizer = BatchSizer(ceiling=16)
    for _ in range(80_000):
        size = sizer.allowed()
        cost = 8.0 if size == 8 else (7.0 if sizer.limit == 8 else 9.0)
        sizer.record(size, size * cost / 1000, full=True)
    assert len(sizer.changes) <= 64  # batch_size.KEPT_CHANGES
    assert sizer.stats()["batch_limit_changes"] > 128
    assert sizer.changes[-2:] in ([(8, 16), (16, 8)], [(16, 8), (8, 16)])  # the latest, in order


@pytest.mark.parametrize("exits", [True, False])
def test_a_lost_cuda_context_ends_the_process_for_ray_to_restart(exits, monkeypatch):
    """After an illegal memory access (or a device-side assert) the process's CUDA context fails every call after
    it, while the actor, alive, was never restarted: every frame of the run failed. A replica or camera process
    (exit_on_device_loss) exits instead; other errors, and a service used in-process, raise as before."""
    from workers import inference
    from workers.inference import DEVICE_LOST_EXIT, InferenceService

    class Runner:
        def __init__(self, error):
            self.error = error

        def run(self, images, heads):
            raise self.error

    exited = []
    monkeypatch.setattr(inference.os, "_exit", lambda code: (exited.append(code), (_ for _ in ()).throw(SystemExit)))
    service = InferenceService.__new__(InferenceService)
    service.exit_on_device_loss = exits
    lost = RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                        "asynchronously reported at some other API call")
    for error in (RuntimeError("input has 4 channels, expected 3"), torch_oom()):
        service.runner = Runner(error)
        with pytest.raises(type(error)):
            service._run_batch([(None, None)])
    service.runner = Runner(lost)
    with pytest.raises(SystemExit if exits else RuntimeError):
        service._run_batch([(None, None)])
    assert exited == ([DEVICE_LOST_EXIT] if exits else [])


def torch_oom() -> BaseException:
    return MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # the batch sizer's, not a lost context


def test_eval_through_the_serving_path_sizes_its_threads_as_the_service_does(monkeypatch):
    """`hydravision eval --backend` made its ModelRunner without threads: torch, ONNX Runtime and OpenVINO then took
    every core of the machine, past a container's CPU quota the service respects (usable_cores)."""
    import argparse

    from pipeline import model_commands
    from workers import model_runner

    made = {}

    class Runner:
        def __init__(self, *args, **kwargs):
            made.update(kwargs)
            raise RuntimeError("made")

    monkeypatch.setattr(model_runner, "ModelRunner", Runner)
    monkeypatch.setattr(model_commands, "usable_cores", lambda: 3)
    args = argparse.Namespace(checkpoint=None, scenes=1, frames=1, backend="torch", precision="fp32", no_progress=True)
    with pytest.raises(Exception, match="made"):
        model_commands.evaluate(args)
    assert made["threads"] == 3


def test_the_calls_made_per_frame_leave_no_task_events_in_ray():
    """Ray recorded every infer call (for its dashboard's task list, which no one reads for these): 16-26% of a
    call's CPU on both sides in benchmarks/bench_ray_overhead.py. The per-frame methods are declared without."""
    from workers.inference import InferenceActor

    actor_class = InferenceActor.__ray_actor_class__
    for name in ("infer", "infer_image", "infer_images", "infer_groups"):
        assert getattr(getattr(actor_class, name), "__ray_enable_task_events__", True) is False, name



def test_the_controllers_polls_every_tick_leave_no_task_events_in_ray():
    """The controller asks every camera process and replica for its stats each tick (and NodeWatch where it runs):
    Ray kept a task event of each in its GCS, whose memory grew ~4 KB a call (+12 MB in a 33-minute soak with churn;
    a bare actor polled 20 times a second: 43.9 -> 56.4 MB in 150 s with the events, flat without)."""
    from workers.inference import InferenceActor
    from workers.stream import StreamActor

    for actor_class, names in ((InferenceActor, ("stats", "model_stats", "where")),
                               (StreamActor, ("stats_many", "model_stats", "where"))):
        for name in names:
            method = getattr(actor_class.__ray_actor_class__, name)
            assert getattr(method, "__ray_enable_task_events__", True) is False, (actor_class, name)
