"""YOLO dataset edges a user's own data meets: segmentation (polygon) labels, a pose dataset's keypoint rows, images
in a symlinked subfolder, and TIFF images."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.datasets import DatasetError, YoloFolder

ROW = "0 0.5 0.5 0.4 0.6"


def write_yolo(root: Path, rows: dict[str, str], yaml: str = "names: [person, car]\n", suffix: str = ".png") -> Path:
    """images/ and labels/ with one grey picture per label file (name -> its text), class names in data.yaml."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(yaml)
    for i, (name, text) in enumerate(rows.items()):
        assert cv2.imwrite(str(root / "images" / f"{name}{suffix}"), np.full((48, 80, 3), 60 + 40 * i, np.uint8))
        (root / "labels" / f"{name}.txt").write_text(text)
    return root


def test_polygon_rows_are_read_as_their_bounding_box(tmp_path):
    """A Roboflow / Ultralytics segmentation export (class x1 y1 ... xn yn) was refused at its first row as 'expected
    5 values'; Ultralytics trains a detector on each polygon's bounding box."""
    root = write_yolo(tmp_path / "ds", {"a": "1 0.1 0.2 0.5 0.2 0.5 0.8 0.3 0.9 0.1 0.6\n" + ROW + "\n"})
    ds = YoloFolder(root, (64, 96), augment=False)
    assert ds.items[0][1] == pytest.approx(np.array([[1, 0.3, 0.55, 0.4, 0.7], [0, 0.5, 0.5, 0.4, 0.6]]))
    assert ds[0].labels.tolist() == [1, 0] and len(ds[0].boxes) == 2
    bad = {"8 values": ("0 0.1 0.2 0.5 0.2 0.5 0.8 0.3", r"a\.txt:1: expected 5 values 'class cx cy w h', got 8"),
           "off the picture": ("0 0.1 0.2 1.5 0.2 0.5 0.8", r"a\.txt:1: box values must be normalized to \[0, 1\]"),
           "a line": ("0 0.1 0.2 0.5 0.2 0.3 0.2", r"a\.txt:1: box values must be normalized .* positive size")}
    for row, message in bad.values():
        (root / "labels" / "a.txt").write_text(row + "\n")
        with pytest.raises(DatasetError, match=message):
            YoloFolder(root, (64, 96))


def test_a_pose_datasets_rows_are_read_as_their_box(tmp_path):
    """A pose dataset (data.yaml's kpt_shape): each row is a box and then its points, not a polygon."""
    row = "0 0.5 0.5 0.2 0.4 0.45 0.35 0.55 0.65"  # box, then 2 points (x, y): as many values as a polygon's
    root = write_yolo(tmp_path / "ds", {"a": row}, yaml="names: [person]\nkpt_shape: [2, 2]\n")
    assert YoloFolder(root, (64, 96), augment=False).items[0][1].tolist() == [[0, 0.5, 0.5, 0.2, 0.4]]


def test_images_in_a_symlinked_subfolder_are_read(tmp_path):
    """images/extra linked to a folder elsewhere (a dataset put together without copying) was skipped without a
    word: Path.rglob does not enter symlinked folders, Ultralytics' glob does. A link back up is no loop."""
    root = write_yolo(tmp_path / "ds", {"a": ROW})
    elsewhere = write_yolo(tmp_path / "more", {"b": ROW, "c": ROW})
    (root / "images" / "extra").symlink_to(elsewhere / "images", target_is_directory=True)
    (root / "labels" / "extra").symlink_to(elsewhere / "labels", target_is_directory=True)
    (elsewhere / "images" / "up").symlink_to(root / "images", target_is_directory=True)
    ds = YoloFolder(root, (64, 96), augment=False)
    assert [p.relative_to(root / "images").as_posix() for p, _ in ds.items] == ["a.png", "extra/b.png", "extra/c.png"]


def test_tiff_images_are_read(tmp_path):
    """Ultralytics reads .tif/.tiff images; here they were left out ('no images' when all a dataset has)."""
    root = write_yolo(tmp_path / "ds", {"a": ROW, "b": ROW}, suffix=".tif")
    (root / "images" / "b.tif").rename(root / "images" / "b.TIFF")
    ds = YoloFolder(root, (64, 96), augment=False)
    assert [p.name for p, _ in ds.items] == ["a.tif", "b.TIFF"] and ds[1].image.shape == (3, 64, 96)


def test_an_image_too_large_for_pil_is_a_dataset_error(tmp_path, monkeypatch) -> None:
    """PIL refuses a picture over twice its MAX_IMAGE_PIXELS (a decompression bomb): a DatasetError naming the
    file, not a traceback."""
    from PIL import Image

    from models.datasets import DatasetError, check_image

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DatasetError, match="big.png"):
        check_image(path)
