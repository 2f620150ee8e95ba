"""Training data: endless synthetic street scenes, or a YOLO-format dataset (images/ + labels/, or a data.yaml's
splits as Ultralytics and Roboflow lay them out)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from models.letterbox import boxes_to_model, letterbox, paste, resize
from synthetic.scene import CLASS_NAMES, StreetScene

log = logging.getLogger(__name__)

TRAIN_SEED_LIMIT = 1_000_000  # training scenes use seeds below this; evaluation uses seeds above
# ... and from this up: the seeds below are the benchmarks' and checks' scenes (benchmarks/bench_*.py), never trained on
FIRST_TRAIN_SEED = 1000
MIN_VISIBILITY = 0.5  # objects less visible than this are neither targets nor background ("ignore")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}  # those of Ultralytics that cv2 reads


class DatasetError(ValueError):
    """Bad training data; the message names the file (and line) and the problem."""


@dataclass
class Sample:
    image: np.ndarray  # (3, H, W) uint8, letterboxed
    boxes: np.ndarray  # (G, 4) float32 xyxy, model-input pixels
    labels: np.ndarray  # (G,) int64 index into the dataset's class names
    ignore: np.ndarray  # (I, 4) float32 regions that are neither positives nor negatives
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (G,) str per box ("" = none)


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, list[Sample]]:
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    return images, list(samples)


def place(image: np.ndarray, boxes: np.ndarray, ignore: np.ndarray, dst_size: tuple[int, int],
          rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Letterboxes an image; with ``rng`` also jitters scale/position and flips (training augmentation).

    Returns (image CHW uint8, boxes, kept-box mask, ignore) with boxes in model-input pixels.
    """
    if rng is None or rng.random() < 0.3:
        out, lb = letterbox(image, dst_size)
        b, ig = boxes_to_model(boxes, lb), boxes_to_model(ignore, lb)
        return out, b, np.ones(len(b), bool), ig
    dh, dw = dst_size
    sh, sw = image.shape[:2]
    scale = min(dw / sw, dh / sh) * rng.uniform(0.75, 1.3)
    nw, nh = max(1, round(sw * scale)), max(1, round(sh * scale))
    sx, sy = nw / sw, nh / sh  # the picture as really resized (as Letterbox.scales): its edges are the boxes' edges
    resized = resize(image, (nh, nw))
    ox = int(rng.integers(min(0, dw - nw), max(0, dw - nw) + 1))
    oy = int(rng.integers(min(0, dh - nh), max(0, dh - nh) + 1))
    canvas = paste(resized, dst_size, (ox, oy), chw=False)  # a jittered letterbox: may cut the picture

    def move(bx: np.ndarray) -> np.ndarray:
        bx = bx.reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32)
        return np.clip(bx, [0, 0, 0, 0], [dw, dh, dw, dh]).astype(np.float32)

    b, ig = move(boxes), move(ignore)
    before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * sx * sy
    after = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = after > 0.5 * np.maximum(before, 1e-6)  # cut more than half away: no longer a fair target
    ig = np.concatenate([ig, b[~keep & (after > 0)]])
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
        b[:, [0, 2]] = dw - b[:, [2, 0]]
        ig[:, [0, 2]] = dw - ig[:, [2, 0]]
    if rng.random() < 0.8:  # photometric jitter: gain, bias and a per-channel tint
        gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, 3)
        canvas = np.clip(canvas.astype(np.float32) * gain + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)), b, keep, ig


