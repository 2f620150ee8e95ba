"""Seeded procedural street scenes: frames with ground truth for detector training, tracking scores and the
``synthetic://`` camera.

A fixed camera looks across a street: buildings, a far sidewalk, a road with car lanes and bike lanes, a near
sidewalk. Persons, cars and bicycles enter at the frame edges and leave; depth order, size and speed follow
a ground-plane perspective (an object's size is linear in the distance of its bottom from a horizon line).
Everything comes from one ``np.random.default_rng(seed)``, so a seed replays bit-identically.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from synthetic import sprites
from synthetic.sprites import Sprite

CLASS_NAMES: tuple[str, ...] = ("person", "car", "bicycle")
CAR_KINDS: tuple[str, ...] = sprites.CAR_KINDS  # the attribute a car carries in FrameTruth.kinds

_BASE_COUNT = 7.0  # objects alive at density 1 (a few are just entering or leaving)
_SHARE = {"person": 0.4, "car": 0.35, "bicycle": 0.25}  # of the objects alive, not of spawns
_SIZE_M = {"person": 1.7, "car": 4.3, "bicycle": 1.75}  # a person's height, a car's or bicycle's length
_SPEED_MPS = {"person": (0.9, 1.8), "car": (6.0, 11.0), "bicycle": (3.0, 6.0)}
_CYCLE_M = {"person": 1.5, "car": 1.0, "bicycle": 2.1 / 6}  # metres per animation cycle (gait, spoke spacing)
_GAP_M = {"car": 2.0, "bicycle": 1.0}  # least bumper-to-bumper gap in a lane
_MAX_DENSITY = 8.0
_NOISE_PAD = 16  # the sensor-noise field is this much larger than the frame; a frame reads a random window


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields with np.array_equal
class FrameTruth:
    """Ground truth of one frame: every object with at least one pixel inside the image."""

    frame: int  # 0-based index of the frame in this scene
    boxes: np.ndarray  # (N, 4) float32 xyxy source pixels: the full object extent clipped to the image
    class_ids: np.ndarray  # (N,) int64 index into CLASS_NAMES
    object_ids: np.ndarray  # (N,) int64, persistent for an object's life, never reused within a scene
    visibility: np.ndarray  # (N,) float32: fraction of the object's pixels inside the image and not covered
    kinds: np.ndarray | None = None  # (N,) str: a car's body type (CAR_KINDS), "" for other classes

    def visible(self, min_visibility: float = 0.5) -> "FrameTruth":
        """The objects with visibility >= min_visibility."""
        k = self.visibility >= min_visibility
        return FrameTruth(self.frame, self.boxes[k], self.class_ids[k], self.object_ids[k], self.visibility[k],
                          None if self.kinds is None else self.kinds[k])

    def __len__(self) -> int:
        return len(self.object_ids)


def composite(image: np.ndarray, labels: np.ndarray,
              placed: Sequence[tuple[Sprite, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Paints (sprite, left, top, label) back to front; a sprite's mask writes its label (0: none) into ``labels``.

    Returns per sprite its mask pixels inside the image and those still showing once all are painted.
    """
    H, W = labels.shape
    inside, visible, regions = np.zeros(len(placed), np.int64), np.zeros(len(placed), np.int64), []
    for i, (sp, x, y, label) in enumerate(placed):
        h, w = sp.mask.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 >= x1 or y0 >= y1:
            continue
        sy, sx = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
        region = image[y0:y1, x0:x1]
        cv2.add(cv2.multiply(region, sp.inv_alpha[sy, sx], scale=1 / 255), sp.premul[sy, sx], dst=region)
        mask, lab = sp.mask[sy, sx], labels[y0:y1, x0:x1]
        lab[mask] = label
        inside[i] = sp.area if (x1 - x0, y1 - y0) == (w, h) else np.count_nonzero(mask)
        if label:
            regions.append((i, lab, label))
    for i, lab, label in regions:
        visible[i] = np.count_nonzero(lab == label)
    return inside, visible


@dataclass(frozen=True)
class _Lane:
    y: float  # image row of the wheels' ground contact
    dir: int  # +1 moves right, -1 left
    cls: str  # "car" or "bicycle"
    speed: float  # typical speed, m/s


