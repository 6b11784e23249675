"""Bad data: counted, logged, and judged in one place.

A `BadSample` (no image, no label, an undecodable image) is skipped by the shard stream's `decode_or_skip` step
and counted here, in a `SampleTally`; too many of them (`check_bad`: more than data.max_bad_fraction) stop the
run with a one-line `DataError`.

Where the rule is judged, and why there: in one step, data/stream.py's `decode_or_skip`, through
`SampleTally.judge`. A slot's stream is the only place that can stop a worker that reads nothing usable: such a
worker never hands a batch to the main process, so a judge there would wait for ever. The tally is shared memory
that the loader's workers all write (each its own row) and that lasts over the loader's epochs, so that one step
judges the whole run:
- while a slot's stream runs, at each bad sample, that stream's own count, once it holds 1/max_bad_fraction
  samples: one early bad sample does not stop a run, and the judgement does not depend on how far the other workers
  have got (the same data stops a run at the same sample);
- when a slot's stream ends (its share of the epoch decoded, or the evaluation set read), if it is the epoch's last
  slot to end: every row together, however few samples that is (a run of short epochs cannot stay under the limit
  epoch by epoch, nor a worker by worker).
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np
import torch

from crate_mae.errors import DataError

log = logging.getLogger("crate_mae.data")


class BadSample(Exception):
    """One sample that cannot be used; the message says why."""


@dataclass
class SampleCount:
    """Samples seen, and how many of them were bad."""

    seen: int = 0
    bad: int = 0
    last: str = ""  # the last bad sample, "<shard>/<key>: <reason>"


def check_bad(count: SampleCount, max_fraction: float, spec: str, *, final: bool) -> None:
    """The rule: a DataError when more than `max_fraction` of the samples seen were bad; judged once 1/max_fraction
    samples have been seen (so that one early bad sample does not stop a run), or at the end of a stream (`final`)."""
    judged = final or max_fraction == 0 or count.seen >= 1 / max_fraction
    if count.bad and judged and count.bad > max_fraction * count.seen:
        raise DataError(f"{count.bad} of {count.seen} samples were bad, more than data.max_bad_fraction="
                        f"{max_fraction} (last: {count.last}); check the shards of {spec}")


class SampleTally:
    """Each slot's samples seen and bad over a loader's epochs, in shared memory (row = the worker's role), and the
    one judge of the bad-sample rule (see the module's docstring). Made in the main process before the workers
    start; a worker writes only its own row, so no lock is needed but for the end of an epoch."""

    LAST = 512  # bytes kept of each row's last bad sample

    def __init__(self, slots: int, *, max_fraction: float, spec: str) -> None:
        self.slots, self.max_fraction, self.spec = slots, max_fraction, spec
        self.rows = torch.zeros(slots, 3, dtype=torch.int64).share_memory_()  # seen, bad, time of the last bad (ns)
        self.lasts = torch.zeros(slots, self.LAST, dtype=torch.uint8).share_memory_()  # its "<key>: <reason>"
        self.ended = multiprocessing.Value("i", 0)  # rows whose stream has ended in this epoch
        self.started: dict[int, tuple[int, int]] = {}  # row → (seen, bad) as its stream started (this process's)

    def new_epoch(self) -> None:
        """In the main process, before an epoch's workers start: no row has ended (an abandoned epoch left some)."""
        self.ended.value = 0

    def start_stream(self, row: int) -> None:
        """In the row's worker, as its stream starts: the running judgement counts from here."""
        seen, bad, _ = self.rows.numpy()[row]
        self.started[row] = (int(seen), int(bad))

    def seen(self, row: int) -> None:
        self.rows.numpy()[row, 0] += 1  # through numpy: a tenth of a microsecond, once per sample

    def bad(self, row: int, what: str) -> None:
        """Counts a bad sample in this row and logs it (the first 100, then every 100th)."""
        rows = self.rows.numpy()
        rows[row, 1] += 1
        rows[row, 2] = time.monotonic_ns()  # one clock for every process: which row's bad sample came last
        text = np.frombuffer(what.encode()[: self.LAST], dtype=np.uint8)
        lasts = self.lasts.numpy()
        lasts[row], lasts[row, : len(text)] = 0, text
        if rows[row, 1] <= 100 or rows[row, 1] % 100 == 0:
            log.warning("skipped %s (%d bad of %d so far)", what, rows[row, 1], rows[row, 0])

    def count(self, row: int | None = None) -> SampleCount:
        """One row's count, or (None) all rows' together, naming the last bad sample of any."""
        rows = self.rows.numpy().copy() if row is None else self.rows.numpy()[row: row + 1].copy()
        newest = int(rows[:, 2].argmax()) if row is None else row
        last = self.lasts.numpy()[newest].tobytes().rstrip(b"\0").decode(errors="replace") if rows[:, 1].any() else ""
        return SampleCount(int(rows[:, 0].sum()), int(rows[:, 1].sum()), last)

    def judge(self, row: int, *, end: bool) -> None:
        """The rule (`check_bad`): while a row's stream runs, on what that stream has read; at its end, on every row
        together when it is the epoch's last row to end."""
        if not end:
            count = self.count(row)
            seen, bad = self.started.get(row, (0, 0))
            check_bad(SampleCount(count.seen - seen, count.bad - bad, count.last), self.max_fraction, self.spec,
                      final=False)
            return
        with self.ended.get_lock():
            self.ended.value += 1
            last = self.ended.value == self.slots
            if last:
                self.ended.value = 0
        if last:
            check_bad(self.count(), self.max_fraction, self.spec, final=True)
