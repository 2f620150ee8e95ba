"""Settings of a camera's analytics: zones, lines, the motion gate and snapshots, validated by pydantic.

Coordinates: each zone and line says its ``units``. ``normalized`` (the default) is a fraction of the source
frame, 0..1 from the left/top edge, so a config survives a camera's resolution change and every point can be
checked when the config is loaded. ``pixels`` is source pixels (what supervision's zones work in, and what a
user reads off a screenshot); at load only what needs no frame is checked (finite, >= 0, below MAX_PIXELS),
and the points are checked against the real frame size when the camera's first frame arrives
(``frame_errors``): a zone or line that does not fit is switched off and named in the camera's last_error
and an ``analytics_error`` event, while the camera keeps running. One rule for what cannot count, a zone or
line within one pixel or a line along an edge of the frame (boxes are clipped to it): refused at load where the
frame's size does not matter to it (a normalised line on an edge, pixels within a pixel), else switched off so
on the first frame (a normalised zone or line within one of its pixels, a pixel line on its right edge).

Every message names the field, e.g. ``cameras[0].zones[1].polygon: edges 0-1 and 2-3 cross (the polygon is
self-intersecting)``. Heads are checked against the model by ``analytics_errors`` (the config alone does not
know the model's heads): at start by the controller, and by anything that changes a camera at run time.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_PIXELS = 65_536  # no camera is larger; a bigger value is a typo (or normalised units mixed up)
ANCHORS = ("center", "center_left", "center_right", "top_center", "top_left", "top_right", "bottom_left",
           "bottom_center", "bottom_right")
Anchor = Literal["center", "center_left", "center_right", "top_center", "top_left", "top_right", "bottom_left",
                 "bottom_center", "bottom_right"]
Units = Literal["normalized", "pixels"]
Point = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


def _check_point(i: int, p: Point, units: str | None) -> None:
    x, y = p
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"point {i} {_fmt(p)} is not finite")
    if units == "normalized" and not (0 <= x <= 1 and 0 <= y <= 1):
        raise ValueError(f"point {i} {_fmt(p)} is outside the frame: normalized coordinates are 0..1 "
                         "(for source pixels set units: pixels)")
    if units == "pixels" and not (0 <= x <= MAX_PIXELS and 0 <= y <= MAX_PIXELS):
        raise ValueError(f"point {i} {_fmt(p)} is outside the frame: pixel coordinates are 0..{MAX_PIXELS}")


def _check_units(points: list[Point], units: str | None) -> None:
    """Pixel points all within 0..1 are normalised ones under the wrong units: a zone or line inside one pixel
    that would count nothing, silently."""
    if units == "pixels" and all(0 <= c <= 1 for p in points for c in p):
        raise ValueError("every point is within 0..1 of the frame's top-left pixel: these look like normalized "
                         "coordinates (set units: normalized, or give source pixels)")


def _fmt(p: Point) -> str:
    return f"({p[0]:g}, {p[1]:g})"


def _within_a_pixel(points: list[Point], zone: bool, frame: str = "") -> str | None:
    """Why points (in pixels) that all lie within one pixel make no zone or line, or None: supervision rounds
    anchors and corners to whole pixels, so such a zone holds no object and no object crosses such a line."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    w, h = pts.max(0) - pts.min(0)
    if w >= 1 or h >= 1:
        return None
    span = f"lies within one pixel{frame} ({w:.2g} x {h:.2g} px)"
    return f"the zone {span}: it can hold no object" if zone else f"the line {span}: no object can cross it"


def _along_edge(start: Point, end: Point, size: tuple[float, float] | None, frame: str = "the frame") -> str | None:
    """Why a line along an edge of the frame (both its points on it) counts nothing, or None: boxes are clipped
    to the frame, so no object gets past it (on the left or top edge supervision counted only a box lying on the
    line, a tie it puts on one side). ``size``: the frame's (width, height); None: the far edges are unknown."""
    w, h = size or (None, None)
    for edge, axis, at in (("left", 0, 0), ("top", 1, 0), ("right", 0, w), ("bottom", 1, h)):
        if at is not None and start[axis] == end[axis] == at:
            return f"the line lies along the {edge} edge of {frame} ({'xy'[axis]} = {at:g}): no object gets past it"
    return None


