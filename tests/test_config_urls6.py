"""Camera URLs a user plausibly writes that loaded and then failed in the camera (often retried for ever), or were
refused with a puzzling message: they are read as meant, or refused at load (and on a live add) naming the fix."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.admission import CommandRejected, merge_changes
from pipeline.admission import parse_camera as parse_live_camera
from pipeline.config import ConfigError, load_config, parse_camera, parse_config
from servers import HOST, encode_mp4, free_port
from workers.settings import CameraConfig
from workers.sources import SourceError, open_source

SECRET = "s3cr3t-pw"


def load_url(tmp_path, url: str) -> CameraConfig:
    """The camera as `hydravision run` loads it from a YAML file, the url written in double quotes."""
    path = tmp_path / "c.yaml"
    escaped = url.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', '\\"')
    path.write_text(f'cameras:\n  - id: lobby\n    url: "{escaped}"\n')
    return load_config(path).cameras[0]


def refusals(tmp_path, url: str) -> list[str]:
    """The refusal at config load, of a live add and of a live update: each must name the fix."""
    with pytest.raises(ConfigError) as at_load:
        load_url(tmp_path, url)
    with pytest.raises(CommandRejected) as added:
        parse_live_camera({"id": "lobby", "url": url})
    with pytest.raises(CommandRejected) as updated:
        merge_changes(CameraConfig(id="lobby", url="synthetic://street"), {"url": url})
    (line,) = [ln for ln in str(at_load.value).splitlines() if ln.startswith("cameras[0].url: ")]
    return [line, added.value.reason, updated.value.reason]


@pytest.mark.parametrize("url", [" rtsp://cam.local/1", "rtsp://cam.local/1\n", "\trtsps://cam.local:322/1 ",
                                 " synthetic://street?seed=2", "http://cam.local/mjpeg\r\n", " /videos/a.mp4\n"])
def test_whitespace_around_a_url_is_no_part_of_it(tmp_path, url):
    # " rtsp://..." was refused as "unsupported scheme ' rtsp'"; a final newline (a ${VAR} read from a file)
    # stayed in the camera's url, shown in its status and compared on live updates
    assert load_url(tmp_path, url).url == url.strip()
    assert parse_live_camera({"id": "lobby", "url": url}).url == url.strip()
    assert CameraConfig(id="lobby", url=url).is_live == ("://" in url and "synthetic" not in url)


def test_a_password_read_with_its_final_newline_is_refused_at_load_without_showing_it(tmp_path, monkeypatch):
    # urlsplit drops the newline, so the URL passed every check; FFmpeg sends it, and the camera was
    # refused (401) and retried for ever
    monkeypatch.setenv("CAM_PW", SECRET + "\n")
    path = tmp_path / "c.yaml"
    path.write_text("cameras:\n  - id: door\n    url: rtsp://admin:${CAM_PW}@cam.local/live\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "cameras[0].url: holds a line break" in str(err.value) and SECRET not in str(err.value)
    for line in refusals(tmp_path, f"rtsp://admin:{SECRET}\n@cam.local/live"):
        assert "line break" in line and SECRET not in line, line


@pytest.mark.parametrize("url", ["device://dev/video0", "device://video0", "device://0", "device://",
                                 f"device://admin:{SECRET}@dev/video0"])
def test_a_device_url_without_an_absolute_path_is_refused_showing_the_right_form(tmp_path, url):
    # "device://dev/video0" loaded, and FFmpeg looked for dev/video0 in the working directory: "no such
    # device", retried for ever like an unplugged camera
    for line in refusals(tmp_path, url):
        assert "device:///dev/video0" in line and SECRET not in line, line


@pytest.mark.parametrize("url", ["device:///dev/video0", "/dev/video0", "device:///dev/v4l/by-id/usb-cam-video-index0",
                                 "DEVICE:///dev/video2"])
def test_normal_path_guard_device_forms_that_name_a_device_still_load(tmp_path, url):
    """Guard (passes before and after the fix): absolute device paths, with or without device://."""
    cam = load_url(tmp_path, url)
    assert cam.url == url and cam.is_live
    open_source(url)  # the source reads it too (nothing is opened)


