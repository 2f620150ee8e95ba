"""Letterbox pre-processing and the inverse mapping of boxes, as pure functions.

Training and serving both call these, so a model sees exactly the same pixels in both. This is the one place
that decides the geometry (``Letterbox.fit``), the resize filter (``resize``) and the padding (``paste``):
the PyAV decode path (``SourceFrame.to_model_input``, which resizes with swscale) and the training
augmentation (``models.datasets.place``, which jitters scale and position) call them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114  # mid-grey padding, the usual choice for letterboxed detectors


@dataclass(frozen=True)
class Letterbox:
    """How a source image of ``src_size`` was placed into a model input of ``dst_size``.

    Sizes are (height, width). A source pixel (x, y) lands at (x * sx + pad_x, y * sy + pad_y), (sx, sy) =
    ``scales``: ``scale`` itself on the side that fills the input, the rounded picture's own on the other.
    """

    src_size: tuple[int, int]
    dst_size: tuple[int, int]
    scale: float
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, src_size: tuple[int, int], dst_size: tuple[int, int]) -> "Letterbox":
        (sh, sw), (dh, dw) = src_size, dst_size
        if min(sh, sw, dh, dw) <= 0:
            raise ValueError(f"letterbox sizes must be positive, got src={src_size} dst={dst_size}")
        scale = min(dw / sw, dh / sh)
        nw, nh = round(sw * scale), round(sh * scale)
        return cls(src_size=(sh, sw), dst_size=(dh, dw), scale=scale, pad_x=(dw - nw) // 2, pad_y=(dh - nh) // 2)

    @property
    def resized_size(self) -> tuple[int, int]:
        """(height, width) of the picture inside the padding, at least 1 x 1: a sliver such as 4096x2 rounds
        to 0 rows at model scale, and neither cv2 nor swscale (OSError EOPNOTSUPP) resize to 0 pixels; the
        padding offsets still leave room for that one row."""
        sh, sw = self.src_size
        return max(1, round(sh * self.scale)), max(1, round(sw * self.scale))

    @property
    def scales(self) -> tuple[float, float]:
        """(x, y) scale of the picture as really resized, ``resized_size`` over ``src_size``. Rounding the picture
        to whole pixels moves its far edge by up to half a pixel from ``scale``'s: nothing on a 16:9 frame, but a
        12 x 4096 sliver's one row stands for 12 source rows, not the 9.1 that ``scale`` (1.31 rows) says."""
        (rh, rw), (sh, sw) = self.resized_size, self.src_size
        return rw / sw, rh / sh

    def to_list(self) -> list:
        return [list(self.src_size), list(self.dst_size), self.scale, self.pad_x, self.pad_y]


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) image resized to ``size`` (height, width); the image itself when it already has that size."""
    if tuple(size) == image.shape[:2]:
        return image
    nh, nw = size
    # INTER_AREA averages when shrinking (no aliasing on fine texture); LINEAR when growing.
    interp = cv2.INTER_AREA if nh < image.shape[0] or nw < image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interp)


def paste(image: np.ndarray, dst_size: tuple[int, int], at: tuple[int, int], chw: bool = True) -> np.ndarray:
    """A ``dst_size`` (height, width) canvas of PAD_VALUE grey with the (H, W, 3) ``image`` placed with its
    top-left corner at ``at`` (x, y); whatever falls outside the canvas is cut off.

    Returns a C-contiguous uint8 array, (3, H, W) when ``chw`` else (H, W, 3). Writing straight into a CHW
    canvas transposes only the picture, not the padding.
    """
    (dh, dw), (x, y) = dst_size, at
    h, w = image.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = max(min(x + w, dw), x0), max(min(y + h, dh), y0)
    part = image[y0 - y : y1 - y, x0 - x : x1 - x]
    if chw:
        out = np.full((3, dh, dw), PAD_VALUE, dtype=np.uint8)
        out[:, y0:y1, x0:x1] = part.transpose(2, 0, 1)
    else:
        out = np.full((dh, dw, 3), PAD_VALUE, dtype=np.uint8)
        out[y0:y1, x0:x1] = part
    return out


def letterbox(image: np.ndarray, dst_size: tuple[int, int], chw: bool = True) -> tuple[np.ndarray, Letterbox]:
    """Resizes an (H, W, 3) uint8 image into ``dst_size`` keeping its aspect ratio, grey padding.

    Returns a C-contiguous uint8 array, (3, H, W) when ``chw`` else (H, W, 3), and the transform.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    lb = Letterbox.fit(image.shape[:2], dst_size)
    return paste(resize(image, lb.resized_size), lb.dst_size, (lb.pad_x, lb.pad_y), chw), lb


def boxes_to_source(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Maps (N, 4) xyxy boxes from model-input pixels back to source pixels, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    sx, sy = lb.scales
    sh, sw = lb.src_size
    # whole rows against (x, y, x, y) rows, not strided halves: half the cost (once a frame per head in every
    # camera), the same float32 numbers (tests/test_tracking_speed_equal.py pins them)
    out = (boxes - np.array([lb.pad_x, lb.pad_y] * 2, np.float32)) / np.array([sx, sy] * 2, np.float32)
    return np.clip(out, 0, np.array([sw, sh] * 2, np.float32), out=out)


def boxes_to_model(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Maps (N, 4) xyxy boxes from source pixels into model-input pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty_like(boxes)
    sx, sy = lb.scales
    out[:, 0::2] = boxes[:, 0::2] * sx + lb.pad_x
    out[:, 1::2] = boxes[:, 1::2] * sy + lb.pad_y
    return out
