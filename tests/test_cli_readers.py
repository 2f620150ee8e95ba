"""`hydravision status` beside a service: what it shows for entries it did not expect, other clocks, narrow terminals."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.cli import main


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_status_shows_every_camera_when_some_entries_hold_what_no_current_version_writes(
        redis_server, capsys: pytest.CaptureFixture) -> None:
    """One odd entry (another program's, a hand edit, an older version's nulls) used to end the whole command
    with a traceback ("This is a bug"), hiding the cameras that were fine."""
    now = time.time()
    good = {"state": "running", "heartbeat_ts": now, "fps": 9.5, "published": 7, "dropped": {"rate": 1},
            "heads": ["people"]}
    redis_server.client().hset("hv:cameras", mapping={
        "good": json.dumps(good),
        "nulls": json.dumps({**good, "fps": None, "decode_fps": None, "dropped": None, "heads": None}),
        "wrong-types": json.dumps({**good, "fps": "9", "dropped": {"rate": "x"}, "last_error": 42, "heads": "people"}),
        "bad-heartbeat": json.dumps({**good, "heartbeat_ts": "soon"}),
        "nan": '{"state": "running", "heartbeat_ts": NaN, "fps": NaN}',
        b"\xff\xfe": json.dumps(good),
    })
    assert main(["status", "--redis-url", redis_server.url, "--json"]) == 0
    statuses = {s["camera"]: s for s in _strict_json(capsys.readouterr().out)}  # no NaN in what it prints
    assert set(statuses) == {"good", "nulls", "wrong-types", "bad-heartbeat", "nan", "\ufffd\ufffd"}
    assert statuses["bad-heartbeat"]["stale"] and statuses["good"]["state"] == "running"
    assert statuses["nan"]["state"] == "stale" and "NaN is not JSON" in statuses["nan"]["last_error"]
    assert main(["status", "--redis-url", redis_server.url]) == 0
    table = capsys.readouterr().out
    assert all(cam in table for cam in ("good", "nulls", "wrong-types", "bad-heartbeat")), table


def test_status_compares_heartbeats_with_the_clock_of_redis_not_of_the_machine_it_runs_on(
        redis_server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A reader whose clock is a minute ahead of the service's (and Redis's) saw every live camera stale."""
    redis_server.client().hset("hv:cameras", "live", json.dumps({"state": "running", "heartbeat_ts": time.time()}))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 60)
    assert main(["status", "--redis-url", redis_server.url, "--json"]) == 0
    [live] = json.loads(capsys.readouterr().out)
    assert (live["state"], live["stale"]) == ("running", False), live


@pytest.mark.parametrize("width", [80, 100])
def test_status_table_in_a_narrow_terminal_folds_values_instead_of_cutting_them(width: int) -> None:
    """At 80 columns the table cut `published 123456789` to "12345", `reconnecting` to "reco", and dropped
    fps and the last error altogether: numbers shown that were not the camera's."""
    from rich.console import Console

    from pipeline.status import status_table

    row = {"camera": "street-camera-1", "state": "reconnecting", "fps": 12.5, "decode_fps": 25.0,
           "latency_ms_p50": 31, "latency_ms_p95": 87, "published": 123456789, "dropped": {"rate": 3},
           "reconnects": 2, "heads": ["people", "vehicles"], "last_error": "timeout"}
    console = Console(record=True, width=width)
    console.print(status_table([row]))
    lines = console.export_text().splitlines()
    body = lines[lines.index(next(line for line in lines if line.startswith("┡"))) + 1:-1]
    columns = ["".join(cells) for cells in zip(*([c.strip() for c in line.split("│")[1:-1]] for line in body))]
    assert columns[:6] == ["street-camera-1", "reconnecting", "12.5", "25.0", "31/87", "123456789"], columns
    assert columns[-1] == "timeout", columns


