"""Hostile and bad input (issue 5): every case ends in a clear error or event naming the camera and the cause,
and the other cameras keep running.

1. ONE pipeline run holds a good synthetic camera and one camera per bad input (the CASES table). Bad cameras
   must end (files) or retry (live) with a plain-words reason in their events and status; odd-but-valid
   inputs must be processed with the right size on every message; the good camera keeps its rate.
2. The source layer is fuzzed (no Ray): many seeds of flipped bytes and cuts, each bounded in time and ending
   in frames then None, or a SourceError, never anything else.
3. The CLI refuses bad configs and bad model files with exit code 2 and one `error:` line, no traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import av
import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.cli import main as cli_main
from running import RunningApp, events, messages, wait_for
from servers import HOST, BlackHole, RedisServer, RtspServer, encode_mp4, free_port, require_binary
from synthetic.scene import StreetScene
from workers.publish import keys
from workers.sources import SourceError, open_source

REPO = Path(__file__).resolve().parent.parent
GOOD, GOOD_FPS = "good", 10  # the good camera's rate on a machine that runs the tiny model at >= 25 fps
FAST = {"open_timeout_s": 2, "read_timeout_s": 2}
CLIP_FPS = 10
# What a reason must never look like: a Python exception dump instead of plain words.
PYTHONISH = re.compile(r"Traceback|\b[A-Z]\w*(Error|Exception)\b:|File \"|0x[0-9a-f]{6,}")


# ------------------------------------------------------------------------------------------ clips


def street_frames(n: int, width: int, height: int, seed: int = 1) -> list[np.ndarray]:
    """n frames of a street scene at any size (StreetScene draws at >= 64 px; resized from there)."""
    scene = StreetScene(seed, width=max(64, width), height=max(64, height), fps=CLIP_FPS)
    frames = [scene.step()[0] for _ in range(n)]
    if (width, height) != frames[0].shape[1::-1]:
        frames = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames]
    return frames


def remux(src: Path, dst: Path, movflags: str) -> Path:
    """The video of ``src`` copied into an mp4 with the given movflags (no re-encoding)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": movflags}) as out:
        stream = inp.streams.video[0]
        ostream = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = ostream
            out.mux(packet)
    return dst


def cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def flip_bytes(src: Path, dst: Path, seed: int, count: int | None = None, fraction: float | None = None) -> Path:
    """Random bytes of the media payload (after 'mdat') replaced; the container header stays intact."""
    data = np.frombuffer(src.read_bytes(), np.uint8).copy()
    start = bytes(data).find(b"mdat") + 8
    rng = np.random.default_rng(seed)
    n = count if count is not None else int((len(data) - start) * (fraction or 0.01))
    where = rng.integers(start, len(data), n)
    data[where] = rng.integers(0, 256, n, dtype=np.uint8)
    dst.write_bytes(data.tobytes())
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    street = street_frames(20, 320, 192)
    out: dict[str, Path] = {"street": encode_mp4(d / "street.mp4", street, fps=CLIP_FPS)}
    out["faststart"] = remux(out["street"], d / "faststart.mp4", "faststart")
    out["fragmented"] = remux(out["street"], d / "fragmented.mp4", "frag_keyframe+empty_moov")
    # Two MPEG-TS segments of different sizes back to back: what a camera whose resolution is changed
    # mid-stream sends (new SPS/PPS in band). The extension picks the container.
    a = encode_mp4(d / "a.ts", street, fps=CLIP_FPS)
    b = encode_mp4(d / "b.ts", street_frames(20, 160, 96, seed=2), fps=CLIP_FPS)
    (d / "change.ts").write_bytes(a.read_bytes() + b.read_bytes())
    out["change"] = d / "change.ts"
    # Raw H.264 elementary stream: no container, no timestamps, no frame rate (FFmpeg guesses 25).
    out["raw"] = encode_mp4(d / "raw.h264", street, fps=CLIP_FPS)
    out["tiny"] = encode_mp4(d / "tiny.mp4", street_frames(10, 16, 16), fps=CLIP_FPS)
    out["wide"] = encode_mp4(d / "wide.mp4", street_frames(10, 2048, 32), fps=CLIP_FPS)
    out["sliver"] = encode_mp4(d / "sliver.mp4", street_frames(10, 4096, 2), fps=CLIP_FPS)
    out["text"] = d / "notes.mp4"
    out["text"].write_text("hello, not a video\n" * 100)
    with wave.open(str(d / "tone.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\0\0" * 8000)
    out["audio"] = d / "tone.wav"
    out["cut_index_last"] = cut(out["street"], d / "cut_index_last.mp4", 0.5)  # encode_mp4 puts moov last
    out["cut_faststart"] = cut(out["faststart"], d / "cut_faststart.mp4", 0.5)
    out["cut_fragmented"] = cut(out["fragmented"], d / "cut_fragmented.mp4", 0.5)
    out["glitchy"] = flip_bytes(out["faststart"], d / "glitchy.mp4", seed=1, count=40)
    # Every payload byte after the first keyframe's first bytes scrambled: a stream broken for good.
    out["garbage"] = flip_bytes(out["faststart"], d / "garbage.mp4", seed=2, fraction=3.0)
    out["dir"] = d / "a-directory"
    out["dir"].mkdir()
    return out


def frames_in(path: Path) -> list[tuple[int, int]]:
    """(width, height) of every frame PyAV decodes from ``path``: the truth for 'processed' cases."""
    with av.open(str(path)) as c:
        return [(f.width, f.height) for f in c.decode(video=0)]


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Env:
    clips: dict[str, Path]
    blackhole: int
    rtsp: RtspServer
    tmp: Path


@dataclass
class Case:
    """One camera of the hostile run.

    expect: "failed"  - a file/config problem: one final stream_down, state failed
            "retrying" - a live camera that cannot connect: stream_down, then stream_reconnecting again and again
            "processed" - odd but valid: frames published with the right size, then a normal end
            "partial"  - a recording cut mid-write: the frames before the cut, then a final stream_down saying so
    reason: fragments (lower case) that the event reason and the status' last_error must contain.
    """

    id: str
    url: Callable[[Env], str]
    expect: str
    reason: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # more camera config
    sizes: Callable[[Env], list[tuple[int, int]]] | None = None  # processed: expected (w, h) per frame


def _clip(name: str) -> Callable[[Env], str]:
    return lambda env: str(env.clips[name])


UNPACED = {"realtime": False}  # lossless: every decoded frame is published, so sizes can be checked 1:1
# Live cases get a long watchdog so that only the source's own error shows in their events; the watchdog
# during backoff has its own case (refused-short-stall) below.
LIVE = {"stall_timeout_s": 30}


def _sizes(name: str) -> Callable[[Env], list[tuple[int, int]]]:
    return lambda env: frames_in(env.clips[name])


# Decisions: tiny, huge-aspect and resolution-changing streams are processed (boxes are mapped back to each
# frame's own size); a stream without a frame rate is processed at the rate FFmpeg guesses. (Synthetic sizes
# beyond 8192 are refused at config load: CLI_CASES below.)
CASES = [
    Case("missing-file", lambda env: str(env.tmp / "no-such-clip.mp4"), "failed", ("no such file",)),
    Case("text-as-mp4", _clip("text"), "failed", ("not a video",)),
    Case("cut-index-last", _clip("cut_index_last"), "failed", ("not a video", "truncated")),
    Case("garbage-h264", _clip("garbage"), "failed", ("could be decoded",)),
    Case("refused-port", lambda env: f"rtsp://{HOST}:{free_port()}/x", "retrying", ("connection refused",), LIVE),
    Case("silent-host", lambda env: f"rtsp://{HOST}:{env.blackhole}/x", "retrying", ("no answer within 2 s",), LIVE),
    Case("wrong-rtsp-path", lambda env: env.rtsp.url + "/no-such-path", "retrying", ("404", "path"), LIVE),
    # The default watchdog (3 x read + open timeout = 8 s here) is shorter than the backoff cap (15 s).
    Case("refused-short-stall", lambda env: f"rtsp://{HOST}:{free_port()}/x", "retrying", ("connection refused",),
         {"stall_timeout_s": 3}),
    Case("tiny-16x16", _clip("tiny"), "processed", extra=UNPACED, sizes=_sizes("tiny")),
    Case("wide-2048x32", _clip("wide"), "processed", extra=UNPACED, sizes=_sizes("wide")),
    Case("sliver-4096x2", _clip("sliver"), "processed", extra=UNPACED, sizes=_sizes("sliver")),
    Case("raw-h264-no-rate", _clip("raw"), "processed", extra=UNPACED, sizes=_sizes("raw")),
    Case("size-change", _clip("change"), "processed", extra=UNPACED, sizes=_sizes("change")),
    # A recording cut mid-write: the frames before the cut are processed, then the camera fails saying why.
    Case("cut-faststart", _clip("cut_faststart"), "partial", ("truncated", "10 frames of the 20"), UNPACED),
    Case("cut-fragmented", _clip("cut_fragmented"), "partial", ("truncated", "10 frames"), UNPACED),
    Case("audio-only", _clip("audio"), "failed", ("no video stream",)),
    Case("directory", _clip("dir"), "failed", ("directory",)),
    # A few flipped payload bytes: FFmpeg conceals the damage and every frame still comes out.
    Case("glitchy-h264", _clip("glitchy"), "processed", extra=UNPACED),
]
BY_ID = {c.id: c for c in CASES}


# ------------------------------------------------------------------------------------------ the run


@dataclass
class HostileRun:
    env: Env
    events: dict[str, list[dict]]  # camera -> events, in order
    messages: dict[str, list[dict]]
    status_live: dict[str, dict]  # hv:cameras while running (live cameras are retrying then)
    status_final: dict[str, dict]  # hv:cameras after the stop
    finals: dict[str, dict]
    log: list[str]
    started: float  # wall time when every camera was running
    settled: float  # wall time when every hostile camera had shown its outcome (the live ones go on retrying)
    stopped: float
    waited_s: float
    good_fps: int


def _done(case: Case, evs: list[dict], status: dict | None) -> bool:
    types = [e["type"] for e in evs]
    if case.expect == "failed":
        return status is not None and status.get("state") == "failed" and "stream_down" in types
    if case.expect == "retrying":
        return types.count("stream_reconnecting") >= 2
    return status is not None and status.get("state") in ("ended", "failed") and "stream_down" in types


def _last_ts(client, camera: str) -> float:
    """Wall time of the newest message of a camera (0 if none)."""
    newest = client.xrevrange(keys("hv").detections(camera), count=1)
    return json.loads(newest[0][1][b"data"])["ts"] if newest else 0.0


def _statuses(client) -> dict[str, dict]:
    return {k.decode(): json.loads(v) for k, v in client.hgetall(keys("hv").cameras).items()}


@pytest.fixture(scope="module")
def hostile_run(ray_local, clips, tmp_path_factory, tiny_checkpoint, machine) -> Iterator[HostileRun]:
    require_binary("redis-server")
    require_binary("gst-rtsp-server")
    good_fps = min(GOOD_FPS, machine.live_fps(machine.tiny))
    with BlackHole() as hole, RedisServer() as redis_server, \
            RtspServer("pattern", pattern_size=(320, 192), fps=10) as rtsp:
        env = Env(clips, hole.port, rtsp, tmp_path_factory.mktemp("missing"))
        cameras = [{"id": GOOD, "url": f"synthetic://street?seed=1&fps={good_fps}"}]
        cameras += [{"id": c.id, "url": c.url(env), **FAST, **c.extra} for c in CASES]
        client = redis_server.client()
        t0 = time.monotonic()
        with RunningApp(redis_server.url, tiny_checkpoint, cameras) as run:
            started = time.time()
            print(f"hostile run: {len(cameras)} cameras started in {time.monotonic() - t0:.1f} s")
            pending = {c.id for c in CASES}

            def settled() -> bool:
                statuses = _statuses(client)
                for cid in list(pending):
                    if _done(BY_ID[cid], events(client, cid), statuses.get(cid)):
                        pending.discard(cid)
                return not pending

            try:
                wait_for(settled, machine.deadline(45), "every hostile camera to show its outcome")
            except AssertionError:
                pass  # the per-case tests say which ones did not get there
            settled_at = time.time()
            # Measure the good camera over at least 6 s (three 2 s windows) of the bad ones failing and retrying
            # beside it.
            try:
                wait_for(lambda: _last_ts(client, GOOD) >= settled_at + 6, machine.deadline(30),
                         "the good camera's frames 6 s into the run")
            except AssertionError:
                pass  # test_good_camera_keeps_its_rate_beside_the_bad_ones says so
            status_live = _statuses(client)
            print(f"hostile run: settled after {time.time() - started:.1f} s, still pending: {sorted(pending)}")
            stopped = time.time()
            finals = {f["camera"]: f for f in run.stop()}
        waited = time.monotonic() - t0
        yield HostileRun(env, {c["id"]: events(client, c["id"]) for c in cameras},
                         {c["id"]: messages(client, c["id"]) for c in cameras}, status_live, _statuses(client),
                         finals, run.log, started, settled_at, stopped, waited, good_fps)


def _plain(reason: str) -> None:
    assert reason and not PYTHONISH.search(reason), f"not a plain-words reason: {reason!r}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "failed"], ids=lambda c: c.id)
def test_bad_file_or_url_fails_once_with_a_clear_reason(hostile_run: HostileRun, case: Case) -> None:
    evs = hostile_run.events[case.id]
    down = [e for e in evs if e["type"] == "stream_down"]
    assert down, f"{case.id}: no stream_down event; events: {evs}"
    assert len(down) == 1 and down[0].get("final") is True, down
    # a stream_up is allowed: a container can open fine and only its pictures turn out undecodable
    assert not [e for e in evs if e["type"] == "stream_reconnecting"], evs
    assert len([e for e in evs if e["type"] == "stream_up"]) <= 1, evs
    reason = down[0]["reason"]
    _plain(reason)
    for fragment in case.reason:
        assert fragment in reason.lower(), f"{case.id}: {fragment!r} not in {reason!r}"
    status = hostile_run.status_final[case.id]
    assert status["state"] == "failed" and status["last_error"] == reason, status
    assert hostile_run.finals[case.id]["state"] == "failed"
    assert not hostile_run.messages[case.id]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "retrying"], ids=lambda c: c.id)
