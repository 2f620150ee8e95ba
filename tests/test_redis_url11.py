"""A Redis URL with a query option redis-py takes for no connection (`?foo=`, a TLS option on redis://) is refused
naming the option, as a bad value is: every command ended in "This is a bug in hydravision" and a traceback."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, parse_config
from workers.settings import redis_url_error


@pytest.mark.parametrize("url, said", [
    ("redis://127.0.0.1:1/0?foo=bar", "unknown option ?foo="),
    ("redis://127.0.0.1:1/0?ssl_ca_certs=/etc/ca.pem", "TLS options need rediss://"),
    ("unix:///tmp/redis.sock?foo=1", "unknown option ?foo="),
])
def test_an_option_no_connection_takes_is_refused_naming_it(url, said, capsys):
    assert said in redis_url_error(url)
    with pytest.raises(ConfigError, match="redis.url"):
        parse_config({"redis": {"url": url}})
    assert main(["status", "--redis-url", url]) == 2
    err = capsys.readouterr().err
    assert said in err and "bug" not in err, err


@pytest.mark.parametrize("url", ["rediss://127.0.0.1:1/0?ssl_ca_certs=/etc/ca.pem",
                                 "redis://127.0.0.1:1/0?socket_timeout=2", "unix:///tmp/redis.sock?db=2",
                                 "redis://:p%2Fw@127.0.0.1:1/0"])
def test_the_options_redis_py_takes_still_pass(url):
    assert redis_url_error(url) is None
