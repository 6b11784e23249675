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
from types import FrameType

from crate_mae.atomic import remove_stale_temp_files
from crate_mae.config.sections import stop_signals
from crate_mae.errors import StopNow, exit_status


class StopSignals:
    """Handlers for `stop_signals(signals)` (the configured ones and SIGINT) while open; `requested`: the first
    signal's name. A forked child (a DataLoader worker) that still has them does nothing: its parent decides."""

    active: StopSignals | None = None  # the one open in this process

    def __init__(self, signals: Sequence[str], *, grace: float, run_dir: str | os.PathLike | None = None) -> None:
        self.numbers, self.grace, self.run_dir = stop_signals(signals), grace, run_dir
        self.requested: str | None = None  # the first signal's name
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
        """End the process without unwinding: whole files kept, a save's temp file removed, the lock left behind."""
        removed = remove_stale_temp_files(self.run_dir) if self.run_dir else []  # a missing folder: nothing
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
    """Whether every rank stops after this step (all poll after each): a MAX all-reduce of their requests on a gloo
    group (a few bytes on the CPU, no GPU sync; the step's gradient all-reduce has brought the ranks together)."""

    def __init__(self, ranks: int) -> None:
        self.ranks, self._group = ranks, None

    def poll(self) -> bool:
        if self.ranks == 1:
            return requested_stop() is not None
        import torch  # here, not at the top: the entry points' --help imports this module and stays light
        import torch.distributed as tdist

        if self._group is None:  # collective: every rank makes it at its first poll
            self._group = tdist.new_group(backend="gloo") if tdist.get_backend() != "gloo" else tdist.group.WORLD
        flag = torch.tensor([requested_stop() is not None], dtype=torch.int32)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
