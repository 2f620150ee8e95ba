"""Plain `hydravision tail` says when MAXLEN trimmed entries it had not printed yet (it went on past a gap)."""

from __future__ import annotations

import json

import pytest

import pipeline.run_commands as run_commands
from test_tail import K, frame_message, tail, xadd


def _hold_first_print(monkeypatch, client, key: str, more: int, maxlen: int | None) -> None:
    """While tail prints its first line, ``more`` entries arrive (the stream trimmed to ``maxlen``, exactly)."""
    printed, calls = run_commands._print_line, []

    def held(line, as_json):
        calls.append(line)
        if len(calls) == 1:
            for f in range(more):
                client.xadd(key, {"data": json.dumps(frame_message(100 + f))}, maxlen=maxlen, approximate=False)
        printed(line, as_json)

    monkeypatch.setattr(run_commands, "_print_line", held)


@pytest.mark.timeout(60)
def test_tail_says_entries_trimmed_while_it_printed(redis_server, capsys, monkeypatch) -> None:
    client = redis_server.client()
    key = K.detections("lobby")
    xadd(client, key, [frame_message(0)])
    _hold_first_print(monkeypatch, client, key, more=400, maxlen=150)
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "151", "--redis-url", redis_server.url)
    assert code == 0, err
    assert [int(line.split()[2]) for line in lines] == [0, *range(350, 500)]  # 100..349 trimmed unread
    assert "note: 250 entries of hv:cam:lobby:detections after " in err, err
    assert "were trimmed (MAXLEN) before tail read them" in err, err


@pytest.mark.timeout(60)
def test_tail_says_nothing_when_nothing_was_trimmed(redis_server, capsys, monkeypatch) -> None:
    client = redis_server.client()
    key = K.detections("lobby")
    xadd(client, key, [frame_message(0)])
    _hold_first_print(monkeypatch, client, key, more=400, maxlen=None)
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "401", "--redis-url", redis_server.url)
    assert code == 0, err
    assert [int(line.split()[2]) for line in lines] == [0, *range(100, 500)]
    assert "trimmed" not in err, err


@pytest.mark.timeout(60)
def test_tail_counts_a_gap_in_a_stream_with_a_long_history(redis_server, capsys, monkeypatch) -> None:
    """Entries older than the one tail read last stay there (nothing unread trimmed): no note; then the gap
    counted exactly, also the part that was history when tail started."""
    client = redis_server.client()
    key = K.detections("lobby")
    history = [frame_message(f) for f in range(1000, 1300)]
    xadd(client, key, history)
    _hold_first_print(monkeypatch, client, key, more=400, maxlen=None)
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "700", "--redis-url", redis_server.url)
    assert code == 0 and "trimmed" not in err, err
    assert [int(line.split()[2]) for line in lines] == [*range(1000, 1300), *range(100, 500)]
    monkeypatch.undo()
    client.delete(key)
    xadd(client, key, history)
    _hold_first_print(monkeypatch, client, key, more=400, maxlen=200)  # 1100..1299 and 100..299 go unread
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "201", "--redis-url", redis_server.url)
    assert code == 0, err
    assert [int(line.split()[2]) for line in lines] == [*range(1000, 1100), *range(300, 401)]
    assert "note: 400 entries of hv:cam:lobby:detections after " in err, err


@pytest.mark.timeout(60)
def test_tail_says_a_gap_that_fewer_entries_than_a_read_survived(redis_server, capsys, monkeypatch) -> None:
    """Fewer entries than one read's worth survive the trim, and printing took no time: no read came back full
    nor late, and a check made only then missed the gap (and counted it into the next one it saw)."""
    client = redis_server.client()
    key = K.detections("lobby")
    xadd(client, key, [frame_message(0)])
    _hold_first_print(monkeypatch, client, key, more=300, maxlen=50)
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "51", "--redis-url", redis_server.url)
    assert code == 0, err
    assert [int(line.split()[2]) for line in lines] == [0, *range(350, 400)]
    assert "note: 250 entries of hv:cam:lobby:detections after " in err, err
