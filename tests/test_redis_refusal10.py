"""A Redis URL that can never work (credentials refused, no such database, not a Redis) refuses the start with
a clear error, instead of a service that published nothing, ever, while saying "not reachable yet"."""
from __future__ import annotations

import socket
import threading

import pytest

from pipeline.app import App
from pipeline.config import parse_config
from pipeline.embedded_redis import probe
from pipeline.errors import UserError
from pipeline.testbed import RedisServer
from servers import require_binary


def _app(url: str) -> App:
    return App(parse_config({"redis": {"url": url}, "cameras": [{"id": "a", "url": "synthetic://street"}]}))


@pytest.fixture
def guarded_redis():
    require_binary("redis-server")
    with RedisServer(password="s3cret-pass") as server:
        yield server


def test_a_wrong_password_refuses_the_start_naming_the_url_without_it(guarded_redis):
    wrong = guarded_redis.url.replace("s3cret-pass", "not-it")
    for url in (wrong, guarded_redis.url.replace(":s3cret-pass@", "")):
        with pytest.raises(UserError, match="refused the credentials") as e:
            _app(url).resolve_redis()
        assert "not-it" not in str(e.value)  # the URL said without its password
    assert probe(guarded_redis.url) == (True, None)  # the right one answers


def test_a_database_the_server_does_not_have_refuses_the_start(redis_server):
    with pytest.raises(UserError, match="no such database"):
        _app(redis_server.url.rsplit("/", 1)[0] + "/99").resolve_redis()


def test_a_port_where_something_else_answers_refuses_the_start():
    """Ray's GCS answers a Redis client with HTTP/2's bytes: redis-py's protocol error."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame's start
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(UserError, match="does not speak Redis's protocol"):
            _app(f"redis://127.0.0.1:{listener.getsockname()[1]}/0").resolve_redis()
    finally:
        listener.close()


def test_nothing_listening_is_still_an_outage_waited_out(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe(f"redis://127.0.0.1:{port}/0") == (False, None)
    assert _app(f"redis://127.0.0.1:{port}/0").resolve_redis().endswith(f":{port}/0")
    assert "not reachable yet" in capsys.readouterr().out
