"""`hydravision tail` (without --group) on a URL asking for RESP3 (`?protocol=3`): XREAD's reply is then a dict,
which tail unpacked as (stream, entries) pairs and died on the first message with a ValueError ("a bug")."""
from __future__ import annotations

import pytest

from test_tail import K, frame_message, tail, xadd


@pytest.mark.timeout(60)
def test_tail_reads_a_resp3_clients_replies(redis_server, capsys):
    xadd(redis_server.client(), K.detections("lobby"), [frame_message(f) for f in range(3)])
    code, lines, err = tail(capsys, "lobby", "--from-start", "--count", "3", "--redis-url",
                            f"{redis_server.url}?protocol=3")
    assert code == 0, err
    assert [line.split(" latency")[0] for line in lines] == ["lobby frame 0 pts 0.00", "lobby frame 1 pts 0.04",
                                                              "lobby frame 2 pts 0.08"]
