"""Appearance in tracking, from the model's re-ID embeddings (models/reid.py). `trackers` 2.6.1 has no tracker
that takes appearance (BoT-SORT associates by motion and camera motion only), so it is ours, in two parts that
each fix one kind of identity error (docs/architecture.md, "Re-ID", has what each is worth):

- ``AppearanceByteTrack``: swaps. ByteTrack's first association also ranks by appearance the pairs its IoU
  gate lets through, so two people whose boxes overlap as they cross keep their own tracks.
- ``AppearanceLinker``: splits. A track that ByteTrack starts anew continues a recently lost track of the same
  class that looks the same and was lost before the new one was first seen (an object hidden for a moment comes
  back where its Kalman prediction no longer overlaps it). A layer after ByteTrack rather than a third
  association stage inside it: it needs no more of ByteTrack's internals, and the re-link happens at the new
  track's confirmation, before its id was ever published, so no published id changes.

Ids: ByteTrack's ids are the output ids unless re-linked; a re-linked ByteTrack id maps to the lost track's
output id, and the lost track's tracklet is removed from ByteTrack (it could otherwise be matched again and
the id would be on two objects). A lost track waits ``max_lost_s`` for a re-link; until then it has not ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import supervision as sv
from scipy.optimize import linear_sum_assignment
from trackers import ByteTrackTracker
from trackers.core.bytetrack.utils import _get_alive_tracklets
from trackers.utils.detections import default_confidences
from trackers.utils.iou import IoU

from workers.settings import AppearanceConfig


@dataclass
class TrackMemory:
    """What a track looked like and where it was going, when last seen."""

    out_id: int
    class_name: str
    embedding: np.ndarray  # (D,) unit vector: running mean of its confident, unoverlapped views
    box: np.ndarray  # (4,) xyxy, source pixels
    centre: tuple[float, float]  # the box's, in plain floats as the velocity: per-track numpy on 2 numbers cost more
    velocity: tuple[float, float]  # centre pixels per analysed frame
    last_step: int
    bt_id: int  # the ByteTrack id that feeds it now


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xyxy boxes: sv.box_iou_batch's arithmetic (float64, a float32 result) bit for bit (a test pins
    it), at ~60% of its cost, which is mostly per call (its checks, its buffers) on a frame's few boxes."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    np.clip(w, 0.0, None, out=w)
    np.clip(h, 0.0, None, out=h)
    inter = w * h
    area_a, area_b = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None] - inter
    out = np.zeros(inter.shape, np.float32)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """(K, K) IoU among ``boxes``, as the tracker's own association computes it."""
    return _box_iou(boxes, boxes)


def _take(det: sv.Detections, rows: np.ndarray) -> sv.Detections:
    """``det[rows]`` (rows: integer indices), for detections without masks at half of ``Detections.select``'s cost,
    which copies each array twice: once a frame per head."""
    if det.mask is not None or not all(isinstance(v, np.ndarray) and v.ndim for v in det.data.values()):
        return det[rows]
    return sv.Detections(xyxy=det.xyxy[rows], confidence=None if det.confidence is None else det.confidence[rows],
                         class_id=None if det.class_id is None else det.class_id[rows],
                         tracker_id=None if det.tracker_id is None else det.tracker_id[rows],
                         data={k: v[rows] for k, v in det.data.items()}, metadata=dict(det.metadata))


def _overlapped(iou: np.ndarray, max_overlap: float) -> np.ndarray:
    """(K,) bool, from the boxes' pairwise IoU: boxes another box overlaps by IoU > ``max_overlap``. Such a
    view mixes two objects' features, so it may move a track's box but not its appearance."""
    if len(iou) < 2:
        return np.zeros(len(iou), bool)
    iou = iou.copy()
    np.fill_diagonal(iou, 0.0)
    return iou.max(1) > max_overlap


def _centres(boxes: np.ndarray) -> list[list[float]]:
    return ((boxes[:, :2] + boxes[:, 2:]) / 2).tolist()


def _unit(e: np.ndarray) -> np.ndarray:
    return e / max(float(np.sqrt(e.dot(e))), 1e-9)  # np.linalg.norm's value at a fraction of its cost


