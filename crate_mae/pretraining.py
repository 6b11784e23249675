"""The pretraining stage: a config in; shards, model, optimiser and loop; checkpoints, logs and pictures out.

    result = run_pretrain(load_config("configs/pretrain/demo.yaml"))

Works the same on one CPU, one GPU, or many GPUs and nodes under torchrun (see engine/dist.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from crate_mae.config import Config, ConfigError, save_config
from crate_mae.data import EvalTransform, PretrainTransform, eval_loader
from crate_mae.data.reader import ShardLoader, config_train_loader
from crate_mae.data.device_decode import DeviceCropTransform, images_on
from crate_mae.data.prefetch import Prefetcher
from crate_mae.data.transforms import normalise
from crate_mae.data.shards import stage_data
from crate_mae.engine import checkpoint as ckpt
from crate_mae.engine import dist
from crate_mae.engine.log import RunLogger
from crate_mae.engine.loop import StageTrainer, fit, stage_trainer
from crate_mae.engine.optim import peak_lr
from crate_mae.model import build_mae
from crate_mae.viz import reconstruction_grid


REPO = Path(__file__).resolve().parent.parent  # where the entry points live


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    first_loss: float | None  # mean loss of the first logging interval of this process's run
    last_loss: float | None  # mean loss of the last logging interval
    final: Path | None = None  # final.pth (rank 0)
    model: torch.nn.Module | None = None  # the trained CrateMAE of this rank


def _preview_batch(cfg: Config, train_spec: str, val_spec: str | None, n: int = 8) -> torch.Tensor:
    """A fixed set of images for reconstruction pictures: the first of the val set (else of train)."""
    spec = val_spec or train_spec
    loader = eval_loader(spec, EvalTransform(cfg.model.img_size, crop_pct=cfg.data.eval_crop_pct), batch_size=n,
                         max_bad_fraction=1.0)
    return normalise(next(iter(loader)).images)


def run_pretrain(cfg: Config) -> PretrainResult:
    return dist.run_with(cfg.run.device, lambda d: _run(cfg, d, Path(cfg.run.out_dir) / cfg.run.name))


def build_training(cfg: Config, d: dist.Dist, train_spec: str) -> tuple[StageTrainer, ShardLoader | Prefetcher]:
    """The Trainer (with the model and the run's batch arithmetic) and the training loader (prefetching per
    data.prefetch) of a pretraining run.

    Shared by the stage and by bench/e2e.py, so that the benchmark times exactly what a run does.
    Seeds the initial weights with run.seed (the same on every rank). `cfg.model` must be resolved.
    """
    if not cfg.model.resolved:
        raise ValueError("build_training: resolve cfg.model first (checkpoint.resolve_for_resume)")
    dist.seed_everything(cfg.run.seed)
    model = build_mae(cfg.model).to(d.device)
    size, accum = cfg.model.img_size, cfg.optim.accum_steps
    transform = DeviceCropTransform(size) if cfg.data.decode_on == "device" else \
        PretrainTransform(size, fast_decode=cfg.data.fast_decode)
    loader: ShardLoader | Prefetcher = config_train_loader(
        cfg.data, train_spec, transform, rank=d.rank, world_size=d.world_size, seed=cfg.run.seed,
        accum_steps=accum, pin_memory=d.device.type == "cuda")
    if cfg.data.prefetch:  # the copy to the device (and a device decode) off the step's critical path
        loader = Prefetcher(loader, lambda b: b._replace(images=images_on(b.images, size, d.device)),
                            device=d.device, depth=cfg.data.prefetch)
    return stage_trainer(cfg, model, d, lambda m, b: m(normalise(images_on(b.images, size, d.device))).loss,
                         len(loader)), loader


def _run(cfg: Config, d: dist.Dist, run_dir: Path) -> PretrainResult:
    resume = ckpt.resume_path(run_dir, cfg.run.resume)
    if cfg.model.family not in (None, "mae"):
        raise ConfigError(f"model.family: pretraining trains a CRATE-MAE (family mae), got {cfg.model.family!r}")
    cfg = replace(cfg, model=ckpt.resolve_for_resume(cfg.model, resume))  # what is built, and saved in config.yaml
    train_spec, val_spec = stage_data(cfg.data, img_size=cfg.model.img_size, is_main=d.is_main,
                                      barrier=lambda: dist.barrier(d))
    (trainer, updates_per_epoch, global_batch), loader = build_training(cfg, d, train_spec)
    model, accum = trainer.module, cfg.optim.accum_steps
    total_steps = cfg.optim.epochs * updates_per_epoch
    dist.seed_everything(cfg.run.seed + 1 + d.rank)  # each rank its own masks
    if resume is not None:
        ckpt.restore(trainer, resume, cfg, d, len(loader))

    log = RunLogger(run_dir, enabled=d.is_main, total_steps=total_steps, initial_step=trainer.state.step)
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
        preview = _preview_batch(cfg, train_spec, val_spec).to(d.device)
        preview_noise = torch.rand(preview.shape[0], model.patch_embed.num_patches(cfg.model.img_size),
                                   generator=torch.Generator().manual_seed(cfg.run.seed)).to(d.device)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(f"{run_dir}: CRATE-MAE '{cfg.model.variant}' ({params:,} parameters) on {d.world_size} × {d.device.type}, "
                 f"{trainer.precision}; {updates_per_epoch} steps/epoch × {cfg.optim.epochs} epochs, global batch "
                 f"{global_batch}, peak lr {peak_lr(cfg.optim, global_batch):.3g}"
                 + (f"; resumed from {resume} at step {trainer.state.step}" if resume else ""))

    def save(name: str) -> None:
        ckpt.save_training(run_dir / name, trainer, cfg, d, keep_last=cfg.run.keep_last)

    def pictures(epoch: int) -> None:
        if d.is_main:
            log.image("reconstruction", reconstruction_grid(model, preview, noise=preview_noise), trainer.state.step)

    summary = fit(trainer, loader, epochs=cfg.optim.epochs, accum_steps=accum, log_every=cfg.run.log_every,
                  ckpt_every=cfg.run.ckpt_every, global_batch=global_batch, log=log, save=save, on_epoch_end=pictures)
    if loader.skipped:
        log.info(f"data: {loader.skipped} of {loader.seen} samples skipped as unusable (see the warnings above)")
    save("final.pth")
    final = run_dir / "final.pth"
    if d.is_main:
        ckpt.export_encoder(ckpt.load(final), run_dir / "encoder.pth")
        from torchvision.utils import save_image
        grid = reconstruction_grid(model, preview, noise=preview_noise)
        if cfg.model.img_size < 96:  # small images: enlarge (nearest) so the patches can be seen
            grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
        save_image(grid, run_dir / "reconstructions.png")
        losses = f", loss {summary.first:.4f} → {summary.last:.4f}" if summary.first is not None else ""
        log.info(f"\ndone: {trainer.state.step} steps{losses}\n"
                 f"  {run_dir}/config.yaml         the resolved config\n"
                 f"  {run_dir}/final.pth           the last checkpoint (ckpt-*.pth: periodic ones)\n"
                 f"  {run_dir}/encoder.pth         the pretrained encoder alone\n"
                 f"  {run_dir}/reconstructions.png original | masked | reconstruction | with visible patches\n"
                 f"  {run_dir}/log.jsonl, tb/      the logs\n"
                 f"next:\n  tensorboard --logdir {run_dir}/tb"
                 + "".join(f"\n  python {stage} --checkpoint {run_dir}/encoder.pth" for stage in ("linprobe.py", "finetune.py")
                           if (REPO / stage).exists()))
    log.close()
    return PretrainResult(run_dir, trainer.state.step, summary.first, summary.last, final if d.is_main else None, model)
