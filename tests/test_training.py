"""Training: frozen-backbone heads stay bit-identical, resume works, YOLO folders and their errors, eval CLI."""

import json
import subprocess
import sys

import cv2
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.datasets import DatasetError, YoloFolder
from models.hydranet import ConfigError
from models.train import TrainConfig, train
from pipeline.cli import main as cli_main
from synthetic.scene import StreetScene

TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 2, "workers": 0, "warmup_steps": 1}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "base.safetensors"
    return train(TrainConfig(out=out, heads={"people": ["person"]}, steps=3, **TINY), progress=False)


def test_new_head_on_frozen_backbone_leaves_everything_else_bit_identical(base_checkpoint, tmp_path):
    before, _ = load_checkpoint(base_checkpoint)
    out = train(TrainConfig(out=tmp_path / "plus.safetensors", heads={"vehicles": ["car", "bicycle"]},
                            init=base_checkpoint, freeze_shared=True, steps=3, lr=0.05, **TINY), progress=False)
    after, meta = load_checkpoint(out)
    assert after.head_names == ["people", "vehicles"]
    old, new = before.state_dict(), after.state_dict()
    for k, v in old.items():  # weights AND BatchNorm running statistics
        assert torch.equal(v, new[k]), f"{k} changed"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in new.items() if k.startswith("heads.vehicles."))
    x = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    a = before.detect(x, score_threshold=0.0)
    b = after.detect(x, [["people"], ["people", "vehicles"]], score_threshold=0.0)
    for i in range(2):
        assert torch.equal(a[i]["people"].boxes, b[i]["people"].boxes)
        assert torch.equal(a[i]["people"].scores, b[i]["people"].scores)
    assert [h["frozen_shared"] for h in meta["history"]] == [False, True]


def test_training_without_freeze_changes_the_backbone(base_checkpoint, tmp_path):
    before, _ = load_checkpoint(base_checkpoint)
    out = train(TrainConfig(out=tmp_path / "ft.safetensors", heads={"people": ["person"]}, init=base_checkpoint,
                            steps=2, lr=0.05, **TINY), progress=False)
    after, _ = load_checkpoint(out)
    assert not torch.equal(before.backbone.conv1.weight, after.backbone.conv1.weight)


def test_interrupted_training_resumes_where_it_stopped(tmp_path):
    cfg = TrainConfig(out=tmp_path / "r.safetensors", heads={"people": ["person"]}, steps=4, checkpoint_every=2, **TINY)
    seen = []

    def interrupt_after_two_steps(step, losses):
        seen.append(step)
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=interrupt_after_two_steps)
    assert cfg.state_path.is_file() and not cfg.out.exists()
    state = torch.load(cfg.state_path, weights_only=True)
    assert state["step"] == 2 and state["seconds"] > 0
    state["seconds"] = 1000.0  # as if the first run had been long: the record must count it
    torch.save(state, cfg.state_path)
    resumed = []
    train(cfg, progress=False, on_step=lambda step, losses: resumed.append(step))
    assert seen == [0, 1, 2] and resumed == [2, 3]
    assert cfg.out.is_file() and not cfg.state_path.exists()
    record = load_checkpoint(cfg.out)[1]["history"][-1]
    assert record["resumed_from_step"] == 2 and 1000 < record["seconds"] < 1000 + 600


