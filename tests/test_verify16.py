"""What a check of the day's fixes end to end found (s38, op16v): a second service on the prefix ran where Redis was
out of memory at its start (SET NX refused whether or not the lease was held, and the refusal read as "Redis not
answering"); SIGQUIT did nothing where the run was started as a background job of a script (the shell starts it
with SIGQUIT ignored, and an inherited ignore was kept as nohup's SIGHUP is); with --log-format json a second
signal's exit had no exit record."""

from __future__ import annotations

import json

import pytest
import redis

from pipeline.service_lease import ServiceLease, Taken, lease_key
from test_logs16 import RUN, json_lines, python


def test_a_lease_held_while_redis_is_out_of_memory_refuses_the_start(redis_server):
    client = redis_server.client()
    holder = ServiceLease(redis_server.url, "oom", "holder000001", say=lambda text: None, renew_s=0.2)
    holder.acquire()
    holder.start()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")  # every write that may grow memory refused: SET NX is
    try:
        with pytest.raises(Taken, match="run holder000001"):
            ServiceLease(redis_server.url, "oom", "second000001", say=lambda text: None).acquire()
        client.delete(lease_key("oom"))  # nobody's now, and Redis still full: the start goes on as with Redis down
        holder.release()
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            ServiceLease(redis_server.url, "oom", "third0000001", say=lambda text: None).acquire()
    finally:
        client.config_set("maxmemory", "0")
        holder.release()


BACKGROUND = "import signal\nsignal.signal(signal.SIGQUIT, signal.SIG_IGN)  # as a shell's background job\n" + RUN


def run_with(tmp_path, code: str, signals: str, second: str = "-", *output: str):
    config = tmp_path / "c.yaml"
    config.write_text("cameras: []\ncontrol: {enabled: true}\n")
    return python(code, signals, second, "-", str(config), *(output or ("--plain",)),
                  "--summary-json", str(tmp_path / "summary.json"))


def test_sigquit_stops_a_run_that_inherited_it_ignored(tmp_path):
    done = run_with(tmp_path, BACKGROUND, "SIGQUIT")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "SIGQUIT: stopping as on SIGTERM" in out, out  # it ran on, SIGQUIT ignored
    assert json.loads((tmp_path / "summary.json").read_text())[0]["state"] == "stopped"


def test_a_second_signal_s_exit_is_an_exit_record_in_json_mode(tmp_path):
    done = run_with(tmp_path, RUN, "SIGTERM", "SIGTERM", "--log-format", "json")
    assert done.returncode == 143, done.stdout + done.stderr
    last = json_lines(done.stdout)[-1]
    assert last["msg"].startswith("A second signal: exiting at once (exit 143)"), last
    assert (last["level"], last.get("event"), last.get("exit_code")) == ("error", "exit", 143), last


def test_redis_back_but_full_after_a_lost_connection_is_a_reconnect(caplog):
    """Review: a refusal kept the publisher 'connected' (out of memory it answers PINGs), so Redis killed, then back
    full, then freed, counted no reconnect and said none, where the connection really had been lost."""
    import logging
    import time

    from pipeline.testbed import RedisServer
    from servers import require_binary
    from test_publish import FAST, det
    from workers.publish import Publisher

    require_binary("redis-server")
    server = RedisServer(extra_args=["--maxmemory", "1", "--maxmemory-policy", "noeviction"])  # full at each start
    server.start()
    try:
        server.client().config_set("maxmemory", "0")
        with caplog.at_level(logging.WARNING, logger="workers.publish"), \
                Publisher(server.url, name="cam-a", **FAST) as pub:
            pub.publish_detections(det(frame=0))
            assert pub.flush(10)
            server.kill()
            pub.publish_detections(det(frame=1))
            deadline = time.monotonic() + 30
            while pub.stats()["retries"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            server.start()  # back, and full: it answers, and refuses writes
            retries = pub.stats()["retries"]
            while pub.stats()["retries"] < retries + 2 and time.monotonic() < deadline:  # refused since
                time.sleep(0.05)
            server.client().config_set("maxmemory", "0")
            assert pub.flush(10)
            assert pub.stats()["reconnects"] == 1, pub.stats()
        assert caplog.text.count("publisher cam-a reconnected to Redis") == 1, caplog.text
    finally:
        server.kill()
