"""model.backend: openvino gives torch's detections in fp32 and keeps them, and the demo model's scores, within a
stated tolerance in bf16 and int8; auto picks it only where the CPU runs bf16 natively."""

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from models import quantize
from models.checkpoint import save_checkpoint
from models.export import cache_path
from models.hydranet import ConfigError as ModelConfigError
from models.postprocess import box_iou
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, parse_config
from pipeline.model_commands import DEMO_CHECKPOINT
from tests.test_onnx_backend import assert_same, cache, frames, one_head_model  # noqa: F401 (cache: a fixture)
from workers import model_runner
from workers.model_runner import ExactShapes, ModelRunner, pick_backend

# What bf16 may change, against torch in fp32 on the demo model: a detection the fp32 model is sure of
# (score >= 0.3) is found again, same class, its box within IoU 0.9 and its score within 0.05; the mAPs move by
# under 0.01 (measured: 0.0013 at most, benchmarks/README.md).
SURE, BOX_IOU, SCORE_DIFF, MAP_DIFF = 0.3, 0.9, 0.05, 0.01
# int8 moves single boxes more: 9 in 10 of those detections within the same bounds, every one within IoU 0.5
# (measured on these frames: 75 of 78, the worst at IoU 0.63; the mAPs within 0.004 of fp32's).
INT8_WITHIN, INT8_IOU = 0.9, 0.5


def test_openvino_in_fp32_gives_the_detections_torch_gives_on_the_demo_model(cache):
    images = frames((256, 448))
    heads = [None, ["people"], ["vehicles"]]
    eager = ModelRunner(DEMO_CHECKPOINT, device="cpu", score_threshold=0.05, backend="torch").run(images, heads)
    runner = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision="fp32", score_threshold=0.05, backend="openvino")
    assert runner.info()["backend"] == "openvino" and runner.info()["autocast"] == "fp32"
    assert_same(eager, runner.run(images, heads))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_openvino_finds_what_fp32_is_sure_of(cache, precision):
    images = frames((256, 448), n=8)
    eager = ModelRunner(DEMO_CHECKPOINT, device="cpu", score_threshold=0.05, backend="torch").run(images, [None] * 8)
    runner = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision=precision, score_threshold=0.05, backend="openvino")
    assert runner.info()["autocast"] == precision
    got = runner.run(images, [None] * 8)
    ious, score_diffs = [], []
    for want, have in zip(eager, got):
        for head, w in want.items():
            h = have[head]
            keep = w["scores"] >= SURE
            if not keep.any():
                continue
            iou = box_iou(torch.from_numpy(w["boxes"][keep]), torch.from_numpy(h["boxes"])).numpy()
            iou[w["class_ids"][keep][:, None] != h["class_ids"][None, :]] = 0  # a box of another class is no match
            ious += list(iou.max(1))
            score_diffs += list(np.abs(h["scores"][iou.argmax(1)] - w["scores"][keep]))
    assert len(ious) >= 10  # the frames hold enough objects for this to say something
    within = (np.array(ious) >= BOX_IOU) & (np.array(score_diffs) <= SCORE_DIFF)
    if precision == "bf16":
        assert within.all(), (ious, score_diffs)
    else:
        assert within.mean() >= INT8_WITHIN and min(ious) >= INT8_IOU, (ious, score_diffs)


EVAL_ARGS = ["eval", "--scenes", "2", "--frames", "12", "--json", "--no-progress"]


