"""Annotated snapshots for dashboards: the latest picture with boxes, track ids, zones and lines drawn by
supervision's annotators, as a size-bounded JPEG for {prefix}:cam:{camera}:snapshot.

The capture thread keeps a (downscaled, BGR) picture only for the frames that a snapshot is due on, at most
``snapshot.fps`` per second of stream time (workers/capture.py), never for every frame; this renders one and
measures what it cost.
"""

from __future__ import annotations

import collections
import functools
import time

import cv2
import numpy as np
import supervision as sv

from workers.analytics import CameraAnalytics
from workers.analytics_settings import SnapshotConfig
from workers.frames import attribute_names

SNAPSHOT_VERSION = 1
LABEL_SCALE, LABEL_PADDING = 0.4, 3
# A label is drawn above its box: the height of its background, in the font supervision draws with (cv2's)
LABEL_HEIGHT = cv2.getTextSize("Tg", cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 1)[0][1] + 2 * LABEL_PADDING


@functools.lru_cache(maxsize=1024)
def _has_glyph(char: str) -> bool:
    """Whether cv2's font can draw ``char``: it draws '?' for one it has no glyph for (CJK and Greek in OpenCV 5),
    or a '?' for each of its UTF-8 bytes (all but ASCII in 4.x)."""
    def drawn(text: str) -> np.ndarray:
        canvas = np.zeros((24, 48), np.uint8)
        return cv2.putText(canvas, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 255, 1)

    picture = drawn(char)
    return char == "?" or not any(np.array_equal(picture, drawn("?" * n)) for n in {1, len(char.encode())})


def class_label(name: str, class_id: object) -> str:
    """A class as drawn: its name, or "class N" when the font lacks a character of it (every class of a model
    with Chinese names was drawn "??", all alike)."""
    return name if all(c.isascii() or _has_glyph(c) for c in name) else f"class {class_id}"


def _luminance(color: sv.Color) -> float:
    """WCAG's relative luminance of ``color`` (0 black .. 1 white)."""
    channels = np.array([color.r, color.g, color.b]) / 255
    linear = np.where(channels <= 0.04045, channels / 12.92, ((channels + 0.055) / 1.055) ** 2.4)
    return float(linear @ (0.2126, 0.7152, 0.0722))


def readable_on(background: sv.Color) -> sv.Color:
    """Black or white, whichever contrasts more with ``background`` (WCAG's contrast ratio: at least 4.5:1)."""
    luminance = _luminance(background)
    return sv.Color.BLACK if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else sv.Color.WHITE


# A label's background: its track's colour, as its box's (BoxAnnotator's palette), and after them grey for an
# unconfirmed detection (tracker id -1), as supervision draws its box; the text black or white on each, whichever
# reads. supervision's own lookup drew the text of an unconfirmed one in the same grey as its background (its
# pending colour overrides text_color too): most labels at 1-2 fps were blank grey boxes. And white text on the
# palette's light colours (yellow, light green) hardly read.
LABEL_COLORS = sv.ColorPalette([*sv.ColorPalette.DEFAULT.colors, sv.Color.GREY])
TEXT_COLORS = sv.ColorPalette([readable_on(c) for c in LABEL_COLORS.colors])


def label_colors(tracker_id: np.ndarray) -> np.ndarray:
    """Each label's index in LABEL_COLORS and TEXT_COLORS (a lookup supervision takes as it is)."""
    tracks = len(LABEL_COLORS.colors) - 1
    return np.where(tracker_id >= 0, tracker_id % tracks, tracks)


def labelled(det: sv.Detections, scale: float) -> sv.Detections:
    """A scaled copy whose only data is the text drawn on each box: "#track class attribute-labels"."""
    tracks = det.tracker_id if det.tracker_id is not None else np.full(len(det), -1)  # untracked: "unconfirmed" colour
    classes = det.class_id if det.class_id is not None else ["?"] * len(det)
    names = [class_label(str(n), c) for n, c in zip(det.data.get("class_name", [""] * len(det)), classes)]
    attrs = [det.data[f"attr:{name}"] for name in attribute_names(det)]
    labels = [" ".join(p for p in (f"#{t}" if t >= 0 else "", str(n), *(str(a[i]) for a in attrs)) if p)
              for i, (t, n) in enumerate(zip(tracks, names))]
    return sv.Detections(xyxy=det.xyxy * scale, confidence=det.confidence, class_id=det.class_id, tracker_id=tracks,
                         data={"label": np.array(labels)})


def label_anchors(det: sv.Detections, width: int) -> sv.Detections:
    """Where the labels go: each box's top-left corner moved into the picture (``width`` px wide) as far as its
    label needs (the label of a box at the picture's top, left or right edge was drawn outside it, and the object
    had no track id on the dashboard). By hand: supervision's smart_position does it too, but also spreads
    overlapping labels apart, at a cost that grows with the square of their number (300 ms for 200 boxes, on the
    camera's event loop)."""
    label_widths = [cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 1)[0][0] + 2 * LABEL_PADDING
                    for text in det.data["label"]]
    xyxy = det.xyxy.copy()
    xyxy[:, 0] = np.minimum(xyxy[:, 0], width - np.array(label_widths))
    return sv.Detections(xyxy=np.maximum(xyxy, (0, LABEL_HEIGHT, 0, 0)), class_id=det.class_id,
                         tracker_id=det.tracker_id)


