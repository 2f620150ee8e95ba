"""Security (issue 5): Redis with a password, an ACL user and TLS; credentials never leak; nothing pickled in
Redis; the embedded Redis listens on loopback only.

The leak check runs one real pipeline with a secret in the Redis URL and one in a camera URL, then searches
everything a user or an attacker could read for them: the controller log, every Redis key and value, the
events, the status hash, and every file Ray wrote (worker stdout/stderr included).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import unquote
from typing import Iterator

import pytest
import redis

from pipeline.embedded_redis import EmbeddedRedis
from running import RunningApp, events, messages, wait_for
from servers import HOST, RedisServer, free_port, require_binary
from workers.publish import Publisher, detection_message, keys

REDIS_SECRET = "rpw-Zq81xK"  # distinctive, so a grep cannot confuse it with anything else
# '@', ':' and a %-encoded '@', written as users do and FFmpeg accepts (it takes the userinfo up to the last '@')
CAMERA_SECRET = "cam-Pw77vT@Kq:Zt%40Lx"
# and what would show through a redactor stopping at the first '@', or a message decoding the password
CAMERA_SECRET_FORMS = [CAMERA_SECRET, unquote(CAMERA_SECRET), "Kq:Zt%40Lx", "Kq:Zt@Lx"]
ACL_USER = "hvwriter"


def _everything_in_redis(client: redis.Redis) -> list[bytes]:
    """Every key name and every value (streams entry by entry), as raw bytes."""
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        out.append(key)
        kind = client.type(key)
        if kind == b"stream":
            for _, fields in client.xrange(key):
                out += [v for kv in fields.items() for v in kv]
        elif kind == b"hash":
            out += [v for kv in client.hgetall(key).items() for v in kv]
        elif kind == b"string":
            out.append(client.get(key))
        else:
            raise AssertionError(f"unexpected Redis key {key!r} of type {kind!r}")
    return out


class _AclRedis(RedisServer):
    """RedisServer's readiness PING goes through client(): log in as admin, the default user is off."""

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(f"redis://admin:{REDIS_SECRET}@{HOST}:{self.port}/0", **kwargs)


@pytest.fixture(scope="module")
def secured_run(ray_local, tiny_checkpoint) -> Iterator[dict]:
    require_binary("redis-server")
    acl = ["--user", "default", "off", "--user", ACL_USER, "on", f">{REDIS_SECRET}", "~hv:*", "&hv:*", "+@all",
           "--user", "admin", "on", f">{REDIS_SECRET}", "~*", "&*", "+@all"]
    with _AclRedis(extra_args=acl) as server:
        url = f"redis://{ACL_USER}:{REDIS_SECRET}@{HOST}:{server.port}/0"
        cameras = [
            {"id": "good", "url": "synthetic://street?seed=4&fps=10"},
            # a camera with a password that cannot connect: its errors go to events, status and logs
            {"id": "locked", "url": f"rtsp://admin:{CAMERA_SECRET}@{HOST}:{free_port()}/stream",
             "open_timeout_s": 2, "read_timeout_s": 2},
        ]
        client = server.client()
        with RunningApp(url, tiny_checkpoint, cameras) as run:
            wait_for(lambda: len(messages(client, "good")) >= 10 and
                     len(events(client, "locked", "stream_reconnecting")) >= 1, 60,
                     "messages from the good camera and a retry of the locked one")
            run.stop()
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())
        yield {"server": server, "client": client, "log": run.log, "finals": run.finals,
               "redis_values": _everything_in_redis(client), "ray_session": session}


def test_pipeline_publishes_through_an_acl_user(secured_run: dict) -> None:
    client = secured_run["client"]
    assert len(messages(client, "good")) >= 10
    statuses = client.hgetall(keys("hv").cameras)
    assert {b"good", b"locked"} <= set(statuses)


@pytest.mark.parametrize("secret", [REDIS_SECRET, *CAMERA_SECRET_FORMS])
def test_no_credential_in_logs_redis_or_ray_files(secured_run: dict, secret: str) -> None:
    needle = secret.encode()
    assert secret not in "\n".join(secured_run["log"])
    assert secret not in json.dumps(secured_run["finals"], default=str)
    leaks = [v[:200] for v in secured_run["redis_values"] if needle in v]
    assert not leaks, leaks
    files = [p for p in secured_run["ray_session"].rglob("*") if p.is_file() and p.stat().st_size < 50 * 2**20]
    assert files, f"no Ray files found under {secured_run['ray_session']}"
    leaked_files = [str(p) for p in files if needle in p.read_bytes()]
    assert not leaked_files, leaked_files


def test_camera_errors_name_the_camera_with_its_credentials_redacted(secured_run: dict) -> None:
    evs = events(secured_run["client"], "locked")
    reasons = [e["reason"] for e in evs if e["type"] in ("stream_down", "stream_reconnecting")]
    assert reasons and all("connection refused" in r.lower() for r in reasons), reasons
    assert all("admin:***@" in r or "***" in r for r in reasons), reasons
    status = json.loads(secured_run["client"].hget(keys("hv").cameras, "locked"))
    assert CAMERA_SECRET not in status["url"] and "***" in status["url"], status


