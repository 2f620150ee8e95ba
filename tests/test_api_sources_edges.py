"""Edges of the HTTP API's request handling (bodies, content types, the token), the status table, file://
and synthetic:// source URLs and the cameras export, each a defect a user hit."""

from __future__ import annotations

import json
import socket
import time

import pytest
from fastapi.testclient import TestClient

import pipeline.api
from pipeline.api import ApiServer, bind, build_api

TOKEN = "t0k-" + "y" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY_BYTES = 1 << 20  # pipeline.api's; a name here, so that this file runs against the code before the fix


class Controller:
    """Records what reached it: a refused request must never get here."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def list_cameras(self) -> list[dict]:
        return []

    def add_camera(self, camera: dict, by: str) -> dict:
        self.calls.append(("add", camera))
        return {"id": camera.get("id")}

    def update_camera(self, camera_id: str, changes: dict, by: str) -> dict:
        self.calls.append(("update", camera_id, changes))
        return {"id": camera_id}


def _client(tokens: dict[str, str] | None = None) -> tuple[TestClient, Controller]:
    controller = Controller()
    return TestClient(build_api(controller, {"ops": TOKEN} if tokens is None else tokens),
                      raise_server_exceptions=False), controller


def test_a_sender_without_the_token_is_refused_before_its_body_is_parsed():
    client, controller = _client()
    reply = client.post("/cameras", content=b"[1, 2", headers={"Content-Type": "application/json"})
    assert (reply.status_code, reply.json()["reason"]) == (401, "Authorization: missing bearer token")
    reply = client.patch("/cameras/a", content=b"{", headers={"Content-Type": "application/json"})
    assert reply.status_code == 401 and controller.calls == []


def _raw_request(url: str, head: bytes, deadline_s: float = 3.0) -> bytes:
    """Sends ``head`` (request line and headers) and a few bytes of a body it never finishes; the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=deadline_s) as sock:
        sock.sendall(head + b"{" + b" " * 100)
        answer = b""
        end = time.monotonic() + deadline_s
        while b"\r\n\r\n" not in answer and time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.fixture
def api_url():
    # with a token, as the service starts it: no Host check (a rebound page has no token to send)
    server = ApiServer(build_api(Controller(), {"ops": TOKEN})).start(bind("127.0.0.1", 0), check_host=False)
    yield server.url
    server.stop()


def test_a_huge_body_is_answered_at_once_and_never_buffered(api_url):
    # Over real HTTP: the server used to wait for (and hold) all 4 GB before answering anything, even to a
    # sender without a token.
    big = b"Content-Type: application/json\r\nContent-Length: 4000000000\r\n"
    no_token = _raw_request(api_url, b"POST /cameras HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert no_token.startswith(b"HTTP/1.1 401 "), no_token[:200]
    with_token = _raw_request(api_url, b"POST /cameras HTTP/1.1\r\nHost: x\r\n" + big
                              + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert with_token.startswith(b"HTTP/1.1 413 "), with_token[:200]


def test_a_body_over_the_limit_without_a_length_is_refused_413():
    client, controller = _client()

    def chunks():  # chunked: no Content-Length to check first
        yield b'{"id": "a", "pad": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    reply = client.post("/cameras", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert reply.status_code == 413, reply.text
    assert reply.json()["reason"] == f"body: larger than {MAX_BODY_BYTES} bytes"
    assert controller.calls == [] and pipeline.api.MAX_BODY_BYTES == MAX_BODY_BYTES


@pytest.mark.parametrize("content_type, body, status, reason", [
    # curl -d sends a form; the answer said "Input should be a valid dictionary" of a body that was one
    ("application/x-www-form-urlencoded", b'{"id": "a"}', 415,
     "body: expected Content-Type: application/json, got 'application/x-www-form-urlencoded'"),
    ("text/plain", b'{"id": "a"}', 415, "body: expected Content-Type: application/json, got 'text/plain'"),
    (None, b'{"id": "a"}', 415, "body: expected Content-Type: application/json, none was sent"),
    ("application/json", b'["a"]', 422, "body: expected a JSON object, got an array"),
    ("application/json", b'null', 422, "body: expected a JSON object, got null"),
    ("application/json", b'', 422, "body: empty (expected a JSON object)"),
    # the last one silently won: a camera at 50 fps, not 5 (the config's YAML refuses a key given twice)
    ("application/json", b'{"id": "a", "fps": 5, "fps": 50}', 422, "body: key 'fps' given twice in one object"),
    ("application/json", b'{"id": "a", "zones": [{"name": "z", "name": "y"}]}', 422,
     "body: key 'name' given twice in one object"),
    # Python's json reads these; no JSON parser does, and the service's own answers cannot hold them
    ("application/json", b'{"id": "a", "stall_timeout_s": Infinity}', 422, "body: Infinity is not JSON"),
    ("application/json", b'{"id": "a", "fps": NaN}', 422, "body: NaN is not JSON"),
    # these two were a 400 "There was an error parsing the body", naming nothing
    ("application/json", b'{"id": "\xff"}', 422, "body: not valid JSON (not UTF-8)"),
    ("application/json", b"[" * 100_000 + b"]" * 100_000, 422, "body: not valid JSON (nested too deeply)"),
])
def test_a_bad_body_is_refused_with_a_reason_that_names_what_is_wrong(content_type, body, status, reason):
    client, controller = _client()
    headers = dict(AUTH, **({"Content-Type": content_type} if content_type else {}))
    for reply in (client.post("/cameras", content=body, headers=headers),
                  client.patch("/cameras/a", content=body, headers=headers)):
        assert (reply.status_code, reply.json()) == (status, {"status": "rejected", "reason": reason})
    assert controller.calls == []


def test_normal_path_guard_json_bodies_and_their_media_types_are_accepted():
    """Guard (passes before and after the fix): what the CLI and the docs send still works."""
    client, controller = _client()
    ok = client.post("/cameras", json={"id": "a", "url": "synthetic://street"}, headers=AUTH)
    assert ok.status_code == 201 and ok.json()["camera"] == "a"
    patched = client.patch("/cameras/a", content=json.dumps({"fps": 5}).encode(),
                           headers={**AUTH, "Content-Type": "application/merge-patch+json"})
    assert patched.status_code == 200
    charset = client.patch("/cameras/a", content=b'{"fps": 6}',
                           headers={**AUTH, "Content-Type": "Application/JSON; charset=utf-8"})
    assert charset.status_code == 200
    assert controller.calls == [("add", {"id": "a", "url": "synthetic://street"}), ("update", "a", {"fps": 5}),
                                ("update", "a", {"fps": 6})]
    body = client.get("/openapi.json").json()["paths"]["/cameras"]["post"]["requestBody"]
    assert '"lobby"' in json.dumps(body["content"]["application/json"])  # the docs still show a camera


def test_a_token_with_non_ascii_characters_is_accepted():
    # Starlette hands headers over decoded as latin-1; the check encoded them as UTF-8, so such a token
    # could never match and its owner got "invalid token".
    token = "pässwört-§-" + "z" * 20 + "à"  # "à" is C3 A0 in UTF-8: A0 is a latin-1 space str.strip() ate
    client, _ = _client({"ops": token})
    reply = client.get("/cameras", headers=[(b"Authorization", b"Bearer " + token.encode())])
    assert reply.status_code == 200, reply.text
    wrong = client.get("/cameras", headers=[(b"Authorization", b"Bearer " + token[:-1].encode() + b"a")])
    assert wrong.status_code == 401


# --- the status table ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, shown", [
    ("dropped", {"[/x]": 2}, "2 ([/x] 2)"),
    ("reconnects", "[/x]", "[/x]"),
    ("published", "[bold]7[/]", "[bold]7[/]"),
    ("skipped", "[/y]", "+[/y] skipped"),
])
def test_status_table_shows_markup_like_values_as_written(field, value, shown):
    # an entry written by hand or another program: rich raised MarkupError and `hydravision status` failed
    from rich.console import Console

    from pipeline.status import status_table

    console = Console(width=240, record=True)
    console.print(status_table([{"camera": "a", "state": "running", field: value}]))
    assert shown in console.export_text()


