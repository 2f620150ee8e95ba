"""Model edges a long-running service meets: a damaged file in the export cache, two trainings saving one
checkpoint at once, and an exported runtime that loads but cannot run the model."""

import asyncio
import logging
import shutil

import numpy as np
import pytest
import torch

from models import checkpoint, export
from models.checkpoint import load_checkpoint, save_checkpoint
from models.export import cache_path, cached_export
from workers import model_runner
from workers.inference import InferenceService
from test_export_cache6 import exported  # noqa: F401 (a fixture: the tiny model's export, made once)
from workers.model_runner import ModelRunner


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def damage(data: bytes, how: str) -> bytes:
    return {"half": data[:len(data) // 2], "empty": b"", "zeros": bytes(len(data)), "last byte": data[:-1]}[how]


@pytest.mark.parametrize("how", ["half", "empty", "zeros", "last byte"])
def test_a_damaged_cached_export_is_said_once_removed_and_made_again(how, tiny_checkpoint, exported, cache,
                                                                     monkeypatch, caplog):
    """A cached export cut short (a cache copied or restored half-way, a failing disk) was taken as it was at every
    start: ONNX Runtime refused it ('Protobuf parsing failed') and the start failed, or 'auto' ran torch for good.
    Now it is said once, removed with its compiled forms, and exported again; the next start takes the new file.
    (A stand-in exporter writing the real export's bytes: what is tested is the cache around it.)"""
    whole = next(exported.glob("*.onnx")).read_bytes()
    path = cache_path(tiny_checkpoint)
    cache.mkdir(parents=True)
    path.write_bytes(damage(whole, how))
    compiled = path.with_name(path.name + export.COMPILED_SUFFIX)
    compiled.mkdir()
    (compiled / "form.blob").write_bytes(b"compiled from the damaged file")
    made = []
    monkeypatch.setattr(export, "export_onnx", lambda model, p, **kw: (made.append(p), p.write_bytes(whole)))
    with caplog.at_level(logging.WARNING, logger="models.export"):
        assert cached_export(None, tiny_checkpoint) == path
        assert cached_export(None, tiny_checkpoint) == path  # the next start: the new file, as it is
    assert made == [path] and path.read_bytes() == whole and not compiled.exists()
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(said) == 1 and path.name in said[0], said


def test_a_service_starts_on_onnxruntime_over_a_cut_short_cached_export(tiny_checkpoint, exported, cache, caplog):
    """The whole start, real export and ONNX Runtime: 'backend: onnxruntime' failed at every start on the half
    file left in the cache; now the runner exports afresh and runs."""
    shutil.copytree(exported, cache)
    path = next(cache.glob("*.onnx"))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="models.export"):
        runner = ModelRunner(tiny_checkpoint, device="cpu", precision="fp32", backend="onnxruntime", threads=1)
    assert runner.backend == "onnxruntime" and runner.session.path == path
    assert export.damaged(path) is None and path.stat().st_size == len(whole)
    assert sorted(runner.run([np.zeros((3, *runner.input_size), np.uint8)], [None])[0]) == ["people", "vehicles"]
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1


def test_two_trainings_saving_one_checkpoint_at_once_each_write_their_own_file(tiny_checkpoint, tmp_path, monkeypatch):
    """Both wrote through the same temporary name: the second training's save, between the first's write and its
    rename, took the first's temporary file (the first then failed with FileNotFoundError, its model lost, or, the
    other way round, renamed the other's half-written bytes into place). Each now writes a file of its own, and
    the checkpoint is whole: the last one renamed. A save that fails leaves no temporary file behind."""
    first, second = load_checkpoint(tiny_checkpoint)[0], load_checkpoint(tiny_checkpoint)[0]
    with torch.no_grad():
        next(second.parameters()).add_(1.0)
    path = tmp_path / "out" / "model.safetensors"
    real, written = checkpoint.save_file, []

    def interleaved(tensors, filename, metadata=None):
        written.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(written) == 1:  # the other training saves while this one is between its write and its rename
            save_checkpoint(second, path, {"run": "second"})

    monkeypatch.setattr(checkpoint, "save_file", interleaved)
    save_checkpoint(first, path, {"run": "first"})
    loaded, training = load_checkpoint(path)
    assert training == {"run": "first"} and len(set(written)) == 2
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), first.state_dict().values()))

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(second, path, {"run": "second"})
    assert [p.name for p in path.parent.iterdir()] == [path.name] and load_checkpoint(path)[1] == {"run": "first"}