class SyntheticFrames(IterableDataset):
    """Endless frames from a rotating pool of seeded street scenes (seeds FIRST_TRAIN_SEED to TRAIN_SEED_LIMIT)."""

    classes = CLASS_NAMES

    def __init__(self, input_size: tuple[int, int], seed: int = 0, augment: bool = True,
                 pool: int = 6, frames_per_scene: int = 150, frame_stride: int = 4,
                 scene_size: tuple[int, int] = (360, 640)):
        self.input_size, self.seed, self.augment = input_size, seed, augment
        self.pool, self.frames_per_scene, self.frame_stride = pool, frames_per_scene, frame_stride
        self.scene_size = scene_size

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        h, w = self.scene_size

        def new_scene() -> list:
            scene = StreetScene(int(rng.integers(FIRST_TRAIN_SEED, TRAIN_SEED_LIMIT)), width=w, height=h,
                                density=float(rng.uniform(0.6, 1.6)))
            return [scene, 0]

        scenes = [new_scene() for _ in range(self.pool)]
        while True:
            slot = int(rng.integers(len(scenes)))
            scene, used = scenes[slot]
            for _ in range(int(rng.integers(1, 2 * self.frame_stride))):
                frame, truth = scene.step()
            scenes[slot][1] = used + 1
            if used + 1 >= self.frames_per_scene // self.frame_stride:
                scenes[slot] = new_scene()
            good = truth.visibility >= MIN_VISIBILITY
            hidden = ~good & (truth.visibility > 0)
            image, boxes, keep, ignore = place(frame, truth.boxes[good], truth.boxes[hidden], self.input_size,
                                               rng if self.augment else None)
            yield Sample(image, boxes[keep], truth.class_ids[good][keep].astype(np.int64), ignore,
                         {"kind": truth.kinds[good][keep]})


def find_data_yaml(root: Path) -> Path | None:
    """The dataset's YAML file: ``root`` itself when it names one, else data.yaml or dataset.yaml in it."""
    if root.is_file() and root.suffix.lower() in (".yaml", ".yml"):
        return root
    return next((p for name in ("data.yaml", "dataset.yaml") if (p := root / name).is_file()), None)


def read_data_yaml(p: Path) -> dict:
    try:
        data = yaml.safe_load(read_text(p)) or {}
    except yaml.YAMLError as e:
        raise DatasetError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{p}: expected a mapping with 'names', got {type(data).__name__}")
    return data


def read_class_names(root: Path) -> list[str] | None:
    """Class names from data.yaml (``names`` list or {id: name}) or classes.txt, if present."""
    if p := find_data_yaml(root):
        data = read_data_yaml(p)
        names = data.get("names")
        if isinstance(names, dict):  # {id: name}: the ids are the label files' class numbers, so 0..n-1 exactly
            ids = [int(k) if isinstance(k, int) or str(k).strip().isdigit() else -1 for k in names]
            if sorted(ids) != list(range(len(names))):
                raise DatasetError(f"{p}: 'names' ids must be 0..{len(names) - 1}, got {sorted(names, key=str)}")
            names = [name for _, name in sorted(zip(ids, names.values()))]
        if not isinstance(names, list) or not names:
            raise DatasetError(f"{p}: expected 'names' to be a non-empty list or mapping of class names")
        if "nc" in data and data["nc"] != len(names):  # one of them is wrong: which class a label's number means
            raise DatasetError(f"{p}: 'nc' is {data['nc']!r} but 'names' lists {len(names)} classes")
        return [str(n) for n in names]
    p = root / "classes.txt"
    if p.is_file():
        return [ln.strip() for ln in read_text(p).splitlines() if ln.strip()]
    return None


def split_images(data_yaml: Path, data: dict, split: str) -> list[Path]:
    """The images of a split named in data.yaml (a folder, an image list .txt, or a list of them): relative to
    ``path:`` (itself relative to the YAML's folder, where Ultralytics reads a relative one under its datasets
    folder) if given, else to the YAML's folder; a Roboflow export's ``../train/images`` is also tried without
    its ``../``."""
    value = data[split]
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise DatasetError(f"{data_yaml}: '{split}' must name a folder of images (or a list of them), got {value!r}")
    here = data_yaml.parent
    bases = ([here / data["path"]] if isinstance(data.get("path"), str) and data["path"].strip() else []) + [here]
    images: list[Path] = []
    for entry in entries:
        tries = list(dict.fromkeys(b / e for b in bases for e in (entry, entry[3:] if entry.startswith("../") else "")
                                   if e))
        found = next((t for t in tries if t.exists()), None)
        if found is None:
            raise DatasetError(f"{data_yaml}: '{split}: {entry}' is missing (looked for "
                               f"{', '.join(map(str, tries))})")
        if found.is_dir():
            images += images_in(found)
        else:  # an image list, one path a line, relative to the list's folder (COCO's train2017.txt)
            images += [found.parent / ln.strip() for ln in read_text(found).splitlines() if ln.strip()]
    return images


