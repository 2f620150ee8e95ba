"""The motion gate: skip inference on frames where nothing moved.

A frame difference on the model input (already small: 3x256x448), scaled down further and blurred so that
sensor noise does not count, against the last frame that WENT to inference (and did not fail there:
``MotionGate.failed``), not the previous frame: slow motion (a pedestrian far away, a car creeping up) adds
up until it passes the threshold, instead of hiding below it frame after frame. Costs ~0.1 ms a frame, on
the camera's event loop.

What a skipped frame means for the rest of the pipeline (docs/architecture.md, "Analytics"): the tracker
does not see it (nothing moved, so its tracks are where they were; feeding it an empty frame instead would
count as a miss, and a parked car's track would die after the tracker's lost-track buffer, exactly in the
scenes where the gate skips most), zones keep their occupants (``CameraAnalytics.hold``), no detection
message is published, and the frame is counted as ``skipped``. So a skipped frame decides nothing: while the last
analysed frame missed an object (a lost track not yet ended, a zone occupant not yet left), the camera sends every
frame (``force``; CameraPipeline._undecided).
"""

from __future__ import annotations

import collections

import cv2
import numpy as np

from workers.analytics_settings import MotionConfig


# Frames let through, newest last: those in flight and the last one analysed. When it runs short (more than
# this many in flight, all failing), the gate has no reference and the next frame goes: always safe.
SENT_KEPT = 8
# Slack on max_skip_s: pts are floats (1.4 - 0.4 < 1.0), and the forced frame came one frame late
PTS_SLACK_S = 1e-6


class MotionGate:
    """``wants(image, pts)`` -> True when the frame must go to inference; ``failed(pts)`` when such a frame
    was not analysed after all."""

    def __init__(self, settings: MotionConfig):
        self.settings = settings
        self._sent: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=SENT_KEPT)
        self.checked = self.skipped = 0
        self.last_changed = 0.0  # fraction of changed pixels on the last check, for tuning

    def _small(self, image: np.ndarray) -> np.ndarray:
        """(3, H, W) uint8 model input -> blurred grey (H/scale, W/scale) uint8. Green stands in for luminance:
        it carries most of it, and one channel is a third of the work."""
        green = np.ascontiguousarray(image[1]) if image.ndim == 3 and image.shape[0] == 3 else image
        s = self.settings.scale
        small = cv2.resize(green, (green.shape[1] // s, green.shape[0] // s), interpolation=cv2.INTER_AREA)
        return cv2.GaussianBlur(small, (3, 3), 0)

    def wants(self, image: np.ndarray, pts: float) -> bool:
        self.checked += 1
        small = self._small(image)
        ref_pts, ref = self._sent[-1] if self._sent else (0.0, None)
        if ref is None or ref.shape != small.shape or pts - ref_pts >= self.settings.max_skip_s - PTS_SLACK_S:
            self._take(small, pts)
            return True
        changed = np.count_nonzero(cv2.absdiff(small, ref) > self.settings.threshold) / small.size
        self.last_changed = changed
        if changed >= self.settings.min_changed:
            self._take(small, pts)
            return True
        self.skipped += 1
        return False

    def force(self, image: np.ndarray, pts: float) -> bool:
        """A frame that goes to inference whatever it shows (the camera waits on analysed frames to decide
        something): the reference for the next ones, as if ``wants`` had let it through. Returns True."""
        self.checked += 1
        self._take(self._small(image), pts)
        return True

    def _take(self, small: np.ndarray, pts: float) -> None:
        self._sent.append((pts, small))

    def failed(self, pts: float) -> None:
        """The frame at ``pts``, let through by ``wants``, was not analysed (inference failed or timed out). Later
        frames are compared with the newest frame let through since, or else the last one analysed (max_skip_s
        counts from that one), not with this one: the change it showed would be skipped until max_skip_s.
        Call it as results arrive, in frame order: the frames kept before it were analysed then."""
        for i in range(len(self._sent) - 1, -1, -1):
            if self._sent[i][0] == pts:
                del self._sent[i]
                return

    def stats(self) -> dict:
        return {"checked": self.checked, "skipped": self.skipped,
                "skip_fraction": round(self.skipped / self.checked, 4) if self.checked else 0.0}
