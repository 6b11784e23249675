"""Run logs, on rank 0 only: TensorBoard scalars and images, a JSON-lines file, a progress bar, messages.

Other ranks get a logger that does nothing, so callers never test the rank themselves.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


class RunLogger:
    """`scalars(step, {...})` → TensorBoard + log.jsonl + progress bar; `info(msg)` prints above the bar."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, initial_step: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.jsonl = open(self.run_dir / "log.jsonl", "a")
        # The bar only where a person watches: a redirected log gets the periodic lines instead.
        self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def scalars(self, step: int, values: dict[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tb.add_scalar(f"{prefix}/{name}", value, step)
        self.jsonl.write(json.dumps({"time": round(time.time(), 3), "step": step, **values}) + "\n")
        self.jsonl.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def event(self, name: str, step: int, **details: Any) -> None:
        """One line {"time", "step", "event": name, ...} in log.jsonl: a resume, so that a reader knows the lines
        after it replace those of the same steps before it."""
        if self.enabled:
            self.jsonl.write(json.dumps({"time": round(time.time(), 3), "step": step, "event": name, **details}) + "\n")
            self.jsonl.flush()

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image (3, H, W) in [0, 1]."""
        if self.enabled:
            self.tb.add_image(tag, image, step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


def read_events(run_dir: str | Path, name: str, *, until_step: int | None = None) -> list[dict[str, Any]]:
    """The `name` events of a run's log.jsonl as they stand: a `resume` event at step s drops the events logged after
    step s before it (the resumed run logs those steps again), and so does `until_step` (a resume about to start)."""
    path = Path(run_dir) / "log.jsonl"
    events: list[dict[str, Any]] = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if row.get("event") == "resume":
            events = [e for e in events if e["step"] <= row["step"]]
        elif row.get("event") == name:
            events.append(row)
    return [e for e in events if until_step is None or e["step"] <= until_step]

