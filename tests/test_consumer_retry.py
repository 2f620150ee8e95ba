"""Readers of hydravision's streams where redis-py's own retries undid their recovery, and a wait that outlived its
timeout: a read re-sent by the library after its reply was lost (a real reset, through a proxy) took only new
entries, and those of the lost reply waited, unseen, for a claim or the next controller; `hydravision cameras`
on a frozen Redis waited 10 s past its --timeout."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import redis

from pipeline.cli import main
from pipeline.consumer import GroupConsumer
from pipeline.control import ControlConsumer
import test_control_stream
from running import wait_for
from servers import HOST, hold_lease

STREAM = "retry:events"


class LosingProxy:
    """A TCP proxy in front of Redis that loses one reply after Redis ran its command: the next server-to-client
    bytes holding ``marker`` are dropped and the connection closed (a reset mid-reply). Hand-written: toxiproxy is
    not packaged here, and none of its faults drops a reply by what it holds."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.marker, self.lost = upstream_port, b"", []
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, query: str = "") -> str:
        return f"redis://{HOST}:{self.port}/0{query}"

    def _accept(self) -> None:
        while True:
            try:
                client = self._listener.accept()[0]
                server = socket.create_connection((HOST, self.upstream_port))
            except OSError:
                return
            self._sockets += [client, server]
            for src, dst, replies in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, replies, (client, server)), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool, pair: tuple) -> None:
        while True:
            try:
                data = src.recv(65536)
                if data and replies and self.marker and self.marker in data:
                    self.lost.append(data)
                    self.marker, data = b"", b""
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def proxy(redis_server):
    p = LosingProxy(redis_server.port)
    yield p
    p.close()


def _fill(client, n: int, stream: str = STREAM) -> list[str]:
    return [client.xadd(stream, {"data": json.dumps({"i": i})}).decode() for i in range(n)]


