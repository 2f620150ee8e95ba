"""models/files.py:written_aside, which every checkpoint, export and clip is written through: atomic, and on disk
before the rename (after a power loss a renamed file whose data was never synced can be empty, on filesystems
without ext4's rename heuristic: a checkpoint lost where the old one would have stayed)."""

from __future__ import annotations

import os

import pytest

from models import files


def test_the_new_content_is_synced_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    path, tmp = tmp_path / "model.safetensors", tmp_path / "model.safetensors.tmp"
    path.write_bytes(b"old")
    calls = []
    real_fsync, real_replace = os.fsync, type(tmp).replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(self, target):
        calls.append(("rename", str(self)))
        return real_replace(self, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(type(tmp), "replace", replace)
    with files.written_aside(path, tmp) as out:
        out.write_bytes(b"new")
    assert path.read_bytes() == b"new" and not tmp.exists()
    assert calls == [("fsync", str(tmp)), ("rename", str(tmp)), ("fsync", str(tmp_path))], calls


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path, tmp = tmp_path / "a.bin", tmp_path / "a.bin.tmp"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.written_aside(path, tmp) as out:
        out.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and not tmp.exists()
