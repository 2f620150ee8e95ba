"""Zones and lines against ground truth, with the demo model: line counts, occupancy, dwell on synthetic
streets never looked at while the defaults were chosen, and a parked car that must not make a zone chatter.

Slow (minutes: the model runs on every frame of 40 s of video per seed); `pytest -m slow`. Offline, without
Ray (pipeline/analytics_eval.py): the same classes in the same order as the StreamActor. The figures and the
reasons behind the known misses are in docs/architecture.md ("Analytics", "Accuracy").
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from pipeline.analytics_eval import (HELD_OUT_SEEDS, INSPECTED_SEEDS, STREET_LINES, STREET_ZONES, match_tracks,
                                     parked_scene, run_frames, run_scene, score_lines, score_zones)
from pipeline.config import ModelConfig
from workers.analytics_settings import ZoneConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
FRAMES, FPS = 400, 10.0

# Measured misses, each with its cause (not analytics logic: the detector and tracker it is fed). Seeds
# 301-306 are the held-out ones (fixed before any was run); 201-203 were held out until their misses were
# inspected, and are still scored.
KNOWN = {
    ("zone", 305): "94.2% of frames within 1 object; 97.8% leaving out the occupants whose track never matched "
                   "a true object (the detector's false positives); not inspected",
    ("lines", 201): "east line 'out' 28 counted against 23 tracked (tolerance 3) since the tracker uses the re-ID "
                    "head (motion only: 26); of the extra ones, car 36 (hidden at the line, visibility 0.34) is "
                    "counted a second time by another track, and a re-linked track counts a crossing bicycle 38 "
                    "never made",
    # ("zone", 203) was 93.8% in fp32, 95.0% in bf16, before fully hidden objects were in the truth (98.25% in bf16
    # since; fp32 not run again): tracks stuck to a foreground tree keep the cars it hides, which are inside.
    ("dwell", 203): "the demo model sees a car and a bicycle in a foreground tree inside the zone: tracks that "
                    "stick to it make visits seconds too long (77% of 44 within 0.5 s)",
    ("lines", 203): "east line 'in': 20 counted of 24; earlier runs traced such misses to objects coming out from "
                    "behind the tree confirmed as tracks already past the line (LineZone takes a new track's "
                    "first side as its start)",
}


# Misses only where the model runs in bf16 (OpenVINO, the CPU default where the CPU has native bf16), each a
# count or two past a bound fp32 meets at its edge. Over the nine seeds bf16 and fp32 score alike (2026-12-05:
# line counts off by 43 against 44 in all, zone occupancy within one object 96.97% against 96.72%, dwell within
# 0.5 s 94.75% against 94.77%; benchmarks/README.md, "OpenVINO in bf16 on a CPU"). Which seeds cross moves with
# bf16's rounding: the export's GroupNorm form (471687c) moved 301 past its bound and 201's dwell back within.
KNOWN_BF16 = {
    ("lines", 305): "east line 'in' 25 counted against 21 tracked (tolerance 3; fp32 3 off, at the tolerance)",
    ("lines", 301): "east line 'in' 21 counted against 16 tracked (tolerance 3; fp32 19, at the tolerance)",
}


def cases(metric: str) -> list:
    return [pytest.param(s, marks=pytest.mark.xfail(reason=KNOWN[(metric, s)])) if (metric, s) in KNOWN else s
            for s in HELD_OUT_SEEDS + INSPECTED_SEEDS]


def known_in_bf16(request, metric: str, seed: int) -> None:
    """Marks a KNOWN_BF16 miss when runner() runs the model in bf16; decided when the test runs, not at
    collection, so that collecting this file (every suite run, these tests deselected) loads no model."""
    if (metric, seed) in KNOWN_BF16 and runner().info()["autocast"] == "bf16":
        request.applymarker(pytest.mark.xfail(reason=KNOWN_BF16[(metric, seed)]))


@functools.cache
def runner():
    from workers.model_runner import ModelRunner

    return ModelRunner(ModelConfig().checkpoint_path(), device="cpu", max_batch=8)


@functools.cache
def scored(seed: int) -> tuple[dict, dict]:
    run = run_scene(runner(), seed, FRAMES, STREET_ZONES, STREET_LINES, fps=FPS)
    matches = match_tracks(run)
    return score_lines(run, matches), score_zones(run, matches)


def by_direction(line: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, counts in line["by_class"].items():
        d = out.setdefault(key.split("/")[-1], {"pipeline": 0, "truth_tracked": 0})
        d["pipeline"] += counts["pipeline"]
        d["truth_tracked"] += counts["truth_tracked"]
    return out


@pytest.mark.parametrize("seed", cases("lines"))
def test_line_counts_equal_the_true_crossings_of_tracked_objects(seed, request):
    """Tolerance per line and direction: max(3, 10%) of the true crossings of objects the pipeline tracked.
    Why not 0: the detector reports some objects twice (a car and a bicycle box; two tracks cross), and an
    object whose track is lost and re-confirmed right at the line has no side to cross from."""
    known_in_bf16(request, "lines", seed)
    lines, _ = scored(seed)
    for name, line in lines.items():
        assert line["truth_tracked"] >= 20, f"line {name}: too few crossings to judge"
        for direction, n in by_direction(line).items():
            tolerance = max(3, 0.1 * n["truth_tracked"])
            assert abs(n["pipeline"] - n["truth_tracked"]) <= tolerance, (name, direction, n)


@pytest.mark.parametrize("seed", cases("zone"))
def test_zone_occupancy_within_one_object_on_95_percent_of_frames(seed, request):
    known_in_bf16(request, "zone", seed)
    _, zones = scored(seed)
    assert zones["middle"]["within_1"] >= 0.95, zones["middle"]


@pytest.mark.parametrize("seed", cases("dwell"))
def test_dwell_within_half_a_second(seed, request):
    """Visits one track carried from entry to exit: 90% within 0.5 s. A visit split between tracks (an id
    switch the takeover did not bridge) is the tracker's error and is reported separately."""
    known_in_bf16(request, "dwell", seed)
    _, zones = scored(seed)
    z = zones["middle"]
    assert z["dwell_whole_visits"] >= 0.5 * z["true_complete_visits"], z
    assert z["dwell_whole_within_0_5s"] >= 0.9, {k: v for k, v in z.items() if k != "dwell"}
    assert np.median([d["error_s"] for d in z["dwell"]]) <= 0.25


def test_parked_car_in_a_zone_for_60_s_enters_once_and_nothing_else():
    zone = ZoneConfig(name="parking", polygon=[(0.3, 0.6), (0.7, 0.6), (0.7, 0.95), (0.3, 0.95)])
    fps = 5.0
    run = run_frames(runner(), parked_scene(7, int(60 * fps), fps=fps), [zone], [], fps=fps)
    assert sum(1 for tr in run.tracked if len(tr["vehicles"])) >= 0.9 * 60 * fps  # it is seen
    assert [e["type"] for e in run.events] == ["zone_entered"]
