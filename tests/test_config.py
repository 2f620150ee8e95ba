"""Config: defaults, ${ENV} interpolation, and errors that name the field path and the value."""

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, interpolate_env, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def cam(**kw):
    return {"id": "c1", "url": "synthetic://street", **kw}


@pytest.mark.parametrize("name", ["demo.yaml", "rtsp-example.yaml"])
def test_shipped_configs_are_valid(name, monkeypatch):
    monkeypatch.setenv("CAM_PASSWORD", "x")
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.cameras


def test_demo_defaults_need_no_setup(monkeypatch):
    monkeypatch.delenv("HYDRAVISION_REDIS_URL", raising=False)
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.redis.url is None  # embedded Redis
    assert cfg.ray.address == "local" and cfg.model.device == "auto"
    assert all(c.url.startswith("synthetic://") for c in cfg.cameras)
    assert cfg.model.checkpoint_path().is_file()


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"cameras": [cam(fps=-5)]}, r"cameras\[0\]\.fps: Input should be greater than 0 \(got -5\)"),
        ({"cameras": [cam(), cam()]}, r"cameras\[1\]\.id: duplicate camera id 'c1' \(also cameras\[0\]\)"),
        ({"cameras": [cam(colour="red")]}, r"cameras\[0\]\.colour: unknown field"),
        ({"camera": []}, r"camera: unknown field"),
        ({"cameras": [cam(url="ftp://x/y")]}, r"cameras\[0\]\.url: unsupported scheme 'ftp'"),
        ({"cameras": [cam(id="bad id!")]}, r"cameras\[0\]\.id: must be 1-64 letters"),
        ({"cameras": [cam(heads=[])]}, r"cameras\[0\]\.heads: must name at least one head"),
        ({"cameras": [cam(transport="quic")]}, r"cameras\[0\]\.transport: Input should be 'tcp' or 'udp'"),
        ({"cameras": [cam(tracker={"lost_track_buffer": "long"})]}, r"cameras\[0\]\.tracker\.lost_track_buffer"),
        ({"inference": {"max_batch": 0}}, r"inference\.max_batch: Input should be greater than or equal to 1 \(got 0\)"),
        ({"redis": {"url": "http://x"}}, r"redis\.url: must start with redis://"),
        # a password with '/' cut the URL there: redis-py's error quoted the rest as a port ("as 'ab'")
        ({"redis": {"url": "redis://:ab/cd@db:6379/0"}}, r"redis\.url: no readable host:port; a password holding '/'.*"
                                                        r"\(got 'redis://\*\*\*@db:6379/0'\)"),
        ({"model": {"device": "tpu"}}, r"model\.device: String should match pattern"),
        ({"cameras": "lobby"}, r"cameras: Input should be a valid list"),
        ({"cameras": [cam(hwaccel="nvdecc")]}, r"cameras\[0\]\.hwaccel: not a hardware decoder this FFmpeg supports"),
        ({"cameras": [cam(max_frame_age_ms=0)]}, r"cameras\[0\]\.max_frame_age_ms: Input should be greater than 0"),
        ({"cameras": [cam(max_frame_age_ms="fast")]}, r"cameras\[0\]\.max_frame_age_ms: Input should be a valid number"),
        ({"cameras": [cam(max_frame_age_ms=300, realtime=False)]},
         r"cameras\[0\]: max_frame_age_ms: an unpaced file \(realtime: false\)"),
        ([1, 2], r"expected a mapping at the top level"),
        # infinite or huge: the decoder (integer microseconds), Event.wait and Redis's MAXLEN would overflow
        ({"cameras": [cam(read_timeout_s=float("inf"))]},
         r"cameras\[0\]\.read_timeout_s: Input should be less than or equal to 3600 \(got inf\)"),
        ({"cameras": [cam(open_timeout_s=1e999)]}, r"cameras\[0\]\.open_timeout_s: Input should be less than or equal"),
        ({"status": {"interval_s": float("inf")}}, r"status\.interval_s: Input should be less than or equal to 3600"),
        ({"status": {"interval_s": 1e300}}, r"status\.interval_s: Input should be less than or equal to 3600"),
        ({"redis": {"maxlen": 2**64}}, r"redis\.maxlen: Input should be less than or equal to 9223372036854775807"),
        ({"control": {"results_maxlen": 2**63}}, r"control\.results_maxlen: Input should be less than or equal to"),
        ({"ray": {"object_store_mb": 64}}, r"ray\.object_store_mb: Input should be greater than or equal to 75"),
    ],
)
def test_errors_name_field_path_and_value(data, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)


