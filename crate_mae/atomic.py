"""Atomic file writes: write to a temp file in the target's folder, then rename over the target.

A reader (or a resumed run) sees either the old file or the complete new one, never a partial one:
rename within one file system is atomic on POSIX, and the temp file is flushed to the disk (fsync) before it takes
the target's name, so that a node that crashes just after the rename does not come back with an empty file. Temp
files are named `.<name>.<random>.tmp`.

A write that fails (a full disk, a quota, a read-only or vanished folder) removes its temp file, leaves the files
already there as they were and raises a `WriteError`: one line naming the file and the cause, e.g.

    cannot write runs/x/ckpt-00000020.pth: the disk is full (812.0 KiB free in runs/x, about 3.1 MiB needed);
    the files already there are unchanged

`atomic_write` hands the writer a file object of ours, so that the system's own error (its errno) is seen even when
the writer would lose it (torch.save writing to a path reports a full disk as `RuntimeError: ... unexpected pos`).
"""
from __future__ import annotations

import errno as errnos
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crate_mae.errors import DiskFullError, WriteError

BUFFER_BYTES = 1 << 20  # atomic_write's buffer: small records are gathered, a tensor's data is written in one call
_DISK_FULL = {errnos.ENOSPC, errnos.EDQUOT, errnos.EFBIG}


def size_text(n: int) -> str:
    """1536 → '1.5 KiB' (as `df -h` counts: powers of 1024)."""
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def free_bytes(folder: Path) -> int | None:
    """Bytes free to this user in `folder`'s file system (None if the folder is gone)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _file_size_limit() -> int | None:
    """This process's file size limit (`ulimit -f`, RLIMIT_FSIZE) in bytes; None where unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def write_error(path: str | os.PathLike, err: OSError | int, *, needed: int | None = None,
                written: int | None = None) -> WriteError:
    """The one-line error for a failed write of `path`, from the system's error (an OSError, or its errno).
    Call it after the temp file is removed: a full disk's free bytes are measured then. `needed`: about the bytes
    the file would have had; `written`: the bytes written before it failed (said where `needed` is not known)."""
    code = err if isinstance(err, int) else err.errno
    path = Path(path)
    folder, where = path.parent, str(path.parent) if str(path.parent) else "."
    head = f"cannot write {path}"
    if code in _DISK_FULL:
        free = free_bytes(folder) if code == errnos.ENOSPC else None
        size = (f"about {size_text(needed)} needed" if needed is not None
                else f"{size_text(written)} written when it failed" if written else "")
        if code == errnos.ENOSPC:
            cause = "the disk is full (" + ", ".join(
                ([f"{size_text(free)} free in {where}"] if free is not None else []) + ([size] if size else [])) + ")"
        elif code == errnos.EDQUOT:
            cause = "the disk quota is exceeded" + (f" ({size})" if size else "")
        else:
            limit = _file_size_limit()
            cause = ("the file size limit is exceeded (" + (f"ulimit -f is {size_text(limit)}" if limit is not None
                                                            else "the largest file this file system takes")
                     + (f", {size})" if size else ")"))
        return DiskFullError(f"{head}: {cause}; the files already there are unchanged", errno=code, free=free,
                             needed=needed)
    causes = {
        errnos.EACCES: f"permission denied (the folder {where} is read-only to this user)",
        errnos.EPERM: f"operation not permitted (the folder {where} or the file is immutable or locked)",
        errnos.EROFS: f"the file system is read-only ({where} is on a read-only mount)",
        errnos.ENOENT: f"the folder {where} no longer exists (removed while the file was written?)",
        errnos.ESTALE: f"the network file system lost the folder {where} (stale file handle)",
        errnos.ENOTDIR: f"a part of {where} is a file, not a folder",
        errnos.EEXIST: f"a part of {where} is a file, not a folder",
        errnos.EISDIR: "a folder of that name is in the way",
        errnos.EIO: "an input/output error (the disk or the network file system failed)",
        errnos.ENAMETOOLONG: "the name is too long for the file system",
        # cannot happen here: the temp file is made in the target's own folder, so the rename never crosses
        errnos.EXDEV: "the temp file and the target are on different file systems",
    }
    strerror = os.strerror(code) if code is not None else "unknown error"
    cause = causes.get(code, strerror[:1].lower() + strerror[1:]) if code is not None else (
        str(err).splitlines()[0] if str(err) else "unknown error")
    return WriteError(f"{head}: {cause}", errno=code)


