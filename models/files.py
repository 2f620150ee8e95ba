"""Writing a file so that a reader never sees it half-written."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def written_aside(path: Path, tmp: Path) -> Iterator[Path]:
    """Yields ``tmp`` to write ``path``'s new content into; renames it over ``path`` when the block ends (atomic:
    a crash mid-write leaves the old file), and removes it when the block fails (an error, a full disk,
    Ctrl-C: no half-written temporary left beside the output either)."""
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
