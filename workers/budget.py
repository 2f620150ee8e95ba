"""The frame-age budget of one camera (``max_frame_age_ms``): a policy that watches the age of the camera's
recent frames (capture to publish) and, when their p95 exceeds the budget, makes the camera cheaper step by
step; when the load falls it gives the steps back. Plain and clock-free (``now`` is passed in), so unit tests
drive it with synthetic ages; ``CameraPipeline`` applies what it decides.

The policy aims a little under the budget: it acts when the p95 is over ``target_ratio`` (0.9) x budget, because
its own probes (below) overshoot for a second or two, and those frames must fit in the 5% the p95 leaves.

While the p95 age is over that target, one action per decision, ``hold_s`` apart (a cut needs time to drain):
  1. ``batch_wait``: this camera's frames stop waiting for a batch to fill (a per-request max wait of 0);
  2. ``fps``: the analysed rate is multiplied by ``STEP`` (0.8), down to ``min_fps``; the decoder keeps
     reading every frame, the skipped ones count as ``dropped.budget``. The tracker links a detection to a
     track by IoU: where objects move farther than their own width between analysed frames, no detection
     links to the next, every track lives one frame and no line or zone counts it (COUNTING_MIN_FPS);
  3. ``min_fps``: nothing is left to give; said once.
Each raises a ``budget_exceeded`` event. Once the p95 has stayed at or under ``recover_ratio`` x budget for
``recover_hold_s`` (counted from the first frame published that was captured after the last step up: frames
older than the hold must not let the rate climb on the calm of the rate before; a silence as long as the
hold, a reconnect say, starts it again), the rate goes up by ``step_up`` (a tenth of the configured rate),
one step at a time; the batch wait comes back last, after twice that calm, with a ``budget_recovered`` event.
Between the two thresholds nothing changes (hysteresis).

The ``ceiling`` is the lowest rate known to be too much: the rate each cut was made from. Steps up are whole
steps well below it; near it, half steps that never pass it; a step that reaches it is a probe. Each probe that
ends in a new excess doubles ``recover_hold_s`` (up to ``max_recover_hold_s``), so a rate the machine cannot
sustain is retried less and less often. A probe that holds means the load fell: the hold is forgotten and the
ceiling moves up half a step, so the climb above a rate that was once too much goes on in half-step probes.
Restoring the batch wait is a probe too (the configuration was too much): one that ends in a new excess doubles
the hold before the next restore; the hold is forgotten once it has held for as long as a restore waits.

Fairness. A camera changes only its own rate and wait, never another camera's, and a camera without a
budget never changes. Cameras over budget on a shared machine must also give up alike, and independent
controllers drift apart unless their rules are symmetric, so: cuts are multiplicative and steps up additive
(AIMD, which converges to equal rates); every camera decides at the same instants of the shared clock
(``decide_every`` slots of time.monotonic(), which every process on a host shares and no NTP step moves) on
the frames published before that instant, so a neighbour's step up a moment earlier cannot make this camera
give up frames for it; and a step up does not clear the evidence, so the camera that stepped up sees an excess
exactly when its neighbours do.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

BudgetEvent = Literal["budget_exceeded", "budget_recovered"]

# The lowest analysed rate at which a camera's lines and zones count right, so the budget's floor for a camera with
# any (its configured fps where lower). Below it the tracker loses fast objects (moving farther than their width
# between frames: every track one frame long), silently. With perfect boxes on the synthetic street (seeds 31-36,
# 60 s each, from a 10 and a 25 fps source; 58-71 crossings and zone entries each), against every frame analysed:
# 5 fps missed at most 2 of either, as 6-8 fps did; 4 fps of the 25 fps source up to 4 crossings, 3.5 fps up to
# 11, 3 fps up to 26, 2 fps 35-63 (docs/architecture.md, "Frame-age budget").
COUNTING_MIN_FPS = 5.0


@dataclass(frozen=True)
class BudgetAction:
    """One decision: what changed, the event to raise (None: a silent step up) and the state after it."""

    action: Literal["batch_wait", "fps", "min_fps", "fps_up", "restored"]
    event: BudgetEvent | None
    fps: float  # analysed frames per second from now on
    batch_wait_s: float | None  # per-request max batch wait; None: the inference replica's own setting
    p95_s: float  # the p95 age the decision was taken on

    def event_fields(self, budget_s: float, configured_fps: float | None) -> dict:
        return {"action": self.action, "p95_ms": round(self.p95_s * 1000, 1), "budget_ms": _rounded(budget_s * 1000, 1),
                "fps": _rounded(self.fps, 2), "configured_fps": configured_fps}


def _rounded(x: float, digits: int) -> float:
    """``round(x, digits)``, but a small positive value keeps three significant digits: a budget of 0.04 ms or an
    fps of 0.004 (both allowed) went out as 0.0, which the event's schema refuses (above 0)."""
    return round(x, digits) or float(f"{x:.3g}")


