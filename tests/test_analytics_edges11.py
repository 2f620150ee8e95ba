"""Zones, lines, the motion gate's settings and appearance, an eleventh look (workers/analytics.py,
workers/analytics_settings.py, workers/appearance.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import parse_config


# --- 1. every JSON copy of a camera is JSON, infinite settings included -------------------------------------

@pytest.mark.parametrize("setting, read", [
    ("motion: {enabled: true, max_skip_s: .inf}", lambda c: c.motion.max_skip_s),  # inference on motion only
    ("tracker: {appearance: {max_distance: .inf}}", lambda c: c.tracker.appearance.max_distance),  # any distance
    ("stall_timeout_s: .inf", lambda c: c.stall_timeout_s),  # a watchdog that never restarts the decoder
])
def test_an_infinite_setting_has_json_copies_that_read_back(setting, read):
    """``motion: {max_skip_s: .inf}`` loaded, and every JSON copy of the camera failed: GET /cameras answered 500
    (starlette refuses Infinity), the control stream's answers carried ``Infinity``, which no JSON parser reads.
    Written as "inf", it reads back as inf."""
    camera = parse_config(yaml.safe_load(f"cameras: [{{id: c1, url: 'synthetic://street', {setting}}}]")).cameras[0]
    assert read(camera) == float("inf")
    sent = json.loads(json.dumps(camera.as_json(), allow_nan=False))  # what the API's answers do
    assert read(parse_config({"cameras": [sent]}).cameras[0]) == float("inf")


def test_guard_normal_path_a_long_finite_max_skip_s_loads_and_is_valid_json():
    text = "cameras: [{id: c1, url: 'synthetic://street', motion: {enabled: true, max_skip_s: 86400}}]"
    camera = parse_config(yaml.safe_load(text)).cameras[0]
    assert camera.motion.max_skip_s == 86400
    json.dumps(camera.model_dump(mode="json"), allow_nan=False)  # what the API's answers do


