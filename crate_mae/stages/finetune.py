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

import torch
import torch.nn as nn

from crate_mae.config import Config, ConfigError, FinetuneConfig
from crate_mae.data import FinetuneTransform, eval_loader, train_loader
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.engine.optim import peak_lr
from crate_mae.engine.trainer import Trainer
from crate_mae.eval.metrics import evaluate
from crate_mae.model import create_model
from crate_mae.model.layers import Normalize
from crate_mae.seeding import seed_everything
from crate_mae.engine.checkpoint import Best
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


def _loss(ft: FinetuneConfig, classes: int, batch_size: int) -> tuple[Callable[[Any], Any] | None, nn.Module]:
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

    cfg, d, ft = run.cfg, run.d, run.cfg.finetune
    classes = cfg.model.num_classes
    mixup, criterion = _loss(ft, classes, cfg.data.batch_size)
    seed_everything(cfg.run.seed)  # the same initial head on every rank
    model = create_model(cfg.model, run.weights)[0].to(d.device)
    cuda = d.device.type == "cuda"
    loader = train_loader(run.train_spec, FinetuneTransform(
        cfg.model.img_size, auto_augment=ft.auto_augment, re_prob=ft.reprob, scale=ft.crop_scale, hflip=ft.hflip),
        data=cfg.data, rank=d.rank, world_size=d.world_size, seed=cfg.run.seed, accum_steps=cfg.optim.accum_steps,
        num_classes=classes, pin_memory=cuda)  # every label checked against the head before a step uses it
    loader = DeviceLoader(loader, device=d.device, depth=0)  # to the device once, in the step's thread
    normalize = Normalize().to(d.device)
    val = eval_loader(run.val_spec, cfg.model.img_size, data=cfg.data, rank=d.rank, world_size=d.world_size,
                      num_classes=classes, pin_memory=cuda)

    def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
        if mixup is None:
            return criterion(m(b.images), b.labels)
        # Mixup / CutMix mix normalised images, as in timm's own pipeline: the model takes them as such (float input
        # is normalised by contract, model/layers.py: Normalize); uint8 pixels cannot hold a mixture.
        x, y = mixup(normalize(b.images), b.labels)
        return criterion(m(x), y)

    trainer = Trainer.from_config(cfg, model, d, loss_fn, len(loader))
    ema = ModelEmaV2(model, decay=ft.ema_decay) if ft.ema_decay else None
    best, last = Best(), {"top1": 0.0, "top5": 0.0, "samples": 0}
    checkpointer = run.checkpointer({"best": best, **({"ema": ema.module} if ema else {})})
    seed_everything(cfg.run.seed + 1 + d.rank)
    if run.resume is not None:
        trainer.load_state_dict(checkpointer.restore(run.resume))
    with run.logger(trainer.total_steps, trainer.state.step) as log:
        log.info(f"{run.run_dir}: CRATE {cfg.model.family} '{cfg.model.variant}' {classes} classes, "
                 + (f"weights from {ft.checkpoint}" if ft.checkpoint else "from scratch")
                 + f"; {trainer.updates_per_epoch} steps/epoch × {trainer.epochs} epochs, global batch "
                 f"{trainer.global_batch}, peak lr {peak_lr(cfg.optim, trainer.global_batch):.3g}")

        def end_of_epoch(epoch: int) -> None:
            last.update(evaluate(model, val, d, trainer.precision))
            scalars = {"top1": last["top1"], "top5": last["top5"]}
            if ema is not None:
                scalars.update({f"ema_{k}": v for k, v in evaluate(ema.module, val, d, trainer.precision).items()
                                if k != "samples"})
            log.scalars(trainer.state.step, scalars, prefix="val")
            log.info(f"epoch {epoch}: val top-1 {last['top1']:.2f} top-5 {last['top5']:.2f} ({last['samples']} images)"
                     + (f", EMA top-1 {scalars['ema_top1']:.2f}" if ema is not None else ""))
            if last["top1"] > best.top1:
                best.top1, best.top5 = last["top1"], last["top5"]
                checkpointer.save("best.pth", trainer.state_dict())

        summary = trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer,
                              on_epoch_end=end_of_epoch, after_step=(lambda: ema.update(model)) if ema else None)
        checkpointer.save("final.pth", trainer.state_dict())
        result = FinetuneResult(run.run_dir, run.train_spec, ft.checkpoint, classes, trainer.state.step, summary.first,
                                summary.last, last["top1"], last["top5"], best.top1, best.top5,
                                int(last["samples"]), model)
        if d.is_main:
            write_results(run.run_dir, result)
            banner(log, f"val top-1 {last['top1']:.2f} (best {best.top1:.2f}), top-5 {last['top5']:.2f}",
                   [(f"{run.run_dir}/best.pth, final.pth", "the best and the last checkpoint"),
                    (f"{run.run_dir}/results.json", "the figures")], [f"tensorboard --logdir {run.run_dir}/tb"])
    return result
