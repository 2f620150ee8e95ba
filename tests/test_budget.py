"""FrameAgeBudget, the per-camera frame-age policy, fed synthetic ages on a simulated clock (no Ray, no camera).

The simulated camera publishes ``policy.fps`` frames per second; a frame's age depends on the load, as on a
machine that sustains ``capacity`` frames per second: well under the budget below it, over it above it.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from workers.budget import FrameAgeBudget
from workers.publish import Keys

BUDGET_S = 0.3


class Machine:
    """Ages as a function of the total analysed rate: light load -> ~0.1 s, overload -> ~0.6 s (with noise)."""

    def __init__(self, capacity: float, seed: int = 0):
        self.capacity = capacity
        self.rng = random.Random(seed)
        self.ages: list[float] = []  # every age handed out, in order

    def age(self, total_fps: float) -> float:
        base = 0.1 if total_fps <= self.capacity else 0.6
        self.ages.append(base * self.rng.uniform(0.8, 1.2))
        return self.ages[-1]


def simulate(policies: list[FrameAgeBudget], machine: Machine, seconds: float, start: float = 0.0,
             tick: float = 0.1, decide_every: float = 0.5, stagger: float = 0.0) -> list[tuple[float, int, object]]:
    """Runs the cameras for ``seconds``; camera i decides every ``decide_every`` s, ``i * stagger`` s after
    camera 0. Returns (time, camera index, action) for every action taken."""
    actions = []
    phase = [0.0] * len(policies)
    steps = round(decide_every / tick)
    for step in range(round(seconds / tick)):
        t = start + step * tick
        total = sum(p.fps for p in policies)
        for i, p in enumerate(policies):
            phase[i] += p.fps * tick
            n = int(phase[i])
            phase[i] -= n
            for k in range(n):
                p.observe(machine.age(total), t + tick * (k + 1) / (n + 1))
        for i, p in enumerate(policies):
            if (step - round(i * stagger / tick)) % steps == 0 and (a := p.decide(t + tick)) is not None:
                actions.append((t + tick, i, a))
    return actions


def mean_rate(actions: list, camera: int, start: float, end: float) -> float:
    """Camera ``camera``'s analysed rate averaged over time from ``start`` to ``end`` (it set it at least once
    before ``start``)."""
    changes = [(t, a.fps) for t, i, a in actions if i == camera]
    rate = [f for t, f in changes if t <= start][-1]
    total, t0 = 0.0, start
    for t, f in changes:
        if start < t < end:
            total, t0, rate = total + rate * (t - t0), t, f
    return (total + rate * (end - t0)) / (end - start)


def test_over_budget_first_stops_batch_waits_then_lowers_fps_step_by_step():
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    actions = simulate([policy], Machine(capacity=15), 30)
    kinds = [a.action for _, _, a in actions]
    assert kinds[:4] == ["batch_wait", "fps", "fps", "fps"], kinds
    assert all(a.event == "budget_exceeded" for _, _, a in actions[:4])
    assert [round(a.fps, 2) for _, _, a in actions[:4]] == [25, 20, 16, 12.8]
    assert actions[0][2].batch_wait_s == 0.0
    # a cut needs time to drain what is queued: never two within one hold period
    cuts = [t for t, _, a in actions if a.event == "budget_exceeded"]
    assert all(b - a >= policy.hold_s - policy.decide_every for a, b in zip(cuts, cuts[1:]))  # t: call, not slot
    assert policy.fps <= 15


def test_settles_within_budget_and_backs_off_from_a_rate_it_cannot_sustain():
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    machine = Machine(capacity=18)
    first = simulate([policy], machine, 60)
    # the last rate set before 55 s: settled at or under the capacity (at 60 s it may be inside a probe)
    assert [a.fps for t, _, a in first if t < 55][-1] <= 18
    assert all(a.fps <= policy._ceiling for t, _, a in first if t > 12)  # steps up never pass the ceiling
    machine.ages.clear()
    later = simulate([policy], machine, 240, start=60)
    # Each step up to a rate the machine cannot sustain is tried less and less often: the gaps between
    # excesses grow until the hold reaches its cap.
    cuts = [t for t, _, a in first + later if a.action == "fps"]
    gaps = [b - a for a, b in zip(cuts, cuts[1:]) if b - a > policy.hold_s + 1]  # one per excess episode
    assert gaps[-1] >= policy.max_recover_hold_s and gaps[-1] > 4 * gaps[0], gaps
    assert policy.recover_hold_s == policy.max_recover_hold_s
    over = sum(age > BUDGET_S for age in machine.ages) / len(machine.ages)
    assert over < 0.05, over  # after settling, under 5% of the frames are over budget (the probes)
    assert 12 <= policy.fps <= 18.5  # 18.5: the ceiling, where a probe goes


def test_restores_configured_fps_and_batch_wait_when_the_load_falls():
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    simulate([policy], Machine(capacity=10), 40)
    assert policy.adapted and policy.fps <= 10
    actions = simulate([policy], Machine(capacity=100), 120, start=40)
    assert not policy.adapted
    assert policy.fps == 25 and policy.batch_wait_s is None
    kinds = [a.action for _, _, a in actions]
    assert kinds[-1] == "restored" and set(kinds[:-1]) == {"fps_up"}, kinds
    assert [a.event for _, _, a in actions] == [None] * (len(actions) - 1) + ["budget_recovered"]
    fps = [a.fps for _, _, a in actions]
    assert fps == sorted(fps)  # up one step at a time, never down while the load is low
    steps = [round(b - a, 6) for a, b in zip(fps, fps[1:]) if b > a]
    # from near the rate once found too much, half steps (or less: never past it) all the way up
    assert max(steps) <= policy.step_up / 2 and policy.step_up / 2 in steps, steps


def test_between_the_thresholds_nothing_changes():
    """Hysteresis: over 0.7 x budget but under the 0.9 x budget it aims at, an adapted camera neither tightens
    nor relaxes."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    for i in range(40):
        policy.observe(0.5, 10 + i * 0.04)
    assert policy.decide(11.6).action == "batch_wait"
    t = 12.0
    for _ in range(200):
        for k in range(10):
            policy.observe(0.25, t + k * 0.04)
        t += 0.4
        assert policy.decide(t) is None
    assert policy.batch_wait_s == 0.0 and policy.fps == 25