def test_nothing_in_redis_is_pickled(secured_run: dict) -> None:
    """Every value is JSON text (or a stream field name), except the snapshots' JPEG pictures; a pickle would
    start with 0x80 and a protocol byte."""
    values = secured_run["redis_values"]
    assert values
    jpegs = [v for v in values if v.startswith(b"\xff\xd8\xff")]
    assert jpegs  # the good camera's snapshot
    for v in values:
        assert not v.startswith(b"\x80"), v[:40]
        if v not in jpegs:
            v.decode("utf-8")  # text, not binary
    client = secured_run["client"]
    for key in client.scan_iter():
        if client.type(key) == b"stream":
            for _, fields in client.xrange(key, count=50):
                assert set(fields) == {b"data"}, fields
                json.loads(fields[b"data"])
        elif client.type(key) == b"hash":
            for field, v in client.hgetall(key).items():
                if key.endswith(b":snapshot") and field == b"jpeg":
                    assert v.startswith(b"\xff\xd8\xff") and v.endswith(b"\xff\xd9")  # a JPEG file, whole
                else:
                    json.loads(v)


def test_acl_user_cannot_touch_keys_outside_its_prefix(secured_run: dict) -> None:
    server = secured_run["server"]
    limited = redis.Redis.from_url(f"redis://{ACL_USER}:{REDIS_SECRET}@{HOST}:{server.port}/0")
    with pytest.raises(redis.exceptions.NoPermissionError):
        limited.set("other:key", "x")


def test_wrong_password_is_reported_without_the_password(secured_run: dict) -> None:
    server = secured_run["server"]
    wrong = "not-the-Pw-93"
    pub = Publisher(f"redis://{ACL_USER}:{wrong}@{HOST}:{server.port}/0", buffer=10).start()
    try:
        pub.publish_detections(detection_message("c1", 0, 0.0, 1.0, 0.0, (10, 10), [], heads=["people"]))
        wait_for(lambda: pub.stats().get("last_error"), 10, "the publisher to report the failed login")
        err = pub.stats()["last_error"]
        assert wrong not in err and REDIS_SECRET not in err
        assert any(w in err.lower() for w in ("auth", "password", "wrongpass")), err
        assert pub.stats()["connected"] is False
    finally:
        pub.close(timeout=1)


# ------------------------------------------------------------------------------------------ TLS


def _make_certs(d: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl command."""
    require_binary("openssl")
    ca_key, ca, key, csr, crt = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = d / "san.ext"
    ext.write_text(f"subjectAltName=IP:{HOST}\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    # keyUsage: Python >= 3.13 verifies X.509-strictly, which refuses a CA certificate without it
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hydravision-test-ca",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(ca_key), "-out", str(ca))
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}", "-keyout", str(key), "-out", str(csr))
    ssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(crt))
    return {"ca": ca, "key": key, "crt": crt}


class _TlsRedis(RedisServer):
    """redis-server with only a TLS port (the plain port is off)."""

    def __init__(self, certs: dict[str, Path]) -> None:
        self.certs = certs
        super().__init__(extra_args=["--tls-cert-file", str(certs["crt"]), "--tls-key-file", str(certs["key"]),
                                     "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
                                     "--requirepass", REDIS_SECRET])

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--port")
        return cmd[:i] + ["--port", "0", "--tls-port", str(self.port)] + cmd[i + 2:]

    @property
    def url(self) -> str:
        return f"rediss://:{REDIS_SECRET}@{HOST}:{self.port}/0?ssl_ca_certs={self.certs['ca']}"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_TlsRedis]:
    require_binary("redis-server")
    with _TlsRedis(_make_certs(tmp_path_factory.mktemp("tls"))) as server:
        yield server


def test_publisher_over_tls_with_a_private_ca(tls_redis: _TlsRedis) -> None:
    pub = Publisher(tls_redis.url, buffer=10).start()
    try:
        pub.publish_detections(detection_message("tls-cam", 0, 0.0, 1.0, 0.0, (10, 10), [], heads=["people"]))
        assert pub.flush(timeout=10), pub.stats()
    finally:
        pub.close(timeout=2)
    with tls_redis.client() as client:
        assert len(messages(client, "tls-cam")) == 1


def test_tls_without_the_ca_is_refused_not_downgraded(tls_redis: _TlsRedis) -> None:
    url = tls_redis.url.split("?")[0]  # the system trust store does not know our private CA
    pub = Publisher(url, buffer=10).start()
    try:
        pub.publish_detections(detection_message("tls-cam2", 0, 0.0, 1.0, 0.0, (10, 10), [], heads=["people"]))
        wait_for(lambda: pub.stats().get("last_error"), 10, "the publisher to report the TLS failure")
        err = pub.stats()["last_error"]
        assert "certificate" in err.lower(), err
        assert REDIS_SECRET not in err
    finally:
        pub.close(timeout=1)
    # and plain redis:// to the TLS port gets nowhere either
    plain = redis.Redis.from_url(f"redis://:{REDIS_SECRET}@{HOST}:{tls_redis.port}/0", socket_timeout=2,
                                 socket_connect_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()


# ------------------------------------------------------------------------------------------ embedded Redis


def test_embedded_redis_listens_on_loopback_only() -> None:
    embedded = EmbeddedRedis().start()
    try:
        client = redis.Redis.from_url(embedded.url)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        assert embedded.url.startswith("redis://127.0.0.1:")
        assert embedded.version == client.info("server")["redis_version"]  # the demo prints it
    finally:
        embedded.stop()
