"""The Trainer: one optimiser step (mixed precision, accumulation with no_sync, clipping, a non-finite guard), and
the loop over epochs that every stage runs (`Trainer.fit`), with the run's batch arithmetic computed once.

One optimiser step takes `accum_steps` micro-batches. Under DDP the gradients are all-reduced only
on the last of them (`no_sync` on the others), so accumulation costs no extra communication. The loss
never forces a host sync inside the step: a device-side flag records the first non-finite step, and
`check_finite` (called at each log line) turns it into an error; `save` checks the weights themselves
(`check_state_finite`) before a checkpoint is written, so no checkpoint holds weights whose loss is not finite.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from crate_mae.engine.dist import Dist, all_reduce_max, all_reduce_sum, rng_state, set_rng_state
from crate_mae.engine.preempt import StopVote, at_step_boundaries, requested_stop
from crate_mae.errors import NonFiniteLoss, Preempted, exit_status

if TYPE_CHECKING:
    from crate_mae.config import Config
    from crate_mae.engine.checkpoint import Checkpointer
    from crate_mae.engine.log import RunLogger


@dataclass
class TrainState:
    """Where the run is: optimiser steps done, the epoch, and micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class LossSummary:
    first: float | None = None  # mean loss of the first logging interval of this process's run
    last: float | None = None  # mean loss of the last one


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 on GPUs that support it (else fp16), fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Owns the wrapped objective, optimiser, schedule and scaler, the run's position, and its batch arithmetic.

    `objective` is a module whose `forward(images, labels)` is the loss of one micro-batch (model/mae.py:
    MaskedObjective, model/classifier.py: ClassifierObjective); its `model` is what is optimised and saved
    (`self.module`). The objective is wrapped in DDP and torch.compile (`self.model`), which hook `forward` alone.
    `step(micro_batches)` is one update, each micro-batch having `.images` and `.labels` (data's Batch);
    `fit(loader, ...)` runs the epochs. `updates_per_epoch` (optimiser steps per epoch), `global_batch` (images per
    optimiser step) and `total_steps` are computed once, in `from_config`.
    """

    def __init__(self, objective: nn.Module, *, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist,
                 precision: str = "auto", clip_grad: float | None = None, compile: bool = False,
                 compile_mode: str = "default", epochs: int = 1, accum_steps: int = 1, updates_per_epoch: int = 0,
                 global_batch: int = 0) -> None:
        self.objective, self.module = objective, objective.model
        self.optimizer, self.scheduler, self.dist, self.clip_grad = optimizer, scheduler, dist, clip_grad
        self.epochs, self.accum_steps, self.updates_per_epoch, self.global_batch = (epochs, accum_steps,
                                                                                   updates_per_epoch, global_batch)
        self.total_steps = epochs * updates_per_epoch
        self.precision = resolve_precision(precision, dist.device)
        # Every parameter receives a gradient in every step (tested), so DDP needs no unused-parameter search.
        self.ddp = DistributedDataParallel(objective, device_ids=[dist.device.index] if dist.device.type == "cuda"
                                           else None) if dist.enabled else None
        wrapped = self.ddp or objective
        self.model = torch.compile(wrapped, mode=None if compile_mode == "default" else compile_mode) \
            if compile else wrapped
        # CUDA graphs (cudagraph trees) reuse their output memory from one generation to the next. One optimiser
        # step is one generation: its micro-batches' graphs are one path of the tree, so the gradients that
        # accumulate over them stay valid; the step's loss is added to a fresh tensor before the next step.
        self._graph_step = compile and compile_mode in ("reduce-overhead", "max-autotune") and dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.precision == "fp16")
        self.state, self.summary = TrainState(), LossSummary()
        self._first_bad = torch.full((), -1, dtype=torch.long, device=dist.device)
        self._last_batch: Any = None  # the last micro-batch, for `check_state_finite`
        self._window()

    @classmethod
    def from_config(cls, cfg: Config, objective: nn.Module, dist: Dist, batches_per_epoch: int) -> Trainer:
        """The Trainer every stage builds from its config: cfg.optim's optimiser (at the peak lr of the global
        batch), schedule, epochs, accumulation and clipping; cfg.run's precision and compile."""
        from crate_mae.engine.optim import build_optimizer, build_scheduler, peak_lr

        accum = cfg.optim.accum_steps
        updates_per_epoch = batches_per_epoch // accum
        global_batch = cfg.data.batch_size * dist.world_size * accum
        optimizer = build_optimizer(cfg.optim, objective.model, peak_lr(cfg.optim, global_batch), dist.device)
        return cls(objective, optimizer=optimizer, scheduler=build_scheduler(cfg.optim, optimizer, updates_per_epoch),
                   dist=dist, precision=cfg.run.precision, clip_grad=cfg.optim.clip_grad, compile=cfg.run.compile,
                   compile_mode=cfg.run.compile_mode, epochs=cfg.optim.epochs, accum_steps=accum,
                   updates_per_epoch=updates_per_epoch, global_batch=global_batch)

    def step(self, micro_batches: Sequence[Any]) -> torch.Tensor:
        """One optimiser step over the micro-batches; returns their mean loss (detached, on the device)."""
        self.model.train()
        n, total = len(micro_batches), torch.zeros((), device=self.dist.device)
        for i, batch in enumerate(micro_batches):
            sync = i == n - 1
            if self._graph_step and i == 0:
                torch.compiler.cudagraph_mark_step_begin()
            with (self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()):
                with autocast(self.dist.device, self.precision):
                    loss = self.model(batch.images, batch.labels)
                self.scaler.scale(loss / n).backward()
            total += loss.detach().float()
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(num_updates=self.state.step)
        self._last_batch = micro_batches[-1]
        mean = total / n
        bad = ~torch.isfinite(mean) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, self.state.step), self._first_bad)
        return mean

    def fit(self, loader: Any, *, log: RunLogger, log_every: int,
            checkpointer: Checkpointer) -> Iterator[Iterator[Any]]:
        """Train from `self.state` to the end of the last epoch, handing control back to the stage: one item per epoch,
        itself an iterator with one item per optimiser step, the step's last micro-batch. The stage does its per-step
        work (an EMA, the online probe) in the inner loop and its per-epoch work (evaluation, pictures) after it;
        each epoch must be iterated to its end.

        Each epoch's loader is reseeded (and, after a resume, fast-forwarded) with `set_epoch`; every `accum_steps`
        micro-batches make one step. After each step (and the stage's work on it): every `log_every` steps the mean
        loss over ranks, the lr and the throughput are logged; the `checkpointer` decides whether to save (`save`:
        collective); the ranks vote on a stop request (engine/preempt.py: a signal or Ctrl-C), and if one is agreed
        they save that step and raise Preempted. The loss of each logging interval goes to `self.summary`.
        """
        self._window()
        with at_step_boundaries():  # the whole loop, the stage's per-epoch work too: a signal waits for a step's end
            vote = StopVote(self.dist.world_size)
            while self.state.epoch < self.epochs:
                epoch = self.state.epoch
                yield self._epoch(loader, vote, log=log, log_every=log_every, checkpointer=checkpointer)
                if self.state.epoch == epoch:
                    raise RuntimeError("Trainer.fit: an epoch was left before its end; iterate each one to its end")

    def _epoch(self, loader: Any, vote: StopVote, *, log: RunLogger, log_every: int,
               checkpointer: Checkpointer) -> Iterator[Any]:
        """One epoch of `fit` (from where a resume left it): its steps, each handed to the stage, logged and saved."""
        state = self.state
        loader.set_epoch(state.epoch, replay=state.batch_in_epoch)
        micro: list[Any] = []
        for item in loader:
            micro.append(item)
            if len(micro) < self.accum_steps:
                continue
            self._losses, self._logged = self._losses + self.step(micro), self._logged + 1
            state.batch_in_epoch += len(micro)
            yield micro[-1]
            micro = []
            log.advance()
            last = state.step == self.total_steps
            if state.step % log_every == 0 or last:
                self._log(log)
            saved = checkpointer.due(state.step, last=last)
            if saved:
                self.save(checkpointer, f"ckpt-{state.step:08d}.pth")
            if vote.poll() and not last:
                self._stop(checkpointer, log, saved=saved)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def _window(self) -> None:
        """A new logging interval: its steps' losses are summed on the device (no host sync) until `_log`."""
        self._losses, self._logged, self._tick = torch.zeros((), device=self.dist.device), 0, time.perf_counter()

    def _log(self, log: RunLogger) -> None:
        """The interval's mean loss over ranks (a host sync: the non-finite flag is read here too), lr, throughput."""
        self.check_finite()
        loss = all_reduce_sum(self.dist, self._losses / self._logged).item() / self.dist.world_size
        rate = self._logged * self.global_batch / (time.perf_counter() - self._tick)
        self.summary.first = self.summary.first if self.summary.first is not None else loss
        self.summary.last = loss
        state = self.state
        log.scalars(state.step, {"loss": loss, "lr": self.lr, "epoch": state.epoch, "images_per_s": rate})
        log.info(f"step {state.step}/{self.total_steps} epoch {state.epoch} loss {loss:.4f} lr {self.lr:.3g} "
                 f"{rate:.0f} img/s")
        self._window()

    def _stop(self, checkpointer: Checkpointer, log: RunLogger, *, saved: bool) -> None:
        """Every rank agreed to stop after this step (a signal, or Ctrl-C): save here (unless a periodic checkpoint
        just did), then raise Preempted with where the run stopped and how to go on."""
        state, why = self.state, requested_stop() or "another rank's signal"
        where = f"step {state.step}/{self.total_steps} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        name = f"ckpt-{state.step:08d}.pth"
        if not saved:
            self.save(checkpointer, name)
        log.event("stopped", state.step, signal=why, checkpoint=name)
        raise Preempted(f"stopped by {why} after {where}: saved {checkpointer.run_dir / name}; continue with the same "
                        f"command and --resume auto", exit_status=exit_status(why))

    def save(self, checkpointer: Checkpointer, name: str) -> Path:
        """Write checkpoint `name` of the run as it is now, if its weights may be saved: `check_state_finite` first
        (every rank together), then the checkpointer's collective save. Every checkpoint is written through here."""
        self.check_state_finite()
        return checkpointer.save(name, self.state_dict())

    def check_finite(self) -> None:
        """Raise if any step since the start had a non-finite loss on any rank (one host sync).

        Collective under DDP, so that every rank stops together instead of some waiting on the others.
        """
        first = int(all_reduce_max(self.dist, self._first_bad.clone()).item())
        if first >= 0:
            raise NonFiniteLoss(f"the loss is not finite at step {first} (lr {self.lr:.3g}); stopping. "
                                "Checkpoints written before it are intact: lower optim.lr/blr or set optim.clip_grad")

    def check_state_finite(self) -> None:
        """Raise unless the weights as they are now give a finite loss: what a checkpoint may hold.

        A step's loss is computed before its update, so a diverging update shows only in the next step's loss:
        `check_finite` alone runs one step behind. This also checks every parameter, and the loss of the current
        weights on the last micro-batch (no gradient; every generator restored afterwards, so the run's random
        stream and an exact resume are untouched). Collective: every rank raises together.
        """
        self.check_finite()
        bad = any(not torch.isfinite(p).all() for p in self.module.parameters())
        if not bad and self._last_batch is not None:
            saved = rng_state()
            try:
                with torch.no_grad(), autocast(self.dist.device, self.precision):
                    loss = self.objective(self._last_batch.images, self._last_batch.labels)
                bad = not torch.isfinite(loss.float()).item()
            finally:
                set_rng_state(saved)
        flag = all_reduce_max(self.dist, torch.tensor(int(bad), device=self.dist.device))
        if flag.item():
            raise NonFiniteLoss(f"the weights after step {self.state.step} (lr {self.lr:.3g}) give a non-finite loss; "
                                "stopping without saving them. Checkpoints written before are intact: lower "
                                "optim.lr/blr or set optim.clip_grad")

    @property
    def lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """The run's state: model, optimiser, scaler and position. (The schedule is a function of the config and the
        step: `load_state_dict` sets it from the step.)"""
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "state": vars(self.state).copy()}

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """The checkpoint's weights, optimiser state (moments), scaler and position, under this Trainer's schedule.

        The optimiser's hyperparameters (lr, weight decay, betas, layer-decay scales) and the schedule are this
        Trainer's, built from the current config, not the checkpoint's: a resumed run trains with exactly the
        values it prints and saves, from the current step on. With an unchanged config they are the same values.
        Other entries are not read here: a stage's own (the Checkpointer's), and the "scheduler" entry that older
        files carry (its values follow from the step).
        """
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, values in zip(self.optimizer.param_groups, hyper):
            group.update(values)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        if self.state.batch_in_epoch >= self.updates_per_epoch * self.accum_steps:  # saved at an epoch's end
            self.state = TrainState(self.state.step, self.state.epoch + 1, 0)
        self.scheduler.step_update(num_updates=self.state.step)  # the schedule is a function of the config and step

