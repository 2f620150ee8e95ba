"""Model tooling an operator ran in round 13: train-attribute, train-reid and eval say how far they are where the
bar is off (a log, a pipe); a truncated JPEG in a YOLO dataset is refused naming it; log lines claim only work
that happens (an export or int8 quantization refused before it is announced; an export found made by another
process is not "wrote"); an attribute head that scored nothing is null, not 0.0; two trainings into one --out
at once: the second is refused."""

import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import models.evaluate as evaluate_module
import models.export as export_module
import models.train_attributes as train_attributes_module
from models.checkpoint import save_checkpoint
from models.datasets import DatasetError, YoloFolder
from models.evaluate import AttributeScore, EvalConfig, evaluate
from models.export import cache_path, cached_export, file_lock
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.train import TrainConfig, train
from models.train_attributes import AttributeTrainConfig, train_attribute
from models.train_reid import ReIDTrainConfig, match_accuracy, train_reid
from pipeline import model_commands
from pipeline.cli import main as cli_main

TINY = {"input_size": (64, 96), "batch_size": 2, "workers": 0, "warmup_steps": 1}
TINY_ARGS = ["--input-size", "64x96", "--depth", "10", "--width", "8", "--neck-channels", "16", "--batch-size", "1",
             "--steps", "1", "--no-progress"]