@pytest.fixture(scope="module")
def fp32_eval(cache) -> dict:
    """`hydravision eval` with torch in fp32: the reference both precisions are scored against, run once."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(EVAL_ARGS) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_openvino_scores_the_demo_model_as_fp32_does(cache, capsys, fp32_eval, precision):
    """`hydravision eval --backend` scores through the serving path: the tolerance check a user can run."""
    reference = fp32_eval
    assert cli_main([*EVAL_ARGS, "--backend", "openvino", "--precision", precision]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (reference["backend"], reference["precision"]) == ("torch", "fp32")
    assert (got["backend"], got["precision"]) == ("openvino", precision)
    assert got["frames"] == reference["frames"] == 24
    for head, r in reference["heads"].items():
        assert r["map50"] > 0.5  # the demo model finds its objects: a tolerance on noise would say nothing
        assert abs(got["heads"][head]["map50"] - r["map50"]) < MAP_DIFF, (head, got["heads"][head], r)
        assert abs(got["heads"][head]["map50_95"] - r["map50_95"]) < MAP_DIFF, (head, got["heads"][head], r)


def test_int8_runs_the_convolutions_on_int8_kernels_and_is_quantized_once(cache, monkeypatch):
    runner = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision="int8", threads=1)  # auto backend: openvino
    assert runner.info()["backend"] == "openvino" and runner.info()["autocast"] == "int8"
    # quantized from the export with torch's GroupNorm (models/export.py: GroupNormForExport)
    assert runner.session.path == quantize.int8_path(cache_path(DEMO_CHECKPOINT, "torch")) and runner.session.path.is_file()
    runtime = runner.session.dynamic[2].get_runtime_model()
    convs = [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ops()
             if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "GroupConvolution")]
    int8 = sum(c in ("u8", "i8") for c in convs)  # the input's type: uint8 activations, int8 weights
    assert convs and int8 >= 0.9 * len(convs), convs  # a quantizer that did nothing: all bf16 or f32
    monkeypatch.setattr(quantize, "quantize", lambda *a: pytest.fail("quantized again"))
    again = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision="int8", threads=1)
    assert again.session.path == runner.session.path


def test_int8_calibrates_on_the_training_data_the_checkpoint_names_or_says_why_not(tmp_path):
    model = one_head_model()
    frames_ = quantize.calibration_frames(model, [{"data": "synthetic"}], n=4)
    assert len(frames_) == 4 and all(f.shape == (3, *model.config.input_size) and f.dtype == np.uint8 for f in frames_)
    assert all((a == b).all() for a, b in zip(frames_, quantize.calibration_frames(model, [{"data": "synthetic"}], n=4)))
    with pytest.raises(ModelConfigError, match=r"this checkpoint's history names none \(e.g. imported weights\)"):
        quantize.calibration_frames(model, [{"imported_backbone": "x.pth"}])
    gone = tmp_path / "gone"
    with pytest.raises(ModelConfigError, match=rf"{gone} \(from the checkpoint's history\) is not here"):
        quantize.calibration_frames(model, [{"data": "synthetic"}, {"data": str(gone)}])


def test_the_sizes_run_most_get_a_model_of_their_own_and_the_coldest_makes_way():
    compiled, release = [], threading.Event()

    def compile_size(size):
        release.wait(5)
        compiled.append(size)
        return f"model-{size}"

    shapes = ExactShapes(compile_size, window=8, hot=2)  # two of the last eight calls make a size hot
    assert shapes.cap == 4
    assert shapes.get(1) is None and not compiled  # once is not hot
    assert shapes.get(1) is None  # hot: compiling in the background, the calls go on at the dynamic shape
    release.set()
    shapes.wait()
    assert shapes.get(1) == "model-1" and compiled == [1]
    for size in (2, 2, 3, 3, 4, 4):
        shapes.get(size)
    shapes.wait()
    assert sorted(shapes.ready) == [1, 2, 3, 4] and compiled == [1, 2, 3, 4]
    for size in (5, 5):  # a fifth hot size: the coldest of the last eight calls (1, once) makes way
        shapes.get(size)
    shapes.wait()
    assert sorted(shapes.ready) == [2, 3, 4, 5]
    assert compiled == [1, 2, 3, 4, 5]  # each compiled once


def test_a_size_no_call_ran_for_a_while_gives_its_model_back():
    """Sizes a start passes through (3, 5, ... before the load settles) or a refused probe tried do not keep
    their buffers (~50 MB each on the demo model) while the calls run at another size."""
    now = [0.0]
    shapes = ExactShapes(lambda size: f"model-{size}", window=8, hot=2, idle_s=60, clock=lambda: now[0])
    for size in (3, 3, 5, 5, 8, 8):
        shapes.get(size)
        shapes.wait()
        now[0] += 1
    assert sorted(shapes.ready) == [3, 5, 8]
    now[0] = 62.5  # 3 last ran at 1 s, 5 at 3 s
    shapes.get(8)
    assert sorted(shapes.ready) == [5, 8]
    now[0] = 64.0
    assert shapes.get(8) == "model-8" and sorted(shapes.ready) == [8]
    for _ in range(2):  # back again: compiled again
        shapes.get(3)
        shapes.wait()
    assert shapes.get(3) == "model-3"


def test_a_size_asked_for_is_compiled_at_its_next_call_however_rare():
    """The BatchSizer's probe of a larger batch: timed as it would run if adopted, i.e. compiled (``want``)."""
    compiled = []
    shapes = ExactShapes(lambda size: compiled.append(size) or f"model-{size}", window=8, hot=4)
    assert shapes.want(16) is False and not compiled  # asking compiles nothing on the asker's thread
    assert shapes.get(16) is None  # its first call, far from hot: compiling in the background all the same
    shapes.wait()
    assert compiled == [16] and shapes.want(16) is True and shapes.get(16) == "model-16"
    failing = ExactShapes(lambda size: 1 / 0, window=8, hot=4)
    failing.want(32)
    failing.get(32)
    failing.wait()
    assert failing.want(32) is True  # never compiled: its dynamic shape is what it costs, time it so


