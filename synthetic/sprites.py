"""Anti-aliased RGBA sprites for the synthetic street scene: persons, cars, bicycles and static clutter.

An object draws its recipe (colours, proportions) once at spawn; ``render`` turns recipe + size + pose
into a ``Sprite``. Shapes are drawn with cv2's anti-aliased primitives at 2x and area-downsampled, into a
colour plane on black (which makes it alpha-premultiplied) and an alpha plane. Geometry is written in
units of the object's size with y pointing up from the ground, the object facing right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

POSES = {"person": 8, "car": 1, "bicycle": 3}  # animation frames per class
_SS = 2  # supersampling factor
_FRAC = 4  # cv2 fractional coordinate bits
Colour = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Sprite:
    """A premultiplied RGBA patch with the pixels that count as the object (alpha >= 0.5)."""

    premul: np.ndarray  # (h, w, 3) uint8, colour * alpha
    inv_alpha: np.ndarray  # (h, w, 3) uint8, 255 - alpha, repeated so cv2.multiply needs no broadcast
    mask: np.ndarray  # (h, w) bool
    area: int  # mask pixels
    bbox: tuple[int, int, int, int]  # tight mask extent in patch pixels, x1/y1 exclusive
    anchor: tuple[float, float]  # ground-contact point (bottom centre) in patch pixels

    @classmethod
    def from_rgba(cls, rgba: np.ndarray, anchor: tuple[float, float] | None = None) -> "Sprite":
        """Builds a sprite from straight (not premultiplied) uint8 RGBA; the anchor defaults to bottom centre."""
        if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
            raise ValueError(f"expected (h, w, 4) uint8 RGBA, got {rgba.shape} {rgba.dtype}")
        a = rgba[..., 3:].astype(np.float32)
        premul = (rgba[..., :3] * a / 255.0 + 0.5).astype(np.uint8)
        h, w = rgba.shape[:2]
        return _pack(premul, rgba[..., 3], anchor or (w / 2, float(h)))

    def flipped(self) -> "Sprite":
        """Mirror image left-right (an object moving left)."""
        w = self.mask.shape[1]
        x0, y0, x1, y1 = self.bbox
        return Sprite(np.ascontiguousarray(self.premul[:, ::-1]), np.ascontiguousarray(self.inv_alpha[:, ::-1]),
                      np.ascontiguousarray(self.mask[:, ::-1]), self.area, (w - x1, y0, w - x0, y1),
                      (w - self.anchor[0], self.anchor[1]))


def _pack(premul: np.ndarray, alpha: np.ndarray, anchor: tuple[float, float]) -> Sprite:
    mask = alpha >= 128
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1) if len(rows) else (0, 0, 0, 0)
    inv = np.repeat((255 - alpha)[..., None], 3, axis=2)
    return Sprite(np.ascontiguousarray(premul), inv, mask, int(mask.sum()), bbox, anchor)


class _Canvas:
    """Draws each shape into a colour and an alpha plane; coordinates in object units, y up."""

    def __init__(self, size_px: float, box: tuple[float, float, float, float]):
        u0, v0, u1, v1 = box  # extent in units: left, bottom, right, top
        self.k = size_px * _SS
        self.w, self.h = math.ceil((u1 - u0) * size_px) + 2, math.ceil((v1 - v0) * size_px) + 2
        self.ox, self.oy = (1 - u0 * size_px) * _SS, (1 + v1 * size_px) * _SS  # where unit (0, 0) lands
        self.rgb = np.zeros((self.h * _SS, self.w * _SS, 3), np.uint8)
        self.alpha = np.zeros((self.h * _SS, self.w * _SS), np.uint8)

    def _p(self, u: float, v: float) -> tuple[int, int]:
        return round((self.ox + u * self.k) * 16), round((self.oy - v * self.k) * 16)

    def _t(self, width: float) -> int:  # at least ~1 output pixel so thin parts survive small sizes
        return max(_SS, round(width * self.k))

    def _both(self, draw: Callable[..., None], colour: Colour, alpha: int) -> None:
        draw(self.rgb, tuple(float(c) * alpha / 255 for c in colour))
        draw(self.alpha, alpha)

    def poly(self, pts: list[tuple[float, float]], colour: Colour, alpha: int = 255) -> None:
        p = np.array([self._p(u, v) for u, v in pts], np.int32)
        self._both(lambda im, c: cv2.fillPoly(im, [p], c, cv2.LINE_AA, _FRAC), colour, alpha)

    def line(self, a: tuple[float, float], b: tuple[float, float], width: float, colour: Colour) -> None:
        pa, pb, t = self._p(*a), self._p(*b), self._t(width)
        self._both(lambda im, c: cv2.line(im, pa, pb, c, t, cv2.LINE_AA, _FRAC), colour, 255)

    def circle(self, c: tuple[float, float], r: float, colour: Colour, width: float = -1) -> None:
        pc, pr, t = self._p(*c), round(r * self.k * 16), -1 if width < 0 else self._t(width)
        self._both(lambda im, col: cv2.circle(im, pc, pr, col, t, cv2.LINE_AA, _FRAC), colour, 255)

    def ellipse(self, c: tuple[float, float], axes: tuple[float, float], colour: Colour, alpha: int = 255) -> None:
        pc, ax = self._p(*c), (round(axes[0] * self.k * 16), round(axes[1] * self.k * 16))
        self._both(lambda im, col: cv2.ellipse(im, pc, ax, 0, 0, 360, col, -1, cv2.LINE_AA, _FRAC), colour, alpha)

    def finish(self, anchor_u: float = 0.0) -> Sprite:
        """Downsamples and crops to the drawn pixels; the anchor is the ground point at ``anchor_u``."""
        rgb = cv2.resize(self.rgb, (self.w, self.h), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(self.alpha, (self.w, self.h), interpolation=cv2.INTER_AREA)
        rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        anchor = ((self.ox + anchor_u * self.k) / _SS - x0, self.oy / _SS - y0)
        return _pack(rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1], anchor)


def _shade(c: Colour, f: float) -> Colour:
    return tuple(min(255.0, x * f) for x in c)


def _jitter(rng: np.random.Generator, c: Colour, amount: float = 18) -> Colour:
    return tuple(float(np.clip(x + rng.uniform(-amount, amount), 0, 255)) for x in c)


def _pick(rng: np.random.Generator, palette: list[Colour]) -> Colour:
    return palette[int(rng.integers(len(palette)))]


_SKIN = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
_HAIR = [(20, 15, 10), (60, 40, 25), (110, 75, 40), (200, 160, 90), (150, 150, 150), (130, 40, 20)]
_CLOTH = [(200, 30, 40), (30, 60, 160), (40, 120, 60), (230, 230, 225), (25, 25, 30), (120, 120, 125),
          (240, 200, 40), (120, 70, 140), (240, 120, 30), (90, 60, 40), (70, 160, 200), (230, 150, 170)]
_TROUSERS = [(30, 40, 80), (25, 25, 30), (90, 90, 95), (150, 120, 80), (60, 70, 50), (70, 90, 140)]
_PAINT = [(235, 235, 235), (20, 20, 24), (165, 168, 172), (95, 98, 104), (170, 25, 30), (25, 55, 130),
          (30, 80, 50), (200, 185, 150), (230, 190, 30), (110, 30, 40), (60, 120, 170), (230, 100, 20)]
_FRAME = [(200, 30, 30), (20, 20, 20), (30, 80, 190), (230, 230, 230), (40, 150, 80), (240, 180, 20),
          (120, 120, 125), (200, 60, 150)]


def person_recipe(rng: np.random.Generator) -> dict:
    return dict(skin=_jitter(rng, _pick(rng, _SKIN), 10), hair=_jitter(rng, _pick(rng, _HAIR), 10),
                shirt=_jitter(rng, _pick(rng, _CLOTH)), legs=_jitter(rng, _pick(rng, _TROUSERS + _CLOTH[:3])),
                shoes=_jitter(rng, (35, 30, 28), 15), hip=rng.uniform(0.47, 0.52), build=rng.uniform(0.14, 0.2),
                skirt=rng.random() < 0.15, shorts=rng.random() < 0.15, bag=rng.random() < 0.25,
                bag_colour=_jitter(rng, _pick(rng, _CLOTH), 10), stride=rng.uniform(0.35, 0.5))


def _person(cv: _Canvas, r: dict, pose: int) -> None:
    t = 2 * math.pi * pose / POSES["person"]
    thigh, shin, hip_x = r["hip"] * 0.52, r["hip"] * 0.48, 0.0
    legs = []
    for ph in (t + math.pi, t):  # far leg first (drawn behind)
        a = r["stride"] * math.sin(ph)
        bend = 0.55 * max(0.0, -math.cos(ph)) + 0.05
        knee = (hip_x + thigh * math.sin(a), -thigh * math.cos(a))
        ankle = (knee[0] + shin * math.sin(a - bend), knee[1] - shin * math.cos(a - bend))
        legs.append((knee, ankle))
    hip_y = -min(k[1][1] for k in legs) + 0.02  # lowest foot on the ground: this is the walking bob
    shoulder_y, w = hip_y + (1 - r["hip"]) * 0.62, r["build"]
    head = (0.015, shoulder_y + 0.105)
    cv.ellipse((0.0, 0.0), (0.2, 0.02), (0, 0, 0), 70)  # contact shadow, below the mask threshold
    for i, (knee, ankle) in enumerate(legs):
        far = 0.72 if i == 0 else 1.0
        k, a = (knee[0], knee[1] + hip_y), (ankle[0], ankle[1] + hip_y)
        leg_c = r["skin"] if r["shorts"] or r["skirt"] else r["legs"]
        cv.line((hip_x, hip_y), k, 0.075, _shade(r["legs"] if not r["skirt"] else r["skin"], far))
        cv.line(k, a, 0.065, _shade(leg_c, far))
        cv.line(a, (a[0] + 0.065, a[1] - 0.005), 0.045, _shade(r["shoes"], far))
    arms = []
    for ph in (t, t + math.pi):
        a = -0.8 * r["stride"] * math.sin(ph)
        elbow = (0.17 * math.sin(a), shoulder_y - 0.17 * math.cos(a))
        hand = (elbow[0] + 0.16 * math.sin(a + 0.35), elbow[1] - 0.16 * math.cos(a + 0.35))
        arms.append((elbow, hand))
    sh = (0.0, shoulder_y - 0.02)
    for elbow, hand in arms[:1]:  # far arm
        cv.line(sh, elbow, 0.05, _shade(r["shirt"], 0.7))
        cv.line(elbow, hand, 0.045, _shade(r["skin"], 0.75))
    if r["bag"]:
        cv.poly([(-w / 2 - 0.07, shoulder_y - 0.04), (-w / 2 + 0.01, shoulder_y - 0.04),
                 (-w / 2 + 0.01, shoulder_y - 0.24), (-w / 2 - 0.07, shoulder_y - 0.22)], r["bag_colour"])
    cv.poly([(-w / 2 * 0.85, hip_y), (w / 2 * 0.85, hip_y), (w / 2, shoulder_y - 0.03), (w / 2 - 0.03, shoulder_y),
             (-w / 2 + 0.03, shoulder_y), (-w / 2, shoulder_y - 0.03)], r["shirt"])
    if r["skirt"]:
        cv.poly([(-w / 2 * 0.85, hip_y + 0.02), (w / 2 * 0.85, hip_y + 0.02), (w / 2 + 0.06, hip_y - 0.2),
                 (-w / 2 - 0.06, hip_y - 0.2)], r["legs"])
    cv.line((0.01, shoulder_y), (0.015, shoulder_y + 0.04), 0.05, r["skin"])  # neck
    cv.circle((head[0] - 0.01, head[1] + 0.008), 0.07, r["hair"])
    cv.ellipse((head[0] + 0.012, head[1] - 0.01), (0.06, 0.062), r["skin"])
    for elbow, hand in arms[1:]:  # near arm, over the torso
        cv.line(sh, elbow, 0.055, _shade(r["shirt"], 0.92))
        cv.line(elbow, hand, 0.048, r["skin"])


# Car bodies in units of car length, rear at u=0, facing right: outline, windows, wheel centres and radius.
_CAR_TYPES = {
    "sedan": ([(0, .12), (0, .25), (.04, .29), (.25, .31), (.36, .43), (.62, .44), (.75, .31), (.96, .27),
               (1, .2), (1, .1), (.97, .07), (.03, .07)],
              [[(.29, .32), (.375, .415), (.48, .415), (.48, .32)], [(.5, .32), (.5, .415), (.61, .415), (.72, .32)]],
              (.19, .8), .095),
    "hatch": ([(0, .12), (0, .32), (.05, .42), (.58, .45), (.72, .32), (.95, .28), (1, .2), (1, .1), (.97, .07),
               (.03, .07)],
              [[(.07, .34), (.1, .405), (.26, .42), (.26, .34)], [(.28, .34), (.28, .42), (.5, .425), (.5, .34)],
               [(.52, .34), (.52, .425), (.575, .425), (.69, .34)]],
              (.18, .8), .1),
    "van": ([(0, .12), (0, .5), (.03, .54), (.7, .54), (.8, .37), (.97, .32), (1, .25), (1, .1), (.97, .07),
             (.03, .07)],
            [[(.05, .38), (.05, .49), (.33, .49), (.33, .38)], [(.36, .38), (.36, .49), (.6, .49), (.6, .38)],
             [(.63, .38), (.63, .49), (.69, .49), (.77, .38)]],
            (.17, .8), .1),
}


CAR_KINDS = ("sedan", "hatch", "van")


def car_recipe(rng: np.random.Generator) -> dict:
    kind = str(rng.choice(["sedan", "sedan", "hatch", "van"]))  # half sedans
    return dict(kind=kind, paint=_jitter(rng, _pick(rng, _PAINT), 12), glass=_jitter(rng, (55, 70, 90), 15),
                tyre=_jitter(rng, (28, 28, 30), 6), rim=_jitter(rng, (175, 175, 180), 25))


def _car(cv: _Canvas, r: dict, pose: int) -> None:
    outline, windows, wheels, rad = _CAR_TYPES[r["kind"]]
    cv.ellipse((0.5, 0.0), (0.52, 0.03), (0, 0, 0), 80)
    cv.poly(outline, r["paint"])
    top = max(v for u, v in outline if u > 0.6 and v < 0.4)  # hood line
    cv.poly([(0.0, 0.07), (1.0, 0.07), (1.0, 0.12), (0.0, 0.12)], _shade(r["paint"], 0.55))  # sill/bumper
    for win in windows:
        cv.poly(win, r["glass"])
    door_top = min(v for _, v in windows[0])
    for x in (0.5, 0.73) if r["kind"] != "van" else (0.34, 0.62):
        cv.line((x - 0.01, 0.13), (x, door_top), 0.006, _shade(r["paint"], 0.6))
    cv.poly([(0.97, top - 0.08), (1.0, top - 0.08), (1.0, top - 0.04), (0.96, top - 0.03)], (250, 245, 210))
    cv.poly([(0.0, 0.2), (0.025, 0.2), (0.025, 0.26), (0.0, 0.26)], (200, 20, 20))
    for x in wheels:
        cv.circle((x, rad), rad * 1.12, _shade(r["paint"], 0.3))  # wheel arch
        cv.circle((x, rad), rad, r["tyre"])
        cv.circle((x, rad), rad * 0.58, r["rim"])
        cv.circle((x, rad), rad * 0.2, _shade(r["rim"], 0.6))


def bicycle_recipe(rng: np.random.Generator) -> dict:
    return dict(frame=_jitter(rng, _pick(rng, _FRAME), 15), tyre=_jitter(rng, (30, 30, 32), 6),
                saddle=_jitter(rng, (35, 30, 30), 10), drop_bar=rng.random() < 0.3, tube=rng.uniform(0.022, 0.03))


def _bicycle(cv: _Canvas, r: dict, pose: int) -> None:
    rw, rear, front = 0.205, (0.205, 0.205), (0.795, 0.205)
    bb, seat, head_top, head_bot = (0.43, 0.19), (0.37, 0.47), (0.7, 0.49), (0.72, 0.42)
    spin = pose * math.pi / 3 / POSES["bicycle"]  # 6 spokes: a third of their spacing per pose
    for c in (rear, front):
        for i in range(3):
            a = spin + i * math.pi / 3
            d = (rw * 0.9 * math.cos(a), rw * 0.9 * math.sin(a))
            cv.line((c[0] - d[0], c[1] - d[1]), (c[0] + d[0], c[1] + d[1]), 0.006, (190, 190, 195))
        cv.circle(c, rw - 0.02, r["tyre"], 0.04)
        cv.circle(c, rw - 0.045, (170, 170, 175), 0.012)
    t, f = r["tube"], r["frame"]
    for a, b in ((bb, rear), (seat, rear), (bb, seat), (seat, head_top), (bb, head_bot), (head_top, head_bot),
                 (head_bot, front)):
        cv.line(a, b, t, f)
    cv.line(seat, (seat[0] - 0.015, seat[1] + 0.07), t * 0.8, (60, 60, 60))
    cv.poly([(seat[0] - 0.07, seat[1] + 0.085), (seat[0] + 0.05, seat[1] + 0.08), (seat[0] + 0.04, seat[1] + 0.06),
             (seat[0] - 0.06, seat[1] + 0.065)], r["saddle"])
    stem = (head_top[0] - 0.01, head_top[1] + 0.07)
    cv.line(head_top, stem, t * 0.9, (70, 70, 70))
    bar_end = (stem[0] + 0.06, stem[1] - 0.07) if r["drop_bar"] else (stem[0] - 0.07, stem[1] + 0.01)
    cv.line(stem, bar_end, t * 0.9, (40, 40, 40))
    cv.circle(bb, 0.04, (90, 90, 95), 0.012)
    crank = (bb[0] + 0.06 * math.cos(spin * 3), bb[1] + 0.06 * math.sin(spin * 3))
    cv.line(bb, crank, 0.015, (60, 60, 60))


def _tree(cv: _Canvas, rng: np.random.Generator) -> None:
    cv.line((0, 0), (0, 0.5), rng.uniform(0.04, 0.07), _jitter(rng, (90, 65, 45), 15))
    green = _jitter(rng, (60, 110, 50), 25)
    for _ in range(int(rng.integers(5, 9))):
        c = (rng.uniform(-0.15, 0.15), rng.uniform(0.55, 0.78))
        cv.circle(c, rng.uniform(0.13, 0.22), _shade(green, rng.uniform(0.75, 1.2)))


def _pole(cv: _Canvas, rng: np.random.Generator) -> None:
    grey = _jitter(rng, (70, 72, 75), 20)
    cv.line((0, 0), (0, 0.96), 0.022, grey)
    if rng.random() < 0.6:  # street lamp
        cv.line((0, 0.95), (0.16, 0.96), 0.016, grey)
        cv.ellipse((0.17, 0.945), (0.05, 0.018), (235, 235, 210))
    else:  # traffic sign
        plate = _pick(rng, [(200, 30, 30), (30, 70, 170), (240, 200, 30), (240, 240, 240)])
        if rng.random() < 0.5:
            cv.circle((0, 0.9), 0.08, plate)
        else:
            cv.poly([(-0.08, 0.82), (0.08, 0.82), (0.08, 0.98), (-0.08, 0.98)], plate)


def _bin(cv: _Canvas, rng: np.random.Generator) -> None:
    c = _jitter(rng, _pick(rng, [(40, 90, 50), (90, 90, 95), (40, 60, 120), (140, 110, 60)]), 15)
    cv.poly([(-0.3, 0), (0.3, 0), (0.34, 0.9), (-0.34, 0.9)], c)
    cv.poly([(-0.38, 0.88), (0.38, 0.88), (0.36, 1.0), (-0.36, 1.0)], _shade(c, 0.7))


def _box(cv: _Canvas, rng: np.random.Generator) -> None:
    c = _jitter(rng, (170, 130, 85), 20)
    w = rng.uniform(0.5, 0.8)
    cv.poly([(-w, 0), (w, 0), (w, 1), (-w, 1)], c)
    cv.poly([(-w, 1), (w, 1), (w * 0.8, 1.12), (-w * 1.2, 1.12)], _shade(c, 1.15))
    cv.line((-w * 0.1, 1.0), (-w * 0.1, 0.55), 0.08, (200, 180, 140))


def _bench(cv: _Canvas, rng: np.random.Generator) -> None:
    wood, metal = _jitter(rng, (140, 95, 55), 25), _jitter(rng, (50, 50, 55), 10)
    for x in (-1.1, 1.1):
        cv.line((x, 0), (x, 0.5), 0.08, metal)
        cv.line((x + 0.1, 0.45), (x + 0.15, 1.0), 0.07, metal)
    for v in (0.45, 0.7, 0.88):
        cv.line((-1.35, v), (1.35, v), 0.12, wood)


def _bush(cv: _Canvas, rng: np.random.Generator) -> None:
    green = _jitter(rng, (70, 120, 55), 25)
    for _ in range(int(rng.integers(4, 7))):
        c = (rng.uniform(-0.5, 0.5), rng.uniform(0.3, 0.55))
        cv.ellipse(c, (rng.uniform(0.3, 0.45), rng.uniform(0.28, 0.42)), _shade(green, rng.uniform(0.75, 1.2)))


def _hydrant(cv: _Canvas, rng: np.random.Generator) -> None:
    c = _pick(rng, [(200, 30, 30), (230, 190, 30)])
    cv.poly([(-0.2, 0), (0.2, 0), (0.17, 0.8), (-0.17, 0.8)], c)
    cv.ellipse((0, 0.8), (0.18, 0.15), _shade(c, 0.85))
    cv.line((-0.3, 0.55), (0.3, 0.55), 0.12, _shade(c, 0.8))


# clutter kind: (draw, extent in units of its height, height range in units of a person's height there)
CLUTTER = {
    "tree": (_tree, (-0.45, -0.02, 0.45, 1.02), (2.0, 3.0)), "pole": (_pole, (-0.1, -0.02, 0.25, 1.02), (2.2, 2.9)),
    "bin": (_bin, (-0.4, -0.02, 0.4, 1.02), (0.5, 0.62)), "box": (_box, (-0.9, -0.02, 0.9, 1.15), (0.2, 0.4)),
    "bench": (_bench, (-1.5, -0.02, 1.5, 1.02), (0.45, 0.55)), "bush": (_bush, (-1.0, -0.02, 1.0, 1.0), (0.35, 0.8)),
    "hydrant": (_hydrant, (-0.35, -0.02, 0.35, 1.0), (0.4, 0.5)),
}


def render_clutter(kind: str, rng: np.random.Generator, size_px: float) -> Sprite:
    """Static non-class object (tree, pole, bin, box, bench, bush, hydrant), ``size_px`` tall."""
    draw, box, _ = CLUTTER[kind]
    cv = _Canvas(size_px, box)
    draw(cv, rng)
    return cv.finish()


_CLASSES = {  # name: (recipe, draw, extent in units (left, bottom, right, top))
    "person": (person_recipe, _person, (-0.45, -0.04, 0.45, 1.05)),
    "car": (car_recipe, _car, (-0.04, -0.05, 1.04, 0.58)),
    "bicycle": (bicycle_recipe, _bicycle, (-0.03, -0.03, 1.03, 0.7)),
}


def recipe(cls: str, rng: np.random.Generator) -> dict:
    """Colours and proportions of one object, drawn once at spawn."""
    return _CLASSES[cls][0](rng)


def render(cls: str, r: dict, size_px: float, pose: int, facing_left: bool) -> Sprite:
    """Sprite of one object: ``size_px`` is a person's height, or a car's or bicycle's length."""
    _, draw, box = _CLASSES[cls]
    cv = _Canvas(size_px, box)
    draw(cv, r, pose)
    sprite = cv.finish(0.0 if cls == "person" else 0.5)  # cars and bicycles are drawn from their rear at u=0
    return sprite.flipped() if facing_left else sprite
