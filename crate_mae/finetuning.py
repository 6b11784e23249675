"""The fine-tuning stage: the pretrained encoder (or none: supervised CRATE from scratch) as a CrateClassifier.

    result = run_finetune(load_config("configs/finetune/demo.yaml"))

timm supplies the recipe's pieces: RandAugment and random erasing (the transform), Mixup / CutMix with
label smoothing (SoftTargetCrossEntropy), layer-wise lr decay groups, the weight EMA. Top-1 / top-5 are
evaluated after every epoch, exactly over all ranks; `best.pth` keeps the best epoch, `final.pth` the last.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from crate_mae.config import Config, ConfigError, save_config
from crate_mae.data import FinetuneTransform, resolve_shards
from crate_mae.data.reader import config_eval_loader, config_train_loader
from crate_mae.data.shards import stage_data
from crate_mae.data.transforms import normalise
from crate_mae.engine import checkpoint as ckpt
from crate_mae.engine import dist
from crate_mae.engine.log import RunLogger
from crate_mae.engine.loop import evaluate, fit, stage_trainer
from crate_mae.engine.optim import peak_lr
from crate_mae.model import CrateClassifier, hub


@dataclass
class FinetuneResult:
    run_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    top1: float  # after the last epoch
    top5: float
    best_top1: float
    model: nn.Module


def classifier_config(cfg: Config, checkpoint: str | None, *, default_family: str = "mae"
                      ) -> tuple[Config, hub.Checkpoint | None]:
    """The stage's config with its model section resolved against `checkpoint` (read once, here), before any data
    is prepared at the model's image size: unset fields take the checkpoint's values, a set one that differs is an
    error naming it (`hub.model_config`)."""
    try:
        ckpt = hub.read_checkpoint(checkpoint) if checkpoint is not None else None
    except FileNotFoundError as err:
        hint = " (the demo's encoder comes from `python pretrain.py`)" if "runs/demo" in str(checkpoint) else ""
        raise FileNotFoundError(f"{err}{hint}") from None
    model_cfg = hub.model_config(cfg.model, ckpt, kind="classifier", default_family=default_family)
    return dataclasses.replace(cfg, model=model_cfg), ckpt


def classifier_for(cfg: Config, ckpt: hub.Checkpoint | None, num_classes: int) -> tuple[CrateClassifier, Config]:
    """A classifier of the (resolved) `cfg.model` for `num_classes`, filled strictly from `ckpt` (None: fresh; a head
    of another class count is replaced), and the config with what was really built."""
    model, model_cfg = hub.create_model(cfg.model, kind="classifier", checkpoint=ckpt, num_classes=num_classes)
    return model, dataclasses.replace(cfg, model=model_cfg)


def labelled_data(cfg: Config, d: dist.Dist) -> tuple[Config, str, str, int]:
    """(config, train spec, val spec, classes) of a classification stage.

    model.num_classes follows the training manifest's class list (the configured value when it has none).
    """
    train_spec, val_spec = stage_data(cfg.data, img_size=cfg.model.img_size, is_main=d.is_main,
                                      barrier=lambda: dist.barrier(d))
    if val_spec is None:
        raise ConfigError("data.val_shards: accuracy is measured on a validation set; set one")
    manifest = resolve_shards(train_spec).manifest
    classes = manifest.num_classes if manifest is not None and manifest.num_classes else cfg.model.num_classes
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes)), train_spec, val_spec, classes


def run_finetune(cfg: Config) -> FinetuneResult:
    return dist.run_with(cfg.run.device, lambda d: _run(cfg, d, Path(cfg.run.out_dir) / cfg.run.name))


def _run(cfg: Config, d: dist.Dist, run_dir: Path) -> FinetuneResult:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.utils import ModelEmaV2

    ft, accum, batch = cfg.finetune, cfg.optim.accum_steps, cfg.data.batch_size
    resume = ckpt.resume_path(run_dir, cfg.run.resume)
    cfg, weights = classifier_config(cfg, ft.checkpoint, default_family="mae" if ft.checkpoint else "supervised")
    cfg, train_spec, val_spec, classes = labelled_data(cfg, d)
    mixing = ft.mixup > 0 or ft.cutmix > 0
    if mixing and batch % 2:
        raise ConfigError(f"data.batch_size: Mixup / CutMix pair the images of a batch, so it must be even, got {batch}")

    dist.seed_everything(cfg.run.seed)  # the same initial head on every rank
    model, cfg = classifier_for(cfg, weights, classes)
    model = model.to(d.device)
    transform = FinetuneTransform(cfg.model.img_size, auto_augment=ft.auto_augment, re_prob=ft.reprob,
                                  scale=ft.crop_scale, hflip=ft.hflip)
    cuda = d.device.type == "cuda"
    loader = config_train_loader(cfg.data, train_spec, transform, rank=d.rank, world_size=d.world_size,
                                 seed=cfg.run.seed, accum_steps=accum, pin_memory=cuda)
    val = config_eval_loader(cfg.data, val_spec, cfg.model.img_size, rank=d.rank, world_size=d.world_size,
                             pin_memory=cuda)
    mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.smoothing,
                  num_classes=classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else (
        LabelSmoothingCrossEntropy(ft.smoothing) if ft.smoothing > 0 else nn.CrossEntropyLoss())

    def loss_fn(m: nn.Module, b) -> torch.Tensor:
        x, y = b.images.to(d.device, non_blocking=True), b.labels.to(d.device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        return criterion(m(normalise(x)), y)

    trainer, updates_per_epoch, global_batch = stage_trainer(cfg, model, d, loss_fn, len(loader))
    ema = ModelEmaV2(model, decay=ft.ema_decay) if ft.ema_decay else None
    dist.seed_everything(cfg.run.seed + 1 + d.rank)
    best = {"top1": -1.0, "top5": 0.0}
    if resume is not None:
        state = ckpt.restore(trainer, resume, cfg, d, len(loader))
        best = state.get("best", best)
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])

    log = RunLogger(run_dir, enabled=d.is_main, total_steps=cfg.optim.epochs * updates_per_epoch,
                    initial_step=trainer.state.step)
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info(f"{run_dir}: CRATE {cfg.model.family} '{cfg.model.variant}' {classes} classes, "
                 + (f"encoder from {ft.checkpoint}" if ft.checkpoint else "from scratch")
                 + f"; {updates_per_epoch} steps/epoch × {cfg.optim.epochs} epochs, global batch {global_batch}, "
                 f"peak lr {peak_lr(cfg.optim, global_batch):.3g}")

    def extra() -> dict:
        return {"best": best, **({"ema": ema.module.state_dict()} if ema is not None else {})}

    def save(name: str) -> None:
        ckpt.save_training(run_dir / name, trainer, cfg, d, keep_last=cfg.run.keep_last, extra=extra())

    last = {"top1": 0.0, "top5": 0.0}

    def end_of_epoch(epoch: int) -> None:
        last.update(evaluate(model, val, d, trainer.precision))
        scalars = {"top1": last["top1"], "top5": last["top5"]}
        if ema is not None:
            scalars.update({f"ema_{k}": v for k, v in evaluate(ema.module, val, d, trainer.precision).items()
                            if k != "samples"})
        log.scalars(trainer.state.step, scalars, prefix="val")
        log.info(f"epoch {epoch}: val top-1 {last['top1']:.2f} top-5 {last['top5']:.2f} ({last['samples']} images)"
                 + (f", EMA top-1 {scalars['ema_top1']:.2f}" if ema is not None else ""))
        if last["top1"] > best["top1"]:
            best.update(top1=last["top1"], top5=last["top5"])
            save("best.pth")

    summary = fit(trainer, loader, epochs=cfg.optim.epochs, accum_steps=accum, log_every=cfg.run.log_every,
                  ckpt_every=cfg.run.ckpt_every, global_batch=global_batch, log=log, save=save,
                  on_epoch_end=end_of_epoch, after_step=(lambda: ema.update(model)) if ema is not None else None)
    save("final.pth")
    if d.is_main:
        result = {"dataset": train_spec, "checkpoint": ft.checkpoint, "classes": classes, "top1": last["top1"],
                  "top5": last["top5"], "best_top1": best["top1"], "best_top5": best["top5"],
                  "samples": last.get("samples", 0), "steps": trainer.state.step}
        (run_dir / "results.json").write_text(json.dumps(result, indent=1))
        log.info(f"\ndone: val top-1 {last['top1']:.2f} (best {best['top1']:.2f}), top-5 {last['top5']:.2f}\n"
                 f"  {run_dir}/best.pth, final.pth  the best and the last checkpoint\n"
                 f"  {run_dir}/results.json       the figures\n  tensorboard --logdir {run_dir}/tb")
    log.close()
    return FinetuneResult(run_dir, trainer.state.step, summary.first, summary.last, last["top1"], last["top5"],
                          best["top1"], model)
