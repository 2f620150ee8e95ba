"""What an operator found in the Node.js consumer, the plain `hydravision tail` and the dashboard's texts: the Node
consumer jumped over entries MAXLEN trimmed before its group read them (after kill -STOP/-CONT) and dropped a dead
member's pending entries trimmed meanwhile, both without a word where pipeline/consumer.py warns; a plain tail ended
with exit 2 when Redis restarted; the dashboard's Remove confirm said the camera's data stays in Redis, and a tile
whose status vanished showed its last numbers under a green "up" badge, as if live."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_dashboard_browser
from running import wait_for
from test_consumer_recovery import node_example
from workers.publish import event_message, keys

K = keys("hv")
STREAM = K.events
APP_JS = Path(__file__).resolve().parent.parent / "pipeline" / "dashboard_static" / "app.js"
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)


def _crossing(i: int) -> str:
    return json.dumps(event_message("line_crossed", "cam", head="vehicles", track_id=i, class_="car", line="gate",
                                    direction="in", frame=i, pts=i / 10, count=i + 1))


def _publish(client, n: int, first: int = 0) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(first, first + n):
        pipe.xadd(STREAM, {"data": _crossing(i)})
    return [i.decode() for i in pipe.execute()]


def _node(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(["node", "index.js", *args], cwd=node_example(), stdout=stdout, stderr=subprocess.PIPE,
                            encoding="utf-8")


def _finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()


def _lost(err: str) -> int:
    """What the Node consumer's exit line counts as lost."""
    found = re.search(r"^handled \d+ events, .* (\d+) lost to MAXLEN", err, re.M)
    assert found, err
    return int(found.group(1))


# --- 1. the Node consumer's group jumped entries trimmed before it read them ----------------------------------------

@pytest.mark.timeout(60)
def test_node_consumer_says_entries_trimmed_before_its_group_read_them(redis_server):
    """A group behind the stream's MAXLEN when a member starts (none ran meanwhile): 7 of the 10 entries published
    since the group's last one trimmed before it read them. It printed the 3 left as if nothing were missing; it
    now says so as pipeline/consumer.py does (count, stream, group), once, and counts them lost at exit."""
    client = redis_server.client()
    [before] = _publish(client, 1)
    client.xgroup_create(STREAM, "g", id="0")
    client.xreadgroup("g", "earlier", {STREAM: ">"})  # a member of an earlier run, which read it (Redis counts that)
    client.xack(STREAM, "g", before)
    ids = _publish(client, 10, first=1)
    client.xtrim(STREAM, maxlen=3, approximate=False)
    node = _node("--redis-url", redis_server.url, "--group", "g", "--consumer", "a", "--count", "3")
    out, err = _finish(node)
    assert node.returncode == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids[7:]
    warnings = [line for line in err.splitlines() if "before group" in line]
    assert warnings == [f"warning: {STREAM}: 7 entries were trimmed (MAXLEN) before group 'g' read them (it had read "
                        f"up to {before}): going on from {ids[7]}; size redis.maxlen for the slowest consumer"], err
    assert _lost(err) == 7


@pytest.mark.timeout(60)
def test_node_consumer_stopped_past_maxlen_says_the_gap(redis_server, tmp_path):
    """kill -STOP past MAXLEN, then -CONT: the consumer's next read jumped what was trimmed meanwhile, its output
    jumped and its exit line counted nothing lost. Now the read after the pause checks the group against the stream:
    what it printed and what it says lost add up to what was published."""
    client = redis_server.client()
    out_file = tmp_path / "out"

    def blocked() -> bool:
        return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in client.client_list())

    with out_file.open("w") as out:
        node = _node("--redis-url", redis_server.url, "--group", "g", "--idle-exit-ms", "60000", stdout=out)
        try:
            wait_for(blocked, 20, "the consumer to block in XREADGROUP", poll=0.02)
            node.send_signal(signal.SIGSTOP)
            ids = _publish(client, 10)
            client.xtrim(STREAM, maxlen=3, approximate=False)
            # The gap is checked after a pause of a second since Redis can have answered the last read: this is one
            time.sleep(1.2)
            node.send_signal(signal.SIGCONT)
            wait_for(lambda: ids[-1] in out_file.read_text(), 20, "the consumer to print the last entry", poll=0.05)
            node.send_signal(signal.SIGTERM)
            _, err = _finish(node)
        finally:
            node.send_signal(signal.SIGCONT)
            node.kill()
    printed = [json.loads(line)["id"] for line in out_file.read_text().splitlines()]
    assert node.returncode == 0, err
    # the reply of the read blocked when it stopped (the first entry) may have waited in its socket
    assert printed in (ids[7:], ids[:1] + ids[7:]), printed
    gap = 10 - len(printed)
    assert f"warning: {STREAM}: {gap} entries were trimmed (MAXLEN) before group 'g' read them" in err, err
    assert err.count("before group 'g' read them") == 1, err
    assert _lost(err) == gap


