"""Which of torch's ONNX exporters the ONNX Runtime backend should use: export time, then the graph's speed and
outputs in ONNX Runtime.

    .venv/bin/python benchmarks/bench_export.py --json benchmarks/results-export-2core.json   # ~2 min

1. each exporter (``models.export.EXPORTERS``) exports the checkpoint in a fresh process, as a first start
   or `hydravision export` does (the time of the export call, its lazy imports included), ``--exports`` times
   each, alternating;
2. ONNX Runtime runs both graphs with one thread (what each of a CPU's two replicas gets) on real decoded
   frames at batch 1 and 8, alternating round by round: CPU ms per frame;
3. every output of both graphs on the same frames: the largest absolute difference.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench_pipeline import decoded_inputs
from measure import DEMO, ROOT, make_clips, save_json
from models.export import EXPORTERS

EXPORT_ONE = """
import sys, time
from models.checkpoint import load_checkpoint
from models.export import export_onnx
model, _ = load_checkpoint(sys.argv[1])
t0 = time.perf_counter()
export_onnx(model, sys.argv[2], sys.argv[3])
print(time.perf_counter() - t0)
"""


def export_seconds(checkpoint: Path, out: Path, exporter: str) -> float:
    done = subprocess.run([sys.executable, "-c", EXPORT_ONE, str(checkpoint), str(out), exporter], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cpu_ms_per_frame(s: ort.InferenceSession, batch: np.ndarray, seconds: float) -> float:
    s.run(None, {"images": batch})
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.run(None, {"images": batch})
        n += 1
    return (time.process_time() - c0) / (n * len(batch)) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--exports", type=int, default=3, help="exports per exporter")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per exporter, batch size and round")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-export-"))
    files = {e: folder / f"{e}.onnx" for e in EXPORTERS}
    times: dict[str, list[float]] = {e: [] for e in EXPORTERS}
    for i in range(args.exports):
        for e in EXPORTERS:
            times[e].append(round(export_seconds(args.checkpoint, files[e], e), 2))
            print(f"export {i + 1}, {e}: {times[e][-1]} s", flush=True)
    sessions = {e: session(f) for e, f in files.items()}
    h, w = sessions[EXPORTERS[0]].get_inputs()[0].shape[2:]
    images = decoded_inputs(make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips"), (h, w))
    batches = {b: np.stack([images[i % len(images)] for i in range(b)]) for b in (1, 8)}
    ms: dict = {b: {e: [] for e in EXPORTERS} for b in batches}
    for r in range(args.rounds):
        for b, batch in batches.items():
            for e, s in sessions.items():
                ms[b][e].append(round(cpu_ms_per_frame(s, batch, args.seconds), 2))
        print(f"round {r + 1}: CPU ms per frame {ms}", flush=True)
    outs = {e: s.run(None, {"images": batches[8]}) for e, s in sessions.items()}
    names = [o.name for o in sessions[EXPORTERS[0]].get_outputs()]
    diff = {n: float(np.abs(a - b).max()) for n, a, b in zip(names, *outs.values())}
    result = {
        "checkpoint": str(args.checkpoint),
        "export_s": times, "export_s_median": {e: statistics.median(t) for e, t in times.items()},
        "file_mb": {e: round(f.stat().st_size / 1e6, 2) for e, f in files.items()},
        "cpu_ms_per_frame": ms,
        "cpu_ms_per_frame_median": {b: {e: statistics.median(v) for e, v in d.items()} for b, d in ms.items()},
        "max_abs_diff": max(diff.values()), "max_abs_diff_by_output": diff,
    }
    base, new = EXPORTERS[1], EXPORTERS[0]
    print(f"export, median of {args.exports}: {result['export_s_median']} s "
          f"({result['export_s_median'][base] / result['export_s_median'][new]:.1f}x faster: {new})")
    print(f"ONNX Runtime, one thread, CPU ms per frame (median of {args.rounds}): {result['cpu_ms_per_frame_median']}")
    print(f"largest difference between the graphs' outputs: {result['max_abs_diff']:.3g}")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
