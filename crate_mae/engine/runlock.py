"""The run folder's lock: one run at a time writes into a run folder, whichever machine it runs on.

Two runs started into one folder (a job submitted twice, the same run.name on two machines sharing a file system)
would both train to the end, each overwriting the other's checkpoints, logs and encoder.pth. The first to start holds
`<run folder>/run.lock` until it ends, however it ends; another one is refused with one line naming the holder.

    lock = RunLock.acquire(run_dir, stage="pretrain")  # RunFolderError: the folder is another live run's
    try:
        ...                                             # the run; lock.took_over says whose dead lock it replaced
    finally:
        lock.release()

**The file.** JSON naming the holder (host, pid, user, start time, stage, command line), and what tells a dead holder
from a live one: a random token, the machine's boot id, the pid namespace, the process's start time (in clock ticks
since boot, /proc/<pid>/stat), so that a pid reused by another program does not pass for the holder.

**Taking it** is atomic across processes and machines sharing a file system, with no fcntl/flock: advisory locks
are unsupported or silently local on many NFS mounts (and on Lustre or GPFS without the right mount option), and one
a killed client held can outlive it on the server. Instead the holder's info is written whole (fsync'd) into a
unique temp file beside the lock, then hard-linked to `run.lock`: link(2) fails when the name exists, atomically on
a local file system and on NFS alike (the method open(2) gives for lock files on NFS; a link whose reply NFS lost
is told by the temp file's link count of 2). A reader thus never sees a half-written lock. On a file system without
hard links, O_CREAT|O_EXCL creates the lock and the info is written after it.

**A dead holder's lock is taken over**, with a line that says whose and why (`took_over`):
- on the same machine (same host name, boot id and pid namespace) when the holder's pid is gone, a zombie, or a
  program started at another time (a reused pid). A live holder is never taken over, however long it has been
  silent: a suspended job (Ctrl-Z, SLURM's suspend) goes on when it is resumed.
- from another machine (or another container: its pids are not ours to check) when the file's mtime, which the
  holder touches every HEARTBEAT seconds from a daemon thread, is older than STALE_AFTER (10 min). The age is
  measured on the file system's own clock (the temp file just written against the lock's mtime), so the two
  machines' clocks need not agree; 10 min is far above NFS's attribute caching (≤ 60 s) and a beat missed in a
  long stall. Until then the refusal says how to clear the lock by hand if that run is known dead.
- empty or not JSON (a crash between O_EXCL's create and its write, or a file damaged by hand): once its mtime is
  UNREADABLE_GRACE (10 s) old, as its holder writes it within microseconds of creating it; before that it is waited
  for (it may be one being written).

**Taking over is race-free**, among any number of runs starting at once: only the holder of a second, short-lived
lock, `.run.lock.takeover` (taken by the same link), may remove a stale lock, and only after checking, while it holds
it, that the lock is still the very file judged stale (same bytes, same inode): so no run ever removes a lock that
another has just taken. Then every contender tries the link again, and one wins. (A contender killed in the few
microseconds it holds the takeover lock leaves it behind: it is removed once its pid is gone, or after
TAKEOVER_STALE on another machine, by a rename to a unique name checked against what was judged.)

**Release** (however the run ends: the caller's `finally`) stops the heartbeat, removes the lock if it is still
this run's, and removes the run folder again if this run created it and left it empty (a run that failed before
writing anything). A process killed outright leaves its lock behind: dead on this machine, it is taken over at
once; on another machine, after STALE_AFTER.
"""
from __future__ import annotations

import errno
import getpass
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from crate_mae.errors import RunFolderError

