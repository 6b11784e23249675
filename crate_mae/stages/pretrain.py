"""The pretraining stage: a config in; shards, model, optimiser and loop; checkpoints, logs and pictures out.

    result = run_pretrain(load_config("configs/pretrain/demo.yaml"))

Works the same on one CPU, one GPU, or many GPUs and nodes under torchrun (see engine/dist.py). `_run` reads top to
bottom: load (model, loader, optimiser; a resume's state put back in one call), loop (the Trainer's steps, the
online probe after each, the monitor after each epoch), save (final.pth, encoder.pth, the pictures).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crate_mae.atomic import atomic_path
from crate_mae.config import Config
from crate_mae.data import PretrainTransform, ShardList, eval_loader, train_loader
from crate_mae.data.device_decode import DeviceCropTransform
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.engine.checkpoint import Checkpointer
from crate_mae.engine.dist import Dist, broadcast_object
from crate_mae.engine.log import RunLogger, read_events
from crate_mae.engine.optim import peak_lr
from crate_mae.engine.trainer import Trainer
from crate_mae.errors import ShardError
from crate_mae.eval.linear import OnlineProbe
from crate_mae.eval.monitor import Monitor, monitor_figure, monitor_table
from crate_mae.model import Checkpoint, CrateMAE, create_model
from crate_mae.model.files import export_encoder
from crate_mae.model.mae import MaskedObjective
from crate_mae.seeding import mix_seed, seed_everything
from crate_mae.stages.common import REPO, StageRun, banner, run_stage
from crate_mae.viz import reconstruction_grid
from crate_mae.viz.plot import pyplot


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int
    first_loss: float | None  # mean loss of the first logging interval of this process's run
    last_loss: float | None  # mean loss of the last logging interval
    final: Path | None = None  # final.pth (rank 0)
    model: torch.nn.Module | None = None  # the trained CrateMAE of this rank


def build_training(cfg: Config, dist: Dist, train: str | ShardList, weights: Checkpoint | None = None, *,
                   labels: bool = False) -> tuple[Trainer, DeviceLoader]:
    """The Trainer (with the masked objective and the run's batch arithmetic) and the training loader, whose batches
    arrive on the device (prefetched per data.prefetch), of a pretraining run. `cfg.model` must be resolved.

    Shared by the stage and by bench/e2e.py, so that the benchmark times exactly what a run does.
    Seeds the initial weights with run.seed (the same on every rank); `weights` (pretrain.init_from) then fill them
    (`create_model`, strictly): an encoder alone leaves the decoder side (decoder, prediction head, mask token) as
    initialised. Pretraining reads no labels, unless an online probe (`labels`) trains on them.
    """
    seed_everything(cfg.run.seed)
    model = create_model(cfg.model, weights, fresh_decoder=True)[0].to(dist.device)
    size = cfg.model.img_size
    transform = DeviceCropTransform(size) if cfg.data.decode_on == "device" else \
        PretrainTransform(size, fast_decode=cfg.data.fast_decode)
    loader = train_loader(train, transform, data=cfg.data, rank=dist.rank, world_size=dist.world_size,
                          seed=cfg.run.seed, accum_steps=cfg.optim.accum_steps, pin_memory=dist.device.type == "cuda",
                          labels=labels, stop_signals=cfg.run.preempt_signals)
    loader = DeviceLoader(loader, device=dist.device, depth=cfg.data.prefetch)  # to the device, off the step's path
    return Trainer.from_config(cfg, MaskedObjective(model), dist, len(loader)), loader


def run_pretrain(cfg: Config) -> PretrainResult:
    return run_stage(cfg, _run, weights=cfg.pretrain.init_from)


def _run(run: StageRun) -> PretrainResult:
    cfg, dist = run.cfg, run.dist
    classes = _probe_classes(run)
    trainer, loader = build_training(cfg, dist, run.train, run.weights, labels=classes > 0)
    model = trainer.module
    probe = OnlineProbe(cfg.model.dim, classes, lr=cfg.monitor.probe_lr, device=dist.device,
                        seed=mix_seed(cfg.run.seed, "online probe")) if classes else None
    checkpointer = run.checkpointer({"probe": probe} if probe else None)
    seed_everything(mix_seed(cfg.run.seed, "rank", dist.rank))  # each rank its own masks
    if run.resume is not None:
        checkpointer.restore(run.resume, trainer)
    with run.logger(trainer.total_steps, trainer.state.step) as log:
        preview = _preview(cfg, run.val if run.val is not None else run.train, model) if dist.is_main else None
        _say_what_runs(run, trainer, log)
        history = MonitorHistory(run, trainer, log, probe)
        history.catch_up()
        for epoch in trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer):
            for batch in epoch:  # after each optimiser step, on its last micro-batch
                if probe is not None:
                    probe.step(model, batch.images, batch.labels, dist)
            if preview is not None:
                images, noise = preview
                log.image("reconstruction", reconstruction_grid(model, images, noise=noise), trainer.state.step)
            history.after_epoch(trainer.state.epoch)
        if loader.bad:
            log.info(f"data: {loader.bad} of {loader.seen} samples skipped as unusable (the first ones named above)")
        final = trainer.save(checkpointer, "final.pth")
        if dist.is_main:
            _save_outputs(run, trainer, checkpointer, preview, history, log)
    summary = trainer.summary
    return PretrainResult(run.run_dir, trainer.state.step, summary.first, summary.last,
                          final if dist.is_main else None, model)


def _probe_classes(run: StageRun) -> int:
    """The online probe's classes: the training manifest's, when `monitor.probe` asks for one (0: no probe; a line
    says why when it was asked for and the shards carry no labels)."""
    m = run.cfg.monitor
    if not (m.probe and m.every and run.val is not None):
        return 0
    manifest = run.train.manifest
    classes = manifest.num_classes if manifest is not None else 0
    if not classes and run.dist.is_main:
        print(f"monitor: online probe skipped: {run.train.spec} has no labels (its manifest lists no classes)")
    return classes


def _say_what_runs(run: StageRun, trainer: Trainer, log: RunLogger) -> None:
    """The run's first line (rank 0): the model, the devices, the schedule, and where its weights come from."""
    cfg, model, weights = run.cfg, trainer.module, run.weights
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = "CRATE-MAE" if cfg.model.family == "mae" else "CRATE-MAE with a CRATE-α encoder"
    what += ", its encoder on the visible patches only (model.visible_only)" if cfg.model.visible_only else ""
    log.info(f"{run.run_dir}: {what} '{cfg.model.variant}' ({params:,} parameters) on {run.dist.world_size} × "
             f"{run.dist.device.type}, {trainer.precision}; {trainer.updates_per_epoch} steps/epoch × {trainer.epochs} "
             f"epochs, global batch {trainer.global_batch}, peak lr {peak_lr(cfg.optim, trainer.global_batch):.3g}"
             + (f"; resumed from {run.resume.path} at step {trainer.state.step}" if run.resume else "")
             + (f"; weights from {weights.path} ({weights.describe()}"
                + ("" if weights.has_decoder else ": the decoder starts fresh"
                   + (f", its {weights.num_classes}-class head set aside" if weights.num_classes else ""))
                + "), optimiser and schedule new"
                if weights else ""))


def _save_outputs(run: StageRun, trainer: Trainer, checkpointer: Checkpointer,
                  preview: tuple[torch.Tensor, torch.Tensor], history: MonitorHistory, log: RunLogger) -> None:
    """Rank 0, after final.pth: encoder.pth, reconstructions.png, the monitor's figure and table, the closing lines."""
    run_dir, model, summary = run.run_dir, trainer.module, trainer.summary
    export_encoder(model.state_dict(), checkpointer.config, run_dir / "encoder.pth")  # the config it saves
    _save_reconstructions(model, preview, run.cfg.model.img_size, run_dir / "reconstructions.png")
    history.save_figure()
    losses = f", loss {summary.first:.4f} → {summary.last:.4f}" if summary.first is not None else ""
    banner(log, f"{trainer.state.step} steps{losses}", [
        (f"{run_dir}/config.yaml", "the resolved config"),
        (f"{run_dir}/final.pth", "the last checkpoint (ckpt-*.pth: periodic ones)"),
        (f"{run_dir}/encoder.pth", "the pretrained encoder alone"),
        (f"{run_dir}/reconstructions.png", "original | masked | reconstruction | with visible patches"),
        *([(f"{run_dir}/monitor.png", "held-out loss, kNN and the white-box objective per layer, by epoch")]
          if history.history else []),
        (f"{run_dir}/log.jsonl, tb/", "the logs")],
        [f"tensorboard --logdir {run_dir}/tb"] + [f"python {s} --checkpoint {run_dir}/encoder.pth"
                                                  for s in ("linprobe.py", "finetune.py") if (REPO / s).exists()])


def _preview(cfg: Config, shards: ShardList, model: CrateMAE, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The reconstruction pictures' fixed inputs (rank 0), on the model's device: the first uint8 images (B, 3, S, S)
    of `shards`, and their masking noise (B, N) from a generator of run.seed alone (the same masks at every epoch)."""
    loader = eval_loader(shards, cfg.model.img_size, data=cfg.data, batch_size=n, max_bad_fraction=1.0, labels=False,
                         num_workers=0)
    batch = next(iter(loader), None)
    if batch is None:
        raise ShardError(f"{shards.spec}: no usable image for the reconstruction previews")
    noise = torch.rand(len(batch.images), model.patch_embed.num_patches(cfg.model.img_size),
                       generator=torch.Generator().manual_seed(cfg.run.seed))
    device = next(model.parameters()).device
    return batch.images.to(device), noise.to(device)


def _save_reconstructions(model: CrateMAE, preview: tuple[torch.Tensor, torch.Tensor], img_size: int,
                          path: Path) -> None:
    """original | masked | reconstruction | with visible patches, one row per image, as a PNG written atomically;
    small images enlarged (nearest) so that the patches can be seen."""
    from torchvision.utils import save_image

    grid = reconstruction_grid(model, preview[0], noise=preview[1])
    if img_size < 96:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")


class MonitorHistory:
    """The monitor's evaluations in a run (eval/monitor.py measures): once before the first step (the random encoder's
    baseline, or the init_from weights'), after every `monitor.every` epochs and after the last one. Each goes to
    TensorBoard, to log.jsonl as a `monitor` event and to one line; after a resume the history is read back from
    log.jsonl, and an evaluation that a kill at an epoch's end cut off is made first. Collective."""

    def __init__(self, run: StageRun, trainer: Trainer, log: RunLogger, probe: OnlineProbe | None) -> None:
        self.run, self.trainer, self.log, self.every = run, trainer, log, run.cfg.monitor.every
        self.monitor: Monitor | None = None
        self.history: list[dict[str, float]] = []
        if not self.every:
            return
        if run.val is None:
            log.info("monitor: off, the run has no val set (data.val_shards)")
            return
        self.monitor = Monitor(run.cfg.monitor, run.cfg.model, train_spec=run.train, val_spec=run.val,
                               stop_signals=run.cfg.run.preempt_signals,
                               data=run.cfg.data, dist=run.dist, seed=run.cfg.run.seed, precision=trainer.precision,
                               probe=probe)
        for reason in self.monitor.skipped:
            log.info(f"monitor: {reason}")
        if run.resume is not None and run.dist.is_main:
            self.history = read_events(run.run_dir, "monitor", until_step=trainer.state.step)

    def due(self, epoch: int) -> bool:
        return self.monitor is not None and (epoch % self.every == 0 or epoch == self.trainer.epochs)

    def measure(self, epoch: int) -> None:
        step = self.trainer.state.step
        values = self.monitor.evaluate(self.trainer.module)
        self.history.append({"epoch": epoch, "step": step, **values})
        self.log.scalars(step, values, prefix="monitor")
        self.log.event("monitor", step, epoch=epoch, **values)
        knn = f", kNN top-1 {values['knn_cls_top1']:.2f} (CLS)" if "knn_cls_top1" in values else ""
        knn += f", online probe top-1 {values['probe_top1']:.2f}" if "probe_top1" in values else ""
        deep = [k for k in values if k.endswith("/zero_fraction")]
        sparse = f", code zeros (last layer) {values[deep[-1]]:.3f}" if deep else ""
        self.log.info(f"monitor after epoch {epoch} (step {step}): held-out loss {values['heldout_loss']:.4f}{knn}{sparse}")

    def catch_up(self) -> None:
        """Before the loop: the baseline of a fresh run, or the evaluation a kill cut off after its epoch's end."""
        state = self.trainer.state
        if self.monitor is None:
            return
        if state.step == 0:
            self.measure(0)
        elif state.batch_in_epoch == 0 and self.due(state.epoch):
            done = {row["epoch"] for row in self.history}
            missing = broadcast_object(self.run.dist, state.epoch not in done)  # only rank 0 read the history
            if missing:  # the run was killed between an epoch's last checkpoint and its evaluation
                self.measure(state.epoch)

    def after_epoch(self, epoch: int) -> None:
        if self.due(epoch):
            self.measure(epoch)

    def save_figure(self) -> None:
        """Rank 0, at the end: the figure (monitor.png, written atomically) and the table of the whole history."""
        if not self.history:
            return
        fig = monitor_figure(self.history)
        with atomic_path(self.run.run_dir / "monitor.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        pyplot().close(fig)
        self.log.info("\n" + monitor_table(self.history))
