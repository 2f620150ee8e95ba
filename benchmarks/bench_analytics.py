"""Analytics against ground truth, the motion gate's savings and cost, and what a snapshot costs.

    .venv/bin/python benchmarks/bench_analytics.py --json out.json     # ~10 min on 2 busy cores

Everything runs offline (pipeline/analytics_eval.py): the demo model, the trackers, the motion gate and the
analytics exactly as a StreamActor runs them, on synthetic street scenes whose truth knows every path.
1. lines, occupancy, dwell on the held-out seeds (HELD_OUT_SEEDS; the defaults were tuned on TUNING_SEEDS) and on
   INSPECTED_SEEDS (held out until their misses were inspected);
2. the motion gate on a mostly static street (a parked car, a few passers-by): inference skipped, MOTA / IDF1
   with and without (on a skipped frame a consumer sees the last analysed frame's tracks: they are scored so);
3. a parked car in a zone for 60 s: the events it causes;
4. snapshots: render + JPEG cost and size at 640x360 and 1280x720.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import supervision as sv

from pipeline.analytics_eval import (HELD_OUT_SEEDS, INSPECTED_SEEDS, STREET_LINES, STREET_ZONES, match_tracks,
                                     parked_scene, run_frames, run_scene, score_lines, score_zones)
from pipeline.cli import positive_int
from pipeline.config import ModelConfig
from pipeline.scoring import mot_scores
from synthetic.scene import StreetScene
from workers.analytics import CameraAnalytics
from workers.analytics_settings import MotionConfig, SnapshotConfig, ZoneConfig
from workers.model_runner import ModelRunner
from workers.snapshots import Snapshotter


def accuracy(runner: ModelRunner, seeds: tuple[int, ...], frames: int, fps: float) -> dict:
    out = {}
    for seed in seeds:
        t0 = time.perf_counter()
        run = run_scene(runner, seed, frames, STREET_ZONES, STREET_LINES, fps=fps)
        matches = match_tracks(run)
        lines, zones = score_lines(run, matches), score_zones(run, matches)
        for z in zones.values():
            z.pop("dwell")
        out[seed] = {"lines": lines, "zones": zones, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"seed {seed}: " + "; ".join(
            f"line {n}: pipeline {v['pipeline']} truth(tracked) {v['truth_tracked']} |err| {v['abs_error']}"
            for n, v in lines.items()) + "; " + "; ".join(
            f"zone {n}: within 1 on {v['within_1']:.1%} of frames ({v['within_1_without_false_tracks']:.1%} without "
            f"the detector's false tracks), dwell within 0.5 s {v['dwell_within_0_5s']} (median error "
            f"{v['dwell_error_median_s']} s, {v['dwell_scored']} scored; visits carried by one track: "
            f"{v['dwell_whole_within_0_5s']} of {v['dwell_whole_visits']}, {v['split_visits']} split)"
            for n, v in zones.items()))
    return out


def motion_gate(runner: ModelRunner, seeds: tuple[int, ...], frames: int, fps: float, density: float) -> dict:
    """A mostly static street: a parked car (always there) and a few passers-by (``density``)."""
    out = {}
    for seed in seeds:
        res: dict = {}
        for name, motion in (("off", None), ("on", MotionConfig(enabled=True))):
            t0 = time.perf_counter()
            run = run_frames(runner, parked_scene(seed, frames, fps=fps, density=density), [], [], seed=seed,
                             fps=fps, motion=motion)
            scores = mot_scores(run.messages, run.truths)
            res[name] = {"skipped": run.skipped, "skip_fraction": round(run.skipped / frames, 4),
                         "MOTA": round(scores["MOTA"], 4), "IDF1": round(scores["IDF1"], 4),
                         "FN": scores["FN"], "FP": scores["FP"], "IDSW": scores["IDSW"], "TP": scores["TP"],
                         "seconds": round(time.perf_counter() - t0, 1)}
        moving = sum(1 for t in run.truths if len(t) > 1)
        res["frames"], res["frames_with_passers_by"] = frames, moving
        res["MOTA_cost"] = round(res["off"]["MOTA"] - res["on"]["MOTA"], 4)
        print(f"motion gate, seed {seed} (a parked car; passers-by in {moving}/{frames} frames): skipped "
              f"{res['on']['skip_fraction']:.1%}, MOTA {res['off']['MOTA']:.3f} -> {res['on']['MOTA']:.3f}, "
              f"IDF1 {res['off']['IDF1']:.3f} -> {res['on']['IDF1']:.3f}")
        out[seed] = res
    return out


def parked(runner: ModelRunner, seed: int, fps: float) -> dict:
    zones = [ZoneConfig(name="parking", polygon=[(0.3, 0.6), (0.7, 0.6), (0.7, 0.95), (0.3, 0.95)])]
    run = run_frames(runner, parked_scene(seed, int(60 * fps), fps=fps), zones, [], fps=fps)
    tracks = sorted({int(t) for tr in run.tracked for t in tr["vehicles"].tracker_id if t >= 0})
    events = [(e["type"], e["pts"]) for e in run.events]
    print(f"parked car, 60 s at {fps:g} fps: events {events}, vehicle tracks {tracks}")
    return {"events": events, "tracks": tracks}


def snapshot_cost(sizes=((640, 360), (1280, 720)), n: int = 30) -> dict:
    out = {}
    for w, h in sizes:
        scene = StreetScene(5, width=w, height=h)
        snap = Snapshotter(SnapshotConfig(max_width=max(w, 64)))
        analytics = CameraAnalytics(STREET_ZONES, STREET_LINES, {"people": ["person"],
                                                                 "vehicles": ["car", "bicycle"]}, (w, h))
        ms, sizes_b = [], []
        for f in range(n):
            rgb, truth = scene.step()
            det = sv.Detections(xyxy=truth.boxes.astype(float), confidence=np.ones(len(truth)),
                                class_id=truth.class_ids, tracker_id=truth.object_ids,
                                data={"class_name": np.array(["person"] * len(truth))})
            t0 = time.perf_counter()
            picture = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # what the capture thread does once per snapshot
            fields = snap.render(picture, (w, h), [det], analytics, f, f / 25, time.time())
            ms.append((time.perf_counter() - t0) * 1000)
            sizes_b.append(fields["bytes"])
        out[f"{w}x{h}"] = {"ms_p50": round(float(np.median(ms)), 2), "ms_max": round(float(np.max(ms)), 2),
                           "bytes_mean": int(np.mean(sizes_b))}
        print(f"snapshot {w}x{h}: {out[f'{w}x{h}']['ms_p50']} ms (p50), {out[f'{w}x{h}']['bytes_mean']} bytes")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--frames", type=positive_int, default=400, help="frames per seed (10 fps)")
    p.add_argument("--quick", action="store_true", help="one seed, fewer frames")
    args = p.parse_args()
    runner = ModelRunner(ModelConfig().checkpoint_path(), device="cpu", max_batch=8)
    frames = 150 if args.quick else args.frames
    results = {
        "held_out_seeds": HELD_OUT_SEEDS, "inspected_seeds": INSPECTED_SEEDS,
        "accuracy": accuracy(runner, HELD_OUT_SEEDS[:1] if args.quick else HELD_OUT_SEEDS + INSPECTED_SEEDS,
                             frames, 10.0),
        "motion_gate": motion_gate(runner, (301,) if args.quick else (301, 302), frames, 10.0, density=0.05),
        "parked": parked(runner, 7, 5.0),
        "snapshot": snapshot_cost(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
