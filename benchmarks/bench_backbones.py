"""Backbone x neck table: CPU speed, size, what each extra head costs, and (--train) held-out synthetic mAP@0.5.

    .venv/bin/python benchmarks/bench_backbones.py --json benchmarks/results-backbones-2core.json          # ~3 min
    .venv/bin/python benchmarks/bench_backbones.py --train --json benchmarks/results-backbones-train.json  # hours
    .venv/bin/python benchmarks/bench_backbones.py --quick --train --json /tmp/b.json                       # seconds

For each combination of the default backbones (what `hydravision train --backbone ...` builds) and necks,
served as ModelRunner serves a model (BatchNorm folded, channels-last, inference mode, random weights: speed
does not depend on them), at the default 256x448 input:

- frames/s of ``detect`` with one head (backbone + neck + head + decoding and NMS) at batch 1 and 8;
- parameters of backbone, neck and one head;
- each extra head's cost as a fraction of backbone + neck (one more head's forward, batch 8), and that of a
  head on a LoRA adapter (``models/lora.py``: its adapted stages and the neck run again for its frames).

Timings alternate the combinations round by round, so a noisy machine shifts all of them alike.

``--train`` also trains each combination from scratch on synthetic scenes (``models/train.py``, heads people
and vehicles), then scores it on the held-out scenes (``models/evaluate.py``, as ``hydravision eval`` does),
and records the CPU time (the data loader's worker included) and the equivalent one-line command. With
``--out-dir``, a training that was interrupted resumes from its last saved step when the same command runs again
(``resumed_from_step`` in the JSON; the times then cover the steps from there). ``--quick`` shrinks everything (input,
repetitions, steps, held-out frames) to show that the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from measure import median_ms, save_json
from models.checkpoint import load_checkpoint
from models.evaluate import EvalConfig, evaluate
from models.hydranet import HydraNet, HydraNetConfig
from models.train import TrainConfig, train

BACKBONES = {  # the CLI's defaults for each --backbone
    "resnet": {"type": "resnet", "depth": 18, "width": 16},
    "vit": {"type": "vit"},
    "mobilenet": {"type": "mobilenet"},
}
NECKS = {"fpn": {"type": "fpn", "channels": 64}, "pan": {"type": "pan", "channels": 64}}
HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def serving_model(backbone: dict, neck: dict, size: tuple[int, int]) -> tuple[HydraNet, dict[str, int]]:
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=size, backbone=backbone, neck=neck,
                                    heads={h: {"classes": c} for h, c in HEADS.items()}))
    model.add_head("extra", ["person"])
    model.add_adapter("extra", ["extra"])  # the CLI's default: rank 4 on the last stage
    sizes = {"backbone": params(model.backbone), "neck": params(model.neck), "head": params(model.heads["people"]),
             "lora_adapter": params(model.adapters["extra"])}
    model.eval()
    model.fuse_batchnorm()
    return model.to(memory_format=torch.channels_last), sizes


def speed_jobs(model: HydraNet, size: tuple[int, int]) -> dict[str, Callable[[], object]]:
    jobs = {}
    for batch in (1, 8):
        images = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        jobs[f"detect b{batch}"] = lambda im=images: model.detect(im, [["people"]] * len(im))
    x = model.normalize(torch.randint(0, 256, (8, 3, *size), dtype=torch.uint8)).contiguous(
        memory_format=torch.channels_last)
    feats = model.features(x)
    lora = model.adapters["extra"]
    carry = model.backbone.begin(x, lora.start)
    jobs["backbone+neck b8"] = lambda: model.features(x)
    jobs["head b8"] = lambda: model.heads["people"](feats)
    jobs["lora path b8"] = lambda: model.neck(lora.finish(model.backbone, carry, lora.start))
    return jobs


def measure_speed(combos: dict[str, tuple[dict, dict]], size: tuple[int, int], rounds: int, reps: int) -> dict:
    models, sizes, jobs = {}, {}, {}
    with torch.inference_mode():
        for name, (backbone, neck) in combos.items():
            models[name], sizes[name] = serving_model(backbone, neck, size)
            jobs[name] = speed_jobs(models[name], size)
        samples = {name: {k: [] for k in j} for name, j in jobs.items()}
        for r in range(rounds):
            for name, j in jobs.items():
                for k, fn in j.items():
                    samples[name][k].append(median_ms(fn, reps))
            print(f"round {r + 1}/{rounds} done", flush=True)
    out = {}
    for name, s in samples.items():
        ms = {k: float(np.median(v)) for k, v in s.items()}
        base = ms["backbone+neck b8"]
        out[name] = {"params": sizes[name],
                     "frames_per_s": {"1": round(1000 / ms["detect b1"], 1), "8": round(8000 / ms["detect b8"], 1)},
                     "ms_batch8": {k.removesuffix(" b8"): round(v, 2) for k, v in ms.items() if k.endswith("b8")},
                     "extra_head_fraction": round(ms["head b8"] / base, 3),
                     "lora_head_fraction": round((ms["head b8"] + ms["lora path b8"]) / base, 3)}
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children: the data loader's worker generates the scenes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def train_and_score(name: str, backbone: dict, neck: dict, size: tuple[int, int], steps: int, batch: int,
                    eval_cfg: EvalConfig, folder: Path, workers: int) -> dict:
    out = folder / f"{name.replace('+', '-')}.safetensors"
    cfg = TrainConfig(out=out, heads=HEADS, input_size=size, backbone=backbone, neck=neck, steps=steps,
                      batch_size=batch, warmup_steps=min(200, max(1, steps // 10)), seed=0, workers=workers)
    cpu0, t0 = cpu_seconds(), time.time()
    train(cfg, progress=False)
    gc.collect()  # the DataLoader's worker is joined (and so counted by RUSAGE_CHILDREN) once its loader is freed
    cpu, wall = cpu_seconds() - cpu0, time.time() - t0
    model, meta = load_checkpoint(out)
    # a run interrupted earlier resumed from its state file (models/train.py); these times cover the rest only
    resumed = meta["history"][-1].get("resumed_from_step", 0)
    report = evaluate(model, eval_cfg)
    options = " ".join(f"--{k} {v}" for k, v in backbone.items() if k != "type")
    return {"steps": steps, "batch_size": batch, **({"resumed_from_step": resumed} if resumed else {}),
            "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
            "map50": {h: r["map50"] for h, r in report["heads"].items()}, "eval_frames": report["frames"],
            "command": (f"hydravision train --out {out.name} --backbone {backbone['type']} {options} --neck "
                        f"{neck['type']} --head people=person --head vehicles=car,bicycle --steps {steps} "
                        f"--batch-size {batch} --input-size {size[0]}x{size[1]} && hydravision eval --checkpoint "
                        f"{out.name}").replace("  ", " ")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", choices=sorted(BACKBONES), default=list(BACKBONES))
    p.add_argument("--necks", nargs="+", choices=sorted(NECKS), default=list(NECKS))
    p.add_argument("--rounds", type=int, default=5, help="rounds over all combinations")
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement per round")
    p.add_argument("--train", action="store_true", help="also train each combination and score it (long)")
    p.add_argument("--steps", type=int, default=5000, help="--train: steps per combination (the demo's base: 5000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny everything: proves the script runs, nothing more")
    p.add_argument("--out-dir", type=Path, default=None, help="--train: where checkpoints go (default: a temp dir)")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true",
                   help="keep the other combinations already in --json (one training run per combination fills one file)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    size = (128, 224) if args.quick else (256, 448)
    rounds, reps = (1, 2) if args.quick else (args.rounds, args.reps)
    combos = {f"{b}+{n}": (BACKBONES[b], NECKS[n]) for b in args.backbones for n in args.necks}
    result = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "quick": args.quick,
              "input_size": list(size), "combos": measure_speed(combos, size, rounds, reps)}
    for name, (backbone, neck) in combos.items():
        result["combos"][name].update(backbone=backbone, neck=neck)
    if args.keep and args.json and Path(args.json).exists():
        kept = {k: v for k, v in json.loads(Path(args.json).read_text())["combos"].items() if k not in combos}
        result["combos"] = {**kept, **result["combos"]}
    if args.train:
        steps, batch = (4, 2) if args.quick else (args.steps, args.batch_size)
        eval_cfg = EvalConfig(scenes=1, frames_per_scene=4) if args.quick else EvalConfig()
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.out_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            for name, (backbone, neck) in combos.items():
                result["combos"][name]["train"] = train_and_score(name, backbone, neck, size, steps, batch,
                                                                  eval_cfg, folder, 0 if args.quick else 1)
                print(f"{name}: {result['combos'][name]['train']}", flush=True)
                save_json(args.json, result)  # partial results survive an interrupted multi-hour run
    print(f"\ninput {size[0]}x{size[1]}{' (quick: figures mean nothing)' if args.quick else ''}")
    print(f"{'combo':<16}{'b1 f/s':>8}{'b8 f/s':>8}{'backbone':>10}{'neck':>8}{'+head':>7}{'+lora':>7}  mAP@0.5")
    for name, r in result["combos"].items():
        maps = ", ".join(f"{h} {v:.3f}" for h, v in r.get("train", {}).get("map50", {}).items())
        print(f"{name:<16}{r['frames_per_s']['1']:>8}{r['frames_per_s']['8']:>8}{r['params']['backbone']:>10,}"
              f"{r['params']['neck']:>8,}{r['extra_head_fraction']:>7.1%}{r['lora_head_fraction']:>7.1%}  {maps}")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