class Snapshotter:
    """``render`` -> the hash fields of one snapshot (``jpeg`` holds the bytes), or None when no encoding
    fits ``max_bytes``."""

    def __init__(self, settings: SnapshotConfig):
        self.settings = settings
        self.boxes = sv.BoxAnnotator(thickness=2, color_lookup=sv.ColorLookup.TRACK)
        self.labels = sv.LabelAnnotator(color=LABEL_COLORS, text_color=TEXT_COLORS, text_scale=LABEL_SCALE,
                                        text_padding=LABEL_PADDING)  # coloured by label_colors
        # (scale, analytics, annotators): built once. The object itself, compared with `is`: an id can be reused
        # by the analytics that replaced a freed one, and the old zones would be drawn.
        self._drawings: tuple[float, CameraAnalytics | None, list] | None = None
        self.made = self.too_big = 0
        self.render_ms: collections.deque[float] = collections.deque(maxlen=100)
        self.last_bytes = 0

    def _geometry(self, analytics: CameraAnalytics | None, scale: float) -> list:
        """Zone and line annotators at the picture's scale, rebuilt only when the scale or the analytics change."""
        if self._drawings is None or self._drawings[0] != scale or self._drawings[1] is not analytics:
            drawn: list = []
            for name, zone in (analytics.zones if analytics else {}).items():
                polygon = np.round(zone.polygon * scale).astype(np.int64)
                drawn.append(("zone", name, zone, sv.PolygonZoneAnnotator(
                    sv.PolygonZone(polygon), color=sv.Color.YELLOW, thickness=2, text_scale=0.4, text_padding=4)))
            for name, line in (analytics.lines if analytics else {}).items():
                drawn.append(("line", name, line.drawable(scale), sv.LineZoneAnnotator(
                    thickness=2, text_scale=0.4, text_thickness=1, text_padding=4,
                    custom_in_text=f"{name} in", custom_out_text=f"{name} out")))
            self._drawings = (scale, analytics, drawn)
        return self._drawings[2]

    def render(self, picture: np.ndarray, source_size: tuple[int, int], detections: list[sv.Detections],
               analytics: CameraAnalytics | None, frame: int, pts: float, ts: float) -> dict | None:
        """``picture``: BGR (h, w, 3), the source frame scaled to at most max_width (drawn on in place);
        ``source_size``: (width, height) of the source, the detections' and zones' coordinate frame."""
        t0 = time.perf_counter()
        scale = picture.shape[1] / source_size[0]
        # One labelled copy per head, then merged: heads carry different data (attributes ride on some only),
        # which merge() refuses; the caller's detections stay as they are.
        parts = [labelled(d, scale) for d in detections if len(d)]
        det = sv.Detections.merge(parts) if parts else sv.Detections.empty()
        if len(det):
            picture = self.boxes.annotate(picture, det)
            picture = self.labels.annotate(picture, label_anchors(det, picture.shape[1]),
                                           labels=list(det.data["label"]),
                                           custom_color_lookup=label_colors(det.tracker_id))
        for kind, name, thing, annotator in self._geometry(analytics, scale):
            if kind == "zone":
                total = sum(thing.occupancy().values())
                picture = annotator.annotate(picture, label=f"{name}: {total}")
            else:
                picture = annotator.annotate(picture, thing)
        jpeg, quality, encoded = self._encode(picture)
        ms = (time.perf_counter() - t0) * 1000
        self.render_ms.append(ms)
        if jpeg is None:
            self.too_big += 1
            return None
        self.made += 1
        self.last_bytes = len(jpeg)
        h, w = encoded.shape[:2]  # the JPEG's size: smaller than the picture when it had to shrink to fit
        return {"jpeg": jpeg, "v": SNAPSHOT_VERSION, "frame": int(frame), "pts": round(float(pts), 3),
                "ts": round(float(ts), 3), "width": w, "height": h, "bytes": len(jpeg), "quality": quality,
                "render_ms": round(ms, 2)}

    def _encode(self, picture: np.ndarray) -> tuple[bytes | None, int, np.ndarray]:
        """JPEG at the configured quality; when over max_bytes, lower quality, then a smaller picture until one
        fits (a fixed number of tries gave up a step short: under the smallest max_bytes allowed, no snapshot of
        an ordinary street was ever made). Ends at 1x1 px, a few dozen steps from the widest picture.
        -> (the JPEG or None, its quality, the picture it encodes)."""
        quality, img = self.settings.quality, picture
        while True:
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and buf.size <= self.settings.max_bytes:
                return buf.tobytes(), quality, img
            if quality > 40:
                quality = max(40, quality - 20)
            elif img.shape[0] > 1 or img.shape[1] > 1:
                img = cv2.resize(img, (max(1, img.shape[1] * 7 // 10), max(1, img.shape[0] * 7 // 10)),
                                 interpolation=cv2.INTER_AREA)
            else:
                return None, quality, img

    def stats(self) -> dict:
        ms = sorted(self.render_ms)
        return {"made": self.made, "too_big": self.too_big, "last_bytes": self.last_bytes,
                "render_ms_p50": round(ms[len(ms) // 2], 2) if ms else None}


def picture_due(settings: SnapshotConfig, pts: float, next_pts: float | None) -> tuple[bool, float | None]:
    """From the capture thread: whether the frame at ``pts`` should keep a picture, and the next due time.
    A stream whose clock went back (a file looping, a camera restarting) is due at once."""
    if not settings.enabled:
        return False, next_pts
    period = 1.0 / settings.fps
    if next_pts is None or pts >= next_pts - 1e-6 or next_pts - pts > 2.0 * period:  # 1 us: float pts
        # On a grid, not from the frame that fell due: each frame's overshoot added up (a 10 fps camera kept 4.7
        # pictures a second for snapshot.fps 5, a 12 fps one 6 for 10); a frame past a whole period restarts it.
        on_grid = next_pts is not None and 0 <= pts - next_pts < period
        return True, (next_pts if on_grid else pts) + period
    return False, next_pts
