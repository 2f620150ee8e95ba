"""How the export writes GroupNorm (``models.export.GROUP_NORMS``): torch's form (Reshape, InstanceNormalization,
Reshape) against ``GroupNormForExport`` (per-channel spatial means, regrouped on the (N, C) statistics), in the
runtimes that run the export on a CPU.

    .venv/bin/python benchmarks/bench_group_norm.py --json benchmarks/results-group-norm-2core.json   # ~4 min

1. the checkpoint exported in both forms (the TorchScript exporter, as the service does);
2. OpenVINO (bf16 where the CPU runs it natively, and fp32; compiled for the batch's exact shape, as
   ``ExactShapes`` does for the sizes a session runs most) and ONNX Runtime (fp32), one thread each (what each
   of a CPU's two model processes gets), on real decoded frames at batch 1 and 8, the two forms alternating
   round by round: CPU ms per frame of the call;
3. the largest difference between the two forms' outputs on the same frames, per runtime and precision.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench_pipeline import decoded_inputs
from measure import DEMO, make_clips, save_json
from models.checkpoint import load_checkpoint
from models.export import GROUP_NORMS, export_onnx
from workers.model_runner import native_bf16, openvino_config, openvino_core


def openvino_call(path: Path, batch: int, precision: str):
    core = openvino_core()
    graph = core.read_model(str(path))
    graph.reshape({graph.inputs[0].get_any_name(): [batch, *graph.inputs[0].get_partial_shape()[1:]]})
    compiled = core.compile_model(graph, "CPU", openvino_config(precision, threads=1))
    request = compiled.create_infer_request()

    def call(images: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: images})
        return [result[o] for o in compiled.outputs]
    return call


def onnxruntime_call(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def cpu_ms_per_frame(call, images: np.ndarray, seconds: float) -> float:
    call(images)
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call(images)
        n += 1
    return (time.process_time() - c0) / (n * len(images)) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEMO)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per form, runtime, batch size and round")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-group-norm-"))
    model, _ = load_checkpoint(args.checkpoint)
    files = {form: export_onnx(model, folder / f"{form}.onnx", group_norm=form) for form in GROUP_NORMS}
    images = decoded_inputs(make_clips(Path(tempfile.gettempdir()) / "hydravision-bench-clips"),
                            tuple(model.config.input_size))
    batches = {b: np.stack([images[i % len(images)] for i in range(b)]) for b in (1, 8)}
    runtimes = [f"openvino-{p}" for p in (["bf16"] if native_bf16() else []) + ["f32"]] + ["onnxruntime"]
    calls = {(rt, b, form): (openvino_call(files[form], b, rt.split("-")[1]) if rt.startswith("openvino")
                             else onnxruntime_call(files[form]))
             for rt in runtimes for b in batches for form in GROUP_NORMS}
    ms = {rt: {b: {form: [] for form in GROUP_NORMS} for b in batches} for rt in runtimes}
    for r in range(args.rounds):
        for (rt, b, form), call in calls.items():
            ms[rt][b][form].append(round(cpu_ms_per_frame(call, batches[b], args.seconds), 3))
        print(f"round {r + 1}: CPU ms per frame {ms}", flush=True)
    diff = {}
    for rt in runtimes:
        outs = {form: calls[(rt, 8, form)](batches[8]) for form in GROUP_NORMS}
        diff[rt] = max(float(np.abs(a - b).max()) for a, b in zip(*outs.values()))
    median = {rt: {b: {f: statistics.median(v) for f, v in d.items()} for b, d in by.items()} for rt, by in ms.items()}
    ratio = {rt: {b: round(d["export"] / d["torch"], 3) for b, d in by.items()} for rt, by in median.items()}
    result = {"checkpoint": str(args.checkpoint), "cpu_ms_per_frame": ms, "cpu_ms_per_frame_median": median,
              "export_over_torch": ratio, "max_abs_diff_between_forms": diff}
    for rt in runtimes:
        print(f"{rt}, one thread, CPU ms per frame (median of {args.rounds}), torch's form / the export's: "
              + "; ".join(f"batch {b} {d['torch']:.2f} / {d['export']:.2f} ({ratio[rt][b]:.2f})"
                          for b, d in median[rt].items())
              + f"; largest output difference {diff[rt]:.3g}")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