def test_a_client_that_resends_commands_itself_is_named_when_the_consumer_is_built(redis_server, caplog):
    """redis-py's Redis(host=...) re-sends a command that failed (10 times, with backoff): a read whose reply was
    lost was re-sent for new entries only, and the lost ones waited claim_idle_ms, then came late and out of
    order, without a word. The consumer cannot switch off the retries of a client it was lent: it says so."""
    caplog.set_level(logging.WARNING, logger="pipeline.consumer")
    retrying = redis.Redis(host=HOST, port=redis_server.port, socket_timeout=5)
    GroupConsumer(retrying, STREAM, "g", "w", block_ms=100)
    assert any("re-sends a failed command itself" in r.getMessage() and "retry=Retry(NoBackoff(), 0)"
               in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    GroupConsumer(redis_server.client(socket_timeout=5), STREAM, "g", "w2", block_ms=100)  # from_url: no retries
    assert not caplog.records, caplog.text


def test_tail_of_a_group_handles_a_lost_reply_at_once_when_its_url_asks_for_retries(redis_server, proxy, capsys):
    """`hydravision tail --group` on a URL with ?retry_on_timeout=true: redis-py re-sent the XREADGROUP whose reply
    was reset, for new entries only; the three entries of the lost reply stayed pending under the tail's name,
    unprinted, for --claim-idle-ms (a minute here). The tail's client does not retry: its consumer reads own
    pending entries first."""
    ids = _fill(redis_server.client(), 3, "hv:events")
    proxy.marker = ids[0].encode()  # only a reply that hands out the entries holds their ids
    done: list[int] = []
    args = ["tail", "--events", "--group", "g", "--from-start", "--count", "3", "--claim-idle-ms", "60000",
            "--json", "--redis-url", proxy.url("?retry_on_timeout=true")]
    tail = threading.Thread(target=lambda: done.append(main(args)), daemon=True)
    tail.start()
    tail.join(10)
    assert proxy.lost, "no reply was lost: the test did not test it"
    assert done == [0], "tail --group never printed the entries of the lost reply"
    assert [json.loads(line)["i"] for line in capsys.readouterr().out.splitlines()] == [0, 1, 2]
    assert redis_server.client().xpending("hv:events", "g")["pending"] == 0


class StandInApp(test_control_stream.StandInApp):
    """test_control_stream's stand-in, taking a rejection quietly."""

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        pass


def test_a_control_command_whose_read_reply_was_lost_is_applied_when_the_url_asks_for_retries(redis_server, proxy):
    """The service's Redis URL with ?retry_on_timeout=true: redis-py re-sent the control reader's XREADGROUP whose
    reply was reset, for new commands only. The command stayed pending, unapplied and unanswered, until the next
    controller's start; its sender waited out its timeout."""
    client = redis_server.client()
    app = StandInApp()
    consumer = ControlConsumer(app, proxy.url("?retry_on_timeout=true"), "hv").start()
    try:
        proxy.marker = b"lobby"  # the reply that hands the command to the reader
        command = {"op": "add", "camera": {"id": "lobby", "url": "synthetic://street"}, "request_id": "r1"}
        client.xadd("hv:control", {"data": json.dumps(command)})
        wait_for(lambda: client.xlen("hv:control:results"), 10, "the answer to the command whose reply was lost")
    finally:
        consumer.stop()
    assert proxy.lost, "no reply was lost: the test did not test it"
    [(_, fields)] = client.xrange("hv:control:results")
    assert json.loads(fields[b"data"])["status"] == "accepted"
    assert app.added == ["lobby"]


def test_cameras_waits_no_longer_than_its_timeout_on_a_frozen_redis(redis_server, capsys):
    """`hydravision cameras list --timeout 1` against a Redis that froze once the command was sent (SIGSTOP): the
    wait's read hung for the client's 10 s socket timeout, 10 s past --timeout. Now it ends one short read after."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    admin = redis_server.client()
    frozen_at: list[float] = []

    def freeze_once_sent() -> None:
        deadline = time.monotonic() + 30
        while not admin.exists("hv:control") and time.monotonic() < deadline:
            time.sleep(0.01)
        redis_server.pause()
        frozen_at.append(time.monotonic())

    freezer = threading.Thread(target=freeze_once_sent, daemon=True)
    freezer.start()
    try:
        rc = main(["cameras", "list", "--timeout", "1", "--redis-url", redis_server.url])
        ended = time.monotonic()
    finally:
        freezer.join(30)
        redis_server.resume()
    assert frozen_at, "Redis was never frozen"
    assert rc == 2
    assert "while waiting for the answer" in capsys.readouterr().err
    waited = ended - frozen_at[0]
    assert waited < 7, f"waited {waited:.1f} s after Redis froze for an answer due within 1 s"


def test_a_read_lost_right_after_the_group_was_created_again_is_read_back_first(redis_server, proxy):
    """Redis restarted empty (the group gone), and the reply of the read that followed the group's re-creation was
    lost too: that read ran inside the NOGROUP handler, outside the lost-reply handler, so the consumer read on
    from ">" and the entries of the lost reply waited claim_idle_ms (a minute here)."""
    admin = redis_server.client()
    consumer = GroupConsumer(redis.Redis.from_url(proxy.url(), socket_timeout=5), STREAM, "g", "w", block_ms=100,
                             claim_idle_ms=60_000)
    assert consumer.read() == []
    admin.flushall()  # what a restart without persistence leaves
    ids = _fill(admin, 3)
    proxy.marker = ids[0].encode()
    with pytest.raises(redis.ConnectionError):
        consumer.read()  # NOGROUP: the group is created again, and the read after it loses its reply
    assert proxy.lost, "no reply was lost: the test did not test it"
    got: list[str] = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        got += [m.id for m in consumer.read()]
    assert got == ids


def test_a_command_whose_send_lost_its_reply_is_said_to_be_maybe_applied(redis_server, monkeypatch):
    """An XADD whose reply was lost may have added the command: the CLI said only "lost Redis at ...", and a user
    sent it again (a camera added twice is refused, a removal repeated fails) without knowing why."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    import redis as redis_lib

    from pipeline.camera_commands import RedisChannel
    from pipeline.errors import UserError

    channel = RedisChannel(redis_server.url, "hv", timeout=1)
    real_xadd = channel.client.xadd

    def xadd_then_lose(*args, **kwargs):
        real_xadd(*args, **kwargs)
        raise redis_lib.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(channel.client, "xadd", xadd_then_lose)
    with pytest.raises(UserError, match="while sending the command .*it may have been applied"):
        channel.send("list")
    assert redis_server.client().xlen("hv:control") == 1  # it was added, as the message says it may have been
