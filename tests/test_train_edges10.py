"""Training edges a user meets: the dataset layouts Roboflow's "YOLOv8" export and Ultralytics lay out (a data.yaml
naming its splits), train-demo killed an hour in redoing every finished stage, and two trainings to one --out
writing one resume-state temporary file at once."""

import argparse
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models import train as train_module
from models.checkpoint import load_checkpoint, read_tensors, save_checkpoint
from models.datasets import DatasetError, YoloFolder
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.train import TrainConfig, train
from models.train_attributes import AttributeTrainConfig
from pipeline import model_commands
from pipeline.cli import main as cli_main

TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 2, "workers": 0, "warmup_steps": 1}
TINY_ARGS = ["--input-size", "64x96", "--depth", "10", "--width", "8", "--neck-channels", "16", "--batch-size", "1",
             "--steps", "1", "--no-progress"]


def write_split(images: Path, labels: Path, count: int, row: str, name: str) -> None:
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(images / f"{name}{i}.jpg"), np.full((48, 80, 3), 60 + 40 * i, np.uint8))
        (labels / f"{name}{i}.txt").write_text(row + "\n")


def roboflow_export(root: Path) -> Path:
    """As Roboflow's "YOLOv8" export unzips: data.yaml naming ../train/images etc., a folder per split."""
    root.mkdir(parents=True)
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: 2\n"
                                    "names: ['car', 'person']\n\nroboflow:\n  workspace: w\n  version: 1\n")
    write_split(root / "train" / "images", root / "train" / "labels", 2, "1 0.5 0.5 0.4 0.6", "train")
    write_split(root / "valid" / "images", root / "valid" / "labels", 1, "0 0.5 0.5 0.2 0.2", "valid")
    write_split(root / "test" / "images", root / "test" / "labels", 1, "0 0.5 0.5 0.2 0.2", "test")
    return root


def ultralytics_dataset(root: Path) -> Path:
    """Ultralytics' own layout: images/{train,val} with labels/{train,val} beside them."""
    write_split(root / "images" / "train", root / "labels" / "train", 2, "1 0.5 0.5 0.4 0.6", "train")
    write_split(root / "images" / "val", root / "labels" / "val", 1, "0 0.5 0.5 0.2 0.2", "val")
    return root


def test_a_roboflow_export_trains_on_its_train_split(tmp_path, capsys):
    """Refused: 'a YOLO dataset needs images/ and labels/ folders', the folder or its data.yaml alike."""
    root = roboflow_export(tmp_path / "Warehouse.v1i.yolov8")
    for given in (root, root / "data.yaml"):
        ds = YoloFolder(given, (64, 96), augment=False)
        assert ds.classes == ["car", "person"]
        assert [p.name for p, _ in ds.items] == ["train0.jpg", "train1.jpg"]
        assert [rows[:, 0].tolist() for _, rows in ds.items] == [[1], [1]]
    assert [p.name for p, _ in YoloFolder(root, (64, 96), split="val").items] == ["valid0.jpg"]
    out = tmp_path / "m.safetensors"
    assert cli_main(["train", "--out", str(out), "--head", "people=person", "--data", str(root), *TINY_ARGS]) == 0
    assert load_checkpoint(out)[1]["history"][-1]["data"] == str(root.resolve())


