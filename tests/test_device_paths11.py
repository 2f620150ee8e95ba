"""udev's stable names for a capture device (/dev/v4l/by-id/..., /dev/v4l/by-path/...) are devices, as /dev/videoN is:
live (reconnects for ever), opened with FFmpeg's v4l2 input, checked against api.devices at run time."""

from __future__ import annotations

import pytest

from pipeline.admission import Admission, CommandRejected
from pipeline.config import ApiConfig
from workers.settings import CameraConfig
from workers.sources import open_source

BY_ID = "/dev/v4l/by-id/usb-Logitech_HD_Webcam_C920-video-index0"


def test_a_by_id_path_is_a_live_device_camera() -> None:
    camera = CameraConfig(id="door", url=BY_ID)
    assert camera.is_live and not camera.lossless
    assert open_source(BY_ID)._kind == "device"  # as /dev/video0: not a file, which ended the camera for good


def test_run_time_admission_checks_a_by_id_path_against_api_devices(tmp_path) -> None:
    def admission(devices):
        return Admission(ApiConfig(media_roots=[str(tmp_path)], devices=devices), {"people": ["person"]}, {})

    camera = CameraConfig.model_construct(id="door", url=BY_ID)
    assert admission([BY_ID]).check(camera).url == BY_ID
    with pytest.raises(CommandRejected, match="not in api.devices"):
        admission(["/dev/video0"]).check(camera)
