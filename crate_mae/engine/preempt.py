"""Preemption and Ctrl-C: the first stop signal in a training loop is a request; after the step every rank agrees
(`StopVote`), saves a checkpoint and raises `Preempted` (exit 75, 130 after Ctrl-C). Outside a loop a signal raises
`StopNow`; a second signal, or no stop within `run.preempt_grace` seconds, ends the process at once."""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from crate_mae.atomic import remove_stale_temp_files
from crate_mae.config.sections import stop_signals
from crate_mae.errors import StopNow, exit_status

if TYPE_CHECKING:  # torch is imported where a vote is taken, so that the entry points' --help stays light
    from crate_mae.engine.dist import Dist


class StopSignals:
    """Handlers for `stop_signals(signals)` (the configured ones and SIGINT) while open; `requested`: the first
    signal's name. A forked child (a DataLoader worker) that still has them does nothing: its parent decides."""

    active: StopSignals | None = None  # the one open in this process

    def __init__(self, signals: Sequence[str], *, grace: float, run_dir: str | os.PathLike | None = None) -> None:
        self.numbers, self.grace, self.run_dir = stop_signals(signals), grace, run_dir
        self.requested: str | None = None
        self.deferring = False  # in a training loop, which stops at its next step boundary
        self._pid, self._saved, self._timer = os.getpid(), {}, threading.Timer(0, lambda: None)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self._saved = {number: signal.signal(number, self._handle) for number in self.numbers}
        StopSignals.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._saved.items():
            signal.signal(number, handler)
        self._timer.cancel()
        StopSignals.active = None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return
        name = signal.Signals(number).name
        if not self.deferring:
            raise StopNow(f"stopped by {name} outside the training loop: nothing is lost (every file is written "
                          f"atomically); continue with the same command and --resume auto",
                          exit_status=exit_status(name))
        if self.requested is not None:
            self._now(f"a second signal: {name} after {self.requested}")
        self.requested = name
        print(f"{name} received: finishing the current step, then saving a checkpoint and stopping (a second signal "
              f"stops at once)", file=sys.stderr, flush=True)
        # a thread: it fires also while the main thread waits in a collective or a write, where no handler runs
        self._timer = threading.Timer(self.grace, self._now, args=(f"no stop within {self.grace:g} s of {name}",))
        self._timer.daemon = True
        self._timer.start()

    def _now(self, why: str) -> None:
        """End the process without unwinding; the complete files are kept, a save's temp file is removed, the lock
        is left to the resume (its process is gone: engine/runlock.py)."""
        removed = remove_stale_temp_files(self.run_dir) if self.run_dir and Path(self.run_dir).is_dir() else []
        where = f"; {len(removed)} partial write(s) removed" if removed else ""
        print(f"stopped at once ({why}){where}: resume from the last complete checkpoint with --resume auto",
              file=sys.stderr, flush=True)
        os._exit(exit_status(self.requested))


@contextmanager
def at_step_boundaries() -> Iterator[None]:
    """While open (a training loop), a first signal is a request that the loop acts on after its step."""
    active = StopSignals.active or StopSignals([], grace=0)  # none open: a stand-in that nothing signals
    active.deferring = True
    try:
        yield
    finally:
        active.deferring = False


def requested_stop() -> str | None:
    """The name of the signal that asked this process to stop, or None (also when no StopSignals is open)."""
    return StopSignals.active.requested if StopSignals.active is not None else None


class StopVote:
    """Whether every rank stops after this step. Several ranks: each `poll` starts an asynchronous MAX all-reduce of
    this rank's request on a gloo group (CPU) and returns the one the previous poll started, so that no step waits on
    it and every rank (all poll after each step) gets the same answer."""

    def __init__(self, dist: Dist) -> None:
        self.dist, self._group, self._pending = dist, None, None  # _pending: (the all-reduce under way, its tensor)

    def poll(self) -> bool:
        if not self.dist.enabled:
            return requested_stop() is not None
        import torch
        import torch.distributed as tdist

        if self._group is None:  # collective: every rank makes it at its first poll
            self._group = tdist.new_group(backend="gloo") if tdist.get_backend() != "gloo" else tdist.group.WORLD
        agreed = self.close()
        flag = torch.tensor([requested_stop() is not None], dtype=torch.int32)
        self._pending = (tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def close(self) -> bool:
        """Wait for the last poll's all-reduce (no collective is left running); whether a rank had a request then."""
        if self._pending is None:
            return False
        self._pending[0].wait()
        agreed, self._pending = bool(self._pending[1].item()), None
        return agreed
