"""Box decoding, IoU and the batched greedy NMS against a plain reference implementation; a batch's reads back
to the host (GPU syncs) do not grow with its size."""

import collections

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from models.hydranet import HydraNet, HydraNetConfig
from models.postprocess import HeadDetections, box_iou, decode_boxes, make_points, nms_keep, postprocess, to_cpu


def reference_nms(boxes: np.ndarray, labels: np.ndarray, iou_threshold: float) -> list[int]:
    """Textbook greedy NMS, per class, boxes already sorted by score."""
    keep: list[int] = []
    for i in range(len(boxes)):
        ok = True
        for j in keep:
            if labels[j] != labels[i]:
                continue
            iou = box_iou(torch.tensor(boxes[j : j + 1]), torch.tensor(boxes[i : i + 1]))[0, 0].item()
            if iou > iou_threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 80, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_reference(seed, threshold):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 60)
    labels = rng.integers(0, 3, 60)
    keep = nms_keep(torch.tensor(boxes)[None], torch.tensor(labels)[None], torch.ones(1, 60, dtype=torch.bool), threshold)
    assert keep[0].nonzero().squeeze(1).tolist() == reference_nms(boxes, labels, threshold)


def test_nms_chain_keeps_third_box():
    """A suppressed box must not suppress others: A kills B, so C (overlapping only B) survives."""
    boxes = torch.tensor([[[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10.0]]])
    keep = nms_keep(boxes, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), 0.3)
    assert keep.tolist() == [[True, False, True]]


def test_nms_is_class_aware_and_respects_valid():
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10.0]]])
    labels = torch.tensor([[0, 1, 0]])
    valid = torch.tensor([[False, True, True]])
    keep = nms_keep(boxes, labels, valid, 0.5)
    assert keep.tolist() == [[False, True, True]]


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))[0, 0].item() == pytest.approx(expected)


def test_points_and_decoding():
    pts = make_points([(2, 3), (1, 1)], (8, 16), torch.device("cpu"))
    assert pts.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8]]
    boxes = decode_boxes(pts[:1], torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert boxes.tolist() == [[3, 2, 7, 8]]


def test_postprocess_decodes_a_planted_detection():
    pts = make_points([(4, 4)], (8,), torch.device("cpu"))
    p = len(pts)
    cls = torch.full((1, p, 2), -10.0)
    ctr = torch.full((1, p), 10.0)
    ltrb = torch.full((1, p, 4), 4.0)
    cls[0, 5, 1] = 10.0  # point 5 is (12, 12)
    dets = postprocess({"cls_logits": cls, "box_ltrb": ltrb, "centerness": ctr}, pts, (32, 32), score_threshold=0.5)
    assert len(dets) == 1 and len(dets[0]) == 1
    assert dets[0].boxes.tolist() == [[8, 8, 16, 16]]
    assert dets[0].class_ids.tolist() == [1]
    assert dets[0].scores.item() > 0.99


def test_postprocess_empty_batch_member():
    pts = make_points([(2, 2)], (8,), torch.device("cpu"))
    out = {"cls_logits": torch.full((2, 4, 1), -10.0), "box_ltrb": torch.ones(2, 4, 4), "centerness": torch.zeros(2, 4)}
    dets = postprocess(out, pts, (16, 16), score_threshold=0.5)
    assert [len(d) for d in dets] == [0, 0]
    assert dets[0].numpy()["boxes"].shape == (0, 4)


def test_postprocess_keeps_each_images_best_max_detections():
    # separate cells, one class: nothing suppresses anything, so the cap alone decides; each image its own best
    pts = make_points([(4, 4)], (8,), torch.device("cpu"))
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0] * 4, [5.0, -9.0, 0.5, 6.0] * 4])
    out = {"cls_logits": logits[..., None], "box_ltrb": torch.full((2, 16, 4), 2.0), "centerness": torch.full((2, 16), 9.0)}
    dets = postprocess(out, pts, (32, 32), score_threshold=0.5, max_detections=3)
    assert [len(d) for d in dets] == [3, 3]
    for d, row in zip(dets, logits):
        assert d.scores.tolist() == sorted(d.scores.tolist(), reverse=True)
        torch.testing.assert_close(d.scores, torch.sigmoid(row).sort(descending=True).values[:3] ** 0.5, atol=1e-3, rtol=0)
    assert [len(d) for d in postprocess(out, pts, (32, 32), score_threshold=0.5, max_detections=100)] == [16, 12]