class AppearanceLinker:
    """One per tracked head. ``assign`` turns ByteTrack's ids of one update into output ids."""

    def __init__(self, settings: AppearanceConfig, frame_rate: float):
        self.settings = settings
        self.set_frame_rate(frame_rate)
        self.alias: dict[int, int] = {}  # ByteTrack id -> output id
        self.memory: dict[int, TrackMemory] = {}  # output id -> memory
        self.step = 0
        self.relinks = 0

    def set_frame_rate(self, frame_rate: float) -> None:
        self.max_lost = max(1, round(self.settings.max_lost_s * frame_rate))  # analysed frames

    def waiting(self) -> set[int]:
        """Output ids of lost tracks that may still be re-linked (they have not ended)."""
        return {m.out_id for m in self.memory.values() if m.last_step < self.step}

    def assign(self, tracked: sv.Detections, tracker: ByteTrackTracker) -> np.ndarray:
        """Output ids (-1: unconfirmed) for ``tracked``, ByteTrack's result of this update."""
        self.step += 1
        bt = np.asarray(tracked.tracker_id if tracked.tracker_id is not None else np.full(len(tracked), -1), int)
        bt_ids = bt.tolist()
        emb = tracked.data.get("embedding")
        if emb is not None:
            emb = np.asarray(emb, np.float32)
        names = tracked.data["class_name"] if "class_name" in tracked.data else np.array([""] * len(tracked))
        new = [r for r, b in enumerate(bt_ids) if b >= 0 and b not in self.alias]
        if new and emb is not None:
            self._relink(new, tracked, bt, emb, names, tracker)
        for r in new:
            self.alias.setdefault(bt_ids[r], bt_ids[r])
        out_ids = [self.alias[b] if b >= 0 else -1 for b in bt_ids]
        out = np.array(out_ids, int)
        if emb is not None:
            self._remember(tracked, bt_ids, out_ids, emb, names, tracker)
        self._forget(tracker)
        return out

    def _relink(self, new: list[int], tracked: sv.Detections, bt: np.ndarray, emb: np.ndarray, names: np.ndarray,
                tracker: ByteTrackTracker) -> None:
        s = self.settings
        seen = {self.alias[b] for b in bt.tolist() if b in self.alias}
        lost = [m for m in self.memory.values() if m.out_id not in seen and m.last_step < self.step]
        if not lost:
            return
        # a track is confirmed only after consecutive sightings, so it was seen on every step since its tracklet's
        # first: a lost track seen on one of them was another object beside it, not this one hidden
        ages = {t.tracker_id: t.age for t in tracker.tracks}
        first = self.step - np.array([ages.get(int(bt[r]), 0) for r in new])
        # every (new, lost) pair at once: a loop over the pairs took a second of the camera's loop when hundreds
        # of tracks started together (a camera shaken in a crowd)
        boxes = tracked.xyxy[new].astype(np.float64)
        old = np.stack([m.box for m in lost])
        steps = self.step - np.array([m.last_step for m in lost])[:, None]
        ahead = np.array([m.centre for m in lost]) + np.array([m.velocity for m in lost]) * steps  # its motion's way
        size = np.maximum((boxes[:, 2:] - boxes[:, :2]).max(1)[:, None], (old[:, 2:] - old[:, :2]).max(1)[None])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        near = np.linalg.norm(ahead[None] - centres[:, None], axis=2) <= s.max_distance * size
        same = np.array([str(names[r]) for r in new])[:, None] == np.array([m.class_name for m in lost])[None]
        before = np.array([m.last_step for m in lost])[None] < first[:, None]
        # a box without a look (a zero embedding) has a cosine of 0 with every look, and so has a lost track that
        # kept none: at a min_similarity of 0 or below one took the other's id on position and class alone
        lost_looks = np.stack([m.embedding for m in lost])
        looks = np.any(emb[new] != 0, axis=1)[:, None] & np.any(lost_looks != 0, axis=1)[None]
        sim = np.where(same & before & near & looks, emb[new] @ lost_looks.T, -np.inf)
        finite = np.where(np.isfinite(sim), sim, -10.0)
        for i, j in zip(*linear_sum_assignment(finite, maximize=True)):
            if sim[i, j] < s.min_similarity:
                continue
            m, b = lost[j], int(bt[new[i]])
            tracker.tracks = [t for t in tracker.tracks if t.tracker_id != m.bt_id]  # it must not come back too
            self.alias[b], m.bt_id = m.out_id, b
            self.relinks += 1

    def _remember(self, tracked: sv.Detections, bt_ids: list[int], out_ids: list[int], emb: np.ndarray,
                  names: np.ndarray, tracker: ByteTrackTracker) -> None:
        s = self.settings
        crowded = self._crowded(tracked, tracker).tolist()
        boxes = tracked.xyxy.astype(np.float64)
        centres, labels = _centres(boxes), np.asarray(names).tolist()
        seen: list[tuple[TrackMemory, int]] = []  # (memory, row) whose appearance this view updates
        for r, oid in enumerate(out_ids):
            if oid < 0:
                continue
            m = self.memory.get(oid)
            if m is None:
                self.memory[oid] = TrackMemory(oid, str(labels[r]), emb[r].copy(), boxes[r], tuple(centres[r]),
                                               (0.0, 0.0), self.step, bt_ids[r])
                continue
            gap = self.step - m.last_step
            (x, y), (px, py), (vx, vy), g = centres[r], m.centre, m.velocity, max(gap, 1)
            dx, dy = (x - px) / g, (y - py) / g
            m.velocity = (dx, dy) if gap > 1 or not (vx or vy) else (0.5 * vx + 0.5 * dx, 0.5 * vy + 0.5 * dy)
            # a class may change within a track
            m.box, m.centre, m.last_step, m.class_name = boxes[r], (x, y), self.step, str(labels[r])
            if not crowded[r]:
                seen.append((m, r))
        if seen:  # all blends in one operation (elementwise: the same numbers; an output id is on one box at most)
            old = np.stack([m.embedding for m, _ in seen])
            blended = s.smoothing * old + (1 - s.smoothing) * emb[[r for _, r in seen]]
            for (m, _), e in zip(seen, blended):
                m.embedding = _unit(e)

    def _crowded(self, tracked: sv.Detections, tracker: ByteTrackTracker) -> np.ndarray:
        """(K,) bool: ByteTrack's returned boxes that another overlaps (``_overlapped``). AppearanceByteTrack found
        them already (among all of the update's boxes, at the same threshold); a plain ByteTrack (appearance
        weight 0) did not."""
        crowded = getattr(tracker, "result_crowded", None)
        if crowded is not None and len(crowded) == len(tracked) and tracker.max_overlap == self.settings.max_overlap:
            return crowded
        return _overlapped(_pairwise_iou(tracked.xyxy), self.settings.max_overlap)

    def _forget(self, tracker: ByteTrackTracker) -> None:
        alive = {t.tracker_id for t in tracker.tracks if t.tracker_id >= 0}
        for oid in [o for o, m in self.memory.items()
                    if self.step - m.last_step > self.max_lost and m.bt_id not in alive]:
            del self.memory[oid]
        live = {m.bt_id for m in self.memory.values()} | alive
        self.alias = {b: o for b, o in self.alias.items() if b in live}


