"""Atomic writes: a temp file `.<name>.<random>.tmp` beside the target, fsynced, renamed over it (a reader sees the old
file or the whole new one). A failed write removes its temp file and raises one line naming the file and the cause,
a `WriteError`; with no room (ENOSPC, EDQUOT, EFBIG) a `DiskFullError`: `cannot write runs/x/ckpt-00000020.pth: the
disk is full (812.0 KiB free in runs/x, about 3.1 MiB needed); the files already there are unchanged`."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from crate_mae.errors import DiskFullError, WriteError


def size_text(n: int) -> str:
    """1536 → '1.5 KiB' (powers of 1024, as `df -h` counts)."""
    power = min(4, max(0, (n.bit_length() - 1) // 10))
    return f"{n} bytes" if power == 0 else f"{n / 1024 ** power:.1f} {'KMGT'[power - 1]}iB"


def write_error(path: str | os.PathLike, code: int | None, *, needed: int | None = None) -> WriteError:
    """The one line for a failed write of `path` with the system's error number `code`, made once the temp file is
    removed (the free bytes count its space); `needed`: about the bytes the file would have had."""
    path, cause = Path(path), os.strerror(code) if code is not None else "unknown error"
    cause = "the disk is full" if code == errno.ENOSPC else cause[:1].lower() + cause[1:]
    if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return WriteError(f"cannot write {path}: {cause}", errno=code)
    free = None
    with suppress(OSError):  # the folder may be gone
        free = shutil.disk_usage(path.parent).free
    sizes = ([f"{size_text(free)} free in {path.parent}"] if free is not None else []) + (
        [f"about {size_text(needed)} needed"] if needed else [])
    return DiskFullError(f"cannot write {path}: {cause} ({', '.join(sizes)}); the files already there are unchanged",
                         errno=code, free=free, needed=needed)


class AtomicFile:
    """A temp file `tmp` beside `path` (with a new file's permissions); `commit()` fsyncs it and renames it to `path`,
    `abort()` removes it. Failing to make or to commit it raises a `WriteError` naming `path`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.urandom(6).hex()}.tmp")
        try:
            with suppress(FileExistsError):  # a file where the folder should be: the open says so (not a directory)
                self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except OSError as err:
            raise write_error(self.path, err.errno) from None

    def commit(self, *, needed: int | None = None) -> None:
        try:
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())  # a network file system may only now report a full disk
            os.replace(self.tmp, self.path)
        except OSError as err:
            raise self.failed(err, needed) from None

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def failed(self, err: BaseException, needed: int | None) -> WriteError | None:
        """Remove the temp file after `err`; the WriteError to raise instead (the OSError found along the chain: torch
        wraps it), or None when `err` is not this write's (an interrupt, another file's error, a bug)."""
        cause = err
        while isinstance(cause, Exception) and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        ours = isinstance(cause, OSError) and not isinstance(cause, WriteError) and cause.filename in (
            None, str(self.tmp), self.tmp)
        self.abort()
        return write_error(self.path, cause.errno, needed=needed) if ours else None


@contextmanager
def atomic_path(path: str | os.PathLike, *, needed: int | None = None) -> Iterator[Path]:
    """Yields a temp path beside `path`, which becomes `path` on success and is removed on any error; a system error of
    this write becomes a one-line `WriteError`. `needed`: about the bytes the file will have (said when no room)."""
    target = AtomicFile(path)
    try:
        yield target.tmp
    except BaseException as err:
        if (fault := target.failed(err, needed)) is None:
            raise
        raise fault from err
    target.commit(needed=needed)


@contextmanager
def atomic_write(path: str | os.PathLike, *, needed: int | None = None) -> Iterator[BinaryIO]:
    """`atomic_path` with the temp file open for writing, closed before it is committed (`torch.save(state, f)`)."""
    with atomic_path(path, needed=needed) as tmp, open(tmp, "wb") as f:
        yield f


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files (`.<name>.<random>.tmp`) a kill during a write left in `folder` (a whole checkpoint's
    size each at scale): rank 0 does, when a run starts in its folder. Returns what it removed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