def _check_names(v: list[str] | None) -> list[str] | None:
    if v is not None and not v:
        raise ValueError("must name at least one (or be omitted for all)")
    if v is not None and len(set(v)) != len(v):
        raise ValueError(f"lists a name twice: {v}")
    return v


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _first_edges_meeting(points: list[Point]) -> tuple[int, int] | None:
    """The first pair (i, j), i < j, of non-adjacent edges (edge e runs from point e to the next) that share a
    point (crossing or touching), or None. All pairs at once with numpy: a loop over the pairs took 7.5 s for 64
    zones of 256 points at config load."""
    n = len(points)
    p = np.asarray(points, dtype=np.float64).reshape(n, 2)
    q = np.roll(p, -1, axis=0)
    ex, ey = (q - p).T
    # side[k, e]: point k against edge e's line, _cross(p[e], q[e], p[k]) in the same float operations; edges i and
    # j cross where each one's ends are strictly on either side of the other's line
    side = ex * (p[:, 1, None] - p[:, 1]) - ey * (p[:, 0, None] - p[:, 0])
    ahead = np.roll(side, -1, axis=0)  # [i, e]: point i + 1, the other end of edge i
    left, ahead_left = side > 0, ahead > 0
    zero = (side == 0) | (ahead == 0)
    zero |= zero.T
    pairs = np.triu(np.ones((n, n), bool), 2)  # each pair once, without neighbours (they share a vertex)
    pairs[0, n - 1] = False
    meet = pairs & (left != ahead_left) & (left.T != ahead_left.T) & ~zero
    i, j = np.nonzero(pairs & zero)  # or touch: an end on the other edge's line, within the edge's box
    lo, hi = np.minimum(p, q), np.maximum(p, q)

    def on(e: np.ndarray, k: np.ndarray) -> np.ndarray:
        return (side[k, e] == 0) & (lo[e] <= p[k]).all(1) & (p[k] <= hi[e]).all(1)

    meet[i, j] |= on(j, i) | on(j, (i + 1) % n) | on(i, j) | on(i, (j + 1) % n)
    first = np.flatnonzero(meet)
    return divmod(int(first[0]), n) if len(first) else None


def polygon_problem(points: list[Point]) -> str | None:
    """Why a polygon cannot be a zone (repeated point, zero area, edges crossing), or None. Pure geometry,
    so it holds for normalised and pixel coordinates alike."""
    n = len(points)
    for i in range(n):
        if points[i] == points[(i + 1) % n]:
            return f"points {i} and {(i + 1) % n} are the same {_fmt(points[i])} (the polygon is degenerate)"
    span = max(max(p[0] for p in points) - min(p[0] for p in points),
               max(p[1] for p in points) - min(p[1] for p in points))
    if all(abs(_cross(points[0], points[1], p)) <= 1e-9 * span ** 2 for p in points[2:]):
        return "encloses no area: its points are collinear (the polygon is degenerate)"
    crossing = _first_edges_meeting(points)
    if crossing is not None:
        a, c = crossing
        return f"edges {a}-{(a + 1) % n} and {c}-{(c + 1) % n} cross (the polygon is self-intersecting)"
    # Neighbouring edges may still fold back onto each other (a spike): collinear and overlapping. Collinear within
    # the float error, as above: decimals such as (0.3, 0.9), (0.6, 0.96), (0.4, 0.92) do not cross to exactly 0
    for i in range(n):
        a, b, c = points[i - 1], points[i], points[(i + 1) % n]
        back = (b[0] - a[0]) * (c[0] - b[0]) + (b[1] - a[1]) * (c[1] - b[1]) < 0
        if back and abs(_cross(a, b, c)) <= 1e-9 * span ** 2:
            return f"edges at point {i} {_fmt(b)} fold back onto each other (the polygon is self-intersecting)"
    area = 0.5 * abs(sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1]
                         for i in range(n)))
    if area <= 1e-9 * span ** 2:  # e.g. a bow tie of two equal halves
        return "encloses no area (the polygon is degenerate)"
    return None


