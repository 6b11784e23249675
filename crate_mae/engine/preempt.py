"""Preemption and Ctrl-C: the run stops at a step boundary, every rank together, saves one checkpoint there, and exits
with a status that says "resumable".

A shared cluster stops jobs with a signal before it kills them: SLURM with SIGTERM, or the one `#SBATCH
--signal=USR1@120` asks for; torchrun's agent stops its workers with SIGTERM. Without handling, the process dies on
the spot and everything since the last periodic checkpoint is lost. Here:

1. `StopSignals` (installed by the entry points around the whole stage, crate_mae/cli.py) turns the first of the
   configured signals (`run.preempt_signals`, default SIGTERM and SIGUSR1), or Ctrl-C (SIGINT), that arrives in a
   training loop into a *request* and starts a watchdog; the process keeps going. Outside a training loop (reading
   files, writing the demo data, the final export) a signal stops the process where it is, with one line.
2. `Trainer.fit` asks `StopVote.poll()` after every step: the ranks agree (an all-reduce on a gloo group, started
   asynchronously one step and read the next, so no step waits on it and no GPU sync is added), so every rank
   stops after the same step, saves `ckpt-<step>.pth` together and raises `Preempted`.
3. The entry point prints Preempted's one line and exits with `PREEMPTED_EXIT` (75, sysexits' EX_TEMPFAIL: "try
   again"), or 130 after Ctrl-C, as shells expect. `--resume auto` continues from that checkpoint, bit-identical
   to a run never stopped.

A second signal, or a stop that has not finished within `run.preempt_grace` seconds (a hung peer, a save slower
than the cluster's notice), ends the process at once: the temp file of a save under way is removed, and the
files already there are whole (every write is atomic: crate_mae/atomic.py), so the run resumes from its last
complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from crate_mae.config.sections import stop_signals
from crate_mae.errors import Preempted

if TYPE_CHECKING:  # torch is imported where a vote is taken, so that the entry points' --help stays light
    from crate_mae.engine.dist import Dist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the job stopped early and can be run again (with --resume auto)
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports after Ctrl-C


def exit_status(signal_name: str | None) -> int:
    """The status a run stopped by `signal_name` exits with: 130 after Ctrl-C (SIGINT), else 75 (resumable)."""
    return INTERRUPTED_EXIT if signal_name == "SIGINT" else PREEMPTED_EXIT


class StopNow(BaseException):
    """A signal outside a training loop: the run stops where it is (a BaseException, as KeyboardInterrupt, so that
    nothing on the way out swallows it; `atomic_path` removes its temp file, the logger and the run-folder lock are
    closed)."""

    def __init__(self, message: str, *, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class StopSignals:
    """The process's stop request: handlers for `signals` (and SIGINT) while the context is open.

    The first signal records a request (`requested`: its name) and starts a watchdog of `grace` seconds; a second
    one, or the watchdog (a thread: it also fires when the main thread is stuck in a collective or a write, where no
    Python handler can run), ends the process at once (`_now`): no unwinding through whatever the main thread was
    doing, the temp file of a save under way removed, the complete files kept. The run folder's lock is left behind
    and taken over by the resume (its pid is gone: engine/runlock.py). Handlers are per process: a DataLoader worker forked
    from this one inherits them, and does nothing with a signal (its parent stops it).
    """

    _active: StopSignals | None = None  # the one open in this process, read by `requested_stop`

    def __init__(self, signals: Sequence[str], *, grace: float, run_dir: str | os.PathLike | None = None) -> None:
        self.numbers = stop_signals(signals)
        self.grace, self.run_dir = grace, Path(run_dir) if run_dir is not None else None
        self.requested: str | None = None  # the first signal's name
        self.deferring = False  # inside a training loop, which stops at its next step boundary (`at_step_boundaries`)
        self._pid = os.getpid()
        self._saved: dict[int, Any] = {}
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            for number in self.numbers:
                self._saved[number] = signal.signal(number, self._handle)
        StopSignals._active = self
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._saved.items():
            signal.signal(number, handler)
        if self._watchdog is not None:
            self._watchdog.cancel()
        StopSignals._active = None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: its parent decides, and stops it
            return
        name = signal.Signals(number).name
        if not self.deferring:  # no training loop to finish a step of: stop where we are (nothing half-written)
            raise StopNow(f"stopped by {name} outside the training loop: nothing is lost (every file is written "
                          f"atomically); continue with the same command and --resume auto",
                          exit_status=exit_status(name))
        if self.requested is not None:  # at once, wherever the main thread is (a step, the save, a thread's join)
            self._now(f"a second signal: {name} after {self.requested}")
        self.requested = name
        print(f"{name} received: finishing the current step, then saving a checkpoint and stopping "
              f"(a second signal stops at once)", file=sys.stderr, flush=True)
        self._watchdog = threading.Timer(self.grace, self._now, args=(f"no stop within {self.grace:g} s of {name}",))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _now(self, why: str) -> None:
        """End the process at once: the temp file of any save under way removed, the complete files kept."""
        from crate_mae.atomic import remove_stale_temp_files

        removed = remove_stale_temp_files(self.run_dir) if self.run_dir is not None and self.run_dir.is_dir() else []
        where = f"; {len(removed)} partial write(s) removed" if removed else ""
        print(f"stopped at once ({why}){where}: resume from the last complete checkpoint with --resume auto",
              file=sys.stderr, flush=True)
        os._exit(exit_status(self.requested))

    @property
    def exit_status(self) -> int:
        return exit_status(self.requested)


@contextmanager
def at_step_boundaries() -> Iterator[None]:
    """While open (a training loop), a first signal is a request that the loop acts on after its step."""
    active = StopSignals._active
    if active is None:
        yield
        return
    active.deferring = True
    try:
        yield
    finally:
        active.deferring = False


def requested_stop() -> str | None:
    """The name of the signal that asked this process to stop, or None (also when no StopSignals is open)."""
    active = StopSignals._active
    return active.requested if active is not None else None


class StopVote:
    """Whether every rank stops after this step: the ranks' requests combined, the same answer on each.

    One process: the request itself. Several: each `poll` starts an asynchronous MAX all-reduce of this rank's request
    on a gloo group (CPU tensors: no GPU sync) and reads the one started at the previous poll, so the answer at poll
    k is "some rank had a request by poll k − 1", identical on every rank, and no poll waits on the network. Every
    rank must call `poll` at the same points (after each step), which the training loop does.
    """

    def __init__(self, d: Dist) -> None:
        self.d = d
        self._group: Any = None
        self._pending: tuple[Any, Any] | None = None  # (the all-reduce under way, its flag tensor)

    def poll(self) -> bool:
        mine = requested_stop() is not None
        if not self.d.enabled:
            return mine
        import torch
        import torch.distributed as tdist

        if self._group is None:  # collective: every rank makes it at its first poll
            self._group = tdist.new_group(backend="gloo") if tdist.get_backend() != "gloo" else tdist.group.WORLD
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(mine)], dtype=torch.int32)
        self._pending = (tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Wait for the last poll's reduction (every rank, at the same point), so no collective is left running."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
