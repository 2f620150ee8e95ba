"""The ONNX export cache finds an export by what it was made from (checkpoint content, torch version, opset,
exporter, GroupNorm form), whatever the checkpoint file is called; pruning says what it freed."""

import logging
import shutil
from pathlib import Path

import pytest

from models import export
from models.export import cache_path, compiled_cache, prune_cache
from pipeline.cli import main as cli_main
from workers.model_runner import ModelRunner, gpu_providers


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def test_the_same_weights_under_another_name_run_the_export_made_for_them(tiny_checkpoint, tmp_path, cache,
                                                                           capsys, monkeypatch):
    """A replica reads the checkpoint from a copy in its node's temp dir (workers/inference.py:local_copy,
    named by content): the export baked into the image under the checkpoint's own name was missed, and every
    replica start exported again (seconds; minutes for large backbones)."""
    made = ModelRunner(tiny_checkpoint, backend="onnxruntime", threads=1).session.path
    assert made.parent == cache and made.name.startswith("tiny-")  # named for people after the checkpoint
    copy = shutil.copy(tiny_checkpoint, tmp_path / "hydravision-0123456789abcdef0123.safetensors")

    def exported_again(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_onnx", exported_again)
    assert ModelRunner(copy, backend="onnxruntime", threads=1).session.path == made
    # its compiled forms (OpenVINO's, TensorRT's engines) are the export's, whatever name finds it
    assert compiled_cache(cache_path(copy)) == made.with_name(made.name + ".compiled")
    engines = Path(gpu_providers(cache_path(copy), 0)[0][1]["trt_engine_cache_path"])
    assert engines.parent == made.with_name(made.name + ".compiled")
    assert cli_main(["export", str(copy)]) == 0  # the command the image runs says so too
    assert capsys.readouterr().out.startswith(f"{made} is up to date")
    # another GroupNorm form is another graph: not this file, and a new one is named after the checkpoint
    assert cache_path(copy, "torch") == cache / f"{Path(copy).stem}-{cache_path(copy, 'torch').stem[-16:]}.onnx"
    assert not cache_path(copy, "torch").exists()


def test_every_name_of_the_same_weights_gets_the_same_file(tiny_checkpoint, tmp_path, cache):
    """Two files for the same weights (two names exporting at once): each name took its own, so compiled forms
    were built twice; now all take one, and the other ages out with the cache's pruning."""
    key = cache_path(tiny_checkpoint).stem[-16:]
    cache.mkdir(parents=True)
    for name in (f"tiny-{key}.onnx", f"b-{key}.onnx", f"tiny-{key}-int8-v1-64.onnx", f"a-{key}.onnx.123.tmp"):
        (cache / name).write_bytes(b"x")
    (cache / f"a-{key}.onnx").mkdir()  # not a file: never taken for one
    copy = shutil.copy(tiny_checkpoint, tmp_path / "renamed-v2.safetensors")
    assert cache_path(tiny_checkpoint) == cache_path(copy) == cache / f"b-{key}.onnx"


def test_pruning_reports_the_size_of_the_tensorrt_engines_it_removes(tmp_path, caplog):
    """TensorRT's engines sit in a folder inside the compiled one: the log counted that folder's entry, not the
    engines (a folder of GBs was reported as 0 MB freed)."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"x")
    engines = Path(gpu_providers(onnx, 0)[0][1]["trt_engine_cache_path"])
    (engines / "TensorrtExecutionProvider_TRTKernel_graph_1.engine").write_bytes(b"e" * 3_000_000)
    onnx.unlink()
    with caplog.at_level(logging.INFO, logger="models.export"):
        assert prune_cache(tmp_path) == [engines.parent]
    assert "model.onnx.compiled from the model cache (3 MB, its export is gone)" in caplog.text