def images_in(folder: Path) -> list[Path]:
    """The images under ``folder``, its subfolders included, in name order."""
    # os.walk, not rglob: rglob does not enter a symlinked subfolder (Ultralytics' glob does); each real folder once,
    # so a link back up is no loop
    images, seen = [], set()
    for top, subs, files in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(top)) in seen:
            subs.clear()
            continue
        seen.add(real)
        images += [Path(top, f) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(images)


def label_of(image: Path) -> Path:
    """Ultralytics' rule: the image's path with its last images/ folder named labels/, and .txt."""
    parts = image.parts
    if "images" not in parts[:-1]:
        raise DatasetError(f"{image}: no images/ folder in its path, so no labels/ folder beside it to read its "
                           "label file from")
    i = len(parts) - 2 - parts[-2::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")


def read_text(path: Path) -> str:
    """A text file of the dataset; "utf-8-sig": Windows editors (Notepad) start UTF-8 files with a byte-order mark."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file") from None


def parse_yolo_labels(path: Path, num_classes: int, keypoints: bool = False) -> np.ndarray:
    """Rows of (class, cx, cy, w, h), normalized; a polygon row (class x1 y1 ... xn yn, a segmentation label) becomes
    its bounding box, as Ultralytics reads it, and with ``keypoints`` (a pose dataset) a row's points after its box
    are left out; raises DatasetError naming file:line on any bad row."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as Windows editors write, is no class
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text label file") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()[:5] if keypoints else line.split()
        polygon = len(parts) >= 7 and len(parts) % 2 == 1  # a class and 3 or more x y points
        if len(parts) != 5 and not polygon:
            raise DatasetError(f"{path}:{n}: expected 5 values 'class cx cy w h', got {len(parts)}: {line.strip()!r} "
                               "(or a polygon 'class x1 y1 x2 y2 x3 y3 ...')")
        try:  # the class as a float too: numpy.savetxt writes 0 as 0.000000000000000000e+00
            cls, *vals = float(parts[0]), *map(float, parts[1:])
        except ValueError:
            raise DatasetError(f"{path}:{n}: not numbers: {line.strip()!r}") from None
        if not cls.is_integer():
            raise DatasetError(f"{path}:{n}: class {parts[0]} is not a whole number: {line.strip()!r}")
        cls = int(cls)
        if not 0 <= cls < num_classes:
            raise DatasetError(f"{path}:{n}: class {cls} out of range, the dataset has {num_classes} classes")
        normalized = all(0.0 <= v <= 1.0 for v in vals)
        if polygon:
            xs, ys = vals[0::2], vals[1::2]
            vals = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        if not normalized or vals[2] <= 0 or vals[3] <= 0:
            raise DatasetError(f"{path}:{n}: box values must be normalized to [0, 1] with positive size: {line.strip()!r}")
        rows.append([cls, *vals])
    return np.array(rows, np.float64).reshape(-1, 5)


class YoloFolder(Dataset):
    """A folder with images/ and labels/ (same relative paths, .txt), plus data.yaml or classes.txt; or a data.yaml
    (or its folder) naming the split's images, as Ultralytics and Roboflow lay them out (labels/ beside images/)."""

    def __init__(self, root: str | Path, input_size: tuple[int, int], augment: bool = True,
                 class_names: Sequence[str] | None = None, seed: int = 0, split: str = "train"):
        self.root = Path(root)
        self.input_size, self.augment = input_size, augment
        self.rng = np.random.default_rng(seed)
        data_yaml = find_data_yaml(self.root)
        data = read_data_yaml(data_yaml) if data_yaml else {}
        images = None
        if split in data:
            try:
                images = split_images(data_yaml, data, split)
            except DatasetError as e:  # a data.yaml carried over from another machine: its paths are not here
                beside = data_yaml.parent
                if not ((beside / "images").is_dir() and (beside / "labels").is_dir()):
                    raise
                log.warning("%s; reading the images/ and labels/ beside it instead", e)
        if images is not None:
            pairs = [(img, label_of(img)) for img in images]
            images_at = labels_at = f"{data_yaml} '{split}'"
        else:
            folder = self.root.parent if data_yaml == self.root else self.root
            images_dir, labels_dir = folder / "images", folder / "labels"
            if not images_dir.is_dir() or not labels_dir.is_dir():
                raise DatasetError(f"{self.root}: a YOLO dataset needs images/ and labels/ folders, or a data.yaml "
                                   f"naming its '{split}' images")
            pairs = [(img, labels_dir / img.relative_to(images_dir).with_suffix(".txt"))
                     for img in images_in(images_dir)]
            images_at, labels_at = images_dir, labels_dir
        names = list(class_names) if class_names else read_class_names(self.root)
        if not names:
            raise DatasetError(f"{self.root}: no class names: add data.yaml with 'names: [...]' or classes.txt")
        self.classes = names
        self.items: list[tuple[Path, np.ndarray]] = []
        empty = []
        for img, label in pairs:
            if not label.is_file():
                raise DatasetError(f"{img}: no label file (expected {label})")
            rows = parse_yolo_labels(label, len(names), keypoints="kpt_shape" in data)
            if len(rows) == 0:
                empty.append(label)
            check_image(img)
            self.items.append((img, rows))
        if not self.items:
            raise DatasetError(f"{images_at}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if len(empty) == len(self.items):
            raise DatasetError(f"{labels_at}: every label file is empty, nothing to learn from")
        if empty:  # YOLO's convention: an empty label file is a background image. Say so, since it may be a mistake.
            log.warning("%d of %d label files are empty and used as background images, e.g. %s",
                        len(empty), len(self.items), empty[0])
        # which data it is: a copied data.yaml's `path:` read the original's images without a word
        log.info("%d images from %s (labels in %s), classes %s", len(self.items), images_at, labels_at, names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        path, rows = self.items[i]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"{path}: cannot be decoded as an image")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)
        # centre and size in [0, 1] can still reach past the picture: the object is what the picture shows of it
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
        out, b, keep, ignore = place(image, boxes, np.zeros((0, 4), np.float32), self.input_size,
                                     self.rng if self.augment else None)
        return Sample(out, b[keep], rows[keep, 0].astype(np.int64), ignore)


def check_image(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
        # verify() reads a JPEG's headers only: one cut short passed, and training decoded part of it with libjpeg's
        # "Premature end of JPEG file" on stderr, no file named; cv2, which decodes it there, reports nothing. PIL's
        # load() of every image here would double the decoding (11-13 ms a 1920x1080 JPEG: ~20 minutes for 100k,
        # where verify() takes 0.04 ms). A whole JPEG ends with its EOI marker (reading it: +0.01 ms): one that does
        # not (cut short, or with data after it, as some cameras write) is decoded here, and a cut one refused.
        if im.format == "JPEG" and not _ends_with_eoi(path):
            with Image.open(path) as im:
                im.load()  # OSError "image file is truncated (...)"
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{path}: not an image ({e})") from None
    except Image.DecompressionBombError as e:  # PIL's guard against a huge picture: said, not a traceback
        raise DatasetError(f"{path}: {e}") from None


def _ends_with_eoi(path: Path) -> bool:
    """Whether the file's last two bytes are a JPEG's end-of-image marker (FF D9)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 2))
        return f.read(2) == b"\xff\xd9"