@pytest.mark.parametrize("key, value, refused", [
    ("site", "north", None),
    ("example.com/site", "north-1", None),
    ("zone", "", None),  # an empty value is a label too
    ("site name", "north", "key 'site name'"),
    ("-site", "north", "key '-site'"),
    ("s" * 64, "north", "key 'sss"),
    ("bad_/site", "north", "key 'bad_/site': the part before '/'"),
    ("site", "north pole", "value 'north pole' of 'site'"),
    ("site", "n" * 64, "value 'nnn"),
])
def test_placement_labels_are_refused_where_ray_would_refuse_them(key, value, refused):
    from ray._private.label_utils import validate_label_key, validate_label_value

    try:  # the rule is Ray's, mirrored: this row must be Ray's verdict too
        validate_label_value(value)
        ray_refuses = validate_label_key(key) is not None
    except ValueError:
        ray_refuses = True
    assert ray_refuses == (refused is not None)
    data = {"cameras": [cam(placement={"labels": {key: value}})]}
    if refused is None:
        assert parse_config(data).cameras[0].placement.labels == {key: value}
    else:
        with pytest.raises(ConfigError, match=r"cameras\[0\]\.placement\.labels: " + re.escape(refused)):
            parse_config(data)


def test_frame_age_budget_is_off_unless_set():
    cfg = parse_config({"cameras": [cam(), cam(id="c2", max_frame_age_ms=300)]})
    assert cfg.cameras[0].max_frame_age_ms is None and cfg.cameras[1].max_frame_age_ms == 300


def test_env_interpolation_with_defaults(monkeypatch):
    monkeypatch.setenv("CAM_PW", "s3cret")
    monkeypatch.delenv("MISSING", raising=False)
    out = interpolate_env({"a": ["rtsp://u:${CAM_PW}@h/x", "${MISSING:-fallback}", 3]})
    assert out == {"a": ["rtsp://u:s3cret@h/x", "fallback", 3]}


def test_missing_env_var_names_field(monkeypatch):
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.url: environment variable \$\{NOPE\} is not set"):
        parse_config({"cameras": [cam(url="rtsp://u:${NOPE}@h/x")]})


def test_secrets_in_bad_values_are_redacted(monkeypatch):
    monkeypatch.setenv("CAM_PW", "hunter2")
    with pytest.raises(ConfigError) as err:
        parse_config({"cameras": [cam(url="ftp://admin:${CAM_PW}@cam/x")]})
    assert "hunter2" not in str(err.value) and "ftp://***@cam/x" in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [("cameras: [", "not valid YAML"), ("", "no cameras"), ("42", "expected a mapping")],
)
def test_bad_files(tmp_path, text, expected):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    if expected == "no cameras":
        assert load_config(p).cameras == []
    else:
        with pytest.raises(ConfigError, match=expected):
            load_config(p)


def test_a_key_given_twice_is_refused_and_merge_keys_still_work(tmp_path):
    """YAML keeps the last of two equal keys without a word: a second `cameras:` block dropped the first's."""
    p = tmp_path / "c.yaml"
    p.write_text("cameras:\n  - {id: a, url: 'synthetic://street'}\nredis: {prefix: x}\n"
                 "cameras:\n  - {id: b, url: 'synthetic://street'}\n")
    with pytest.raises(ConfigError, match=r"key 'cameras' given twice in one mapping \(first on line 1\)"):
        load_config(p)
    p.write_text("cameras:\n  - {id: a, url: 'synthetic://street', fps: 5, fps: 10}\n")  # on one line
    with pytest.raises(ConfigError, match=r"key 'fps' given twice in one mapping \(first on line 2\)"):
        load_config(p)
    p.write_text("cameras:\n  - &cam {id: a, url: 'synthetic://street', fps: 5}\n  - <<: *cam\n    id: b\n")
    assert [(c.id, c.fps) for c in load_config(p).cameras] == [("a", 5), ("b", 5)]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
