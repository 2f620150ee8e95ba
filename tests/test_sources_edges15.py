"""Four defects an operator found in local-file sources (audit 15a), each made here with PyAV or the OS:

1. A config camera on a path that blocks on open (a FIFO with no writer, a terminal) said `starting` for ever: FFmpeg's
   open() blocks, PyAV's timeout cannot interrupt it, and each watchdog restart left a thread and an fd behind. Now a
   path that is neither a regular file nor a capture device fails at once, for good, saying what it is.
2. A JPEG with `loop: true` failed after its first frame ("its video stream holds no pictures"): FFmpeg's image2
   demuxer takes the seek back and its next pass gives no packets. Now it loops as a PNG does.
3. Non-square pixels were ignored: a 480x272 file at SAR 4:3, shown 640x272 by players, reached the model and the
   snapshot squeezed. Now the frame's size is its display size, and every picture made of it has that size.
4. A looping file replaced by a rename (log rotation) played the old, deleted file for ever. Now the next pass reads
   the file at the path.

The normal_path_guard tests pass on the code before too.
"""
from __future__ import annotations

import os
import shutil
import stat
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from models.letterbox import letterbox
from servers import encode_mp4
from test_sources_edges import read_all, run_capture
from workers.sources import SourceError, open_source


def looping(path: Path | str, n: int) -> list:
    """The first ``n`` frames of ``path`` played with loop (unpaced), or what came before an end or an error."""
    frames, error = read_all(open_source(str(path), realtime=False, loop=True), limit=n)
    assert error is None, f"after {len(frames)} frames: {error!r}"
    return frames


def flat(value: int, width: int = 64, height: int = 48) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


# -- 1. a path that is no file ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_fifo_camera_fails_at_once_for_good_instead_of_blocking_in_its_open(tmp_path: Path) -> None:
    """Before: the capture thread blocked in FFmpeg's open() until something wrote to the FIFO (never): no event,
    state `starting` for ever."""
    fifo = tmp_path / "cam.fifo"
    os.mkfifo(fifo)
    try:
        cap, frames, events = run_capture({"url": str(fifo)}, 20,
                                          until=lambda ev: any(t == "stream_down" for t, _ in ev))
    finally:
        # a reader blocked in open() (the code before) is let go by a writer coming and going
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: no reader, nothing blocked
            pass
    assert cap.state == "failed" and frames == [], (cap.state, events)
    downs = [fields for type_, fields in events if type_ == "stream_down"]
    assert len(downs) == 1 and downs[0]["final"] is True, events
    assert downs[0]["reason"].startswith(f"{fifo}: is a FIFO"), downs


@pytest.mark.parametrize("url", ["/dev/null", "file:///dev/null"])
def test_a_character_device_that_is_no_capture_device_is_refused_saying_so(url: str) -> None:
    """Before: FFmpeg opened /dev/null and said "not a video FFmpeg can read"; /dev/tty0 blocked as a FIFO does."""
    with pytest.raises(SourceError) as info:
        open_source(url).open()
    assert info.value.kind == "not_video", str(info.value)
    assert str(info.value) == (f"{url}: is a character device, not a file nor a video capture device "
                               "(/dev/videoN, device://)")


