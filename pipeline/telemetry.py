"""What the controller knows about its actors, kept for /metrics, /healthz and /readyz (pipeline/metrics.py).

The controller already asks every actor for stats() on each tick of its loop; Telemetry keeps the latest
answers and makes their counters cumulative over the service's life: an actor that Ray restarts starts its
counters from zero, so each source (a camera, an inference replica) keeps a base of what its previous
processes had counted, and a restart adds the last values seen from the old process to it. Counters never
go backwards on /metrics, and Prometheus sees no reset (what a dead process counted after the last tick is
unknown and not counted; a camera's frames that were in its slot or in flight at that tick are counted once,
as outcome ``lost``). Everything here runs in the controller's process; the HTTP server reads snapshots.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# A frame's outcome, as in CameraPipeline.stats()["dropped"] (docs/architecture.md "Counting frames").
DROP_OUTCOMES = ("rate", "budget", "overload", "error", "shutdown")
REJECT_REASONS = ("shed", "expired", "cancelled")  # the Batcher's requests answered without computing
UP_STATES = ("running",)
ENDED = "ended"  # a file camera's source ended: done, not down (an update may start it again)
ROLES = ("stream", "inference")
# A camera's cumulative counts outside its frame outcomes, kept over its processes for the whole-run figures.
CAMERA_COUNTS = ("decoded", "submitted", "reconnects", "watchdog_restarts", "capture_crashes", "skipped_packets")
# Its Publisher's cumulative counts (stats()["publisher"]) by their counter's name; the rest of them (queued,
# connected, failing...) are its state now.
PUBLISHER_COUNTS = {"sent": "redis.sent", "retries": "redis.errors", "dropped": "redis.dropped",
                    "rejected": "redis.rejected", "reconnects": "redis.reconnects", "round_trips": "redis.round_trips"}


def _hist(out: dict[str, float], prefix: str, snapshot: dict | None) -> None:
    if snapshot:
        for i, n in enumerate(snapshot["counts"]):
            out[f"{prefix}.b{i}"] = n
        out[f"{prefix}.sum"] = snapshot["sum"]


def camera_counters(s: dict) -> dict[str, float]:
    """The cumulative numbers of one camera's stats(), flat: what a restart of its actor would reset."""
    out: dict[str, float] = {k: s.get(k, 0) for k in CAMERA_COUNTS}
    out.update({"outcome.published": s.get("published", 0), "outcome.skipped": s.get("skipped", 0)})
    for reason, n in (s.get("dropped") or {}).items():
        out[f"outcome.{reason}"] = n
    _hist(out, "age", s.get("frame_age"))
    pub = s.get("publisher") or {}
    out.update({key: pub.get(name, 0) for name, key in PUBLISHER_COUNTS.items()})
    for action, n in ((s.get("budget") or {}).get("actions") or {}).items():
        out[f"budget.{action}"] = n
    return out


def inference_counters(s: dict) -> dict[str, float]:
    """The cumulative numbers of one inference replica's stats(), flat. Counters another version of the
    Batcher may not have are read with .get (absent: not exported)."""
    out: dict[str, float] = {"batches": s.get("batches", 0), "frames": s.get("frames", 0)}
    for size, n in (s.get("batch_sizes") or {}).items():
        out[f"bs.{int(size)}"] = n
    for head, n in (s.get("head_frames") or {}).items():
        out[f"head_frames.{head}"] = n
    for reason in REJECT_REASONS:
        if reason in s:
            out[f"rejected.{reason}"] = s[reason]
    _hist(out, "wait", s.get("batch_wait"))
    _hist(out, "bsec", s.get("batch_seconds"))
    for head, snap in (s.get("head_seconds") or {}).items():
        _hist(out, f"head.{head}", snap)
    return out