def write_yolo(root, n=4, labels=None, names=("person", "car", "bicycle")):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names: [" + ", ".join(names) + "]\n")
    scene = StreetScene(5)
    for i in range(n):
        frame, truth = scene.step()
        cv2.imwrite(str(root / "images" / f"{i}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if labels is not None:
            text = labels
        else:
            v = truth.visible(0.5)
            h, w = frame.shape[:2]
            rows = [f"{c} {(b[0]+b[2])/2/w:.5f} {(b[1]+b[3])/2/h:.5f} {(b[2]-b[0])/w:.5f} {(b[3]-b[1])/h:.5f}"
                    for b, c in zip(v.boxes, v.class_ids)]
            text = "\n".join(rows)
        (root / "labels" / f"{i}.txt").write_text(text)
    return root


def test_train_on_a_yolo_folder(tmp_path):
    data = write_yolo(tmp_path / "ds")
    ds = YoloFolder(data, (64, 96), augment=False)
    assert ds.classes == ["person", "car", "bicycle"] and len(ds) == 4
    sample = ds[0]
    assert sample.image.shape == (3, 64, 96) and len(sample.boxes) == len(sample.labels) > 0
    out = train(TrainConfig(out=tmp_path / "y.safetensors", heads={"vehicles": ["car"]}, data=str(data), steps=2,
                            **TINY), progress=False)
    assert load_checkpoint(out)[0].head_classes("vehicles") == ["car"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("four_values", r"0\.txt:1: expected 5 values 'class cx cy w h', got 4"),
        ("not_numbers", r"0\.txt:1: not numbers"),
        ("class_out_of_range", r"0\.txt:1: class 7 out of range, the dataset has 3 classes"),
        ("not_normalized", r"0\.txt:1: box values must be normalized"),
        ("binary_label", r"0\.txt: not a text label file"),
        ("all_empty", r"every label file is empty"),
        ("missing_label", r"3\.png: no label file"),
        ("not_an_image", r"3\.png: not an image"),
        ("no_images", r"no images"),
        ("no_names", r"no class names"),
        ("no_labels_dir", r"needs images/ and labels/ folders"),
    ],
)
def test_bad_yolo_datasets_name_the_file_and_problem(case, message, tmp_path):
    root = tmp_path / "ds"
    labels = {"four_values": "0 0.5 0.5 0.1", "not_numbers": "person 0.5 0.5 0.1 0.1",
              "class_out_of_range": "7 0.5 0.5 0.1 0.1", "not_normalized": "0 1.5 0.5 0.1 0.1",
              "all_empty": ""}.get(case)
    write_yolo(root, labels=labels)
    if case == "binary_label":
        (root / "labels" / "0.txt").write_bytes(b"\xff\xfe\x00\x81")
    elif case == "missing_label":
        (root / "labels" / "3.txt").unlink()
    elif case == "not_an_image":
        (root / "images" / "3.png").write_text("I am a text file")
    elif case == "no_images":
        for p in (root / "images").iterdir():
            p.unlink()
    elif case == "no_names":
        (root / "data.yaml").unlink()
    elif case == "no_labels_dir":
        for p in (root / "labels").iterdir():
            p.unlink()
        (root / "labels").rmdir()
    with pytest.raises(DatasetError, match=message):
        YoloFolder(root, (64, 96))


def test_empty_label_files_are_background_images(tmp_path, caplog):
    root = write_yolo(tmp_path / "ds")
    (root / "labels" / "1.txt").write_text("")
    ds = YoloFolder(root, (64, 96), augment=False)
    assert len(ds[1].boxes) == 0
    assert "used as background images" in caplog.text


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("nope")
    assert cli_main(["eval", "--checkpoint", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a safetensors file" in err and "Traceback" not in err
    assert cli_main(["train", "--out", str(tmp_path / "o.safetensors"), "--head", "people=person", "--data",
                     str(tmp_path / "missing"), "--steps", "1", "--no-progress"]) == 2
    assert "needs images/ and labels/ folders" in capsys.readouterr().err


def test_eval_cli_prints_json(base_checkpoint):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--checkpoint", str(base_checkpoint),
                          "--json", "--scenes", "1", "--frames", "4", "--no-progress"],
                         capture_output=True, encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["heads"]) == {"people"}
    assert 0.0 <= report["heads"]["people"]["map50"] <= 1.0
    assert report["frames"] == 4


def test_a_new_head_trains_on_a_frozen_five_level_model_with_offset_points(tmp_path):
    """The imported COCO detector's shape: P3-P7 and a head whose points sit at i * stride. A new head
    trained beside it must leave it bit-identical and learn on all five levels."""
    from models.checkpoint import save_checkpoint
    from models.hydranet import HydraNet, HydraNetConfig

    torch.manual_seed(0)
    base = HydraNet(HydraNetConfig(input_size=(128, 128), backbone=TINY["backbone"],
                                   neck={"type": "fpn", "channels": 16, "extra_levels": 2},
                                   heads={"coco": {"classes": ["person", "car"], "tower": "split", "tower_convs": 1,
                                                   "center_offset": 0.0}}))
    assert base.strides == (8, 16, 32, 64, 128)
    init = save_checkpoint(base, tmp_path / "five.safetensors")
    tiny = {**TINY, "input_size": (128, 128)}
    out = train(TrainConfig(out=tmp_path / "plus.safetensors", heads={"bikes": ["bicycle"]}, init=init,
                            freeze_shared=True, steps=2, lr=0.05, **tiny), progress=False)
    after, _ = load_checkpoint(out)
    for k, v in base.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), f"{k} changed"
    assert after.heads["bikes"].config.center_offset == 0.5 and len(after.heads["bikes"].scales) == 5


