"""The train step: mixed precision, gradient accumulation with no_sync, clipping, a non-finite guard.

One optimiser step takes `accum_steps` micro-batches. Under DDP the gradients are all-reduced only
on the last of them (`no_sync` on the others), so accumulation costs no extra communication. The loss
never forces a host sync inside the step: a device-side flag records the first non-finite step, and
`check_finite` (called at each log line and before each checkpoint) turns it into an error, so a
checkpoint is never written after a non-finite loss.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from crate_mae.data.transforms import normalise
from crate_mae.engine.dist import Dist, all_reduce_max

if TYPE_CHECKING:
    from crate_mae.config import Config


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


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
    """Owns the wrapped model, optimiser, schedule and scaler; `step(micro_batches)` is one update.

    `loss_fn(model, batch) -> scalar loss` gives the loss of one micro-batch (the stage decides what a
    batch is). The raw (unwrapped) model stays in `self.module`, for checkpoints.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor], precision: str = "auto",
                 clip_grad: float | None = None, compile: bool = False, compile_mode: str = "default") -> None:
        self.module, self.optimizer, self.scheduler, self.dist = model, optimizer, scheduler, dist
        self.loss_fn, self.clip_grad = loss_fn, clip_grad
        self.precision = resolve_precision(precision, dist.device)
        # Every parameter receives a gradient in every step (tested), so DDP needs no unused-parameter search.
        self.ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) \
            if dist.enabled else None
        wrapped = self.ddp or model
        self.model = torch.compile(wrapped, mode=None if compile_mode == "default" else compile_mode) \
            if compile else wrapped
        # CUDA graphs (cudagraph trees) reuse their output memory from one generation to the next. One optimiser
        # step is one generation: its micro-batches' graphs are one path of the tree, so the gradients that
        # accumulate over them stay valid; the step's loss is added to a fresh tensor before the next step.
        self._graph_step = compile and compile_mode in ("reduce-overhead", "max-autotune") and dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        self._first_bad = torch.full((), -1, dtype=torch.long, device=dist.device)

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
        mean = total / n
        bad = ~torch.isfinite(mean) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, self.state.step), self._first_bad)
        return mean

    def check_finite(self) -> None:
        """Raise if any step since the start had a non-finite loss on any rank (one host sync).

        Collective under DDP, so that every rank stops together instead of some waiting on the others.
        """
        first = int(all_reduce_max(self.dist, self._first_bad.clone()).item())
        if first >= 0:
            raise NonFiniteLoss(f"the loss is not finite at step {first} (lr {self.lr:.3g}); stopping. "
                                "Checkpoints written before it are intact: lower optim.lr/blr or set optim.clip_grad")

    @property
    def lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "state": vars(self.state).copy()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        self.scheduler.step_update(num_updates=self.state.step)


class StageTrainer(NamedTuple):
    """A stage's Trainer and the batch arithmetic it was built for."""

    trainer: Trainer
    updates_per_epoch: int  # optimiser steps per epoch: loader batches // optim.accum_steps
    global_batch: int  # images per optimiser step: data.batch_size × ranks × optim.accum_steps


def stage_trainer(cfg: Config, model: nn.Module, d: Dist, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                  batches_per_epoch: int) -> StageTrainer:
    """The Trainer every stage builds from its config: cfg.optim's optimiser (at the peak lr of the global
    batch) and schedule, cfg.run's precision and compile, cfg.optim's gradient clipping."""
    from crate_mae.engine.optim import build_optimizer, build_scheduler, peak_lr

    accum = cfg.optim.accum_steps
    updates_per_epoch = batches_per_epoch // accum
    global_batch = cfg.data.batch_size * d.world_size * accum
    optimizer = build_optimizer(cfg.optim, model, peak_lr(cfg.optim, global_batch), d.device)
    trainer = Trainer(model=model, optimizer=optimizer, scheduler=build_scheduler(cfg.optim, optimizer, updates_per_epoch),
                      dist=d, loss_fn=loss_fn, precision=cfg.run.precision, clip_grad=cfg.optim.clip_grad,
                      compile=cfg.run.compile, compile_mode=cfg.run.compile_mode)
    return StageTrainer(trainer, updates_per_epoch, global_batch)