@pytest.mark.parametrize("url, problem", [
    ("rtsp:///stream", "no host (e.g. rtsp://camera.local/stream)"),  # FFmpeg dialled this machine, for ever
    ("rtsp://", "no host"),
    ("rtsps://:322/live", "no host"),
    (f"rtsp://admin:{SECRET}@/live", "no host"),
    ("http:///mjpeg", "no host (e.g. http://camera.local/stream)"),
    ("rtsp://cam.local:0/live", "a port is a number 1-65535"),  # FFmpeg: "Invalid argument", retried for ever
    ("rtsp://cam.local:/live", "a port is a number 1-65535"),  # FFmpeg reads the empty port as 0
    ("rtsp://cam.local:70000/live", "a port is a number 1-65535"),  # refused, but as if a password were at fault
    ("rtsp://cam.local:554x/live", "a port is a number 1-65535"),
])
def test_a_network_url_without_a_host_or_with_a_port_no_camera_has_is_refused(tmp_path, url, problem):
    for line in refusals(tmp_path, url):
        assert problem in line and SECRET not in line, line


@pytest.mark.parametrize("url, fix", [("rtsp:/cam.local/1", "write rtsp://"), ("RTSP:cam.local/1", "write rtsp://"),
                                      ("http:/cam.local/mjpeg", "write http://"), ("synthetic:street", "synthetic://"),
                                      ("file:/videos/a.mp4", "write file://")])
def test_a_url_missing_its_slashes_is_refused_not_read_as_a_file_name(tmp_path, url, fix):
    # read as a relative file name: the camera failed when it started, with "no such file"
    for line in refusals(tmp_path, url):
        assert "without '//' is read as a file name" in line and fix in line, line


@pytest.mark.parametrize("url", [f"rtsp://admin:{SECRET}@@cam.local/live", "rtsp://admin:p@ss@cam.local:554/live",
                                 "http://cam.local/axis-cgi/mjpg/video.cgi", "https://cam.local:8443/mjpeg",
                                 "rtsp://[fd00::5]:8554/live", "clip:1.mp4", "C:/videos/a.mp4", "RTSP://cam.local/1"])
def test_normal_path_guard_urls_ffmpeg_reads_still_load(tmp_path, url):
    """Guard (passes before and after the fix): a raw '@' in a password (FFmpeg takes the host after the last one),
    MJPEG over http(s), IPv6, file names holding a ':'."""
    cam = load_url(tmp_path, url)
    assert cam.url == url
    open_source(url)


@pytest.mark.parametrize("scheme", ["RTSP", "Rtsp", "HTTP"])
def test_an_upper_case_scheme_reaches_ffmpeg_as_its_protocol(scheme):
    # the config and the source accepted "RTSP://", FFmpeg did not: "does not support that protocol", and the
    # camera failed for good. Here nothing listens: FFmpeg must have dialled.
    source = open_source(f"{scheme}://{HOST}:{free_port()}/live", open_timeout_s=5, read_timeout_s=5)
    with pytest.raises(SourceError) as err:
        source.open()
    assert err.value.kind == "refused", str(err.value)


def test_a_file_path_under_the_home_folder_opens(tmp_path, monkeypatch):
    # "~/clips/a.mp4" (read like model.checkpoint) was looked for in a folder "~" of the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clips").mkdir()
    encode_mp4(tmp_path / "clips" / "a.mp4", [np.full((64, 64, 3), 90, np.uint8)] * 3, fps=10)
    source = open_source(load_url(tmp_path, "~/clips/a.mp4").url, realtime=False)
    source.open()
    try:
        assert source.read() is not None
    finally:
        source.close()


def test_a_redis_url_with_whitespace_around_it_loads():
    # refused "must start with redis://", though redis-py reads it (the camera URL's case, for Redis)
    config = parse_config({"redis": {"url": " redis://127.0.0.1:6379/0\n"}})
    assert config.redis.url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("url", ["file://", "file:///", "file://localhost/"])
def test_a_file_url_naming_no_file_is_refused_at_load(url: str) -> None:
    """A ${VAR} left empty ("file://${CLIP}"): accepted at load, it failed only once the camera started."""
    with pytest.raises(ConfigError, match="names no file"):
        parse_camera({"id": "a", "url": url})
