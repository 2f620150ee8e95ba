"""workers/redact.py and workers/publish.py: a network URL with a slash too many kept its password in the error
refusing it; a hash field UTF-8 cannot encode failed the process's shared Redis writer for good; close() warned
of messages not delivered that its last send delivered."""
from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from servers import RedisServer
from test_publish import FAST, det, frames_of
from workers.publish import Publisher, WriterThread
from workers.redact import redact_text, redact_url

pytestmark = pytest.mark.timeout(30)
SECRET = "s3cretPw9"


@pytest.mark.parametrize("url, shown", [
    (f"rtsp:///admin:{SECRET}@cam/x", "rtsp://***@cam/x"),
    (f"RTSP:////admin:{SECRET}@cam/x", "RTSP://***@cam/x"),
    (f"http:///u:{SECRET}@cam.local/snap.jpg", "http://***@cam.local/snap.jpg"),
])
def test_a_network_url_with_a_slash_too_many_hides_its_password(url: str, shown: str) -> None:
    """``scheme:///`` was read as "no authority" for every scheme, as file:///path@x.mp4 is: the config's "no
    host" refusal quoted rtsp:///admin:<password>@cam/x whole, and so did any error that printed it."""
    from pipeline.config import ConfigError, parse_config

    assert redact_url(url) == shown
    assert redact_text(f"cannot open {url}: no host", []) == f"cannot open {shown}: no host"
    with pytest.raises(ConfigError) as err:
        parse_config({"cameras": [{"id": "a", "url": url}]})
    assert "no host" in str(err.value) and SECRET not in str(err.value), err.value


@pytest.mark.parametrize("url", ["file:///videos/lobby@2x.mp4", "device:///dev/v4l/by-id/cam@1-video-index0",
                                 "unix:///run/redis@6379.sock?db=2"])
def test_guard_a_local_path_after_three_slashes_is_no_userinfo(url: str) -> None:
    """Guard (passes before and after the fix): file, device and unix URLs have no authority, their '@' is a path's."""
    assert redact_url(url) == url and redact_text(f"open {url}", []) == f"open {url}"


def test_a_hash_field_utf8_cannot_encode_is_refused_at_the_call(redis_server: RedisServer) -> None:
    """A lone surrogate (a class name read from a non-UTF-8 file name) passed set_hash and failed redis-py's
    packing of the whole send that the cameras of the process share: camera b lost that round, and camera a
    wrote nothing more, ever (its hash is put back for every retry, and its detections wait behind it). Now it
    is refused at the call, naming key and field, as None and bool are."""
    client = redis_server.client()
    w = WriterThread(redis_server.url, connect_timeout_s=0.5, socket_timeout_s=0.5)
    a, b = w.publisher(max_backoff_s=0.05).start(), w.publisher(max_backoff_s=0.05).start()
    try:
        with w.work:  # one send for both
            a.publish_detections(det(camera="a", frame=0))
            b.publish_detections(det(camera="b", frame=0))
            with pytest.raises(ValueError, match=r"hv:cam:a:counts: field name 'zone:door:objects:caf\\udce9' "):
                a.set_hash("hv:cam:a:counts", {"zone:door:objects:caf\udce9": 1})
            with pytest.raises(ValueError, match=r"hv:cam:a:counts: field 'zone' "):
                a.set_hash("hv:cam:a:counts", {"zone": "\ud800"})
        assert a.flush(3) and b.flush(3)
        assert frames_of(client, "a") == [0] and frames_of(client, "b") == [0]
        assert a.stats()["retries"] == b.stats()["retries"] == 0 and a.stats()["hashes_pending"] == 0
    finally:
        a.close(1.0)
        b.close(1.0)
        w.close(1.0)


def test_close_says_no_message_undelivered_that_its_last_send_delivered(redis_server: RedisServer, monkeypatch,
                                                                        caplog) -> None:
    """close() counted the queue before waiting for the send in flight: a send that outlasted the flush and then
    delivered everything still logged "closed with 1 messages not delivered" (the stats said 0 queued)."""
    plain = WriterThread._execute
    pub: Publisher

    def execute(writer: WriterThread, commands: list[tuple]) -> list[Any]:
        if commands:  # the frame's send outlasts close's flush, then completes within its timeout
            deadline = time.monotonic() + 10
            while not pub._closed and time.monotonic() < deadline:
                time.sleep(0.005)
        return plain(writer, commands)

    pub = Publisher(redis_server.url, **FAST)
    monkeypatch.setattr(WriterThread, "_execute", execute)
    pub.start()
    pub.publish_detections(det(frame=0))
    with caplog.at_level(logging.WARNING, logger="workers.publish"):
        pub.close(timeout=2.5)  # flush gives up after 2 s; the send then completes in the 0.5 s left
    assert frames_of(redis_server.client()) == [0]
    assert pub.stats()["sent"] == 1 and pub.stats()["queued"] == 0
    assert "not delivered" not in caplog.text, caplog.text
