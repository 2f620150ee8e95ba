"""Fixed-bucket histograms that actors keep and report in stats(); the controller turns them into Prometheus
histograms (pipeline/metrics.py).

Written by hand rather than with prometheus-client's Histogram because the numbers are made in the actors and
exported by the controller: a snapshot here is a plain dict that crosses Ray and adds up across processes and
restarts. The bucket edges are shared constants, so every actor's snapshot of one metric has the same buckets.
No torch, no Ray: StreamActors import this.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Sequence

# Upper bounds (Prometheus "le"), seconds unless said otherwise; +Inf is implicit.
FRAME_AGE_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HEAD_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # frames per batch, not seconds


class Histogram:
    """Counts of observations per bucket (not cumulative; the last count is above every edge) and their sum."""

    def __init__(self, edges: Sequence[float]):
        if list(edges) != sorted(set(edges)):
            raise ValueError(f"bucket edges must be strictly increasing, got {list(edges)}")
        self.edges = tuple(float(e) for e in edges)
        self.counts = [0] * (len(self.edges) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to an edge belongs to that edge's bucket (Prometheus' "less or equal").
        self.counts[bisect.bisect_left(self.edges, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.observe(v)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict:
        """{"edges": [...], "counts": [... one more than edges], "sum": float}: JSON-able, pickles across Ray."""
        return {"edges": list(self.edges), "counts": list(self.counts), "sum": self.sum}


def from_counts(values: dict[int, int], edges: Sequence[float]) -> dict:
    """A snapshot from {value: occurrences} of an integer quantity (the model's batch sizes)."""
    h = Histogram(edges)
    for value, n in values.items():
        h.counts[bisect.bisect_left(h.edges, value)] += n
        h.sum += value * n
    return h.snapshot()


def merge(snapshots: Iterable[dict | None]) -> dict | None:
    """Sum of snapshots with the same edges (several replicas, or a process and its restarted successor)."""
    out: dict | None = None
    for s in snapshots:
        if not s:
            continue
        if out is None:
            out = {"edges": list(s["edges"]), "counts": list(s["counts"]), "sum": float(s["sum"])}
            continue
        if list(s["edges"]) != out["edges"]:
            raise ValueError(f"cannot merge histograms with different buckets: {s['edges']} vs {out['edges']}")
        out["counts"] = [a + b for a, b in zip(out["counts"], s["counts"])]
        out["sum"] += s["sum"]
    return out


def cumulative(snapshot: dict) -> list[tuple[float, int]]:
    """Prometheus buckets: [(le, observations <= le), ..., (inf, all observations)]."""
    out, total = [], 0
    for edge, n in zip(list(snapshot["edges"]) + [float("inf")], snapshot["counts"]):
        total += n
        out.append((float(edge), total))
    return out