class _Counted(_Strict):
    """What zones and lines share: a name, the units of their points, and which objects they count."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    units: Units = "normalized"  # before the points (declared by subclasses): their validators read it
    heads: list[str] | None = Field(None, description="heads whose objects count here; None: all the camera's heads")
    classes: list[str] | None = Field(None, description="classes that count here; None: every class of those heads")

    @field_validator("heads", "classes")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        return _check_names(v)


class ZoneConfig(_Counted):
    """A polygon: occupancy per class, dwell per tracked object, zone_entered / zone_left events."""

    polygon: list[Point] = Field(min_length=3, max_length=256)
    anchors: list[Anchor] = Field(["bottom_center"], min_length=1,
                                  description="points of an object's box that must all be inside (supervision's "
                                              "triggering anchors); bottom_center: where it stands")
    # 0.1 (one frame at 10 fps): on the tuning seeds 100-109 occupancy within one object 97.4 -> 98.2% of
    # frames (mean; the worst seed 94.3 -> 96.3%) against 0.2, dwell within 0.5 s alike (docs: "Accuracy")
    min_inside_s: float = Field(0.1, ge=0, le=60, description="inside this long before zone_entered")
    min_outside_s: float = Field(0.5, ge=0, le=600, description="seen outside this long before zone_left (or "
                                                                "not seen this long, when it was moving)")
    exit_margin: float = Field(0.1, ge=0, le=5, description="how far (x the object's box height) outside the "
                                                            "edge an anchor must be to count as outside")
    lost_s: float = Field(3.0, gt=0, le=600, description="an occupant that stood still, not seen for this long, "
                                                         "has left; until then a new track at its place takes it over")

    @field_validator("polygon", mode="before")
    @classmethod
    def _points(cls, v: Any) -> Any:
        """A flat list of numbers or {x:, y:} points: one error naming the form, not "Input should be a valid tuple"
        once per number."""
        if isinstance(v, list) and v and all(isinstance(p, (int, float, dict)) for p in v):
            raise ValueError("expected a list of [x, y] points, e.g. [[0.1, 0.5], [0.9, 0.5], [0.9, 1.0]]")
        return v

    @field_validator("polygon")
    @classmethod
    def _polygon(cls, v: list[Point], info: ValidationInfo) -> list[Point]:
        units = info.data.get("units")  # None: units is invalid (its own error says so), the range is unknown
        for i, p in enumerate(v):
            _check_point(i, p, units)
        _check_units(v, units)
        problem = polygon_problem(v)
        if problem:
            raise ValueError(problem)
        small = _within_a_pixel(v, True) if units == "pixels" else None  # normalised: frame_errors
        if small:
            raise ValueError(small)
        return v


class LineConfig(_Counted):
    """A counting line: in/out counts per class, a line_crossed event per crossing.

    Direction (supervision's LineZone): ``in`` is a crossing onto the left-hand side of the line as seen walking
    from ``start`` to ``end`` on the image (y grows downwards). A line drawn from top to bottom counts objects
    moving left to right as ``in``; swap start and end to swap in and out.
    """

    start: Point
    end: Point
    anchors: list[Anchor] = Field(["top_left", "top_right", "bottom_left", "bottom_right"], min_length=1,
                                  description="points of the box that must all have crossed (default: the whole box)")
    min_crossing_frames: int = Field(1, ge=1, le=100, description="frames on the new side before it counts "
                                                                  "(supervision's minimum_crossing_threshold)")

    @field_validator("start")
    @classmethod
    def _start(cls, v: Point, info: ValidationInfo) -> Point:
        _check_point(0, v, info.data.get("units"))
        return v

    @field_validator("end")
    @classmethod
    def _end(cls, v: Point, info: ValidationInfo) -> Point:
        _check_point(1, v, info.data.get("units"))
        start = info.data.get("start")
        if start is not None and math.dist(start, v) == 0:
            raise ValueError(f"the line has length 0: start and end are both {_fmt(v)}")
        if start is not None:
            units = info.data.get("units")
            _check_units([start, v], units)
            # What needs no frame size: the top and left edges (normalised: every edge), pixels within a pixel
            problem = _along_edge(start, v, (1, 1) if units == "normalized" else None) or (
                _within_a_pixel([start, v], False) if units == "pixels" else None)
            if problem:
                raise ValueError(problem)
        return v


class MotionConfig(_Strict):
    """Skip inference on frames without motion: a cheap frame difference on the downscaled model input
    against the last frame that went to inference."""

    enabled: bool = False
    threshold: int = Field(18, ge=1, le=255, description="grey-level change that counts a pixel as changed")
    min_changed: float = Field(0.0004, gt=0, le=1, description="fraction of changed pixels that means motion")
    max_skip_s: float = Field(10.0, gt=0, description="infer at least this often, motion or not (.inf: on motion only)")
    scale: int = Field(2, ge=1, le=8, description="downscale factor of the model input before comparing")


class SnapshotConfig(_Strict):
    """An annotated JPEG of the latest frame in {prefix}:cam:{camera}:snapshot, for dashboards."""

    enabled: bool = True
    fps: float = Field(1.0, gt=0, le=10, description="snapshots per second of stream time")
    max_width: int = Field(960, ge=64, le=8192, description="pictures are scaled down to this width first")
    quality: int = Field(80, ge=10, le=100, description="JPEG quality")
    max_bytes: int = Field(262_144, ge=4096, le=8 * 2**20, description="larger JPEGs are re-encoded smaller")


def camera_analytics_problems(zones: list[ZoneConfig], lines: list[LineConfig], heads: list[str] | None,
                              tracking: bool = True) -> list[str]:
    """Problems visible from the camera's config alone: duplicate names, heads the camera does not run,
    zones or lines without tracking (they count tracked objects)."""
    out = []
    if not tracking and (zones or lines):
        out.append(f"{'zones' if zones else 'lines'}: zones and lines count tracked objects; "
                   "they need tracker.enabled: true")
    for kind, items in (("zones", zones), ("lines", lines)):
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.name in seen:
                out.append(f"{kind}[{i}].name: duplicate {kind[:-1]} name {item.name!r} (also {kind}[{seen[item.name]}])")
            seen.setdefault(item.name, i)
            if heads is not None:
                for h in item.heads or []:
                    if h not in heads:
                        out.append(f"{kind}[{i}].heads: head {h!r} is not one the camera runs ({heads})")
    return out


def analytics_errors(zones: list[ZoneConfig], lines: list[LineConfig], camera_heads: list[str] | None,
                     model_heads: dict[str, list[str]]) -> list[str]:
    """Zones and lines against the model: unknown heads, classes no selected head has. Messages name the field
    relative to the camera (``zones[1].heads: ...``); an empty list means all is well."""
    out = []
    run = camera_heads or list(model_heads)
    for kind, items in (("zones", zones), ("lines", lines)):
        for i, item in enumerate(items):
            unknown = [h for h in item.heads or [] if h not in model_heads]
            if unknown:
                out.append(f"{kind}[{i}].heads: unknown head(s) {unknown} (the model has {list(model_heads)})")
                continue
            not_run = [h for h in item.heads or [] if h not in run]
            if not_run:
                out.append(f"{kind}[{i}].heads: head(s) {not_run} not run by this camera (it runs {run})")
                continue
            known = {c for h in (item.heads or run) for c in model_heads[h]}
            bad = [c for c in item.classes or [] if c not in known]
            if bad:
                out.append(f"{kind}[{i}].classes: {bad} not a class of head(s) {item.heads or run} "
                           f"(they have {sorted(known)})")
    return out


def frame_errors(zones: list[ZoneConfig], lines: list[LineConfig], size: tuple[int, int]) -> dict[str, str]:
    """Zones and lines that cannot count in the real frame, ``size`` (width, height): pixel coordinates outside
    it, a line along its right or bottom edge, a zone or line (either units) within one of its pixels.
    {"zones[0]": "zones[0].polygon: ..."}."""
    w, h = size
    out = {}

    def outside(points: list[Point]) -> tuple[int, Point] | None:
        return next(((i, p) for i, p in enumerate(points) if p[0] > w or p[1] > h), None)

    for kind, items in (("zones", zones), ("lines", lines)):
        for i, item in enumerate(items):
            zone = isinstance(item, ZoneConfig)
            points = item.polygon if zone else [item.start, item.end]
            scale = (w, h) if item.units == "normalized" else (1, 1)
            pixels = [(x * scale[0], y * scale[1]) for x, y in points]
            bad = outside(points) if item.units == "pixels" else None
            field = "polygon" if zone else ("start", "end")[bad[0]] if bad else "end"
            frame = f"the {w}x{h} frame"
            if bad:
                why = f"point {_fmt(bad[1])} is outside {frame}"
            elif zone:
                why = _within_a_pixel(pixels, True, f" of {frame}")
            else:
                why = _along_edge(*pixels, size, frame) or _within_a_pixel(pixels, False, f" of {frame}")
            if why:
                out[f"{kind}[{i}]"] = f"{kind}[{i}].{field}: {why}; {kind[:-1]} {item.name!r} is off"
    return out
