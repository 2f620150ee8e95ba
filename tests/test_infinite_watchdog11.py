"""stall_timeout_s: .inf (a watchdog that never restarts the decoder) is a valid camera: every JSON copy of it
(GET /cameras, the control stream's answers, GET /cameras/export) stays JSON, and reads back as the same camera."""

from __future__ import annotations

import json
from types import SimpleNamespace

import yaml
from starlette.responses import JSONResponse

from pipeline.camera_export import export_cameras, export_yaml
from pipeline.config import parse_config
from pipeline.live_control import LiveControl
from workers.publish import encode

CAMERA = {"id": "dock", "url": "rtsp://cam/dock", "stall_timeout_s": float("inf")}


def test_a_camera_whose_watchdog_never_fires_has_json_copies_that_read_back() -> None:
    camera = parse_config({"cameras": [CAMERA]}).cameras[0]
    public = LiveControl.public(SimpleNamespace(model_heads=["people"]), camera)
    JSONResponse(public)  # GET /cameras: Starlette refused Infinity, a 500
    sent = json.loads(encode({"status": "ok", "camera": public}))  # the control stream's answer
    reread = parse_config({"cameras": [{**sent["camera"], "url": CAMERA["url"]}]}).cameras[0]
    assert reread.stall_timeout_s == float("inf") and reread.stall_timeout == float("inf")
    cameras, variables = export_cameras([camera], {})
    JSONResponse({"cameras": cameras})  # GET /cameras/export
    assert parse_config(yaml.safe_load(export_yaml(cameras, variables))).cameras[0] == camera
