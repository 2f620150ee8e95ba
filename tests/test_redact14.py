"""Passwords shown in clear in camera URLs (an operator run, workers/redact.py): a Foscam-style CGI login
(``&loginpas=``) and other parameter names IP cameras give their passwords and tokens; the userinfo of a URL
%-encoded in a query value (``?to=http%3A%2F%2Fadmin%3Apw%40host``); and the ": " after a masked value, dropped
when an error text already redacted was redacted again (``...&auth=*** not authorized (401)``).

The camera is Python's web server answering 401, read by FFmpeg (workers/av_source.py), and the App's own control
path (pipeline/live_control.py) with stand-ins for its camera processes (no Ray), on a real Redis, as
tests/test_live_edges8.py does."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import pytest
import ray

from servers import serving
from workers.redact import RedactingFormatter, redact_text, redact_url, url_secrets
from workers.sources import SourceError, open_source

FOSCAM = "/mjpeg?fps=10&loginuse=admin&loginpas=Secr3tLP"  # the operator's camera, after its host
NESTED = "/redirect?to=http%3A%2F%2Fadmin%3ARedir9pw%40host%2Fcam%3Ftoken%3DT0kn42%26fps%3D5&fps=3"
AUTH = "/mjpeg?fps=10&auth=Tok3nABC"
SECRETS = ("Secr3tLP", "Redir9pw", "T0kn42", "Tok3nABC")


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


# -- 1. the names cameras give their passwords ---------------------------------------------------------------------

def test_a_foscam_cgi_login_is_hidden() -> None:
    """``loginpas`` ends in no name that was looked for (pass, pwd, ...): the password showed everywhere."""
    url = f"http://127.0.0.1:18741{FOSCAM}"
    assert redact_url(url) == "http://127.0.0.1:18741/mjpeg?fps=10&loginuse=admin&loginpas=***"
    assert url_secrets(url) == ["Secr3tLP"]
    line = redact_text(f"Camera foscam added by api:anonymous: {url}", [])  # a text log line, the net of the logs
    assert line == f"Camera foscam added by api:anonymous: {redact_url(url)}"


@pytest.mark.parametrize("url, shown", [
    ("http://cam/snapshot.cgi?loginuse=admin&loginpas=pw1", "http://cam/snapshot.cgi?loginuse=admin&loginpas=***"),
    ("http://cam/cgi-bin/CGIProxy.fcgi?cmd=snapPicture2&usr=admin&pwd=pw1",  # Foscam HD
     "http://cam/cgi-bin/CGIProxy.fcgi?cmd=snapPicture2&usr=admin&pwd=***"),
    ("http://cam/cgi-bin/api.cgi?cmd=Snap&channel=0&rs=a1b2&user=admin&password=pw1",  # Reolink
     "http://cam/cgi-bin/api.cgi?cmd=Snap&channel=0&rs=a1b2&user=admin&password=***"),
    ("http://cam/cgi-bin/api.cgi?cmd=Snap&token=tk1", "http://cam/cgi-bin/api.cgi?cmd=Snap&token=***"),
    ("http://cam/ISAPI/Streaming/channels/101/picture?auth=YWRtaW46cHcx",  # Hikvision: base64 user:password
     "http://cam/ISAPI/Streaming/channels/101/picture?auth=***"),
    ("http://cam/cgi-bin/snapshot.cgi?chn=1&u=admin&p=pw1", "http://cam/cgi-bin/snapshot.cgi?chn=1&u=admin&p=***"),
    ("http://bi:81/mjpg/cam1/video.mjpg?user=admin&pw=pw1", "http://bi:81/mjpg/cam1/video.mjpg?user=admin&pw=***"),
    ("http://cam/videostream.cgi?user=admin&psw=pw1&resolution=32",
     "http://cam/videostream.cgi?user=admin&psw=***&resolution=32"),
    ("rtsp://cam:554/user=admin_password=pw1_channel=1_stream=0.sdp?real_stream",  # Xiongmai: in the path
     "rtsp://cam:554/user=admin_password=***"),
    ("http://nas:5000/webapi/entry.cgi?api=SYNO.SurveillanceStation.Camera&method=GetSnapshot&cameraId=3&_sid=s1d",
     "http://nas:5000/webapi/entry.cgi?api=SYNO.SurveillanceStation.Camera&method=GetSnapshot&cameraId=3&_sid=***"),
    ("https://b.s3.amazonaws.com/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA1%2F20250101"
     "&X-Amz-Expires=60&X-Amz-Security-Token=st1&X-Amz-Signature=ab12",
     "https://b.s3.amazonaws.com/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Expires=60&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://a.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se=2025-01-01&sr=b&sp=r&sig=c2ln",  # Azure SAS
     "https://a.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se=2025-01-01&sr=b&sp=r&sig=***"),
    ("https://cdn/x.m3u8?access_token=at1&apikey=k1&session_id=s1",
     "https://cdn/x.m3u8?access_token=***&apikey=***&session_id=***"),
])
def test_what_ip_cameras_and_signed_urls_name_their_secrets_is_hidden(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_url(shown) == shown
    assert not [s for s in url_secrets(url) if s in shown]


@pytest.mark.parametrize("url", [
    "http://cam/mjpeg?fps=10&resolution=640x480&channel=2&subtype=1&quality=5&loginuse=admin&user=admin&usr=admin",
    "rtsp://cam:554/cam/realmonitor?channel=1&subtype=0&unicast=true&proto=Onvif",
    "http://cam/axis-cgi/mjpg/video.cgi?resolution=640x480&fps=10&compression=30&camera=1&videokeyframeinterval=8",
    "rtsp://cam:554/Streaming/Channels/101?transportmode=unicast&profile=Profile_1",
    "http://cam/cgi-bin/api.cgi?cmd=Snap&channel=0&rs=wuuPhkmUCeI9WG7C&width=640&height=480",
    "http://h/r?caption=Hello%20World&at=12%3A30&x=%ZZ%4",  # %-escapes that make no URL
])
def test_normal_path_guard_harmless_camera_parameters_stay_readable(url: str) -> None:
    assert redact_url(url) == url
    assert url_secrets(url) == []


# -- 2. a URL %-encoded in a query value --------------------------------------------------------------------------

def test_the_credentials_of_a_percent_encoded_nested_url_are_hidden() -> None:
    """Its ``:`` ``//`` ``@`` are %-escapes, which neither rule read: the password showed in the log and events."""
    url = f"http://127.0.0.1:18741{NESTED}"
    shown = redact_url(url)
    assert shown == ("http://127.0.0.1:18741/redirect?to=http%3A%2F%2F***%40host%2Fcam%3Ftoken%3D***%26fps%3D5&fps=3")
    assert redact_url(shown) == shown
    assert set(url_secrets(url)) == {"Redir9pw", "T0kn42"}
    # a message naming it and the nested URL decoded (a redirect followed, say), the camera's URL known or not
    said = f"redirected from {url} to http://admin:Redir9pw@host/cam?token=T0kn42&fps=5"
    for text in (redact_text(said, []), redact_text(f"{said}; password Redir9pw", [url])):
        assert not leaks(text) and "***%40host%2Fcam" in text and "***@host/cam" in text, text