def test_normal_path_guard_a_directory_still_fails_as_no_video(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        open_source(str(tmp_path)).open()
    assert info.value.kind == "not_video" and str(info.value) == f"{tmp_path}: is a directory, not a video"


def test_a_capture_device_under_a_name_of_its_own_goes_to_ffmpeg_another_is_refused(monkeypatch, tmp_path) -> None:
    """A udev link to a V4L2 device (major 81) given as a file path goes to FFmpeg as before (here: no such file,
    its stat faked); a character device of another major is refused before FFmpeg sees it."""
    link = tmp_path / "cam-front"
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        if os.fspath(path) == str(link):
            return os.stat_result((stat.S_IFCHR | 0o660, 1, 5, 1, 0, 0, 0, 0, 0, 0), {"st_rdev": os.makedev(major, 0)})
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", fake_stat)
    major = 81
    with pytest.raises(SourceError) as info:
        open_source(str(link)).open()
    assert info.value.kind == "not_found", str(info.value)  # FFmpeg's open, not our refusal
    major = 4  # a terminal
    with pytest.raises(SourceError) as info:
        open_source(str(link)).open()
    assert info.value.kind == "not_video" and "character device" in str(info.value), str(info.value)


# -- 2. a still image that loops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jpg", ".png"])  # .png: a guard (PNG's own demuxer looped before)
def test_a_still_image_with_loop_gives_its_picture_again_and_again(tmp_path: Path, suffix: str) -> None:
    """Before (.jpg): one frame, then SourceError not_video "its video stream holds no pictures"."""
    y, x = np.mgrid[0:96, 0:128]  # gradients and grain: a photo's few KB (BGR, as cv2 writes it)
    grain = np.random.default_rng(1).integers(-20, 21, (96, 128, 1))
    picture = np.clip(np.stack([x * 2, y * 2, 255 - x], -1) + grain, 0, 255).astype(np.uint8)
    path = tmp_path / f"still{suffix}"
    assert cv2.imwrite(str(path), picture)
    if suffix == ".jpg":  # a photo larger than FFmpeg's first probe (2 KB) is image2's, as a camera's JPEG is
        assert av.open(str(path)).format.name == "image2"
    frames = looping(path, 6)
    assert len(frames) == 6
    first = frames[0].to_rgb()
    assert frames[0].size == (96, 128) and np.abs(first.astype(int) - picture[..., ::-1]).mean() < 6
    assert all(np.array_equal(frame.to_rgb(), first) for frame in frames)
    pts = [frame.pts for frame in frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts


def test_a_loop_whose_seek_brings_back_nothing_ends_normally(tmp_path: Path) -> None:
    """A demuxer that takes the seek back and then gives no packet (image2's way, before): a normal end after the
    frames it gave, not "its video stream holds no pictures"."""
    clip = encode_mp4(tmp_path / "a.mp4", [flat(90)] * 4, fps=25)
    source = open_source(str(clip), realtime=False, loop=True)

    class NoRewind:  # the container, whose seek flushes the decoder (as PyAV's does) and moves nothing
        def __init__(self, container) -> None:
            self._container = container

        def seek(self, *args, **kwargs) -> None:
            self._container.streams.video[0].codec_context.flush_buffers()

        def __getattr__(self, name: str):
            return getattr(self._container, name)

    source.open()
    try:
        source._container = NoRewind(source._container)
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
    finally:
        source.close()
    assert len(frames) == 4


# -- 3. non-square pixels ----------------------------------------------------------------------------------------

def anamorphic(path: Path, stored: np.ndarray, sar: Fraction, n: int = 3) -> Path:
    """An H.264 mp4 of ``stored`` (RGB) whose pixels are ``sar`` wide (written in the stream as ffmpeg's setsar)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        video.codec_context.sample_aspect_ratio = sar
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    return path


@pytest.mark.parametrize("sar, shown", [(Fraction(4, 3), (48, 128)), (Fraction(1, 2), (96, 96))])
def test_non_square_pixels_are_read_at_their_display_aspect(tmp_path: Path, sar: Fraction, shown: tuple) -> None:
    """Before: size (48, 96) and every picture squeezed, the snapshot and the model's input too."""
    picture = np.zeros((*shown, 3), np.uint8)  # what players show: a white square in the middle
    h, w = shown
    picture[h // 4: 3 * h // 4, w // 2 - h // 4: w // 2 + h // 4] = 255
    stored = cv2.resize(picture, (96, 48), interpolation=cv2.INTER_AREA)
    assert av.open(str(anamorphic(tmp_path / "a.mp4", stored, sar))).streams.video[0].sample_aspect_ratio == sar
    frames, error = read_all(open_source(str(tmp_path / "a.mp4"), realtime=False))
    assert error is None and len(frames) == 3
    frame = frames[0]
    assert frame.size == shown
    rgb = frame.to_rgb()
    assert rgb.shape == (*shown, 3) and np.abs(rgb.astype(int) - picture).mean() < 12
    snapshot = frame.to_picture(max_width=1000)
    assert snapshot.shape == (*shown, 3) and np.abs(snapshot.astype(int) - picture[..., ::-1]).mean() < 12
    image, lb = frame.to_model_input((64, 64))
    expected, expected_lb = letterbox(picture, (64, 64))
    assert lb == expected_lb and lb.src_size == shown
    assert np.abs(image.astype(int) - expected).mean() < 12


def test_normal_path_guard_square_pixels_keep_the_stored_size(tmp_path: Path) -> None:
    clip = anamorphic(tmp_path / "a.mp4", flat(120, 96, 48), Fraction(1, 1))
    frames, error = read_all(open_source(str(clip), realtime=False))
    assert error is None and [f.size for f in frames] == [(48, 96)] * 3 and frames[0].to_rgb().shape == (48, 96, 3)


# -- 4. a looping file replaced by a rename ----------------------------------------------------------------------

def deleted_open_files(directory: Path) -> list[str]:
    """What this process holds open in ``directory`` that is no longer there (Linux's /proc)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, gone
            continue
        if target.startswith(str(directory)) and target.endswith(" (deleted)"):
            held.append(target)
    return held


def test_a_looping_file_replaced_by_a_rename_is_read_anew_at_the_next_pass(tmp_path: Path) -> None:
    """Before: the old file (deleted, its disk space held) played for ever; the new one was never read."""
    old = encode_mp4(tmp_path / "old.mp4", [flat(40)] * 5, fps=25)
    new = encode_mp4(tmp_path / "new.mp4", [flat(200, 96, 64)] * 3, fps=25)
    path = tmp_path / "cam.mp4"
    shutil.copy(old, path)
    source = open_source(str(path), realtime=False, loop=True)
    source.open()
    try:
        frames = [source.read() for _ in range(2)]
        shutil.copy(new, tmp_path / "cam.mp4.new")
        os.rename(tmp_path / "cam.mp4.new", path)  # as log rotation does: the old file deleted, still open
        frames += [source.read() for _ in range(3 + 3 * 3)]  # the old file's pass to its end, then three new ones
        assert deleted_open_files(tmp_path) == []
    finally:
        source.close()
    levels = [round(float(frame.to_rgb().mean())) for frame in frames]
    assert all(abs(v - 40) < 6 for v in levels[:5]) and all(abs(v - 200) < 6 for v in levels[5:]), levels
    assert [f.size for f in frames] == [(48, 64)] * 5 + [(64, 96)] * 9
    assert [f.index for f in frames] == list(range(14))  # the numbering and stream time go on
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:])), [f.pts for f in frames]


def test_a_looping_file_replaced_by_no_video_fails_with_the_new_files_error(tmp_path: Path) -> None:
    path = tmp_path / "cam.mp4"
    encode_mp4(path, [flat(40)] * 3, fps=25)
    source = open_source(str(path), realtime=False, loop=True)
    source.open()
    try:
        assert source.read() is not None
        (tmp_path / "cam.mp4.new").write_bytes(b"\0" * 1000)
        os.rename(tmp_path / "cam.mp4.new", path)
        with pytest.raises(SourceError) as info:
            for _ in range(20):
                source.read()
    finally:
        source.close()
    assert info.value.kind == "not_video" and str(info.value).startswith(f"{path}: not a video"), str(info.value)


def test_normal_path_guard_a_looping_file_left_alone_is_not_reopened(tmp_path: Path, monkeypatch) -> None:
    clip = encode_mp4(tmp_path / "a.mp4", [flat(40)] * 3, fps=25)
    opens = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    assert len(looping(clip, 10)) == 10 and len(opens) == 1


def test_a_looping_file_deleted_fails_at_its_next_pass_saying_so(tmp_path: Path) -> None:
    """`rm` of a looping camera's file: it played the deleted file for ever, its disk space held, nothing said."""
    path = encode_mp4(tmp_path / "cam.mp4", [flat(40)] * 3, fps=25)
    source = open_source(str(path), realtime=False, loop=True)
    source.open()
    try:
        assert source.read() is not None
        path.unlink()
        with pytest.raises(SourceError) as info:
            for _ in range(20):
                source.read()
        assert deleted_open_files(tmp_path) == []
    finally:
        source.close()
    assert str(info.value).startswith(str(path)) and "no such file" in str(info.value).lower(), str(info.value)


def test_normal_path_guard_a_looping_file_overwritten_in_place_reads_the_new_file_at_its_next_pass(
        tmp_path: Path) -> None:
    """The same inode written over (`cp new.mp4 cam.mp4`): the next pass reads the new file. A guard (it passed
    before too): the case a review found, a pass whose every packet fails on the new bytes ending as a normal end
    of file, needs the overwrite between the seek and the first packet, which the read-ahead hides here."""
    path = encode_mp4(tmp_path / "cam.mp4", [flat(40)] * 5, fps=25)
    new = encode_mp4(tmp_path / "new.mp4", [flat(200, 96, 64)] * 3, fps=25)
    source = open_source(str(path), realtime=False, loop=True)
    source.open()
    frames = []
    try:
        frames.append(source.read())
        path.write_bytes(new.read_bytes())
        for _ in range(12):
            frames.append(source.read())
    finally:
        source.close()
    assert frames[-1] is not None and frames[-1].size == (64, 96), [f and f.size for f in frames]
    assert abs(float(frames[-1].to_rgb().mean()) - 200) < 6


def test_the_widening_of_non_square_pixels_is_said_once(tmp_path: Path, caplog) -> None:
    """A camera whose pixel zones were drawn on the stored picture (an analog encoder's 704x576 at 12:11) is told
    why its frames are wider now (review: silently misplaced zones)."""
    clip = anamorphic(tmp_path / "wide.mp4", np.full((48, 64, 3), 90, np.uint8), Fraction(4, 3))
    with caplog.at_level("INFO", logger="workers.av_source"):
        looping(clip, 2)
        looping(clip, 2)  # opened again (a reconnect, a restart): not said again
    said = [r.getMessage() for r in caplog.records if "non-square pixels" in r.getMessage()]
    assert len(said) == 1 and "frames shown 85x48, stored 64x48" in said[0], said
