"""Re-ID head: identity scores of tracking with and without appearance, and what the head costs.

    nice -n 10 .venv/bin/python benchmarks/bench_reid.py --sweep --json benchmarks/results-reid-2core.json   # ~8 min

Offline, as pipeline/analytics_eval.py runs a camera (model, trackers, per frame in a StreamActor's order), on
crowded synthetic streets (density 3: about 20 objects at once, people crossing, cars passing in front of each
other and behind poles and trees) at 10 fps. The model runs once per seed; its outputs (embeddings included)
are replayed to the two trackers, so both see exactly the same detections:
- motion only: ByteTrack as the service runs it (`tracker.appearance.enabled: false`);
- appearance: workers/appearance.py, ByteTrack whose first association also weighs the embeddings, and
  re-linking of new tracks to recently lost ones that look the same (the defaults of tracker.appearance).
MOTA / IDF1 / ID switches from pipeline/scoring.py (trackers.eval, IoU 0.5). The appearance settings were chosen
on TUNING_SEEDS only (``--sweep`` prints that sweep); HELD_OUT_SEEDS were not looked at while choosing
(except 500 and 501 under earlier defaults, printed before the final choice; docs/architecture.md, "Re-ID").
Cost: at batch 8 on frames of these streets, the model's forward pass (backbone, neck, heads, decoding) with
and without the re-ID head, timed interleaved in the same run; and the trackers' time per frame (both heads'
CameraTracker.update) in each mode.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from models.letterbox import letterbox
from models.train_reid import match_accuracy
from pipeline import analytics_eval
from pipeline.analytics_eval import run_frames
from pipeline.scoring import mot_scores
from synthetic.scene import StreetScene
from workers.model_runner import ModelRunner
from workers.settings import AppearanceConfig, TrackerConfig
from workers.tracking import CameraTracker

TUNING_SEEDS = (400, 401)
HELD_OUT_SEEDS = (500, 501, 502, 503)
# Fixed by the lead on 2026-12-02, after the merge and before any was run: fully unseen (500 and 501 were
# printed once under earlier defaults).
FRESH_SEEDS = (600, 601, 602, 603)
DENSITY, FPS, FRAMES, SIZE = 3.0, 10.0, 300, (640, 360)
DEMO = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"


class Replay:
    """A ModelRunner stand-in that returns what the real one answered, batch by batch, in the same order."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.heads, self.input_size = runner, runner.heads, runner.input_size
        self.answers: list = []
        self.recording, self.at = True, 0

    def run(self, images, heads):
        if self.recording:
            self.answers.append(self.runner.run(images, heads))
            return self.answers[-1]
        self.at += 1
        return self.answers[self.at - 1]

    def rewind(self) -> None:
        self.recording, self.at = False, 0


def frames_of(seed: int):
    scene = StreetScene(seed, width=SIZE[0], height=SIZE[1], fps=FPS, density=DENSITY)
    return (scene.step() for _ in range(FRAMES))