LOCK_NAME = "run.lock"
HEARTBEAT = 30.0  # seconds between the holder's touches of the lock file
STALE_AFTER = 600.0  # a lock from another machine untouched this long is a dead run's
UNREADABLE_GRACE = 10.0  # an empty or garbled lock this old is a crashed start's
TAKEOVER_STALE = 30.0  # the takeover lock is held for microseconds: this old, from another machine, it is a dead one's
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV}  # link(2) not supported here
_ATTEMPTS = 10_000  # rounds of link → judge → take over: only runs starting and ending without pause come near it


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a run folder: what the refusal names, and what tells whether that run still lives."""

    token: str  # random: this very lock, whoever else writes a file with the same host and pid
    host: str
    pid: int
    user: str
    started: str  # local time with its UTC offset, as a person reads it
    stage: str
    command: str
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id: the same machine since its last boot
    pid_ns: str = ""  # /proc/self/ns/pid: the same pid namespace (a container has its own)
    proc_start: int | None = None  # the process's start in clock ticks since boot (/proc/<pid>/stat field 22)

    @classmethod
    def this_process(cls, stage: str) -> Holder:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a container's uid with no passwd entry
            user = str(os.getuid())
        return cls(token=secrets.token_hex(16), host=socket.gethostname(), pid=os.getpid(), user=user,
                   started=datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"), stage=stage,
                   command=shlex.join(sys.argv), boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
                   pid_ns=_readlink("/proc/self/ns/pid"), proc_start=_process_start(os.getpid()))

    def to_bytes(self) -> bytes:
        return (json.dumps({"lock": "crate-mae run folder", **asdict(self)}, indent=1) + "\n").encode()

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock file names, or None when it is empty or garbled (no JSON object with a host and a pid)."""
        try:
            data = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("host"), str) or type(data.get("pid")) is not int \
                or not 0 < data["pid"] < 1 << 31:  # 0 or below would signal a process group; above, no pid at all
            return None
        text = {k: str(data.get(k, "?")) for k in ("token", "user", "started", "stage", "command")}
        start = data.get("proc_start")
        return cls(host=data["host"], pid=data["pid"], boot_id=str(data.get("boot_id") or ""),
                   pid_ns=str(data.get("pid_ns") or ""), proc_start=start if type(start) is int else None, **text)

    def same_machine(self, other: Holder) -> bool:
        """Whether this holder's pid can be checked from `other`'s process: the same host name, boot id and pid
        namespace (the last two empty on both where there is no /proc). Two machines or containers given one host name
        differ in these."""
        return self.host == other.host and self.boot_id == other.boot_id and self.pid_ns == other.pid_ns

    def describe(self) -> str:
        """'pretrain pid 4711 on host node7 (user ana), started 2025-01-02 03:04:05+01:00: `pretrain.py --set ...`'"""
        command = self.command if len(self.command) <= 100 else self.command[:97] + "..."
        return _one_line(f"{self.stage or 'a run'} pid {self.pid} on host {self.host} (user {self.user}), started "
                         f"{self.started}: `{command}`")


@dataclass(frozen=True)
class _Seen:
    """A lock file as read once: its bytes, its holder (None: empty or garbled), its inode and mtime."""

    raw: bytes
    holder: Holder | None
    ino: int
    mtime: float
    owner: int
    readable: bool = True  # False: another user's, which this one may not read


