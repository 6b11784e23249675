"""The Checkpointer: when a run saves, what it keeps, and the collective, atomic save and exact restore of a run's
state (as torchtitan's checkpointer, it is handed `Stateful` objects).

A run folder holds `ckpt-<step>.pth` every run.ckpt_every steps (the last run.keep_last kept) and `final.pth` at
the end. A file holds the run's state (`Trainer.state_dict()`: "model", "optimizer", "scaler", "state": step, epoch,
batch_in_epoch), every rank's RNG states ("rng", by rank), the resolved config ("config") and a stage's own entries
("ema", "best", "probe"); everything loads with weights_only=True. Reading a file is
`crate_mae.model.files.read_checkpoint`'s, the one reader; what a resume may change is the stage's
(stages/common.py), and which file a resume continues from is `model/files.py: latest`'s. A resume enters this
module once: `Checkpointer.restore`, before the loop.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from crate_mae.engine.dist import Dist, all_gather_object, broadcast_object, rng_state, set_rng_state
from crate_mae.errors import WriteError
from crate_mae.model.files import Checkpoint, periodic, save


class Stateful(Protocol):
    """What the Checkpointer saves and restores: anything with a state dict (torch's and torchtitan's protocol)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` periodic checkpoints."""
    found = periodic(run_dir)
    for path in found[: max(0, len(found) - keep_last)]:
        path.unlink(missing_ok=True)


class Checkpointer:
    """Saves the state it is given, with every rank's RNG states, the config and the `extra` entries it keeps (an EMA,
    the best accuracy, the online probe: each a `Stateful` under its own key); restores all of them in one call.

    `due(step, last=...)`: a periodic `ckpt-<step>.pth` every `every` steps (not at the last step: `final.pth`
    follows it). `save(name, state)` is collective: every rank passes its state (`Trainer.save` passes
    `Trainer.state_dict()` once the weights are checked finite on every rank together), every rank's RNG state is
    gathered, rank 0 writes atomically and prunes all but the newest `keep_last` periodic files.
    """

    def __init__(self, run_dir: str | Path, *, every: int, keep_last: int, config: Mapping[str, Any], dist: Dist,
                 extra: Mapping[str, Stateful] | None = None) -> None:
        self.run_dir, self.every, self.keep_last = Path(run_dir), every, keep_last
        self.config, self.dist, self.extra = dict(config), dist, dict(extra or {})

    def due(self, step: int, *, last: bool) -> bool:
        """Whether a periodic checkpoint is written after `step`."""
        return step % self.every == 0 and not last

    def save(self, name: str, state: Mapping[str, Any]) -> Path:
        """Write `run_dir/name` holding `state` (collective); periodic files beyond keep_last are pruned. A write
        that fails (a full disk, a quota, a read-only run folder) leaves the earlier files as they were and raises
        the same one-line `WriteError` on every rank: rank 0 tells the others, which would otherwise fail at the
        next collective with a lost peer's error (or wait for rank 0 until the process group's timeout)."""
        rngs = all_gather_object(self.dist, rng_state())
        path = self.run_dir / name
        failure: Exception | None = None
        if self.dist.is_main:
            payload = {**state, "rng": rngs, "config": self.config,
                       **{key: s.state_dict() for key, s in self.extra.items()}}
            try:
                save(path, payload)
                prune(self.run_dir, self.keep_last)
            except Exception as err:  # told to every rank below; rank 0 raises its own, with its traceback
                failure = err
        told: WriteError | str | None = None
        if failure is not None:
            told = failure if isinstance(failure, WriteError) else \
                f"rank 0 failed to write {path}: {type(failure).__name__}: {failure}"
        told = broadcast_object(self.dist, told)  # on every rank; a barrier too: none goes on before the file is there
        if failure is not None:
            raise failure
        if isinstance(told, WriteError):
            raise told
        if told is not None:
            raise RuntimeError(told)
        return path

    def restore(self, ckpt: Checkpoint, run: Stateful) -> None:
        """Continue from a run checkpoint (read once, by the stage's `prepare`): `run` (the Trainer: model, optimiser,
        scaler, position) and the extras get their state back, and this rank its generators."""
        payload = {"model": ckpt.state, **ckpt.payload}
        for key, stateful in self.extra.items():
            if key in payload:
                stateful.load_state_dict(payload[key])
        run.load_state_dict(payload)
        rngs = payload.get("rng", [])
        if len(rngs) == self.dist.world_size:  # the same ranks: every generator continues exactly
            set_rng_state(rngs[self.dist.rank])


@dataclass
class Best:
    """The best validation accuracy so far: a `Stateful` kept by the Checkpointer under "best"."""

    top1: float = -1.0
    top5: float = 0.0

    def state_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.top1, self.top5 = float(state["top1"]), float(state["top5"])