class _Layout:
    """Where the street's parts are, and the perspective: pixels per metre as a function of image row."""

    def __init__(self, rng: np.random.Generator, width: int, height: int):
        H = height
        self.fs0 = H * rng.uniform(0.40, 0.46)  # far sidewalk top = building base
        self.fs1 = self.fs0 + H * rng.uniform(0.08, 0.11)
        self.r1 = H * rng.uniform(0.82, 0.86)  # road bottom = near sidewalk top
        self.far_band = (self.fs0 + 0.4 * (self.fs1 - self.fs0), self.fs1 - 0.05 * (self.fs1 - self.fs0))
        self.near_band = (self.r1 + 0.2 * (H - self.r1), H * 0.995)
        # person height = k * (y - horizon): 7.5% of H on the far sidewalk, 23% at the bottom edge
        y_far = sum(self.far_band) / 2
        self.k = (0.23 - 0.075) * H / (0.99 * H - y_far)
        self.horizon = y_far - 0.075 * H / self.k
        bike = 0.11 * (self.r1 - self.fs1)
        n = int(rng.choice([2, 3, 4], p=[0.4, 0.3, 0.3]))
        n_far = n // 2 if n % 2 == 0 else int(rng.integers(1, 3))
        far_dir = 1 if rng.random() < 0.5 else -1
        top, depth = self.fs1 + bike, (self.r1 - self.fs1 - 2 * bike) / n
        self.lanes = [_Lane(self.fs1 + bike / 2, far_dir, "bicycle", 0.0),
                      _Lane(self.r1 - bike / 2, -far_dir, "bicycle", 0.0)]
        self.lanes += [_Lane(top + (i + 0.75) * depth, far_dir if i < n_far else -far_dir, "car",
                             rng.uniform(*_SPEED_MPS["car"])) for i in range(n)]
        self.dividers = [(top + i * depth, "centre" if i == n_far else "dash") for i in range(1, n)]
        self.bike_edges = (top, self.r1 - bike)
        self.crosswalk = rng.uniform(0.2, 0.8) * width if rng.random() < 0.5 else None

    def ppm(self, y: float) -> float:
        """Pixels per metre (horizontally) for an object standing on image row y."""
        return max(self.k * (y - self.horizon), 1.0) / _SIZE_M["person"]


_SKIES = [((110, 160, 225), (200, 225, 245)), ((160, 165, 178), (215, 215, 220)), ((80, 100, 165), (235, 170, 120))]
_WALLS = [(165, 85, 65), (210, 190, 160), (150, 150, 155), (230, 220, 200), (115, 125, 140), (190, 160, 120),
          (175, 200, 185), (200, 170, 180), (95, 80, 75)]
_PAVERS = [(170, 165, 155), (190, 180, 165), (145, 145, 148), (170, 120, 100), (205, 200, 190)]
_FAR_CLUTTER = ["tree", "tree", "pole", "bin", "box", "bench", "bush", "bush", "hydrant"]
_NEAR_CLUTTER = ["pole", "pole", "bin", "box", "bench", "bush", "hydrant", "tree"]


