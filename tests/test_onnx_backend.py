"""model.backend: onnxruntime gives the detections the torch path gives, exports once, and the CLI exports."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.hydranet import HydraNet, HydraNetConfig
from models.letterbox import letterbox
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, parse_config
from pipeline.model_commands import DEMO_CHECKPOINT
from synthetic.scene import StreetScene
from workers import model_runner
from workers.model_runner import ModelRunner, pick_backend


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYDRAVISION_CACHE", str(path))
        yield path


def frames(size, n=3, seed=1_000_007):
    scene = StreetScene(seed)
    out = []
    for i in range(10 * n):
        image, _ = scene.step()
        if i % 10 == 9:
            out.append(letterbox(image, size)[0])
    return out


def assert_same(a, b):
    assert [sorted(x) for x in a] == [sorted(y) for y in b]
    for x, y in zip(a, b):
        for head in x:
            assert len(x[head]["boxes"]) == len(y[head]["boxes"]) > 0
            np.testing.assert_allclose(x[head]["boxes"], y[head]["boxes"], atol=1e-3)  # pixels
            np.testing.assert_allclose(x[head]["scores"], y[head]["scores"], atol=1e-4)
            np.testing.assert_array_equal(x[head]["class_ids"], y[head]["class_ids"])
            for key in (k for k in x[head] if k.startswith("attr:") and not k.endswith(":conf")):
                np.testing.assert_array_equal(x[head][key], y[head][key])
            assert ("embedding" in x[head]) == ("embedding" in y[head])
            if "embedding" in x[head]:  # the demo's re-ID head reads the images, which ONNX Runtime's path passes too
                np.testing.assert_allclose(x[head]["embedding"].astype(np.float32),
                                           y[head]["embedding"].astype(np.float32), atol=2e-3)


def test_onnxruntime_gives_the_detections_torch_gives_on_the_demo_model(cache):
    images = frames((256, 448))
    heads = [None, ["people"], ["vehicles"]]
    eager = ModelRunner(DEMO_CHECKPOINT, device="cpu", score_threshold=0.05, backend="torch").run(images, heads)
    runner = ModelRunner(DEMO_CHECKPOINT, device="cpu", score_threshold=0.05, backend="onnxruntime")
    assert runner.info()["backend"] == "onnxruntime"
    assert_same(eager, runner.run(images, heads))
    exported = list(cache.glob("onnx/demo-*.onnx"))
    assert len(exported) == 1
    inode = exported[0].stat().st_ino  # an export writes a new file and renames it over the old one
    ModelRunner(DEMO_CHECKPOINT, device="cpu", backend="onnxruntime")  # a second start reuses the export
    assert exported[0].stat().st_ino == inode and len(list(cache.glob("onnx/*"))) == 1


def test_attribute_heads_and_five_levels_run_on_onnxruntime_too(cache, tmp_path):
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(128, 128), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16, "extra_levels": 2},
                                    heads={"vehicles": {"classes": ["car", "bicycle"]}},
                                    attributes={"kind": {"labels": ["sedan", "hatch", "van"], "on": "vehicles",
                                                         "of": ["car"]}}))
    path = save_checkpoint(model, tmp_path / "tiny.safetensors")
    images = [np.random.default_rng(i).integers(0, 255, (3, 128, 128), dtype=np.uint8) for i in range(2)]
    eager = ModelRunner(path, device="cpu", score_threshold=0.0, backend="torch").run(images, [None, None])
    onnx = ModelRunner(path, device="cpu", score_threshold=0.0, backend="onnxruntime").run(images, [None, None])
    assert_same(eager, onnx)
    assert set(onnx[0]["vehicles"]["attr:kind"]) - {""}


def test_export_command_writes_a_model_onnxruntime_runs(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16},
                                    heads={"people": {"classes": ["person"]}, "vehicles": {"classes": ["car", "bicycle"]}}))
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.onnx"
    assert cli_main(["export", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "people.cls_logits" in printed and "(batch, 3, 64, 96)" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"images": np.zeros((3, 3, 64, 96), np.uint8)})
    assert outs[0].shape[0] == 3 and len(outs) == 3 + 2 * 3  # three pyramid maps, three outputs per head
    assert cli_main(["export", str(tmp_path / "none.safetensors"), "--out", str(out)]) == 2
    assert "none.safetensors: no such checkpoint file" in capsys.readouterr().err
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))  # no --out: where the service looks first
    assert cli_main(["export", str(checkpoint)]) == 0
    cached = list((tmp_path / "cache" / "onnx").glob("tiny-*.onnx"))
    assert len(cached) == 1 and str(cached[0]) in capsys.readouterr().out
    assert cli_main(["export", str(checkpoint)]) == 0  # once more: nothing to write, and it says so
    assert capsys.readouterr().out.startswith(f"{cached[0]} is up to date")


def test_the_export_writes_group_norm_without_reshaping_activations_and_computes_the_same(tmp_path):
    # GroupNormForExport: nn.GroupNorm's numbers (groups of several channels, a mean far from 0 as after a
    # conv, a batch), and the exported graph has none of the Reshape/InstanceNormalization form that made
    # OpenVINO reorder every head activation
    import onnx

    from models.export import GroupNormForExport, export_onnx

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 16, 9, 13) * 4 + 7
    torch.testing.assert_close(GroupNormForExport(norm)(x), norm(x), atol=1e-5, rtol=1e-5)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}}))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    ops = {n.op_type for n in onnx.load(str(export_onnx(model, tmp_path / "m.onnx"))).graph.node}
    assert "InstanceNormalization" not in ops and "GroupNormalization" not in ops
    torch_form = export_onnx(model, tmp_path / "t.onnx", group_norm="torch")  # what int8 is quantized from
    assert "InstanceNormalization" in {n.op_type for n in onnx.load(str(torch_form)).graph.node}
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())  # the model itself is untouched


def test_an_unknown_backend_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"model\.backend"):
        parse_config({"model": {"backend": "tensorrt"}, "cameras": [{"id": "a", "url": "synthetic://street"}]})


def one_head_model() -> HydraNet:
    """A small ResNet-10 + FPN with one head, the same weights each call."""
    torch.manual_seed(0)
    return HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                   neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}}))


def test_auto_picks_onnxruntime_on_a_cpu_and_torch_where_the_export_cannot_serve(monkeypatch):
    """On a CPU without native bf16 (with it, auto picks openvino: tests/test_openvino_backend.py)."""
    monkeypatch.setattr(model_runner, "native_bf16", lambda: False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain, adapted = one_head_model(), one_head_model()
    adapted.add_adapter("a", heads=["people"], rank=2)
    assert pick_backend("auto", cpu, None, False, plain) == "onnxruntime"
    assert pick_backend("auto", cpu, None, False, adapted) == "torch"  # the export has one pyramid
    assert pick_backend("auto", cuda, torch.float16, False, plain) == "torch"
    assert pick_backend("auto", cpu, torch.bfloat16, False, plain) == "torch"  # half precision is torch's
    assert pick_backend("auto", cpu, None, True, plain) == "torch"  # compile is torch's
    assert pick_backend("torch", cpu, None, False, plain) == "torch"
    assert parse_config({"cameras": [{"id": "a", "url": "synthetic://street"}]}).model.backend == "auto"


def test_auto_falls_back_to_torch_when_onnxruntime_fails_and_an_explicit_choice_fails_loudly(tmp_path, monkeypatch,
                                                                                             caplog):
    path = save_checkpoint(one_head_model(), tmp_path / "tiny.safetensors")

    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX Runtime here")

    monkeypatch.setattr(model_runner, "OrtSession", broken)
    monkeypatch.setattr(model_runner, "native_bf16", lambda: False)  # auto picks onnxruntime
    runner = ModelRunner(path, device="cpu")
    assert runner.info()["backend"] == "torch" and "no ONNX Runtime here" in caplog.text
    assert runner.run([np.zeros((3, 64, 96), np.uint8)], [None])[0]["people"]["boxes"].shape[1] == 4
    with pytest.raises(RuntimeError, match="no ONNX Runtime here"):
        ModelRunner(path, device="cpu", backend="onnxruntime")


@pytest.mark.parametrize("providers", [None, ["CUDAExecutionProvider", "CPUExecutionProvider"]],
                         ids=["plain onnxruntime", "onnxruntime-gpu without its CUDA libraries"])
def test_onnxruntime_asked_for_on_a_gpu_refuses_to_start_where_it_would_run_on_the_cpu(cache, tmp_path, monkeypatch,
                                                                                        providers):
    """ONNX Runtime falls back to its CPU provider without failing: the model took the CPU, the replica held a GPU
    it never used, and info() said cuda."""
    path = save_checkpoint(one_head_model(), tmp_path / "tiny.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(model_runner, "load_checkpoint", lambda p, device: load_checkpoint(p, device="cpu"))
    if providers:  # listed, but its session falls back to the CPU as one without the CUDA libraries does
        monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    with pytest.raises(ValueError, match=r"onnxruntime-gpu .*model\.backend"):
        ModelRunner(path, device="auto", backend="onnxruntime", threads=1)


def test_tensorrt_keeps_its_engines_on_disk(cache, tmp_path, monkeypatch):
    """TensorRT builds an engine per input shape, minutes each: without a cache every start of a replica paid
    that again. What the session is asked for (no GPU here: the session itself falls back to the CPU)."""
    path = save_checkpoint(one_head_model(), tmp_path / "tiny.safetensors")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_runner, "load_checkpoint", lambda p, device: load_checkpoint(p, device="cpu"))
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    asked = []
    session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda p, o, providers: asked.append(providers) or session(p, o))
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        ModelRunner(path, device="auto", backend="onnxruntime", threads=1)
    (trt, options), (cuda, _), cpu = asked[0]
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    engines = Path(options["trt_engine_cache_path"])  # in the export's own compiled folder, pruned with it
    assert options["trt_engine_cache_enable"] and engines.parent.parent == cache / "onnx"
    assert engines.parent.name.endswith(".onnx.compiled") and engines.is_dir()


def test_a_pool_of_threads_waits_without_spinning_unless_asked(cache, tmp_path, monkeypatch):
    """Spinning threads took the CPU that decoders on the same cores need (docs/architecture.md, "CPU under
    contention"); HYDRAVISION_ORT_SPIN=1 is ONNX Runtime's own default, kept for the benchmark."""
    path = save_checkpoint(one_head_model(), tmp_path / "tiny.safetensors")

    def spinning() -> str:
        runner = ModelRunner(path, device="cpu", threads=2, backend="onnxruntime")
        return runner.session.session.get_session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")

    assert spinning() == "0"
    monkeypatch.setenv("HYDRAVISION_ORT_SPIN", "1")
    assert spinning() == "1"


EXPORT_IN_A_PROCESS = """
import sys, time
from models import export
from models.checkpoint import load_checkpoint
real = export.export_onnx
def counted(model, path, **kwargs):
    print("exported", flush=True)
    time.sleep(3)  # as long as a real model's export: without the lock the other process would export too
    return real(model, path, **kwargs)
export.export_onnx = counted
model, _ = load_checkpoint(sys.argv[1])
print(export.cached_export(model, sys.argv[1]))
"""


def test_replicas_starting_together_export_once(tmp_path):
    """Two processes on a fresh cache (two replicas at a first start): one exports, the other waits for it."""
    path = save_checkpoint(one_head_model(), tmp_path / "tiny.safetensors")
    env = {**os.environ, "HYDRAVISION_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", EXPORT_IN_A_PROCESS, str(path)], env=env, encoding="utf-8",
                              stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("exported") for out in outs) == 1
    assert outs[0][-1] == outs[1][-1] and outs[0][-1].endswith(".onnx")
    assert [f.suffix for f in (tmp_path / "cache" / "onnx").iterdir()] == [".onnx"]  # no lock file left


