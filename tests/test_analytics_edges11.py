"""Zones, lines, the motion gate's settings and appearance, an eleventh look (workers/analytics.py,
workers/analytics_settings.py, workers/appearance.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import ConfigError, parse_config


# --- 1. every setting of a camera's analytics is a finite number -------------------------------------------

def test_an_infinite_max_skip_s_is_refused_at_load_naming_the_field():
    """``motion: {max_skip_s: .inf}`` loaded, and every JSON copy of the camera failed: GET /cameras answered 500
    (starlette refuses Infinity), the control stream's answers carried ``Infinity``, which no JSON parser reads."""
    text = "cameras: [{id: c1, url: 'synthetic://street', motion: {enabled: true, max_skip_s: .inf}}]"
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.motion\.max_skip_s: Input should be a finite number"):
        parse_config(yaml.safe_load(text))


def test_guard_normal_path_a_long_finite_max_skip_s_loads_and_is_valid_json():
    text = "cameras: [{id: c1, url: 'synthetic://street', motion: {enabled: true, max_skip_s: 86400}}]"
    camera = parse_config(yaml.safe_load(text)).cameras[0]
    assert camera.motion.max_skip_s == 86400
    json.dumps(camera.model_dump(mode="json"), allow_nan=False)  # what the API's answers do


@pytest.mark.parametrize("setting, field", [
    ("tracker: {appearance: {max_distance: .inf}}", r"cameras\[0\]\.tracker\.appearance\.max_distance"),
])
def test_the_other_unbounded_floats_of_a_camera_are_finite_too(setting, field):
    """The same as max_skip_s for the other float of a camera with no upper bound, but for stall_timeout_s: .inf,
    a watchdog that never restarts the decoder, on purpose (tests/test_service_edges6.py)."""
    text = f"cameras: [{{id: c1, url: 'synthetic://street', {setting}}}]"
    with pytest.raises(ConfigError, match=field + ": Input should be a finite number"):
        parse_config(yaml.safe_load(text))
