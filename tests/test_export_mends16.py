"""Review mends of the ONNX export cache's stale check (4a98255): a stale export's int8 copy went on being run, the
int8 copy was not checked against the model, `hydravision export` said "up to date" for another model's export
without a fingerprint, and benchmarks/bench_bf16.py's docstring and bf16 line."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_bf16
from models import export, quantize
from models.checkpoint import load_checkpoint, save_checkpoint
from models.export import FINGERPRINT, cache_key, cache_path, damaged, fingerprint, graph_io, output_names
from pipeline.cli import main as cli_main
import test_backends16
import test_export_cache6
from workers import model_runner
from workers.model_runner import ModelRunner

exported = test_export_cache6.exported  # a fixture: the tiny model's export, made once
cache = test_backends16.cache  # a fixture: $HYDRAVISION_CACHE in tmp_path, its onnx folder
other_model = test_backends16.other_model
OTHER_HEADS = {"people": {"classes": ["person"]}, "bikes": {"classes": ["bicycle"]}}
SYNTHETIC = [{"data": "synthetic"}]  # a history int8 calibrates from without files


@pytest.fixture
def tiny_int8(tiny_checkpoint, tmp_path) -> Path:
    """The tiny model saved with a training history int8 can calibrate on (synthetic frames)."""
    return save_checkpoint(load_checkpoint(tiny_checkpoint)[0], tmp_path / "tiny8.safetensors", {"history": SYNTHETIC})


def test_a_stale_exports_int8_copies_and_their_compiled_forms_go_with_it(tiny_checkpoint, cache):
    """Only the stale export and its .compiled folder were removed: its int8 copy beside it, quantized from the other
    model's graph, stayed and was run next to the new export. Another export's int8 copy is not touched."""
    path = cache_path(tiny_checkpoint, "torch")
    export.export_onnx(other_model(OTHER_HEADS), path)  # another model's, before fingerprints
    copies = [path.with_name(f"{path.stem}-int8-v1-64.onnx"), path.with_name(f"{path.stem}-int8-v0-32.onnx")]
    kept = cache / "other-0123456789abcdef-int8-v1-64.onnx"
    for copy in [*copies, kept]:
        copy.write_bytes(b"an int8 copy")
        (copy.with_name(copy.name + export.COMPILED_SUFFIX)).mkdir()
    (path.with_name(path.name + export.COMPILED_SUFFIX)).mkdir()
    model = load_checkpoint(tiny_checkpoint)[0]
    assert export.cached_export(model, tiny_checkpoint, "torch") == path
    assert export.unlike(path, model) is None
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, kept.name, kept.name + ".compiled"])


def test_a_stale_exports_int8_copy_is_not_run_by_an_int8_start(tiny_int8, cache, caplog):
    """The reviewer's start: a cache holding another model's export and its int8 copy, `precision: int8, backend:
    openvino`. The export was said stale and made again, but the old int8 copy was loaded: the start failed with a
    plain RuntimeError "Output for tensor name 'vehicles.cls_logits' is not found". Both are made again now."""
    path = cache_path(tiny_int8, "torch")
    other = other_model(OTHER_HEADS)
    export.export_onnx(other, path)  # no fingerprint: an export made before them
    quantize.cached_int8(other, path, SYNTHETIC)  # its int8 copy, as a start of that model made it
    with caplog.at_level(logging.WARNING, logger="models.export"):
        runner = ModelRunner(tiny_int8, device="cpu", precision="int8", backend="openvino", threads=1)
    assert runner.session.path == quantize.int8_path(path)
    out = runner.run([np.zeros((3, *runner.input_size), np.uint8)], [None])[0]
    assert sorted(out) == ["people", "vehicles"]
    assert graph_io(runner.session.path)[1] == output_names(load_checkpoint(tiny_int8)[0])
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and path.name in stale[0], stale


@pytest.fixture
def fake_quantize(monkeypatch):
    """quantize stands for itself by copying the export (what it reads): the calls it gets are listed."""
    made: list[Path] = []
    monkeypatch.setattr(quantize, "calibration_frames", lambda model, history: [])
    monkeypatch.setattr(quantize, "quantize", lambda src, dst, frames: (made.append(dst), shutil.copyfile(src, dst)))
    return made


def test_an_int8_copy_of_another_model_is_quantized_again(tiny_checkpoint, exported, cache, fake_quantize, caplog):
    """cached_int8 checked its file for damage only: an int8 copy of another model (other heads, no fingerprint)
    beside this checkpoint's export was run. Judged like the export now: stale, made again."""
    shutil.copytree(exported, cache)
    path = cache_path(tiny_checkpoint)
    target = quantize.int8_path(path)
    export.export_onnx(other_model(OTHER_HEADS), target)
    model = load_checkpoint(tiny_checkpoint)[0]
    with caplog.at_level(logging.WARNING, logger="models.export"):
        assert quantize.cached_int8(model, path, []) == target
    assert fake_quantize == [target] and export.unlike(target, model) is None
    said = [r.getMessage() for r in caplog.records if target.name in r.getMessage()]
    assert len(said) == 1 and "its heads are people, bikes" in said[0], said