def test_it_acts_a_little_under_the_budget():
    """A p95 just under the budget (0.28 of 0.3 s) is over the target (0.9 x budget): the policy acts, so that
    its own probes' overshoot stays within the budget."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    for i in range(40):
        policy.observe(0.28, 10 + i * 0.04)
    action = policy.decide(11.6)
    assert action.action == "batch_wait" and action.event == "budget_exceeded"
    relaxed = FrameAgeBudget(BUDGET_S, base_fps=25, target_ratio=1.0)
    for i in range(40):
        relaxed.observe(0.28, 10 + i * 0.04)
    assert relaxed.decide(11.6) is None


def test_at_the_floor_it_says_so_once_and_stops():
    policy = FrameAgeBudget(BUDGET_S, base_fps=25, min_fps=5)
    actions = simulate([policy], Machine(capacity=0), 60)
    kinds = [a.action for _, _, a in actions]
    assert kinds.count("min_fps") == 1 and kinds[-1] == "min_fps"
    assert policy.fps == 5


def test_too_few_frames_or_frames_from_before_a_cut_decide_nothing():
    policy = FrameAgeBudget(BUDGET_S, base_fps=25, min_samples=8)
    for i in range(7):
        policy.observe(1.0, 1 + i * 0.1)
    assert policy.decide(2.0) is None  # 7 frames: not enough evidence
    policy.observe(1.0, 1.75)
    assert policy.decide(2.5).action == "batch_wait"
    # Frames captured before that cut (at 2.5) arrive late with large ages: they judge the old setting.
    for i in range(20):
        policy.observe(1.5, 2.6 + i * 0.05)  # captured 1.1 .. 2.05
    assert policy.decide(4.5) is None
    assert policy.batch_wait_s == 0.0 and policy.fps == 25
    for i in range(10):  # frames captured after the cut, still too old: now it acts again
        policy.observe(1.5, 4.6 + i * 0.05)
    assert policy.decide(5.0).action == "fps"


def test_one_camera_over_budget_does_not_change_another():
    """Each camera's policy sees only its own frames: a camera within its budget keeps its rate and wait."""
    slow, fine = FrameAgeBudget(BUDGET_S, base_fps=25), FrameAgeBudget(BUDGET_S, base_fps=25)
    t = 0.0
    for _ in range(60):
        for k in range(12):
            slow.observe(0.8, t + k * 0.04)
            fine.observe(0.05, t + k * 0.04)
        t += 0.5
        slow.decide(t)
        assert fine.decide(t) is None
    assert slow.fps < 10 and fine.fps == 25 and fine.batch_wait_s is None and not fine.adapted


