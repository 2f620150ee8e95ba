"""Config edges: ${VAR} references the shell reads differently, files that are no text, ids and tokens that
look valid but are not, and checks that crashed instead of naming the field."""

import os

import pytest
from pydantic import ValidationError

from pipeline.admission import Admission, CommandRejected
from pipeline.config import ApiConfig, ConfigError, interpolate_env, load_config, parse_camera, parse_config
from workers.settings import CameraConfig


def cam(**kw):
    return {"id": "c1", "url": "synthetic://street", **kw}


def test_a_default_applies_to_an_empty_variable_as_in_the_shell(monkeypatch):
    """`HYDRAVISION_REDIS_URL=` (set, empty) with rtsp-example.yaml's ${HYDRAVISION_REDIS_URL:-redis://...}: the
    service started an embedded Redis while `hydravision tail` read the default one."""
    monkeypatch.setenv("HV_EMPTY", "")
    cfg = parse_config({"redis": {"url": "${HV_EMPTY:-redis://127.0.0.1:6379/0}"},
                        "cameras": [cam(fps="${HV_EMPTY:-5}")]})
    assert cfg.redis.url == "redis://127.0.0.1:6379/0" and cfg.cameras[0].fps == 5
    # without a default an empty variable stays empty (demo.yaml's ${HYDRAVISION_REDIS_URL:-}: embedded Redis)
    assert parse_config({"redis": {"url": "${HV_EMPTY}"}}).redis.url is None


@pytest.mark.parametrize("written, expected", [
    # left as text, the password was the literal "${CAM_PW:secret}": refused by the camera at run time
    ("rtsp://admin:${CAM_PW:secret}@cam/live", r"cameras\[0\]\.url: the '\$\{' at character 14 starts no"),
    ("rtsp://admin:${CAM_PW-secret}@cam/live", r"cameras\[0\]\.url: the '\$\{' at character 14 starts no"),
    ("rtsp://${ CAM_USER }@cam/live", r"cameras\[0\]\.url: the '\$\{' at character 8 starts no"),
    ("rtsp://admin:${CAM_PW:-${OTHER_PW}}@cam/live", r"cameras\[0\]\.url: the default of \$\{CAM_PW:-\.\.\.\} holds"),
])
def test_a_malformed_reference_is_refused_naming_the_field(monkeypatch, written, expected):
    monkeypatch.delenv("CAM_PW", raising=False)
    monkeypatch.setenv("CAM_USER", "admin")
    with pytest.raises(ConfigError, match=expected) as err:
        parse_config({"cameras": [cam(url=written)]})
    assert "secret" not in str(err.value)  # where, not what: the text after a stray '${' may be a password


def test_good_references_still_read(monkeypatch):
    monkeypatch.setenv("CAM_PW", "s3:c}ret")
    monkeypatch.delenv("NOPE", raising=False)
    assert interpolate_env("rtsp://a:${CAM_PW}@h/x?t=${NOPE:-a:b}&u=${NOPE:-}") == "rtsp://a:s3:c}ret@h/x?t=a:b&u="


@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)) * 4, r"(?s)not valid YAML: .*position 128"),  # a video given for the config by mistake
    ("cameras: []  # caméra du hall\n".encode("latin-1"), r"(?s)not valid YAML: .*position 18"),
])
def test_a_file_that_is_not_utf8_text_is_a_config_error(tmp_path, content, expected):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(p)


def test_yaml_in_utf16_and_utf8_with_bom_loads_whatever_the_locale(tmp_path):
    p = tmp_path / "c.yaml"
    for data in ("\ufeffcameras: [{id: a, url: 'synthetic://street'}]  # caméra\n".encode("utf-8"),
                 "cameras: [{id: a, url: 'synthetic://street'}]  # caméra\n".encode("utf-16")):
        p.write_bytes(data)
        assert [c.id for c in load_config(p).cameras] == ["a"]


