"""What one more head costs next to the shared backbone + neck, for each head design (how the default was chosen).

    .venv/bin/python benchmarks/bench_heads.py --json benchmarks/results-heads-2core.json    # ~1 min

On the demo checkpoint's real backbone + neck (BatchNorm folded, channels-last, as ModelRunner serves it),
a batch of 8 letterboxed frames: the median time of backbone + neck, of each of the checkpoint's heads,
and of fresh heads of every tower design and depth (forward only; decoding and NMS are not a head's cost:
they run per head on its few candidates). Timings alternate designs round by round, so a noisy machine
shifts all of them alike; the ratios to backbone + neck are what to read.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from measure import median_ms, save_json
from models.heads import TOWERS, DetectionHead, HeadConfig
from models.postprocess import postprocess
from pipeline.model_commands import DEMO_CHECKPOINT
from workers.model_runner import ModelRunner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="rounds over all designs")
    p.add_argument("--reps", type=int, default=10, help="timed calls per design per round")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    runner = ModelRunner(args.checkpoint, device="cpu", threads=os.cpu_count(), backend="torch")  # hooks time heads
    model = runner.model
    h, w = runner.input_size
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, h, w), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    c = model.neck.out_channels
    designs = {f"{tower} x{n}": DetectionHead(c, model.strides, HeadConfig(["a", "b"], tower=tower, tower_convs=n))
               for tower in TOWERS if tower != "split" for n in (1, 2, 3)}
    for head in designs.values():
        head.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        x = model.normalize(images)
        feats = model.features(x)
        points = model.points(feats)
        jobs = {"backbone+neck": lambda: model.features(x)}
        jobs.update({f"head {n}": (lambda hd=hd: hd(feats)) for n, hd in model.heads.items()})
        jobs.update({f"design {n}": (lambda hd=hd: hd(feats)) for n, hd in designs.items()})
        first = next(iter(model.heads.values()))
        raw = first(feats)
        jobs["decode + NMS, one head"] = lambda: postprocess(raw, points, (h, w), first.config.score_threshold)
        samples: dict[str, list[float]] = {k: [] for k in jobs}
        for r in range(args.rounds):
            for name, fn in jobs.items():
                samples[name].append(median_ms(fn, args.reps))
            print(f"round {r + 1}/{args.rounds}: backbone+neck {samples['backbone+neck'][-1]:.1f} ms", flush=True)
    ms = {k: round(float(np.median(v)), 2) for k, v in samples.items()}
    base = ms["backbone+neck"]
    split = {k: v for k, v in ms.items() if not k.startswith("design")}
    out = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "checkpoint": args.checkpoint,
           "batch": args.batch, "input_size": [h, w], "split": split,
           "head_fraction_of_backbone_neck": {k: round(v / base, 3) for k, v in ms.items() if k.startswith(("head", "design"))},
           "designs_ms": {k.removeprefix("design "): v for k, v in ms.items() if k.startswith("design")}}
    print(f"\nbatch {args.batch}, input {h}x{w}: backbone+neck {base:.1f} ms")
    for k, v in ms.items():
        if k != "backbone+neck":
            print(f"  {k:<26}{v:>7.2f} ms  {v / base:>6.1%} of backbone+neck")
    save_json(args.json, out)


if __name__ == "__main__":
    main()