def test_a_batch_moved_to_the_cpu_at_once_keeps_each_images_detections():
    # fields of every image and head are concatenated, copied and split again: each must come back to its own
    g = torch.Generator().manual_seed(0)

    def det(k: int, kind: bool, emb: bool) -> HeadDetections:
        d = HeadDetections(torch.rand(k, 4, generator=g), torch.rand(k, generator=g), torch.randint(0, 3, (k,), generator=g))
        if kind:
            d.attributes["kind"] = (torch.randint(-1, 2, (k,), generator=g), torch.rand(k, generator=g), ["a", "b"])
        if emb:
            d.embeddings = torch.rand(k, 5, generator=g)
        return d

    results = [{"people": det(3, False, True), "vehicles": det(2, True, True)}, {}, {"vehicles": det(0, True, True)},
               {"people": det(4, False, False)}, {"vehicles": det(5, True, True), "people": det(1, False, True)}]
    moved = to_cpu(results)
    assert [list(r) for r in moved] == [list(r) for r in results]
    for r, m in zip(results, moved):
        for head in r:
            a, b = r[head].numpy(), m[head].numpy()
            assert a.keys() == b.keys()
            for key in a:
                assert np.array_equal(a[key], b[key]), (head, key)
    assert to_cpu([{}, {}]) == [{}, {}]


class HostReads(TorchFunctionMode):
    """Counts the torch calls that read a tensor's values back to the host: on a GPU each one waits for it."""

    READS = {"item", "tolist", "nonzero", "cpu", "numpy", "equal", "unique", "_unique2", "masked_select",
             "__bool__", "__int__", "__float__"}
    COPIES = {"tensor", "as_tensor", "new_tensor"}  # Python numbers copied to the device: a sync there too

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") else ()
        masks = [i for i in (index if isinstance(index, tuple) else (index,))
                 if isinstance(i, torch.Tensor) and i.dtype == torch.bool]  # a boolean index counts its Trues
        if name in self.READS or masks:
            self.calls[name] += 1
        lists = [i for i in (index if isinstance(index, tuple) else (index,)) if isinstance(i, list)]
        if name in self.COPIES or lists:  # a list as an index is copied to the device too
            self.calls["to the device"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pixels", ["normalised", "uint8"])
def test_a_batch_reads_back_to_the_host_as_often_whatever_its_size(pixels):
    # the same two images, then four times over: as many reads for 8 images as for 2 (detection heads, NMS,
    # an attribute head, the re-ID head with colours, the copy to the CPU), on the torch path and on the
    # exported runtimes' (uint8 images, colours normalised under the boxes)
    torch.manual_seed(0)
    model = HydraNet(HydraNetConfig(
        input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8}, neck={"type": "fpn", "channels": 16},
        heads={"people": {"classes": ["person"]}, "vehicles": {"classes": ["car", "bicycle"]}},
        attributes={"kind": {"labels": ["a", "b"], "on": "vehicles", "of": ["car"]}},
        reid={"heads": ["people", "vehicles"], "dim": 8, "channels": 8, "hidden": 16, "colour": 2})).eval()
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    counts = []
    for reps in (1, 4):
        x, heads = images.repeat(reps, 1, 1, 1), [["people", "vehicles"], ["vehicles"]] * reps
        with torch.inference_mode():
            feats = model.features(model.normalize(x))
            raw = {h: ([i for i, w in enumerate(heads) if h in w], model.heads[h](feats)) for h in model.heads}
            raw = {h: (idx, {k: v[idx] for k, v in out.items()}) for h, (idx, out) in raw.items()}
            with HostReads() as reads:
                results = to_cpu(model.decode(feats, raw, len(x), (64, 96), 0.0,
                                              images=x if pixels == "uint8" else model.normalize(x)))
        assert sum(len(d) for r in results for d in r.values()) > 20 * reps
        assert all(len(d) == 0 or d.attributes["kind"][0].ge(0).any() for r in results for h, d in r.items() if h == "vehicles")
        counts.append(reads.calls)
    assert counts[0] == counts[1] and sum(counts[0].values()) <= 24, counts  # 19 now: a few per head and field
    assert counts[0]["to the device"] == 0, counts
