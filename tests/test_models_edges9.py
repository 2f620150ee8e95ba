"""Edges of the model family (ninth round): a head's whole-number fields written as floats or bools, the empty
detections of a batch shared between its images in the autocast dtype, and `export --out` silent for as long as
a large model's export takes."""

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from pipeline import model_commands
from pipeline.cli import main as cli_main

FIVE = ["person", "car", "bicycle", "bus", "truck"]


def small_model(**head) -> HydraNet:
    torch.manual_seed(0)
    return HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                                   neck={"type": "fpn", "channels": 16},
                                   heads={"people": {"classes": ["person"], **head}})).eval()


def test_a_max_detections_written_as_a_float_loads_and_runs(tmp_path):
    """1e2 in a YAML file or a hand-edited checkpoint is a float: max_detections 500.0 loaded, and the first frame
    with 500 candidates failed in torch.topk ("must be int, not float")."""
    path = save_checkpoint(small_model(classes=FIVE, max_detections=500.0), tmp_path / "edited.safetensors")
    loaded, _ = load_checkpoint(path)  # the float is in the file's config as given
    x = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    dets = loaded.detect(x, score_threshold=0.0)  # 126 locations x 5 classes: above 500 candidates an image
    assert all(0 < len(d["people"]) <= 500 for d in dets)
    assert type(loaded.heads["people"].config.max_detections) is int


def test_the_other_whole_number_head_fields_written_as_floats_build():
    """tower_convs 2.0 and norm_groups 4.0 failed building the model, naming neither head nor field."""
    cfg = small_model(tower_convs=2.0, norm_groups=4.0).heads["people"].config
    assert (cfg.tower_convs, cfg.norm_groups) == (2, 4) and type(cfg.tower_convs) is type(cfg.norm_groups) is int


@pytest.mark.parametrize("field, value", [("max_detections", True), ("max_detections", 100.5),
                                          ("max_detections", "100"), ("tower_convs", True), ("norm_groups", 2.5)])
def test_a_bool_or_fraction_for_a_whole_number_head_field_is_refused_by_name(field, value):
    """True passed as 1 (one box a frame, no word), 100.5 as 100."""
    with pytest.raises(ConfigError, match=rf"head 'people'.*{field} must be a whole number, got {value!r}"):
        HydraNetConfig(heads={"people": {"classes": ["person"], field: value}})


def test_a_checkpoint_with_a_bool_max_detections_is_refused_at_load(tmp_path):
    model = small_model()
    model.config.heads["people"]["max_detections"] = True  # as a hand edit of the file's config would leave it
    path = save_checkpoint(model, tmp_path / "edited.safetensors")
    with pytest.raises(CheckpointError, match=r"head 'people'.*max_detections must be a whole number, got True"):
        load_checkpoint(path)


def test_images_without_detections_each_get_their_own_float32_arrays():
    """When no image of a batch had a box, every image got one shared object, in the autocast dtype (bf16 here,
    fp16 on a GPU) where images with boxes get float32: a consumer adding to one image's result changed all."""
    model = small_model()
    x = torch.randint(0, 256, (3, 3, 64, 96), dtype=torch.uint8)
    empty = model.detect(x, score_threshold=1.0, autocast_dtype=torch.bfloat16)  # no score is above 1
    found = model.detect(x, score_threshold=0.0, autocast_dtype=torch.bfloat16)
    dets = [r["people"] for r in empty]
    assert all(len(d) == 0 for d in dets) and all(len(r["people"]) > 0 for r in found)
    assert len({id(d) for d in dets}) == 3
    dets[0].attributes["kind"] = (torch.zeros(0, dtype=torch.long), torch.zeros(0), ["sedan"])
    assert dets[1].attributes == {} and dets[2].attributes == {}
    want = (found[0]["people"].boxes.dtype, found[0]["people"].scores.dtype, torch.long)
    assert want[:2] == (torch.float32, torch.float32)
    assert all((d.boxes.dtype, d.scores.dtype, d.class_ids.dtype) == want and d.boxes.shape == (0, 4) for d in dets)


def test_export_out_says_what_it_does_before_each_slow_stage(tiny_checkpoint, tmp_path, monkeypatch, caplog, capsys):
    """A large model's export printed nothing for tens of seconds: the operator took it for hung. The lines are
    logged (stderr) before the stage starts; stdout keeps the one result line."""
    import models.export

    seen = {}
    load = model_commands.load_checkpoint

    def loading(path, *args, **kwargs):
        seen["load"] = list(caplog.messages)
        return load(path, *args, **kwargs)

    def exporting(model, path, *args, **kwargs):  # stands in for the exporter: the test is about what comes before
        seen["export"] = list(caplog.messages)
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setattr(model_commands, "load_checkpoint", loading)
    monkeypatch.setattr(models.export, "export_onnx", exporting)
    out = tmp_path / "tiny.onnx"
    with caplog.at_level("INFO", logger="pipeline.model_commands"):
        assert cli_main(["export", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert any(f"loading {tiny_checkpoint}" in m for m in seen["load"]), seen
    assert any("exporting to ONNX" in m and str(out) in m for m in seen["export"][len(seen["load"]):]), seen
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"wrote {out} in ") and stdout.count("\n") == 1


@pytest.mark.parametrize("field", ["score_threshold", "nms_iou", "prior_prob", "center_offset"])
def test_a_string_for_a_number_head_field_is_refused_by_name(field):
    """"0.5" quoted in a hand-edited config failed the range check with "'<=' not supported between instances of
    'str' and 'float'", naming neither the field nor what it must be."""
    with pytest.raises(ConfigError, match=f"{field} must be a number, got '0.5'"):
        small_model(**{field: "0.5"})


@pytest.mark.parametrize("size", [(64.5, 96), (True, 96)])
def test_an_input_size_that_is_no_whole_number_is_refused(size):
    """int() cut 256.7 to 256 (and True to 1) without a word: the model ran at a size nobody wrote."""
    with pytest.raises(ConfigError, match="input_size must be whole numbers"):
        HydraNetConfig(input_size=size, heads={"people": {"classes": ["person"]}})


def test_numpy_numbers_stay_accepted_for_a_heads_fields():
    """A head built in code from numpy values (a sweep script's computed max_detections, a threshold from an
    array) was refused by the whole-number and number checks, which looked for Python's int and float."""
    import numpy as np

    from models.heads import HeadConfig

    cfg = HeadConfig(classes=["car"], max_detections=np.int64(100), score_threshold=np.float32(0.3))
    assert cfg.max_detections == 100 and type(cfg.max_detections) is int
    with pytest.raises(ConfigError, match="input_size must be whole numbers"):
        HydraNetConfig(input_size=(np.float32(64.5), 96), heads={"people": {"classes": ["person"]}})