class AppearanceByteTrack(ByteTrackTracker):
    """ByteTrack whose first association (confident boxes against every track) also weighs appearance: a pair's
    similarity is ``(1 - weight) * IoU + weight * cosine`` where the IoU gate passes (``minimum_iou_threshold``,
    unchanged), so where two people cross and their boxes overlap both tracks, each keeps the one that looks
    like it. The second association (weak boxes, often occluded ones) stays motion-only, as in ByteTrack.

    ``update`` is trackers 2.6.1's ``ByteTrackTracker.update`` with that one change and the tracks' appearance
    kept up to date (pinned by a test against the parent on detections without embeddings), and one IoU matrix for
    both associations and the overlaps (plain IoU only: another ``iou`` metric is refused); every helper is
    inherited. Detections without ``data["embedding"]`` are associated exactly as ByteTrack does.
    """

    tracker_id = None  # not registered: the parent's "bytetrack" entry in trackers' registry stays ByteTrack's
    search_space: ClassVar[dict[str, dict]] = {}  # nothing for trackers' tuner to search

    def __init__(self, *args: Any, weight: float = 0.5, smoothing: float = 0.9, max_overlap: float = 0.3,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if type(self.iou) is not IoU:  # update computes plain IoU itself, once for both associations
            raise ValueError(f"AppearanceByteTrack associates by IoU, not {type(self.iou).__name__}")
        self.weight, self.smoothing, self.max_overlap = weight, smoothing, max_overlap
        self.result_crowded: np.ndarray | None = None  # the last update's returned boxes that others overlap

    def update(self, detections: sv.Detections, frame: np.ndarray | None = None,
               timestamp: float | None = None) -> sv.Detections:
        self._warn_if_frame_unused(frame)
        self.result_crowded = None
        timing = self._predict_timing(timestamp)
        if timing.skip_update:
            return self._detections_for_skipped_update(detections)
        if len(self.tracks) == 0 and len(detections) == 0:
            result = sv.Detections.empty()
            result.tracker_id = np.array([], dtype=int)
            return result
        emb = detections.data.get("embedding") if len(detections) else None
        emb = None if emb is None else np.asarray(emb, np.float32)
        out_idx: list[int] = []
        out_ids: list[int] = []
        self._predict_tracklets(self.tracks, timing)
        budget = self._lost_track_time_budget(timing, self.maximum_time_without_update)
        self._prune_lost_tracks(timing)
        boxes = detections.xyxy
        conf = default_confidences(detections)
        # ~high, not conf < threshold: a NaN score is a weak box, as in ByteTrack, not in neither set and lost
        high = conf >= self.high_conf_det_threshold
        high_idx, low_idx = np.where(high)[0], np.where(~high)[0]
        predicted = np.array([t.get_state_bbox() for t in self.tracks]) if self.tracks else np.empty((0, 4))
        # One IoU matrix, rows the tracks' predictions then the boxes, columns the boxes: both associations'
        # pairs and the boxes' overlaps among themselves (three computations before, for the same pairs).
        both = np.concatenate([predicted, boxes])
        if not np.isfinite(both).all():  # as trackers' IoU refuses them
            raise ValueError("boxes contain non-finite values (NaN or inf)")
        iou_all = _box_iou(both, boxes)
        iou_tracks = iou_all[:len(predicted)]
        # views no other box overlaps: they may update an appearance
        clean = ~_overlapped(iou_all[len(predicted):], self.max_overlap) if emb is not None else None
        iou = iou_tracks[:, high_idx]
        sim = iou
        if emb is not None and len(self.tracks) and len(high_idx):
            # a zero vector is no look (to_detections' for a non-finite one), not one unlike every other: cosine 0
            # ranked such a box below any look-alike its track's box overlapped far less
            none = np.zeros(emb.shape[1], np.float32)
            track_emb = np.stack([e if e is not None else none for e in
                                  [getattr(t, "embedding", None) for t in self.tracks]])
            looks = track_emb.any(1)  # rows without a look only pass the gate below, so their cosines go unused
            if looks.any():
                high_emb = emb[high_idx]
                cos = track_emb @ high_emb.T
                fused = (1 - self.weight) * iou + self.weight * cos
                # the IoU gate decides what may match; appearance only ranks the candidates it let through
                gate = looks[:, None] & high_emb.any(1)[None] & (iou >= self.minimum_iou_threshold)
                sim = np.where(gate, np.maximum(fused, self.minimum_iou_threshold), iou)
        matched, unmatched_tracks, unmatched_high = self._get_associated_indices(sim, self.minimum_iou_threshold)
        for row, col in matched:
            self._extend(self.tracks[row], int(high_idx[col]), boxes, out_idx, out_ids)
        if emb is not None:
            self._look([(self.tracks[row], int(high_idx[col])) for row, col in matched if clean[high_idx[col]]], emb)
        remaining = [self.tracks[i] for i in unmatched_tracks]
        matched, _, unmatched_low = self._get_associated_indices(iou_tracks[unmatched_tracks][:, low_idx],
                                                                 self.minimum_iou_threshold)
        for row, col in matched:
            self._extend(remaining[row], int(low_idx[col]), boxes, out_idx, out_ids)
        for col in unmatched_low:
            out_idx.append(int(low_idx[col]))
            out_ids.append(-1)
        before = len(self.tracks)
        self._spawn_new_tracks(boxes, conf, unmatched_high, high_idx, out_idx, out_ids)
        if emb is not None:  # the tracks just spawned, in the order of unmatched_high that cleared activation
            spawned = [int(high_idx[c]) for c in unmatched_high
                       if float(conf[int(high_idx[c])]) >= self.track_activation_threshold]
            for track, i in zip(self.tracks[before:], spawned):
                track.embedding = emb[i].copy()
        self.tracks = _get_alive_tracklets(tracklets=self.tracks,
                                           minimum_consecutive_frames=self.minimum_consecutive_frames,
                                           maximum_frames_without_update=self.maximum_frames_without_update,
                                           maximum_time_without_update=budget)
        if not out_idx:
            result = sv.Detections.empty()
            result.tracker_id = np.array([], dtype=int)
            return result
        rows = np.array(out_idx)
        result = _take(detections, rows)
        result.tracker_id = np.array(out_ids, dtype=int)
        if clean is not None:  # the result holds every box (a permutation), so an overlap is one among them too
            self.result_crowded = ~clean[rows]
        return result

    def _extend(self, track, i: int, boxes: np.ndarray, out_idx: list[int], out_ids: list[int]) -> None:
        track.update(boxes[i])
        if track.number_of_successful_consecutive_updates >= self.minimum_consecutive_frames and track.tracker_id == -1:
            track.tracker_id = self._allocate_tracker_id()
        out_idx.append(i)
        out_ids.append(track.tracker_id)

    def _look(self, matched: list[tuple[Any, int]], emb: np.ndarray) -> None:
        """Each matched track's appearance moves towards its box's view (``matched``: (track, box) pairs, views no
        other box overlaps). The blends of all tracks in one operation: elementwise, so the same numbers."""
        seen = [(t, i) for t, i in matched if getattr(t, "embedding", None) is not None]
        for t, i in matched:
            if getattr(t, "embedding", None) is None:
                t.embedding = _unit(emb[i])
        if seen:
            old = np.stack([t.embedding for t, _ in seen])
            blended = self.smoothing * old + (1 - self.smoothing) * emb[[i for _, i in seen]]
            for (t, _), e in zip(seen, blended):
                t.embedding = _unit(e)