def test_an_int8_copy_fingerprinted_for_other_weights_is_quantized_again(tiny_checkpoint, exported, cache,
                                                                       fake_quantize):
    """Same heads and input size, other weights: only the fingerprint (the quantizer keeps the export's) tells;
    `damaged` read it for export names, not for int8 copies' names."""
    shutil.copytree(exported, cache)
    path = cache_path(tiny_checkpoint)
    target = quantize.int8_path(path)
    same_heads = {"people": {"classes": ["person"]}, "vehicles": {"classes": ["car", "bicycle"]}}
    export.export_onnx(other_model(same_heads), target, metadata={FINGERPRINT: "0123456789abcdef"})
    model = load_checkpoint(tiny_checkpoint)[0]
    assert export.unlike(target, model) is None  # its graph is like this model's
    assert quantize.cached_int8(model, path, []) == target
    assert fake_quantize == [target] and fingerprint(target) == cache_key(tiny_checkpoint)


def test_this_exports_int8_copy_is_taken_as_it_is(tiny_checkpoint, exported, cache, fake_quantize):
    """The checks judge; they do not quantize again this export's own copy (fingerprinted or not)."""
    shutil.copytree(exported, cache)
    path = cache_path(tiny_checkpoint)
    target = quantize.int8_path(path)
    model = load_checkpoint(tiny_checkpoint)[0]
    assert quantize.cached_int8(model, path, []) == target and fake_quantize == [target]
    export.export_onnx(model, target)  # without a fingerprint
    for _ in range(2):
        assert quantize.cached_int8(model, path, []) == target
        shutil.copyfile(path, target)  # with this export's
    assert fake_quantize == [target]


def test_export_says_up_to_date_only_for_this_checkpoints_fingerprint(tiny_checkpoint, cache, capsys, caplog,
                                                                      monkeypatch):
    """`hydravision export`'s fast path checked only that the cached file was whole: another model's export without
    a fingerprint (every cache made before 4a98255) was "up to date", and `run` then said it stale. Now it loads
    the model and judges the file (cached_export): stale, exported again; the next call takes the fast path."""
    path = cache_path(tiny_checkpoint)
    export.export_onnx(other_model(OTHER_HEADS), path)
    assert damaged(path) is None and fingerprint(path) is None
    with caplog.at_level(logging.WARNING, logger="models.export"):
        assert cli_main(["export", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {path}")
    assert any("stale" in r.getMessage() and "bikes" in r.getMessage() for r in caplog.records)
    assert fingerprint(path) == cache_key(tiny_checkpoint)
    monkeypatch.setattr("pipeline.model_commands.load_checkpoint", lambda *a, **kw: pytest.fail("loaded the model"))
    assert cli_main(["export", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out.startswith(f"{path} is up to date (exported before")


def test_export_of_this_checkpoint_without_fingerprint_is_up_to_date_after_the_check(tiny_checkpoint, cache,
                                                                                      capsys, monkeypatch):
    """This checkpoint's own export made before fingerprints: checked against the loaded model, kept, and said up to
    date as before (not "exported meanwhile by another process")."""
    path = cache_path(tiny_checkpoint)
    export.export_onnx(load_checkpoint(tiny_checkpoint)[0], path)
    assert fingerprint(path) is None
    monkeypatch.setattr(export, "export_onnx", lambda *a, **kw: pytest.fail("exported again"))
    assert cli_main(["export", str(tiny_checkpoint)]) == 0
    assert capsys.readouterr().out.strip() == (f"{path} is up to date (exported before for this checkpoint, torch "
                                               "version and exporter)")


def test_the_bf16_checks_docstring_says_what_its_threshold_is():
    """It said "each head's own score threshold otherwise", but --sure (0.3) is the threshold for every head."""
    doc = " ".join(bench_bf16.__doc__.split())
    assert "each head's own score threshold" not in doc and "(score >= --sure, 0.3 by default, for every head)" in doc
    assert bench_bf16.SURE == 0.3


class StubRunner:
    """ModelRunner's part the script uses: one detection per frame, the same for every variant."""
    input_size = (64, 96)

    def __init__(self, checkpoint, device, precision, **kw):
        self.precision = precision

    def run(self, images, heads):
        return [{"h": test_backends16.detections([[0, 0, 10, 10]], [0.9])} for _ in images]

    def info(self):
        return {"autocast": self.precision}


@pytest.mark.parametrize("native", [False, True])
def test_the_bf16_check_says_when_openvino_bf16_ran_in_f32(native, tmp_path, monkeypatch, capsys):
    """Without native bf16, "openvino bf16" runs in f32: a user checking their head there saw ~0 px moved and took
    bf16 as safe. A line says so (only there)."""
    monkeypatch.setattr(model_runner, "ModelRunner", StubRunner)
    monkeypatch.setattr(model_runner, "native_bf16", lambda: native)
    monkeypatch.setattr(bench_bf16, "video_frames", lambda path, size, every, count: [np.zeros((3, *size), np.uint8)])
    monkeypatch.setattr(sys, "argv", ["bench_bf16.py", "--video", str(tmp_path / "clip.mp4"), "--rounds", "0"])
    bench_bf16.main()
    said = [line for line in capsys.readouterr().out.splitlines() if "native bf16" in line]
    assert said == ([] if native else ["  this CPU has no native bf16 (AVX512-BF16 or AMX): OpenVINO runs 'openvino "
                                       "bf16' in f32 here, so its boxes barely move; check bf16 on the CPU the service "
                                       "runs on"])
