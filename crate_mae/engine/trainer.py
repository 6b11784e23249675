"""The Trainer: one optimiser step (mixed precision, accumulation with no_sync, clipping, a non-finite guard), and
the loop over epochs that every stage runs (`Trainer.fit`), with the run's batch arithmetic computed once.

One optimiser step takes `accum_steps` micro-batches. Under DDP the gradients are all-reduced only
on the last of them (`no_sync` on the others), so accumulation costs no extra communication. The loss
never forces a host sync inside the step: a device-side flag records the first non-finite step, and
`check_finite` (called at each log line and before each checkpoint) turns it into an error, so a
checkpoint is never written after a non-finite loss.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from crate_mae.engine.dist import Dist, all_reduce_max, all_reduce_sum
from crate_mae.engine.preempt import Preempted, StopVote, at_step_boundaries, exit_status, requested_stop
from crate_mae.errors import NonFiniteLoss

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
    """Owns the wrapped model, optimiser, schedule and scaler, the run's position, and its batch arithmetic.

    `step(micro_batches)` is one update; `fit(loader, ...)` runs the epochs. `loss_fn(net, batch) -> scalar
    loss` gives the loss of one micro-batch (the stage decides what a batch is), calling `net`, which is
    `objective` (default: the model) wrapped in DDP and torch.compile: a stage whose loss is not the model's
    `forward` passes a module around it (the MAE's `MaskedObjective`), since those wrappers hook `forward` alone. The
    raw (unwrapped) model stays in `self.module`, for checkpoints. `updates_per_epoch` (optimiser steps per epoch), `global_batch` (images
    per optimiser step) and `total_steps` are computed once, in `from_config`.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor], precision: str = "auto",
                 clip_grad: float | None = None, compile: bool = False, compile_mode: str = "default",
                 epochs: int = 1, accum_steps: int = 1, updates_per_epoch: int = 0, global_batch: int = 0,
                 objective: nn.Module | None = None) -> None:
        self.module, self.optimizer, self.scheduler, self.dist = model, optimizer, scheduler, dist
        self.objective = model if objective is None else objective  # what loss_fn calls; its tensors are the model's
        self.loss_fn, self.clip_grad = loss_fn, clip_grad
        self.epochs, self.accum_steps, self.updates_per_epoch, self.global_batch = (epochs, accum_steps,
                                                                                   updates_per_epoch, global_batch)
        self.total_steps = epochs * updates_per_epoch
        self.precision = resolve_precision(precision, dist.device)
        # Every parameter receives a gradient in every step (tested), so DDP needs no unused-parameter search.
        self.ddp = DistributedDataParallel(self.objective,
                                           device_ids=[dist.device.index] if dist.device.type == "cuda" else None) \
            if dist.enabled else None
        wrapped = self.ddp or self.objective
        self.model = torch.compile(wrapped, mode=None if compile_mode == "default" else compile_mode) \
            if compile else wrapped
        # CUDA graphs (cudagraph trees) reuse their output memory from one generation to the next. One optimiser
        # step is one generation: its micro-batches' graphs are one path of the tree, so the gradients that
        # accumulate over them stay valid; the step's loss is added to a fresh tensor before the next step.
        self._graph_step = compile and compile_mode in ("reduce-overhead", "max-autotune") and dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        self._first_bad = torch.full((), -1, dtype=torch.long, device=dist.device)
        self._last_batch: Any = None  # the last micro-batch, for `check_state_finite`

    @classmethod
    def from_config(cls, cfg: Config, model: nn.Module, d: Dist, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    batches_per_epoch: int, objective: nn.Module | None = None) -> Trainer:
        """The Trainer every stage builds from its config: cfg.optim's optimiser (at the peak lr of the global
        batch), schedule, epochs, accumulation and clipping; cfg.run's precision and compile."""
        from crate_mae.engine.optim import build_optimizer, build_scheduler, peak_lr

        accum = cfg.optim.accum_steps
        updates_per_epoch = batches_per_epoch // accum
        global_batch = cfg.data.batch_size * d.world_size * accum
        optimizer = build_optimizer(cfg.optim, model, peak_lr(cfg.optim, global_batch), d.device)
        return cls(model=model, optimizer=optimizer, scheduler=build_scheduler(cfg.optim, optimizer, updates_per_epoch),
                   dist=d, loss_fn=loss_fn, precision=cfg.run.precision, clip_grad=cfg.optim.clip_grad,
                   compile=cfg.run.compile, compile_mode=cfg.run.compile_mode, epochs=cfg.optim.epochs,
                   accum_steps=accum, updates_per_epoch=updates_per_epoch, global_batch=global_batch,
                   objective=objective)

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
                    loss = self.loss_fn(self.model, batch)
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

    def fit(self, loader: Any, *, log: RunLogger, log_every: int, checkpointer: Checkpointer | None = None,
            on_epoch_end: Callable[[int], None] | None = None, after_step: Callable[[], None] | None = None
            ) -> LossSummary:
        """Train from `self.state` to the end of the last epoch.

        Each epoch's loader is reseeded (and, after a resume, fast-forwarded) with `set_epoch`; every
        `accum_steps` micro-batches make one step; every `log_every` steps the mean loss over ranks, the lr
        and the throughput are logged; after every step the `checkpointer` decides whether to save (a
        collective call on every rank). `on_epoch_end(epoch)` runs after each epoch (evaluation, pictures);
        `after_step()` after each step (an EMA update). After every step the ranks also vote on a stop request
        (engine/preempt.py: a signal or Ctrl-C): if one is agreed, they save that step and raise Preempted.
        """
        with at_step_boundaries():
            return self._fit(loader, log=log, log_every=log_every, checkpointer=checkpointer, on_epoch_end=on_epoch_end,
                             after_step=after_step)

    def _fit(self, loader: Any, *, log: RunLogger, log_every: int, checkpointer: Checkpointer | None,
             on_epoch_end: Callable[[int], None] | None, after_step: Callable[[], None] | None) -> LossSummary:
        state, summary, accum, vote = self.state, LossSummary(), self.accum_steps, StopVote(self.dist)
        window, window_steps, tick = torch.zeros((), device=self.dist.device), 0, time.perf_counter()
        while state.epoch < self.epochs:
            loader.set_epoch(state.epoch, replay=state.batch_in_epoch)
            micro: list[Any] = []
            for item in loader:
                micro.append(item)
                if len(micro) < accum:
                    continue
                window += self.step(micro)
                micro, window_steps = [], window_steps + 1
                state.batch_in_epoch += accum
                if after_step is not None:
                    after_step()
                log.advance()
                if state.step % log_every == 0 or state.step == self.total_steps:
                    self.check_finite()
                    loss = all_reduce_sum(self.dist, window / window_steps).item() / self.dist.world_size
                    now = time.perf_counter()
                    rate = window_steps * self.global_batch / (now - tick)
                    summary.first = summary.first if summary.first is not None else loss
                    summary.last = loss
                    log.scalars(state.step, {"loss": loss, "lr": self.lr, "epoch": state.epoch, "images_per_s": rate})
                    log.info(f"step {state.step}/{self.total_steps} epoch {state.epoch} loss {loss:.4f} "
                             f"lr {self.lr:.3g} {rate:.0f} img/s")
                    window, window_steps, tick = torch.zeros_like(window), 0, now
                saved = checkpointer is not None and checkpointer.due(state.step, last=state.step == self.total_steps)
                if saved:
                    checkpointer.save(f"ckpt-{state.step:08d}.pth", self.state_dict())
                if vote.poll() and state.step < self.total_steps:
                    self._stop(checkpointer, vote, log, saved=saved)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if on_epoch_end is not None:
                on_epoch_end(state.epoch)
        vote.close()
        return summary

    def _stop(self, checkpointer: Checkpointer | None, vote: StopVote, log: RunLogger, *, saved: bool) -> None:
        """Every rank agreed to stop after this step (a signal, or Ctrl-C): save here (unless a periodic checkpoint
        just did), then raise Preempted with where the run stopped and how to go on."""
        state, why = self.state, requested_stop() or "another rank's signal"
        vote.close()
        where = f"step {state.step}/{self.total_steps} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        if checkpointer is None:
            raise Preempted(f"stopped by {why} after {where}; nothing saved (this stage keeps no checkpoints)",
                            exit_status=exit_status(why))
        name = f"ckpt-{state.step:08d}.pth"
        if not saved:
            checkpointer.save(name, self.state_dict())
        log.event("stopped", state.step, signal=why, checkpoint=name)
        raise Preempted(f"stopped by {why} after {where}: saved {checkpointer.run_dir / name}; continue with the same "
                        f"command and --resume auto", exit_status=exit_status(why))

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
        from crate_mae.engine.dist import rng_state, set_rng_state

        self.check_finite()
        bad = any(not torch.isfinite(p).all() for p in self.module.parameters())
        if not bad and self._last_batch is not None:
            saved = rng_state()
            try:
                with torch.no_grad(), autocast(self.dist.device, self.precision):
                    bad = not torch.isfinite(self.loss_fn(self.objective, self._last_batch).float()).item()
            finally:
                set_rng_state(saved)
        flag = all_reduce_max(self.dist, torch.tensor(int(bad), device=self.dist.device))
        if flag.item():
            raise NonFiniteLoss(f"the weights after step {self.state.step} (lr {self.lr:.3g}) give a non-finite loss; "
                                "stopping without saving them. Checkpoints written before are intact: lower "
                                "optim.lr/blr or set optim.clip_grad")

    @property
    def last_batch(self) -> Any:
        """The last micro-batch of the last step (what an online probe trains on after it), or None."""
        return self._last_batch

    @property
    def lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """The run's state as it may be saved: model, optimiser, schedule, scaler and position. Collective under DDP:
        it first checks (`check_state_finite`, on every rank together) that the weights give a finite loss, so that
        no checkpoint ever holds weights whose loss is not finite."""
        self.check_state_finite()
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "state": vars(self.state).copy()}

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """The checkpoint's weights, optimiser state (moments), scaler and position, under this Trainer's schedule.

        The optimiser's hyperparameters (lr, weight decay, betas, layer-decay scales) and the schedule are this
        Trainer's, built from the current config, not the checkpoint's: a resumed run trains with exactly the
        values it prints and saves, from the current step on. With an unchanged config they are the same values.
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


@dataclass
class LossSummary:
    first: float | None = None  # mean loss of the first logging interval of this process's run
    last: float | None = None  # mean loss of the last one