def test_cache_files_unused_for_a_month_are_removed_when_another_is_made(tmp_path):
    """A cache file per checkpoint and torch version: without pruning a service retrained weekly fills the disk.
    Using a file keeps it; making one removes the files nobody used for CACHE_MAX_AGE_DAYS, and half-written
    exports older than a day; OpenVINO's compiled forms of an export (a folder beside it) go with it, or
    unused as long; nothing else in the folder is touched."""
    from models.export import CACHE_MAX_AGE_DAYS, cached

    folder = tmp_path / "onnx"
    folder.mkdir()
    day, now = 86400, time.time()
    ages = {"old.onnx": CACHE_MAX_AGE_DAYS + 1, "used.onnx": CACHE_MAX_AGE_DAYS + 5, "recent.onnx": 3,
            "dead.onnx.123.tmp": 2, "fresh.onnx.456.tmp": 0.1, "notes.txt": 400,
            # compiled forms: of an export removed now, of one removed by hand, unused for long, in use
            "old.onnx.compiled/": 1, "gone.onnx.compiled/": 1, "recent.onnx.compiled/": CACHE_MAX_AGE_DAYS + 1,
            "used.onnx.compiled/": 2}
    for name, days in ages.items():
        path = folder / name.rstrip("/")
        if name.endswith("/"):
            path.mkdir()
            (path / "123.blob").write_bytes(b"z")
        else:
            path.write_bytes(b"x")
        os.utime(path, (now - days * day, now - days * day))
    made: list[Path] = []
    assert cached(folder / "used.onnx", made.append, "unused") == folder / "used.onnx"  # there: used, not made
    assert made == [] and now - (folder / "used.onnx").stat().st_mtime < 60
    cached(folder / "new.onnx", lambda p: (made.append(p), p.write_bytes(b"y")), "exporting")
    assert made == [folder / "new.onnx"]
    assert sorted(p.name for p in folder.iterdir()) == ["fresh.onnx.456.tmp", "new.onnx", "notes.txt",
                                                        "recent.onnx", "used.onnx", "used.onnx.compiled"]


def test_tensorrt_engines_are_kept_per_export_and_pruned_with_it(tmp_path):
    """TensorRT's engines (built per input shape, minutes each) went to one folder shared by every export, which
    the cache's pruning never looked into: a service retrained weekly filled the disk with engines. They live in
    their export's compiled folder now. (The providers are built here without a GPU; they only run on one.)"""
    from models.export import prune_cache
    from workers.model_runner import gpu_providers

    export = tmp_path / "model.onnx"
    export.write_bytes(b"x")
    (trt, trt_options), (cuda, cuda_options) = gpu_providers(export, 1)
    assert (trt, cuda) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    engines = Path(trt_options["trt_engine_cache_path"])
    assert engines.is_dir() and engines.parent == export.with_name("model.onnx.compiled")
    assert trt_options["device_id"] == cuda_options["device_id"] == 1 and trt_options["trt_engine_cache_enable"]
    (engines / "TensorrtExecutionProvider_TRTKernel_graph_1.engine").write_bytes(b"e")
    export.unlink()  # pruned for age (or by hand)
    assert prune_cache(tmp_path) == [engines.parent] and not engines.exists()
