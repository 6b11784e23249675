"""Atomic file writes: write to a temp file in the target's folder, then rename over the target.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial one:
rename within one file system is atomic on POSIX. Temp files are named `.<name>.<random>.tmp`.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class AtomicFile:
    """A temp file `tmp` beside `path`; `commit()` renames it to `path`, `abort()` removes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path`; on success it becomes `path`, on any error it is removed.

        with atomic_path("runs/x/ckpt.pth") as tmp:
            torch.save(state, tmp)
    """
    target = AtomicFile(path)
    try:
        yield target.tmp
        target.commit()
    except BaseException:
        target.abort()
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden temp files (`.<name>.<random>.tmp`) that a kill during a write left in `folder`: a whole
    checkpoint's size each at scale. Called by rank 0 when a run starts in its folder; returns what it removed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
