"""A live HLS camera whose decode thread is replaced does not analyse again what its old thread handed over (hls18).

A reconnect inside one decode thread skipped the frames of the reopened live playlist up to the last one handed over
(by the stream's own timestamps, AVSource.resume_after). A thread replaced (the watchdog found it stalled, it crashed
and was restarted, a live update of how the source is read) started its first open without that stamp: FFmpeg starts
a live playlist 3 segments back, and those frames were decoded, counted and published again (tracks, zone and line
events twice). Now the new thread resumes after its predecessor's last frame; a new URL still starts fresh.

Live HLS is served by test_http_sources17's web server (a playlist of the last three segments shown), the pipeline
runs without Ray, publishing to an in-memory publisher. The playlist grows only once the replacement happened, and
ends (#EXT-X-ENDLIST) only once the new thread has read a frame, so the new thread opens it live.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import workers.capture
from test_http_sources17 import FPS, SEGMENT_FRAMES, Messages, Web, hls_camera, run_camera, segments
from workers.stream import CameraPipeline


@pytest.fixture
def web() -> Iterator[Web]:
    with Web() as server:
        yield server


@pytest.fixture
def quick_backoff(monkeypatch) -> None:
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(workers.capture.Capture, "BACKOFF_MAX_S", 1.0)


def crash_at_read(monkeypatch, read: int) -> None:
    """The first source the decode thread opens raises a bug (not a SourceError: the thread crashes) at its
    ``read``-th read, instead of returning that frame."""
    real, opened = workers.capture.open_source, []

    def open_source(url: str, **kw):
        source = real(url, **kw)
        if not opened:
            reads, read_frame = [0], source.read

            def read_or_crash():
                reads[0] += 1
                if reads[0] == read:
                    raise RuntimeError("a bug in the decode loop")
                return read_frame()
            source.read = read_or_crash
        opened.append(source)
        return source
    monkeypatch.setattr(workers.capture, "open_source", open_source)


def blocked(pipe: CameraPipeline) -> bool:
    """The decode thread has read the playlist's window and waits for the next segment (FFmpeg holds its last few
    frames until then: 28 of its 30 came here)."""
    return pipe.stats()["decoded"] >= 3 * SEGMENT_FRAMES - 5 and pipe._capture.silent_for() > 0.5


@pytest.mark.timeout(90)
@pytest.mark.parametrize("replaced_by", ["watchdog", "crash", "update"])
def test_a_replaced_decode_thread_of_live_hls_delivers_no_frame_its_predecessor_handed_over(
        web, tmp_path, monkeypatch, quick_backoff, replaced_by) -> None:
    """Live with three segments; the decode thread is replaced: by the watchdog (the playlist stops growing past
    stall_timeout_s), after a crash at its 26th read, or by a live change of read_timeout_s. The playlist then
    goes on to 5 segments and ends. Each of the 50 frames is decoded once, analysed at most once, in order, its
    stream time the stream's own. Before: the new thread started the live playlist 3 segments back, and the frames
    its predecessor had handed over were decoded and published again as new frames (later pts)."""
    web.segments = segments(tmp_path, 5)
    web.shown = 3
    camera = {**hls_camera(web, realtime=False), "read_timeout_s": 20}
    if replaced_by == "watchdog":
        camera["stall_timeout_s"] = 2
    if replaced_by == "crash":
        crash_at_read(monkeypatch, 26)
    pub, images = Messages(), []
    first: list = []  # the first decode thread, then its replacement

    def replace_and_feed(pipe: CameraPipeline) -> bool:
        if pipe._capture is None:  # not started yet
            return False
        if not first:
            first.append(pipe._capture)
        if replaced_by == "update" and pipe._capture is first[0] and blocked(pipe):
            assert pipe.update(pipe.camera.model_copy(update={"read_timeout_s": 19})) == ["read_timeout_s"]
        if pipe._capture is not first[0] and web.shown == 3:
            first.append(pipe._capture)
            web.shown = 4
            if replaced_by == "watchdog":  # one replacement: the new thread, waiting for segments, is no stall
                pipe.camera = pipe.camera.model_copy(update={"stall_timeout_s": 60})
        # the new thread read a frame: it opened the playlist live; now it ends
        if web.shown == 4 and pipe.stats()["decoded"] >= 3 * SEGMENT_FRAMES + 2:
            web.shown, web.ended = 5, True
        return False

    final = run_camera(camera, replace_and_feed, pub, images)
    assert first[1:], "the decode thread was not replaced"
    assert final["state"] == "ended" and final["decoded"] == 5 * SEGMENT_FRAMES, final
    assert final["published"] + final["dropped"]["overload"] == final["decoded"], final
    assert len(set(images)) == len(images) == final["published"], "a picture analysed twice"
    assert pub.frames == sorted(set(pub.frames)) and pub.frames[-1] == 5 * SEGMENT_FRAMES - 1, pub.frames
    assert np.allclose(pub.pts, np.array(pub.frames) / FPS, atol=1e-3), pub.pts  # no replay: the stream's own time


@pytest.mark.timeout(90)
def test_normal_path_guard_a_new_url_of_live_hls_starts_fresh(web, tmp_path) -> None:
    """A live URL change to another encoder's playlist whose timestamps run over the same times as the old one's:
    all its frames are analysed, none skipped as a replay of the old URL's (they are another stream's)."""
    web.segments = segments(tmp_path, 3)
    web.shown = 3
    (tmp_path / "other").mkdir()
    with Web() as other:
        other.segments = segments(tmp_path / "other", 4, seed=3)
        other.shown = 3
        pub, images = Messages(), []
        first: list[int] = []  # frames decoded before the change

        def change_url(pipe: CameraPipeline) -> bool:
            if not first and blocked(pipe):
                first.append(pipe.stats()["decoded"])
                assert pipe.update(pipe.camera.model_copy(update={"url": f"{other.url}/live.m3u8"})) == ["url"]
            if first and pipe.stats()["decoded"] > first[0] and not other.ended:
                other.shown, other.ended = 4, True
            return False

        final = run_camera(hls_camera(web, realtime=False), change_url, pub, images)
    assert final["state"] == "ended" and final["decoded"] == first[0] + 4 * SEGMENT_FRAMES, (first, final)
    assert len(set(images)) == len(images) == final["published"], "a picture analysed twice"
