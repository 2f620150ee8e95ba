"""Two services on one Redis prefix: the second was refused only where it found the first's camera statuses beating,
which a twin still starting (Ray and the model: 20-40 s) or one with no cameras has not, so two started a few seconds
apart both ran (frames published twice, track ids duplicated, the control stream shared). Now the prefix has a lease
(pipeline/service_lease.py) that the start takes atomically before anything else starts. Against real
redis-servers; no Ray."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import pytest
import redis

from pipeline.app import App
from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.service_lease import LEASE_TTL_S, ServiceLease, lease_key
from pipeline.testbed import RedisServer
from servers import require_binary

CAMERAS = [{"id": "cam-t", "url": "synthetic://street"}]
API = {"port": 0}  # a service with no camera needs a control channel


def app(url: str, cameras: list | None = None, prefix: str = "tw", said: list | None = None) -> App:
    config = {"redis": {"url": url, "prefix": prefix}, "cameras": CAMERAS if cameras is None else cameras}
    if not config["cameras"]:
        config["api"] = API
    return App(parse_config(config), say=(said.append if said is not None else lambda text: None))


def holder_of(client: redis.Redis, prefix: str = "tw") -> str | None:
    value = client.get(lease_key(prefix))
    return json.loads(value)["run"] if value else None


def resolve_together(apps: list[App]) -> list[str | Exception]:
    """Each app's start (resolve_redis: Redis, the lease, the twin check) in a thread of its own, all at once."""
    results: list[str | Exception] = [RuntimeError("did not return")] * len(apps)
    barrier = threading.Barrier(len(apps))

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = apps[i].resolve_redis()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(len(apps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@contextlib.contextmanager
def beating_older_run(client: redis.Redis, until: threading.Event):
    """A service of a version that takes no lease: camera cam-t's status beats every 0.2 s until ``until`` is set
    (or the block ends); entered once its first beat is in Redis."""
    def beat() -> None:
        while not until.is_set():
            with contextlib.suppress(redis.RedisError):
                client.hset("tw:cameras", "cam-t", json.dumps({"state": "running", "heartbeat_ts": time.time(),
                                                               "instance": "older0000001"}))
            until.wait(0.2)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    deadline = time.monotonic() + 30
    while client.hget("tw:cameras", "cam-t") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield
    finally:
        until.set()
        beating.join(5)


@contextlib.contextmanager
def released(*apps: App):
    try:
        yield
    finally:
        for a in apps:
            if a.lease is not None:
                a.lease.release()


@pytest.fixture
def guarded_redis():
    require_binary("redis-server")
    with RedisServer(password="s3cret-pass") as server:
        yield server


def test_two_services_started_at_once_on_one_prefix_exactly_one_runs(guarded_redis):
    """The operator's two `hydravision run twin.yaml`: neither had a camera status yet, so both passed."""
    first, second = app(guarded_redis.url), app(guarded_redis.url)
    with released(first, second):
        results = resolve_together([first, second])
        refused = [r for r in results if isinstance(r, UserError)]
        assert len(refused) == 1 and results.count(guarded_redis.url) == 1, results
        text = str(refused[0])
        assert text.startswith("redis.prefix 'tw': another hydravision service runs with this prefix on "
                               "redis://***@127.0.0.1:"), text  # the URL without its password
        assert "s3cret" not in text
        winner = first if results[0] == guarded_redis.url else second
        assert f"run {winner.instance}, pid " in text  # which one holds it
        loser = second if winner is first else first
        loser.shutdown(drain=False)  # as `run` does after a failed start: the winner's lease stays
        assert holder_of(guarded_redis.client()) == winner.instance


def test_a_service_with_no_cameras_is_refused_beside_one_that_runs(redis_server):
    """cfg.twin0.yaml: `cameras: []` and an API started without a word beside a running service, took cameras added
    under ids the first ran, and answered half the commands of the shared control stream."""
    running = app(redis_server.url)
    empty = app(redis_server.url, cameras=[])
    with released(running, empty):
        running.resolve_redis()
        with pytest.raises(UserError, match=r"redis.prefix 'tw': another hydravision service runs with this prefix"):
            empty.resolve_redis()
        other_prefix = app(redis_server.url, cameras=[], prefix="tw2")
        with released(other_prefix):
            assert other_prefix.resolve_redis() == redis_server.url  # another prefix: other keys, no twin


def test_a_restart_right_after_a_kill_9_waits_out_the_dead_runs_lease_and_takes_it(redis_server):
    """A killed run renews its lease no more: the restart waits for it to expire (saying so), not refused."""
    client = redis_server.client()
    dead = json.dumps({"run": "deadbeef0001", "pid": 4242, "host": "box", "since": time.time()})
    client.set(lease_key("tw"), dead, px=1500)
    said: list[str] = []
    restart = app(redis_server.url, said=said)
    with released(restart):
        assert restart.resolve_redis() == redis_server.url
        assert holder_of(client) == restart.instance
    waiting = [line for line in said if "is held by another hydravision service" in line]
    assert len(waiting) == 1 and "run deadbeef0001, pid 4242 on host box" in waiting[0], said
    assert "to tell one that runs (this start is then refused) from one killed a moment ago" in waiting[0]


def test_a_clean_stop_releases_the_lease_and_the_next_start_does_not_wait(redis_server):
    client = redis_server.client()
    first = app(redis_server.url)
    with released(first):
        first.resolve_redis()
        assert holder_of(client) == first.instance
        first.shutdown(drain=False)
        assert client.get(lease_key("tw")) is None
    said: list[str] = []
    second = app(redis_server.url, said=said)
    with released(second):
        second.resolve_redis()
        assert holder_of(client) == second.instance
    assert not [line for line in said if "held by" in line], said


def test_a_run_never_renews_nor_deletes_another_runs_lease_and_says_so_once(redis_server, caplog):
    """Redis restarted without its data, and another service took the prefix meanwhile: an ERROR naming it, once;
    not a crash. Once it is gone, this one holds the prefix again."""
    client = redis_server.client()
    lease = ServiceLease(redis_server.url, "tw", "mine00000001", say=lambda text: None)
    lease.acquire()
    other = json.dumps({"run": "other0000001", "pid": 77, "host": "elsewhere", "since": time.time()})
    client.set(lease_key("tw"), other, px=60_000)
    with caplog.at_level(logging.INFO, logger="pipeline.service_lease"):
        for _ in range(3):
            lease.renew()
        assert client.get(lease_key("tw")).decode() == other and client.pttl(lease_key("tw")) <= 60_000
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, caplog.text
        assert "held by another hydravision service (run other0000001, pid 77 on host elsewhere" in errors[0].message
        client.delete(lease_key("tw"))  # that one stopped
        lease.renew()
        assert holder_of(client) == "mine00000001"
        assert "this service holds the prefix again" in caplog.text
    client.set(lease_key("tw"), other, px=60_000)
    lease.release()
    assert client.get(lease_key("tw")).decode() == other  # not this run's: left alone


def test_redis_not_reachable_at_the_start_the_lease_is_taken_once_it_answers():
    require_binary("redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    said: list[str] = []
    late = app(url, said=said)
    with released(late):
        assert late.resolve_redis() == url  # started as before: the publishers retry
        assert any("not reachable yet" in line for line in said), said
        with RedisServer(port=port) as server:
            client = server.client()
            deadline = time.monotonic() + 30
            while holder_of(client) != late.instance and time.monotonic() < deadline:
                time.sleep(0.1)
            assert holder_of(client) == late.instance


def test_a_twin_of_a_version_without_the_lease_is_not_told_it_was_killed_a_moment_ago(redis_server):
    """Heartbeats still moving after the first watch: the line said a run killed a moment ago was ending, to a
    live twin too; it cannot tell them apart yet, and says so."""
    said: list[str] = []
    twin = app(redis_server.url, said=said)
    with beating_older_run(redis_server.client(), threading.Event()):  # beats throughout, takes no lease
        with pytest.raises(UserError, match=r"camera\(s\) cam-t run in another hydravision service"):
            twin.refuse_a_twin(redis_server.url, watch_s=1.5, settle_s=0.5)
    line = next(line for line in said if "still beat in Redis" in line)
    assert "to tell another service that runs them (this start is then refused) from a run killed a moment ago" in line
    assert "for the processes of a run killed a moment ago to end" not in line


def test_a_renewal_redis_refuses_is_said_once(redis_server, caplog):
    """An ACL user without scripting: the renewals failed silently at debug level, and the lease expired under a
    running service, a second one on the prefix then not refused."""
    client = redis_server.client()
    client.execute_command("ACL", "SETUSER", "noscript", "on", ">pw", "~tw:*", "+@all", "-@scripting")
    url = redis_server.url.replace("redis://", "redis://noscript:pw@")
    lease = ServiceLease(url, "tw", "mine00000002", say=lambda text: None)
    try:
        lease.acquire()  # SET NX: allowed
        with caplog.at_level(logging.INFO, logger="pipeline.service_lease"):
            for _ in range(3):
                lease.renew()
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "cannot be renewed" in warned[0] and "would not be refused" in warned[0], warned
    finally:
        lease.release()
        client.execute_command("ACL", "DELUSER", "noscript")


def test_the_lease_is_renewed_while_the_start_watches_heartbeats_longer_than_its_ttl(redis_server):
    """The renewals began only after the heartbeat watch (up to 10 s, after a kill -9 of a version that takes no
    lease), past the 6 s TTL: the lease expired under the start, and a second service took it and ran too."""
    client = redis_server.client()
    seen_moving = threading.Event()  # the start's first watch saw the heartbeat move: the older run "is killed" then

    def said(line: str) -> None:
        if "still beat in Redis" in line:
            seen_moving.set()

    starting = App(parse_config({"redis": {"url": redis_server.url, "prefix": "tw"}, "cameras": CAMERAS}), say=said)
    # its processes beat until the start has seen them beat, then end
    with beating_older_run(client, seen_moving), released(starting):
        began = time.monotonic()
        assert starting.resolve_redis() == redis_server.url  # passes: its heartbeats stopped
        assert seen_moving.is_set() and time.monotonic() - began > LEASE_TTL_S  # the watch outlasted the TTL
        assert holder_of(client) == starting.instance  # still this run's: renewed meanwhile
