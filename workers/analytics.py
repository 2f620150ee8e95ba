"""Zones and lines of one camera: occupancy per class, dwell per tracked object, line in/out counts per class,
and the events that go with them. Plain classes: the StreamActor, the offline accuracy harness and the unit
tests drive them the same way, one ``update`` per head per analysed frame, with tracked ``sv.Detections``.

supervision does the geometry: ``sv.PolygonZone`` says which anchors are inside a zone, ``sv.LineZone`` counts
crossings. What it does not do is written here, because a stationary object must not make a zone chatter
(Frigate users' top complaint): enter/leave hysteresis in time and space, dwell, and the takeover of an
occupant by a new track at the same place. The rule (docs/architecture.md, "Analytics"):

- enter: a confirmed track's anchors are inside the polygon for ``min_inside_s`` (the entry time is the first
  frame inside, so dwell does not lose that wait);
- stay: an occupant counts as inside while its anchors are within ``exit_margin`` x its box height of the
  polygon (box jitter at the edge is not an exit), and while it is not seen at all for less than ``lost_s``;
- leave: seen outside that margin (at once if it is moving, else for ``min_outside_s``: a still object's box
  can jump), or not seen for ``lost_s`` (a detector can miss a parked car for a while; but no longer than
  LOST_PER_SEEN x how long it was seen) - or for only MOVING_LOST_S (or min_outside_s, if longer) if it was
  moving when last seen (it drove on, out of the zone or out of the picture); never on a single missed frame
  (LOST_MIN_MISSES). dwell = last frame inside - first frame inside, in stream time (pts);
- takeover: a new track (first seen after the occupant was last seen) of the same class appearing inside where
  an absent occupant would be now (its last box moved on by its last velocity, IoU >= 0.3) continues that
  occupant (a flickering detection that got a new track id is the same parked car): no events. Should a track
  it took over from be seen again, that track carries the occupant again and the heir counts on its own. The
  track ids an occupant lists (zone_left's track_ids) are at most TRACK_IDS_KEPT, the entry's first, plus any
  that the tracker may still give back.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import cv2
import numpy as np
import supervision as sv

from workers.analytics_settings import LineConfig, Point, ZoneConfig, frame_errors
from workers.settings import TrackerConfig

REACQUIRE_IOU = 0.3  # a new track this close to an absent occupant's predicted box is that occupant
MOVING = 0.25  # box heights per second: an occupant faster than this is moving (a parked car jitters far less)
MOVING_LOST_S = 0.5  # an occupant that was moving and is not seen for this long drove on
LOST_PER_SEEN = 4.0  # a still occupant's patience when unseen: at most this x how long it was seen
LOST_MIN_MISSES = 2  # analysed frames in a row an occupant must be missed on before it is lost: at a low analysed
# rate (the frame-age budget goes down to 1 fps) a single missed detection is already longer than MOVING_LOST_S
TRAIL_S = (0.5, 1.0)  # speed is measured over at least / at most this much of the recent path: box jitter
# between two frames is as large as a walker's step at 10 fps, over half a second it is not
_EPS = 1e-6  # pts are floats: a wait of exactly min_inside_s counts
LINE_MEMORY_FRAMES = 30  # analysed frames a line remembers a missing track's side (the tracker's default buffer)
LINE_MEMORY_S = 2.5  # and at least this long: the tracker gives a lost track its id back for up to 2 s (re-ID's
# max_lost_s), 50 analysed frames at 25 fps
MEMORY_PER_HORIZON = 1.25  # and this x the tracker's horizon (track_horizon_s), as 2.5 s is for its default 2 s:
# the frames that confirm the track it comes back as come on top
TRACK_IDS_KEPT = 64  # an occupant's track ids (zone_left's track_ids) beyond this many: those that can no longer
# come back go, oldest first


def track_horizon_s(tracker: TrackerConfig) -> float:
    """How long after a track was last seen the tracker may still give it its id back: ByteTrack's lost-track
    buffer (frames at 30 fps) or re-ID's wait for a re-link (max_lost_s, up to 60 s), whichever is longer."""
    relink = tracker.appearance.max_lost_s if tracker.appearance.enabled and tracker.appearance.relink else 0.0
    return max(tracker.lost_track_buffer / 30, relink)


