"""The synthetic street scene: determinism, truth geometry, identities, occlusion, arguments and cost."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from synthetic import sprites
from synthetic.scene import CLASS_NAMES, FrameTruth, StreetScene, composite
from synthetic.sprites import Sprite


def run(scene: StreetScene, n: int) -> list[tuple[np.ndarray, FrameTruth]]:
    return [scene.step() for _ in range(n)]


def square(size: int, colour=(255, 0, 0), alpha: int = 255) -> Sprite:
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[...] = (*colour, alpha)
    return Sprite.from_rgba(rgba)


@pytest.mark.parametrize("seed, kwargs", [
    (0, {}),
    (7, dict(width=320, height=240, fps=10.0, density=2.0)),
    (3, dict(classes=("bicycle",))),
])
def test_same_seed_replays_bit_identically(seed, kwargs):
    a, b = run(StreetScene(seed, **kwargs), 40), run(StreetScene(seed, **kwargs), 40)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert np.array_equal(ia, ib)
        for field in ("boxes", "class_ids", "object_ids", "visibility"):
            assert np.array_equal(getattr(ta, field), getattr(tb, field))


@pytest.mark.parametrize("seed_a, seed_b", [(0, 1), (2, 3), (10, 11)])
def test_different_seeds_differ(seed_a, seed_b):
    ia, _ = StreetScene(seed_a).step()
    ib, _ = StreetScene(seed_b).step()
    assert np.abs(ia.astype(np.int16) - ib).mean() > 10  # a different street, not just different noise


@pytest.mark.parametrize("width, height", [(640, 360), (320, 240), (64, 64), (1280, 720), (1000, 120)])
def test_frame_and_truth_types(width, height):
    scene = StreetScene(5, width=width, height=height)
    for i, (image, truth) in enumerate(run(scene, 5)):
        assert image.shape == (height, width, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
        assert truth.frame == i
        n = len(truth)
        assert truth.boxes.shape == (n, 4) and truth.boxes.dtype == np.float32
        assert truth.class_ids.shape == (n,) and truth.class_ids.dtype == np.int64
        assert truth.object_ids.shape == (n,) and truth.object_ids.dtype == np.int64
        assert truth.visibility.shape == (n,) and truth.visibility.dtype == np.float32


@pytest.mark.parametrize("seed, kwargs", [(0, {}), (1, dict(width=320, height=180)), (2, dict(density=4.0)),
                                          (3, dict(fps=5.0))])
def test_boxes_inside_image_and_ordered(seed, kwargs):
    scene = StreetScene(seed, **kwargs)
    for _, t in run(scene, 150):
        b = t.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= scene.width).all() and (b[:, 3] <= scene.height).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert ((t.visibility >= 0) & (t.visibility <= 1)).all()
        assert len(np.unique(t.object_ids)) == len(t)
        assert set(t.class_ids.tolist()) <= set(range(len(CLASS_NAMES)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ids_persist_and_move_smoothly(seed):
    scene = StreetScene(seed)
    last: dict[int, tuple[np.ndarray, int]] = {}
    steps = []
    for _, t in run(scene, 200):
        now = {}
        for box, cls, oid in zip(t.boxes, t.class_ids, t.object_ids.tolist()):
            centre = (box[:2] + box[2:]) / 2
            if oid in last:
                assert last[oid][1] == cls, "an id changed class"
                steps.append(np.abs(centre - last[oid][0]).max())
            now[oid] = (centre, cls)
        last = now
    # cars are fastest: under 11 m/s * 1.1 at ~40 px/m, ~20 px a frame at 25 fps
    assert len(steps) > 500 and max(steps) < 0.05 * scene.width


@pytest.mark.parametrize("seed", [0, 4])
def test_objects_enter_leave_and_ids_are_never_reused(seed):
    truths = [t for _, t in run(StreetScene(seed), 300)]
    first = {i: f for f, t in reversed(list(enumerate(truths))) for i in t.object_ids.tolist()}
    final = {i: f for f, t in enumerate(truths) for i in t.object_ids.tolist()}
    entered = [i for i, f in first.items() if f > 0]
    left = [i for i, f in final.items() if f < len(truths) - 1]
    assert len(entered) >= 5 and len(left) >= 5
    for oid in first:  # an id seen again after a long absence would be a new object under an old id
        frames = [f for f, t in enumerate(truths) if oid in t.object_ids]
        assert max(np.diff(frames), default=1) < 25, f"id {oid} came back after leaving"


def test_scene_starts_populated():
    counts = [len(StreetScene(seed).step()[1].visible()) for seed in range(8)]
    assert min(counts) >= 1 and np.mean(counts) >= 3


@pytest.mark.parametrize("density, lo, hi", [(0.0, 0, 0), (0.5, 1, 6), (1.0, 3, 11), (3.0, 12, 30)])
def test_density_sets_object_count(density, lo, hi):
    counts = [len(t) for seed in range(3) for _, t in run(StreetScene(seed, density=density), 150)[::10]]
    assert lo <= np.mean(counts) <= hi


@pytest.mark.parametrize("classes", [CLASS_NAMES, ("car",), ("person", "bicycle")])
def test_classes_appear_and_only_those(classes):
    seen = set()
    for seed in range(3):
        for _, t in run(StreetScene(seed, classes=classes), 100):
            seen |= set(t.visible().class_ids.tolist())
    assert seen == {CLASS_NAMES.index(c) for c in classes}


def test_occlusion_happens_inside_the_frame():
    partial = 0
    for seed in range(3):
        scene = StreetScene(seed)
        for _, t in run(scene, 100):
            b, v = t.boxes, t.visibility
            inner = (b[:, 0] > 0) & (b[:, 1] > 0) & (b[:, 2] < scene.width) & (b[:, 3] < scene.height)
            partial += int(np.count_nonzero(inner & (v > 0) & (v < 1)))
    assert partial > 20


def test_speed_is_per_second_not_per_frame():
    """The same seed at 10 and 25 fps puts the objects it starts with at the same place after one second."""
    shift = []
    slow, fast = run(StreetScene(9, fps=10.0), 11)[-1][1], run(StreetScene(9, fps=25.0), 26)[-1][1]
    for oid in set(slow.object_ids.tolist()) & set(fast.object_ids.tolist()):
        a, b = slow.boxes[slow.object_ids == oid][0], fast.boxes[fast.object_ids == oid][0]
        shift.append(np.abs((a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2).max())
    assert len(shift) >= 3 and np.median(shift) < 3.0


# (sprites as (size, left, top, label), image size (h, w), expected inside pixels, expected visibility)
@pytest.mark.parametrize("placed, size, inside, visibility", [
    ([(4, 2, 2, 1)], (10, 10), [16], [1.0]),
    ([(4, -2, 0, 1)], (10, 10), [8], [0.5]),  # half outside the image
    ([(4, 0, 0, 1), (4, 2, 2, 2)], (10, 10), [16, 16], [0.75, 1.0]),  # the later (nearer) one covers a corner
    ([(4, 0, 0, 1), (4, 0, 0, 2)], (10, 10), [16, 16], [0.0, 1.0]),  # fully hidden
    ([(4, 0, 0, 1), (2, 0, 0, 0)], (10, 10), [16, 4], [0.75, 0.0]),  # clutter (label 0) hides but is no object
    ([(4, 8, 8, 1), (4, 7, 7, 2)], (10, 10), [4, 9], [0.0, 9 / 16]),  # both clipped; one hides the rest of the other
    ([(4, 20, 20, 1)], (10, 10), [0], [0.0]),  # off the image
])
def test_composite_visibility_hand_made(placed, size, inside, visibility):
    image, labels = np.zeros((*size, 3), np.uint8), np.zeros(size, np.int16)
    sprite_list = [(square(s), x, y, label) for s, x, y, label in placed]
    n_in, n_vis = composite(image, labels, sprite_list)
    assert n_in.tolist() == inside
    areas = np.array([sp.area for sp, *_ in sprite_list])
    assert np.allclose(n_vis / areas, visibility)


def test_composite_blends_and_ignores_faint_pixels():
    image, labels = np.full((6, 6, 3), 100, np.uint8), np.zeros((6, 6), np.int16)
    n_in, n_vis = composite(image, labels, [(square(2, (200, 0, 0)), 0, 0, 1), (square(2, (0, 0, 0), 102), 0, 0, 2)])
    # alpha 0.4 black over red 200: 120; faint pixels (< 0.5) do not count as the object nor hide the one below
    assert abs(int(image[0, 0, 0]) - 120) <= 1 and image[5, 5].tolist() == [100, 100, 100]
    assert n_in.tolist() == [4, 0] and n_vis.tolist() == [4, 0]


@pytest.mark.parametrize("cls, size", [("person", 30), ("person", 90), ("car", 70), ("car", 180),
                                       ("bicycle", 40), ("bicycle", 90)])
def test_sprites_have_the_asked_size_and_mirror(cls, size):
    r = sprites.recipe(cls, np.random.default_rng(0))
    sp = sprites.render(cls, r, size, 0, facing_left=False)
    x0, y0, x1, y1 = sp.bbox
    extent = (y1 - y0) if cls == "person" else (x1 - x0)
    assert 0.85 * size <= extent <= 1.1 * size
    assert abs(sp.anchor[1] - y1) <= 0.05 * size + 1  # the ground point is at the bottom of the object
    left = sprites.render(cls, r, size, 0, facing_left=True)
    assert np.array_equal(left.mask, sp.mask[:, ::-1]) and left.area == sp.area


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=0, width=10), "width"),
    (dict(seed=0, height=63), "height"),
    (dict(seed=0, width=640.0), "width"),
    (dict(seed=0, fps=0), "fps"),
    (dict(seed=0, fps=float("nan")), "fps"),
    (dict(seed=0, density=-0.1), "density"),
    (dict(seed=0, density=100), "density"),
    (dict(seed=0, classes=()), "classes"),
    (dict(seed=0, classes="car"), "classes"),
    (dict(seed=0, classes=("car", "dog")), "'dog'.*person, car, bicycle"),
    (dict(seed=0, classes=("car", "car")), "duplicate"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreetScene(**kwargs)


@pytest.mark.parametrize("threshold, expected", [(0.0, 4), (0.5, 2), (0.9, 1), (1.0, 1)])
def test_visible_filters_by_visibility(threshold, expected):
    t = FrameTruth(3, np.zeros((4, 4), np.float32), np.arange(4), np.arange(10, 14),
                   np.array([0.0, 0.3, 0.5, 1.0], np.float32))
    v = t.visible(threshold)
    assert len(v) == expected and v.frame == 3 and (v.visibility >= threshold).all()


def timed_steps(scene: StreetScene, n: int) -> np.ndarray:
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        scene.step()
        times[i] = time.perf_counter() - t0
    return times * 1e3


def test_step_is_cheap():
    scene = StreetScene(0)
    run(scene, 5)
    ms = timed_steps(scene, 100)
    print(f"StreetScene.step at 640x360: mean {ms.mean():.2f} ms, p95 {np.percentile(ms, 95):.2f} ms")
    assert ms.mean() < 15.0  # loose for a loaded CI machine; about 0.3 ms on a quiet 2-core one


def test_long_run_stays_bounded():
    """Objects leave as new ones come: after minutes of video neither the count nor the cost has grown."""
    scene = StreetScene(1, fps=10.0)
    counts = [len(scene.step()[1]) for _ in range(3000)]  # keep no frames: 3000 of them are 2 GB
    assert max(counts[-500:]) <= 2 * max(counts[:500]) and min(counts[-500:]) >= 1
    assert timed_steps(scene, 100).mean() < 15.0


def test_the_package_stands_alone():
    """synthetic/ feeds models/, workers/, the tests and the benchmarks, so it must import none of them, nor torch
    (but models.files, which imports nothing itself, for the clips)."""
    code = ("import sys, synthetic.scene, synthetic.sprites, synthetic.clips; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'models', 'workers', 'pipeline'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120, check=True)
    assert out.stdout.strip() == "['models', 'models.files']"