def test_size_ranges_continue_the_three_level_pattern():
    from models.losses import SIZE_RANGES, size_ranges

    assert SIZE_RANGES == ((0.0, 48.0), (48.0, 96.0), (96.0, float("inf")))
    assert size_ranges((8, 16, 32, 64, 128))[3:] == ((192.0, 384.0), (384.0, float("inf")))


def test_a_lora_adapter_written_over_its_own_base_is_refused(base_checkpoint, tmp_path, capsys):
    """The adapter file holds only its additions and names its base: written over --from it replaced the full
    model with 16 KB that no longer loaded, and the command said it had written it (exit 0)."""
    base = tmp_path / "base.safetensors"
    base.write_bytes(base_checkpoint.read_bytes())
    assert cli_main(["train", "--from", str(base), "--out", str(base), "--lora", "2", "--head", "bikes=bicycle",
                     "--steps", "1", "--no-progress"]) == 2
    assert "is --from" in capsys.readouterr().err
    assert base.read_bytes() == base_checkpoint.read_bytes()


def test_an_unreadable_resume_state_says_so_and_how_to_start_over(tmp_path):
    """A resume state cut short (written in place, then a kill or a full disk) failed every rerun as a bug."""
    cfg = TrainConfig(out=tmp_path / "r.safetensors", heads={"people": ["person"]}, steps=2, **TINY)
    cfg.state_path.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ConfigError, match=r"r.safetensors.train-state.pt: unreadable resume state .*delete it"):
        train(cfg, progress=False)


def test_a_head_on_a_lora_adapter_trains_on_the_adapters_maps_outside_lora_too(base_checkpoint, tmp_path,
                                                                               monkeypatch):
    """Fine-tuning (here with unfrozen stages) a head that serves from a LoRA adapter trained it on the plain
    maps, though the saved model still routes it through the adapter."""
    from models import hydranet

    adapted = train(TrainConfig(out=tmp_path / "ad.safetensors", heads={"bikes": ["bicycle"]}, init=base_checkpoint,
                                lora={"rank": 2, "stages": 1}, steps=1, **TINY), progress=False)
    seen, features = [], hydranet.HydraNet.features

    def recorded(self, x, adapter=None):
        seen.append(adapter)
        return features(self, x, adapter)

    monkeypatch.setattr(hydranet.HydraNet, "features", recorded)
    out = train(TrainConfig(out=tmp_path / "ft.safetensors", heads={"bikes": ["bicycle"]}, init=adapted,
                            unfreeze_stages=1, steps=2, eval_scenes=1, eval_frames=1, **TINY), progress=False)
    adapter = load_checkpoint(out)[0].adapter_of("bikes")
    assert adapter is not None and seen.count(adapter) == 2, seen  # one pass a step (the others score people)


def test_a_narrow_resnet_trains_in_nchw_on_a_cpu_where_nhwc_kills_the_process(tmp_path):
    """torch 2.13's CPU backward of a strided 1x1 conv narrower than 12 channels in channels_last segfaults:
    `train --width 8` at 192x320 died with SIGSEGV and no message."""
    script = ("from models.train import TrainConfig, train; "
              f"train(TrainConfig(out={str(tmp_path / 'n.safetensors')!r}, heads={{'people': ['person']}}, "
              "input_size=(192, 320), backbone={'type': 'resnet', 'depth': 10, 'width': 8}, "
              "neck={'type': 'fpn', 'channels': 16}, batch_size=2, workers=0, steps=1), progress=False)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])


def test_a_checkpoint_is_readable_by_others_as_the_umask_says(tmp_path):
    """safetensors writes its files 0600: a service running as another user could not read a trained model."""
    import os

    old = os.umask(0o022)
    try:
        path = train(TrainConfig(out=tmp_path / "m.safetensors", heads={"people": ["person"]}, steps=1, **TINY),
                     progress=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
