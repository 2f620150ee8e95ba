"""What a camera added at run time may read and reach (issue 13, part 1: the control channels are an attack
surface), the field paths of its errors, and the export that never prints a credential. No Ray, no Redis."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.admission import Admission, CommandRejected, merge_changes, parse_camera
from pipeline.camera_export import export_cameras, export_yaml
from pipeline.config import ApiConfig, ConfigError, parse_config
from workers.redact import redact_url
from workers.settings import CameraConfig

HEADS = {"people": ["person"], "vehicles": ["car", "bicycle"]}
SECRET = "Hx7-secret-pw"


@pytest.fixture
def media(tmp_path: Path) -> dict[str, Path]:
    """A media root with a video, a playlist, a symlink out of the root and a folder beside the root."""
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    video = root / "sub" / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    (root / "list.m3u8").write_text("#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n")
    (root / "escape.mp4").symlink_to("/etc/passwd")
    (root / "dev-link").symlink_to("/dev/mem")
    outside = tmp_path / "secrets"
    outside.mkdir()
    (outside / "key.mp4").write_bytes(b"\x00binary")
    return {"root": root, "video": video, "outside": outside}


def admission(media: dict[str, Path], **api: object) -> Admission:
    settings = ApiConfig(media_roots=[str(media["root"])], devices=["/dev/null"], **api)
    return Admission(settings, HEADS, {"Redis": ("127.0.0.1", 6399), "HTTP API": ("0.0.0.0", 8470)})


# url (MEDIA = the media root), expected: a substring of the reason, or the url the camera will read
CASES = [
    ("MEDIA/sub/clip.mp4", "ok"),
    ("file://MEDIA/sub/clip.mp4", "ok"),
    ("MEDIA/sub/../sub/clip.mp4", "ok"),
    ("/etc/passwd", "outside the media roots"),
    ("file:///etc/passwd", "outside the media roots"),
    ("MEDIA/../secrets/key.mp4", "outside the media roots"),
    ("MEDIA/sub/../../secrets/key.mp4", "outside the media roots"),
    ("MEDIA/escape.mp4", "outside the media roots"),  # a symlink out of the root
    ("MEDIA/dev-link", "outside the media roots"),
    ("/dev/mem", "outside the media roots"),
    ("MEDIA/list.m3u8", "is a text file"),
    ("MEDIA/missing.mp4", "not a regular file"),
    ("MEDIA/sub", "not a regular file"),
    ("sub/clip.mp4", "absolute path"),
    ("concat:MEDIA/sub/clip.mp4|/etc/passwd", "absolute path"),
    ("file://otherhost/MEDIA/sub/clip.mp4", "must be local"),
    # urlsplit ends the path at '#' or '?': these named MEDIA/sub/clip.mp4 (accepted) or "clip.mp4 " (no file)
    ("file://MEDIA/sub/clip.mp4#2.mp4", "ends its path at '?' or '#'"),
    ("file://MEDIA/sub/clip.mp4?x=1", "ends its path at '?' or '#'"),
    ("file://MEDIA/sub/clip.mp4 #2.mp4", "ends its path at '?' or '#'"),
    ("device:///dev/mem", "not in api.devices"),
    ("/dev/video7", "not in api.devices"),
    ("device:///dev/null", "ok"),
    ("rtsp://127.0.0.1:6399/x", "own Redis"),
    ("rtsp://localhost:6399/x", "own Redis"),
    ("rtsp://[::1]:6399/x", "own Redis"),
    ("http://0.0.0.0:8470/cameras", "own HTTP API"),
    (f"http://admin:{SECRET}@127.0.0.1:8470/", "own HTTP API"),
    ("rtsp://127.0.0.1:8554/x", "ok"),  # a local RTSP server on another port is fine
    ("rtsp://127.0.0.1:99999/x", "out of range"),
    ("rtsp:///x", "no host"),
    ("rtsp://no-such-host.invalid/x", "does not resolve"),
    ("synthetic://street?seed=1", "ok"),
]


@pytest.mark.parametrize("url, expected", CASES)
def test_run_time_cameras_read_only_media_roots_and_allowed_devices(media, url, expected):
    url = url.replace("MEDIA", str(media["root"]))
    # unvalidated: the admission's own checks, behind the config's (which refuse an unreadable port too)
    cam = CameraConfig.model_construct(id="x", url=url)
    if expected == "ok":
        checked = admission(media).check(cam)
        if "clip.mp4" in url:  # the camera reads the resolved path, not one a symlink swap could redirect
            assert checked.url == str(media["video"])
        return
    with pytest.raises(CommandRejected) as err:
        admission(media).check(cam)
    assert err.value.reason.startswith("camera.url: "), err.value.reason
    assert expected in err.value.reason
    assert SECRET not in err.value.reason


# url, a piece of its secret (by workers/redact.py's rule: everything up to the last '@'), the refusal
@pytest.mark.parametrize("url, secret, reason", [
    ("rtsp://admin:s3cret/x@cam.example/stream", "s3cret", "invalid host or port"),
    ("rtsp://admin:hunter2?x@cam.example/stream", "hunter2", "invalid host or port"),
    ("rtsp://admin:pw-7#ss@cam.example/stream", "pw-7", "invalid host or port"),
    ("rtsp://tok3nvalue/zz@cam.example/stream", "tok3nvalue", "does not resolve"),
    ("rtsp://localhost:6399/pw@cam.example/x", "6399", "own Redis"),  # FFmpeg's host:port is in the hidden part
    ("file://admin:s3cret@otherhost/x.mp4", "s3cret", "must be local"),
    ("device://admin:s3cret@/dev/video0", "s3cret", "not in api.devices"),
])
def test_a_refusal_shows_the_url_redacted_even_where_the_password_holds_a_raw_slash_or_hash(media, url, secret,
                                                                                            reason):
    with pytest.raises(CommandRejected) as err:  # unvalidated: the admission's own checks, behind the config's
        admission(media).check(CameraConfig.model_construct(id="x", url=url))
    assert secret not in err.value.reason and repr(redact_url(url)) in err.value.reason, err.value.reason
    assert err.value.reason.startswith("camera.url: ") and reason in err.value.reason, err.value.reason


def test_no_media_roots_no_files_and_config_cameras_are_not_checked(media):
    bare = Admission(ApiConfig(), HEADS)
    with pytest.raises(CommandRejected, match="no api.media_roots configured"):
        bare.check(CameraConfig(id="x", url=str(media["video"])))
    # an update that leaves the URL alone does not re-check it (a config camera may read any file)
    assert bare.check(CameraConfig(id="x", url="/etc/passwd"), url_changed=False).url == "/etc/passwd"


def test_an_endpoint_added_later_is_forbidden_too(media):
    adm = admission(media)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert adm.check(CameraConfig(id="x", url=f"rtsp://127.0.0.1:{port}/x"))
    adm.forbid("Ray GCS", "127.0.0.1", port)
    with pytest.raises(CommandRejected, match="own Ray GCS"):
        adm.check(CameraConfig(id="x", url=f"rtsp://localhost:{port}/x"))


@pytest.mark.parametrize("data, reason", [
    ({"id": "x", "url": "synthetic://street", "heads": ["faces"]}, "camera.heads: unknown heads ['faces']"),
    ({"id": "x", "url": "synthetic://street", "lines": [{"name": "gate", "start": [0.1, 0.5], "end": [0.9, 0.5],
                                                        "classes": ["unicorn"]}]},
     "camera.lines[0].classes: ['unicorn'] not a class of head(s)"),
    ({"id": "x", "url": "synthetic://street", "fps": -5}, "camera.fps: Input should be greater than 0 (got -5)"),
    ({"id": "x y", "url": "synthetic://street"}, "camera.id: must be 1-64 letters"),
    ({"id": "x", "url": f"ftp://u:{SECRET}@h/x"}, "camera.url: unsupported scheme 'ftp'"),
    ({"id": "x"}, "camera.url: Field required"),
    ({"id": "x", "url": "synthetic://street", "colour": "red"}, "camera.colour: unknown field"),
    ({"id": "x", "url": "synthetic://street", "placement": {"labels": {"site name": "north"}}},
     "camera.placement.labels: key 'site name'"),  # Ray's .options() would refuse it when the camera starts
    ({"id": "x", "url": "rtsp://cam/x", "read_timeout_s": float("inf")},  # JSON's Infinity, or 1e999
     "camera.read_timeout_s: Input should be less than or equal to 3600 (got inf)"),
    (["not", "an", "object"], "camera: expected a JSON object"),
])
def test_bad_cameras_are_rejected_naming_the_field(media, data, reason):
    with pytest.raises(CommandRejected) as err:
        admission(media).check(parse_camera(data))
    assert reason in err.value.reason
    assert SECRET not in err.value.reason


def test_run_time_input_gets_no_environment_interpolation(monkeypatch):
    monkeypatch.setenv("HV_TEST_SECRET", SECRET)
    cam = parse_camera({"id": "x", "url": "rtsp://${HV_TEST_SECRET}@cam/x"})
    assert SECRET not in cam.url and "${HV_TEST_SECRET}" in cam.url


@pytest.mark.parametrize("changes, expected", [
    ({"fps": 5}, {"fps": 5.0}),
    ({"tracker": {"lost_track_buffer": 60}}, {"tracker.lost_track_buffer": 60, "tracker.minimum_iou_threshold": 0.3}),
    ({"tracker": {"appearance": {"weight": 0.2}}},
     {"tracker.appearance.weight": 0.2, "tracker.appearance.relink": False, "tracker.minimum_iou_threshold": 0.3}),
    ({"heads": None}, {"heads": None}),
    ({"id": "other"}, "camera.id: cannot change"),
    ({"fps": 0}, "camera.fps: Input should be greater than 0"),
    ({"url": ""}, "camera.url:"),
    ({}, "changes: expected a JSON object"),
    ("fps=5", "changes: expected a JSON object"),
])
def test_changes_merge_field_by_field(changes, expected):
    current = CameraConfig(id="cam", url="synthetic://street", heads=["people"],
                           tracker={"minimum_iou_threshold": 0.3, "appearance": {"relink": False}})
    if isinstance(expected, str):
        with pytest.raises(CommandRejected, match=expected.replace("(", r"\(")):
            merge_changes(current, changes)
        return
    merged = merge_changes(current, changes)
    for path, value in expected.items():
        obj = merged
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == value


@pytest.mark.parametrize("changes, field", [
    ({"max_inflight": 5}, "max_inflight"),
    ({"placement": {"labels": {"site": "south"}}}, "placement"),  # its process's Ray options are fixed
])
def test_an_update_cannot_change_what_the_camera_process_started_with(changes, field):
    from pipeline.app import App

    app = App(parse_config({}), say=lambda line: None)
    app.admission = Admission(ApiConfig(), HEADS)
    config = CameraConfig(id="gate", url="synthetic://street", placement={"labels": {"site": "north"}})
    app.cameras["gate"] = SimpleNamespace(config=config)  # no process: the update must not reach one
    with pytest.raises(CommandRejected, match=rf"^camera\.{field}: cannot change while the camera runs"):
        app.update_camera("gate", changes, by="test")
    assert app.cameras["gate"].config == config and not app._busy


def test_a_camera_being_updated_or_removed_counts_once_against_max_cameras():
    from pipeline.app import App

    app = App(parse_config({"api": {"max_cameras": 2}}))
    app.cameras["a"] = SimpleNamespace(config=CameraConfig(id="a", url="synthetic://street"))
    app._claim("a")  # an update or removal of the running camera is under way
    app._claim("b", new=True)  # the second place is still free
    with pytest.raises(CommandRejected, match=r"camera: 2 cameras already run \(api.max_cameras\)"):
        app._claim("c", new=True)


def test_a_second_add_of_an_id_while_the_first_registers_is_refused():
    """The first add's claim on the id was released before its camera was in ``cameras``: an add of the same
    id in between was let through, and two cameras ran under one id."""
    from pipeline.app import App

    app = App(parse_config({"api": {"max_cameras": 4}}))
    app.admission = SimpleNamespace(check=lambda cam: cam)
    app.model_heads, app._audit = {"people": ["person"]}, lambda *args, **kwargs: None
    second: list[str] = []

    class Started:  # a started camera, whose registration is where the second add comes in
        @property
        def added_by(self) -> str:
            return "test"

        @added_by.setter
        def added_by(self, by: str) -> None:
            if by == "first":
                try:
                    app.add_camera({"id": "a", "url": "synthetic://street"}, by="second")
                    second.append("added")
                except CommandRejected as e:
                    second.append(e.reason)

    app._spawn = lambda cams: [Started()]
    app.add_camera({"id": "a", "url": "synthetic://street"}, by="first")
    assert second == ["camera.id: camera 'a' is being changed by another command (or restarted after a crash)"]
    assert list(app.cameras) == ["a"] and not app._busy


def test_a_process_a_camera_is_joining_is_not_killed_when_its_last_camera_goes(monkeypatch):
    """A camera added at run time may join the process of one being removed: the removal saw no other camera
    of that process and killed it under the one joining."""
    import ray

    from pipeline.app import App

    app = App(parse_config({"api": {"max_cameras": 4}}))
    forgotten, killed = [], []
    process = SimpleNamespace(forget=SimpleNamespace(remote=forgotten.append))
    leaving = SimpleNamespace(id="a", process=process)
    app._joins["b"] = leaving  # _joining chose a's process for b (it keeps the handle of a camera there)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=False: killed.append(actor))
    assert app._let_go(leaving) is False  # a is out of ``cameras`` already, as remove_camera leaves it
    assert forgotten == ["a"] and not killed


def test_a_removed_camera_without_final_stats_keeps_its_track_ids_from_its_last_status(redis_server):
    """A camera whose process had crashed (or was being restarted) gives no final stats at its removal: its
    next track ids were not kept, and the same id added again numbered from 0 (or from an older removal's)."""
    import json

    from pipeline.app import App
    from workers.settings import RedisConfig

    app = App(parse_config({}))
    app.redis_settings = RedisConfig(url=redis_server.url)
    client = redis_server.client()
    client.hset("hv:cameras", "a", json.dumps({"state": "running", "track_ids_next": {"people": 7}}))
    client.hset("hv:track_ids", "a", json.dumps({"people": 3, "vehicles": 9}))  # an earlier removal's
    client.hset("hv:cam:a:snapshot", mapping={"jpeg": b"\xff\xd8", "frame": 3})
    client.hset("hv:cam:a:counts", mapping={"zone:z:people:person": 1})
    client.xadd("hv:cam:a:detections", {"data": "{}"})
    app._retire_in_redis("a", None)
    assert json.loads(client.hget("hv:track_ids", "a")) == {"people": 7, "vehicles": 9}
    # what it showed now goes (it stayed for every id ever removed); its stream stays for its consumers
    assert not client.exists("hv:cam:a:snapshot", "hv:cam:a:counts") and client.xlen("hv:cam:a:detections") == 1


def test_api_settings_refuse_weak_tokens(monkeypatch):
    with pytest.raises(ConfigError, match=r"api.tokens: .*token 'ops' is shorter than 16"):
        parse_config({"api": {"tokens": {"ops": "short"}}})
    monkeypatch.setenv("HYDRAVISION_API_TOKEN", "weak")
    with pytest.raises(ConfigError, match="shorter than 16"):
        ApiConfig().all_tokens()
    monkeypatch.setenv("HYDRAVISION_API_TOKEN", "a" * 16)
    assert ApiConfig(tokens={"ops": "b" * 20}).all_tokens() == {"ops": "b" * 20, "env": "a" * 16}


def test_a_dashboard_port_in_use_fails_before_anything_starts():
    """It was bound after Redis, Ray, the model and the cameras had started, and its OSError ended the run as
    a bug (exit 1); the API's port in use next to it is refused the same way."""
    from pipeline.app import App

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        app = App(parse_config({"cameras": [{"id": "c", "url": "synthetic://street"}],
                                "dashboard": {"enabled": True, "port": taken.getsockname()[1]}}))
        with pytest.raises(ConfigError, match=r"dashboard: cannot listen on 127.0.0.1:\d+: Address already in use"):
            app.start()
    assert app.reaper is None and app.embedded is None and not app.started_ray and not app.cameras


def test_an_api_beyond_loopback_needs_a_token_and_a_port_in_use_fails_before_anything_starts(monkeypatch):
    from pipeline.app import App

    monkeypatch.delenv("HYDRAVISION_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"api.host: 0.0.0.0 is reachable from other machines"):
        App(parse_config({"api": {"host": "0.0.0.0", "port": 0}})).check_api_settings()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        app = App(parse_config({"api": {"port": taken.getsockname()[1]}}))
        with pytest.raises(ConfigError, match=r"api: cannot listen on 127.0.0.1:\d+: Address already in use"):
            app.check_api_settings()
    app = App(parse_config({"api": {"host": "0.0.0.0", "port": 0, "tokens": {"ops": "t" * 16}}}))
    app.check_api_settings()  # with a token: fine, and the port is held from now on
    assert app._api_socket.getsockname()[1] > 0
    app.stop_control()
    assert app._api_socket is None


def test_a_weak_api_token_in_the_environment_stops_a_loopback_api_before_anything_starts(monkeypatch):
    from pipeline.app import App

    monkeypatch.setenv("HYDRAVISION_API_TOKEN", "short")
    app = App(parse_config({"api": {"port": 0}}))
    try:
        with pytest.raises(ConfigError, match=r"\$HYDRAVISION_API_TOKEN: the token is shorter than 16"):
            app.check_api_settings()
    finally:
        app.stop_control()  # closes the socket that the old check bound


def test_export_writes_placeholders_never_a_password(monkeypatch, tmp_path):
    monkeypatch.setenv("CAM_PW", SECRET)
    config = parse_config({"cameras": [
        {"id": "from-file", "url": "rtsp://admin:${CAM_PW}@cam-1/stream", "fps": 5},
        {"id": "literal", "url": f"rtsp://admin:{SECRET}@cam-2/stream?token={SECRET}x"},
    ]})
    added = CameraConfig(id="run-time.cam", url=f"rtsps://viewer:{SECRET}@cam-3:322/live", heads=["people"])
    cameras, needed = export_cameras(config.cameras + [added], config._written_urls)
    text = export_yaml(cameras, needed)
    assert SECRET not in text
    assert needed == ["HV_LITERAL_SECRET", "HV_LITERAL_SECRET_2", "HV_RUN_TIME_CAM_SECRET"]
    assert cameras[0] == {"id": "from-file", "url": "rtsp://admin:${CAM_PW}@cam-1/stream", "fps": 5.0}
    # what was exported loads again, with the variables set
    for name in needed:
        monkeypatch.setenv(name, f"admin:{SECRET}")
    path = tmp_path / "exported.yaml"
    path.write_text(text)
    reloaded = parse_config(yaml.safe_load(path.read_text()))
    assert [c.id for c in reloaded.cameras] == ["from-file", "literal", "run-time.cam"]
    assert reloaded.cameras[0].url == f"rtsp://admin:{SECRET}@cam-1/stream"
    assert reloaded.cameras[2].heads == ["people"]
    # a camera from the file whose URL changed at run time is not exported as the file had it
    changed = config.cameras[0].model_copy(update={"url": "rtsp://cam-9/other"})
    assert export_cameras([changed], config._written_urls)[0][0]["url"] == "rtsp://cam-9/other"


@pytest.mark.parametrize("written, exported", [
    ("rtsp://${CAM_USER}:hunter2@cam/live", "rtsp://${HV_C_SECRET}@cam/live"),  # a variable user, a literal password
    ("rtsp://cam/live?token=abc${CAM_NONE:-}def", "rtsp://cam/live?token=${HV_C_SECRET}"),
    ("rtsp://admin:${CAM_PW:-hunter2}@cam/live", "rtsp://${HV_C_SECRET}@cam/live"),  # the default is a password
    ("rtsp://${CAM_USER}:${CAM_PW}@cam/live?token=${CAM_PW:-}",
     "rtsp://${CAM_USER}:${CAM_PW}@cam/live?token=${CAM_PW:-}"),
    ("rtsp://${CAM_USER}@cam/live", "rtsp://${CAM_USER}@cam/live"),  # a userinfo without ':' is a token
])
def test_export_keeps_a_secret_as_written_only_when_it_is_one_variable(monkeypatch, written, exported):
    monkeypatch.setenv("CAM_USER", "admin")
    monkeypatch.setenv("CAM_PW", SECRET)
    monkeypatch.delenv("CAM_NONE", raising=False)
    config = parse_config({"cameras": [{"id": "c", "url": written}]})
    cameras, needed = export_cameras(config.cameras, config._written_urls)
    assert cameras[0]["url"] == exported
    assert needed == (["HV_C_SECRET"] if "HV_C_SECRET" in exported else [])