# --- 2. a dead member's pending entries trimmed meanwhile went without a word ---------------------------------------

@pytest.mark.timeout(60)
def test_node_consumer_says_pending_entries_trimmed_under_a_dead_member(any_redis):
    """A member died holding 3 entries; MAXLEN trimmed 2 of them before another took them over. On Redis 7
    XAUTOCLAIM drops those from the pending list and lists them apart (node-redis' deletedMessages), which the
    consumer never looked at: gone without a word (Redis 6.2's nil entries, acknowledged, too). Python says "...
    were trimmed (MAXLEN) or deleted while pending: they are gone, never handled"; so does it now, counted at exit."""
    client = any_redis.client()
    ids = _publish(client, 3)
    client.xgroup_create(STREAM, "g", id="0")
    client.xreadgroup("g", "dead", {STREAM: ">"}, count=3)
    client.xclaim(STREAM, "g", "dead", 0, ids, idle=60_000, justid=True)  # idle long enough to be claimed
    client.xtrim(STREAM, maxlen=1, approximate=False)
    # Until idle, not --count 1: on Redis 6.2 the nil entries are acknowledged by the read after the claim
    run = subprocess.run(["node", "index.js", "--redis-url", any_redis.url, "--group", "g", "--consumer", "a",
                          "--idle-exit-ms", "2000", "--claim-idle-ms", "30000"], cwd=node_example(),
                         capture_output=True, encoding="utf-8", timeout=30)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in run.stdout.splitlines()] == ids[2:]
    assert (f"warning: {STREAM}: 2 entries delivered to group 'g' but never acknowledged (their consumer died or "
            "stopped before handling them) were trimmed (MAXLEN) or deleted while pending: they are gone, never "
            "handled") in run.stderr, run.stderr
    assert _lost(run.stderr) == 2
    assert client.xpending(STREAM, "g")["pending"] == 0


# --- 3. plain tail ended with exit 2 when Redis restarted ------------------------------------------------------------

def _tail(url: str, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "--events", "--from-start", "--count",
                             str(count), "--redis-url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8")


def _track_ids(lines: list[str]) -> list[int]:
    return [json.loads(line.split(" line_crossed ", 1)[1])["track_id"] for line in lines]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("restart", ["empty", "restored short"])
def test_plain_tail_reads_on_across_a_redis_restart(redis_server, restart):
    """`hydravision tail --events` (no group) ended with "error: Redis: ConnectionError: Connection closed by
    server." and exit 2 when Redis restarted, where tail --group, the dashboard and the Node consumer go on. It now
    says Redis went away, waits for it and reads on: a Redis restarted empty has a new stream, whose ids here lie
    below the last one printed (empty when tail is back: read from its start, saying what may be lost); one
    restored from disk short of its last entries is read on after its top (nothing printed twice)."""
    client = redis_server.client()
    if restart == "empty":  # ids above those the new stream will get (a clock stepped back, or set ahead before)
        for i in range(3):
            client.xadd(STREAM, {"data": _crossing(i)}, id=f"{int(time.time() * 1000) + 3_600_000}-{i}")
    else:
        _publish(client, 2)
        client.save()  # dump.rdb in the server's --dir, which it loads when it starts: without the third entry
        _publish(client, 1, first=2)
    tail = _tail(redis_server.url, 5)
    try:
        assert _track_ids([tail.stdout.readline() for _ in range(3)]) == [0, 1, 2]
        redis_server.stop()
        redis_server.start()
        # published once tail is back: else a restored stream had a newer top than the entry it printed last
        said = []
        while not said or "note: Redis is back" not in said[-1]:  # (the test's timeout ends a wait for ever)
            said.append(tail.stderr.readline())
            assert said[-1], "".join(said)
        _publish(redis_server.client(), 2, first=3)
        out, err = tail.communicate(timeout=60)
        err = "".join(said) + err
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    assert _track_ids(out.splitlines()) == [3, 4]
    assert "note: lost Redis at" in err, err
    if restart == "empty":
        assert "is empty (Redis restarted without its data" in err, err
        assert "reading it from its start" in err and "if anything, is lost" in err, err
    else:
        assert "restored from disk short of its last entries" in err, err


