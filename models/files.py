"""Writing a file so that a reader never sees it half-written."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
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


STALE_ASIDE_S = 86_400.0  # a temporary file beside its output this old was left by a kill: no save takes a day


def aside_of(path: Path) -> Path:
    """A temporary file of its own beside ``path``, for ``written_aside``: with one fixed name, two writers of one
    path (two trainings to one --out) wrote one temporary file at once, and one renamed the other's, or half of it.
    Its mode is the umask's, as a plain open's (mkstemp's 0600 was left on the file renamed into place); ones a
    kill left there a day ago are removed (each kill left one the size of the model)."""
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_ASIDE_S:
                stale.unlink()
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


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