def test_a_size_that_cannot_be_compiled_runs_at_the_dynamic_shape_and_is_not_tried_again(caplog):
    tried = []

    def compile_size(size):
        tried.append(size)
        raise RuntimeError("cannot reshape")

    shapes = ExactShapes(compile_size, window=8, hot=2)
    with caplog.at_level(logging.WARNING, logger="workers.model_runner"):
        for _ in range(6):
            assert shapes.get(3) is None
            shapes.wait()
    assert tried == [3]
    assert "could not compile the model for batches of 3 (cannot reshape)" in caplog.text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_compiled_for_the_batch_size_gives_the_dynamic_ones_detections(cache, monkeypatch, precision):
    images = frames((256, 448), n=4)
    monkeypatch.setenv("HYDRAVISION_OPENVINO_EXACT_SHAPES", "0")
    dynamic = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision=precision, score_threshold=0.05,
                          backend="openvino")
    assert dynamic.session.exact_shapes is None
    want = dynamic.run(images, [None] * 4)
    monkeypatch.delenv("HYDRAVISION_OPENVINO_EXACT_SHAPES")
    runner = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision=precision, score_threshold=0.05, backend="openvino")
    shapes = runner.session.exact_shapes
    for _ in range(shapes.hot):
        runner.run(images, [None] * 4)
    shapes.wait()
    assert list(shapes.ready) == [4]
    got = runner.run(images, [None] * 4)
    if precision == "fp32":
        assert_same(want, got)
        return
    # bf16: the two shapes' kernels round differently; what the dynamic model is sure of is found again
    for w, h in zip(want, got):
        for head in w:
            keep = w[head]["scores"] >= SURE
            iou = box_iou(torch.from_numpy(w[head]["boxes"][keep]), torch.from_numpy(h[head]["boxes"])).numpy()
            assert (iou.max(1, initial=0) >= BOX_IOU).all(), (head, iou)
            np.testing.assert_allclose(h[head]["scores"][iou.argmax(1)], w[head]["scores"][keep], atol=SCORE_DIFF)