@pytest.mark.timeout(90)
def test_plain_tail_reads_on_after_a_stream_restored_from_before_it_began(redis_server):
    """Review: tail without --from-start, begun after Redis's last save; Redis killed and restored from that save:
    the restored top was no entry tail had printed, so it took the stream for a new one and printed all of it again
    from its start. An older top is a restore: read on after it."""
    client = redis_server.client()
    _publish(client, 2)
    client.save()  # what Redis comes back with: entries 0 and 1
    _publish(client, 1, first=2)
    tail = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "--events", "--count", "3", "--redis-url",
                             redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    try:
        said = [tail.stderr.readline()]
        assert said[-1].startswith("tailing "), said
        _publish(client, 1, first=3)
        assert _track_ids([tail.stdout.readline()]) == [3]
        redis_server.stop()
        redis_server.start()
        while "note: Redis is back" not in said[-1]:
            said.append(tail.stderr.readline())
            assert said[-1], "".join(said)
        _publish(redis_server.client(), 2, first=4)
        out, err = tail.communicate(timeout=60)
        err = "".join(said) + err
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    assert _track_ids(out.splitlines()) == [4, 5], err  # not 0 and 1 again
    assert "restored from disk short of its last entries" in err, err


# --- 4. the Remove confirm said the camera's data stays in Redis -----------------------------------------------------

@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (Debian's nodejs)")
def test_the_remove_confirm_says_what_the_removal_deletes():
    """It said "Its pipeline stops; its data stays in Redis." while the removal deletes the camera's status,
    snapshot and zone/line counts (pipeline/live_control.py); only its detections stream and its events stay."""
    source = APP_JS.read_text()
    function = re.search(r"^function removeCamera\(camera, output\) \{.*?^\}", source, re.S | re.M).group(0)
    script = ("const iso = (v) => v, dotted = () => false, asked = [];\n"
              "globalThis.confirm = (text) => { asked.push(text); return false; };\n"
              f"{function}\nremoveCamera('lobby', null);\nconsole.log(JSON.stringify(asked));")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    [text] = json.loads(out)
    assert "stays in Redis" not in text, text
    assert text == ("Remove camera lobby? Its pipeline stops, and its status, latest picture and zone/line counts "
                    "are deleted from Redis; its detections stream and its events stay.")


# --- 5. a tile whose status vanished showed its last numbers as live -------------------------------------------------

def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, "decode_fps": 5.0,
                       "frame_age_ms_p50": 40.0, "frame_age_ms_p95": 90.0, **extra})


def test_a_tile_without_a_fresh_status_shows_its_numbers_held(redis_server, browser):
    """For up to 10 s after Redis came back empty, a tile showed a green "up · no status" badge over the exact
    numbers of before the outage (fps, p50/p95), which read as live. They are now greyed and marked "(held)", the
    badge says "no status · last up, held", until a fresh status comes."""
    from pipeline.dashboard import DashboardServer

    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    tile = '.tile[data-camera="cam"]'
    look = f"""() => {{
        const t = document.querySelector('{tile}');
        return {{badge: t.querySelector(".state").textContent, fps: t.querySelector("dd.fps").textContent,
                 age: t.querySelector("dd.age").textContent,
                 opacity: [t.querySelector(".state"), t.querySelector("dd.fps"), t.querySelector("dd.age")]
                   .map((n) => getComputedStyle(n).opacity)}};
    }}"""
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            page.goto(server.url)
            page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression
            page.wait_for_selector(f"{tile} dd.fps:has-text('5.0 analysed')")
            live = page.evaluate(look)
            assert live["badge"] == "up" and "held" not in live["fps"] + live["age"], live
            assert live["opacity"] == ["1", "1", "1"], live
            client.hdel(K.cameras, "cam")  # as a Redis restarted empty, until the camera writes again
            page.wait_for_selector(f"{tile} .state:has-text('no status')")
            held = page.evaluate(look)
            assert held["badge"] == "no status · last up, held", held
            assert held["fps"] == "5.0 analysed · 5.0 decoded (held)", held
            assert held["age"].endswith(" ms (held)"), held
            assert held["opacity"] == ["0.5", "0.5", "0.5"], held
            client.hset(K.cameras, "cam", _status(fps=7.0))  # a fresh status
            page.wait_for_selector(f"{tile} dd.fps:has-text('7.0 analysed')")
            fresh = page.evaluate(look)
            assert fresh["badge"] == "up" and "held" not in fresh["fps"] + fresh["age"], fresh
            assert fresh["opacity"] == ["1", "1", "1"], fresh
            assert not page.errors, page.errors
        finally:
            page.close()


def _lua(text: str) -> list[str]:
    """A Lua script's lines without comments and indentation: what runs."""
    lines = (re.sub(r"\s*--.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_the_node_consumer_runs_the_same_gap_script_as_pipeline_consumer():
    """index.js carries its own copy of pipeline/consumer.py's script (the example stands alone, no Python): the two
    must not drift apart, or the two consumers count the same gap differently."""
    from pipeline.consumer import _TRIMMED_UNREAD

    index_js = (APP_JS.parent.parent.parent / "examples" / "node-consumer" / "index.js").read_text()
    node = re.search(r"const TRIMMED_UNREAD = `(.*?)`;", index_js, re.S)
    assert node and _lua(node[1]) == _lua(_TRIMMED_UNREAD)
