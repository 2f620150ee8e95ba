"""FrameAgeBudget's rules at their edges, driven with synthetic ages on a simulated clock (no Ray, no camera):
the batch wait alone over budget, the floor, cameras analysed every few seconds, ages longer than the hold."""

from __future__ import annotations

import heapq
import random

import pytest

from workers.budget import FrameAgeBudget

BUDGET_S = 0.3


def run(policy: FrameAgeBudget, seconds: float, age, start: float = 0.0, seed: int = 0) -> list[tuple[float, object]]:
    """The camera publishes ``policy.fps`` frames a second for ``seconds``; a frame captured at ``c`` is
    ``age(policy)`` old (times a little noise) and published that much later. Returns (time, action)."""
    rng = random.Random(seed)
    pending: list[tuple[float, float]] = []  # (published at, age)
    actions, t, captured = [], start, start
    while t < start + seconds:
        while captured <= t:
            a = age(policy) * rng.uniform(0.9, 1.1)
            heapq.heappush(pending, (captured + a, a))
            captured += 1 / policy.fps
        while pending and pending[0][0] <= t:
            published, a = heapq.heappop(pending)
            policy.observe(a, published)
            if (action := policy.decide(published)) is not None:
                actions.append((published, action))
        t += 0.01
    return actions


def test_a_batch_wait_the_machine_cannot_afford_is_restored_less_and_less_often():
    """The batch wait alone takes the p95 over: restoring it is a probe, retried after longer and longer calm
    instead of flapping (budget_exceeded, budget_recovered, ...) at a fixed period for ever."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    actions = run(policy, 600, lambda p: 0.3 if p.batch_wait_s is None else 0.15)
    restores = [t for t, a in actions if a.action == "restored"]
    gaps = [b - a for a, b in zip(restores, restores[1:])]
    assert gaps and all(b > 1.5 * a for a, b in zip(gaps, gaps[1:4])), gaps
    assert len([a for _, a in actions if a.event]) <= 20, actions  # not two events every 10 s
    assert policy.recover_hold_s == policy.max_recover_hold_s
    # The load falls: the batch wait comes back, and once that has held the long hold is forgotten.
    run(policy, 400, lambda p: 0.1, start=600)
    assert not policy.adapted and policy.recover_hold_s == policy.initial_recover_hold_s


def test_each_step_up_from_the_floor_raises_the_rate():
    """At the floor nothing is cut, so the floor is no ceiling: the first step up once the load falls goes up
    (it went nowhere, one recover hold lost, while reported and counted as a step up)."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    down = run(policy, 60, lambda p: 0.6)
    assert policy.fps == policy.min_fps and down[-1][1].action == "min_fps"
    before = policy.fps
    for _, action in run(policy, 120, lambda p: 0.1, start=60):
        if action.action == "fps_up":
            assert action.fps > before, (before, action)
            before = action.fps
    assert not policy.adapted


@pytest.mark.parametrize("fps", [0.3, 0.2, 0.1])
def test_a_camera_analysed_every_few_seconds_still_decides(fps):
    """Eight frames reach further back than 20 s: the evidence window stretches to hold them, else the p95 is
    never known and the budget never acts (nor shows a p95)."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=fps)
    actions = run(policy, 300, lambda p: 2.0)
    assert [a.action for _, a in actions][:1] == ["batch_wait"], actions
    assert policy.stats(300)["p95_ms"] is not None


def test_a_step_up_waits_for_frames_captured_at_its_rate():
    """Frames older than the recover hold: a step up is judged on frames captured after it, not on the calm of
    the rate before (which let the rate climb step after step before any frame of the last one was seen)."""
    policy = FrameAgeBudget(10.0, base_fps=25)
    run(policy, 120, lambda p: 12.0)  # far over: the rate goes down
    assert policy.fps < 10
    steps = [t for t, a in run(policy, 200, lambda p: 5.0, start=120) if a.action == "fps_up"]
    assert len(steps) >= 3
    assert min(b - a for a, b in zip(steps, steps[1:])) >= 5.0 + policy.initial_recover_hold_s - 0.5, steps


def test_a_floor_of_zero_fps_is_refused():
    with pytest.raises(ValueError, match="must be > 0"):
        FrameAgeBudget(BUDGET_S, base_fps=25, min_fps=0)


def test_frames_sent_before_a_live_update_do_not_feed_the_new_budget():
    """A live update of fps (or url, max_frame_age_ms) starts the budget afresh; the frames still in flight,
    captured under the old settings and old, made the new one cut half a second after the update."""
    from test_capture_recovery import RecordingPublisher
    from workers.stream import CameraPipeline

    camera = {"id": "cam", "url": "synthetic://street?fps=25", "fps": 25, "max_frame_age_ms": 300}
    publisher = RecordingPublisher()
    pipe = CameraPipeline(camera, None, {"input_size": [96, 160], "heads": {"people": ["person"]}}, publisher)
    pipe._reset_budget()  # what update() does
    t = pipe._budget_since
    for i in range(6):  # in flight at the update: 0.4 s old
        pipe._keep_budget(0.4, t + 0.04 * i)  # captured at t - 0.4 + 0.04 i
    for i in range(6, 40):  # the new settings' frames: 0.1 s old
        pipe._keep_budget(0.1, t + 0.04 * i)
    assert pipe.budget is not None and pipe.budget.actions == {} and publisher.events == [], publisher.events


def test_a_camera_behind_the_motion_gate_gets_its_rate_back_when_the_load_falls():
    """Frames the motion gate skips never reached the budget: a still scene publishes bursts of motion, each after
    a gap longer than a calm's hold, which read as "no calm" (a stall). After an overload cut, 10 minutes of
    motion 3 s in every 10 stepped up 0 times. Skipped frames now tell the budget the stream goes on."""
    def scene(policy: FrameAgeBudget, start: float, with_alive: bool) -> None:
        rng, t = random.Random(1), start
        while t < start + 600:
            moving = (t - start) % 10 < 3
            if moving:
                a = 0.1 * rng.uniform(0.9, 1.1)
                policy.observe(a, t + a)
                policy.decide(t + a)
            elif with_alive:
                policy.alive(t)
            t += 1 / policy.fps

    for with_alive in (False, True):
        policy = FrameAgeBudget(BUDGET_S, base_fps=25)
        run(policy, 60, lambda p: 0.6)  # an overload: the rate is cut
        cut = policy.fps
        assert cut < 25
        scene(policy, 60, with_alive)
        if with_alive:
            assert policy.fps == 25 and not policy.adapted, policy.fps
        else:  # the same scene without the skipped frames' word: the rate stays where the overload left it
            assert policy.fps == cut, policy.fps
