"""Per-camera tracking: one ByteTrack tracker per head (Roboflow's `trackers`), which also weighs appearance and
re-links lost tracks where the model embeds the boxes (workers/appearance.py), plus track lifecycle events.

Track ids are namespaced per (camera, head) and offset by ``id_base``, so a tracker that is
restarted (a new actor after a crash) continues numbering instead of reusing ids that
consumers have already seen for other objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from workers.appearance import AppearanceByteTrack, AppearanceLinker
from workers.frames import attribute_names
from workers.settings import TrackerConfig


@dataclass
class TrackState:
    head: str
    track_id: int
    class_name: str  # as last seen, as the messages, lines and re-links say: a far "person" may turn out a bicycle
    first_frame: int
    first_pts: float
    last_frame: int
    last_pts: float
    frames: int = 1
    votes: dict[str, dict[str, float]] = field(default_factory=dict)  # attribute -> label -> summed confidence


@dataclass
class HeadTracker:
    head: str
    tracker: ByteTrackTracker
    id_base: int = 0
    next_id: int = 0  # first id not handed out yet (absolute, id_base included)
    active: dict[int, TrackState] = field(default_factory=dict)
    linker: AppearanceLinker | None = None  # re-links by appearance, when the settings enable it
    embedded: int = 0  # boxes whose embedding the tracker used (appearance on, and the model embeds this head)

    def output_ids(self, tracked: sv.Detections) -> np.ndarray:
        """ByteTrack's ids of one update -> the ids published (before id_base; -1: unconfirmed)."""
        if self.linker is not None:
            return self.linker.assign(tracked, self.tracker)
        return np.asarray(tracked.tracker_id if tracked.tracker_id is not None else np.full(len(tracked), -1))

    def alive(self) -> set[int]:
        """Output ids (before id_base) of tracks that have not ended: ByteTrack's, and lost ones still waiting
        for a re-link."""
        ids = {t.tracker_id for t in self.tracker.tracks if t.tracker_id >= 0}
        if self.linker is None:
            return ids
        return {self.linker.alias.get(b, b) for b in ids} | self.linker.waiting()


