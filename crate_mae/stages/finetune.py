"""The fine-tuning stage: pretrained weights (or none: the seed's supervised CRATE from scratch) as a CrateClassifier.

    result = run_finetune(load_config("configs/finetune/demo.yaml"))

timm supplies the recipe's pieces: RandAugment and random erasing (the transform), Mixup / CutMix with
label smoothing (SoftTargetCrossEntropy), layer-wise lr decay groups, the weight EMA. Top-1 / top-5 are
evaluated after every epoch, exactly over all ranks; `best.pth` keeps the best epoch, `final.pth` the last.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from crate_mae.config import Config, FinetuneConfig
from crate_mae.data import FinetuneTransform, eval_loader, train_loader
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.data.reader import ShardLoader
from crate_mae.engine.checkpoint import Best
from crate_mae.engine.log import RunLogger
from crate_mae.engine.optim import peak_lr
from crate_mae.engine.trainer import Trainer
from crate_mae.errors import ConfigError
from crate_mae.eval.metrics import evaluate
from crate_mae.model import create_model
from crate_mae.model.classifier import ClassifierObjective
from crate_mae.seeding import mix_seed, seed_everything
from crate_mae.stages.common import StageRun, banner, run_stage, write_results


@dataclass
class FinetuneResult:
    run_dir: Path
    dataset: str
    checkpoint: str | None
    classes: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    top1: float  # after the last epoch
    top5: float
    best_top1: float
    best_top5: float
    samples: int  # validation images
    model: nn.Module | None = None


def _loss(ft: FinetuneConfig, classes: int, batch_size: int) -> tuple[Callable[[Any, Any], Any] | None, nn.Module]:
    """(Mixup / CutMix or None, the criterion that fits it): timm's pieces of the recipe."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if not (ft.mixup > 0 or ft.cutmix > 0):
        return None, LabelSmoothingCrossEntropy(ft.smoothing) if ft.smoothing > 0 else nn.CrossEntropyLoss()
    if batch_size % 2:
        raise ConfigError(f"data.batch_size: Mixup / CutMix pair the images of a batch, so it must be even, got {batch_size}")
    return (Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.smoothing, num_classes=classes),
            SoftTargetCrossEntropy())


def run_finetune(cfg: Config) -> FinetuneResult:
    ft = cfg.finetune
    return run_stage(cfg, _run, weights=ft.checkpoint, default_family="mae" if ft.checkpoint else "supervised")


def _run(run: StageRun) -> FinetuneResult:
    from timm.utils import ModelEmaV2

    cfg, dist, ft = run.cfg, run.dist, run.cfg.finetune
    classes = cfg.model.num_classes
    mix, criterion = _loss(ft, classes, cfg.data.batch_size)
    seed_everything(cfg.run.seed)  # the same initial head on every rank
    model = create_model(cfg.model, run.weights)[0].to(dist.device)
    loader, val = _loaders(run, classes)
    trainer = Trainer.from_config(cfg, ClassifierObjective(model, criterion, mix).to(dist.device), dist, len(loader))
    ema = ModelEmaV2(model, decay=ft.ema_decay) if ft.ema_decay else None
    best, last = Best(), {"top1": 0.0, "top5": 0.0, "samples": 0}
    checkpointer = run.checkpointer({"best": best, **({"ema": ema.module} if ema else {})})
    seed_everything(mix_seed(cfg.run.seed, "rank", dist.rank))  # each rank its own augmentations
    if run.resume is not None:
        checkpointer.restore(run.resume, trainer)
    with run.logger(trainer.total_steps, trainer.state.step) as log:
        log.info(f"{run.run_dir}: CRATE {cfg.model.family} '{cfg.model.variant}' {classes} classes, "
                 + (f"weights from {ft.checkpoint} ({run.weights.describe()}"
                    + (f"; its {run.weights.num_classes}-class head reset" if run.weights.num_classes not in
                       (None, classes) else "") + ")" if run.weights is not None else
                    f"resumed from {run.resume.path}" if run.resume is not None else "from scratch")
                 + f"; {trainer.updates_per_epoch} steps/epoch × {trainer.epochs} epochs, global batch "
                 f"{trainer.global_batch}, peak lr {peak_lr(cfg.optim, trainer.global_batch):.3g}")
        for epoch in trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer):
            for _ in epoch:  # after each optimiser step
                if ema is not None:
                    ema.update(model)
            last = _evaluate(model, ema, val, trainer, log)
            if last["top1"] > best.top1:
                best.top1, best.top5 = last["top1"], last["top5"]
                trainer.save(checkpointer, "best.pth")
        trainer.save(checkpointer, "final.pth")
        result = FinetuneResult(run.run_dir, run.train.spec, ft.checkpoint, classes, trainer.state.step,
                                trainer.summary.first, trainer.summary.last, last["top1"], last["top5"], best.top1,
                                best.top5, int(last["samples"]), model)
        if dist.is_main:
            write_results(run.run_dir, result)
            banner(log, f"val top-1 {last['top1']:.2f} (best {best.top1:.2f}), top-5 {last['top5']:.2f}",
                   [(f"{run.run_dir}/best.pth, final.pth", "the best and the last checkpoint"),
                    (f"{run.run_dir}/results.json", "the figures")], [f"tensorboard --logdir {run.run_dir}/tb"])
    return result


def _loaders(run: StageRun, classes: int) -> tuple[DeviceLoader, ShardLoader]:
    """The training loader (the recipe's augmentation; its batches to the device in the step's thread) and the
    validation loader. Every label is checked against the head's `classes` before a step or an evaluation uses it."""
    cfg, dist, ft = run.cfg, run.dist, run.cfg.finetune
    cuda = dist.device.type == "cuda"
    transform = FinetuneTransform(cfg.model.img_size, auto_augment=ft.auto_augment, re_prob=ft.reprob,
                                  scale=ft.crop_scale, hflip=ft.hflip)
    loader = train_loader(run.train, transform, data=cfg.data, rank=dist.rank, world_size=dist.world_size,
                          seed=cfg.run.seed, accum_steps=cfg.optim.accum_steps, num_classes=classes, pin_memory=cuda,
                          stop_signals=cfg.run.preempt_signals)
    val = eval_loader(run.val, cfg.model.img_size, data=cfg.data, rank=dist.rank, world_size=dist.world_size,
                      num_classes=classes, pin_memory=cuda, stop_signals=cfg.run.preempt_signals)
    return DeviceLoader(loader, device=dist.device, depth=0), val


def _evaluate(model: nn.Module, ema: Any, val: ShardLoader, trainer: Trainer, log: RunLogger) -> dict[str, float]:
    """Top-1 / top-5 of the model (and of its EMA) on the validation set, exact over ranks; logged, and returned."""
    scores = evaluate(model, val, trainer.dist, trainer.precision)
    scalars = {"top1": scores["top1"], "top5": scores["top5"]}
    if ema is not None:
        scalars.update({f"ema_{k}": v for k, v in evaluate(ema.module, val, trainer.dist, trainer.precision).items()
                        if k != "samples"})
    log.scalars(trainer.state.step, scalars, prefix="val")
    log.info(f"epoch {trainer.state.epoch}: val top-1 {scores['top1']:.2f} top-5 {scores['top5']:.2f} "
             f"({scores['samples']} images)" + (f", EMA top-1 {scalars['ema_top1']:.2f}" if ema is not None else ""))
    return scores
