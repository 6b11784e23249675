"""One run at a time in a run folder: the first makes `run.lock` (O_CREAT|O_EXCL: one process wins, also on NFS) and
holds it until it ends; another is refused in one line naming the holder. A dead run's lock is taken over in one line
(`took_over`): this scheduler job's (`SLURM_JOB_ID`, else `TORCHELASTIC_RUN_ID`: a requeue after a hard kill, on any
node) unless its process lives here, or this host's whose process is gone; any other is refused with the manual way."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from crate_mae.errors import RunFolderError

LOCK_NAME = "run.lock"
_OTHER = "or start this one elsewhere with --set run.name=NAME"


def job_id() -> str | None:
    """The scheduler job this process runs in, which a requeue keeps (torchrun's is 'none' without --rdzv-id)."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return job if job not in (None, "", "none") else None


def describe(holder: dict[str, Any]) -> str:
    """'pretrain pid 4711 on host node7 (user ana, job 123), started 2025-01-02 03:04:05+0100: `pretrain.py ...`'"""
    job = f", job {holder['job']}" if holder.get("job") else ""
    text = (f"{holder.get('stage') or 'a run'} pid {holder['pid']} on host {holder['host']} (user "
            f"{holder.get('user', '?')}{job}), started {holder.get('started', '?')}: `{holder.get('command', '?')}`")
    return "".join(c if c.isprintable() else " " for c in text)  # a hand-edited newline: still one line


class RunLock:
    """This process's hold on a run folder, from `acquire` until `release`."""

    def __init__(self, path: Path, holder: dict[str, Any], created: bool, took_over: str | None) -> None:
        self.path, self.run_dir, self.holder, self.pid = path, path.parent, holder, os.getpid()
        self.created, self.took_over = created, took_over  # took_over: the line naming the dead lock replaced

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, *, stage: str = "") -> RunLock:
        """Hold `run_dir` (made if missing), taking a dead run's lock over; else a RunFolderError, one line."""
        path, created = Path(run_dir) / LOCK_NAME, not Path(run_dir).exists()
        me = {"host": socket.gethostname(), "pid": os.getpid(), "user": os.environ.get("USER") or f"uid {os.getuid()}",
              "job": job_id(), "started": time.strftime("%Y-%m-%d %H:%M:%S%z"), "stage": stage,
              "command": " ".join(sys.argv)[:200], "token": os.urandom(8).hex()}  # token: no two locks are equal
        try:
            for _ in range(100):  # a round ends with the lock taken, or with another's looked at again
                path.parent.mkdir(parents=True, exist_ok=True)
                if _create(path, me):
                    return cls(path, me, created, None)
                dead = _read(path)
                if dead is not None and (why := _why_dead(path, dead)) and _take_over(path, dead, me):
                    return cls(path, me, created, f"run folder lock: took over {path} from {describe(dead)}: {why}")
        except RunFolderError:
            raise
        except OSError as err:  # read-only, not a folder, another user's: one line, no traceback
            raise RunFolderError(f"{path.parent}: cannot write in the run folder ({err.strerror or err}): make it "
                                 f"writable, or choose another with --set run.out_dir=DIR or run.name=NAME") from None
        raise RunFolderError(f"{path} was not taken in 100 tries; if no run uses {path.parent}, delete {path} and the "
                             f".run.lock.*.claim files beside it, {_OTHER}")

    def release(self) -> None:
        """Remove the lock if it is still this run's, and the folder if this run made it and left it empty; once."""
        if os.getpid() != self.pid:
            return
        self.pid = None
        try:
            if _read(self.path) != self.holder:
                raise OSError("it is no longer this run's")
            self.path.unlink()
            if self.created and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # a run that failed before writing anything
        except OSError as err:  # never hides how the run ended (release runs in its `finally`)
            print(f"warning: could not release {self.path} ({err}); delete it if no run writes into {self.run_dir}",
                  file=sys.stderr, flush=True)


def _read(path: Path, again: bool = True) -> dict[str, Any] | None:
    """The holder the lock names (None: no lock); a RunFolderError when none can be read (empty, garbled, another
    user's, a folder), also a moment later (it may have been being written)."""
    try:
        holder = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        holder = None
    if not (isinstance(holder, dict) and isinstance(holder.get("host"), str) and type(holder.get("pid")) is int
            and 0 < holder["pid"] < 1 << 31):  # a pid ≤ 0 would signal a process group
        if again:
            time.sleep(0.1)
            return _read(path, again=False)
        raise RunFolderError(f"{path.parent} is in use by another run, whose lock {path} names no run this user can "
                             f"read; if no run uses the folder, delete {path}, {_OTHER}")
    return holder


def _why_dead(path: Path, holder: dict[str, Any]) -> str:
    """Why the lock of `holder` is a dead run's; a RunFolderError in one line when that run lives, or may."""
    here, pid = holder["host"] == socket.gethostname(), holder["pid"]
    try:
        alive = os.kill(pid, 0) is None  # signal 0 only asks whether the pid exists (None: it does)
    except OSError as err:
        alive = isinstance(err, PermissionError)  # another user's process: it exists
    if here and alive:
        how = f"still running on this machine; wait for it to end, stop it (kill {pid})"
    elif holder.get("job") and holder["job"] == job_id():
        return f"it is this job's own (job {holder['job']}), started again after its run ended"
    elif here:
        return f"its process {pid} is gone (the run was killed or crashed)"
    else:
        how = f"on another machine; if that run is dead, delete {path} to take the folder over"
    raise RunFolderError(f"{path.parent} is in use by another run: {describe(holder)}, {how}, {_OTHER}")


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Make `path` naming `holder` if there is none (O_CREAT|O_EXCL: of all the processes trying, one makes it)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f, indent=1)
    return True


def _take_over(path: Path, dead: dict[str, Any], me: dict[str, Any]) -> bool:
    """Put the lock of `me` in the place of the dead lock of `dead`, if it is still there. Only the run that makes
    the dead lock's claim file changes it: none removes a lock another has just put in its place."""
    claim = path.with_name(f".{path.name}.{hashlib.sha1(json.dumps(dead, sort_keys=True).encode()).hexdigest()}.claim")
    if not _create(claim, me):  # another run is taking it over: look again
        time.sleep(0.01)
        return False
    try:
        if _read(path) != dead:
            return False
        os.replace(claim, path)
        return True
    finally:
        claim.unlink(missing_ok=True)
