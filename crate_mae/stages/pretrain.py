"""The pretraining stage: a config in; shards, model, optimiser and loop; checkpoints, logs and pictures out.

    result = run_pretrain(load_config("configs/pretrain/demo.yaml"))

Works the same on one CPU, one GPU, or many GPUs and nodes under torchrun (see engine/dist.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crate_mae.config import Config, config_to_dict
from crate_mae.data import PretrainTransform, ShardError, eval_loader, train_loader
from crate_mae.data.device_decode import DeviceCropTransform
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.engine import dist
from crate_mae.engine.optim import peak_lr
from crate_mae.engine.trainer import Trainer
from crate_mae.model import build_model
from crate_mae.model.files import export_encoder
from crate_mae.seeding import seed_everything
from crate_mae.stages.common import REPO, StageRun, banner, run_stage
from crate_mae.viz import reconstruction_grid


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    first_loss: float | None  # mean loss of the first logging interval of this process's run
    last_loss: float | None  # mean loss of the last logging interval
    final: Path | None = None  # final.pth (rank 0)
    model: torch.nn.Module | None = None  # the trained CrateMAE of this rank


def build_training(cfg: Config, d: dist.Dist, train_spec: str) -> tuple[Trainer, DeviceLoader]:
    """The Trainer (with the model and the run's batch arithmetic) and the training loader, whose batches arrive on
    the device (prefetched per data.prefetch), of a pretraining run. `cfg.model` must be resolved.

    Shared by the stage and by bench/e2e.py, so that the benchmark times exactly what a run does.
    Seeds the initial weights with run.seed (the same on every rank).
    """
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model).to(d.device)
    size = cfg.model.img_size
    transform = DeviceCropTransform(size) if cfg.data.decode_on == "device" else \
        PretrainTransform(size, fast_decode=cfg.data.fast_decode)
    loader = train_loader(train_spec, transform, data=cfg.data, rank=d.rank, world_size=d.world_size,
                          seed=cfg.run.seed, accum_steps=cfg.optim.accum_steps, pin_memory=d.device.type == "cuda",
                          labels=False)  # pretraining reads no labels
    loader = DeviceLoader(loader, device=d.device, depth=cfg.data.prefetch)  # to the device once, off the step's path
    return Trainer.from_config(cfg, model, d, lambda m, b: m(b.images).loss, len(loader)), loader


def _preview(cfg: Config, spec: str, n: int = 8) -> torch.Tensor:
    """A fixed set of uint8 images for reconstruction pictures: the first of the val set (else of train)."""
    loader = eval_loader(spec, cfg.model.img_size, data=cfg.data, batch_size=n, max_bad_fraction=1.0, labels=False,
                         num_workers=0)
    batch = next(iter(loader), None)
    if batch is None:
        raise ShardError(f"{spec}: no usable image for the reconstruction previews")
    return batch.images


def run_pretrain(cfg: Config) -> PretrainResult:
    return run_stage(cfg, _run)


def _run(run: StageRun) -> PretrainResult:
    cfg, d, run_dir = run.cfg, run.d, run.run_dir
    trainer, loader = build_training(cfg, d, run.train_spec)
    model, checkpointer = trainer.module, run.checkpointer()
    seed_everything(cfg.run.seed + 1 + d.rank)  # each rank its own masks
    if run.resume is not None:
        trainer.load_state_dict(checkpointer.restore(run.resume))
    with run.logger(trainer.total_steps, trainer.state.step) as log:
        if d.is_main:
            preview = _preview(cfg, run.val_spec or run.train_spec).to(d.device)
            noise = torch.rand(preview.shape[0], model.patch_embed.num_patches(cfg.model.img_size),
                               generator=torch.Generator().manual_seed(cfg.run.seed)).to(d.device)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info(f"{run_dir}: CRATE-MAE '{cfg.model.variant}' ({params:,} parameters) on {d.world_size} × "
                     f"{d.device.type}, {trainer.precision}; {trainer.updates_per_epoch} steps/epoch × {trainer.epochs} "
                     f"epochs, global batch {trainer.global_batch}, peak lr {peak_lr(cfg.optim, trainer.global_batch):.3g}"
                     + (f"; resumed from {run.resume.path} at step {trainer.state.step}" if run.resume else ""))

        def pictures(epoch: int) -> None:
            if d.is_main:
                log.image("reconstruction", reconstruction_grid(model, preview, noise=noise), trainer.state.step)

        summary = trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer,
                              on_epoch_end=pictures)
        if loader.bad:
            log.info(f"data: {loader.bad} of {loader.seen} samples skipped as unusable (see the warnings above)")
        final = checkpointer.save("final.pth", trainer.state_dict())
        if d.is_main:
            export_encoder(model.state_dict(), config_to_dict(cfg), run_dir / "encoder.pth")
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