@pytest.mark.parametrize("stagger", [0.0, 0.1, 0.37])
@pytest.mark.parametrize("capacity", [40, 70])
def test_cameras_sharing_an_overloaded_machine_give_up_similar_rates(capacity, stagger):
    """Four cameras at 25 fps on a machine that sustains less: each lowers its own rate, none more than the
    others. Cameras decide at different moments (``stagger``), as real ones do."""
    policies = [FrameAgeBudget(BUDGET_S, base_fps=25) for _ in range(4)]
    actions = simulate(policies, Machine(capacity), 300, stagger=stagger)
    assert {i for _, i, a in actions if a.action == "fps"} == {0, 1, 2, 3}
    fps = [mean_rate(actions, i, 200, 300) for i in range(4)]  # what they settled at, the brief probes included
    assert sum(fps) <= capacity, fps
    assert sum(fps) >= 0.6 * capacity, fps  # and it did not give up much more than it had to
    assert min(fps) >= 0.8 * max(fps), fps


@pytest.mark.parametrize("kwargs, message", [
    ({"budget_s": 0, "base_fps": 25}, "must be > 0"),
    ({"budget_s": 0.3, "base_fps": 0}, "must be > 0"),
    ({"budget_s": 0.3, "base_fps": 25, "recover_ratio": 1.0}, "recover_ratio"),
    ({"budget_s": 0.3, "base_fps": 25, "target_ratio": 0.6}, "target_ratio"),
    ({"budget_s": 0.3, "base_fps": 25, "target_ratio": 1.2}, "target_ratio"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrameAgeBudget(**kwargs)


# -- applied: the batcher honours the budget's batch wait; a camera lowers and restores its rate ------------

@pytest.mark.parametrize("patient_camera, impatient_camera", [
    ("", ""),  # one queue
    ("a", "b"),  # the Batcher's per-camera queues: the due time is the earliest over all of them
])
def test_an_impatient_request_makes_its_batch_leave_early(patient_camera, impatient_camera):
    """max_wait_s=0 (a camera over budget): its batch leaves at once instead of waiting max_wait_ms to fill,
    and takes the other camera's waiting request along."""
    from workers.inference import Batcher

    async def main(max_wait_s):
        batches: list[list] = []
        batcher = Batcher(lambda items: batches.append(list(items)) or items, max_batch=8, max_wait_ms=400)
        t0 = time.monotonic()
        patient = asyncio.ensure_future(batcher.submit("patient", patient_camera))
        await asyncio.sleep(0.05)
        await batcher.submit("impatient", impatient_camera, max_wait_s=max_wait_s)
        waited = time.monotonic() - t0
        await patient
        batcher.close()
        return waited, batcher.waits.snapshot(), batches

    waited, waits, batches = asyncio.run(main(0.0))
    assert waited < 0.3, waited  # not the 400 ms the replica would wait for a full batch
    assert sum(waits["counts"]) == 2  # both requests' waits were measured
    assert batches == [["patient", "impatient"]]
    waited, _, _ = asyncio.run(main(None))
    assert waited >= 0.35, waited


class Recorder:
    """Stands in for the Publisher: keeps messages and events in memory."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.events: list[dict] = []

    def publish_detections(self, message: dict) -> None:
        self.messages.append(message)

    def publish_event(self, message: dict) -> None:
        self.events.append(message)

    def set_status(self, camera: str, status: dict) -> None:
        pass

    keys = Keys("hv")

    def set_hash(self, key: str, fields: dict) -> None:  # counts and snapshots
        pass

    def stats(self) -> dict:
        return {"connected": True}


class Server:
    """A model that serves one frame at a time in ``service_s``: 1 / service_s frames per second at most."""

    def __init__(self, service_s: float):
        self.service_s = service_s
        self.lock: asyncio.Lock | None = None

    async def infer(self, request):
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            await asyncio.sleep(self.service_s)
        return {h: {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                    "class_ids": np.zeros(0, np.int64)} for h in request.heads}


@pytest.mark.timeout(120)
def test_a_camera_over_budget_lowers_its_rate_and_restores_it_when_the_load_falls():
    from workers.publish import validate
    from workers.stream import CameraPipeline

    camera = {"id": "cam", "url": "synthetic://street?seed=2&fps=25", "max_inflight": 6, "max_frame_age_ms": 300}
    model_info = {"input_size": [96, 160], "heads": {"people": ["person"]}}
    server = Server(0.06)  # ~16 frames/s: 25 offered, six in flight -> frames ~0.36 s old
    publisher = Recorder()
    fast = {"hold_s": 1.0, "window_s": 1.0, "recover_hold_s": 1.0, "max_recover_hold_s": 4.0, "decide_every": 0.25}

    async def until(predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)

    async def main():
        pipe = CameraPipeline(camera, server.infer, model_info, publisher, budget_options=fast)
        task = asyncio.create_task(pipe.run())
        await until(lambda: [e for e in publisher.events if e.get("action") == "fps"], 40, "the rate to go down")
        await until(lambda: (pipe.stats()["target_fps"] or 25) <= 17, 40, "a rate the model sustains")
        lowered = pipe.stats()
        server.service_s = 0.005  # the load falls
        await until(lambda: [e for e in publisher.events if e["type"] == "budget_recovered"], 60, "recovery")
        restored = pipe.stats()
        pipe.stop()
        return lowered, restored, await task

    lowered, restored, final = asyncio.run(main())
    kinds = [(e["type"], e["action"]) for e in publisher.events if e["type"].startswith("budget_")]
    print([(e["action"], e["fps"], e["p95_ms"]) for e in publisher.events if e["type"].startswith("budget_")])
    assert kinds[:2] == [("budget_exceeded", "batch_wait"), ("budget_exceeded", "fps")], kinds
    assert kinds[-1] == ("budget_recovered", "restored")
    for e in publisher.events:
        validate(e, "event")
    assert lowered["dropped"]["budget"] > 0 and lowered["budget"]["adapted"]
    assert restored["target_fps"] is None and not restored["budget"]["adapted"]  # every frame again
    for s in (lowered, restored, final):  # skipped frames have their own outcome; nothing unaccounted for
        assert s["decoded"] == s["published"] + sum(s["dropped"].values()) + s["in_slot"] + s["in_flight"]
    assert sum(final["frame_age"]["counts"]) == final["published"]


@pytest.mark.timeout(120)
def test_a_live_update_of_the_rate_starts_the_budget_afresh():
    """A budget that lowered the rate was sized from the old fps: after an update it imposes nothing until
    the new configuration's own frames decide again."""
    from workers.settings import CameraConfig
    from workers.stream import CameraPipeline

    camera = {"id": "cam", "url": "synthetic://street?seed=3&fps=25", "max_inflight": 6, "max_frame_age_ms": 300}
    model_info = {"input_size": [96, 160], "heads": {"people": ["person"]}}
    server, publisher = Server(0.06), Recorder()
    fast = {"hold_s": 1.0, "window_s": 1.0, "recover_hold_s": 1.0, "max_recover_hold_s": 4.0, "decide_every": 0.25}

    async def main():
        pipe = CameraPipeline(camera, server.infer, model_info, publisher, budget_options=fast)
        task = asyncio.create_task(pipe.run())
        deadline = time.monotonic() + 40
        while not [e for e in publisher.events if e.get("action") == "fps"]:
            assert time.monotonic() < deadline, "timed out waiting for the rate to go down"
            await asyncio.sleep(0.1)
        lowered = pipe.stats()
        changed = pipe.update(CameraConfig.model_validate({**camera, "fps": 10}))
        after = pipe.stats()  # on the event loop: no frame was published in between
        pipe.stop()
        await task
        return lowered, changed, after

    lowered, changed, after = asyncio.run(main())
    assert lowered["target_fps"] < 25 and lowered["budget"]["adapted"], lowered
    assert changed == ["fps"]
    assert after["target_fps"] == 10 and after["budget"] is None, after


def test_a_camera_cut_to_a_few_frames_per_second_still_decides_and_recovers():
    """At 2.5 fps a 2 s window holds 5 frames: the evidence reaches back as far as it must to hold enough."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    simulate([policy], Machine(capacity=2), 60)
    assert policy.fps == policy.min_fps == 2.5
    simulate([policy], Machine(capacity=100), 180, start=60)
    assert not policy.adapted


@pytest.mark.timeout(60)
def test_the_budgets_rate_is_the_rate_analysed_below_a_configured_one():
    """A camera at 20 of its source's 25 frames/s that the budget lowered to 16: the budget's gate sat behind the
    configured one and saw its unevenly spaced output (gaps of 40 and 80 ms): a due time missed by 5 ms waited
    a whole gap, so it let 10 frames/s through, not 16. The skips: 50 of the configured rate's, 40 of the
    budget's."""
    from test_capture_recovery import RecordingPublisher, no_detections
    from workers.stream import CameraPipeline

    camera = {"id": "cam", "url": "synthetic://street?seed=3&fps=25&frames=250&size=160x96", "fps": 20,
              "realtime": False}
    model_info = {"input_size": [96, 160], "heads": {"people": ["person"]}}

    async def main() -> dict:
        pipe = CameraPipeline(camera, no_detections(), model_info, RecordingPublisher())
        pipe._budget_fps = 16.0  # what the budget's decision sets (CameraPipeline._apply_budget)
        return await pipe.run()

    final = asyncio.run(main())
    assert final["decoded"] == 250 and final["state"] == "ended"
    assert 158 <= final["published"] <= 162, final  # 16 of every 25 frames (100 before)
    assert 48 <= final["dropped"]["rate"] <= 52 and 38 <= final["dropped"]["budget"] <= 42, final["dropped"]
    assert final["published"] + sum(final["dropped"].values()) == 250