def test_a_second_start_loads_the_compiled_model_from_beside_the_export(cache, monkeypatch):
    """OpenVINO's compiled forms are kept beside the export (a folder of its own, pruned with it) and loaded by
    the next process that runs the model, exact sizes too. One form serves every precision: a runner in fp32
    loading what one in bf16 wrote gives a fresh fp32 compile's detections. Where the folder cannot be made, or
    with HYDRAVISION_OPENVINO_CACHE=0, the model is compiled as before."""
    from models.export import compiled_cache

    images = frames((256, 448), n=2)

    def runner(precision: str) -> ModelRunner:
        return ModelRunner(DEMO_CHECKPOINT, device="cpu", precision=precision, score_threshold=0.05,
                           backend="openvino")

    first = runner("bf16")
    folder = first.session.compiled
    assert folder == first.session.path.with_name(first.session.path.name + ".compiled")
    first.session.exact_shapes.want(2)
    first.run(images, [None] * 2)
    first.session.exact_shapes.wait()
    assert list(folder.glob("*.blob"))
    second = runner("fp32")
    assert second.session.dynamic[2].get_property("LOADED_FROM_CACHE")
    second.session.exact_shapes.want(2)
    second.run(images, [None] * 2)
    second.session.exact_shapes.wait()
    assert second.session.exact_shapes.ready[2][2].get_property("LOADED_FROM_CACHE")
    got = second.run(images, [None] * 2)
    monkeypatch.setenv("HYDRAVISION_OPENVINO_CACHE", "0")
    fresh = runner("fp32")
    assert fresh.session.compiled is None and not fresh.session.dynamic[2].get_property("LOADED_FROM_CACHE")
    assert_same(fresh.run(images, [None] * 2), got)
    # a cache it cannot write to (here: the folder's name taken by a file) leaves the compiles as they were
    taken = cache / "taken.onnx"
    taken.with_name("taken.onnx.compiled").write_bytes(b"")
    assert compiled_cache(taken) is None