def test_normal_path_guard_a_nested_url_is_decoded_once_only() -> None:
    """Decoded once: what a second decoding would make of it is text (an encoded %40 is no "@")."""
    url = "http://h/r?to=http%253A%252F%252Fadmin%253Apw%2540host&fps=3"
    assert redact_url(url) == url


# -- 3. the separator after a masked value ------------------------------------------------------------------------

def test_a_second_redaction_keeps_the_colon_after_a_masked_value() -> None:
    """An error names the URL redacted, then ": " and the cause (SourceError.for_url); the capture redacts that
    text again, and so does a text log: the mask and the ":" after it were read as the parameter's value."""
    url = f"http://127.0.0.1:18741{AUTH}"
    error = f"{redact_url(url)}: not authorized (401)"
    expected = "http://127.0.0.1:18741/mjpeg?fps=10&auth=***: not authorized (401)"
    assert error == expected
    assert redact_text(error, [url]) == expected
    assert redact_text(redact_text(error, [url]), []) == expected
    record = logging.LogRecord("cam", logging.WARNING, __file__, 1, "camera %s failed: %s", ("lobby", error), None)
    assert RedactingFormatter("%(message)s").format(record) == f"camera lobby failed: {expected}"
    for tail in (")", "',", ".", "\":"):  # the URL quoted or in brackets
        assert redact_text(f"({redact_url(url)}{tail} x", []) == f"({redact_url(url)}{tail} x"


