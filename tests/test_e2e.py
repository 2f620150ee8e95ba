"""The whole product through Ray: cameras -> StreamActors -> batched InferenceActor -> trackers -> Redis.

Every assertion reads what a downstream consumer would read: Redis.
"""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import ray

from mot import mot_scores, read_stream, scene_truth
from pipeline.app import App
from pipeline.config import parse_config
from servers import encode_mp4
from synthetic.scene import StreetScene
from workers.publish import keys, validate

DEMO = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"
SCENE_SEED, SCENE_FRAMES, FPS = 7, 250, 25.0
CATCH_UP = 25  # frames: the first second


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
def synthetic_mp4(tmp_path_factory) -> Path:
    scene = StreetScene(SCENE_SEED, fps=FPS)
    frames = (scene.step()[0] for _ in range(SCENE_FRAMES))
    return encode_mp4(tmp_path_factory.mktemp("clips") / "street.mp4", frames, fps=FPS, crf=20)


@pytest.mark.timeout(120)
def test_synthetic_scene_over_rtsp_is_tracked_well(ray_local, redis_server, rtsp_server, synthetic_mp4):
    server = rtsp_server(synthetic_mp4)
    app = make_app(redis_server.url, DEMO, [{"id": "street", "url": server.url}])
    app.start()
    app.run(duration=SCENE_FRAMES / FPS + 3)
    final = app.shutdown()[0]
    client = redis_server.client()
    messages = [m for m in validate_all(client, ["street"])["street"] if m["frame"] < SCENE_FRAMES]
    # The server sends its first frames in a burst on PLAY and a live camera keeps only the newest of a
    # burst (catching up to live, by design): tracking is scored from frame CATCH_UP on, where every
    # frame must have been analysed.
    scores = mot_scores(messages, scene_truth(SCENE_SEED, SCENE_FRAMES, fps=FPS), start=CATCH_UP)
    print("MOT over RTSP:", scores, "camera:", {k: final[k] for k in ("decoded", "published", "dropped")},
          "frames missing:", sorted(set(range(SCENE_FRAMES)) - {m["frame"] for m in messages}))
    assert scores["frames_without_message"] <= 0.02 * scores["frames"]
    assert scores["MOTA"] >= 0.80
    assert scores["IDF1"] >= 0.75
    events = read_stream(client, keys("hv").events)
    assert any(e["type"] == "track_started" for e in events)
    assert any(e["type"] == "stream_up" for e in events)


@pytest.mark.timeout(120)
def test_bikes_over_rtsp_and_as_file_account_for_every_frame(ray_local, redis_server, rtsp_server, bikes_mp4,
                                                           tiny_checkpoint):
    server = rtsp_server(bikes_mp4)
    cameras = [{"id": "bikes-file", "url": str(bikes_mp4), "realtime": False},
               {"id": "bikes-rtsp", "url": server.url}]
    app = make_app(redis_server.url, tiny_checkpoint, cameras)
    app.start()
    app.run(duration=12)  # the RTSP clip is 10 s long
    finals = {f["camera"]: f for f in app.shutdown()}
    messages = validate_all(redis_server.client(), list(finals))
    frames_in_clip = decoded_frame_count(bikes_mp4)
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


@pytest.mark.timeout(120)
def test_four_cameras_with_different_heads_share_one_backbone_pass(ray_local, redis_server, tiny_checkpoint):
    heads = {"cam-p": ["people"], "cam-v": ["vehicles"], "cam-pv": ["people", "vehicles"], "cam-all": None}
    cameras = [{"id": cid, "url": f"synthetic://street?seed={i}&frames=60", "realtime": False, "heads": h}
               for i, (cid, h) in enumerate(heads.items())]
    app = make_app(redis_server.url, tiny_checkpoint, cameras)
    app.start()
    app.run(duration=60)  # returns as soon as all four sources have ended
    inference = ray.get(app.inference[0].stats.remote(), timeout=10)
    finals = {f["camera"]: f for f in app.shutdown()}
    messages = validate_all(redis_server.client(), list(heads))
    for cid, want in heads.items():
        want = want or ["people", "vehicles"]
        assert finals[cid]["published"] == len(messages[cid]) == 60
        assert all(m["heads"] == want for m in messages[cid])
        assert {d["head"] for m in messages[cid] for d in m["detections"]} <= set(want)
    # The backbone ran once per frame (not once per head), and each head only on frames that asked.
    assert inference["backbone_frames"] == inference["frames"] == 240
    assert inference["head_frames"] == {"people": 180, "vehicles": 180}
    assert inference["batches"] < 240  # frames of different cameras were batched together