def test_auto_picks_openvino_only_where_the_cpu_runs_bf16_natively(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = one_head_model()
    monkeypatch.setattr(model_runner, "native_bf16", lambda: True)
    assert pick_backend("auto", cpu, None, False, plain, "auto") == "openvino"
    assert pick_backend("auto", cpu, torch.bfloat16, False, plain, "bf16") == "openvino"
    assert pick_backend("auto", cpu, None, False, plain, "fp32") == "onnxruntime"  # fp32 asked for: exact
    assert pick_backend("auto", cuda, torch.float16, False, plain, "auto") == "torch"
    assert pick_backend("auto", cpu, None, True, plain, "auto") == "torch"  # compile is torch's
    monkeypatch.setattr(model_runner, "native_bf16", lambda: False)
    assert pick_backend("auto", cpu, None, False, plain, "auto") == "onnxruntime"
    assert pick_backend("auto", cpu, torch.bfloat16, False, plain, "bf16") == "torch"  # emulated bf16: torch's


def test_openvino_settings_it_cannot_run_are_refused_naming_the_field(capsys):
    assert cli_main(["eval", "--backend", "openvino", "--precision", "fp16", "--no-progress"]) == 2
    assert ("--backend openvino --precision fp16: backend openvino runs precision auto, fp32, bf16, int8, not fp16"
            in capsys.readouterr().err)
    cameras = [{"id": "a", "url": "synthetic://street"}]
    with pytest.raises(ConfigError, match=r"model: backend openvino runs the model on the CPU here, not on device cuda"):
        parse_config({"model": {"backend": "openvino", "device": "cuda"}, "cameras": cameras})
    with pytest.raises(ConfigError, match=r"model: backend openvino runs precision auto, fp32, bf16, int8, not fp16"):
        parse_config({"model": {"backend": "openvino", "precision": "fp16"}, "cameras": cameras})
    with pytest.raises(ConfigError, match=r"model: precision int8 runs on backend openvino on the CPU, not on "
                                          r"backend onnxruntime with device auto"):
        parse_config({"model": {"backend": "onnxruntime", "precision": "int8"}, "cameras": cameras})
    assert cli_main(["eval", "--backend", "torch", "--precision", "int8", "--no-progress"]) == 2
    assert ("--backend torch --precision int8: precision int8 runs on backend openvino on the CPU, not on backend "
            "torch with device auto") in capsys.readouterr().err  # eval's --backend path runs as the service: auto
    with pytest.raises(ValueError, match="precision int8 runs on backend openvino on the CPU, not on backend torch"):
        pick_backend("torch", torch.device("cpu"), None, False, one_head_model(), "int8")
    with pytest.raises(ValueError, match="precision int8 runs on backend openvino on the CPU, not on backend auto "
                                         "with device cuda"):
        pick_backend("auto", torch.device("cuda"), None, False, one_head_model(), "int8")


def test_device_auto_runs_openvino_on_the_cpu_where_a_gpu_is_there_too(cache, monkeypatch):
    """The config accepts backend openvino (or precision int8) with device auto; on a machine with a GPU the
    runner must then take the CPU, where OpenVINO runs, not refuse at the replica's start."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine: nothing here touches it
    parse_config({"model": {"backend": "openvino"}, "cameras": [{"id": "a", "url": "synthetic://street"}]})
    runner = ModelRunner(DEMO_CHECKPOINT, device="auto", backend="openvino", precision="fp32", threads=1)
    assert runner.device.type == "cpu" and runner.backend == "openvino" and runner.info()["device"] == "cpu"
    assert len(runner.run(frames(runner.input_size, 2), [None, None])) == 2
    assert model_runner.pick_device("auto").type == "cuda"  # what any other backend gets there


RELEASED_ON_ANOTHER_THREAD = """
import gc, signal, subprocess, sys, threading
from workers.model_runner import ModelRunner
signal.signal(signal.SIGCHLD, lambda *a: None)  # a handler: it runs on the thread's signal stack
box = [ModelRunner(sys.argv[1], device="cpu", backend="openvino")]  # loaded on the main thread
for _ in range(box[0].session.exact_shapes.hot):  # the size hot: a model of its own, compiled on a thread
    box[0].run([__import__("numpy").zeros((3, 64, 96), "uint8")], [None])
box[0].session.exact_shapes.wait()
assert list(box[0].session.exact_shapes.ready) == [1]
box[0].run([__import__("numpy").zeros((3, 64, 96), "uint8")], [None])
worker = threading.Thread(target=lambda: (box.clear(), gc.collect()))  # released on another
worker.start()
worker.join()
for _ in range(10):
    subprocess.run(["true"])  # each child's exit sends the main thread a SIGCHLD
print("alive")
"""


def test_a_model_released_on_another_thread_leaves_the_process_alive(cache, tmp_path):
    """OpenVINO's CPU plugin sets the loading thread's signal stack to memory it unmaps on release; released
    from another thread, that stack dangled and the next handled signal killed the process (SIGSEGV; the
    suite's process died this way in a browser test). One Core per process, never released, keeps it."""
    path = save_checkpoint(one_head_model(), tmp_path / "tiny.safetensors")
    out = subprocess.run([sys.executable, "-c", RELEASED_ON_ANOTHER_THREAD, str(path)], capture_output=True,
                         encoding="utf-8", timeout=120, cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "HYDRAVISION_CACHE": str(cache)})
    assert out.returncode == 0 and out.stdout.strip().endswith("alive"), (out.returncode, out.stderr[-2000:])


def test_a_quantization_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The quantized model is written aside and renamed; a failure part-way (here after a partial write) left the
    model-sized temporary beside the cache."""
    import onnxruntime.quantization

    def fails_midway(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"half a model")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", fails_midway)
    dst = tmp_path / "model.int8.onnx"
    with pytest.raises(RuntimeError, match="out of memory"):
        quantize.quantize(tmp_path / "model.onnx", dst, [])
    assert list(tmp_path.iterdir()) == []
