"""Writing a file so that a reader never sees it half-written."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def written_aside(path: Path, tmp: Path) -> Iterator[Path]:
    """Yields ``tmp`` to write ``path``'s new content into; renames it over ``path`` when the block ends (atomic:
    a crash mid-write leaves the old file), and removes it when the block fails (an error, a full disk,
    Ctrl-C: no half-written temporary left beside the output either)."""
    try:
        yield tmp
        # on disk before the rename: after a power loss a renamed file can be empty where its data was not
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        _fsync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_identity(path: str | Path) -> tuple[int, int, int]:
    """What tells a file replaced (its inode) or rewritten in place (its size, its modification time in ns)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _fsync_folder(folder: Path) -> None:
    """The rename itself on disk; a filesystem that cannot sync a folder is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
