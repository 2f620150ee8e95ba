"""Offline accuracy of zones, lines and the motion gate on synthetic street scenes, whose ground truth knows
every object's path. The model, the tracker, the motion gate and the analytics run exactly as a StreamActor
runs them (same classes, same order per frame), without Ray or Redis, so a scene of a few hundred frames
takes seconds. ``tests/test_analytics_accuracy.py`` and ``benchmarks/bench_analytics.py`` use it.

How the pipeline is scored (the reasons are in docs/architecture.md, "Analytics"):
- lines: supervision's LineZone, with the line's own settings, runs on the TRUE boxes and object ids (hidden
  objects included): the crossings a perfect detector and tracker would report. A true crossing counts as
  "tracked" when the object was matched to a pipeline track (IoU >= 0.5, same class) within +-2 frames of
  it; the pipeline's counts are compared with the tracked crossings, per head, class and direction;
- occupancy: per frame, the true objects whose anchors are inside the zone (supervision's PolygonZone on
  the true boxes). Objects less than half visible (fully hidden ones too) are "don't care", as MOT benchmarks
  treat them: the pipeline may count them or not, so its error is its distance from [visible inside, all inside];
- dwell: each complete true visit (entered and left within the clip) against the zone_left of the track
  that carried the object.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import supervision as sv
from scipy.optimize import linear_sum_assignment

from models.letterbox import letterbox
from synthetic import sprites
from synthetic.scene import CLASS_NAMES, FrameTruth, StreetScene, composite
from workers.analytics import CameraAnalytics
from workers.analytics_settings import (LineConfig, MotionConfig, ZoneConfig, analytics_errors,
                                        camera_analytics_problems, frame_errors)
from workers.frames import detection_records, to_detections
from workers.motion import MotionGate
from workers.settings import TrackerConfig
from workers.tracking import CameraTracker

# The zone and lines the accuracy tests and benchmarks/bench_analytics.py score (normalised: they fit every
# street layout): a zone over the middle of the road and the near sidewalk, two lines across the street.
STREET_ZONES = [ZoneConfig(name="middle", polygon=[(0.3, 0.45), (0.7, 0.45), (0.7, 0.95), (0.3, 0.95)])]
STREET_LINES = [LineConfig(name="west", start=(0.35, 0.3), end=(0.35, 1.0)),
                LineConfig(name="east", start=(0.65, 0.3), end=(0.65, 1.0))]
# The analytics defaults (hysteresis, margins, patience) were chosen looking at these only: 100-101 at first,
# 100-109 from 2026-12-02.
TUNING_SEEDS = tuple(range(100, 110))
# Held out until 2026-12-01; since then their misses were inspected (201's lines, 203's tree), so they are
# reported beside the held-out seeds, not as them.
INSPECTED_SEEDS = (201, 202, 203)
# Fixed on 2026-12-02 before any was scored for lines, zones or dwell; nothing was tuned on them. (The streets
# of 301 and 302, at 5% of the traffic, are the motion gate's benchmark scenes.)
HELD_OUT_SEEDS = (301, 302, 303, 304, 305, 306)

MATCH_IOU = 0.5
NEAR_FRAMES = 2  # a crossing counts as tracked when the object was matched this close to it
HIDDEN = 0.5  # objects less visible than this are "don't care" for occupancy


@dataclass
class SceneRun:
    seed: int
    fps: float
    size: tuple[int, int]  # (width, height)
    truths: list[FrameTruth]
    tracked: list[dict[str, sv.Detections]]  # per frame and head; on a skipped frame, the last analysed one's
    messages: list[dict]  # per frame, what a consumer would see (held detections on skipped frames)
    events: list[dict]
    occupancy: list[dict[str, int]]  # per frame: zone -> objects inside (all its heads and classes)
    analytics: CameraAnalytics
    occupants: list[dict[str, list[tuple[str, int]]]] = field(default_factory=list)  # per frame: zone -> tracks
    skipped: int = 0
    heads: dict[str, list[str]] = field(default_factory=dict)


def run_scene(runner, seed: int, frames: int, zones: list[ZoneConfig], lines: list[LineConfig], *,
              fps: float = 10.0, size: tuple[int, int] = (640, 360), density: float = 1.0,
              motion: MotionConfig | None = None, tracker: TrackerConfig | None = None, batch: int = 8) -> SceneRun:
    """A StreetScene through the model (``runner``: a workers.model_runner.ModelRunner, the only torch here),
    the trackers, the motion gate (when ``motion`` is enabled) and the analytics."""
    _check_count("frames", frames)
    scene = StreetScene(seed, width=size[0], height=size[1], fps=fps, density=density)
    return run_frames(runner, (scene.step() for _ in range(frames)), zones, lines, seed=seed, fps=fps, size=size,
                      motion=motion, tracker=tracker, batch=batch)


def run_frames(runner, frames: Iterable[tuple[np.ndarray, FrameTruth]], zones: list[ZoneConfig],
               lines: list[LineConfig], *, seed: int = 0, fps: float = 10.0, size: tuple[int, int] = (640, 360),
               motion: MotionConfig | None = None, tracker: TrackerConfig | None = None, batch: int = 8) -> SceneRun:
    """As run_scene, for any (RGB image, truth) frames of ``size`` (width, height) at ``fps``. Zones and lines
    the pipeline would refuse, or switch off on the first frame, raise ValueError: left out, they would just be
    missing from the scores. So does a tracker switched off: such a camera publishes untracked detections and
    counts nothing, and the scores here are of tracks."""
    tracker = tracker or TrackerConfig()
    if not tracker.enabled:  # before: tracked, counted and scored all the same, unlike the camera it stood for
        raise ValueError("tracker.enabled: false: this harness scores a camera's tracks, zones and lines")
    heads = dict(runner.heads)
    problems = (camera_analytics_problems(zones, lines, None)
                + analytics_errors(zones, lines, None, heads) + list(frame_errors(zones, lines, size).values()))
    if problems:
        raise ValueError("; ".join(problems))
    analytics = CameraAnalytics(zones, lines, heads, size)
    camera_tracker = CameraTracker(list(heads), tracker, fps)
    gate = MotionGate(motion) if motion is not None and motion.enabled else None
    run = SceneRun(seed, fps, size, [], [], [], [], [], analytics, heads=heads)
    pending: list[tuple[int, float, np.ndarray, object, bool]] = []
    last: dict[str, sv.Detections] = {h: _empty() for h in heads}

    analysed = -1  # the last analysed frame: what the camera's motion gate waits on (CameraPipeline._undecided)

    def flush() -> None:
        nonlocal last, analysed
        images = [p[2] for p in pending if p[4]]
        results = iter(runner.run(images, [None] * len(images)) if images else [])
        for f, pts, _, lb, infer in pending:
            if infer:
                arrays = next(results)
                last = {}
                for head, classes in heads.items():
                    det = to_detections(arrays[head], lb, classes)
                    det, _ = camera_tracker.update(head, det, f, pts)
                    run.events += analytics.update(head, det, f, pts)
                    last[head] = det
                analysed = f
            else:
                run.skipped += 1
                analytics.hold(pts)
            run.tracked.append(last)
            run.messages.append({"frame": f, "detections": [r for h, d in last.items()
                                                            for r in detection_records(h, d, d.tracker_id)]})
            run.occupancy.append({name: sum(z.occupancy().values()) for name, z in analytics.zones.items()})
            run.occupants.append({name: [(o.head, o.current_id) for o in z.occupants.values()]
                                  for name, z in analytics.zones.items()})
        pending.clear()

    for f, (rgb, truth) in enumerate(frames):
        if rgb.shape[:2] != (size[1], size[0]):  # the zones, lines and scores are in ``size``'s pixels
            raise ValueError(f"frame {f} is {rgb.shape[1]}x{rgb.shape[0]}, but size is {size[0]}x{size[1]}")
        run.truths.append(truth)
        image, lb = letterbox(rgb, runner.input_size)
        pts = f / fps
        if gate is None:
            infer = True
        elif analytics.undecided() or camera_tracker.undecided(analysed):  # as the camera: analysed frames decide
            infer = gate.force(image, pts)
        else:
            infer = gate.wants(image, pts)
        pending.append((f, pts, image, lb, infer))
        if sum(p[4] for p in pending) >= batch:
            flush()
    flush()
    return run


def parked_scene(seed: int, frames: int, cls: str = "car", at: tuple[float, float] = (0.5, 0.8),
                 length: float = 0.3, fps: float = 10.0, size: tuple[int, int] = (640, 360),
                 density: float = 0.0) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """A StreetScene (empty at the default density, so its sensor noise and light drift are all that change)
    with one object that never moves: ``at`` is where it stands (normalised bottom centre), ``length`` its
    size as a fraction of the frame width; it is painted over the scene's own objects. Truth: the scene's own
    objects (visible as far as it leaves them), then that object (id 10**6; its box clipped to the image, its
    visibility the part inside; its kind). Bad arguments raise ValueError at the call."""
    _check_count("frames", frames)
    if cls not in CLASS_NAMES:
        raise ValueError(f"cls: unknown class {cls!r}; allowed: {', '.join(CLASS_NAMES)}")
    if isinstance(length, bool) or not isinstance(length, numbers.Real) or not 0 < length <= 1:
        raise ValueError(f"length must be in (0, 1] (a fraction of the frame width), got {length!r}")
    if len(at) != 2 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in at):
        raise ValueError(f"at must be a finite (x, y) in frame units, got {at!r}")
    scene = StreetScene(seed, width=size[0], height=size[1], fps=fps, density=density)
    rng = np.random.default_rng(seed)
    recipe = sprites.recipe(cls, rng)
    sprite = sprites.render(cls, recipe, length * size[0], 0, False)
    x = round(at[0] * size[0] - sprite.anchor[0])
    y = round(at[1] * size[1] - sprite.anchor[1])
    labels = np.zeros((size[1], size[0]), np.int16)
    # a FrameTruth holds objects with a pixel inside the image, boxes clipped to it
    inside = composite(np.zeros((size[1], size[0], 3), np.uint8), labels, [(sprite, x, y, 1)])[0][0]
    if not inside:
        raise ValueError(f"at: {tuple(at)} puts the {cls} outside the {size[0]}x{size[1]} frame")
    # in the scene, not pasted on its frames: pasted, it hid the passers-by under it while their truth still called
    # them visible, and it alone had no sensor noise nor light drift
    scene.park(cls, recipe, sprite, x, y, 10**6)

    def frames_of() -> Iterator[tuple[np.ndarray, FrameTruth]]:
        for _ in range(frames):
            yield scene.step()

    return frames_of()


def _check_count(name: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")


def _empty() -> sv.Detections:
    det = sv.Detections.empty()
    det.tracker_id = np.zeros(0, int)
    det.data["class_name"] = np.array([], dtype=str)
    return det


def truth_detections(truth: FrameTruth, head_classes: list[str], min_visibility: float | None = 0.0) -> sv.Detections:
    """The true objects of one head's classes as sv.Detections (object ids as tracker ids): those more visible
    than ``min_visibility``, or with None all of them, hidden ones too (the frame's truth has every object
    that is at least partly inside the image)."""
    names = np.array([CLASS_NAMES[c] for c in truth.class_ids])
    keep = np.isin(names, head_classes)
    if min_visibility is not None:
        keep &= truth.visibility > min_visibility
    return sv.Detections(xyxy=truth.boxes[keep].astype(np.float64), confidence=np.ones(int(keep.sum())),
                         class_id=np.array([head_classes.index(n) for n in names[keep]], dtype=int),
                         tracker_id=truth.object_ids[keep].astype(int), data={"class_name": names[keep]})


def _matches(run: SceneRun, matches: list[dict] | None) -> list[dict]:
    if matches is None:
        return match_tracks(run)
    if len(matches) != len(run.truths):  # another run's: the scores would pair the wrong frames
        raise ValueError(f"matches has {len(matches)} frames, the run {len(run.truths)}")
    return matches


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_tracks(run: SceneRun) -> list[dict[int, tuple[str, int]]]:
    """Per frame: true object id -> (head, track id) it was matched to (IoU >= 0.5, same class, optimal)."""
    out = []
    for truth, tracked in zip(run.truths, run.tracked):
        frame: dict[int, tuple[str, int]] = {}
        for head, classes in run.heads.items():
            gt = truth_detections(truth, classes)
            det = tracked.get(head, _empty())
            ok = det.tracker_id >= 0 if len(det) else np.zeros(0, bool)
            det = det[ok] if len(det) else det
            if not len(gt) or not len(det):
                continue
            iou = _iou_matrix(gt.xyxy, det.xyxy) * (gt.data["class_name"][:, None] == det.data["class_name"][None, :])
            # pairs under the threshold count 0, as in MOT scoring: with their IoU the largest sum could pair a
            # box with a neighbour it does not match and leave its real match unpaired
            iou[iou < MATCH_IOU] = 0.0
            rows, cols = linear_sum_assignment(iou, maximize=True)
            for r, c in zip(rows, cols):
                if iou[r, c] >= MATCH_IOU:
                    frame[int(gt.tracker_id[r])] = (head, int(det.tracker_id[c]))
        out.append(frame)
    return out


def score_lines(run: SceneRun, matches: list[dict] | None = None) -> dict:
    """Per line: pipeline counts, true crossings of tracked objects, all true crossings, per
    (head, class, direction); and the crossing events matched one to one."""
    matches = _matches(run, matches)
    out = {}
    for name, counter in run.analytics.lines.items():
        cfg = counter.config
        true_zones = {h: sv.LineZone(sv.Point(*counter.start), sv.Point(*counter.end),
                                     triggering_anchors=[sv.Position[a.upper()] for a in cfg.anchors],
                                     minimum_crossing_threshold=cfg.min_crossing_frames) for h in counter.classes}
        crossings = []  # (frame, object id, head, class, direction)
        for f, truth in enumerate(run.truths):
            for head, zone in true_zones.items():
                # hidden objects too: LineZone forgets an object missing for 2 frames, and one fully hidden at
                # the line would come back on the far side with no crossing
                gt = truth_detections(truth, run.heads[head], min_visibility=None)
                gt = gt[np.isin(gt.data["class_name"], counter.classes[head])] if len(gt) else gt
                cin, cout = zone.trigger(gt)
                for i in np.flatnonzero(cin | cout):
                    crossings.append((f, int(gt.tracker_id[i]), head, str(gt.data["class_name"][i]),
                                      "in" if cin[i] else "out"))
        tracked = [c for c in crossings if any(c[1] in matches[g] for g in
                                               range(max(0, c[0] - NEAR_FRAMES), min(len(matches), c[0] + NEAR_FRAMES + 1)))]
        pipeline = [e for e in run.events if e["type"] == "line_crossed" and e["line"] == name]
        key = lambda h, c, d: f"{h}/{c}/{d}"  # noqa: E731
        counts = {"pipeline": Counter(key(e["head"], e["class"], e["direction"]) for e in pipeline),
                  "truth_tracked": Counter(key(c[2], c[3], c[4]) for c in tracked),
                  "truth_all": Counter(key(c[2], c[3], c[4]) for c in crossings)}
        keys = sorted(set().union(*counts.values()))
        out[name] = {
            "by_class": {k: {n: counts[n][k] for n in counts} for k in keys},
            "pipeline": len(pipeline), "truth_tracked": len(tracked), "truth_all": len(crossings),
            "abs_error": sum(abs(counts["pipeline"][k] - counts["truth_tracked"][k]) for k in keys),
            "matched_events": _match_crossings(pipeline, tracked, matches),
        }
    return out


def _match_crossings(pipeline: list[dict], truth: list[tuple], matches: list[dict], window: int = 10) -> int:
    """Pipeline crossings that are a true crossing of the object their track was matched to, same
    direction, within ``window`` frames; one to one."""
    used, hits = set(), 0
    for e in pipeline:
        f, track = e["frame"], (e["head"], e["track_id"])
        objs = {o for g in range(max(0, f - window), min(len(matches), f + window + 1))
                for o, t in matches[g].items() if t == track}
        for j, c in enumerate(truth):
            if j not in used and c[1] in objs and c[4] == e["direction"] and abs(c[0] - f) <= window:
                used.add(j)
                hits += 1
                break
    return hits


def _inside_truth(run: SceneRun, zone_name: str) -> list[tuple[set[int], set[int], set[int]]]:
    """Per frame: ids of the true objects inside that are >= HIDDEN visible, of those that are at all visible,
    and of all true objects inside (fully hidden ones too: an object behind another is still inside)."""
    z = run.analytics.zones[zone_name]
    poly = sv.PolygonZone(np.round(z.polygon).astype(np.int64), triggering_anchors=z.zone.triggering_anchors)
    out = []
    for truth in run.truths:
        vis, seen, present = set(), set(), set()
        for head, classes in z.classes.items():
            gt = truth_detections(truth, run.heads[head], min_visibility=None)
            gt = gt[np.isin(gt.data["class_name"], classes)] if len(gt) else gt
            if not len(gt):
                continue
            inside = poly.trigger(gt)
            vis_of = dict(zip(truth.object_ids.tolist(), truth.visibility.tolist()))
            for oid in gt.tracker_id[inside].tolist():
                present.add(oid)
                if vis_of[oid] > 0:
                    seen.add(oid)
                if vis_of[oid] >= HIDDEN:
                    vis.add(oid)
        out.append((vis, seen, present))
    return out


def score_zones(run: SceneRun, matches: list[dict] | None = None, skip_first: int = 0) -> dict:
    """Per zone: occupancy error per frame (distance from [visible inside, all inside]) and dwell errors;
    occupancy is scored from frame ``skip_first`` on."""
    matches = _matches(run, matches)
    _check_count("skip_first", skip_first)  # a negative start would index from the clip's end
    out = {}
    n = len(run.truths)
    real = {t for frame in matches for t in frame.values()}  # tracks that were ever on a true object
    for name in run.analytics.zones:
        inside = _inside_truth(run, name)
        errors, without_false = [], []
        for f in range(skip_first, n):
            lo, hi = len(inside[f][0]), len(inside[f][2])
            p = run.occupancy[f][name]
            errors.append(max(0, lo - p, p - hi))
            # Diagnosis only: the same without occupants whose track never matched a true object (the
            # detector's false positives, e.g. on a tree), to tell analytics errors from detector errors.
            q = sum(1 for t in run.occupants[f][name] if t in real)
            without_false.append(max(0, lo - q, q - hi))
        errors, without_false = np.array(errors), np.array(without_false)
        # true visits: runs of consecutive frames inside, the object at all visible, complete within the clip
        visits: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for f in range(n):
            for oid in inside[f][1]:
                runs = visits[oid]
                if runs and runs[-1][1] == f - 1:
                    runs[-1] = (runs[-1][0], f)
                else:
                    runs.append((f, f))
        dwell = []
        for e in run.events:
            if e["type"] != "zone_left" or e["zone"] != name:
                continue
            ids = {(e["head"], t) for t in e.get("track_ids", [e["track_id"]])}
            f0, f1 = round(e["entered_pts"] * run.fps), round(e["left_pts"] * run.fps)
            votes = Counter(o for g in range(f0, min(n, f1 + 1)) for o, t in matches[g].items() if t in ids)
            if not votes:
                continue
            oid = votes.most_common(1)[0][0]
            best = max(visits.get(oid, []), key=lambda v: min(v[1], f1) - max(v[0], f0), default=None)
            if best is None or best[0] == 0 or best[1] >= n - 1:
                continue  # the true visit started before the clip or was still going at its end
            true_s = (best[1] - best[0]) / run.fps
            dwell.append({"object": oid, "visit": best, "track_id": e["track_id"], "dwell_s": e["dwell_s"],
                          "true_s": true_s, "error_s": round(abs(e["dwell_s"] - true_s), 3)})
        complete = sum(1 for runs in visits.values() for v in runs if v[0] > 0 and v[1] < n - 1)
        errs = np.array([d["error_s"] for d in dwell]) if dwell else np.zeros(0)
        # A visit the tracker split between tracks (an id switch the takeover did not bridge) yields several
        # partial dwells; the visits carried by one occupant from entry to exit measure the dwell logic itself.
        per_visit = Counter((d["object"], d["visit"]) for d in dwell)
        whole = np.array([d["error_s"] for d in dwell if per_visit[(d["object"], d["visit"])] == 1])
        out[name] = {
            "frames": int(len(errors)), "within_1": round(float(np.mean(errors <= 1)), 4) if len(errors) else None,
            "exact": round(float(np.mean(errors == 0)), 4) if len(errors) else None,
            "within_1_without_false_tracks": round(float(np.mean(without_false <= 1)), 4) if len(errors) else None,
            "max_error": int(errors.max()) if len(errors) else None,
            "true_mean_inside": round(float(np.mean([len(v[1]) for v in inside])), 2) if inside else None,
            "dwell_scored": len(dwell), "true_complete_visits": complete,
            "dwell_within_0_5s": round(float(np.mean(errs <= 0.5)), 4) if len(errs) else None,
            "dwell_error_median_s": round(float(np.median(errs)), 3) if len(errs) else None,
            "dwell_error_max_s": round(float(errs.max()), 3) if len(errs) else None,
            "split_visits": sum(1 for k, c in per_visit.items() if c > 1),
            "dwell_whole_visits": len(whole),
            "dwell_whole_within_0_5s": round(float(np.mean(whole <= 0.5)), 4) if len(whole) else None,
            "dwell": dwell,
        }
    return out
