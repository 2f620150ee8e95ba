"""`hydravision tail`: reads what the pipeline wrote to a real redis-server, as a person at a terminal would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from pipeline.cli import main
from servers import free_port
from workers.publish import detection_message, event_message, keys, validate

REPO = Path(__file__).resolve().parent.parent
K = keys("hv")


def frame_message(frame: int, track_id: int | None = 7) -> dict:
    det = {"head": "people", "track_id": track_id, "class": "person", "class_id": 0, "conf": 0.91,
           "box": [412.0, 120.5, 440.2, 201.0]}
    msg = detection_message("lobby", frame, frame / 25, 1_764_000_000.0 + frame / 25, 41.7, (640, 360),
                            [det] if frame % 2 == 0 else [], ["people"])
    validate(msg, "detection")
    return msg


def xadd(client, key: str, messages: list[dict]) -> None:
    for m in messages:
        client.xadd(key, {"data": json.dumps(m)})


def tail(capsys, *argv: str) -> tuple[int, list[str], str]:
    """Runs `hydravision tail ARGV` in this process: exit code, stdout lines, stderr."""
    code = main(["tail", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


@pytest.mark.timeout(60)
def test_prints_a_cameras_messages_and_count_stops_it(redis_server, capsys) -> None:
    client = redis_server.client()
    xadd(client, K.detections("lobby"), [frame_message(f) for f in range(5)])
    xadd(client, K.detections("other"), [frame_message(99)])
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "3", "--redis-url", redis_server.url)
    assert code == 0, err
    assert lines == ["lobby frame 0 pts 0.00 latency 42 ms: people/person#7 0.91",
                     "lobby frame 1 pts 0.04 latency 42 ms: nothing",
                     "lobby frame 2 pts 0.08 latency 42 ms: people/person#7 0.91"]
    assert f"tailing {K.detections('lobby')}" in err


@pytest.mark.timeout(60)
def test_json_prints_the_messages_as_stored(redis_server, capsys) -> None:
    sent = [frame_message(0, track_id=None), frame_message(1)]
    xadd(redis_server.client(), K.detections("lobby"), sent)
    code, lines, _ = tail(capsys, "lobby", "--from-start", "--count", "2", "--json", "--redis-url", redis_server.url)
    assert code == 0
    assert [json.loads(line) for line in lines] == sent


@pytest.mark.timeout(60)
def test_events_prints_the_event_stream(redis_server, capsys) -> None:
    sent = [event_message("stream_up", "lobby", ts=1_764_000_000.5),
            event_message("track_started", "lobby", ts=1_764_000_001.0, head="people", track_id=3,
                          class_="person", frame=25, pts=1.0)]
    for e in sent:
        validate(e, "event")
    xadd(redis_server.client(), K.events, sent)
    code, lines, _ = tail(capsys, "--events", "--from-start", "--count", "2", "--redis-url", redis_server.url)
    assert code == 0
    assert lines[0] == "1764000000.500 lobby stream_up {}"
    assert lines[1].startswith("1764000001.000 lobby track_started ")
    assert json.loads(lines[1].split(" track_started ", 1)[1]) == {"head": "people", "track_id": 3,
                                                                   "class": "person", "frame": 25, "pts": 1.0}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["--redis-url", "env"])
def test_unreachable_redis_exits_2_without_the_password(capsys, monkeypatch, how: str) -> None:
    url = f"redis://admin:s3cr3tpw@127.0.0.1:{free_port()}/0"  # nobody listens there
    argv = ["lobby", "--count", "1"]
    if how == "env":
        monkeypatch.setenv("HYDRAVISION_REDIS_URL", url)
    else:
        argv += ["--redis-url", url]
    started = time.monotonic()
    code, lines, err = tail(capsys, *argv)
    assert code == 2 and not lines
    assert err.strip().splitlines()[-1].startswith("error: cannot reach Redis at redis://***@127.0.0.1:")
    assert "s3cr3tpw" not in err and "admin" not in err
    assert time.monotonic() - started < 10


@pytest.mark.timeout(120)
def test_follows_new_messages_only(redis_server) -> None:
    """Without --from-start it prints what arrives after it started, as the real command line."""
    client = redis_server.client()
    xadd(client, K.detections("lobby"), [frame_message(0)])  # history: not printed
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "lobby", "--count", "2",
                             "--redis-url", redis_server.url], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("tailing "), line + proc.stderr.read()
        # It reads on from the stream's end as it was before it said so: keep adding messages until it has
        # printed two and exited.
        frame = 1
        while proc.poll() is None and frame < 100:
            xadd(client, K.detections("lobby"), [frame_message(frame)])
            frame += 1
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    printed = [int(line.split(" frame ")[1].split()[0]) for line in out.splitlines()]
    assert printed == [1, 2], out


@pytest.mark.timeout(60)
def test_follows_a_message_that_arrives_between_two_reads(redis_server, capsys, monkeypatch) -> None:
    """Without --from-start it reads on from the stream's end as it was at the start, not from "$" at each
    read: a message added after one read came back empty and before the next was sent is printed."""
    client = redis_server.client()
    xadd(client, K.events, [event_message("stream_up", "lobby", ts=1.0)])  # history: not printed
    real_xread, reads = redis.Redis.xread, []

    def xread(self, streams, count=None, block=None, **kwargs):
        reads.append(dict(streams))
        if len(reads) > 2:
            raise KeyboardInterrupt  # tail's own way out: it returns what it printed
        reply = real_xread(self, streams, count=count, block=100, **kwargs)
        if len(reads) == 1:  # the first read timed out empty; a message lands before the second
            assert not reply
            xadd(client, K.events, [event_message("stream_down", "lobby", ts=2.0)])
        return reply

    monkeypatch.setattr(redis.Redis, "xread", xread)
    code, lines, err = tail(capsys, "--events", "--count", "1", "--redis-url", redis_server.url)
    assert code == 0, err
    assert lines == ["2.000 lobby stream_down {}"]