def track_memory_s(horizon_s: float) -> float:
    """How long zones and lines remember a track that is not seen, for a tracker of that horizon."""
    return max(LINE_MEMORY_S, MEMORY_PER_HORIZON * horizon_s)


def _positions(anchors: list[str]) -> list[sv.Position]:
    return [sv.Position[a.upper()] for a in anchors]


def to_pixels(points: list[Point], units: str, size: tuple[int, int]) -> np.ndarray:
    """(N, 2) float source pixels for config points; ``size`` is the frame's (width, height)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.asarray(size, dtype=np.float64) if units == "normalized" else pts


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _names(det: sv.Detections) -> np.ndarray:
    return det.data.get("class_name", np.array([""] * len(det)))


@dataclass
class Occupant:
    head: str
    track_id: int  # the id it entered with; events keep naming it
    class_name: str
    entered_pts: float  # first frame inside
    last_seen: float
    last_inside: float
    box: np.ndarray
    current_id: int  # the track that carries it now (differs after a takeover)
    outside_since: float | None = None
    track_ids: list[int] = field(default_factory=list)
    carried: dict[int, float] = field(default_factory=dict)  # track id -> pts it last carried it (track_ids' only)
    trail: deque = field(default_factory=deque)  # (pts, box centre) over the last TRAIL_S[1] seconds
    missed: int = 0  # analysed frames in a row it was not seen on

    def seen(self, box: np.ndarray, pts: float) -> None:
        self.last_seen, self.box, self.missed = pts, box, 0
        self.carried[self.current_id] = pts
        _extend(self.trail, box, pts)

    def velocity(self) -> np.ndarray:
        """Box centre, px/s, over the recent path; zero until it spans TRAIL_S[0]."""
        (t0, c0), (t1, c1) = self.trail[0], self.trail[-1]
        return (c1 - c0) / (t1 - t0) if t1 - t0 >= TRAIL_S[0] - _EPS else np.zeros(2)

    def moving(self) -> bool:
        return float(np.hypot(*self.velocity())) > MOVING * float(self.box[3] - self.box[1])

    def predicted_box(self, pts: float) -> np.ndarray:
        shift = self.velocity() * (pts - self.last_seen)
        return self.box + np.concatenate([shift, shift])


def _extend(trail: deque, box: np.ndarray, pts: float) -> None:
    trail.append((pts, (box[:2] + box[2:]) / 2))
    while len(trail) > 2 and pts - trail[1][0] >= TRAIL_S[1]:
        trail.popleft()


class _Shift:
    """Source pixels -> the pixels of a zone's own mask, which starts at ``origin`` (a CoordinatesTransformation
    for sv.PolygonZone.trigger). Points are rounded to their pixel before the shift, as trigger does without one:
    an exact integer shift then finds every anchor on the very pixel of the polygon it found without it."""

    def __init__(self, origin: np.ndarray):
        self.origin = origin

    def rel_to_abs(self, points: np.ndarray) -> np.ndarray:
        return np.rint(points) - self.origin

    def abs_to_rel(self, points: np.ndarray) -> np.ndarray:
        return points + self.origin


@dataclass
class Candidate:
    first_pts: float
    last_seen: float
    trail: deque = field(default_factory=deque)


class ZoneCounter:
    """One zone: ``update`` per head and frame returns zone_entered / zone_left events (as dicts)."""

    def __init__(self, config: ZoneConfig, size: tuple[int, int], classes: dict[str, list[str]]):
        """``classes``: per head this zone watches, the class names that count in it."""
        self.config, self.name, self.classes = config, config.name, classes
        self.polygon = to_pixels(config.polygon, config.units, size)
        corners = np.round(self.polygon).astype(np.int64)
        # supervision's mask spans the frame from 0,0 to the polygon's far corner (8 MB at 4K for a small zone in a
        # corner): the zone is made on the polygon moved to near 0,0 and told that shift when it triggers
        self._shift = _Shift(corners.min(0))
        self.zone = sv.PolygonZone(corners - self._shift.origin, triggering_anchors=_positions(config.anchors))
        self._contour = self.polygon.astype(np.float32).reshape(-1, 1, 2)
        self.occupants: dict[int, Occupant] = {}  # by a serial number: track ids change on takeover
        self._serial = 0
        self.candidates: dict[tuple[str, int], Candidate] = {}
        # (head, track id) -> [first, last] pts this zone saw it (inside or not): only a track that appeared after
        # an occupant vanished can take it over, not one that was walking beside it (a passer-by hiding it)
        self.tracks: dict[tuple[str, int], list[float]] = {}
        self._last_pts: dict[str, float] = {}
        self.track_memory_s = LINE_MEMORY_S  # a track seen this recently may still come back (track_memory_s)
        self._unseen = set(classes)  # heads no frame was analysed for under these settings yet (undecided)

    def occupancy(self) -> Counter:
        """(head, class) -> objects inside now."""
        return Counter((o.head, o.class_name) for o in self.occupants.values())

    def _within_margin(self, det: sv.Detections, i: int) -> bool:
        """All anchors no farther outside the polygon than exit_margin x the box height."""
        margin = self.config.exit_margin * float(det.xyxy[i, 3] - det.xyxy[i, 1])
        for pos in self.zone.triggering_anchors:
            x, y = det[i:i + 1].get_anchors_coordinates(pos)[0]
            if cv2.pointPolygonTest(self._contour, (float(x), float(y)), True) < -margin:
                return False
        return True

    def update(self, head: str, det: sv.Detections, frame: int, pts: float) -> list[dict]:
        if head not in self.classes:
            return []
        self._unseen.discard(head)
        cfg, events = self.config, []
        ids = det.tracker_id if det.tracker_id is not None else np.full(len(det), -1)
        keep = (ids >= 0) & np.isin(_names(det), self.classes[head])
        det = det[keep]
        inside = self.zone.trigger(det, coord_transform=self._shift) if len(det) else np.zeros(0, bool)
        names, ids = _names(det), det.tracker_id if len(det) else np.zeros(0, int)
        for tid in ids:
            self.tracks.setdefault((head, int(tid)), [pts, pts])[1] = pts
        present = {int(t) for t in ids}
        for occ in self.occupants.values():
            # A track it was handed on from is back: it had not gone, so the heir is another object (it entered
            # a second time under the old id, and the heir's exit was reported as its own)
            back = [t for t in occ.track_ids[:-1] if t in present] if occ.head == head else []
            if back:
                occ.current_id, heirs = back[-1], occ.track_ids.index(back[-1]) + 1
                for t in occ.track_ids[heirs:]:
                    del occ.carried[t]
                del occ.track_ids[heirs:]
                occ.trail.clear()  # the heir's path; it is seen again below, on this frame
        by_current = {(o.head, o.current_id): key for key, o in self.occupants.items()}
        seen: set[int] = set()
        newcomers = []
        for i in range(len(det)):
            key = by_current.get((head, int(ids[i])))
            if key is None:
                newcomers.append(i)
                continue
            occ = self.occupants[key]
            seen.add(key)
            occ.seen(det.xyxy[i].copy(), pts)
            if inside[i] or self._within_margin(det, i):
                occ.last_inside, occ.outside_since = pts, None
            else:
                occ.outside_since = pts if occ.outside_since is None else occ.outside_since
                # A moving object beyond the margin is leaving; a still one must stay out a while (its box
                # may just have jumped).
                if occ.moving() or pts - occ.outside_since >= cfg.min_outside_s - _EPS:
                    events.append(self._leave(key, frame, pts, "exited"))
        for i in newcomers:
            tid, name, box = int(ids[i]), str(names[i]), det.xyxy[i].copy()
            ckey = (head, tid)
            if not inside[i]:
                self.candidates.pop(ckey, None)
                continue
            heir_of = self._absent_occupant(head, name, box, pts, seen, self.tracks[ckey][0])
            if heir_of is not None:  # the same object under a new track id: no events
                occ = self.occupants[heir_of]
                occ.current_id, occ.last_inside, occ.outside_since = tid, pts, None
                occ.seen(box, pts)
                occ.track_ids.append(tid)
                self._forget_ids(occ, pts)
                seen.add(heir_of)
                self.candidates.pop(ckey, None)
                continue
            cand = self.candidates.setdefault(ckey, Candidate(pts, pts))
            cand.last_seen = pts
            _extend(cand.trail, box, pts)
            if pts - cand.first_pts >= cfg.min_inside_s - _EPS:
                del self.candidates[ckey]
                self._serial += 1
                self.occupants[self._serial] = Occupant(head, tid, name, cand.first_pts, pts, pts, box, tid,
                                                        track_ids=[tid], carried={tid: pts}, trail=cand.trail)
                seen.add(self._serial)
                events.append(self._event("zone_entered", self.occupants[self._serial], frame, pts))
        for key, occ in list(self.occupants.items()):
            if occ.head != head or key in seen:
                continue
            occ.missed += 1
            if occ.missed >= LOST_MIN_MISSES and pts - occ.last_seen >= self._patience(occ) - _EPS:
                events.append(self._leave(key, frame, pts, "lost"))
        for key, cand in list(self.candidates.items()):
            if key[0] == head and pts - cand.last_seen >= cfg.lost_s - _EPS:
                del self.candidates[key]
        # A track the tracker may still give back is remembered as long: forgotten, it would come back as a new
        # track and could take over the occupant it was hidden behind
        forget_s = max(cfg.lost_s, self.track_memory_s)
        for key, (_, last) in list(self.tracks.items()):
            if key[0] == head and pts - last >= forget_s - _EPS:
                del self.tracks[key]
        self._last_pts[head] = pts
        return events

    def _forget_ids(self, occ: Occupant, pts: float) -> None:
        """Past TRACK_IDS_KEPT, the oldest ids the tracker can no longer give back go (the entry's id stays): a
        parked car that flickers hands its occupant on to a new track every few seconds, for hours."""
        extra = len(occ.track_ids) - TRACK_IDS_KEPT
        if extra <= 0:
            return
        gone = [t for t in occ.track_ids[1:-1] if pts - occ.carried[t] >= self.track_memory_s][:extra]
        for t in gone:
            del occ.carried[t]
        occ.track_ids[:] = [t for t in occ.track_ids if t in occ.carried]

    def _patience(self, occ: Occupant) -> float:
        """How long an occupant may go unseen before it has left."""
        short = min(self.config.lost_s, max(self.config.min_outside_s, MOVING_LOST_S))
        if occ.moving():
            return short
        # A still occupant gets up to lost_s, but no more than LOST_PER_SEEN x the time it was seen: a box seen
        # for a few frames (a duplicate of a passing object) is not a parked car the detector lost.
        return min(self.config.lost_s, max(short, LOST_PER_SEEN * (occ.last_seen - occ.entered_pts)))

    def hold(self, pts: float) -> None:
        """A frame the motion gate skipped: nothing moved, so whatever was seen on the last analysed frame is
        still there (its clocks move on; it is not 'not seen')."""
        for occ in self.occupants.values():
            last = self._last_pts.get(occ.head)
            if occ.last_seen == last:
                if occ.last_inside == last:
                    occ.last_inside = pts
                occ.last_seen = pts
        for (head, _), cand in self.candidates.items():
            if cand.last_seen == self._last_pts.get(head):
                cand.last_seen = pts
        for (head, _), seen_at in self.tracks.items():
            if seen_at[1] == self._last_pts.get(head):
                seen_at[1] = pts
        for head in self._last_pts:
            self._last_pts[head] = pts

    def undecided(self) -> bool:
        """No frame analysed under these settings yet (a zone added or changed live), an occupant missed on the last
        analysed frame or seen outside, waiting out min_outside_s, or an object seen inside on it that has not entered
        yet: only analysed frames tell whether it left or entered (``hold`` keeps each as it is; a still car just past
        the edge left max_skip_s late, and so did one that a live change left outside the zone)."""
        waiting = any(occ.missed or occ.outside_since is not None for occ in self.occupants.values())
        return bool(self._unseen) or waiting or any(
            cand.last_seen == self._last_pts.get(head) for (head, _), cand in self.candidates.items())

    def inherit(self, old: "ZoneCounter") -> None:
        """Takes over the objects of the zone's previous settings (a live change): who is inside stays inside,
        without a second zone_entered, and the new settings decide from the next frame whether it left. Objects
        of heads or classes it no longer counts go without events, as with a head dropped (``with_heads``)."""
        self.occupants = {k: o for k, o in old.occupants.items() if o.class_name in self.classes.get(o.head, ())}
        self.candidates = {k: c for k, c in old.candidates.items() if k[0] in self.classes}
        self.tracks = {k: t for k, t in old.tracks.items() if k[0] in self.classes}
        self._serial, self._last_pts = old._serial, dict(old._last_pts)

    def _absent_occupant(self, head: str, name: str, box: np.ndarray, pts: float, seen: set[int],
                         first_seen: float) -> int | None:
        """The absent occupant a new track (first seen at ``first_seen``) at ``box`` continues, if any."""
        best, best_iou = None, REACQUIRE_IOU
        for key, occ in self.occupants.items():
            if occ.head == head and occ.class_name == name and key not in seen and first_seen > occ.last_seen:
                iou = _iou(occ.predicted_box(pts), box)
                if iou >= best_iou:
                    best, best_iou = key, iou
        return best

    def _leave(self, key: int, frame: int, pts: float, reason: str) -> dict:
        occ = self.occupants.pop(key)
        ev = self._event("zone_left", occ, frame, pts)
        ev.update(left_pts=round(occ.last_inside, 3), dwell_s=round(max(0.0, occ.last_inside - occ.entered_pts), 3),
                  reason=reason)
        if len(occ.track_ids) > 1:
            ev["track_ids"] = list(occ.track_ids)
        return ev

    def _event(self, type_: str, occ: Occupant, frame: int, pts: float) -> dict:
        return {"type": type_, "head": occ.head, "track_id": occ.track_id, "class": occ.class_name,
                "zone": self.name, "frame": frame, "pts": round(pts, 3), "entered_pts": round(occ.entered_pts, 3),
                "occupancy": self.occupancy()[(occ.head, occ.class_name)]}


class _Totals(sv.LineZone):
    """A LineZone that only draws (supervision's LineZoneAnnotator): its counts are the sum over heads."""

    def __init__(self, line: "LineCounter", start: np.ndarray, end: np.ndarray):
        super().__init__(sv.Point(*start), sv.Point(*end))
        self._line = line

    @property
    def in_count(self) -> int:
        return sum(z.in_count for z in self._line.zones.values())

    @property
    def out_count(self) -> int:
        return sum(z.out_count for z in self._line.zones.values())


class PatientLineZone(sv.LineZone):
    """sv.LineZone that remembers the side a track was on while the track goes undetected for up to
    ``memory_frames`` analysed frames and ``memory_s`` of stream time (both; ``memory_s`` follows the tracker's
    horizon, CameraAnalytics.set_horizon); sv.LineZone alone forgets it
    after minimum_crossing_threshold + 1 frames. The tracker keeps a track through such gaps, and an object
    whose detections drop out right at the line (a pole or a tree there) comes back on the other side:
    forgotten, its first side is then the far one and the crossing is never counted (7 of 20 on one held-out
    street). Track ids are never reused, so a long memory cannot mix two objects. Only the eviction's horizon
    changes; supervision still decides every crossing. ``pts``: the stream time of the frame being triggered."""

    def __init__(self, *args, memory_frames: int = LINE_MEMORY_FRAMES, memory_s: float = LINE_MEMORY_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_frames, self.memory_s = memory_frames, memory_s
        self.pts = 0.0
        self._seen: dict[int, float] = {}  # track -> pts it was last seen at
        self._sides: tuple | None = None  # the last trigger's (tracker ids, in limits, left, right), for undecided()

    def _evict_stale_crossing_history(self, current_keys: set[int]) -> None:
        # supervision's own eviction (0.31's: its private state, which tests/test_analytics_edges2.py runs against
        # the installed version), with the horizon in frames and in time: frames alone were 1.2 s at 25 fps, and a
        # track hidden at the line for 1.5 s came back under its id uncounted
        self._sides = None  # every trigger starts here; _compute_anchor_sides follows where there are tracks
        self._seen = {k: t for k, t in self._seen.items() if k in self.crossing_state_history}
        self._seen.update(dict.fromkeys(current_keys, self.pts))
        frames = max(self.crossing_history_length, self.memory_frames)
        for key in list(self.crossing_state_history):
            if key in current_keys:
                self._tracker_frames_absent.pop(key, None)
                continue
            absent = self._tracker_frames_absent[key] = self._tracker_frames_absent.get(key, 0) + 1
            if absent >= frames and self.pts - self._seen[key] >= self.memory_s - _EPS:
                del self.crossing_state_history[key]
                self._confirmed_crossing_side.pop(key, None)
                self._tracker_frames_absent.pop(key, None)

    def _compute_anchor_sides(self, detections: sv.Detections, coord_transform=None) -> tuple:
        # supervision's side test of this trigger, kept: LineZone says which tracks crossed, not which are half-way
        sides = super()._compute_anchor_sides(detections, coord_transform)
        self._sides = (detections.tracker_id, *sides)
        return sides

    def undecided(self) -> bool:
        """A track that the last trigger saw on the other side than its confirmed one, for fewer frames than
        min_crossing_frames yet: only analysed frames count it (a car that stopped just past the line was counted
        max_skip_s late for each frame it still needed, the motion gate skipping the still scene)."""
        if self._sides is None:
            return False
        ids, in_limits, left, right = self._sides
        return any(t >= 0 and ok and not (lt and rt) and bool(lt) != self._confirmed_crossing_side.get(t, bool(lt))
                   for t, ok, lt, rt in zip(ids.tolist(), in_limits.tolist(), left.tolist(), right.tolist()))


class LineCounter:
    """One line: a supervision LineZone per head (track ids are per head), line_crossed events."""

    def __init__(self, config: LineConfig, size: tuple[int, int], classes: dict[str, list[str]],
                 head_classes: dict[str, list[str]]):
        """``classes``: per head, the class names counted; ``head_classes``: per head, all its class names
        in class-id order (LineZone counts by class id)."""
        self.config, self.name, self.classes, self.head_classes = config, config.name, classes, head_classes
        self.start, self.end = to_pixels([config.start, config.end], config.units, size)
        self.since: float | None = None  # unix seconds its counts started, when after the camera's (a live change)
        self.zones = {h: PatientLineZone(sv.Point(*self.start), sv.Point(*self.end),
                                         triggering_anchors=_positions(config.anchors),
                                         minimum_crossing_threshold=config.min_crossing_frames) for h in classes}

    def update(self, head: str, det: sv.Detections, frame: int, pts: float) -> list[dict]:
        zone = self.zones.get(head)
        if zone is None:
            return []
        det = det[np.isin(_names(det), self.classes[head])] if len(det) else det
        # "so far, this one included": the zone counts the whole frame at once, so each event counts on from before
        so_far = {"in": zone.in_count_per_class, "out": zone.out_count_per_class}  # copies: class id -> n
        zone.pts = pts
        crossed_in, crossed_out = zone.trigger(det)
        events = []
        names = _names(det)
        for i in np.flatnonzero(crossed_in | crossed_out):
            direction = "in" if crossed_in[i] else "out"
            name = str(names[i])
            cid = self.head_classes[head].index(name)  # as counts() does: the event's count is the hash's
            so_far[direction][cid] = so_far[direction].get(cid, 0) + 1
            events.append({"type": "line_crossed", "head": head, "track_id": int(det.tracker_id[i]), "class": name,
                           "line": self.name, "direction": direction, "frame": frame, "pts": round(pts, 3),
                           "count": so_far[direction][cid]})
        return events

    def counts(self) -> dict[tuple[str, str], dict[str, int]]:
        """(head, class) -> {"in": n, "out": n}, zeros included for every counted class."""
        out = {}
        for head, zone in self.zones.items():
            ins, outs, names = zone.in_count_per_class, zone.out_count_per_class, self.head_classes[head]
            for name in self.classes[head]:
                cid = names.index(name)
                out[(head, name)] = {"in": ins.get(cid, 0), "out": outs.get(cid, 0)}
        return out

    def drawable(self, scale: float = 1.0) -> sv.LineZone:
        """A LineZone for supervision's LineZoneAnnotator on a picture ``scale`` times the source size, showing
        the counts summed over heads."""
        return _Totals(self, self.start * scale, self.end * scale)


class CameraAnalytics:
    """Every zone and line of one camera, built for its real frame size (known once the first frame arrives)."""

    def __init__(self, zones: list[ZoneConfig], lines: list[LineConfig], head_classes: dict[str, list[str]],
                 size: tuple[int, int], horizon_s: float = 0.0):
        """``head_classes``: the camera's heads -> their class names (model order); ``size``: (width, height);
        ``horizon_s``: the tracker's (track_horizon_s), zones and lines remember a missing track for longer.
        Zones and lines whose pixel points fall outside the frame are left out and listed in ``errors``."""
        self.size, self.head_classes, self.horizon_s = size, head_classes, 0.0  # track_memory_s(0): the defaults
        self.errors = frame_errors(zones, lines, size)
        self.zones: dict[str, ZoneCounter] = {}
        self.lines: dict[str, LineCounter] = {}
        self.removed: list[ZoneCounter] = []  # zones a live change removed: their occupants leave on the next update
        for kind, items in (("zones", zones), ("lines", lines)):
            for i, item in enumerate(items):
                if f"{kind}[{i}]" in self.errors:
                    continue
                heads = [h for h in (item.heads or head_classes) if h in head_classes]
                classes = {h: [c for c in head_classes[h] if item.classes is None or c in item.classes] for h in heads}
                if isinstance(item, ZoneConfig):
                    self.zones[item.name] = ZoneCounter(item, size, classes)
                else:
                    self.lines[item.name] = LineCounter(item, size, classes, head_classes)
        self.set_horizon(horizon_s)

    def set_horizon(self, horizon_s: float) -> None:
        """The tracker's horizon (track_horizon_s; its settings may change live): zones and lines remember a
        missing track for as long as the tracker may give it back."""
        if horizon_s == self.horizon_s:
            return
        self.horizon_s = horizon_s
        for zone in self.zones.values():
            zone.track_memory_s = track_memory_s(horizon_s)
        for line in self.lines.values():
            for lz in line.zones.values():
                lz.memory_s = track_memory_s(horizon_s)

    def __bool__(self) -> bool:
        """Zones or lines configured, those switched off included: the camera's counts hash is still written
        (without them), or the counts from before they went off would stay there as current."""
        return bool(self.zones or self.lines or self.errors)

    def update(self, head: str, det: sv.Detections, frame: int, pts: float) -> list[dict]:
        """Tracked detections of one head on one analysed frame (source pixels) -> events, in a stable order."""
        events = self._end_removed(frame, pts)
        for zone in self.zones.values():
            events += zone.update(head, det, frame, pts)
        for line in self.lines.values():
            events += line.update(head, det, frame, pts)
        return events

    def _end_removed(self, frame: int, pts: float) -> list[dict]:
        """zone_left (reason ``removed``) for the occupants of the zones a live change removed or switched off, on
        the first analysed frame under the new settings: a consumer that keeps occupancy from the events had them
        inside for ever. Those of a head the camera dropped since go without, as on a head's drop (with_heads)."""
        events = [zone._leave(key, frame, pts, "removed") for zone in self.removed for key, occ in
                  list(zone.occupants.items()) if occ.head in self.head_classes]
        self.removed = []
        return events

    def ended(self, frame: int, pts: float) -> list[dict]:
        """zone_left (reason ``removed``) for every occupant: the camera's last zones and lines went in a live change,
        and CameraPipeline drops its analytics on that frame (no update follows to say it)."""
        return self.reconfigured([], [])._end_removed(frame, pts)

    def hold(self, pts: float) -> None:
        """A frame skipped by the motion gate (nothing moved): see ZoneCounter.hold. Lines need nothing: no
        movement, no crossing."""
        for zone in self.zones.values():
            zone.hold(pts)

    def undecided(self) -> bool:
        """Some zone waits for analysed frames to decide whether an occupant it missed has left, or whether an
        object inside has entered, or a line whether a track has crossed (the motion gate lets frames through
        meanwhile), or a removed zone's occupants wait for their zone_left."""
        return bool(self.removed) or any(zone.undecided() for zone in self.zones.values()) or any(
            lz.undecided() for line in self.lines.values() for lz in line.zones.values())

    def counts(self) -> dict[str, float]:
        """The fields of {prefix}:cam:{camera}:counts: ``zone:{zone}:{head}:{class}`` -> objects inside now,
        ``line:{line}:{head}:{class}:in`` / ``:out`` -> crossings so far, ``since:line:{line}`` -> unix seconds
        that line's counts started, for a line changed or added live (the hash's ``since`` is the camera's)
        (schema: workers/schemas/counts-v1.json)."""
        out: dict[str, float] = {}
        for name, zone in self.zones.items():
            occupied = zone.occupancy()
            for head, classes in zone.classes.items():
                for c in classes:
                    out[f"zone:{name}:{head}:{c}"] = occupied[(head, c)]
        for name, line in self.lines.items():
            for (head, c), n in line.counts().items():
                out[f"line:{name}:{head}:{c}:in"], out[f"line:{name}:{head}:{c}:out"] = n["in"], n["out"]
            if line.since is not None:
                out[f"since:line:{name}"] = round(line.since, 3)
        return out

    def reconfigured(self, zones: list[ZoneConfig], lines: list[LineConfig],
                     now: float | None = None) -> "CameraAnalytics":
        """The analytics for new zone/line settings (a live config change, at unix time ``now``): zones and lines
        whose settings did not change keep their state (occupants, counts); a changed zone keeps its occupants
        (ZoneCounter.inherit); a removed one's leave on the next update (_end_removed); changed and new lines
        start afresh, their counts since ``now``."""
        now = time.time() if now is None else now
        new = CameraAnalytics(zones, lines, self.head_classes, self.size, self.horizon_s)
        new.removed = self.removed + [zone for name, zone in self.zones.items() if name not in new.zones]
        for name, zone in self.zones.items():
            if name in new.zones and new.zones[name].config == zone.config:
                new.zones[name] = zone
            elif name in new.zones:  # changed: its occupants must not enter a second time
                new.zones[name].inherit(zone)
        for name, line in new.lines.items():
            if name in self.lines and self.lines[name].config == line.config:
                new.lines[name] = self.lines[name]
            else:  # counts from 0 from now on: the hash's since (the camera's start) would say it counted all along
                line.since = now
        return new

    def with_heads(self, head_classes: dict[str, list[str]]) -> "CameraAnalytics":
        """The analytics for the camera's new heads (a live change): every zone and line keeps its occupants
        and counts for the heads that stay; a new head starts at zero; a dropped head's occupants and counts
        go, without zone_left events (as on a stop: they did not leave, nobody watches them any more)."""
        new = CameraAnalytics([z.config for z in self.zones.values()], [ln.config for ln in self.lines.values()],
                              head_classes, self.size, self.horizon_s)
        new.errors = self.errors  # those zones and lines are off: not rebuilt, still reported
        for name, zone in self.zones.items():
            new.zones[name].inherit(zone)  # the same zone with other heads: what a live change of a zone keeps
        for name, line in self.lines.items():
            kept = new.lines[name]
            kept.zones.update({h: z for h, z in line.zones.items() if h in kept.zones})  # their crossing counts
            kept.since = line.since
        new.removed = self.removed  # _end_removed leaves out the occupants of the heads dropped
        return new