def test_an_ultralytics_dataset_trains_on_its_train_split_only(tmp_path):
    """images/train + images/val with data.yaml naming them: every image was read as training data, the
    validation pictures included; a data.yaml outside the dataset (coco8.yaml, with path:) was refused."""
    root = ultralytics_dataset(tmp_path / "ds")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: {0: car, 1: person}\n")
    ds = YoloFolder(root, (64, 96), augment=False)
    assert ds.classes == ["car", "person"] and [p.name for p, _ in ds.items] == ["train0.jpg", "train1.jpg"]
    outside = tmp_path / "coco8.yaml"  # relative to path:, itself relative to the YAML's folder
    outside.write_text("path: ds\ntrain: images/train\nval: images/val\nnames:\n  0: car\n  1: person\n")
    assert [p.name for p, _ in YoloFolder(outside, (64, 96)).items] == ["train0.jpg", "train1.jpg"]
    assert [p.name for p, _ in YoloFolder(outside, (64, 96), split="val").items] == ["val0.jpg"]
    (root / "train.txt").write_text("./images/train/train1.jpg\n")  # an image list, as COCO's train2017.txt
    outside.write_text("path: ds\ntrain: [train.txt]\nnames: [car, person]\n")
    assert [p.name for p, _ in YoloFolder(outside, (64, 96)).items] == ["train1.jpg"]


def test_a_split_folder_that_is_missing_is_named_with_its_file_and_key(tmp_path):
    root = roboflow_export(tmp_path / "export")
    for sub in ("images", "labels"):
        for p in (root / "train" / sub).iterdir():
            p.unlink()
        (root / "train" / sub).rmdir()
    (root / "train").rmdir()
    yaml = root / "data.yaml"
    with pytest.raises(DatasetError, match=re.escape(f"{yaml}: 'train: ../train/images' is missing (looked for "
                                                     f"{root}/../train/images, {root}/train/images)")):
        YoloFolder(root, (64, 96))
    write_split(root / "train" / "images", root / "train" / "lbls", 1, "0 0.5 0.5 0.2 0.2", "train")
    with pytest.raises(DatasetError, match=r"train0\.jpg: no label file \(expected .*train/labels/train0\.txt\)"):
        YoloFolder(root, (64, 96))


@pytest.fixture
def demo_stages(monkeypatch):
    """train-demo's four trainers, stood in for: each records its call and writes its --out as the real one
    would (its history record; the frozen weights it started from unchanged); the final evaluation skipped."""
    calls = []
    tiny = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                          neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}})

    def train_model(cfg, progress=True):
        calls.append(cfg.out.name)
        model, history = (load_checkpoint(cfg.init) if cfg.init else (HydraNet(tiny), {}))
        for name, classes in cfg.heads.items():
            if name not in model.heads:
                model.add_head(name, classes)
        record = {"heads": list(cfg.heads), "steps": cfg.steps, "data": cfg.data, "seed": cfg.seed,
                  "frozen_shared": cfg.freeze_shared, "init": str(cfg.init) if cfg.init else None}
        return save_checkpoint(model, cfg.out, {"history": history.get("history", []) + [record]})

    def train_attribute_head(cfg, progress=True):
        calls.append(cfg.out.name)
        model, history = load_checkpoint(cfg.init)
        record = {"attribute": cfg.name, "labels": cfg.labels, "on": cfg.on, "of": cfg.of, "steps": cfg.steps,
                  "seed": cfg.seed, "frozen_shared": True, "init": str(cfg.init)}
        return save_checkpoint(model, cfg.out, {"history": history["history"] + [record]})

    def train_reid_head(cfg, progress=True):
        calls.append(cfg.out.name)
        model, history = load_checkpoint(cfg.init)
        return save_checkpoint(model, cfg.out, history), []

    for fn in (train_model, train_attribute_head, train_reid_head):
        monkeypatch.setattr(model_commands, fn.__name__, fn)
    monkeypatch.setattr(model_commands, "evaluate_model", lambda model, cfg, progress=True: {})
    return calls


def demo_args(out: Path, steps=(3, 2, 2, 1), fresh=False) -> argparse.Namespace:
    """What `hydravision train-demo` parses (its own parser: a flag it lacks fails here)."""
    from pipeline.cli import build_parser

    argv = ["train-demo", "--out", str(out), "--steps", *map(str, steps), "--no-progress"] + ["--fresh"] * fresh
    return build_parser().parse_args(argv)


