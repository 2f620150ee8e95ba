"""The frame-age budget's control logic at the edges of its real inputs, on a synthetic clock (no Ray, no camera):
a wall clock that an NTP step sets back, and a camera whose frames stop for a while (a reconnect, a stalled
model) in the middle of a calm."""

from __future__ import annotations

import numpy as np
import pytest

from workers.budget import FrameAgeBudget

BUDGET_S = 0.3


def publish(policy: FrameAgeBudget, start: float, seconds: float, age: float) -> tuple[float, list]:
    """The camera publishes ``policy.fps`` frames a second, each ``age`` old, deciding on each as CameraPipeline
    does. Returns the time after the last frame and the (time, action) of every action taken."""
    t, actions = start, []
    while t < start + seconds:
        policy.observe(age, t)
        if (action := policy.decide(t)) is not None:
            actions.append((t, action))
        t += 1 / policy.fps
    return t, actions


def budgeted_pipeline(monkeypatch) -> tuple:
    """A camera with a 300 ms frame-age budget at 25 fps whose ``time`` (its own and its capture's) reads a
    clock the test moves: (pipeline, clock, a letterboxed image)."""
    import time
    import types

    from test_capture_recovery import RecordingPublisher

    from workers import capture, stream
    from workers.stream import CameraPipeline

    clock = {"wall": 1_800_000_000.0, "mono": 5000.0}
    fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake.time, fake.monotonic = (lambda: clock["wall"]), (lambda: clock["mono"])
    monkeypatch.setattr(stream, "time", fake)
    monkeypatch.setattr(capture, "time", fake)
    camera = {"id": "cam", "url": "synthetic://street?fps=25", "fps": 25, "max_frame_age_ms": 300,
              "tracker": {"enabled": False}}
    pipe = CameraPipeline(camera, None, {"input_size": [96, 160], "heads": {"people": ["person"]}},
                          RecordingPublisher())
    pipe._reset_budget()
    return pipe, clock, np.zeros((3, 96, 160), np.uint8)


def test_a_wall_clock_set_back_does_not_stop_a_cameras_budget(monkeypatch):
    """An hour's NTP step back in the middle of an overload. CameraPipeline gave the budget time.time(): its p95
    and holds look only at times before ``now``, and frames captured before the last reset are ignored, so
    nothing was decided for an hour (and the evidence, pruned from its oldest end, grew all that while). The
    budget's clock is time.monotonic() now, and so is a frame's age (CapturedFrame.mono)."""
    from workers.capture import CapturedFrame

    pipe, clock, image = budgeted_pipeline(monkeypatch)

    def overloaded(seconds: float, first: int) -> int:  # 25 frames a second, each 0.6 s old when published
        for i in range(first, first + int(seconds * 25)):
            clock["wall"] += 0.04
            clock["mono"] += 0.04
            pipe._publish_frame(CapturedFrame(i, i * 0.04, clock["wall"] - 0.6, (360, 640), image, None,
                                              mono=clock["mono"] - 0.6), {})
            if i % 12 == 0:
                pipe.stats()  # as the status heartbeat does: it reads the budget's p95 on the budget's clock
        return first + int(seconds * 25)

    n = overloaded(3.0, 0)
    before = sum(pipe.budget.actions.values())
    assert before >= 1, pipe.budget.actions
    clock["wall"] -= 3600
    overloaded(10.0, n)
    assert sum(pipe.budget.actions.values()) >= before + 3, pipe.budget.actions
    assert len(pipe.budget._ages) <= 25 * pipe.budget.max_window_s + 2


@pytest.mark.parametrize("gap_s", [10.0, 600.0])
def test_a_gap_in_the_frames_is_no_calm(gap_s):
    """Three seconds of calm, then no frame for ``gap_s`` (a read timeout and a reconnect): the rate went up
    right after the frames came back, the missing seconds counted as calm. The calm must be seen for the whole
    hold."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    t, _ = publish(policy, 0.0, 15.0, 0.6)  # overloaded: the rate goes down
    assert policy.fps < 10
    t, actions = publish(policy, t, 3.0, 0.1)  # the load falls: calm, shorter than the hold
    assert not [a for _, a in actions if a.action == "fps_up"], actions
    resumed = t + gap_s
    _, actions = publish(policy, resumed, 10.0, 0.1)
    steps = [at for at, a in actions if a.action == "fps_up"]
    # (decisions are taken as of the start of their slot of the clock: up to decide_every earlier)
    assert steps and steps[0] >= resumed + policy.initial_recover_hold_s - policy.decide_every, (steps, resumed)


def test_normal_path_guard_a_slow_camera_still_recovers():
    """Normal-path guard (passes before and after the fix): frames a few seconds apart are no gap; a camera at
    0.3 frames/s whose load falls gets its batch wait back."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=0.3)
    t, actions = publish(policy, 0.0, 60.0, 2.0)
    assert [a.action for _, a in actions][:1] == ["batch_wait"]
    _, actions = publish(policy, t, 120.0, 0.05)
    assert [a.action for _, a in actions] == ["restored"] and not policy.adapted, actions


def test_normal_path_guard_a_continuous_calm_steps_up_after_the_hold():
    """Normal-path guard (passes before and after the fix): with frames all along, the first step up comes one
    recover hold after the calm began."""
    policy = FrameAgeBudget(BUDGET_S, base_fps=25)
    t, _ = publish(policy, 0.0, 15.0, 0.6)
    calm = t
    _, actions = publish(policy, t, 10.0, 0.1)
    steps = [at for at, a in actions if a.action == "fps_up"]
    assert steps and calm + policy.initial_recover_hold_s <= steps[0] <= calm + policy.initial_recover_hold_s + 3


def test_the_rate_of_a_source_that_does_not_say_it_is_measured_from_its_first_frame(monkeypatch):
    """A stream without a frame rate: the budget starts from the rate it delivers. That was frames decoded over
    the time since the camera started, opening the source included: a 25 fps stream that took 9.6 s to open
    read as 1 fps after its first 10 frames (the budget's first cut then went to 0.8 fps)."""
    import time
    import types

    from test_capture_recovery import RecordingPublisher

    from workers import stream
    from workers.stream import CameraPipeline

    clock = {"t": 1000.0}
    fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake.time = fake.monotonic = lambda: clock["t"]
    monkeypatch.setattr(stream, "time", fake)
    pipe = CameraPipeline({"id": "cam", "url": "rtsp://camera/x", "max_frame_age_ms": 300}, None,
                          {"input_size": [96, 160], "heads": {"people": ["person"]}}, RecordingPublisher())
    decoded = {"n": 0}
    pipe._slot = types.SimpleNamespace(snapshot=lambda: {"decoded": decoded["n"]})
    pipe.started_at = clock["t"]
    clock["t"] += 9.6  # opening the source
    rates = []
    for _ in range(15):  # 25 frames a second from now on, the rate asked for on each frame as _keep_budget does
        clock["t"] += 0.04
        decoded["n"] += 1
        rates.append(pipe._base_fps())
    assert rates[-1] is not None and 24 <= rates[-1] <= 26, rates