@dataclass
class Accumulated:
    """Counters of one source that survive restarts of the process reporting them."""

    base: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    incarnation: Any = None
    run: Any = None  # which run of the camera in that process (CameraHost.runs): a file started again by an update

    # Counters of a part a live update replaces while the camera runs on (the frame-age budget): one that goes
    # backwards started again from 0, which is no restart of the process (that doubled all the camera's totals).
    REPLACEABLE = ("budget.",)
    # Counters of a part that outlives the camera's pipeline in its process (its Publisher): a pipeline started
    # again in the same process (a file camera updated after it ended) counts from 0, these count on (folding
    # them too doubled redis_errors_total and redis_messages_dropped_total).
    PROCESS_LIVED = ("redis.",)

    def update(self, incarnation: Any, values: dict[str, float], run: Any = None) -> bool:
        """True when this is a new process (another pid, or a counter it reports went backwards): its
        predecessor's last values are folded into the base first (in the same process, all but PROCESS_LIVED
        that did not go backwards). A counter missing from the same process's values went away with what
        counted it (the frame-age budget a live update drops): its last value is folded into the base, so it
        keeps its total and counts on from there if it comes back; so is one of REPLACEABLE that went
        backwards (replaced between two reads). ``run``: another run in the same process is a restart too, said
        by it and not only by counters going backwards (the new run of a short file had counted past the old one's
        totals by the next tick, and those vanished from /metrics)."""
        backwards = {k for k, v in self.last.items() if k in values and values[k] < v}
        new_process = self.incarnation is not None and incarnation != self.incarnation
        new_run = self.incarnation is not None and self.run is not None and run is not None and run != self.run
        restarted = new_process or new_run or (self.incarnation is not None
                                               and any(not k.startswith(self.REPLACEABLE) for k in backwards))
        gone = {k: v for k, v in self.last.items() if new_process or k not in values or k in backwards
                or (restarted and not k.startswith(self.PROCESS_LIVED))}
        self.add(gone)
        self.incarnation, self.run, self.last = incarnation, run, dict(values)
        return restarted

    def add(self, totals: dict[str, float]) -> None:
        for k, v in totals.items():
            self.base[k] = self.base.get(k, 0) + v

    def value(self, key: str) -> float:
        return self.base.get(key, 0) + self.last.get(key, 0)

    def keys(self) -> set[str]:
        return set(self.base) | set(self.last)

    def histogram(self, prefix: str, edges: tuple[float, ...]) -> dict | None:
        if f"{prefix}.sum" not in self.keys():
            return None
        return {"edges": list(edges), "counts": [int(self.value(f"{prefix}.b{i}")) for i in range(len(edges) + 1)],
                "sum": self.value(f"{prefix}.sum")}


@dataclass
class CameraRecord:
    stats: dict = field(default_factory=dict)  # the latest stats() (or "unavailable")
    counters: Accumulated = field(default_factory=Accumulated)
    lost: int = 0  # frames a dead process held (slot + in flight) at its last report
    first_seen: float = 0.0
    down_since: float | None = None  # not running since (None: running now)
    last_frame_ts: float | None = None  # the latest reported: an unavailable actor or a new decoder reports none


@dataclass
class ReplicaRecord:
    stats: dict = field(default_factory=dict)
    counters: Accumulated = field(default_factory=Accumulated)
    seen_at: float | None = None  # last time it answered
    answering: bool = False  # it answered the controller's latest call


@dataclass
class Snapshot:
    """A consistent copy for one scrape or probe."""

    taken_at: float
    last_tick: float | None
    cameras: dict[str, CameraRecord]
    replicas: dict[int | str, ReplicaRecord]  # replica index, or a camera process's name (its own model)
    retired: Accumulated  # the counters of models that have gone: the sums over models include them
    restarts: dict[str, int]
    publishers: dict[str, dict]


