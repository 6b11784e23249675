"""Optimiser, parameter groups and the learning-rate schedule: the only place the lr is decided.

Peak lr = optim.lr if set, else optim.blr × global batch / 256 (MAE's linear scaling rule), with
global batch = per-device batch × devices × accumulation steps. The schedule, updated every optimiser
step, rises linearly from 0 over the warm-up and then follows a half cosine down to optim.min_lr
(timm's CosineLRScheduler, in steps rather than epochs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from crate_mae.config import OptimConfig


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Weight decay on matrices (U, D, A, Linear and conv weights), none on norms, biases and tokens.

    With `layer_decay` (timm's groups, from the model's `group_matcher`): the stem gets lr × decay^(L+1),
    encoder layer i (0-based) lr × decay^(L − i), the final norm and head the full lr, as MAE and BEiT do.
    The scale sits in each group's `lr_scale`, which the schedule applies.
    """
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None and layer_decay < 1:
        return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay,
                                        layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch; fused kernels on CUDA), Lion (lion-pytorch; our multi-tensor version on CUDA), LARS (timm)
    or SGD, over `param_groups`.

    LARS follows MAE's linear probe: the trust ratio (and weight decay) apply to matrices only.
    """
    if cfg.optimizer == "lars":  # MAE's LARS: matrices get weight decay and the trust ratio, 1-D parameters neither
        from timm.optim import Lars

        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "always_adapt": True},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False}]
        return Lars([g for g in groups if g["params"]], lr=lr, momentum=cfg.momentum)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=device.type == "cuda")
    if cfg.optimizer == "lion":
        if device.type == "cuda":  # a few multi-tensor kernels per step instead of several per parameter
            from crate_mae.engine.lion import ForeachLion

            return ForeachLion(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        from lion_pytorch import Lion  # the per-parameter original (bit-identical to ForeachLion on the CPU)

        return Lion(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CosineLRScheduler:
    """Warm-up then cosine over cfg.epochs × steps_per_epoch optimiser steps; call `step_update(step)` after each.

    A group's `lr_scale` (layer-wise decay) multiplies its lr throughout.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=cfg.min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