class FrameAgeBudget:
    """Decides, from ages of one camera's frames, its analysed fps and batch wait (see the module docstring)."""

    STEP = 0.8

    def __init__(self, budget_s: float, base_fps: float, *, min_fps: float | None = None, window_s: float = 2.0,
                 min_samples: int = 8, hold_s: float = 2.0, target_ratio: float = 0.9, recover_ratio: float = 0.7,
                 recover_hold_s: float = 4.0, max_recover_hold_s: float = 60.0, decide_every: float = 0.5,
                 counts: bool = False):
        """``counts``: the camera has lines or zones, whose counts need COUNTING_MIN_FPS (the default floor)."""
        if budget_s <= 0 or base_fps <= 0 or (min_fps is not None and min_fps <= 0):
            raise ValueError(f"budget and fps must be > 0, got {budget_s} s, {base_fps} fps and min_fps {min_fps}")
        if not 0 < recover_ratio < target_ratio <= 1:
            raise ValueError(f"need 0 < recover_ratio < target_ratio <= 1, got recover_ratio {recover_ratio} and "
                             f"target_ratio {target_ratio}")
        self.budget_s, self.base_fps = budget_s, base_fps
        floor = max(1.0, 0.1 * base_fps, COUNTING_MIN_FPS if counts else 0.0)
        self.min_fps = min(base_fps, floor) if min_fps is None else min(min_fps, base_fps)
        self.window_s, self.min_samples, self.hold_s, self.decide_every = window_s, min_samples, hold_s, decide_every
        # at a few frames per second the evidence reaches further back: far enough to hold min_samples frames
        self.max_window_s = max(10 * window_s, 2 * min_samples / self.min_fps)
        self.target_ratio, self.recover_ratio, self.max_recover_hold_s = target_ratio, recover_ratio, max_recover_hold_s
        self.initial_recover_hold_s = self.recover_hold_s = recover_hold_s
        self.step_up = max(0.5, 0.1 * base_fps)
        self.fps = base_fps
        self.batch_wait_s: float | None = None
        self.actions: collections.Counter[str] = collections.Counter()  # action -> times taken, for metrics
        self._ages: collections.deque[tuple[float, float]] = collections.deque()  # (published at, age)
        self._last_cut_at = -math.inf
        self._last_step_at = -math.inf  # the last step up (or restore)
        self._slot: int | None = None
        self._over = False  # inside an episode of excess
        self._under_since: float | None = None
        self._ceiling: float | None = None  # the lowest rate known to be too much (each cut's starting rate)
        self._probing = False  # the last step up reached the ceiling
        self._floor_said = False
        self._last_frame_at = -math.inf  # when the latest frame was published

    @property
    def adapted(self) -> bool:
        """True while any action is in force (the camera runs below its configuration)."""
        return self.fps < self.base_fps or self.batch_wait_s is not None

    def observe(self, age_s: float, now: float) -> None:
        """A frame published at ``now`` (seconds, the clock ``decide`` gets) that was ``age_s`` old."""
        if now - self._last_frame_at > max(self.initial_recover_hold_s, 2 / self.fps):
            # No frame for as long as a calm must last (a reconnect, a stalled model): that was no calm.
            self._under_since = None
        self._last_frame_at = now
        self._ages.append((now, age_s))

    def alive(self, now: float) -> None:
        """A frame read at ``now`` that the motion gate kept from inference: the stream goes on, so a calm begun
        before it lasts (a still scene published only bursts, each after a gap that read as no calm: the rate
        an overload cut never came back); its age says nothing of the load, so it is no sample."""
        self._last_frame_at = max(self._last_frame_at, now)

    def p95(self, now: float) -> float | None:
        """p95 age of frames published in the ``window_s`` before ``now`` (at least the last ``min_samples`` of
        them: at a few frames per second the window reaches further back, up to ``max_window_s``), counting only
        frames captured after the last cut (frames already on their way then say nothing about the lower
        rate); None: too few of them."""
        while self._ages and self._ages[0][0] < now - self.max_window_s:
            self._ages.popleft()
        fresh = [(t, age) for t, age in self._ages if t <= now and t - age >= self._last_cut_at]
        recent = [age for t, age in fresh if t >= now - self.window_s]
        if len(recent) < self.min_samples:
            recent = [age for _, age in fresh[-self.min_samples:]]
        return float(np.percentile(recent, 95)) if len(recent) >= self.min_samples else None

    def decide(self, now: float) -> BudgetAction | None:
        """At most one action per ``decide_every`` slot of the clock, taken as of the slot's start; None when
        nothing changes. Call it often (on every published frame is fine)."""
        slot = math.floor(now / self.decide_every)
        if slot == self._slot:
            return None
        self._slot = slot
        now = slot * self.decide_every
        if now - self._last_cut_at < self.hold_s:
            return None
        p95 = self.p95(now)
        if p95 is None:
            return None
        if p95 > self.target_ratio * self.budget_s:
            self._under_since = None
            if not self._over:
                self._over = True
                if self._probing:  # the probe went too far: wait longer before the next one
                    self.recover_hold_s = min(self.max_recover_hold_s, 2 * self.recover_hold_s)
                self._probing = False
            if self.batch_wait_s is None or self.fps > self.min_fps:  # a cut (not the floor): from a rate too much
                self._ceiling = self.fps if self._ceiling is None else min(self._ceiling, self.fps)
            return self._cut(p95, now)
        self._over = False
        if p95 > self.recover_ratio * self.budget_s:
            self._under_since = None  # inside the hysteresis band
            return None
        if self._under_since is None:
            if not self._seen_since(self._last_step_at, now):
                return None  # the calm must be that of the rate set last: none of its frames is published yet
            self._under_since = now
        if now - self._under_since < self._relax_hold():
            return None
        if not self.adapted:  # nothing to give back; the configuration restored last held: the load has fallen
            self._probing, self.recover_hold_s = False, self.initial_recover_hold_s
            return None
        return self._relax(p95, now)

    def _seen_since(self, when: float, now: float) -> bool:
        """Whether a frame captured at or after ``when`` was published by ``now``."""
        return any(t <= now and t - age >= when for t, age in reversed(self._ages))

    def _relax_hold(self) -> float:
        if self.fps >= self.base_fps:  # the batch wait comes back last, after a longer calm
            return 2 * self.recover_hold_s
        if not self._is_probe(self._next_fps()):
            return self.initial_recover_hold_s  # well below the rate that was too much: no need to be shy
        return self.recover_hold_s

    def _next_fps(self) -> float:
        """The rate a step up goes to: one ``step_up`` more well below the ceiling; near it half a step, never
        past it (nor past the configuration)."""
        if not self._is_probe(self.fps + self.step_up):
            return min(self.base_fps, self.fps + self.step_up)
        return min(self.base_fps, self.fps + self.step_up / 2, self._ceiling)

    def _is_probe(self, fps: float) -> bool:
        """A step to ``fps`` tries a rate at (or within 5% of) the lowest one that was last too much."""
        return self._ceiling is not None and fps >= 0.95 * self._ceiling

    def _cut(self, p95: float, now: float) -> BudgetAction | None:
        if self.batch_wait_s is None:
            self.batch_wait_s = 0.0
            return self._acted("batch_wait", "budget_exceeded", p95, now)
        if self.fps > self.min_fps:
            self.fps = max(self.min_fps, self.fps * self.STEP)
            return self._acted("fps", "budget_exceeded", p95, now)
        if not self._floor_said:
            self._floor_said = True
            return self._acted("min_fps", "budget_exceeded", p95, now)
        return None

    def _relax(self, p95: float, now: float) -> BudgetAction:
        self._under_since = None
        self._floor_said = False
        if self._probing:  # the last probe held: the load has fallen; the next rate up is the next to try
            self._probing = False
            self._ceiling = self.fps + self.step_up / 2
            self.recover_hold_s = self.initial_recover_hold_s
        if self.fps < self.base_fps:
            self.fps = self._next_fps()
            self._probing = self._is_probe(self.fps)
            return self._acted("fps_up", None, p95, now)
        self.batch_wait_s = None
        self._ceiling = None
        # The configuration was too much when this began: restoring it is a probe too, and one that ends in a
        # new excess doubles the hold (else the batch wait alone flaps back and forth at a fixed period).
        self._probing = True
        return self._acted("restored", "budget_recovered", p95, now)

    def _acted(self, action: str, event: BudgetEvent | None, p95: float, now: float) -> BudgetAction:
        if event == "budget_exceeded":
            self._last_cut_at = now
        else:
            self._last_step_at = now
        self.actions[action] += 1
        return BudgetAction(action, event, self.fps, self.batch_wait_s, p95)  # type: ignore[arg-type]

    def stats(self, now: float) -> dict:
        p95 = self.p95(now)
        return {"max_frame_age_ms": round(self.budget_s * 1000, 1), "fps": round(self.fps, 3),
                "base_fps": round(self.base_fps, 3),
                "batch_wait_ms": None if self.batch_wait_s is None else round(self.batch_wait_s * 1000, 3),
                "adapted": self.adapted, "p95_ms": None if p95 is None else round(p95 * 1000, 1),
                "actions": dict(self.actions)}
