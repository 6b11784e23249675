"""Optimiser, parameter groups and the learning-rate schedule: the only place the lr is decided.

Peak lr = optim.lr if set, else optim.blr × global batch / 256 (MAE's linear scaling rule), with
global batch = per-device batch × devices × accumulation steps. The schedule, updated every optimiser
step, rises linearly from 0 over the warm-up and then follows a half cosine down to optim.min_lr
(timm's CosineLRScheduler, in steps rather than epochs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from crate_mae.config import OptimConfig


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices (U, D, A, Linear and conv weights), none on norms, biases and tokens."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch; fused kernels on CUDA) or Lion (lion-pytorch), over `param_groups`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=device.type == "cuda")
    from lion_pytorch import Lion

    return Lion(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CosineLRScheduler:
    """Warm-up then cosine over cfg.epochs × steps_per_epoch optimiser steps; call `step_update(step)` after each."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