def killed_in(stage: str, monkeypatch):
    """Makes the trainer of ``stage`` (a module attribute of model_commands) stop the run as a kill would."""
    real = getattr(model_commands, stage)

    def killed(cfg, progress=True):
        monkeypatch.setattr(model_commands, stage, real)
        raise KeyboardInterrupt
    monkeypatch.setattr(model_commands, stage, killed)


def test_train_demo_killed_in_its_third_stage_reuses_the_stages_it_finished_with_the_real_trainers(
        tmp_path, monkeypatch, caplog):
    """Run again, train-demo trained every stage from the start (an hour on this machine) although the files of
    the finished ones were there. The real trainers, made tiny: what they record is what the check reads."""
    monkeypatch.setattr(model_commands, "TrainConfig", lambda **kw: TrainConfig(**{**TINY, **kw}))
    monkeypatch.setattr(model_commands, "AttributeTrainConfig", lambda **kw: AttributeTrainConfig(batch_size=2, **kw))
    calls = []
    for name in ("train_model", "train_attribute_head"):
        def counted(cfg, progress=True, real=getattr(model_commands, name)):
            calls.append(cfg.out.name)
            return real(cfg, progress=False)
        monkeypatch.setattr(model_commands, name, counted)
    monkeypatch.setattr(model_commands, "train_reid_head",
                        lambda cfg, progress=True: (save_checkpoint(load_checkpoint(cfg.init)[0], cfg.out), []))
    monkeypatch.setattr(model_commands, "evaluate_model", lambda model, cfg, progress=True: {})
    out = tmp_path / "demo.safetensors"
    killed_in("train_attribute_head", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        model_commands.train_demo(demo_args(out, steps=(1, 1, 2, 1)))
    assert calls == ["demo.base.safetensors", "demo.heads.safetensors"]
    with caplog.at_level(logging.INFO, logger="pipeline.model_commands"):
        model_commands.train_demo(demo_args(out, steps=(1, 1, 2, 1)))
    assert calls[2:] == ["demo.attribute.safetensors"]  # stages 1 and 2 not trained again
    assert f"stage 1 of 4: reusing {tmp_path / 'demo.base.safetensors'}, made by the same settings" in caplog.text
    assert f"stage 2 of 4: reusing {tmp_path / 'demo.heads.safetensors'}, made by the same settings" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.safetensors"]


def test_train_demo_redoes_a_stage_made_otherwise_or_damaged_and_all_with_fresh(tmp_path, demo_stages, monkeypatch,
                                                                                 caplog):
    out = tmp_path / "demo.safetensors"
    base, heads, attribute = (tmp_path / f"demo.{s}.safetensors" for s in ("base", "heads", "attribute"))

    def trained_before_a_kill(steps=(3, 2, 2, 1)) -> list[str]:
        """The stage files train-demo trains when it is killed in its re-ID stage."""
        del demo_stages[:]
        killed_in("train_reid_head", monkeypatch)
        with caplog.at_level(logging.INFO, logger="pipeline.model_commands"), pytest.raises(KeyboardInterrupt):
            model_commands.train_demo(demo_args(out, steps=steps))
        return list(demo_stages)

    assert trained_before_a_kill() == [base.name, heads.name, attribute.name]  # killed in the re-ID stage
    # the vehicles stage asked for with other steps: it and the next redone
    assert trained_before_a_kill(steps=(3, 5, 2, 1)) == [heads.name, attribute.name]
    assert trained_before_a_kill(steps=(3, 5, 2, 1)) == []  # everything as made: nothing redone
    heads_made = read_tensors(heads)
    model, training = load_checkpoint(base)  # the base replaced by other weights with the same record
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(model, base, training)
    assert trained_before_a_kill(steps=(3, 5, 2, 1)) == [heads.name, attribute.name]
    assert f"{heads} was made from another {base}: training it again" in caplog.text
    assert not torch.equal(read_tensors(heads)["backbone.conv1.weight"], heads_made["backbone.conv1.weight"])
    heads.write_bytes(heads.read_bytes()[:100])  # cut short
    assert trained_before_a_kill(steps=(3, 5, 2, 1)) == [heads.name, attribute.name]
    assert f"stage 2 of 4: {heads} cannot be reused" in caplog.text
    del demo_stages[:]
    model_commands.train_demo(demo_args(out, steps=(3, 5, 2, 1), fresh=True))
    assert demo_stages == [base.name, heads.name, attribute.name, out.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_two_trainings_to_one_out_at_once_the_second_is_refused_and_the_first_keeps_its_resume_state(
        tmp_path, monkeypatch):
    """Both wrote the resume state through one fixed '.train-state.pt.tmp': the second, saving while the first
    was between its write and its rename, renamed the first's temporary file away (the first then failed with
    FileNotFoundError after its training), or the first renamed the other's half-written file into place. Since
    then a second run into the same --out is refused while the first holds its lock (both had exited 0, the last
    to finish replacing the other's model)."""
    cfg = TrainConfig(out=tmp_path / "m.safetensors", heads={"people": ["person"]}, steps=1, **TINY)
    real, written, refused = torch.save, [], []

    def interleaved(obj, f, *args, **kwargs):
        written.append(str(f))
        real(obj, f, *args, **kwargs)
        if len(written) == 1:  # the other training starts while this one is between its write and its rename
            with pytest.raises(ConfigError, match="another training run is writing it now"):
                train(TrainConfig(out=cfg.out, heads=cfg.heads, steps=1, seed=1, **TINY), progress=False)
            refused.append(True)

    monkeypatch.setattr(train_module.torch, "save", interleaved)
    assert train(cfg, progress=False) == cfg.out and refused == [True]
    assert len(written) == 1 and written[0].endswith(".tmp")
    assert load_checkpoint(cfg.out)[1]["history"][-1]["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # the lock file gone too


def test_the_data_trained_on_is_said_and_nc_disagreeing_with_names_is_refused(tmp_path, caplog):
    """A copied data.yaml's `path:` trained on the original dataset without a word (only `wrote X` was printed);
    `nc: 3` beside two names was taken silently, which Ultralytics refuses (which class a label's number means)."""
    root = roboflow_export(tmp_path / "rf")
    with caplog.at_level(logging.INFO, logger="models.datasets"):
        YoloFolder(root, (64, 96), augment=False)
    said = [r.getMessage() for r in caplog.records if "images from" in r.getMessage()]
    assert said and "2 images from" in said[0] and "data.yaml" in said[0] and "['car', 'person']" in said[0]
    text = (root / "data.yaml").read_text()
    assert "nc: 2\n" in text
    (root / "data.yaml").write_text(text.replace("nc: 2\n", "nc: 3\n"))
    with pytest.raises(DatasetError, match=r"'nc' is 3 but 'names' lists 2 classes"):
        YoloFolder(root, (64, 96), augment=False)


def test_a_data_yaml_carried_over_with_paths_of_another_machine_reads_the_folders_beside_it(tmp_path, caplog):
    """A plain images/ + labels/ folder whose data.yaml names a `train:` of another machine trained on images/
    before the data.yaml layouts were read; it was refused since. Said, and the folders beside it are read."""
    root = tmp_path / "ds"
    write_split(root / "images", root / "labels", 2, "1 0.5 0.5 0.4 0.6", "img")
    (root / "data.yaml").write_text("train: /home/someone/ds/images\nnames: [car, person]\n")
    with caplog.at_level(logging.WARNING, logger="models.datasets"):
        ds = YoloFolder(root, (64, 96), augment=False)
    assert [p.name for p, _ in ds.items] == ["img0.jpg", "img1.jpg"]
    assert any("/home/someone/ds/images" in r.getMessage() and "beside it" in r.getMessage() for r in caplog.records)
    (root / "labels").rename(root / "elsewhere")  # nothing beside it either: refused as before, naming the key
    with pytest.raises(DatasetError, match="'train: /home/someone/ds/images' is missing"):
        YoloFolder(root, (64, 96), augment=False)