class TimedTracker(CameraTracker):
    """The camera's tracker, adding up the time its updates take (every head of every frame)."""

    seconds = 0.0

    def update(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return super().update(*args, **kwargs)
        finally:
            TimedTracker.seconds += time.perf_counter() - t0


def track(replay: Replay, seed: int, tracker: TrackerConfig) -> tuple[dict, float]:
    """Scores of one tracker setting on a recorded seed, and its trackers' seconds (both heads, all frames)."""
    replay.rewind()
    TimedTracker.seconds = 0.0
    with mock.patch.object(analytics_eval, "CameraTracker", TimedTracker):
        run = run_frames(replay, frames_of(seed), [], [], seed=seed, fps=FPS, size=SIZE, tracker=tracker)
    return mot_scores(run.messages, run.truths), TimedTracker.seconds


def settings(**appearance) -> TrackerConfig:
    return TrackerConfig(appearance=AppearanceConfig(**appearance))


def record(runner: ModelRunner, seed: int) -> Replay:
    replay = Replay(runner)
    run_frames(replay, frames_of(seed), [], [], seed=seed, fps=FPS, size=SIZE, tracker=settings(enabled=False))
    return replay


def compare(replay: Replay, seed: int, reid: TrackerConfig) -> dict:
    motion, t_motion = track(replay, seed, settings(enabled=False))
    linked, t_linked = track(replay, seed, reid)
    row = {"motion_only": motion, "reid": linked,
           "idf1_gain": round(linked["IDF1"] - motion["IDF1"], 4), "mota_gain": round(linked["MOTA"] - motion["MOTA"], 4),
           "tracking_ms_per_frame": {"motion_only": round(1000 * t_motion / FRAMES, 2),
                                     "reid": round(1000 * t_linked / FRAMES, 2)}}
    print(f"seed {seed}: IDF1 {motion['IDF1']:.3f} -> {linked['IDF1']:.3f}, MOTA {motion['MOTA']:.3f} -> "
          f"{linked['MOTA']:.3f}, ID switches {motion['IDSW']} -> {linked['IDSW']}, tracks {motion['tracks']} -> "
          f"{linked['tracks']}", flush=True)
    return row


def sweep(replays: dict[int, Replay]) -> list[dict]:
    """Mean IDF1 over the tuning seeds for a grid of appearance settings (the defaults were picked from it):
    appearance's weight in the first association, and the least similarity for a re-link (None: no re-linking)."""
    rows = []
    for weight, sim in itertools.product((0.0, 0.3, 0.5, 0.7), (None, 0.7, 0.8, 0.9)):
        cfg = settings(weight=weight, relink=sim is not None, min_similarity=sim or 0.8)
        scores = [track(r, s, cfg)[0] for s, r in replays.items()]
        rows.append({"weight": weight, "min_similarity": sim,
                     "IDF1": round(float(np.mean([x["IDF1"] for x in scores])), 4),
                     "MOTA": round(float(np.mean([x["MOTA"] for x in scores])), 4),
                     "IDSW": int(sum(x["IDSW"] for x in scores))})
        print(rows[-1], flush=True)
    return rows


def head_cost(runner: ModelRunner, repeats: int) -> dict:
    """ms per batch of 8 crowded frames: the model's detect() with the re-ID head, and with it taken off."""
    scene = StreetScene(HELD_OUT_SEEDS[0], width=SIZE[0], height=SIZE[1], fps=FPS, density=DENSITY)
    images = []
    for _ in range(8):
        for _ in range(5):
            frame, _ = scene.step()
        images.append(letterbox(frame, runner.input_size)[0])
    model, reid = runner.model, runner.model.reid
    x = torch.from_numpy(np.stack(images)).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"with_reid": [], "without_reid": []}
    boxes = 0
    for i in range(repeats + 2):
        for mode in ("with_reid", "without_reid"):
            model.reid = reid if mode == "with_reid" else None
            t0 = time.perf_counter()
            out = model.detect(x, score_threshold=runner.score_threshold, autocast_dtype=runner.autocast)
            if i >= 2:  # the first two rounds warm up
                times[mode].append(time.perf_counter() - t0)
            boxes = sum(len(d) for r in out for d in r.values())
    model.reid = reid
    with_ms = 1000 * statistics.median(times["with_reid"])
    without_ms = 1000 * statistics.median(times["without_reid"])
    return {"batch": 8, "boxes_in_batch": boxes, "repeats": repeats,
            "forward_ms_with_reid": round(with_ms, 2), "forward_ms_without_reid": round(without_ms, 2),
            "reid_ms_per_frame": round((with_ms - without_ms) / 8, 3),
            "reid_fraction_of_forward": round((with_ms - without_ms) / without_ms, 4),
            "frames_per_s_with_reid": round(8000 / with_ms, 1), "frames_per_s_without_reid": round(8000 / without_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEMO)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier beside other processes)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sweep", action="store_true", help="also sweep the re-linking settings on the tuning seeds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runner = ModelRunner(args.checkpoint, device="cpu", threads=args.threads)
    if runner.model.reid is None:
        raise SystemExit(f"{args.checkpoint} has no re-ID head (add one with `hydravision train-reid`)")
    result: dict = {"checkpoint": str(args.checkpoint), "machine": platform.machine(), "threads": args.threads,
                    "scene": {"density": DENSITY, "fps": FPS, "frames": FRAMES, "size": list(SIZE)},
                    "appearance_defaults": AppearanceConfig().model_dump()}
    result["cost"] = head_cost(runner, args.repeats)
    print("cost:", result["cost"], flush=True)
    replays = {s: record(runner, s) for s in TUNING_SEEDS + HELD_OUT_SEEDS + FRESH_SEEDS}
    if args.sweep:
        result["sweep"] = sweep({s: replays[s] for s in TUNING_SEEDS})
    reid = settings()
    result["tuning"] = {s: compare(replays[s], s, reid) for s in TUNING_SEEDS}
    result["held_out"] = {s: compare(replays[s], s, reid) for s in HELD_OUT_SEEDS}
    gains = [r["idf1_gain"] for r in result["held_out"].values()]
    result["held_out_idf1_gain"] = {"mean": round(float(np.mean(gains)), 4), "min": min(gains), "max": max(gains)}
    result["fresh"] = {s: compare(replays[s], s, reid) for s in FRESH_SEEDS}
    gains = [r["idf1_gain"] for r in result["fresh"].values()]
    result["fresh_idf1_gain"] = {"mean": round(float(np.mean(gains)), 4), "min": min(gains), "max": max(gains)}
    print("fresh seeds' IDF1 gain:", result["fresh_idf1_gain"])
    # the head alone: nearest-embedding identification among same-class objects 1 s apart (true boxes)
    result["match_accuracy_held_out"] = match_accuracy(runner.model, list(HELD_OUT_SEEDS), pairs=10)
    print("held-out IDF1 gain:", result["held_out_idf1_gain"], "match accuracy:", result["match_accuracy_held_out"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
