"""The pretraining stage: a config in; shards, model, optimiser and loop; checkpoints, logs and pictures out.

    result = run_pretrain(load_config("configs/pretrain/demo.yaml"))

Works the same on one CPU, one GPU, or many GPUs and nodes under torchrun (see engine/dist.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crate_mae.config import Config
from crate_mae.data import PretrainTransform, ShardError, eval_loader, resolve_shards, train_loader
from crate_mae.data.device_decode import DeviceCropTransform
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.engine import dist
from crate_mae.engine.optim import peak_lr
from crate_mae.engine.log import RunLogger, read_events
from crate_mae.engine.trainer import Trainer
from crate_mae.eval.linear import OnlineProbe
from crate_mae.eval.monitor import Monitor, monitor_figure, monitor_table
from crate_mae.errors import CheckpointError
from crate_mae.model import Checkpoint, build_model
from crate_mae.model.hub import load_weights
from crate_mae.model.mae import MaskedObjective
from crate_mae.model.files import export_encoder
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


def build_training(cfg: Config, d: dist.Dist, train_spec: str, weights: Checkpoint | None = None, *,
                   labels: bool = False) -> tuple[Trainer, DeviceLoader]:
    """The Trainer (with the model and the run's batch arithmetic) and the training loader, whose batches arrive on
    the device (prefetched per data.prefetch), of a pretraining run. `cfg.model` must be resolved.

    Shared by the stage and by bench/e2e.py, so that the benchmark times exactly what a run does.
    Seeds the initial weights with run.seed (the same on every rank); `weights` (pretrain.init_from) then fill them,
    strictly: an encoder alone leaves the decoder side (decoder, prediction head, mask token) as initialised.
    Pretraining reads no labels, unless an online probe (`labels`) trains on them.
    """
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model)
    if weights is not None:
        try:
            load_weights(model, weights.state, fresh_decoder=True)
        except CheckpointError as err:
            raise CheckpointError(f"{weights.path}: {err}") from None
    model = model.to(d.device)
    size = cfg.model.img_size
    transform = DeviceCropTransform(size) if cfg.data.decode_on == "device" else \
        PretrainTransform(size, fast_decode=cfg.data.fast_decode)
    loader = train_loader(train_spec, transform, data=cfg.data, rank=d.rank, world_size=d.world_size,
                          seed=cfg.run.seed, accum_steps=cfg.optim.accum_steps, pin_memory=d.device.type == "cuda",
                          labels=labels)
    loader = DeviceLoader(loader, device=d.device, depth=cfg.data.prefetch)  # to the device once, off the step's path
    return Trainer.from_config(cfg, model, d, lambda net, b: net(b.images).loss, len(loader),
                               objective=MaskedObjective(model)), loader


def _preview(cfg: Config, spec: str, n: int = 8) -> torch.Tensor:
    """A fixed set of uint8 images for reconstruction pictures: the first of the val set (else of train)."""
    loader = eval_loader(spec, cfg.model.img_size, data=cfg.data, batch_size=n, max_bad_fraction=1.0, labels=False,
                         num_workers=0)
    batch = next(iter(loader), None)
    if batch is None:
        raise ShardError(f"{spec}: no usable image for the reconstruction previews")
    return batch.images


def run_pretrain(cfg: Config) -> PretrainResult:
    return run_stage(cfg, _run, weights=cfg.pretrain.init_from)


def _run(run: StageRun) -> PretrainResult:
    cfg, d, run_dir = run.cfg, run.d, run.run_dir
    classes = _probe_classes(run)
    trainer, loader = build_training(cfg, d, run.train_spec, run.weights, labels=classes > 0)
    probe = OnlineProbe(cfg.model.dim, classes, lr=cfg.monitor.probe_lr, device=d.device,
                        seed=mix_seed(cfg.run.seed, "online probe")) if classes else None
    model, checkpointer = trainer.module, run.checkpointer({"probe": probe} if probe else None)
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
                     + (f"; resumed from {run.resume.path} at step {trainer.state.step}" if run.resume else "")
                     + (f"; weights from {run.weights.path} ({run.weights.describe()}"
                        + ("" if run.weights.has_decoder else ": the decoder starts fresh") + "), optimiser and "
                        "schedule new" if run.weights else ""))

        watch = _Watch(run, trainer, log, probe)

        def end_of_epoch(epoch: int) -> None:
            if d.is_main:
                log.image("reconstruction", reconstruction_grid(model, preview, noise=noise), trainer.state.step)
            watch.after_epoch(epoch)

        watch.before_training()
        def probe_step() -> None:  # after each optimiser step, on its last micro-batch
            probe.step(model, trainer.last_batch.images, trainer.last_batch.labels, d)

        summary = trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer,
                              on_epoch_end=end_of_epoch, after_step=probe_step if probe else None)
        if loader.bad:
            log.info(f"data: {loader.bad} of {loader.seen} samples skipped as unusable (see the warnings above)")
        final = checkpointer.save("final.pth", trainer.state_dict())
        if d.is_main:
            export_encoder(model.state_dict(), checkpointer.config, run_dir / "encoder.pth")  # the config it saves
            _save_reconstructions(model, preview, noise, cfg.model.img_size, run_dir / "reconstructions.png")
            watch.close()
            losses = f", loss {summary.first:.4f} → {summary.last:.4f}" if summary.first is not None else ""
            banner(log, f"{trainer.state.step} steps{losses}", [
                (f"{run_dir}/config.yaml", "the resolved config"),
                (f"{run_dir}/final.pth", "the last checkpoint (ckpt-*.pth: periodic ones)"),
                (f"{run_dir}/encoder.pth", "the pretrained encoder alone"),
                (f"{run_dir}/reconstructions.png", "original | masked | reconstruction | with visible patches"),
                *([(f"{run_dir}/monitor.png", "held-out loss, kNN and the white-box objective per layer, by epoch")]
                  if watch.history else []),
                (f"{run_dir}/log.jsonl, tb/", "the logs")],
                [f"tensorboard --logdir {run_dir}/tb"] + [f"python {s} --checkpoint {run_dir}/encoder.pth"
                                                          for s in ("linprobe.py", "finetune.py") if (REPO / s).exists()])
    return PretrainResult(run_dir, trainer.state.step, summary.first, summary.last, final if d.is_main else None, model)


def _probe_classes(run: StageRun) -> int:
    """The online probe's classes: the training manifest's, when `monitor.probe` asks for one (0: no probe; a line
    says why when it was asked for and the shards carry no labels)."""
    m = run.cfg.monitor
    if not (m.probe and m.every and run.val_spec):
        return 0
    manifest = resolve_shards(run.train_spec).manifest
    classes = manifest.num_classes if manifest is not None else 0
    if not classes and run.d.is_main:
        print(f"monitor: online probe skipped: {run.train_spec} has no labels (its manifest lists no classes)")
    return classes


class _Watch:
    """The monitor's place in a run (eval/monitor.py measures): once before the first step (the random encoder's
    baseline, or the init_from weights'), after every `monitor.every` epochs and after the last one. Each evaluation
    goes to TensorBoard, to log.jsonl as a `monitor` event and to one line; after a resume the history is read back
    from log.jsonl, and an evaluation that a kill at an epoch's end cut off is made first. Collective."""

    def __init__(self, run: StageRun, trainer: Trainer, log: RunLogger, probe: OnlineProbe | None) -> None:
        self.run, self.trainer, self.log, self.every = run, trainer, log, run.cfg.monitor.every
        self.monitor, self.history = None, []
        if not self.every:
            return
        if run.val_spec is None:
            log.info("monitor: off, the run has no val set (data.val_shards)")
            return
        self.monitor = Monitor(run.cfg.monitor, run.cfg.model, train_spec=run.train_spec, val_spec=run.val_spec,
                               data=run.cfg.data, dist=run.d, seed=run.cfg.run.seed, precision=trainer.precision,
                               probe=probe)
        for reason in self.monitor.skipped:
            log.info(f"monitor: {reason}")
        if run.resume is not None:
            self.history = read_events(run.run_dir, "monitor", until_step=trainer.state.step) if run.d.is_main else []

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
        sparse = f", ISTA zeros (last layer) {values[deep[-1]]:.3f}" if deep else ""
        self.log.info(f"monitor after epoch {epoch} (step {step}): held-out loss {values['heldout_loss']:.4f}{knn}{sparse}")

    def before_training(self) -> None:
        state = self.trainer.state
        if self.monitor is None:
            return
        if state.step == 0:
            self.measure(0)
        elif state.batch_in_epoch == 0 and self.due(state.epoch):
            done = {row["epoch"] for row in self.history}
            missing = dist.broadcast_object(self.run.d, state.epoch not in done)  # only rank 0 read the history
            if missing:  # the run was killed between an epoch's last checkpoint and its evaluation
                self.measure(state.epoch)

    def after_epoch(self, epoch: int) -> None:
        if self.due(epoch):
            self.measure(epoch)

    def close(self) -> None:
        """Rank 0, at the end: the figure and the table of the whole history."""
        if not self.history:
            return
        fig = monitor_figure(self.history)
        fig.savefig(self.run.run_dir / "monitor.png", dpi=110)
        pyplot().close(fig)
        self.log.info("\n" + monitor_table(self.history))


def _save_reconstructions(model: torch.nn.Module, preview: torch.Tensor, noise: torch.Tensor, img_size: int,
                          path: Path) -> None:
    from torchvision.utils import save_image

    grid = reconstruction_grid(model, preview, noise=noise)
    if img_size < 96:  # small images: enlarge (nearest) so the patches can be seen
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    save_image(grid, path)
