"""The pretraining stage: a config in; shards, model, optimiser and loop; checkpoints, logs and pictures out.

    result = run_pretrain(load_config("configs/pretrain/demo.yaml"))

Works the same on one CPU, one GPU, or many GPUs and nodes under torchrun (see engine/dist.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from crate_mae.config import Config, ConfigError
from crate_mae.data import EvalTransform, PretrainTransform, ShardError, eval_loader
from crate_mae.data.device_decode import DeviceCropTransform, to_device
from crate_mae.data.prefetch import Prefetcher
from crate_mae.data.reader import ShardLoader, config_train_loader
from crate_mae.engine import checkpoint as ckpt
from crate_mae.engine import dist
from crate_mae.seeding import seed_everything
from crate_mae.engine.optim import peak_lr
from crate_mae.engine.trainer import Trainer
from crate_mae.model import build_mae
from crate_mae.stages.common import REPO, StageRun, banner, run_stage, stage_data
from crate_mae.viz import reconstruction_grid


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    first_loss: float | None  # mean loss of the first logging interval of this process's run
    last_loss: float | None  # mean loss of the last logging interval
    final: Path | None = None  # final.pth (rank 0)
    model: torch.nn.Module | None = None  # the trained CrateMAE of this rank


def build_training(cfg: Config, d: dist.Dist, train_spec: str) -> tuple[Trainer, ShardLoader | Prefetcher]:
    """The Trainer (with the model and the run's batch arithmetic) and the training loader (prefetching per
    data.prefetch) of a pretraining run. `cfg.model` must be resolved.

    Shared by the stage and by bench/e2e.py, so that the benchmark times exactly what a run does.
    Seeds the initial weights with run.seed (the same on every rank).
    """
    if not cfg.model.resolved:
        raise ValueError("build_training: resolve cfg.model first (checkpoint.resolve_for_resume)")
    seed_everything(cfg.run.seed)
    model = build_mae(cfg.model).to(d.device)
    size = cfg.model.img_size
    transform = DeviceCropTransform(size) if cfg.data.decode_on == "device" else \
        PretrainTransform(size, fast_decode=cfg.data.fast_decode)
    loader: ShardLoader | Prefetcher = config_train_loader(
        cfg.data, train_spec, transform, rank=d.rank, world_size=d.world_size, seed=cfg.run.seed,
        accum_steps=cfg.optim.accum_steps, pin_memory=d.device.type == "cuda", labels=False)  # no labels needed
    ready = functools.partial(to_device, size=size, device=d.device)
    if cfg.data.prefetch:  # the copy to the device (and a device decode) off the step's critical path
        loader = Prefetcher(loader, ready, device=d.device, depth=cfg.data.prefetch)
    return Trainer.from_config(cfg, model, d, lambda m, b: m(ready(b).images).loss, len(loader)), loader


def _preview(cfg: Config, train_spec: str, val_spec: str | None, n: int = 8) -> torch.Tensor:
    """A fixed set of uint8 images for reconstruction pictures: the first of the val set (else of train)."""
    spec = val_spec or train_spec
    loader = eval_loader(spec, EvalTransform(cfg.model.img_size, crop_pct=cfg.data.eval_crop_pct), batch_size=n,
                         max_bad_fraction=1.0, labels=False)
    batch = next(iter(loader), None)
    if batch is None:
        raise ShardError(f"{spec}: no usable image for the reconstruction previews")
    return batch.images


def run_pretrain(cfg: Config) -> PretrainResult:
    return run_stage(cfg, _run)


def _run(run: StageRun) -> PretrainResult:
    if run.cfg.model.family not in (None, "mae"):
        raise ConfigError(f"model.family: pretraining trains a CRATE-MAE (family mae), got {run.cfg.model.family!r}")
    cfg = run.cfg = replace(run.cfg, model=ckpt.resolve_for_resume(run.cfg.model, run.resume))  # what is built
    d, run_dir = run.d, run.run_dir
    train_spec, val_spec = stage_data(cfg, d)
    trainer, loader = build_training(cfg, d, train_spec)
    model, checkpointer = trainer.module, run.checkpointer()
    seed_everything(cfg.run.seed + 1 + d.rank)  # each rank its own masks
    if run.resume is not None:
        checkpointer.restore(trainer, run.resume, cfg)
    with run.logger(trainer, checkpointer) as log:
        if d.is_main:
            preview = _preview(cfg, train_spec, val_spec).to(d.device)
            noise = torch.rand(preview.shape[0], model.patch_embed.num_patches(cfg.model.img_size),
                               generator=torch.Generator().manual_seed(cfg.run.seed)).to(d.device)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info(f"{run_dir}: CRATE-MAE '{cfg.model.variant}' ({params:,} parameters) on {d.world_size} × "
                     f"{d.device.type}, {trainer.precision}; {trainer.updates_per_epoch} steps/epoch × {trainer.epochs} "
                     f"epochs, global batch {trainer.global_batch}, peak lr {peak_lr(cfg.optim, trainer.global_batch):.3g}"
                     + (f"; resumed from {run.resume} at step {trainer.state.step}" if run.resume else ""))

        def pictures(epoch: int) -> None:
            if d.is_main:
                log.image("reconstruction", reconstruction_grid(model, preview, noise=noise), trainer.state.step)

        summary = trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer,
                              on_epoch_end=pictures)
        if loader.bad:
            log.info(f"data: {loader.bad} of {loader.seen} samples skipped as unusable (see the warnings above)")
        final = checkpointer.save(trainer, "final.pth")
        if d.is_main:
            ckpt.export_encoder(ckpt.load(final), run_dir / "encoder.pth")
            _save_reconstructions(model, preview, noise, cfg.model.img_size, run_dir / "reconstructions.png")
            losses = f", loss {summary.first:.4f} → {summary.last:.4f}" if summary.first is not None else ""
            banner(log, f"{trainer.state.step} steps{losses}", [
                (f"{run_dir}/config.yaml", "the resolved config"),
                (f"{run_dir}/final.pth", "the last checkpoint (ckpt-*.pth: periodic ones)"),
                (f"{run_dir}/encoder.pth", "the pretrained encoder alone"),
                (f"{run_dir}/reconstructions.png", "original | masked | reconstruction | with visible patches"),
                (f"{run_dir}/log.jsonl, tb/", "the logs")],
                [f"tensorboard --logdir {run_dir}/tb"] + [f"python {s} --checkpoint {run_dir}/encoder.pth"
                                                          for s in ("linprobe.py", "finetune.py") if (REPO / s).exists()])
    return PretrainResult(run_dir, trainer.state.step, summary.first, summary.last, final if d.is_main else None, model)


def _save_reconstructions(model: torch.nn.Module, preview: torch.Tensor, noise: torch.Tensor, img_size: int,
                          path: Path) -> None:
    from torchvision.utils import save_image

    grid = reconstruction_grid(model, preview, noise=noise)
    if img_size < 96:  # small images: enlarge (nearest) so the patches can be seen
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    save_image(grid, path)
