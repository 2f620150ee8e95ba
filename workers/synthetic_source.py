"""``synthetic://street?seed=3&fps=25&size=640x360&density=1.0&frames=N``: a seeded StreetScene as a camera,
with ground truth on every frame. Runs anywhere (no camera, no network), so the demo and the tests use it.
"""

from __future__ import annotations

import math
import time
from urllib.parse import parse_qsl, urlsplit

from synthetic.scene import StreetScene
from workers.redact import redact_url
from workers.source_base import Pacer, Source, SourceError, SourceFrame

SCENES = ("street",)
PARAMS = ("seed", "fps", "size", "density", "frames")
MAX_DENSITY = 8.0  # StreetScene's limit; it re-checks, so a drift here shows up as a clear error on open()


_WANT = {"seed": "an integer >= 0", "frames": "an integer >= 0", "fps": "a number in (0, 1000]",
         "size": "WIDTHxHEIGHT, each 64..8192", "density": f"a number in [0, {MAX_DENSITY:g}]"}


def _value(name: str, text: str) -> int | float | tuple[int, int] | None:
    """The parsed value of one parameter, None when it is malformed or out of range."""
    try:
        if name in ("seed", "frames"):
            n = int(text)
            return n if n >= 0 else None
        if name == "size":
            w, h = (int(v) for v in text.lower().split("x"))
            return (w, h) if 64 <= w <= 8192 and 64 <= h <= 8192 else None
        f = float(text)
    except ValueError:
        return None
    ok = 0 < f <= 1000 if name == "fps" else 0 <= f <= MAX_DENSITY
    return f if ok and math.isfinite(f) else None


def parse_synthetic_url(url: str) -> dict:
    """{"seed", "fps", "width", "height", "density", "frames"} from a synthetic:// URL (defaults filled in);
    raises SourceError("unsupported") naming the offending parameter."""

    def bad(cause: str) -> SourceError:
        return SourceError.for_url("unsupported", url, cause)

    try:
        parts = urlsplit(url)
    except ValueError as e:  # "synthetic://[street": a '[' or ']' reads as an IPv6 host; it crashed the decoder thread
        raise bad(f"unreadable URL ({e})") from None
    scene = parts.netloc or "street"
    if scene not in SCENES or parts.path not in ("", "/"):  # named as written: "synthetic:///park" is no "street/park"
        raise bad(f"unknown synthetic scene {parts.netloc + parts.path!r} (known: {', '.join(SCENES)})")
    if "#" in url:  # urlsplit drops it: "street#seed=3" ran seed 0
        raise bad(f"unexpected '#{parts.fragment}' (parameters follow '?')")
    out: dict = {"seed": 0, "fps": 25.0, "width": 640, "height": 360, "density": 1.0, "frames": None}
    # Not strict_parsing: it raises on "a&b" without saying which part; a part without "=" gets value "".
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    for name, text in pairs:
        if name not in PARAMS:
            raise bad(f"unknown parameter {name!r} (known: {', '.join(PARAMS)})")
        if sum(1 for n, _ in pairs if n == name) > 1:
            raise bad(f"parameter {name!r} given twice")
        value = _value(name, text)
        if value is None:
            raise bad(f"parameter {name!r} must be {_WANT[name]}, got {text!r}")
        if name == "size":
            out["width"], out["height"] = value
        else:
            out[name] = value
    return out


class SyntheticSource(Source):
    """A StreetScene stepped frame by frame; pts = index / fps. ``realtime`` paces at fps (and makes it a
    live source); ``frames`` ends the stream after that many frames."""

    def __init__(self, url: str, *, realtime: bool = True) -> None:
        self._raw_url = url
        self.params = parse_synthetic_url(url)
        self.url = redact_url(url)
        self.live = realtime
        self.nominal_fps = self.params["fps"]
        self.decode_errors = 0
        self._realtime = realtime
        self._scene: StreetScene | None = None
        self._closed = False
        self._index = 0
        self._pacer = Pacer(self.nominal_fps)

    def open(self) -> None:
        p = self.params
        # parse_synthetic_url checked every value, so StreetScene raising here would be a bug, not bad input.
        self._scene = StreetScene(p["seed"], width=p["width"], height=p["height"], fps=p["fps"],
                                  density=p["density"])
        self._closed, self._index, self._pacer = False, 0, Pacer(self.nominal_fps)

    def read(self) -> SourceFrame | None:
        if self._scene is None:
            raise SourceError.for_url("ended", self._raw_url,
                                      "the source is closed" if self._closed else "the source is not open")
        frames = self.params["frames"]
        if frames is not None and self._index >= frames:
            return None
        pts = self._index / self.nominal_fps
        if self._realtime:  # wait first: the picture is taken when it is due, as a camera's would be
            self._pacer.wait(pts)
        image, truth = self._scene.step()
        wall = time.time()
        out = SourceFrame(self._index, pts, wall, image.shape[:2], image, truth)
        self._index += 1
        return out

    def close(self) -> None:
        self._scene = None
        self._closed = True