def test_unreachable_live_camera_retries_with_a_clear_reason(hostile_run: HostileRun, case: Case) -> None:
    evs = hostile_run.events[case.id]
    retries = [e for e in evs if e["type"] == "stream_reconnecting"]
    assert len(retries) >= 2, f"{case.id}: expected repeated stream_reconnecting, got {evs}"
    assert [e["attempt"] for e in retries] == list(range(1, len(retries) + 1))
    assert all(0 < e["delay_s"] <= 15 for e in retries)
    for e in retries + [e for e in evs if e["type"] == "stream_down"]:
        _plain(e["reason"])
        assert not e.get("final"), e
        for fragment in case.reason:
            assert fragment in e["reason"].lower(), f"{case.id}: {fragment!r} not in {e['reason']!r}"
    status = hostile_run.status_live[case.id]
    assert status["state"] in ("reconnecting", "starting"), status
    assert all(f in (status["last_error"] or "").lower() for f in case.reason), status
    assert status["reconnects"] >= 1
    assert not hostile_run.messages[case.id]


def _check_boxes(msgs: list[dict]) -> None:
    for m in msgs:
        w, h = m["size"]
        for d in m["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h, (m["size"], d)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "processed"], ids=lambda c: c.id)
def test_odd_but_valid_input_is_processed(hostile_run: HostileRun, case: Case) -> None:
    msgs = hostile_run.messages[case.id]
    final = hostile_run.finals[case.id]
    evs = hostile_run.events[case.id]
    assert msgs, f"{case.id}: nothing published; events {evs}, final {final}"
    assert final["state"] == "ended", final
    assert [e["type"] for e in evs if e["type"].startswith("stream_")] == ["stream_up", "stream_down"], evs
    assert hostile_run.status_final[case.id]["state"] == "ended"
    # unpaced files are lossless: every decoded frame is published, in order
    assert final["published"] == final["decoded"] == len(msgs)
    assert [m["frame"] for m in msgs] == list(range(len(msgs)))
    _check_boxes(msgs)
    if case.sizes is not None:
        want = case.sizes(hostile_run.env)
        assert [tuple(m["size"]) for m in msgs] == want
    if case.id == "size-change":
        assert {tuple(m["size"]) for m in msgs} == {(320, 192), (160, 96)}
    if case.id == "glitchy-h264":
        assert len(msgs) >= 15


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "partial"], ids=lambda c: c.id)
def test_cut_recording_is_processed_then_reported_as_truncated(hostile_run: HostileRun, case: Case) -> None:
    msgs, evs = hostile_run.messages[case.id], hostile_run.events[case.id]
    assert 5 <= len(msgs) < 20, f"{case.id}: want the frames before the cut, got {len(msgs)}"
    assert [m["frame"] for m in msgs] == list(range(len(msgs)))
    _check_boxes(msgs)
    down = [e for e in evs if e["type"] == "stream_down"]
    assert len(down) == 1 and down[0].get("final") is True, evs
    _plain(down[0]["reason"])
    for fragment in case.reason:
        assert fragment in down[0]["reason"].lower(), f"{case.id}: {fragment!r} not in {down[0]['reason']!r}"
    assert hostile_run.finals[case.id]["state"] == "failed"
    assert hostile_run.status_final[case.id]["last_error"] == down[0]["reason"]