class RunLock:
    """This process's hold on a run folder (`acquire`), kept fresh by a heartbeat thread until `release`."""

    def __init__(self, run_dir: Path, holder: Holder, raw: bytes, *, created: bool, took_over: str | None,
                 heartbeat: float) -> None:
        self.run_dir, self.path, self.holder, self.raw = run_dir, run_dir / LOCK_NAME, holder, raw
        self.created = created  # this run made the folder: it removes it again if it leaves it empty
        self.took_over = took_over  # the line saying whose dead lock this one replaced, or None
        self.lost: str | None = None  # set by the heartbeat when the file is no longer this run's
        self._stop = threading.Event()
        self._released = False
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat,), name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, *, stage: str = "", heartbeat: float = HEARTBEAT,
                stale_after: float = STALE_AFTER, unreadable_grace: float = UNREADABLE_GRACE) -> RunLock:
        """Hold `run_dir` (made if missing) for this process, taking over a dead run's lock; a RunFolderError in one
        line when a live run holds it, or when the folder cannot be written."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        created = not run_dir.exists()
        me = Holder.this_process(stage)
        raw = me.to_bytes()
        took_over = None
        for _ in range(_ATTEMPTS):
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                taken, now = _link_new(path, raw)
                if taken:
                    return cls(run_dir, me, raw, created=created, took_over=took_over, heartbeat=heartbeat)
                seen = _read(path)
                if seen is None:  # released between the link and the read: try again
                    continue
                age = now - seen.mtime
                why = _stale(seen, me, age, stale_after=stale_after, unreadable_grace=unreadable_grace)
                if why is None:
                    if seen.holder is None and seen.readable:  # maybe one being written: wait for it to fill or age
                        time.sleep(min(0.1, unreadable_grace / 10))
                        continue
                    raise RunFolderError(_refusal(run_dir, path, seen, me, age, stale_after))
                if _remove_stale(path, seen, me, raw):
                    whose = f"from {seen.holder.describe()}" if seen.holder is not None else "(no holder named in it)"
                    took_over = f"run folder lock: took over {path} {whose}: {why}"
                # then link again: of all the contenders, one gets it
            except RunFolderError:  # a FileExistsError, so an OSError too: it is the line already
                raise
            except FileNotFoundError:  # the folder vanished meanwhile (a failed start removing its empty folder)
                continue
            except OSError as err:  # read-only, not a folder, full, another user's: one line, no traceback
                raise RunFolderError(_unwritable(run_dir, err)) from None
        raise RunFolderError(f"{path}: could not take the run folder's lock after {_ATTEMPTS} attempts (runs starting "
                             f"and ending in it without pause); start this one with --set run.name=NAME")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's; remove the run folder if this run made
        it and left it empty. Idempotent; a forked child (a DataLoader worker) does nothing."""
        if self._released or os.getpid() != self.holder.pid:
            return
        self._released = True
        self._stop.set()
        self._beat.join(timeout=5)
        try:
            seen = _read(self.path)
            if seen is not None and seen.raw == self.raw:
                self.path.unlink(missing_ok=True)  # none takes a live run's lock over, so it is still this one
            elif self.lost is None:
                self._warn_lost(seen)
        except (OSError, RunFolderError) as err:  # never hides how the run ended (release runs in its `finally`)
            print(f"warning: could not release {self.path} ({err}): delete it, this run is over", file=sys.stderr,
                  flush=True)
        if self.created:
            try:
                self.run_dir.rmdir()  # only when empty: a run that failed before writing anything
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _heartbeat(self, every: float) -> None:
        """Touch the lock every `every` seconds (its mtime: how another machine tells this run lives), checking it is
        still this run's; a failed touch (an NFS hiccup) is tried again at the next beat."""
        while not self._stop.wait(every):
            try:
                seen = _read(self.path)
            except (OSError, RunFolderError):  # an NFS hiccup: look again at the next beat
                continue
            if seen is None or seen.raw != self.raw:
                if not self._stop.is_set():
                    self._warn_lost(seen)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _warn_lost(self, seen: _Seen | None) -> None:
        now = "it was removed" if seen is None else \
            f"it is now {seen.holder.describe()}'s" if seen.holder is not None else "it was replaced"
        self.lost = (f"warning: {self.path} is no longer this run's lock ({now}): another run may be writing into "
                     f"{self.run_dir}")
        print(self.lost, file=sys.stderr, flush=True)


def _link_new(path: Path, raw: bytes) -> tuple[bool, float]:
    """Try to create `path` holding `raw`, whole or not at all: (taken, the file system's time now)."""
    candidate = path.with_name(f".{path.name.lstrip('.')}.{secrets.token_hex(8)}.tmp")  # a kill's: atomic.py removes it
    fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # the umask applies: others may read who holds
    try:
        try:
            os.write(fd, raw)
            os.fsync(fd)
            now = os.fstat(fd).st_mtime  # set by the file system (the NFS server's clock), as the lock's is
        finally:
            os.close(fd)
        try:
            os.link(candidate, path)
            return True, now
        except FileExistsError:
            return os.stat(candidate).st_nlink == 2, now  # 2: linked, only the NFS reply was lost
        except OSError as err:
            if err.errno not in _NO_LINKS:
                raise
        try:  # no hard links here: create exclusively, then write (a crash in between leaves an empty lock)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False, now
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True, now
    finally:
        candidate.unlink(missing_ok=True)


def _read(path: Path) -> _Seen | None:
    """The lock file as it is now, or None when there is none. Opening it revalidates NFS's cached attributes."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(1 << 16)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise RunFolderError(f"{path} is a folder, not a run's lock file: remove it") from None
    except PermissionError:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return _Seen(b"", None, st.st_ino, st.st_mtime, st.st_uid, readable=False)
    return _Seen(raw, Holder.parse(raw), st.st_ino, st.st_mtime, st.st_uid)


def _stale(seen: _Seen, me: Holder, age: float, *, stale_after: float, unreadable_grace: float) -> str | None:
    """Why the lock `seen` (touched `age` seconds ago) is a dead run's, or None while its holder may live."""
    holder = seen.holder
    if holder is None:
        if not seen.readable:  # another user's: its heartbeat still tells
            return f"untouched for {_span(age)} (a run elsewhere touches it every {HEARTBEAT:g} s)" \
                if age > stale_after else None
        what = "empty" if not seen.raw.strip() else "garbled (no JSON naming a host and a pid)"
        return f"it has been {what} for {_span(age)} (a run killed while taking it)" if age > unreadable_grace else None
    if holder.same_machine(me):
        state = _process_state(holder.pid, holder.proc_start)
        return None if state is None else f"{state} (the run was killed or crashed)"
    if age > stale_after:
        return f"untouched for {_span(age)} (a live run touches it every {HEARTBEAT:g} s)"
    return None