def test_tail_prints_every_entry_and_says_which_it_cannot_read(redis_server, capsys: pytest.CaptureFixture) -> None:
    """An entry that is not one of ours (no data field, not JSON, an event without ts) ended the tail with a
    traceback and "This is a bug"; the entries after it were never printed."""
    client = redis_server.client()
    event = {"v": 1, "type": "stream_up", "camera": "c1", "ts": 1.5}
    for fields in ({"other": "x"}, {"data": "not json"}, {"data": json.dumps({"type": "stream_up", "camera": "c1"})},
                   {"data": json.dumps(event)}):
        client.xadd("hv:events", fields)
    assert main(["tail", "--events", "--from-start", "--count", "4", "--redis-url", redis_server.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("unreadable" in line for line in lines[:3]), lines
    assert lines[3].startswith("1.500 c1 stream_up")


def test_status_and_tail_say_what_redis_refused_in_one_line(redis_server, capsys: pytest.CaptureFixture) -> None:
    """A key of another type, or a URL that is no Redis URL: a traceback and "This is a bug" before."""
    redis_server.client().set("hv:cameras", "not a hash")
    assert main(["status", "--redis-url", redis_server.url]) == 2
    assert capsys.readouterr().err.startswith("error: Redis: ResponseError: WRONGTYPE")
    assert main(["status", "--redis-url", "http://127.0.0.1:1/"]) == 2
    assert "error: --redis-url http://127.0.0.1:1/: must start with redis://, rediss:// or unix://\n" == \
        capsys.readouterr().err


def test_tail_into_a_pipe_that_closes_ends_quietly(redis_server) -> None:
    """`hydravision tail CAM | head -1`: a BrokenPipeError traceback and exit 1 once head had its line."""
    import subprocess
    import sys

    client = redis_server.client()
    for i in range(300):
        client.xadd("hv:events", {"data": json.dumps({"v": 1, "type": "stream_up", "camera": "c1", "ts": i})})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "--events", "--from-start", "--count",
                             "300", "--redis-url", redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


def test_tail_of_a_group_into_a_pipe_that_closes_ends_and_leaves_the_rest_unacknowledged(redis_server) -> None:
    """`hydravision tail --group g | head -1`: the consumer's run() took the BrokenPipeError of each print for a
    failed handler, logged a traceback and read on, taking every message it could no longer print, and then
    waited for more. Now it ends like the plain tail, and what it did not print is not acknowledged."""
    import subprocess
    import sys

    client = redis_server.client()
    for i in range(300):
        client.xadd("hv:events", {"data": json.dumps({"v": 1, "type": "stream_up", "camera": "c1", "ts": i})})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "--events", "--group", "g", "--from-start",
                             "--count", "300", "--redis-url", redis_server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.readline()
        proc.stdout.close()  # what head does after its line
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
    acked = 300 - client.xpending("hv:events", "g")["pending"] - client.xlen("hv:events:dead")
    assert client.xlen("hv:events:dead") == 0
    assert 1 <= acked < 300, acked  # the printed ones (a pipe's buffer holds several lines), not the rest


SLASHED = "redis://:s3cr/et@127.0.0.1:1/0"  # a password with a '/' not percent-encoded


@pytest.mark.parametrize("command", [["status"], ["tail", "lobby"], ["cameras", "list"], ["dashboard"]])
def test_a_redis_url_whose_password_holds_a_slash_is_refused_without_a_piece_of_it(
        command: list[str], capsys: pytest.CaptureFixture) -> None:
    """redis-py reads what follows the ':' up to the '/' as a port: its error quoted "s3cr" and the command
    called it a bug in hydravision."""
    assert main([*command, "--redis-url", SLASHED]) == 2
    err = capsys.readouterr().err
    assert "no readable host:port; a password holding '/'" in err and "redis://***@127.0.0.1:1/0" in err
    assert "s3cr" not in err and "bug" not in err


def test_the_service_refuses_such_a_url_from_its_variable(monkeypatch) -> None:
    from pipeline.app import REDIS_URL_ENV, App
    from pipeline.config import parse_config
    from pipeline.errors import UserError

    monkeypatch.setenv(REDIS_URL_ENV, SLASHED)  # not read through the config's check
    with pytest.raises(UserError, match=r"no readable host:port") as refused:
        App(parse_config({}), say=lambda text: None).resolve_redis()
    assert "s3cr" not in str(refused.value)


def test_status_of_an_empty_prefix_says_why_the_table_is_empty(redis_server, capsys: pytest.CaptureFixture) -> None:
    """An empty table with exit 0 and nothing else: no service yet, or a wrong --prefix / database, looked alike."""
    assert main(["status", "--redis-url", redis_server.url, "--prefix", "nobody"]) == 0
    err = capsys.readouterr().err
    assert "no camera in nobody:cameras" in err and "--prefix" in err, err
