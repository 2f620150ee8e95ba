"""Edges of live control found in an audit (2026-12-07, round 13): the Redis control stream (pipeline/control.py)
and its senders on a Redis URL that asks for another reply shape. Stand-in controllers (no Ray), as
tests/test_api.py uses."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.control import ControlConsumer, await_answer
from servers import hold_lease


class ListingApp:
    """What ControlConsumer calls on the App for a list."""

    def list_cameras(self) -> list[dict]:
        return [{"id": "lobby", "url": "synthetic://street", "state": "running"}]

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        raise AssertionError(f"rejected {op}: {reason}")


def test_the_control_stream_reads_a_resp3_clients_replies(redis_server):
    """A service whose redis.url asks for RESP3 (`?protocol=3`, which `tail` and the consumers read since round 12):
    XREADGROUP's reply is then a dict, and ``reply[0]`` a KeyError that ended the control stream's reader at the
    first command, silently: no command was applied or answered for as long as the service ran."""
    consumer = ControlConsumer(ListingApp(), f"{redis_server.url}?protocol=3", "hv").start()
    client = redis_server.client()
    try:
        client.xadd("hv:control", {"data": json.dumps({"op": "list", "request_id": "r1"})})
        answer = await_answer(client, "hv:control:results", "r1", "0-0", 15)
        assert consumer._thread.is_alive()
    finally:
        consumer.stop()
    assert answer is not None and answer["status"] == "accepted" and answer["result"][0]["id"] == "lobby"
    assert client.xpending("hv:control", "hydravision")["pending"] == 0


@pytest.mark.parametrize("query", ["protocol=3", "decode_responses=true"])
def test_cameras_over_redis_read_the_answer_on_a_url_asking_for_another_reply_shape(redis_server, capsys, query):
    """`hydravision cameras ... --redis-url redis://...?protocol=3`: the answer's XREAD came back as a dict, which
    await_answer unpacked as pairs: "ValueError ... This is a bug in hydravision", after the service had applied the
    command. With `?decode_responses=true` the answer's field is "data", not b"data": the CLI waited out its
    timeout, said "no answer" and exited 2 for a command the service had applied and answered."""
    hold_lease(redis_server.client())  # a service holds its lease (none: the CLI refuses at once)
    consumer = ControlConsumer(ListingApp(), redis_server.url, "hv").start()
    try:
        code = main(["cameras", "list", "--json", "--timeout", "15", "--redis-url", f"{redis_server.url}?{query}"])
    finally:
        consumer.stop()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["result"][0]["id"] == "lobby"


@pytest.mark.parametrize("query", ["decode_responses=true", "protocol=3&decode_responses=true"])
def test_a_service_on_a_decoding_url_finds_its_own_answer(redis_server, query):
    """After a lost reply the service looks for its answer before answering again (`_answered`): on a URL with
    ?decode_responses=true it read only b"data", never found it, and answered the command twice."""
    consumer = ControlConsumer(ListingApp(), f"{redis_server.url}?{query}", "hv")
    redis_server.client().xadd(consumer.results, {"data": json.dumps({"command": "1-1", "status": "accepted"})})
    assert consumer._answered("1-1") and not consumer._answered("2-2")