def _process_state(pid: int, start: int | None) -> str | None:
    """None while `pid` is the same live process; else what became of it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} is gone"
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        if state in "ZX":
            return f"its process {pid} has exited"
        if start is not None and started != start:
            return f"pid {pid} now belongs to another program"
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of `pid` from /proc, or None where there is no /proc (macOS)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name in parentheses may hold spaces
    try:
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (IndexError, ValueError):
        return None


def _process_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat is not None else None


def _remove_stale(path: Path, seen: _Seen, me: Holder, raw: bytes) -> bool:
    """Remove the stale lock `seen` while holding the takeover lock, if it is still that very file; False when
    another contender holds the takeover lock (it is waited for) or the lock changed meanwhile."""
    baton = path.with_name(f".{path.name}.takeover")
    taken, now = _link_new(baton, raw)
    if not taken:
        held = _read(baton)
        if held is not None and _stale(held, me, now - held.mtime, stale_after=TAKEOVER_STALE,
                                       unreadable_grace=TAKEOVER_STALE) is not None:
            _remove_if_same(baton, held)  # its holder died in the middle of a takeover
        else:
            time.sleep(0.005)  # another run is taking the lock over: see what it leaves
        return False
    try:
        current = _read(path)
        if current is None or current.raw != seen.raw or current.ino != seen.ino:
            return False
        path.unlink()  # only the takeover lock's holder removes a lock, and this one still is the stale file
        return True
    finally:
        mine = _read(baton)
        if mine is not None and mine.raw == raw:
            baton.unlink(missing_ok=True)


def _remove_if_same(path: Path, seen: _Seen) -> bool:
    """Remove `path` (a dead contender's takeover lock) if it is still the very file `seen` (same bytes, same inode):
    rename it to a unique name first (atomic: of two runs doing this, one gets it), check, remove; a newer one moved
    by mistake goes back."""
    grave = path.with_name(f".{path.name}.{secrets.token_hex(8)}.stale")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    moved = _read(grave)
    if moved is not None and moved.raw == seen.raw and moved.ino == seen.ino:
        grave.unlink(missing_ok=True)
        return True
    try:  # a lock taken since it was judged: put it back where its holder's heartbeat looks
        os.link(grave, path)
    except OSError as err:
        if err.errno in _NO_LINKS:
            os.replace(grave, path)
    grave.unlink(missing_ok=True)
    return False


def _refusal(run_dir: Path, path: Path, seen: _Seen, me: Holder, age: float, stale_after: float) -> str:
    """The one line refusing a run: who holds the folder, and what to do."""
    other = " or start this one elsewhere with --set run.name=NAME"
    holder = seen.holder
    if holder is None:
        return (f"{run_dir} is in use by another run: its lock {path} belongs to uid {seen.owner} and cannot be read "
                f"by this user (touched {_span(max(age, 0))} ago); if that run is dead, delete {path},{other}")
    if holder.same_machine(me):
        return (f"{run_dir} is in use by another run: {holder.describe()}, still running on this machine; wait for "
                f"it to end, stop it (kill {holder.pid}),{other}")
    return (f"{run_dir} is in use by another run: {holder.describe()}, its lock touched {_span(max(age, 0))} ago; if "
            f"that run is dead, delete {path} (taken over by itself after {_span(stale_after)} untouched),{other}")


def _unwritable(run_dir: Path, err: OSError) -> str:
    return (f"{run_dir}: cannot write in the run folder ({err.strerror or err}): make it writable, or choose another "
            f"with --set run.out_dir=DIR or run.name=NAME")


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _one_line(text: str) -> str:
    """`text` with every control character (a newline in a hand-edited lock) as a space: a refusal stays one line."""
    return "".join(c if c.isprintable() else " " for c in text)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
