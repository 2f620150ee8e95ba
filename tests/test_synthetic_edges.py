"""Edges of the synthetic data and the testbeds: augmented boxes against the picture's pixels, class ids of a
YOLO data.yaml, slow clip rates, fake dashboard cameras ticking fast, and servers started with odd arguments."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import numpy as np
import pytest

from models.datasets import DatasetError, place, read_class_names
from pipeline.testbed_dashboard import FakeCameras
from servers import RedisServer, RtspServer, require_binary
from synthetic.clips import encode_mp4
from workers.publish import keys

pytestmark = pytest.mark.timeout(60)


def picture_extent(shape: tuple[int, int], dst: tuple[int, int], seed: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Where place() put the picture (from its pixels) and where it put a box around the whole picture."""
    h, w = shape
    whole = np.array([[0, 0, w, h]], np.float32)
    canvases = []
    for value in (255, 0):  # the same draws on a white and a black picture: the pixels that differ are the picture
        image, boxes, keep, _ = place(np.full((h, w, 3), value, np.uint8), whole, np.zeros((0, 4), np.float32), dst,
                                      np.random.default_rng(seed))
        canvases.append(image)
    ys, xs = np.nonzero((canvases[0] != canvases[1]).any(0))
    extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32) if len(xs) else None
    return extent, boxes[keep]


@pytest.mark.parametrize("shape", [(360, 640), (100, 100), (12, 4096)])
def test_augmented_boxes_are_where_the_resized_picture_is(shape):
    """place() moved boxes by the unrounded scale while the picture was resized to whole pixels: a box's far edge
    missed the picture's by up to half a pixel (and a sliver's one row by most of one)."""
    compared = 0
    for seed in range(30):
        extent, boxes = picture_extent(shape, (64, 96), seed)
        if extent is None or len(boxes) == 0:
            continue
        compared += 1
        np.testing.assert_allclose(boxes[0], extent, atol=0.01, err_msg=f"seed {seed}")
    assert compared >= 10


@pytest.mark.parametrize("yaml_text, match", [
    ("names: {1: person, 2: car}\n", r"data\.yaml: 'names' ids must be 0\.\.1, got \[1, 2\]"),
    ("names: {0: person, 2: car}\n", r"ids must be 0\.\.1"),
    ("names: {a: person, b: car}\n", r"ids must be 0\.\.1"),
    ("- person\n- car\n", r"data\.yaml: expected a mapping with 'names', got list"),
])
def test_class_names_whose_ids_do_not_match_the_labels_are_refused(tmp_path, yaml_text, match):
    """names {1: person, 2: car} became [person, car]: label class 1 (person) trained as car, without a word."""
    (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises(DatasetError, match=match):
        read_class_names(tmp_path)


def test_class_name_ids_are_ordered_as_numbers(tmp_path):
    """Ids quoted as strings sorted as text: '10' came before '2', and eleven classes were mislabelled."""
    names = {str(i): f"c{i}" for i in range(12)}
    (tmp_path / "data.yaml").write_text("names:\n" + "".join(f"  '{k}': {v}\n" for k, v in names.items()))
    assert read_class_names(tmp_path) == [f"c{i}" for i in range(12)]
    (tmp_path / "data.yaml").write_text("names: {1: car, 0: person}\n")
    assert read_class_names(tmp_path) == ["person", "car"]


def test_a_clip_slower_than_one_frame_in_1001_seconds_keeps_its_rate(tmp_path):
    """fps 1/3600 was rounded to a rate of 0, which FFmpeg turned into a 24 fps clip."""
    path = encode_mp4(tmp_path / "slow.mp4", [np.zeros((64, 64, 3), np.uint8)] * 3, fps=1 / 3600)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(1, 3600)
        assert [round(f.time) for f in container.decode(stream)] == [0, 3600, 7200]


def test_redis_password_with_url_characters():
    """A '/', '?', '#' or '%' in the password broke the server's URL: start() waited 10 s for a PING that
    never came and the URL could not be used by anyone."""
    require_binary("redis-server")
    with RedisServer(password="p/w?x#y%z@q:1") as server:
        with server.client() as client:
            assert client.ping()
        import redis

        with redis.Redis.from_url(server.url) as client:
            assert client.ping()


def test_a_server_that_fails_to_start_in_a_with_leaves_no_temp_dir():
    """__exit__ does not run when __enter__ raises: each failed start left its /tmp/hv-redis-* folder behind."""
    server = RedisServer(binary="/bin/false")
    with pytest.raises(RuntimeError, match="exited with 1"):
        with server:
            pass
    assert not server.workdir.exists()


@pytest.mark.parametrize("kwargs, match", [(dict(pattern_size=(321, 181)), "even"), (dict(fps=0), "fps")])
def test_rtsp_pattern_with_settings_x264_cannot_take_fails_at_start(kwargs, match):
    """An odd size was READY and then answered every client '5XX Server Error', with nothing in its log."""
    require_binary("gst-rtsp-server")
    server = RtspServer("pattern", **kwargs)
    try:
        with pytest.raises(RuntimeError, match=match):
            server.start()
    finally:
        server.close()


def test_fake_cameras_ticking_faster_than_their_fps_still_number_new_frames(redis_server):
    """int(fps * interval_s) frames a tick: 0 below one frame a tick, so every message and snapshot said frame 0
    (the dashboard names a picture by its frame: it never changed), and 2 at 0.25 s and 10 fps (8 fps, not 10)."""
    url, k = redis_server.url, keys("fast")
    fast = FakeCameras(url, 1, prefix="fast", interval_s=0.05, fps=10.0, size=(160, 90))
    steady = FakeCameras(url, 1, prefix="steady", interval_s=0.25, fps=10.0, size=(160, 90))
    try:
        for _ in range(4):  # the ticks by hand: no thread, no timing
            fast.write_all()
            steady.write_all()
        with redis_server.client() as client:
            frames = [json.loads(f[b"data"])["frame"] for _, f in client.xrange(k.detections("cam-01"))]
            snapshot = int(client.hget(k.snapshot("cam-01"), "frame"))
            steady_last = json.loads(client.xrevrange(keys("steady").detections("cam-01"), count=1)[0][1][b"data"])
    finally:
        fast.client.close()
        steady.client.close()
    assert len(frames) == 4 and all(b > a for a, b in zip(frames, frames[1:])), frames
    assert snapshot == frames[-1]
    assert steady_last["frame"] == 10  # 1 s at 10 fps


def test_training_scenes_never_draw_a_benchmark_seed(monkeypatch):
    """The detector's training drew scene seeds from 0 up, where the analytics and re-ID benchmarks' and checks'
    scenes lie (seeds 100-999): a benchmark could score a scene the model had trained on."""
    from itertools import islice

    from models import datasets
    from synthetic.scene import StreetScene

    seeds: list[int] = []
    scene = StreetScene(1000, width=96, height=64)

    def recording(seed, **kwargs):  # one real scene serves them all: only the seeds drawn matter here
        seeds.append(seed)
        return scene

    monkeypatch.setattr(datasets, "StreetScene", recording)
    # 20000 draws: the old range (0 up) gave one under 1000 with all but certainty (1 - 0.999 ** 20000)
    frames = datasets.SyntheticFrames((64, 96), seed=3, pool=20_000, frames_per_scene=4, frame_stride=1,
                                      scene_size=(64, 96))
    list(islice(iter(frames), 1))
    assert len(seeds) == 20_000 and min(seeds) >= datasets.FIRST_TRAIN_SEED == 1000