class _Redis:
    def __init__(self, entries: dict[bytes, bytes]) -> None:
        self.entries = entries

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return self.entries

    def time(self) -> tuple[int, int]:
        return 1_700_000_000, 0


def test_a_stored_status_is_named_by_its_hash_field_not_by_a_camera_it_holds():
    from pipeline.status import read_camera_statuses

    entry = {"state": "running", "heartbeat_ts": 1_700_000_000, "camera": "lobby"}  # copied from lobby's
    statuses = read_camera_statuses(_Redis({b"gate": json.dumps(entry).encode(),
                                            b"lobby": json.dumps({**entry, "camera": None}).encode()}), "hv")
    assert [s["camera"] for s in statuses] == ["gate", "lobby"]


# --- source URLs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["file:///videos/cam #2.mp4", "file:///videos/clip?1.mp4", "file:///v/a.mp4#t=3"])
def test_a_file_url_with_a_raw_hash_or_question_mark_is_refused_not_cut_short(url):
    # it opened "/videos/cam " (or "/videos/clip", another file that may well exist)
    from workers.sources import SourceError, open_source

    with pytest.raises(SourceError) as err:
        open_source(url)
    assert err.value.kind == "unsupported" and "%23" in str(err.value) and "plain path" in str(err.value)


def test_normal_path_guard_file_urls_and_paths_with_spaces_hashes_and_unicode():
    """Guard (passes before and after the fix): the forms that name such a file still open it."""
    from workers.sources import open_source

    assert open_source("file:///v/cam%20%232%3F%C3%A9.mp4")._path == "/v/cam #2?é.mp4"
    assert open_source("/v/cam #2?é.mp4")._path == "/v/cam #2?é.mp4"


@pytest.mark.parametrize("url, message", [
    ("synthetic:///park", "unknown synthetic scene '/park' (known: street)"),  # was 'street/park'
    ("synthetic://street#seed=3", "unexpected '#seed=3' (parameters follow '?')"),  # ran seed 0
    ("synthetic://street?seed=3#x", "unexpected '#x' (parameters follow '?')"),
])
def test_synthetic_urls_name_what_is_wrong_and_drop_nothing_silently(url, message):
    from workers.sources import SourceError, open_source

    with pytest.raises(SourceError) as err:
        open_source(url)
    assert str(err.value) == f"{url}: {message}"


# --- the cameras export -------------------------------------------------------------------------------------

def test_an_exported_plain_path_holding_a_dollar_brace_loads_back_as_the_same_file():
    # "%24{" in a plain path is not decoded when the export is loaded: the camera named another file
    from pipeline.camera_export import export_cameras, export_yaml
    from pipeline.config import interpolate_env, load_yaml
    from workers.settings import CameraConfig
    from workers.sources import open_source

    path = "/media/${x} #1 é.mp4"
    cameras, needed = export_cameras([CameraConfig(id="b", url=path)], {})
    url = interpolate_env(load_yaml(export_yaml(cameras, needed)))["cameras"][0]["url"]
    assert open_source(url)._path == path