def test_an_unreadable_file_is_a_config_error(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("cameras: []\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(type(p), "read_text", denied)  # (root reads a chmod 000 file: refuse it by hand)
    monkeypatch.setattr(type(p), "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"c\.yaml: cannot read the config: Permission denied"):
        load_config(p)


@pytest.mark.parametrize("data, expected", [
    # re.match with "$" let a final newline through: "lobby\n" beside "lobby", a second camera of that name
    ({"cameras": [cam(id="lobby"), cam(id="lobby\n")]}, r"cameras\[1\]\.id: must be 1-64 letters"),
    ({"api": {"tokens": {"ops\n": "x" * 20}}}, r"api\.tokens: token name 'ops\\n'"),
])
def test_a_final_newline_is_no_part_of_a_name(data, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)
    with pytest.raises(ValidationError, match="must be 1-64 letters"):  # a camera from a control channel too
        CameraConfig(id="lobby\n", url="synthetic://street")


@pytest.mark.parametrize("token", ["t" * 20 + "\n", " " + "t" * 20, "t" * 10 + "\r\n" + "t" * 10])
def test_a_token_no_request_can_send_is_refused(token):
    """HTTP drops a header's surrounding whitespace: a token read from a file with its newline refused every
    request (Prometheus' scrapes too) with 401 'invalid token', and nothing said why."""
    with pytest.raises(ConfigError, match=r"api\.tokens: token 'ops' starts or ends with whitespace") as err:
        parse_config({"api": {"tokens": {"ops": token}}})
    assert token.strip() not in str(err.value)
    with pytest.raises(ConfigError, match=r"\$HYDRAVISION_API_TOKEN: the token starts or ends with whitespace"):
        ApiConfig().all_tokens({"HYDRAVISION_API_TOKEN": token})
    assert parse_config({"api": {"tokens": {"ops": "t" * 10 + " " + "t" * 10}}}).api.tokens  # inside: sendable


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.9", True), ("::1", True), ("localhost", True), ("0:0:0:0:0:0:0:1", True),
    ("127.example.com", False), ("127.0.0.1.nip.io", False), ("0.0.0.0", False), ("10.0.0.1", False),
])
def test_only_a_loopback_address_serves_the_api_without_a_token(host, loopback):
    """A host name starting with "127." passed for loopback: the API it resolves to went out without a token."""
    assert ApiConfig(host=host).loopback is loopback


def test_an_empty_media_root_opens_no_files(tmp_path, monkeypatch):
    """realpath("") is the working directory: ${MEDIA_DIR:-} unset made every video under it readable by
    anyone who may add a camera."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDIA_DIR", raising=False)
    (tmp_path / "private.mp4").write_bytes(b"\x00" * 600)
    api = parse_config({"api": {"media_roots": ["${MEDIA_DIR:-}"], "devices": ["${VIDEO_DEV:-}"]}}).api
    assert api.media_roots == [] and api.devices == []
    with pytest.raises(CommandRejected, match="may not read files"):
        Admission(api, {"people": ["person"]}).check(CameraConfig(id="c", url=str(tmp_path / "private.mp4")))


def test_zones_of_a_camera_with_an_unknown_head_name_the_head_not_crash():
    """parse_camera looked the camera's unknown head up in the model for the zone's classes: KeyError."""
    camera = cam(heads=["cars"], zones=[{"name": "z", "polygon": [[0, 0], [1, 0], [1, 1]], "classes": ["car"]}])
    with pytest.raises(ConfigError, match=r"^camera\.heads: unknown heads \['cars'\]"):
        parse_camera(camera, {"people": ["person"], "vehicles": ["car"]})


@pytest.mark.parametrize("url, expected", [
    # redis-py refused it only when the controller's publisher started: "This is a bug in hydravision"
    ("redis://db:6379/0?socket_timeout=5s", r"redis\.url: Invalid value for 'socket_timeout' in connection URL"),
    # redis-py ignores a path that is no number: database 0, another program's, without a word
    ("redis://db:6379/cache", r"redis\.url: the path after host:port must be a database number"),
    ("redis://:123/hunter2@db:6379/0", r"redis\.url: the path after host:port must be a database number"),
])
def test_a_redis_url_redis_py_would_refuse_or_misread_is_refused_at_load(url, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        parse_config({"redis": {"url": url}})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("url", ["redis://db:6379/3", "redis://db", "unix:///run/redis.sock?db=2",
                                 "rediss://:p%2Fw@db:6380/0?ssl_ca_certs=/etc/ca.pem&socket_timeout=2"])
def test_good_redis_urls_still_load(url):
    assert parse_config({"redis": {"url": url}}).redis.url == url


@pytest.mark.parametrize("data, expected", [
    # a field the user expected to exist: its value, a password from the environment, was printed and logged
    ({"redis": {"url": "redis://db:6379/0", "password": "${HV_SECRET}"}}, r"redis\.password: unknown field"),
    ({"cameras": [cam(url="rtsp://cam/live", passwd="${HV_SECRET}")]}, r"cameras\[0\]\.passwd: unknown field"),
    ({"api": {"tokens": {"ops": 12345678901234567890}}}, r"api\.tokens\.ops: Input should be a valid string"),
])
def test_an_unknown_field_or_a_bad_token_never_shows_its_value(monkeypatch, data, expected):
    monkeypatch.setenv("HV_SECRET", "s3cret-pw")
    with pytest.raises(ConfigError, match=expected) as err:
        parse_config(data)
    assert "s3cret-pw" not in str(err.value) and "12345678901234567890" not in str(err.value)


def test_a_config_from_a_pipe_loads(tmp_path):
    """`hydravision run <(envsubst < c.yaml)` (or /dev/stdin): a pipe is no regular file, and was "not found"."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"cameras: [{id: a, url: 'synthetic://street'}]\n")  # far below a pipe's buffer
        os.close(write_end)
        assert [c.id for c in load_config(f"/dev/fd/{read_end}").cameras] == ["a"]
    finally:
        os.close(read_end)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, expected", [
    ("cameras: [{id: a, url: 'synthetic://street', heads: &h [people, *h]}]\n", "a YAML alias refers to the list"),
    ("cameras: " + "[" * 1000 + "]" * 1000 + "\n", "not valid YAML: it nests too deep"),
])
def test_endless_or_absurdly_deep_yaml_is_a_config_error(tmp_path, text, expected):
    """Legal YAML both: they ended in a RecursionError's traceback, "a bug in hydravision"."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(p)


@pytest.mark.parametrize("url", ["rtsp://admin:pa/ss@cam.local:554/live", "rtsp://admin:pa#ss@cam.local/live",
                                 "http://viewer:a?b@cam.local/mjpeg"])
def test_a_camera_password_holding_a_url_delimiter_is_refused_unencoded_and_never_shown(url):
    """The host ends at the first '/', '?' or '#' (for FFmpeg too): the camera dialled "admin" at run time, and
    said only that it could not connect. Refused at load, naming the fix, the password masked."""
    with pytest.raises(ConfigError) as refused:
        parse_config({"cameras": [{"id": "door", "url": url}]})
    text = str(refused.value)
    assert "cameras[0].url" in text and "percent-encoded" in text and "pa/ss" not in text and "a?b" not in text
    parse_config({"cameras": [{"id": "door", "url": "rtsp://admin:pa%2Fss@cam.local:554/live"}]})
