"""A box without a look (a zero embedding: what to_detections makes of a non-finite one) is never re-linked to a
lost track, whatever appearance.min_similarity allows (down to -1): its cosine with any look is 0, so at a
min_similarity of 0 or below a stranger appearing near where a lost track would be took its id on position and
class alone, while the association step already leaves such boxes to motion."""
from __future__ import annotations

import numpy as np
import pytest

import test_appearance as ta


@pytest.mark.parametrize("min_similarity", [0.0, -1.0])
def test_a_box_without_a_look_takes_no_lost_tracks_id(monkeypatch, min_similarity):
    monkeypatch.setitem(ta.LOOKS, "none", np.zeros(4))
    ids, _ = ta.run(ta.tracker(True, min_similarity=min_similarity), ta.occluded_walk(back_look="none"))
    assert ids[5][0] >= 0 and ids[20][0] >= 0 and ids[20][0] != ids[5][0]


def test_a_look_that_is_alike_enough_still_relinks_at_a_low_threshold():
    ids, _ = ta.run(ta.tracker(True, min_similarity=0.0), ta.occluded_walk())
    assert ids[5][0] == ids[20][0] >= 0


@pytest.mark.parametrize("min_similarity", [0.0, -1.0])
def test_a_lost_track_that_kept_no_look_is_taken_by_no_box(monkeypatch, min_similarity):
    """The other side (the review): a lost track whose remembered look is zero has a cosine of 0 with every box."""
    monkeypatch.setitem(ta.LOOKS, "none", np.zeros(4))
    frames = [ta.dets([(10 + 4 * f, 50, "none")]) for f in range(10)]
    frames += [ta.dets([]) for _ in range(6)]
    frames += [ta.dets([(10 + 4 * f - 30, 50, "b")]) for f in range(16, 26)]
    ids, _ = ta.run(ta.tracker(True, min_similarity=min_similarity), frames)
    assert ids[5][0] >= 0 and ids[20][0] >= 0 and ids[20][0] != ids[5][0], (ids[5], ids[20])
