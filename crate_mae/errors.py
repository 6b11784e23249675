"""Every error type of the project: expected failures whose one-line message names the file, key or value at fault.

Every command line (the three stages, `python -m crate_mae.viz`, `python -m crate_mae.data.shards`, the export tool)
prints a `CrateError` as one line `error: ...` and exits with its `exit_status`; anything else (a bug of ours, an error
inside torch, timm or scikit-learn) keeps its traceback, so that it shows where it came from. Each type also derives
from the built-in type it refines, so `except ValueError` in a caller's code keeps working.
"""
from __future__ import annotations

import sys
from typing import Any


class CrateError(Exception):
    """An expected failure, told in one line that names what is at fault."""

    exit_status = 1  # what a command line exits with after printing it
    prefix = "error"  # the word before its line


def report(err: CrateError | StopNow) -> int:
    """The one way a command line ends on an expected failure or stop: `error: <the line>` (`stopped: ...`) on
    stderr; its exit status."""
    print(f"{err.prefix}: {err}", file=sys.stderr, flush=True)
    return err.exit_status


class ConfigError(CrateError, ValueError):
    """A configuration value (or command-line argument) at fault; the message names the key."""

    exit_status = 2  # as argparse exits for a bad argument


class CheckpointError(CrateError, ValueError):
    """A weight or run file that cannot be used: unreadable, of no known layout, of another family or
    architecture, or with a tensor that does not fit the model (the key and both shapes named)."""


class MissingFileError(CrateError, FileNotFoundError):
    """A file the run needs is not there (the path named)."""


class RunFolderError(CrateError, FileExistsError):
    """A run folder already holds another run's results, or another live run holds it."""


class InputError(CrateError, ValueError):
    """An input of impossible shape for the model: an image side the patch does not divide, a stride off the grid."""


class ShardError(CrateError, ValueError):
    """A shard set that cannot be read or written as asked: the message names the path at fault."""


class DataError(CrateError, RuntimeError):
    """Too much of the data is bad to go on, or the data is wrong in a way that skipping would hide."""


class NonFiniteLoss(CrateError, RuntimeError):
    """The loss became NaN or infinite."""


class WriteError(CrateError, OSError):
    """A file that could not be written, in one line naming it and the cause; `errno` is the system's error number
    (None where the writer lost it). An OSError too, so that `except OSError` in a caller keeps working."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)  # one argument: str() is the message alone, not "[Errno 28] ..."
        self.errno = errno

    def __reduce__(self) -> tuple[Any, ...]:  # keep errno (and free/needed) through pickling, e.g. to other ranks
        return type(self), (str(self),), {"errno": self.errno, **self.__dict__}


class DiskFullError(WriteError):
    """No room for the file (ENOSPC, EDQUOT, EFBIG). `free`: bytes free in the folder once the temp file was removed;
    `needed`: about the bytes the file would have had (None where not known)."""

    def __init__(self, message: str, *, errno: int | None = None, free: int | None = None,
                 needed: int | None = None) -> None:
        super().__init__(message, errno=errno)
        self.free, self.needed = free, needed


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the job stopped early and can be run again (with --resume auto)
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports after Ctrl-C


def exit_status(signal_name: str | None) -> int:
    """The status of a run stopped by `signal_name`: 130 after Ctrl-C (SIGINT), else 75 (resumable)."""
    return INTERRUPTED_EXIT if signal_name == "SIGINT" else PREEMPTED_EXIT


class StopNow(BaseException):
    """A stop signal outside a training loop: the run stops where it is. A BaseException, as KeyboardInterrupt, so
    that nothing on the way out swallows it (`atomic_path` removes its temp file; the lock and logger are closed)."""

    prefix = "stopped"

    def __init__(self, message: str, *, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Preempted(CrateError):
    """The run stopped at a step boundary on request (a signal or Ctrl-C), after saving a checkpoint there;
    `exit_status` 75 (resumable) or 130 (Ctrl-C)."""

    prefix = "stopped"

    def __init__(self, message: str, *, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
