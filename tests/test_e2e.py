"""The whole product through Ray: cameras -> StreamActors -> batched InferenceActor -> trackers -> Redis.

Every assertion reads what a downstream consumer would read: Redis.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import pytest
import ray

from mot import mot_scores, read_stream, scene_truth
from pipeline.app import App
from pipeline.config import parse_config
from running import RunningApp, events, wait_for
from servers import encode_mp4
from synthetic.scene import StreetScene
from workers.publish import keys, validate

DEMO = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"
# The scene moves as filmed at FPS; 175 frames (7 s as filmed) scored as 250 did (MOTA 0.89 vs 0.90, IDF1 0.81).
SCENE_SEED, SCENE_FRAMES, FPS = 7, 175, 25.0
CATCH_UP = 25  # frames: the clip's first second at FPS


def make_app(redis_url: str, checkpoint: Path, cameras: list[dict], **inference) -> App:
    config = parse_config({
        "redis": {"url": redis_url},
        "model": {"checkpoint": str(checkpoint), "device": "cpu"},
        "inference": {"max_batch": 8, "max_wait_ms": 5, **inference},
        "cameras": cameras,
    })
    return App(config, say=lambda m: None)


def validate_all(client, camera_ids: list[str]) -> dict[str, list[dict]]:
    k = keys("hv")
    out = {}
    for cid in camera_ids:
        out[cid] = read_stream(client, k.detections(cid))
        for m in out[cid]:
            validate(m, "detection")
    for e in read_stream(client, k.events):
        validate(e, "event")
    return out


def decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture(scope="module")
def scene_fps(machine) -> int:
    """The rate the RTSP camera sends the scene at: what this machine analyses with headroom, at most FPS.
    Decoding, tracking and publishing take about as much CPU as the model, hence 30% of its batch-1 rate."""
    return machine.live_fps(machine.demo, share=0.3, cap=FPS)


def retime(src: Path, dst: Path, fps: int) -> Path:
    """The encoded frames of ``src`` bit for bit, with timestamps for ``fps``: they play slower or faster and
    decode to the same pictures (re-encoding at another rate would change x264's rate control, and with it
    the pictures and the detections)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        istream = inp.streams.video[0]
        ostream = out.add_stream_from_template(istream)
        ostream.time_base = Fraction(1, fps)
        packets = (p for p in inp.demux(istream) if p.dts is not None)  # not the flush packet at the end
        for i, packet in enumerate(packets):  # no B-frames (encode_mp4): decode order is display order
            packet.stream, packet.time_base = ostream, Fraction(1, fps)
            packet.pts = packet.dts = i
            packet.duration = 1
            out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def synthetic_mp4(tmp_path_factory, scene_fps) -> Path:
    """The scene filmed at FPS, played at scene_fps: on a slow machine the same frames (the same motion from
    one frame to the next, so the same tracking problem) arrive more slowly."""
    scene = StreetScene(SCENE_SEED, fps=FPS)
    frames = (scene.step()[0] for _ in range(SCENE_FRAMES))
    clips = tmp_path_factory.mktemp("clips")
    filmed = encode_mp4(clips / "street.mp4", frames, fps=FPS, crf=20)
    return filmed if scene_fps == FPS else retime(filmed, clips / f"street-{scene_fps}fps.mp4", scene_fps)


@pytest.mark.timeout(600)  # a hang guard; the waits inside are sized to the machine
def test_synthetic_scene_over_rtsp_is_tracked_well(machine, ray_local, redis_server, rtsp_server, synthetic_mp4,
                                                    scene_fps):
    server = rtsp_server(synthetic_mp4)
    # ByteTrack's lost-track buffer is counted in 30 fps frames and scaled by the stream's rate: keep it at
    # the 25 frames it is at FPS, so a slower stream does not make tracks easier or harder to keep.
    tracker = {"lost_track_buffer": round(30 * FPS / scene_fps)}
    clip_s = SCENE_FRAMES / scene_fps
    client = redis_server.client()
    with RunningApp(redis_server.url, DEMO, [{"id": "street", "url": server.url, "tracker": tracker}]) as run:
        # the server ends the stream after the clip: a live camera reports it and reconnects
        wait_for(lambda: events(client, "street", "stream_down"), 1.5 * clip_s + machine.deadline(30),
                 f"the end of the {clip_s:.0f} s clip")
        final = run.stop()[0]
    messages = [m for m in validate_all(client, ["street"])["street"] if m["frame"] < SCENE_FRAMES]
    # The server sends its first frames in a burst on PLAY and a live camera keeps only the newest of a
    # burst (catching up to live, by design): tracking is scored from frame CATCH_UP on, where every frame
    # must have been analysed. These are the frames scored on any machine, so the thresholds mean the same.
    scores = mot_scores(messages, scene_truth(SCENE_SEED, SCENE_FRAMES, fps=FPS), start=CATCH_UP)
    print(f"MOT over RTSP at {scene_fps} fps ({machine}):", scores,
          "camera:", {k: final[k] for k in ("decoded", "published", "dropped")},
          "frames missing:", sorted(set(range(SCENE_FRAMES)) - {m["frame"] for m in messages}))
    assert scores["frames_without_message"] <= 0.02 * scores["frames"]
    assert scores["MOTA"] >= 0.80
    assert scores["IDF1"] >= 0.75
    assert any(e["type"] == "track_started" for e in events(client, "street"))
    assert any(e["type"] == "stream_up" for e in events(client, "street"))