def _paint_street(rng: np.random.Generator, lay: _Layout, W: int, H: int) -> tuple[np.ndarray, list]:
    """The static background, and the near clutter items (sprite, left, top, base row) that can hide objects."""
    img = np.zeros((H, W, 3), np.float32)
    fs0, fs1, r1 = int(lay.fs0), int(lay.fs1), int(lay.r1)
    top, low = (np.array(c, np.float32) for c in _SKIES[int(rng.integers(len(_SKIES)))])
    t = np.linspace(0, 1, fs0, dtype=np.float32)[:, None, None]
    img[:fs0] = top * (1 - t) + low * t
    x = -rng.uniform(0, 0.3) * H
    while x < W:  # a row of facades with window grids; sometimes a gap with a hedge
        bw, bx = rng.uniform(0.25, 0.8) * H, int(max(x, 0))
        x1 = max(int(x + bw), 0)  # a facade ending left of the frame: a negative end would slice from the right
        if rng.random() < 0.15:
            img[fs0 - int(0.05 * H):fs0, bx:x1] = _jit(rng, (60, 100, 55), 20)
        else:
            y0, wall = int(rng.uniform(0, 0.6) * fs0), _jit(rng, _WALLS[int(rng.integers(len(_WALLS)))], 15)
            img[y0:fs0, bx:x1] = wall
            ww = rng.uniform(0.025, 0.045) * H
            wh, sx, sy, glass = ww * rng.uniform(1.2, 1.7), ww * rng.uniform(1.6, 2.4), ww * rng.uniform(2.0, 2.6), \
                _jit(rng, (55, 65, 80), 12)
            for wy in np.arange(y0 + 0.5 * sy, fs0 - 0.12 * H - wh, sy):
                for wx in np.arange(x + 0.5 * sx, x + bw - sx * 0.5 - ww, sx):
                    lit = rng.random() < 0.12
                    cv2.rectangle(img, (int(wx), int(wy)), (int(wx + ww), int(wy + wh)),
                                  (225, 205, 140) if lit else glass, -1)
            dx = int(x + rng.uniform(0.15, 0.6) * bw)
            cv2.rectangle(img, (dx, fs0 - int(0.09 * H)), (dx + int(0.04 * H), fs0), _jit(rng, (70, 50, 40), 20), -1)
        x += bw
    paver, asphalt = _jit(rng, _PAVERS[int(rng.integers(len(_PAVERS)))], 10), _jit(rng, (80, 80, 82), 25)
    img[fs0:fs1], img[r1:], img[fs1:r1] = paver, paver, asphalt
    if rng.random() < 0.35:  # painted bike lanes
        tint = _jit(rng, (80, 140, 90) if rng.random() < 0.5 else (150, 75, 60), 10)
        img[fs1:int(lay.bike_edges[0])] = tint
        img[int(lay.bike_edges[1]):r1] = tint
    low_freq = cv2.resize(rng.standard_normal((H // 16 + 2, W // 16 + 2)).astype(np.float32), (W, H),
                          interpolation=cv2.INTER_CUBIC)
    img *= 1 + 0.04 * low_freq[..., None]
    vx = W * rng.uniform(0.3, 0.7)
    for y0, y1 in ((fs0, fs1), (r1, H)):  # paving joints converge on the vanishing point
        step, ym = 1.2 * lay.ppm((y0 + y1) / 2), (y0 + y1) / 2
        for jx in np.arange(rng.uniform(0, step), W + step, step):
            f0, f1 = (y0 - lay.horizon) / (ym - lay.horizon), (y1 - lay.horizon) / (ym - lay.horizon)
            cv2.line(img, (int(vx + (jx - vx) * f0), y0), (int(vx + (jx - vx) * f1), y1), paver * 0.8, 1, cv2.LINE_AA)
        cv2.line(img, (0, int(ym)), (W, int(ym)), paver * 0.85, 1, cv2.LINE_AA)
    curb = max(1, round(0.008 * H))
    img[fs1:fs1 + curb] *= 0.75
    img[r1:r1 + curb] = paver * 1.15
    white, yellow = _jit(rng, (225, 225, 220), 10), _jit(rng, (230, 190, 50), 10)
    for y, kind in lay.dividers + [(e, "solid") for e in lay.bike_edges]:
        th, ppm = max(1, round(0.06 * lay.ppm(y))), lay.ppm(y)
        if kind == "dash":
            for dx in np.arange(-rng.uniform(0, 9 * ppm), W, 9 * ppm):
                img[int(y):int(y) + th, max(int(dx), 0):max(int(dx + 3 * ppm), 0)] = white
        elif kind == "centre":
            img[int(y) - th:int(y), :] = yellow
            img[int(y) + th:int(y) + 2 * th, :] = yellow
        else:
            img[int(y):int(y) + th, :] = white
    if lay.crosswalk is not None:
        ys = np.linspace(fs1 + curb, r1, 12)
        for ya, yb in zip(ys[::2], ys[1::2]):
            ha, hb = 1.8 * lay.ppm(ya), 1.8 * lay.ppm(yb)
            cv2.fillPoly(img, [np.array([(lay.crosswalk - ha, ya), (lay.crosswalk + ha, ya),
                                         (lay.crosswalk + hb, yb), (lay.crosswalk - hb, yb)], np.int32)], white,
                         cv2.LINE_AA)
    img += rng.standard_normal((H, W, 1), np.float32) * 3.0
    bg = np.clip(img, 0, 255).astype(np.uint8)
    items = []
    d_far, d_near = lay.fs1 - lay.fs0, H - lay.r1
    for n, (y0, y1), kinds in ((rng.integers(3, 8), (lay.fs0 + 0.05 * d_far, lay.fs0 + 0.3 * d_far), _FAR_CLUTTER),
                               (rng.integers(1, 4), (lay.r1 + 0.06 * d_near, lay.r1 + 0.25 * d_near), _NEAR_CLUTTER)):
        for _ in range(int(n)):
            kind, y, x = kinds[int(rng.integers(len(kinds)))], rng.uniform(y0, y1), rng.uniform(0, W)
            lo, hi = sprites.CLUTTER[kind][2]
            sp = sprites.render_clutter(kind, rng, lay.k * (y - lay.horizon) * rng.uniform(lo, hi))
            items.append((sp, round(x - sp.anchor[0]), round(y - sp.anchor[1]), y))
    items.sort(key=lambda it: it[3])
    composite(bg, np.zeros((H, W), np.int16), [(sp, x, y, 0) for sp, x, y, _ in items])
    return bg, [it for it in items if it[3] > lay.r1]


def _jit(rng: np.random.Generator, c: tuple, amount: float) -> np.ndarray:
    return np.clip(np.array(c, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


@dataclass(eq=False)
class _Agent:
    id: int
    cls: str
    recipe: dict
    dir: int
    x: float  # ground-contact point (bottom centre), image pixels
    y: float
    speed: float  # wanted speed, m/s
    scale: float  # size jitter
    lane: _Lane | None = None  # None: a pedestrian
    cross_at: float = math.inf  # progress (pixels along dir) where a pedestrian starts crossing the road
    y_goal: float = 0.0
    vy: float = 0.0  # pixels/s while crossing
    dist: float = 0.0  # metres travelled: drives the animation
    v: float = 0.0  # current speed, m/s
    size_px: float = 0.0  # size the cached sprites were drawn at
    sprites: dict = field(default_factory=dict)


class StreetScene:
    """A seeded street scene; ``step()`` advances one frame and returns (RGB uint8 image, FrameTruth)."""

    def __init__(self, seed: int, width: int = 640, height: int = 360, fps: float = 25.0,
                 density: float = 1.0, classes: Sequence[str] = CLASS_NAMES):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 64 <= v <= 8192:
                raise ValueError(f"{name} must be an int in [64, 8192], got {v!r}")
        if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps <= 1000:
            raise ValueError(f"fps must be in (0, 1000], got {fps!r}")
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 <= density <= _MAX_DENSITY:
            raise ValueError(f"density must be in [0, {_MAX_DENSITY:g}], got {density!r}")
        try:  # a numpy array too (its truth value raised numpy's "ambiguous" error)
            names = None if isinstance(classes, str) else [str(c) for c in classes]
        except TypeError:  # None, a number
            names = None
        if not names:
            raise ValueError(f"classes must be a non-empty sequence of names from {CLASS_NAMES}, got {classes!r}")
        for c in names:
            if c not in CLASS_NAMES:
                raise ValueError(f"classes: unknown class {c!r}; allowed: {', '.join(CLASS_NAMES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"classes: duplicate names in {names}")
        self.width, self.height, self.fps, self.density = int(width), int(height), float(fps), float(density)
        self.classes = tuple(names)
        self._rng = rng = np.random.default_rng(int(seed))
        self._lay = _Layout(rng, self.width, self.height)
        self._background, self._foreground = _paint_street(rng, self._lay, self.width, self.height)
        self._work = np.empty_like(self._background)
        self._labels = np.zeros((self.height, self.width), np.int16)
        total = sum(_SHARE[c] for c in self.classes)
        # per class: mean alive count, and a slow swing around it so scenes get busier and quieter
        self._target = {c: (_BASE_COUNT * density * _SHARE[c] / total, rng.uniform(20, 60), rng.uniform(0, 6.3))
                        for c in self.classes}
        sigma = rng.uniform(1.5, 4.5)
        noise = rng.standard_normal((self.height + _NOISE_PAD, self.width + _NOISE_PAD, 3), np.float32) * sigma
        self._noise = (np.clip(noise, 0, 255).astype(np.uint8), np.clip(-noise, 0, 255).astype(np.uint8))
        self._light = (rng.uniform(0.82, 1.02), rng.uniform(2, 16), rng.uniform(0.03, 0.1), rng.uniform(8, 30),
                       rng.uniform(0, 6.3))
        self._agents: list[_Agent] = []
        self._parked: list[tuple[float, int, _Agent, Sprite, int, int]] = []  # see park()
        self._next_id, self._frame = 1, 0
        for c in self.classes:
            for _ in range(int(rng.poisson(self._target[c][0]))):
                self._add(c, entering=False)

    # --- motion -------------------------------------------------------------------------------------

    def _progress(self, a: _Agent) -> float:
        return a.x if a.dir > 0 else self.width - a.x

    def _extent(self, a: _Agent) -> tuple[float, float]:
        """(back, front) reach of the object's pixels from its ground point, along its direction."""
        sp = self._sprite(a)
        left, right = sp.anchor[0] - sp.bbox[0], sp.bbox[2] - sp.anchor[0]
        return (left, right) if a.dir > 0 else (right, left)

    def _add(self, cls: str, entering: bool) -> None:
        rng, lay, W = self._rng, self._lay, self.width
        a = _Agent(self._next_id, cls, sprites.recipe(cls, rng), 1, 0.0, 0.0, 0.0, rng.uniform(0.87, 1.15))
        if cls == "person":
            far = rng.random() < 0.5
            a.y = rng.uniform(*(lay.far_band if far else lay.near_band))
            a.dir = 1 if rng.random() < 0.5 else -1
            a.speed = rng.uniform(*_SPEED_MPS[cls])
            if rng.random() < 0.2:  # crosses to the other sidewalk, often at the crosswalk
                a.y_goal = rng.uniform(*(lay.near_band if far else lay.far_band))
                at = lay.crosswalk if lay.crosswalk is not None and rng.random() < 0.6 else rng.uniform(0.1, 0.7) * W
                a.cross_at = at if a.dir > 0 else W - at
        else:
            lanes = [ln for ln in lay.lanes if ln.cls == cls]
            a.lane = lane = lanes[int(rng.integers(len(lanes)))]
            a.y, a.dir = lane.y, lane.dir
            a.speed = lane.speed * rng.uniform(0.9, 1.1) if cls == "car" else rng.uniform(*_SPEED_MPS[cls])
        a.v = a.speed
        back, front = self._extent(a)
        p = -front - 1.0 if entering else rng.uniform(0, W)
        if a.lane is not None:
            gap = _GAP_M[cls] * lay.ppm(a.y)
            for b in self._agents:
                if b.lane is a.lane:
                    bp, (bb, bf) = self._progress(b), self._extent(b)
                    if p + front + gap > bp - bb and bp + bf + gap > p - back:
                        return  # lane occupied there: try again on a later frame
        if a.cross_at < p:
            a.cross_at = math.inf
        a.x = p if a.dir > 0 else W - p
        self._next_id += 1
        self._agents.append(a)

    def _move(self) -> None:
        dt, lay, W = 1.0 / self.fps, self._lay, self.width
        ahead: dict[int, float] = {}  # lane id -> back of the vehicle ahead, already moved
        for a in sorted(self._agents, key=lambda a: -self._progress(a)):
            ppm, p = lay.ppm(a.y), self._progress(a)
            a.v += (a.speed - a.v) * min(1.0, dt)  # ease back to the wanted speed after queueing
            new_p = p + a.v * ppm * dt * (0.6 if a.vy else 1.0)
            if a.lane is not None:
                back, front = self._extent(a)
                limit = ahead.get(id(a.lane), math.inf) - _GAP_M[a.cls] * ppm - front
                if new_p > limit:  # queue behind the vehicle ahead instead of driving through it
                    new_p = max(p, limit)
                    a.v = (new_p - p) / (ppm * dt)
                ahead[id(a.lane)] = new_p - back
            elif new_p >= a.cross_at:
                a.cross_at, a.vy = math.inf, (a.y_goal - a.y) / self._rng.uniform(5, 9)
            if a.vy:
                a.y += a.vy * dt
                if (a.y_goal - a.y) * a.vy <= 0:
                    a.y, a.vy = a.y_goal, 0.0
            a.dist += (new_p - p) / ppm
            a.x = new_p if a.dir > 0 else W - new_p
        self._agents = [a for a in self._agents if self._progress(a) - self._extent(a)[0] <= W + 1]

    def _spawn(self) -> None:
        t = self._frame / self.fps
        for c, (mean, period, phase) in self._target.items():
            want = mean * (1 + 0.35 * math.sin(2 * math.pi * t / period + phase))
            deficit = want - sum(a.cls == c for a in self._agents)
            if deficit > 0 and self._rng.random() < 1 - math.exp(-1.2 * deficit / self.fps):
                self._add(c, entering=True)

    def _sprite(self, a: _Agent) -> Sprite:
        size = self._lay.ppm(a.y) * _SIZE_M[a.cls] * a.scale
        if abs(size - a.size_px) > 0.04 * size:  # a crossing pedestrian grows or shrinks: redraw
            a.sprites.clear()
            a.size_px = size
        n = sprites.POSES[a.cls]
        pose = int(a.dist / _CYCLE_M[a.cls] * n) % n
        sp = a.sprites.get(pose)
        if sp is None:
            sp = a.sprites[pose] = sprites.render(a.cls, a.recipe, a.size_px, pose, a.dir < 0)
        return sp

    # --- drawing ------------------------------------------------------------------------------------

    def step(self) -> tuple[np.ndarray, FrameTruth]:
        """Advance one frame; return the RGB uint8 image (height, width, 3), C-contiguous, and its truth."""
        if self._frame > 0:
            self._move()
            self._spawn()
        rng, W, H = self._rng, self.width, self.height
        agents = sorted(self._agents, key=lambda a: (a.y, a.id))
        jitter = rng.normal(0.0, 1.0, (len(agents), 2)) * (0.35, 0.25)
        objects = []  # (base row, id, agent, sprite, left, top)
        for a, (jx, jy) in zip(agents, jitter):
            sp = self._sprite(a)
            objects.append((a.y, a.id, a, sp, round(a.x + jx - sp.anchor[0]), round(a.y + jy - sp.anchor[1])))
        objects = sorted(objects + self._parked, key=lambda o: o[:2])  # painter's order: far (higher up) first
        placed, rects, fg = [], [], iter(self._foreground)
        item = next(fg, None)
        for i, (base, _, _, sp, x, y) in enumerate(objects):
            while item is not None and item[3] <= base:
                placed += self._cover(item, rects)
                item = next(fg, None)
            placed.append((sp, x, y, i + 1))
            rects.append((x, y, x + sp.mask.shape[1], y + sp.mask.shape[0]))
        while item is not None:
            placed += self._cover(item, rects)
            item = next(fg, None)
        np.copyto(self._work, self._background)
        self._labels.fill(0)
        inside, visible = composite(self._work, self._labels, placed)
        keep, boxes = [], []
        for (sp, x, y, label), n_in, n_vis in zip(placed, inside, visible):
            if label and n_in:
                keep.append((objects[label - 1][2], n_vis / sp.area))
                boxes.append((x + sp.bbox[0], y + sp.bbox[1], x + sp.bbox[2], y + sp.bbox[3]))
        image = self._light_and_noise()
        b = np.clip(np.array(boxes, np.float32).reshape(-1, 4), 0, [W, H, W, H]).astype(np.float32)
        truth = FrameTruth(self._frame, b, np.array([CLASS_NAMES.index(a.cls) for a, _ in keep], np.int64),
                           np.array([a.id for a, _ in keep], np.int64), np.array([v for _, v in keep], np.float32),
                           np.array([a.recipe.get("kind", "") for a, _ in keep], dtype="<U8"))
        self._frame += 1
        return image, truth

    def park(self, cls: str, recipe: dict, sprite: Sprite, left: int, top: int, object_id: int) -> None:
        """Adds an object that never moves (a parked car): ``sprite`` at (``left``, ``top``) on every frame, over all
        else (the objects it covers lose that visibility) and under the light and sensor noise; last in the truth,
        as ``object_id``."""
        still = _Agent(object_id, cls, recipe, 1, left + sprite.anchor[0], top + sprite.anchor[1], 0.0, 1.0)
        self._parked.append((math.inf, object_id, still, sprite, left, top))

    @staticmethod
    def _cover(item: tuple, rects: list) -> list:
        """Redraw a near clutter item (pole, bin, ...) only where an object painted before it overlaps it."""
        sp, x, y, _ = item
        x1, y1 = x + sp.mask.shape[1], y + sp.mask.shape[0]
        if any(rx0 < x1 and x < rx1 and ry0 < y1 and y < ry1 for rx0, ry0, rx1, ry1 in rects):
            return [(sp, x, y, 0)]
        return []

    def _light_and_noise(self) -> np.ndarray:
        """Slow brightness/contrast drift plus sensor noise read from a pre-generated field."""
        gain, bias, amp, period, phase = self._light
        s = math.sin(2 * math.pi * self._frame / self.fps / period + phase)
        # convertScaleAbs is the fastest affine uint8 map in cv2, but takes |x|: keep the bias non-negative
        out = cv2.convertScaleAbs(self._work, alpha=gain + amp * s, beta=max(0.0, bias * (1 + 0.5 * s)))
        dy, dx, flip = (int(v) for v in self._rng.integers(0, [_NOISE_PAD, _NOISE_PAD, 2]))
        pos, neg = self._noise if flip else self._noise[::-1]
        cv2.add(out, pos[dy:dy + self.height, dx:dx + self.width], dst=out)
        cv2.subtract(out, neg[dy:dy + self.height, dx:dx + self.width], dst=out)
        return out