class Telemetry:
    """Fed by the controller's loop (App.stats), read by the HTTP server's threads; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        # Monotonic: the times here are only compared with each other (loop age, time down), and a step of the
        # wall clock (NTP at an edge box's boot, a VM resumed) made /healthz fail or a down camera look ready.
        self.clock = clock
        self._lock = threading.Lock()
        self._cameras: dict[str, CameraRecord] = {}
        self._replicas: dict[int | str, ReplicaRecord] = {}
        self._retired = Accumulated()
        self._restarts: collections.Counter[str] = collections.Counter({role: 0 for role in ROLES})
        self._publishers: dict[str, dict] = {}
        self.last_tick: float | None = None

    def record_cameras(self, stats: Iterable[dict], present: Iterable[str] | None = None,
                       final: bool = False, tick: bool = True) -> None:
        """One tick's camera stats. ``present``: the cameras the service has now; others' series are dropped
        (a removed camera disappears from /metrics). ``final``: stats of a stop, which name no pid: they are of the
        process seen last (one whose counters went backwards is still told for a new one). ``tick``: from the
        control loop, whose age /healthz reads (a removal's final stats are not: each one made a wedged loop live)."""
        now = self.clock()
        with self._lock:
            for s in stats:
                cid = s.get("camera")
                if not cid:
                    continue
                rec = self._cameras.get(cid)
                if rec is None:
                    rec = self._cameras[cid] = CameraRecord(first_seen=now, down_since=now)
                previous, rec.stats = rec.stats.get("state"), dict(s)
                rec.last_frame_ts = s.get("last_frame_ts") or rec.last_frame_ts
                pid = s.get("pid", rec.counters.incarnation if final else None)
                if "decoded" in s and pid is not None:  # a started pipeline (not "created"/"unavailable")
                    before = dict(rec.counters.last)
                    if rec.counters.update(pid, camera_counters(s), s.get("run", rec.counters.run if final else None)):
                        rec.lost += int(self._held(before))
                if s.get("state") in UP_STATES:
                    rec.down_since = None
                elif rec.down_since is None or (previous == ENDED and s.get("state") != ENDED):
                    # A file started again by an update is down from the new run's start: timed from the old run's
                    # end (maybe hours ago), /readyz read it past its stall budget while it opened.
                    rec.down_since = now
            if present is not None:
                keep = set(present)
                for cid in [c for c in self._cameras if c not in keep]:
                    del self._cameras[cid]
            if tick:
                self.last_tick = now

    def forget(self, camera: str) -> None:
        """Drops a removed camera's record at once: the same id added again before the next tick was taken for a
        restart of the removed one's process, and its run's counts were folded into the new camera's."""
        with self._lock:
            self._cameras.pop(camera, None)

    def whole_run(self, stats: Iterable[dict]) -> list[dict]:
        """Camera stats (recorded here already) with their counts over the service's life, as /metrics has
        them: a camera process Ray restarted counts from 0 again, and the final table said "published 218" after
        1284 before the crash. Frames a dead process held are ``dropped.lost``, so the counts still add up. Every
        count is whole-run (frame outcomes, CAMERA_COUNTS, the publisher's PUBLISHER_COUNTS: "submitted" 1535
        stood beside "published" 2010); what is there now stays the last process's (in_slot, in_flight, fps,
        the publisher's queued, connected, failing), as do analytics, appearance and budget."""
        with self._lock:
            out = []
            for s in stats:
                rec = self._cameras.get(s.get("camera"))
                if rec is None or not rec.counters.keys():
                    out.append(s)
                    continue
                c = rec.counters
                s = {**s, **{k: int(c.value(k)) for k in CAMERA_COUNTS},
                     "published": int(c.value("outcome.published")), "skipped": int(c.value("outcome.skipped"))}
                if isinstance(pub := s.get("publisher"), dict):  # the counts it carries
                    whole = {k: int(c.value(key)) for k, key in PUBLISHER_COUNTS.items() if k in pub}
                    s["publisher"] = {**pub, **whole}
                reasons = {k.split(".", 1)[1] for k in c.keys() if k.startswith("outcome.")} - {"published", "skipped"}
                s["dropped"] = {r: int(c.value(f"outcome.{r}")) for r in [*DROP_OUTCOMES, *sorted(reasons)]
                                if r in reasons}
                if rec.lost:
                    s["dropped"]["lost"] = rec.lost
                out.append(s)
            return out

    @staticmethod
    def _held(last: dict[str, float]) -> float:
        """Frames a process had decoded but given no outcome at its last report (slot + in flight)."""
        outcomes = sum(v for k, v in last.items() if k.startswith("outcome."))
        return max(0.0, last.get("decoded", 0) - outcomes)

    def record_inference(self, index: int | str, stats: dict | None, gone: bool = False) -> None:
        """One replica's stats (or a camera process's model's, by the process's name), or None when it did not
        answer (restarting, or busy past the timeout). ``gone``: it did not answer because its process died: its
        gauges (queue depth, batch limit) go until a new process answers, counters stay; a slow one's stay."""
        with self._lock:
            rec = self._replicas.setdefault(index, ReplicaRecord())
            rec.answering = stats is not None
            if stats is None:
                if gone:
                    rec.stats = {}
                return
            rec.stats, rec.seen_at = dict(stats), self.clock()
            rec.counters.update(stats.get("pid"), inference_counters(stats))

    def keep_inference(self, keys: Iterable) -> None:
        """Only these models' records stay (a camera process that ran its own model and has ended). What a
        model that goes had counted stays in the sums over models (``retired``): they never go backwards."""
        with self._lock:
            keep = set(keys)
            for key in [k for k in self._replicas if k not in keep]:
                gone = self._replicas.pop(key).counters
                self._retired.add({k: gone.value(k) for k in gone.keys()})

    def record_restart(self, role: str) -> None:
        with self._lock:
            self._restarts[role] += 1

    def record_publisher(self, name: str, stats: dict) -> None:
        """A publisher living in the controller's own process (its events): no restarts to account for."""
        with self._lock:
            self._publishers[name] = dict(stats)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self.clock(), self.last_tick, copy.deepcopy(self._cameras),
                            copy.deepcopy(self._replicas), copy.deepcopy(self._retired), dict(self._restarts),
                            copy.deepcopy(self._publishers))