def _system_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, or the one it was raised from or during (a writer that wraps the system's
    error, as torch's zip writer wraps a failed `write` of our file object in a RuntimeError)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class AtomicFile:
    """A temp file `tmp` beside `path`; `commit()` flushes it to the disk and renames it to `path`, `abort()` removes
    it. A failure to make the temp file, or to commit it, raises a `WriteError` naming `path` (no temp file left)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        except OSError as err:
            raise write_error(self.path, err) from None
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self, *, sync: bool = True) -> None:
        """Rename the temp file to `path` (atomic: the folder's same file system). `sync`: fsync the file first (a
        writer that fsynced it itself passes False); the folder is fsynced afterwards, so that the rename lasts."""
        try:
            if sync:
                fd = os.open(self.tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)  # a network file system may only now report a full disk or quota
                finally:
                    os.close(fd)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(self.tmp, self.path)
        except OSError as err:
            size = self.tmp.stat().st_size if self.tmp.exists() else None
            self.abort()
            raise write_error(self.path, err, needed=size) from None
        _fsync_folder(self.path.parent)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` last through a crash. The file is complete and in place already; some file
    systems refuse to fsync a folder (EINVAL), and then there is nothing more to do, so errors are ignored."""
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


def _nearly_full(folder: Path) -> bool:
    """Whether `folder`'s file system has less free than one more write's worth (1 MiB; 1 % of a small one)."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.free < min(1 << 20, usage.total // 100) + 4096


def _failed(target: AtomicFile, err: BaseException, *, needed: int | None, written: int | None,
            system: OSError | None = None) -> WriteError | None:
    """Remove the temp file of a failed write; the WriteError to raise instead of `err`, or None to let `err`
    through: an interrupt, another file's error (a source the writer read) or one that is not the disk's (a bug
    keeps its traceback). With no system error to go by (a writer that swallowed it, as torch.save writing to a path
    does), the disk is called full when it had (nearly) nothing free as the write failed, or less than `needed`
    once the temp file is gone."""
    if written is None:
        written = target.tmp.stat().st_size if target.tmp.exists() else None
    told = guessed = nearly_full = False
    if isinstance(err, Exception) and not isinstance(err, WriteError):
        system = system or _system_error(err)
        if system is None:
            guessed, nearly_full = True, _nearly_full(target.path.parent)  # measured before the temp file goes
        else:
            told = system.filename is None or os.fspath(system.filename) in (os.fspath(target.tmp),
                                                                              os.fspath(target.path))
    target.abort()
    if told and system is not None:
        return write_error(target.path, system, needed=needed, written=written)
    if guessed:
        free = free_bytes(target.path.parent)
        if nearly_full or (needed is not None and free is not None and free < needed):
            return write_error(target.path, errnos.ENOSPC, needed=needed, written=written)
    return None


@contextmanager
def atomic_path(path: str | os.PathLike, *, needed: int | None = None) -> Iterator[Path]:
    """Yields a temp path beside `path`; on success it becomes `path`, on any error it is removed, and a system
    error of this write (a full disk, a read-only folder, ...) becomes a one-line `WriteError`. `needed`: about the
    bytes the file will have, for the message of a full disk. A writer that takes a file object should use
    `atomic_write`.

        with atomic_path("runs/x/config.yaml") as tmp:
            tmp.write_text(text)
    """
    target = AtomicFile(path)
    try:
        yield target.tmp
    except BaseException as err:
        if (fault := _failed(target, err, needed=needed, written=None)) is not None:
            raise fault from err
        raise
    target.commit()


class RecordingFile:
    """A binary file object that writes through to `file` and keeps the first OSError of its writes (a writer may
    wrap or swallow it) and the bytes written and attempted."""

    def __init__(self, file: Any) -> None:
        self.file, self.written, self.attempted = file, 0, 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        with memoryview(data) as view:
            size = view.nbytes
        self.attempted = self.written + size
        try:
            n = self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.written += n if n is not None else size
        return n if n is not None else size

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def tell(self) -> int:
        return self.written

    def finish(self) -> None:
        """Flush, fsync and close: a full disk that the writes did not report (delayed allocation, a network file
        system) is reported here."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as err:
            self.error = self.error or err
            raise


@contextmanager
def atomic_write(path: str | os.PathLike, *, needed: int | None = None,
                 buffering: int = BUFFER_BYTES) -> Iterator[RecordingFile]:
    """Yields a binary file object writing a temp file beside `path`; on success the file is fsynced and becomes
    `path`. On any error the temp file is removed and the system's error, even one the writer wrapped or swallowed,
    becomes a one-line `WriteError` (a `DiskFullError` with the free bytes and about the bytes needed).

        with atomic_write("runs/x/ckpt-00000020.pth", needed=n) as f:
            torch.save(state, f)
    """
    target = AtomicFile(path)
    try:
        out = RecordingFile(open(target.tmp, "wb", buffering=buffering))
    except OSError as err:
        target.abort()
        raise write_error(target.path, err) from None
    try:
        yield out
        out.finish()
    except BaseException as err:
        try:
            out.file.close()  # may fail again on flushing what is buffered: the first error is the one to tell
        except OSError:
            pass
        needed = max(needed or 0, out.attempted) or None
        if (fault := _failed(target, err, needed=needed, written=out.written, system=out.error)) is not None:
            raise fault from err
        raise
    target.commit(sync=False)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden temp files (`.<name>.<random>.tmp`) that a kill during a write left in `folder`: a whole
    checkpoint's size each at scale. Called by rank 0 when a run starts in its folder; returns what it removed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
