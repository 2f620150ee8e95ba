"""What crosses between actors: a letterboxed frame going to inference, small arrays coming back.

Model output becomes ``supervision.Detections`` here and only here (``to_detections``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from models.letterbox import Letterbox, boxes_to_source

if TYPE_CHECKING:  # imported where detections are built: an inference replica never needs supervision (0.5 s)
    import supervision as sv

# One head's result for one frame, as the InferenceActor returns it (model-input pixels):
# {"boxes": (K, 4) float32 xyxy, "scores": (K,) float32, "class_ids": (K,) int64}, and per attribute head
# riding on it "attr:NAME" (K,) str label ("" where it does not apply) and "attr:NAME:conf" (K,) float32;
# "embedding" (K, D) float16 unit vectors when the model has a re-ID head for it (models/reid.py)
HeadArrays = dict[str, np.ndarray]


@dataclass
class FrameRequest:
    """A frame on its way to inference. Only the small letterboxed image travels, never full resolution."""

    camera: str
    frame: int  # index of the frame in this camera's decoded stream
    pts: float  # source timestamp, seconds
    wall: float  # capture wall time (time.time()), for latency
    size: tuple[int, int]  # source (height, width)
    letterbox: Letterbox
    image: np.ndarray  # (3, H, W) uint8, C-contiguous
    heads: list[str] | None = None  # None: every head of the model
    meta: dict = field(default_factory=dict)
    timeout_s: float | None = None  # how long the caller waits for the result; inference drops it after that
    max_wait_s: float | None = None  # longest this frame may wait for its batch to fill; None: the replica's setting

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[0] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"expected a (3, H, W) uint8 image, got {self.image.shape} {self.image.dtype}")
        if tuple(self.image.shape[1:]) != tuple(self.letterbox.dst_size):
            raise ValueError(f"image size {tuple(self.image.shape[1:])} does not match letterbox {self.letterbox.dst_size}")


def to_detections(arrays: HeadArrays, lb: Letterbox, class_names: list[str]) -> sv.Detections:
    """One head's arrays (model-input pixels) -> sv.Detections in source pixels, with class names in data."""
    import supervision as sv

    boxes = np.asarray(arrays["boxes"], np.float32).reshape(-1, 4)
    class_ids = np.asarray(arrays["class_ids"]).astype(int).reshape(-1)
    if len(boxes) == 0:
        det = sv.Detections.empty()
        det.data["class_name"] = np.array([], dtype=str)
        return det
    names = np.array([class_names[i] for i in class_ids.tolist()])
    # attribute arrays ride in data: the tracker's subsets of the detections keep them aligned
    attrs = {k: np.asarray(v) for k, v in arrays.items() if k.startswith("attr:")}
    for key in [k for k in attrs if k.endswith(":conf") and k[:-len(":conf")] in attrs]:
        bad = ~np.isfinite(attrs[key].astype(np.float32))
        if bad.any():  # an overflowed attribute head: its label is an argmax over NaN, so none; a NaN kept would
            # fail the frame's message (not JSON), and summed into the track's vote, every later frame's too
            label = key[:-len(":conf")]
            attrs[label] = np.where(bad, "", attrs[label])
            attrs[key] = np.where(bad, 0, attrs[key]).astype(np.float32)
    if "embedding" in arrays:  # re-ID vectors, for the tracker only: detection_records never reads them
        emb = np.asarray(arrays["embedding"]).reshape(len(boxes), -1)
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():  # an fp16 overflow: no look (a zero vector), not a NaN that fails every later assignment
            emb = emb.copy()
            emb[bad] = 0
        attrs["embedding"] = emb
    det = sv.Detections(
        xyxy=boxes_to_source(boxes, lb),
        confidence=np.asarray(arrays["scores"], np.float32).reshape(-1),
        class_id=class_ids,
        data={"class_name": names, **attrs},
    )
    # a box in the letterbox padding clips to no area, as does one the model gave no extent (relu'd distances):
    # nothing there to publish, and at IoU 0 with everything no tracker can ever confirm it
    seen = (det.xyxy[:, 2] > det.xyxy[:, 0]) & (det.xyxy[:, 3] > det.xyxy[:, 1])
    return det if seen.all() else det[seen]


def detection_records(head: str, det: sv.Detections, track_ids: np.ndarray | None) -> list[dict]:
    """sv.Detections -> the per-detection dicts of the schema v1 message."""
    n = len(det)
    names = _column(det.data["class_name"]) if "class_name" in det.data else [""] * n
    # Plain Python numbers, column by column: per-element numpy scalars cost several times more per frame.
    tids = [None] * n if track_ids is None else [t if t >= 0 else None for t in np.asarray(track_ids).tolist()]
    boxes, class_ids, confs = det.xyxy.tolist(), det.class_id.tolist(), det.confidence.tolist()
    attrs = [(name, _column(det.data[f"attr:{name}"]), det.data[f"attr:{name}:conf"].tolist())
             for name in attribute_names(det)]
    out = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        record = {"head": head, "track_id": tids[i], "class": str(names[i]), "class_id": int(class_ids[i]),
                  "conf": round(confs[i], 4), "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]}
        if attrs:
            attributes = {name: {"label": str(labels[i]), "conf": round(conf[i], 4)} for name, labels, conf in attrs
                          if labels[i]}
            if attributes:
                record["attributes"] = attributes
        out.append(record)
    return out


def _column(values: np.ndarray | list) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else values


def attribute_names(det: sv.Detections) -> list[str]:
    return [k[len("attr:"):] for k in det.data if k.startswith("attr:") and not k.endswith(":conf")]
