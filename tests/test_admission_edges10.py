"""Run-time admission, tried from outside (round 10): a playlist that hides behind a NUL byte, the service's own
Redis at the address its name resolves to now, and a synthetic scene as large as a command can ask. No Ray, no
Redis, no decoding."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from pipeline.admission import Admission, CommandRejected
from pipeline.config import ApiConfig
from workers.settings import CameraConfig

HEADS = {"people": ["person"]}


def _admission(root: Path | None = None, own: dict | None = None) -> Admission:
    return Admission(ApiConfig(media_roots=[str(root)] if root else []), HEADS, own)


# Each one FFmpeg reads as a playlist or script that opens further files; the NUL (after the marks its probe looks
# for) made the old check take it for a video. The HLS one, admitted, decoded a .ts outside the media roots.
PLAYLISTS = {
    "list.m3u8": b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///srv/private/cam.ts\n#\0\n#EXT-X-ENDLIST\n",
    "list.ffconcat": b"ffconcat version 1.0\n#\0\nfile link-out/cam.mp4\n",
    "manifest.mpd": b'<?xml version="1.0"?>\n<MPD profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">\0</MPD>\n',
}


@pytest.mark.parametrize("name", sorted(PLAYLISTS))
def test_a_playlist_with_a_nul_byte_in_it_is_still_a_text_file(tmp_path, name):
    (tmp_path / name).write_bytes(PLAYLISTS[name])
    with pytest.raises(CommandRejected) as err:
        _admission(tmp_path).check(CameraConfig(id="x", url=str(tmp_path / name)))
    assert err.value.status == 403 and "is a text file" in err.value.reason, err.value.reason


# Real containers' first bytes: binary sizes and magic numbers before (or instead of) a first NUL, also where
# some of them are text (NUT's 24-byte name; an AVI whose sizes happen to be printable).
VIDEOS = {
    "a.mp4": b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom",
    "a.nut": b"nut/multimedia container\0" + b"\x4e\x4d\x7a\x56\x1f\x5f\x04\xad",
    "a.avi": b"RIFF" + b"Ab7~" + b"AVI LIST" + b"zz{|" + b"hdrlavih" + struct.pack("<I", 56),
    "a.mkv": b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01",
    "a.ts": b"\x47\x40\x00\x10\x00\x00\xb0\x0d",
}


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_video_headers_are_not_taken_for_playlists(tmp_path, name):
    (tmp_path / name).write_bytes(VIDEOS[name] + bytes(range(256)))
    assert _admission(tmp_path).check(CameraConfig(id="x", url=str(tmp_path / name))).url == str(tmp_path / name)


def test_the_own_redis_is_refused_at_the_address_its_name_resolves_to_now(monkeypatch):
    # compose names Redis "redis": a re-created container gets another address, which the name then resolves to
    where = {"redis.test": "192.0.2.7"}  # TEST-NET-1: no machine has it
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in where:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (where[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    adm = _admission(own={"Redis": ("redis.test", 6379)})
    where["redis.test"] = "192.0.2.8"  # Redis moved; the service reconnects by name
    for url in ("rtsp://redis.test:6379/x", "rtsp://192.0.2.8:6379/x"):
        with pytest.raises(CommandRejected, match="own Redis") as err:
            adm.check(CameraConfig(id="x", url=url))
        assert err.value.status == 403


@pytest.mark.parametrize("size", ["8192x8192", "3841x2160", "4096x4096"])
def test_a_synthetic_scene_added_at_run_time_is_at_most_a_4k_picture(size):
    # 8192x8192 (the scene's own limit, for configs) took 2.8 GB and 27 s of CPU to start, for one short command
    with pytest.raises(CommandRejected, match=r"at most \d+ pixels .*got " + size) as err:
        _admission().check(CameraConfig(id="x", url=f"synthetic://street?size={size}"))
    assert err.value.status == 403 and err.value.reason.startswith("camera.url: ")


@pytest.mark.parametrize("size", ["3840x2160", "2160x3840", "640x360"])
def test_synthetic_scenes_up_to_4k_are_admitted(size):
    url = f"synthetic://street?seed=3&size={size}&fps=10"
    assert _admission().check(CameraConfig(id="x", url=url)).url == url


def test_a_url_longer_than_ffmpeg_takes_is_refused_without_quoting_it():
    # FFmpeg sends 4095 bytes of a longer path; the camera's status would carry all of it to Redis every second
    url = "rtsp://admin:Pw-9secret@127.0.0.1:8554/" + "a" * (1 << 20)
    with pytest.raises(CommandRejected, match=f"camera.url: at most 4096 characters, got {len(url)}$") as err:
        _admission().check(CameraConfig(id="x", url=url))
    assert "Pw-9secret" not in err.value.reason and "aaaa" not in err.value.reason
    fits = "rtsp://127.0.0.1:8554/" + "a" * (4096 - 22)
    assert _admission().check(CameraConfig(id="x", url=fits)).url == fits