class CameraTracker:
    """Tracks every head of one camera. ``update`` returns tracked detections and lifecycle events."""

    def __init__(self, heads: list[str], settings: TrackerConfig, frame_rate: float,
                 id_base: dict[str, int] | None = None):
        id_base = id_base or {}
        self.settings, self.frame_rate = settings, frame_rate
        self.heads = {h: self._new_head(h, id_base.get(h, 0)) for h in heads}
        # Next free id of heads not tracked now (dropped by an update, or not asked for yet): a head that comes
        # back continues its numbering, and next_ids() keeps persisting it.
        self.retired = {h: base for h, base in id_base.items() if h not in self.heads}

    def _new_head(self, head: str, base: int) -> HeadTracker:
        a = self.settings.appearance
        linker = AppearanceLinker(a, self.frame_rate) if a.enabled and a.relink else None
        return HeadTracker(head, self._new_tracker(), base, base, linker=linker)

    def _new_tracker(self) -> ByteTrackTracker:
        s, a = self.settings, self.settings.appearance
        options = dict(
            lost_track_buffer=s.lost_track_buffer, frame_rate=self.frame_rate,
            track_activation_threshold=s.track_activation_threshold,
            minimum_consecutive_frames=s.minimum_consecutive_frames,
            minimum_iou_threshold=s.minimum_iou_threshold, high_conf_det_threshold=s.high_conf_det_threshold,
        )
        if a.enabled and a.weight > 0:  # without embeddings in the detections it associates as ByteTrack does
            return AppearanceByteTrack(**options, weight=a.weight, smoothing=a.smoothing, max_overlap=a.max_overlap)
        return ByteTrackTracker(**options)

    def set_frame_rate(self, frame_rate: float) -> None:
        """The rate frames now reach the tracker (the frame-age budget lowered it, a live update changed fps):
        how long a lost track lives is counted in frames, so it is re-counted for the new rate."""
        if frame_rate == self.frame_rate:
            return
        self.frame_rate = frame_rate
        for ht in self.heads.values():
            ht.tracker.maximum_frames_without_update = ht.tracker._compute_maximum_frames_without_update(
                self.settings.lost_track_buffer, frame_rate)
            if ht.linker is not None:
                ht.linker.set_frame_rate(frame_rate)

    def next_ids(self) -> dict[str, int]:
        """Per head, the first id not yet handed out (persist it; pass it back as ``id_base`` on restart)."""
        return {**self.retired, **{h: ht.next_id for h, ht in self.heads.items()}}

    def set_heads(self, heads: list[str]) -> list[dict]:
        """Tracks another set of heads from the next update on: a dropped head's open tracks end (the
        track_ended events are returned), a new head gets its own tracker, numbering after any id it had."""
        events: list[dict] = []
        for head in [h for h in self.heads if h not in heads]:
            ht = self.heads.pop(head)
            events += [self._ended(st) for st in ht.active.values()]
            self.retired[head] = ht.next_id
        for head in heads:
            if head not in self.heads:
                base = self.retired.pop(head, 0)
                self.heads[head] = self._new_head(head, base)
        return events

    def appearance_stats(self) -> dict[str, dict[str, int]]:
        """Per head: boxes whose re-ID embedding the tracker used, and lost tracks re-linked by appearance."""
        return {h: {"embedded": ht.embedded, "relinks": ht.linker.relinks if ht.linker else 0}
                for h, ht in self.heads.items()}

    def open_tracks(self) -> int:
        return sum(len(ht.active) for ht in self.heads.values())

    def undecided(self, frame: int) -> bool:
        """A track not seen on ``frame`` (the last analysed one) that has not ended, or one not confirmed yet (kept
        only while it is seen): only analysed frames decide either, so the motion gate lets frames through."""
        return any(any(st.last_frame != frame for st in ht.active.values())
                   or any(t.tracker_id < 0 for t in ht.tracker.tracks) for ht in self.heads.values())

    def update(self, head: str, det: sv.Detections, frame: int, pts: float) -> tuple[sv.Detections, list[dict]]:
        """Returns detections with ``tracker_id`` (-1 = not confirmed) and events as dicts
        (``type`` track_started / track_ended with head, track_id, class and timing)."""
        ht = self.heads[head]
        if self.settings.appearance.enabled and "embedding" in det.data:
            ht.embedded += len(det)
        tracked = ht.tracker.update(det)
        ids = ht.output_ids(tracked)
        ids = np.where(ids >= 0, ids + ht.id_base, -1)
        tracked.tracker_id = ids
        events: list[dict] = []
        names = np.asarray(tracked.data.get("class_name", [""] * len(tracked))).tolist()
        voted = [f"attr:{name}" for name in attribute_names(tracked)]
        tids = ids.tolist()
        ht.next_id = max(ht.next_id, max(tids, default=-1) + 1)
        for row, tid in enumerate(tids):
            if tid < 0:
                continue
            st, name = ht.active.get(tid), str(names[row])
            if st is None:
                st = ht.active[tid] = TrackState(head, tid, name, frame, pts, frame, pts)
                events.append({"type": "track_started", "head": head, "track_id": tid, "class": name,
                               "frame": frame, "pts": round(pts, 3)})
            else:
                st.last_frame, st.last_pts, st.frames, st.class_name = frame, pts, st.frames + 1, name
            if voted:
                self._vote(st, tracked, row, voted)
        alive = {t + ht.id_base for t in ht.alive()}
        for tid in [t for t in ht.active if t not in alive]:
            events.append(self._ended(ht.active.pop(tid)))
        return tracked, events

    @staticmethod
    def _vote(st: TrackState, tracked: sv.Detections, row: int, keys: list[str]) -> None:
        """A tracked object's attribute label is its track's vote so far (confidence-weighted), not the latest
        frame's guess: one blurred frame does not relabel a van. ``conf`` becomes the winner's share of it.
        ``keys``: the detections' attribute columns (``attr:<name>``)."""
        for key in keys:
            label = str(tracked.data[key][row])
            if not label:
                continue
            votes = st.votes.setdefault(key, {})
            votes[label] = votes.get(label, 0.0) + float(tracked.data[key + ":conf"][row])
            best = max(votes, key=votes.get)
            if tracked.data[key].dtype.itemsize < np.array(best).dtype.itemsize:  # room for a longer label
                tracked.data[key] = tracked.data[key].astype(np.array(best).dtype)
            tracked.data[key][row] = best
            tracked.data[key + ":conf"][row] = votes[best] / max(sum(votes.values()), 1e-9)

    def finish(self) -> list[dict]:
        """track_ended for every open track (camera stopping or removed). The trackers drop those tracks too and
        number on after them: fed again, they would bring an ended track back under its id (a second
        track_started for an id consumers saw end)."""
        events = []
        for head, ht in self.heads.items():
            events += [self._ended(st) for st in ht.active.values()]
            ht.active.clear()
            fresh = self._new_head(head, ht.next_id)
            if ht.linker is not None and fresh.linker is not None:
                fresh.linker.relinks = ht.linker.relinks  # a count for the camera's stats, not per tracker
            ht.tracker, ht.linker, ht.id_base = fresh.tracker, fresh.linker, fresh.id_base
        return events

    OPEN_FIELDS = ("track_id", "class", "first_frame", "last_frame", "frames", "duration_s")

    def open_rows(self) -> dict[str, list[list]]:
        """Per head, the open tracks as rows of OPEN_FIELDS (compact: the camera's status carries them every second),
        so that a run restarted after a crash can end them (``ended_from_rows``)."""
        return {h: [[ended[f] for f in self.OPEN_FIELDS] for ended in map(self._ended, ht.active.values())]
                for h, ht in self.heads.items() if ht.active}

    @staticmethod
    def ended_from_rows(rows: object) -> list[dict]:
        """track_ended fields (no ``type``) of the tracks ``open_rows`` named; what does not parse is left out: a status
        of another version must not stop the camera from starting."""
        ended = []
        for head, tracks in (rows.items() if isinstance(rows, dict) else []):
            for row in tracks if isinstance(tracks, list) else []:
                try:
                    tid, name, first, last, frames, duration = row
                    ev = {"head": str(head), "track_id": int(tid), "class": str(name), "frames": max(1, int(frames)),
                          "duration_s": max(0.0, float(duration)), "first_frame": int(first), "last_frame": int(last)}
                except (TypeError, ValueError, OverflowError):
                    continue
                if ev["track_id"] >= 0 and min(ev["first_frame"], ev["last_frame"]) >= 0 and head \
                        and math.isfinite(ev["duration_s"]):
                    ended.append(ev)
        return ended

    @staticmethod
    def _ended(st: TrackState) -> dict:
        return {"type": "track_ended", "head": st.head, "track_id": st.track_id, "class": st.class_name,
                "frames": st.frames, "duration_s": round(max(0.0, st.last_pts - st.first_pts), 3),
                "first_frame": st.first_frame, "last_frame": st.last_frame}
