"""A replica's local copy of the checkpoint (workers/inference.py:local_copy) is its own and holds exactly the
checkpoint: in the node's shared temp dir another user's copy (mode 0600) of the same weights could not be read,
and any file of the right size and name there was loaded as the model."""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile

import pytest

from workers.inference import local_copy

WEIGHTS = b"weights of the model"
NAME = f"hydravision-{hashlib.sha256(WEIGHTS).hexdigest()[:20]}.safetensors"


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_file_of_the_same_name_and_size_is_not_taken_for_the_checkpoint(temp_dir):
    planted = b"x" * len(WEIGHTS)
    for folder in (temp_dir, temp_dir / f"hydravision-{os.getuid()}"):  # where it was, where it is now
        folder.mkdir(exist_ok=True, mode=0o700)
        (folder / NAME).write_bytes(planted)
    path = local_copy(WEIGHTS)
    assert path.read_bytes() == WEIGHTS
    assert local_copy(WEIGHTS) == path  # the next start takes that copy


def test_the_copy_lives_in_a_folder_only_its_user_can_enter(temp_dir):
    path = local_copy(WEIGHTS)
    assert path.parent != temp_dir
    st = path.parent.lstat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def test_a_folder_of_that_name_others_can_write_to_is_not_used(temp_dir):
    shared = temp_dir / f"hydravision-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # e.g. made by someone else's umask, or on purpose
    path = local_copy(WEIGHTS)
    assert path.parent != shared and path.read_bytes() == WEIGHTS
    target = temp_dir / "elsewhere"
    target.mkdir()
    shared.rmdir()
    shared.symlink_to(target)  # a link to a folder chosen by whoever made it
    path = local_copy(WEIGHTS)
    assert target not in path.parents and path.read_bytes() == WEIGHTS