# -- all three, from the camera that refuses the login to the log, the events and the API --------------------------

@pytest.fixture
def refusing_camera() -> Iterator[str]:
    """The base URL of an http camera that answers every request 401, as one refusing its login does."""

    class Camera(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="camera"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serving(Camera) as url:
        yield url


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [FOSCAM, NESTED, AUTH], ids=["foscam", "nested", "auth"])
def test_a_camera_refusing_the_login_is_reported_without_its_password(refusing_camera: str, path: str) -> None:
    """The error the capture keeps as the camera's last_error (workers/capture.py redacts it with the camera's URL)
    and the log line that says it: no password, and the cause after ": "."""
    url = refusing_camera + path
    source = open_source(url, open_timeout_s=20, read_timeout_s=20)
    with pytest.raises(SourceError) as err:
        source.open()
    source.close()
    assert err.value.kind == "auth", err.value
    last_error = redact_text(str(err.value), [url])  # as workers/capture.py does
    record = logging.LogRecord("cam", logging.WARNING, __file__, 1, "camera failed: %s", (str(err.value),), None)
    logged = RedactingFormatter("%(message)s").format(record)
    for text in (str(err.value), last_error, logged):
        assert not leaks(text), text
        assert f"{redact_url(url)}: not authorized (401)" in text, text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", [FOSCAM, NESTED], ids=["foscam", "nested"])
def test_an_added_camera_shows_no_password_in_the_log_the_event_or_the_api(redis_server, monkeypatch,
                                                                            path: str) -> None:
    """POST /cameras as the operator did: the "Camera ... added by" line, the camera_added event in Redis and the
    camera list (GET /cameras, the dashboard's /api/state) all carried the URL as redact_url left it."""
    from pipeline.app import App, CameraHandle
    from pipeline.config import parse_config
    from workers.publish import Publisher

    said: list[str] = []
    app = App(parse_config({"api": {"max_cameras": 4}}), say=said.append)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)  # the stand-in's calls answer at once
    app.admission, app.model_heads = SimpleNamespace(check=lambda cam, url_changed=True: cam), {"people": ["person"]}
    app._spawn = lambda cams: [CameraHandle(cams[0].id, cams[0], SimpleNamespace(), f"hv-camera-{cams[0].id}")]
    url = f"http://127.0.0.1:18741{path}"
    with Publisher(redis_server.url, name="test-events") as events:
        app.events = events
        app.add_camera({"id": "foscam", "url": url}, by="api:anonymous")
        assert events.flush(10), "the event never reached Redis"
    entries = redis_server.client().xrange("hv:events")
    added = [json.loads(fields[b"data"]) for _, fields in entries]
    assert [e["type"] for e in added] == ["camera_added"] and added[0]["url"] == redact_url(url), added
    assert said == [f"Camera foscam added by api:anonymous: {redact_url(url)}"], said
    listed = json.dumps(app.list_cameras())
    assert redact_url(url) in listed
    for text in (*said, json.dumps(added), listed):
        assert not leaks(text), text