@dataclass
class LossSummary:
    first: float | None = None  # mean loss of the first logging interval of this process's run
    last: float | None = None  # mean loss of the last one


def fit(trainer: Trainer, loader: Any, *, epochs: int, accum_steps: int, log_every: int, ckpt_every: int,
        global_batch: int, log: Any, save: Callable[[str], None],
        on_epoch_end: Callable[[int], None] | None = None, after_step: Callable[[], None] | None = None) -> LossSummary:
    """Train from `trainer.state` to the end of `epochs`: the loop every stage shares.

    Each epoch's loader is reseeded (and, after a resume, fast-forwarded) with `set_epoch`; every
    `accum_steps` micro-batches make one step; every `log_every` steps the mean loss over ranks, the lr
    and the throughput are logged; every `ckpt_every` steps `save(f"ckpt-{step:08d}.pth")` is called
    (on every rank: saving is collective). `on_epoch_end(epoch)` runs after each epoch (evaluation,
    pictures); `after_step()` after each step (an EMA update).
    """
    from crate_mae.engine.dist import all_reduce_sum

    state, summary = trainer.state, LossSummary()
    total_steps = epochs * (len(loader) // accum_steps)
    window, window_steps, tick = torch.zeros((), device=trainer.dist.device), 0, time.perf_counter()
    while state.epoch < epochs:
        loader.set_epoch(state.epoch, skip_batches=state.batch_in_epoch)
        micro: list[Any] = []
        for item in loader:
            micro.append(item)
            if len(micro) < accum_steps:
                continue
            window += trainer.step(micro)
            micro, window_steps = [], window_steps + 1
            state.batch_in_epoch += accum_steps
            if after_step is not None:
                after_step()
            log.advance()
            if state.step % log_every == 0 or state.step == total_steps:
                trainer.check_finite()
                loss = all_reduce_sum(trainer.dist, window / window_steps).item() / trainer.dist.world_size
                now = time.perf_counter()
                rate = window_steps * global_batch / (now - tick)
                summary.first = summary.first if summary.first is not None else loss
                summary.last = loss
                log.scalars(state.step, {"loss": loss, "lr": trainer.lr, "epoch": state.epoch, "images_per_s": rate})
                log.info(f"step {state.step}/{total_steps} epoch {state.epoch} loss {loss:.4f} "
                         f"lr {trainer.lr:.3g} {rate:.0f} img/s")
                window, window_steps, tick = torch.zeros_like(window), 0, now
            if state.step % ckpt_every == 0 and state.step < total_steps:
                save(f"ckpt-{state.step:08d}.pth")
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if on_epoch_end is not None:
            on_epoch_end(state.epoch)
    return summary


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, dist: Dist, precision: str = "fp32",
             prepare: Callable[[torch.Tensor], torch.Tensor] = normalise) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) over an evaluation loader, exact over all ranks.

    Each rank counts (top-1 correct, top-5 correct, samples) over its share of the data; one
    all_reduce(SUM) adds the counts, so every sample counts exactly once. `prepare` maps a batch's
    images (on the device) to model input: uint8 pixels are normalised.
    """
    from crate_mae.engine.dist import all_reduce_sum
    from crate_mae.probe import topk_correct

    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=dist.device)
    for batch in loader:
        with autocast(dist.device, precision):
            logits = model(prepare(batch.images.to(dist.device, non_blocking=True)))
        correct = topk_correct(logits.float(), batch.labels.to(dist.device), ks=(1, 5))
        counts += torch.tensor([correct[1], correct[5], len(batch.labels)], dtype=torch.float64, device=dist.device)
    model.train(was_training)
    top1, top5, n = all_reduce_sum(dist, counts).tolist()
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "samples": int(n)}