@pytest.mark.timeout(300)
def test_good_camera_keeps_its_rate_beside_the_bad_ones(hostile_run: HostileRun) -> None:
    run = hostile_run
    msgs = run.messages[GOOD]
    assert run.finals[GOOD]["state"] == "stopped" and run.status_live[GOOD]["state"] == "running"
    ts = np.array([m["ts"] for m in msgs])
    # From the moment every bad camera has shown its outcome: the live ones keep failing and reconnecting
    # from then on. Not from the start: there 20 actor processes start, and 7 unpaced files burst through
    # their frames as fast as the model takes them, which on a 2-core machine with one core busy is plain CPU
    # starvation (shown in the output, not asserted), not a camera stalling another.
    start, end = run.settled, run.stopped - 0.5
    span = end - start
    rate = ((ts >= start) & (ts < end)).sum() / span
    early = ((ts >= run.started + 1.0) & (ts < start)).sum() / max(1.0, start - run.started - 1.0)
    # 2 s windows: no stall while the others fail and reconnect
    windows = np.histogram(ts, bins=np.arange(start, end, 2.0))[0] / 2.0
    print(f"good camera: {rate:.1f} fps over {span:.0f} s after the bad ones settled; 2 s windows: "
          f"{windows.tolist()}; {early:.1f} fps while they started ({start - run.started:.0f} s); "
          f"whole run took {run.waited_s:.0f} s")
    assert rate >= 0.7 * run.good_fps, rate
    assert windows.min() >= 0.3 * run.good_fps, windows
    assert not run.events[GOOD] or all(e["type"] in ("stream_up", "track_started", "track_ended")
                                       for e in run.events[GOOD])