@pytest.mark.timeout(600)
def test_bikes_over_rtsp_and_as_file_account_for_every_frame(machine, ray_local, redis_server, rtsp_server,
                                                           bikes_mp4, tiny_checkpoint):
    server = rtsp_server(bikes_mp4)
    cameras = [{"id": "bikes-file", "url": str(bikes_mp4), "realtime": False},
               {"id": "bikes-rtsp", "url": server.url}]
    frames_in_clip = decoded_frame_count(bikes_mp4)
    client = redis_server.client()
    with RunningApp(redis_server.url, tiny_checkpoint, cameras) as run:
        # The file runs until it has ended, however long this machine takes (generously: 3 x the model's
        # time for its frames); the RTSP clip is 10 s long at its own pace, then the server ends the stream.
        wait_for(lambda: run.camera("bikes-file").get("state") == "ended",
                 machine.deadline(30) + 3 * frames_in_clip / machine.tiny.batch1_fps, "the file camera to end")
        wait_for(lambda: events(client, "bikes-rtsp", "stream_down"), machine.deadline(30) + 15,
                 "the end of the RTSP clip")
        finals = {f["camera"]: f for f in run.stop()}
    messages = validate_all(client, list(finals))
    f = finals["bikes-file"]
    assert f["state"] == "ended"
    assert f["decoded"] == f["published"] == frames_in_clip == len(messages["bikes-file"])
    assert [m["frame"] for m in messages["bikes-file"]] == list(range(frames_in_clip))
    r = finals["bikes-rtsp"]
    assert r["decoded"] >= 200
    assert r["in_slot"] == 0 and r["in_flight"] == 0
    assert r["published"] + sum(r["dropped"].values()) == r["decoded"]
    assert r["published"] == len(messages["bikes-rtsp"])
    assert all(m["size"] == [640, 272] for m in messages["bikes-rtsp"])


@pytest.mark.timeout(600)
def test_four_cameras_with_different_heads_share_one_backbone_pass(machine, ray_local, redis_server, tiny_checkpoint):
    heads = {"cam-p": ["people"], "cam-v": ["vehicles"], "cam-pv": ["people", "vehicles"], "cam-all": None}
    cameras = [{"id": cid, "url": f"synthetic://street?seed={i}&frames=60", "realtime": False, "heads": h}
               for i, (cid, h) in enumerate(heads.items())]
    app = make_app(redis_server.url, tiny_checkpoint, cameras, replicas=1,  # all four cameras in one model process
                   in_camera_process=False)
    app.start()
    # returns as soon as all four sources have ended (generously: 3 x the model's time for the 240 frames)
    app.run(duration=machine.deadline(30) + 3 * 240 / machine.tiny.batch1_fps)
    inference = ray.get(app.inference[0].stats.remote(), timeout=10)
    finals = {f["camera"]: f for f in app.shutdown()}
    messages = validate_all(redis_server.client(), list(heads))
    for cid, want in heads.items():
        want = want or ["people", "vehicles"]
        assert finals[cid]["state"] == "ended", finals[cid]
        assert finals[cid]["published"] == len(messages[cid]) == 60
        assert all(m["heads"] == want for m in messages[cid])
        assert {d["head"] for m in messages[cid] for d in m["detections"]} <= set(want)
    # The backbone ran once per frame (not once per head), and each head only on frames that asked.
    assert inference["backbone_frames"] == inference["frames"] == 240
    assert inference["head_frames"] == {"people": 180, "vehicles": 180}
    assert inference["batches"] < 240  # frames of different cameras were batched together
