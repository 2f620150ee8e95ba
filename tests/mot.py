"""Test helpers: read what the pipeline published from Redis, and score its tracks against a synthetic scene
(the scoring lives in pipeline/scoring.py, where the benchmarks use it too).

Only Redis is read, as any downstream consumer would: this is the product's output, not internals.
"""

from __future__ import annotations

import json

import redis

from pipeline.scoring import mot_scores, scene_truth

__all__ = ["mot_scores", "read_stream", "scene_truth"]


def read_stream(client: redis.Redis, key: str) -> list[dict]:
    """Every message of a Redis stream, oldest first."""
    out, low = [], "-"
    while entries := client.xrange(key, min=low, count=1000):
        out += [json.loads(fields[b"data"]) for _, fields in entries]
        low = "(" + entries[-1][0].decode()  # exclusive: continue after the last id read
    return out