@pytest.mark.timeout(300)
def test_controller_log_names_every_camera_without_tracebacks(hostile_run: HostileRun) -> None:
    text = "\n".join(hostile_run.log)
    for case in CASES:
        assert f"Camera {case.id}:" in text
    assert "Traceback" not in text


# ------------------------------------------------------------------------------------------ source fuzz

FUZZ_SEEDS = 40
FUZZ_BUDGET_S = 10.0  # per file, opening included; a fuzzed file takes ~0.05 s on a quiet 2-core machine
# What a broken local file may end in. Never not_found, timeout, ... (those are about reaching a source).
FILE_ERROR_KINDS = ("not_video", "decode", "unsupported")


def _drain(path: Path, budget_s: float = FUZZ_BUDGET_S) -> tuple[int, SourceError | None]:
    """Frames read from ``path`` until the end, and the SourceError it ended with (None for a clean end)."""
    t0 = time.monotonic()
    source = open_source(str(path), realtime=False, open_timeout_s=2, read_timeout_s=2)
    frames = 0
    try:
        source.open()
        while source.read() is not None:
            frames += 1
            assert time.monotonic() - t0 < budget_s, f"{path.name}: still reading after {budget_s} s"
    except SourceError as e:
        return frames, e
    finally:
        source.close()
    return frames, None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("base", ["faststart", "fragmented", "change"])
def test_fuzzed_files_end_in_frames_or_a_source_error(clips, tmp_path: Path, base: str) -> None:
    """Flipped bytes anywhere (header included) and cuts at random places: each file ends in a bounded time
    with frames then a clean end, or a SourceError of a file's kind whose message names the file in plain
    words; never another exception, never a clean end without a single frame."""
    src = clips[base]
    data = np.frombuffer(src.read_bytes(), np.uint8)
    outcomes: dict[str, int] = {}
    for seed in range(FUZZ_SEEDS):
        rng = np.random.default_rng(seed)
        broken = data.copy()
        n = int(rng.integers(1, 200))
        where = rng.integers(0, len(broken), n)
        broken[where] = rng.integers(0, 256, n, dtype=np.uint8)
        if seed % 3 == 0:
            broken = broken[: int(rng.integers(16, len(broken)))]
        path = tmp_path / f"{base}-{seed}{src.suffix}"
        path.write_bytes(broken.tobytes())
        started = time.monotonic()
        frames, error = _drain(path)
        took = time.monotonic() - started
        case = f"{path.name}: {frames} frames then {error!r}"
        assert took < FUZZ_BUDGET_S, f"{case} after {took:.1f} s"
        if error is None:
            assert frames >= 1, f"{case}: a clean end without a single frame"
            key = "clean end"
        else:
            assert error.kind in FILE_ERROR_KINDS, case
            assert str(error).startswith(str(path) + ": "), case
            _plain(str(error).split(": ", 1)[1])
            key = error.kind
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"{base}: {FUZZ_SEEDS} fuzzed files -> {outcomes}")
    # The fuzz damages files without destroying every one: some still play to their end.
    assert outcomes.get("clean end", 0) >= FUZZ_SEEDS // 4, outcomes


