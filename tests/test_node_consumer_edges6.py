"""examples/node-consumer against pipeline/consumer.py, point by point, where it differed: SIGINT/SIGTERM killed
it mid-batch, --count let claimed messages through, a deleted stream, a Redis loading its data, and Redis 6.2's
nil for a pending entry deleted from the stream ended the run, and a refused password was retried forever."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from running import wait_for
from test_consumer_recovery import node_example
from workers.publish import event_message, keys

STREAM = keys("hv").events


def _crossing(i: int) -> str:
    return json.dumps(event_message("line_crossed", "cam", head="vehicles", track_id=i, class_="car", line="gate",
                                    direction="in", frame=i, pts=i / 10, count=i + 1))


def _publish(client, n: int) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(STREAM, {"data": _crossing(i)})
    return [i.decode() for i in pipe.execute()]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(["node", "index.js", *args], cwd=node_example(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8")


def _finish(node: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    try:
        return node.communicate(timeout=timeout)
    finally:
        node.kill()


def _pending(client) -> dict[str, tuple[int, int]]:
    """id -> (idle ms, deliveries) of every pending entry of group g."""
    rows = client.xpending_range(STREAM, "g", min="-", max="+", count=10_000)
    return {r["message_id"].decode(): (int(r["time_since_delivered"]), int(r["times_delivered"])) for r in rows}


@pytest.mark.timeout(60)
def test_sigterm_ends_the_run_after_the_message_in_hand(redis_server):
    """SIGTERM killed the consumer where it stood (status -15, no summary; as a container's PID 1 Node ignores it
    altogether): the rest of its batch stayed pending under a name that never comes back, for --claim-idle-ms. It
    now acknowledges the message in hand, hands the rest back (claimable at once) and exits 0."""
    client = redis_server.client()
    _publish(client, 2000)
    node = _start("--redis-url", redis_server.url, "--group", "g", "--from-start", "--claim-idle-ms", "60000")
    first = node.stdout.readline()  # it is consuming the backlog
    assert first, node.stderr.read()
    node.send_signal(signal.SIGTERM)
    out, err = _finish(node)
    assert node.returncode == 0, err
    assert "SIGTERM" in err and "handled" in err, err
    printed = {json.loads(line)["id"] for line in (first + out).splitlines()}
    pending = _pending(client)
    assert not printed & set(pending)  # every message handled was acknowledged
    assert all(idle >= 60_000 for idle, _ in pending.values()), pending  # the rest: claimable at once


def test_count_stops_among_claimed_messages(redis_server):
    """--count N handled every message it claimed from a dead member (up to 100) before looking at N, and then
    one more new one: `--count 1` printed two crossings. Now the claimed ones count too, and the rest is handed
    back as for a read."""
    client = redis_server.client()
    ids = _publish(client, 3)
    client.xgroup_create(STREAM, "g", id="0")
    client.xreadgroup("g", "dead", {STREAM: ">"}, count=2)
    client.xclaim(STREAM, "g", "dead", 0, ids[:2], idle=60_000, justid=True)  # idle long enough to be claimed
    run = subprocess.run(["node", "index.js", "--redis-url", redis_server.url, "--group", "g", "--consumer", "a",
                          "--count", "1", "--claim-idle-ms", "60000"], cwd=node_example(), capture_output=True,
                         encoding="utf-8", timeout=30)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in run.stdout.splitlines()] == ids[:1]
    pending = _pending(client)
    assert list(pending) == ids[1:2] and pending[ids[1]][0] >= 60_000  # claimed, not handled, handed back
    assert ids[2] not in pending  # never taken


@pytest.mark.timeout(60)
def test_stream_deleted_under_a_blocked_read(redis_server):
    """A stream deleted while the consumer was blocked on it (DEL, FLUSHDB) woke the read with "UNBLOCKED the
    stream key no longer exists", not NOGROUP, and the run ended with status 2. As pipeline/consumer.py does, it
    now creates the group again from the start and reads what is published next."""
    client = redis_server.client()

    def blocked() -> bool:
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in client.client_list())

    node = _start("--redis-url", redis_server.url, "--group", "g", "--count", "1", "--idle-exit-ms", "20000")
    try:
        wait_for(blocked, 20, "the consumer to block in XREADGROUP", poll=0.02)
        client.delete(STREAM)
        ids = _publish(client, 1)
    finally:
        out, err = _finish(node)
    assert node.returncode == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids


@pytest.mark.timeout(60)
def test_redis_loading_its_data_is_waited_out(redis_server):
    """A Redis restarted with persistence answers "LOADING" until its data is back; the consumer took that for a
    fatal error and exited 2 (redis-py counts it as a connection error, and pipeline/consumer.py waits)."""
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(2500):
        pipe.set(f"filler:{i}", "x")
    pipe.execute()
    node = _start("--redis-url", redis_server.url, "--group", "g", "--count", "1", "--idle-exit-ms", "30000")
    try:
        wait_for(lambda: any(c.get("cmd") == "xreadgroup" for c in client.client_list()), 20, "the consumer to read",
                 poll=0.02)
        client.save()  # dump.rdb in the server's --dir, which it loads when it starts
        redis_server.stop()
        # ~3 s of loading (1.2 ms a key), answering clients meanwhile: longer than the client's longest retry delay
        redis_server.extra_args += ["--key-load-delay", "1200",
                                    "--loading-process-events-interval-bytes", "1024"]
        redis_server.start()  # returns once loaded
        ids = _publish(redis_server.client(), 1)
    finally:
        out, err = _finish(node)
    assert "LOADING" in err, err  # it did meet the loading Redis
    assert node.returncode == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids


@pytest.mark.parametrize("owner", ["a", "dead"])
def test_redis_6_2_pending_entries_deleted_from_the_stream(redis6, owner):
    """On Redis 6.2 an own pending entry deleted from the stream (MAXLEN trimmed it) comes back from XREADGROUP
    id 0 as nil, on which node-redis' xReadGroup throws a TypeError: the run ended with status 2, and every
    restart under the same --consumer (or a member that claimed the entry: XAUTOCLAIM keeps it pending there)
    ended the same way. Such entries are now acknowledged, as pipeline/consumer.py does."""
    client = redis6.client()
    ids = _publish(client, 3)
    client.xgroup_create(STREAM, "g", id="0")
    client.xreadgroup("g", owner, {STREAM: ">"}, count=3)
    client.xclaim(STREAM, "g", owner, 0, ids, idle=60_000, justid=True)
    client.xdel(STREAM, *ids[:2])
    run = subprocess.run(["node", "index.js", "--redis-url", redis6.url, "--group", "g", "--consumer", "a",
                          "--claim-idle-ms", "30000", "--idle-exit-ms", "800"], cwd=node_example(),
                         capture_output=True, encoding="utf-8", timeout=30)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in run.stdout.splitlines()] == ids[2:]
    assert _pending(client) == {}


@pytest.mark.parametrize("case", ["wrong password", "no such database"])
def test_refused_connection_ends_the_run(redis_server, case):
    """A wrong password or a database index Redis does not have was retried for ever (a WRONGPASS line every
    2 s, the process never ended) where pipeline/consumer.py fails at once. Waiting cannot fix either: the run
    now ends with status 2 and an error naming the Redis (credentials masked)."""
    redis_server.client().config_set("requirepass", "right")
    url = {"wrong password": f"redis://:sekrit@127.0.0.1:{redis_server.port}/0",
           "no such database": f"redis://:right@127.0.0.1:{redis_server.port}/99"}[case]
    try:
        run = subprocess.run(["node", "index.js", "--redis-url", url], cwd=node_example(), capture_output=True,
                             encoding="utf-8", timeout=15)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still retrying after 15 s: {e.stderr[-300:]!r}")
    assert run.returncode == 2, run.stderr
    assert f"127.0.0.1:{redis_server.port}" in run.stderr and "refused" in run.stderr, run.stderr
    assert "sekrit" not in run.stderr and "right" not in run.stderr
