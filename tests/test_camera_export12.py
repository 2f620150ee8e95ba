"""`export`'s cameras keep the URL as the config file wrote it (its ${VAR}s) also when the URL's value came with
whitespace around it (a ${VAR} read from a file with its final newline, a quoted value): the camera's URL is
stripped, the comparison with the file's was not, and a ${HV_<CAM>_SECRET} placeholder replaced the file's form."""
from __future__ import annotations

from pipeline.camera_export import export_cameras
from workers.settings import CameraConfig


def test_a_url_whose_variable_ends_in_a_newline_is_exported_as_written(monkeypatch):
    monkeypatch.setenv("CAM_URL", "rtsp://admin:pw@10.0.0.1/live\n")
    cam = CameraConfig(id="door", url="rtsp://admin:pw@10.0.0.1/live\n")
    assert cam.url == "rtsp://admin:pw@10.0.0.1/live"
    cameras, needed = export_cameras([cam], {"door": "${CAM_URL}"})
    assert cameras[0]["url"] == "${CAM_URL}" and needed == []
    monkeypatch.setenv("CAM_PW", "pw")
    cameras, needed = export_cameras([cam], {"door": " rtsp://admin:${CAM_PW}@10.0.0.1/live "})
    assert cameras[0]["url"].strip() == "rtsp://admin:${CAM_PW}@10.0.0.1/live" and needed == []
