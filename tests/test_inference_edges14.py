"""Edge cases of the inference replica's files found by an audit (round 14): each test failed before its fix."""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from models.export import cached, damaged
from workers.inference import local_copy

MONTHS_AGO = time.time() - 40 * 86400


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_damaged_cache_file_another_process_removed_meanwhile_is_made_again(tmp_path):
    """Two replicas starting together on a damaged export both judge it damaged; the first removes it under the lock
    and makes it again. The second, reading the file's identity just after that removal, ended its start in a
    FileNotFoundError."""
    path = tmp_path / "model-0123456789abcdef.onnx"
    path.write_bytes(b"\x00" * 64)

    def judged_then_removed_by_another(p):
        why = damaged(p)
        p.unlink()  # the other replica, which judged it so too
        return why

    made = cached(path, lambda p: p.write_bytes(b"whole"), "exporting", check=judged_then_removed_by_another)
    assert made.read_bytes() == b"whole"


def test_checkpoint_copies_written_long_ago_and_dead_parts_are_removed_when_a_copy_is_written(temp_dir):
    """On a cluster each checkpoint a service ran left its copy in every node's temp dir for good (a model
    retrained weekly: a copy more a week), and a write killed half-way its part."""
    kept = local_copy(b"this week's weights")
    folder = kept.parent
    old = folder / "hydravision-00000000000000000000.safetensors"
    old.write_bytes(b"last year's weights")
    part = folder / "tmpkilled.part"
    part.write_bytes(b"half a copy")
    for stale in (old, part):
        os.utime(stale, (MONTHS_AGO, MONTHS_AGO))
    writing = folder / "tmpwriting.part"  # another replica's write, under way
    writing.write_bytes(b"a copy being written")

    new = local_copy(b"next week's weights")
    assert new.read_bytes() == b"next week's weights"
    assert not old.exists() and not part.exists()
    assert kept.read_bytes() == b"this week's weights" and writing.exists()
    assert local_copy(b"this week's weights") == kept


def test_a_copy_written_long_ago_but_taken_lately_is_kept(temp_dir):
    """Copies' ages were their mtimes, which taking a copy does not refresh (a neighbour's touch reads as the file
    replaced): a copy a long-running service's replica was restarting on, written 40 days ago, was removed under it
    by another checkpoint's copy. A copy taken is marked beside it; the mark of a removed copy goes with it."""
    used = local_copy(b"the weights of a service that runs for months")
    os.utime(used, (MONTHS_AGO, MONTHS_AGO))
    assert local_copy(b"the weights of a service that runs for months") == used  # a restart takes it
    written = used.stat().st_mtime
    local_copy(b"another service's weights")  # writes a copy: prunes
    assert used.exists() and used.stat().st_mtime == written  # kept, and its own mtime untouched
    mark = used.with_name(used.name + ".used")
    os.utime(mark, (MONTHS_AGO, MONTHS_AGO))  # not taken since
    local_copy(b"a third service's weights")
    assert not used.exists() and not mark.exists()
