"""Training edges a user's own data meets: label and class files saved by Windows editors (a byte-order mark,
CRLF) or in another encoding, class ids written as floats, a class listed twice in a merged dataset, a seed near
the top of the accepted range on a YOLO folder, and a run shorter than the learning-rate warm-up."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.checkpoint import load_checkpoint
from models.datasets import DatasetError, YoloFolder, parse_yolo_labels, read_class_names
from models.train import TrainConfig, class_maps, lr_at, train

TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 2, "workers": 0, "warmup_steps": 1}
ROW = "0 0.5 0.5 0.4 0.6"


def write_yolo(root: Path, label: bytes, classes: bytes) -> Path:
    """Two grey pictures with the same label file, class names in classes.txt."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_bytes(classes)
    for i in range(2):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.full((48, 80, 3), 70 + 50 * i, np.uint8))
        (root / "labels" / f"{i}.txt").write_bytes(label)
    return root


def test_label_and_class_files_with_a_byte_order_mark_read_as_written(tmp_path):
    """Notepad's UTF-8 starts with a byte-order mark: every such label file was refused as 'not numbers', and the
    first class of classes.txt was named '\\ufeffperson', so a head of 'person' was not in the data's classes."""
    bom = "\ufeff".encode()
    root = write_yolo(tmp_path / "ds", bom + f"{ROW}\r\n1 0.3 0.3 0.2 0.2\r\n".encode(), bom + b"person\r\ncar\r\n")
    ds = YoloFolder(root, (64, 96), augment=False)
    assert ds.classes == ["person", "car"]
    assert ds.items[0][1][:, 0].tolist() == [0, 1]
    assert class_maps({"people": ["person"]}, ds.classes)["people"].tolist() == [0, -1]


def test_a_class_file_not_in_utf8_is_a_dataset_error_naming_it(tmp_path):
    """classes.txt saved as Latin-1 (a class 'café'): a UnicodeDecodeError, which the CLI calls a bug in
    hydravision."""
    root = write_yolo(tmp_path / "ds", ROW.encode(), "café\nperson\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"classes\.txt: not a UTF-8 text file"):
        read_class_names(root)
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_bytes("names: [café, person]\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"data\.yaml: not a UTF-8 text file"):
        read_class_names(root)


def test_class_ids_written_as_floats_are_read_and_fractions_refused_by_line(tmp_path):
    """numpy.savetxt writes class 1 as 1.000000000000000000e+00: the row was refused as 'not numbers'."""
    path = tmp_path / "a.txt"
    np.savetxt(path, [[1, 0.5, 0.5, 0.25, 0.5], [0, 0.2, 0.2, 0.1, 0.1]])
    assert parse_yolo_labels(path, 2)[:, 0].tolist() == [1, 0]
    path.write_text(f"{ROW}\n0.5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"a\.txt:2: class 0\.5 is not a whole number"):
        parse_yolo_labels(path, 2)


def test_a_class_listed_twice_is_that_class_under_both_ids():
    """A merged dataset's names [person, car, car]: boxes of the second 'car' id were taught as background."""
    assert class_maps({"vehicles": ["car"]}, ["person", "car", "bicycle", "car"])["vehicles"].tolist() == [-1, 0, -1, 0]


def test_the_largest_seed_accepted_trains_on_a_yolo_folder(tmp_path):
    """Seeds up to 2**64 - 1 are accepted, but the YOLO loader's shuffle seed (seed * 1000 + step) overflowed
    torch's generator: 'ValueError: Overflow when unpacking long long', which the CLI calls a bug."""
    root = write_yolo(tmp_path / "ds", ROW.encode(), b"person\n")
    out = train(TrainConfig(out=tmp_path / "o.safetensors", heads={"people": ["person"]}, data=str(root), steps=1,
                            seed=2**64 - 1, **TINY), progress=False)
    assert load_checkpoint(out)[1]["history"][-1]["seed"] == 2**64 - 1


def test_a_run_shorter_than_the_warmup_reaches_the_learning_rate_and_decays():
    """--steps 100 with the warm-up of 200 steps: the learning rate only rose, to half the one asked for, and the
    saved weights were those of its highest step."""
    cfg = TrainConfig(out=Path("unused.safetensors"), heads={"people": ["person"]}, steps=100, lr=1e-3)
    assert cfg.warmup_steps == 200
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert max(lrs) == pytest.approx(cfg.lr)
    assert lrs[-1] < 0.05 * cfg.lr
    long = TrainConfig(out=Path("unused.safetensors"), heads={"people": ["person"]}, steps=3000, lr=1e-3)
    assert [lr_at(s, long) for s in (0, 199, 200)] == [1e-3 / 200, 1e-3, 1e-3]  # a long run's schedule as before
    middle = TrainConfig(out=Path("unused.safetensors"), heads={"people": ["person"]}, steps=300, lr=1e-3)
    assert [lr_at(s, middle) for s in (149, 199)] == [1e-3 * 150 / 200, 1e-3]  # one that decayed already, too
