"""A camera that freezes (a hung network, not a refused one: the RTSP server SIGSTOPped) is found out after
read_timeout_s, and the last frame it had sent carries the time it came, not the time FFmpeg let it go. Before:
FFmpeg's parser held that frame until its own timeout ended the wait; released read_timeout_s after the freeze,
it was stamped as fresh (published 5 s late with a 38 ms latency) and restarted the count, so the camera went
'reconnecting' only after twice read_timeout_s (20 s at the default)."""
from __future__ import annotations

import time

import pytest

from workers.av_source import AVSource
from workers.source_base import SourceError

TIMEOUT_S = 2.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_a_frozen_rtsp_camera_is_found_out_after_the_read_timeout(rtsp_server, bikes_mp4, transport):
    server = rtsp_server(bikes_mp4, loop=True)
    source = AVSource(server.url, "rtsp", transport=transport, open_timeout_s=20, read_timeout_s=TIMEOUT_S)
    source.open()
    try:
        for _ in range(25):  # a second of the clip: the stream flows
            source.read()
        server.pause()
        frozen_at, frozen_wall = time.monotonic(), time.time()
        late = []
        with pytest.raises(SourceError, match="within"):
            while True:
                late.append(source.read())
        found_after = time.monotonic() - frozen_at
    finally:
        server.resume()
        source.close()
    assert found_after < 1.5 * TIMEOUT_S, f"found frozen {found_after:.2f} s after the freeze"
    for frame in late:  # sent before the freeze: not stamped as if taken when FFmpeg let it go
        assert frame.wall < frozen_wall + 0.5, (frame.index, frame.wall - frozen_wall)