KIND = ["--attribute", "kind=sedan,hatch,van", "--on", "vehicles=car"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random model with the demo's detection heads, trained one step on synthetic data (its history
    names the data int8 calibrates on)."""
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                    neck={"type": "fpn", "channels": 16},
                                    heads={"people": {"classes": ["person"]},
                                           "vehicles": {"classes": ["car", "bicycle"]}}))
    return save_checkpoint(model, tmp_path_factory.mktemp("tools13") / "base.safetensors")


@pytest.fixture(scope="module")
def lora(base) -> Path:
    out = base.with_name("lora.safetensors")
    return train(TrainConfig(out=out, heads={"bikes": ["bicycle"]}, init=base, lora={"rank": 2}, steps=1, **TINY),
                 progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HYDRAVISION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


# 1. progress where the bar is off ------------------------------------------------------------------------------

def test_train_attribute_logs_progress_without_its_bar(base, tmp_path, caplog, monkeypatch):
    """Only a tqdm bar, which is off in a pipe: 150 steps ran 104 s without a line."""
    monkeypatch.setattr(train_attributes_module, "PROGRESS_EVERY", 1)
    with caplog.at_level(logging.INFO):
        train_attribute(AttributeTrainConfig(init=base, out=tmp_path / "o.safetensors", name="kind",
                                             labels=["sedan", "hatch", "van"], on="vehicles", of=["car"], steps=2,
                                             batch_size=4), progress=False)
    assert "step 2/2 loss" in caplog.text and "steps/s" in caplog.text


def test_train_reid_logs_progress_without_its_bar(base, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(train_attributes_module, "PROGRESS_EVERY", 1)
    with caplog.at_level(logging.INFO):
        train_reid(ReIDTrainConfig(init=base, out=tmp_path / "o.safetensors", heads=["people", "vehicles"], steps=2,
                                   scenes_per_step=1, views=2), progress=False)
    assert "step 1/2 loss" in caplog.text and "step 2/2 loss" in caplog.text


def test_eval_logs_progress_without_its_bar(base, caplog, monkeypatch):
    """train --unfreeze-stages scores the other heads before and after: minutes of silence on a large model."""
    from models.checkpoint import load_checkpoint

    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY", 2)
    model, _ = load_checkpoint(base)
    with caplog.at_level(logging.INFO):
        evaluate(model, EvalConfig(scenes=1, frames_per_scene=4, frame_stride=1, batch_size=1), progress=False)
    assert "eval: frame 2/4" in caplog.text and "eval: frame 4/4" in caplog.text
    assert "frame 3/4" not in caplog.text


def test_train_attribute_ends_with_what_it_did(base, tmp_path, capsys):
    """It printed only 'wrote <path>', where train-reid says its time and loss."""
    out = tmp_path / "o.safetensors"
    rc = cli_main(["train-attribute", "--from", str(base), "--out", str(out), *KIND, "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    line = captured.out.strip()
    assert line.startswith(f"wrote {out}: attribute head 'kind' (sedan, hatch, van) on 'vehicles' boxes of car"), line
    assert " s, " in line and "objects, loss " in line and " -> " in line and "\n" not in line


# 2. a truncated JPEG ---------------------------------------------------------------------------------------------

def yolo_folder(root: Path, images: dict[str, bytes]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("person\n")
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
        (root / "labels" / name).with_suffix(".txt").write_text("0 0.5 0.5 0.2 0.4\n")
    return root


def jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)  # no run compresses away
    return cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def test_a_truncated_jpeg_is_refused_naming_it(tmp_path):
    """PIL's verify() reads the headers only: it was trained on, libjpeg saying 'Premature end of JPEG file'
    without the file's name."""
    data = jpeg()
    root = yolo_folder(tmp_path / "d", {"im1.jpg": data, "im3.jpg": data[: len(data) * 2 // 3]})
    with pytest.raises(DatasetError, match=r"images/im3\.jpg: not an image \(image file is truncated"):
        YoloFolder(root, (64, 96))


def test_a_whole_jpeg_with_data_after_its_end_is_taken(tmp_path):
    """Some cameras write data after the picture's end marker: decoded, not refused."""
    root = yolo_folder(tmp_path / "d", {"im1.jpg": jpeg() + b"\0trailer" * 10})
    assert len(YoloFolder(root, (64, 96))) == 1


# 3. lines claiming work that does not happen ---------------------------------------------------------------------

def test_an_adapter_model_is_refused_before_an_export_is_announced(base, cache, caplog):
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(base)
    model.add_head("bikes", ["bicycle"])
    model.add_adapter("bikes", ["bikes"])
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError, match="LoRA adapters"):
        cached_export(model, base)
    assert "exporting" not in caplog.text and not cache.exists()


@pytest.mark.parametrize("command", [["eval", "--checkpoint", "{}", "--backend", "onnxruntime", "--scenes", "1",
                                      "--frames", "1"],
                                     ["export", "{}", "--out", "x.onnx"]])
def test_a_lora_file_is_refused_before_a_line_says_it_is_exported(command, lora, cache, tmp_path, capsys, caplog,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        rc = cli_main([a.format(lora) for a in command])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "are not exported" in err and "Traceback" not in err
    assert "exporting" not in caplog.text + err and not (tmp_path / "x.onnx").exists()


def test_int8_without_its_calibration_data_is_refused_before_any_export_or_quantizing(base, cache, tmp_path, capsys,
                                                                                      caplog):
    """It exported, logged 'quantizing ... to int8 (once; cached at ...)', then refused."""
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(base)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", {"history": [{"data": str(tmp_path / "gone")}]})
    with caplog.at_level(logging.INFO):
        rc = cli_main(["eval", "--checkpoint", str(ckpt), "--backend", "openvino", "--precision", "int8",
                       "--scenes", "1", "--frames", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{tmp_path / 'gone'} (from the checkpoint's history) is not here" in err
    assert "quantizing" not in caplog.text + err and "exporting" not in caplog.text + err and not cache.exists()


def test_an_export_another_process_made_while_this_one_waited_is_not_reported_written(base, cache, capsys, caplog,
                                                                                      monkeypatch):
    """Two exports into an empty cache: the one that waited for the other's lock said 'wrote ... in 1.2 s'."""
    real_lock = export_module.file_lock

    @contextlib.contextmanager
    def lock_the_other_held(path, **kwargs):  # the other process wrote the export, then let go of its lock
        with real_lock(path, **kwargs):
            cache_path(base).write_bytes(b"the other process's export")
            yield

    monkeypatch.setattr(export_module, "file_lock", lock_the_other_held)
    with caplog.at_level(logging.INFO):
        rc = cli_main(["export", str(base)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "wrote" not in out and f"{cache_path(base)} is up to date (exported meanwhile by another process" in out
    assert "made meanwhile by another process" in caplog.text and "exporting" not in caplog.text


def test_an_export_this_process_makes_is_reported_written(base, cache, capsys):
    rc = cli_main(["export", str(base)])
    assert rc == 0 and capsys.readouterr().out.startswith(f"wrote {cache_path(base)} in ")


# 4. nothing scored is null, not 0 -----------------------------------------------------------------------------------

def test_an_attribute_head_that_scored_no_object_is_null_not_zero():
    report = AttributeScore(["sedan", "hatch"]).report()
    assert report["accuracy"] is None and report["scored"] == 0
    assert json.loads(json.dumps(report))["accuracy"] is None
    text = model_commands.format_report({"checkpoint": "m.safetensors", "frames": 4, "scenes": 1, "heads": {},
                                         "attributes": {"kind": report}})
    assert "attribute kind: not scored: no detected objects to score (of 0 in the frames)" in text
    assert "accuracy 0.000" not in text


def test_re_id_matches_with_nothing_compared_are_null_not_zero():
    model = SimpleNamespace(config=SimpleNamespace(reid={"heads": []}, heads={}))
    assert match_accuracy(model, []) == {"accuracy": None, "chance": None, "scored": 0}


def test_a_fine_tune_whose_attribute_scores_nothing_after_is_said(tmp_path, monkeypatch):
    """score_heads gives why an attribute head was not scored; the summary printed '0.812 -> 0.000' (or failed
    on a reason after a score)."""
    import models.train as train_module

    reports = iter([{"heads": {}, "attributes": {"kind": {"accuracy": 0.8125, "scored": 16}}},
                    {"heads": {}, "attributes": {"kind": AttributeScore(["a", "b"]).report()}}])
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: next(reports))
    cfg = TrainConfig(out=tmp_path / "o.safetensors", heads={"people": ["person"]})
    before, after = (train_module.score_heads(torch.nn.Module(), [], cfg) for _ in range(2))
    assert before == {"attribute kind": 0.8125}
    assert after == {"attribute kind": "not scored: no detected objects to score"}
    monkeypatch.setattr(model_commands, "read_metadata", lambda path: {"training": {"history": [
        {"unfrozen_stages": 1, "other_heads_map50": {"before": before, "after": after}}]}})
    assert ("attribute kind 0.812 -> not scored: no detected objects to score"
            in model_commands.format_fine_tune(Path("o.safetensors")))


# 5. two trainings into one --out -------------------------------------------------------------------------------------

def test_a_second_training_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, monkeypatch):
    """Both trained and exited 0 'wrote ...', sharing the resume state; the last to finish won."""
    out = tmp_path / "o.safetensors"
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: steps.append(1))  # no training step may run
    with file_lock(out.with_name(out.name + ".lock")):  # the first run, training (a lock of its own open file)
        rc = cli_main(["train", "--out", str(out), "--head", "people=person", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"--out {out}: another training run is writing it now" in err and "Traceback" not in err
    assert not steps and not out.exists()


def test_a_training_alone_takes_and_leaves_its_lock(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert cli_main(["train", "--out", str(out), "--head", "people=person", *TINY_ARGS]) == 0
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_int8_quantized_before_needs_no_calibration_data(base, cache, tmp_path):
    """The int8 copy is made once and cached; its training data moved since (or the cache copied to another
    machine): `run` ran it, and the check before an int8 eval refused it for data it no longer needed."""
    from models.checkpoint import load_checkpoint
    from models.export import export_onnx
    from models.quantize import check_sources, int8_path

    model, _ = load_checkpoint(base)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", {"history": [{"data": str(tmp_path / "gone")}]})
    history = [{"data": str(tmp_path / "gone")}]
    with pytest.raises(ConfigError, match="is not here"):  # nothing cached: refused before any work, as before
        check_sources(ckpt, history)
    export_onnx(model, int8_path(cache_path(ckpt, "torch")))  # stands for the int8 copy an earlier run made
    check_sources(ckpt, history)  # no calibration needed


def test_the_services_int8_without_its_calibration_data_is_refused_before_any_export_or_quantizing(
        base, cache, tmp_path, caplog):
    """`run` with precision int8 (OpenVINO): it exported, logged 'quantizing ... (once; cached at ...)', then
    refused; eval was mended first. The service's session asks the same check before its export now."""
    from models.checkpoint import load_checkpoint
    from workers.model_runner import ModelRunner

    model, _ = load_checkpoint(base)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", {"history": [{"data": str(tmp_path / "gone")}]})
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError, match="is not here"):
        ModelRunner(ckpt, "cpu", "int8", threads=1, max_batch=2, backend="openvino")
    assert "quantizing" not in caplog.text and "exporting" not in caplog.text and not cache.exists()


@pytest.mark.parametrize("command", ["train-attribute", "train-reid"])
def test_a_head_trained_into_an_out_another_run_writes_is_refused(base, tmp_path, command):
    """`train` took a lock on its --out; train-attribute and train-reid wrote beside a running training (the last to
    finish replacing the other's model, both exit 0)."""
    out = tmp_path / "o.safetensors"
    with file_lock(out.with_name(out.name + ".lock")), pytest.raises(ConfigError, match="another training run"):
        if command == "train-attribute":
            train_attribute(AttributeTrainConfig(init=base, out=out, name="kind", labels=["sedan", "hatch", "van"],
                                                 on="vehicles", of=["car"], steps=1, batch_size=2), progress=False)
        else:
            train_reid(ReIDTrainConfig(init=base, out=out, heads=["people"], steps=1, scenes_per_step=1, views=2),
                       progress=False)
    assert not out.exists()