# ------------------------------------------------------------------------------------------ CLI


class _Evil:
    """Unpickling this runs a shell command: what a hostile .pt file does to any loader that unpickles freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, encoding="utf-8",
                          timeout=120)


ONE_CAMERA = "cameras:\n  - {id: a, url: 'synthetic://street'}\n"


def _run(config: str) -> Callable[[Path], list[str]]:
    """argv of `hydravision run` on a config file with this text; TMP in it becomes the test's folder."""
    def argv(tmp: Path) -> list[str]:
        path = tmp / "cfg.yaml"
        path.write_text(config.replace("TMP", str(tmp)))
        return ["run", str(path)]
    return argv


CLI_CASES = {
    "missing-config": (lambda tmp: ["run", str(tmp / "nope.yaml")], "config file not found"),
    "bad-yaml": (_run("cameras: [\n  - id: a\n    url: [x"), "not valid yaml"),
    "negative-fps": (_run("cameras:\n  - {id: a, url: 'synthetic://street', fps: -5}\n"), "cameras[0].fps"),
    "unknown-field": (_run("cameras:\n  - {id: a, url: 'synthetic://street', fsp: 5}\n"),
                      "cameras[0].fsp: unknown field"),
    "wrong-type": (_run("cameras:\n  - {id: a, url: 'synthetic://street', fps: fast}\n"), "cameras[0].fps"),
    "duplicate-ids": (_run(ONE_CAMERA + "  - {id: a, url: 'synthetic://street?seed=2'}\n"), "duplicate camera id"),
    "synthetic-huge": (_run("cameras:\n  - {id: a, url: 'synthetic://street?size=99999x99999'}\n"),
                       "cameras[0].url: parameter 'size' must be widthxheight, each 64..8192"),
    "checkpoint-not-ours": (_run("model: {checkpoint: 'TMP/other.safetensors'}\n" + ONE_CAMERA),
                            "not a hydravision checkpoint"),
    "unset-env": (_run("cameras:\n  - {id: a, url: 'rtsp://u:${HV_TEST_UNSET}@h/x'}\n"), "hv_test_unset"),
    "bad-scheme-secret": (_run("cameras:\n  - {id: a, url: 'ftp://admin:s3cret@cam/x'}\n"), "unsupported scheme"),
    "checkpoint-is-pickle": (_run("model: {checkpoint: 'TMP/evil.pt'}\n" + ONE_CAMERA), "not a safetensors file"),
    "eval-pickle": (lambda tmp: ["eval", "--checkpoint", str(tmp / "evil.pt"), "--no-progress"], "not a safetensors file"),
    "import-pickle-backbone": (lambda tmp: ["train", "--out", str(tmp / "o.safetensors"), "--head", "p=person",
                                            "--steps", "1", "--import-backbone", str(tmp / "evil.pt"), "--no-progress"],
                               "refused"),
}


# Through the real console process (its exit status and stderr as a shell sees them); the others call the
# CLI's main() in this process, which is the same code after the imports (each process paid ~3 s of them).
CONSOLE_CASES = {"missing-config", "bad-scheme-secret", "checkpoint-is-pickle"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_cli_refuses_bad_input_with_exit_2_and_a_plain_error(tmp_path: Path, case: str, capsys, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    torch.save({"weights": _Evil(marker)}, tmp_path / "evil.pt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # valid safetensors, someone else's
    argv, fragment = CLI_CASES[case]
    if case in CONSOLE_CASES:
        result = _cli(*argv(tmp_path), cwd=REPO)
    else:
        monkeypatch.chdir(REPO)
        code = cli_main(argv(tmp_path))
        out, err = capsys.readouterr()
        result = subprocess.CompletedProcess(argv, code, out, err)
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    assert fragment in err.lower(), f"{fragment!r} not in {err!r}"
    assert "s3cret" not in result.stdout + err
    assert not marker.exists(), "a pickled checkpoint ran code"