@pytest.fixture
def ort_fails_at_its_first_call(monkeypatch):
    """ONNX Runtime loading the export fine but failing when it runs (an op or provider it cannot run here)."""
    calls = []

    def failing(self, images):
        calls.append(images.shape)
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                           "running Conv node")

    monkeypatch.setattr(model_runner.OrtSession, "infer", failing)
    return calls


def infer_one(service: InferenceService) -> dict:
    async def one():
        try:
            return await service.infer_image(np.zeros((3, *service.runner.input_size), np.uint8), None, "cam",
                                              timeout_s=60.0)
        finally:
            service.batcher.close()

    return asyncio.run(one())


def test_auto_runs_torch_when_the_exported_runtime_fails_its_first_call(tiny_checkpoint, exported, cache,
                                                                         ort_fails_at_its_first_call, caplog):
    """'auto' picked ONNX Runtime, which loaded the export and then failed every batch of the run: the cameras
    published nothing and counted every frame an error. A blank frame at start now finds it out, says so once,
    and the model runs in torch, as when the runtime fails to load (docs/architecture.md, "Backends")."""
    shutil.copytree(exported, cache)
    with caplog.at_level(logging.WARNING, logger="workers.model_runner"):
        service = InferenceService(tiny_checkpoint, device="cpu", precision="fp32", backend="auto", threads=1)
    assert service.info()["backend"] == "torch" and len(ort_fails_at_its_first_call) == 1
    assert sorted(infer_one(service)) == ["people", "vehicles"]
    said = [r.getMessage() for r in caplog.records if "running it in torch" in r.getMessage()]
    assert len(said) == 1 and "onnxruntime" in said[0] and "RUNTIME_EXCEPTION" in said[0], said
    # whoever builds the runner (eval --backend, the benchmarks), not the service alone
    assert ModelRunner(tiny_checkpoint, device="cpu", precision="fp32", backend="auto", threads=1).backend == "torch"


def test_a_backend_asked_for_by_name_that_fails_its_first_call_refuses_the_start(tiny_checkpoint, exported, cache,
                                                                                  ort_fails_at_its_first_call):
    """'backend: onnxruntime' asked for by name started, then failed every batch; a fallback would hide what was
    asked for, so the start is refused, naming the backend, its error and what to set instead."""
    shutil.copytree(exported, cache)
    refused = r"model\.backend onnxruntime.*RUNTIME_EXCEPTION.*set model\.backend to torch"
    with pytest.raises(ValueError, match=refused):  # the user's setting (ConfigError): an error line, exit 2
        InferenceService(tiny_checkpoint, device="cpu", precision="fp32", backend="onnxruntime", threads=1)


def test_a_damaged_cached_int8_model_is_made_again(tmp_path, monkeypatch, caplog):
    """The int8 copy beside the export is cached the same way: one cut short failed every int8 start for good."""
    from models import quantize

    exported = tmp_path / "model-abc.onnx"
    exported.write_bytes(b"the export")
    made = []
    whole = bytes([0x08, 0x07, 0x3A, 0x00, 0x42, 0x00])  # ir_version 7, an empty graph, an empty opset_import
    target = quantize.int8_path(exported)
    target.write_bytes(whole[:3])  # cut short in the graph's field
    monkeypatch.setattr(quantize, "calibration_frames", lambda model, history: [])
    monkeypatch.setattr(quantize, "quantize", lambda src, dst, frames: (made.append(dst), dst.write_bytes(whole)))
    with caplog.at_level(logging.WARNING, logger="models.export"):
        assert quantize.cached_int8(None, exported, []) == target
    assert made == [target] and target.read_bytes() == whole
    assert any("damaged" in r.getMessage() for r in caplog.records)


def test_a_file_written_aside_has_the_umasks_mode_and_old_leftovers_go(tmp_path):
    """Each writer's temporary name of its own (mkstemp) made the training state 0600 where it followed the umask,
    and each kill left a model-sized file beside --out for good; one helper now for both savers."""
    import os
    import time

    from models.files import STALE_ASIDE_S, aside_of, written_aside

    out = tmp_path / "m.safetensors.train-state.pt"
    old, fresh = tmp_path / "m.safetensors.train-state.pt.abc123.tmp", tmp_path / "m.safetensors.train-state.pt.x.tmp"
    for leftover in (old, fresh):
        leftover.write_bytes(b"left by a kill")
    os.utime(old, (time.time() - STALE_ASIDE_S - 60,) * 2)
    umask = os.umask(0o022)
    try:
        with written_aside(out, aside_of(out)) as tmp:
            tmp.write_bytes(b"state")
    finally:
        os.umask(umask)
    assert out.read_bytes() == b"state" and out.stat().st_mode & 0o777 == 0o644
    assert not old.exists() and fresh.exists()  # one a writer may be writing now is left alone
