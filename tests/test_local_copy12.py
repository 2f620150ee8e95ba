"""A replica's local copy of the checkpoint (workers/inference.py:local_copy) is its own and holds exactly the
checkpoint: in the node's shared temp dir another user's copy (mode 0600) of the same weights could not be read,
and any file of the right size and name there was loaded as the model."""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

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


def test_a_folder_of_that_name_open_to_others_is_closed_and_one_not_ours_is_passed_by(temp_dir, monkeypatch):
    """A folder of this user's that others may write to (made under another umask) is closed to them; where the name
    is a symlink or another user's folder (anyone may take it first), the cache's checkpoints folder is used.
    (The first version took a fresh temp folder at each start, and a crash-looping replica left a copy of the
    checkpoint behind at each restart; the second refused, and anyone could stop every replica: the reviews.)"""
    monkeypatch.setenv("HYDRAVISION_CACHE", str(temp_dir / "cache"))
    shared = temp_dir / f"hydravision-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    path = local_copy(WEIGHTS)
    assert path.parent == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700
    assert path.read_bytes() == WEIGHTS
    target = temp_dir / "elsewhere"
    target.mkdir()
    for f in shared.iterdir():
        f.unlink()
    shared.rmdir()
    shared.symlink_to(target)  # a link to a folder chosen by whoever made it
    path = local_copy(WEIGHTS)
    assert path.parent == temp_dir / "cache" / "checkpoints" and list(target.iterdir()) == []
    assert path.read_bytes() == WEIGHTS and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert local_copy(WEIGHTS) == path  # the next start takes that copy: nothing more is left behind


def test_a_copy_with_another_name_is_not_taken(temp_dir):
    """A hard link to the copy (planted while the folder was open to others) could change under the model's load."""
    path = local_copy(WEIGHTS)
    os.link(path, temp_dir / "planted")
    assert local_copy(WEIGHTS) == path and path.stat().st_nlink == 1  # written again: the link holds the old file


def test_a_large_copy_is_compared_a_chunk_at_a_time():
    from workers.inference import _holds

    data = bytes(range(256)) * 10_000
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        assert _holds(Path(f.name), data, chunk=4096)
        assert not _holds(Path(f.name), data[:-1] + b"x", chunk=4096)
        assert not _holds(Path(f.name), data + b"x", chunk=4096)


def test_a_usable_temp_folder_needs_no_home(temp_dir, monkeypatch):
    """Where HOME is unset and the uid has no passwd entry (an arbitrary-uid container), Path.home() raises: it was
    asked at every start, also where the temp dir's folder was fine (the third review)."""
    from pathlib import Path as P

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("HYDRAVISION_CACHE", raising=False)
    monkeypatch.setattr(P, "home", staticmethod(no_home))
    assert local_copy(WEIGHTS).parent == temp_dir / f"hydravision-{os.getuid()}"
