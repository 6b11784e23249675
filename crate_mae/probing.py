"""The linear-probing stage: how linearly separable the frozen encoder's features are.

    result = run_linprobe(load_config("configs/linprobe/demo.yaml"))

Protocol `logreg` (the CRATE-MAE paper's, the default): the CLS (or mean-pooled) features of the train and
val sets are extracted once, without augmentation, in eval mode, and cached on disk keyed by checkpoint and
data; a multinomial logistic regression is fitted on them with C chosen on a held-out part of train
(crate_mae/probe.py); a weighted kNN (DINO's) runs on the same features. Protocol `linear` (MAE's): a
BatchNorm (no affine) + Linear head trained over epochs on the frozen encoder with weak augmentation,
LARS, warm-up and cosine, on any number of GPUs. Both write results.json and TensorBoard scalars.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from crate_mae import probe
from crate_mae.config import Config, save_config
from crate_mae.data import EvalTransform, PretrainTransform, eval_loader, resolve_shards
from crate_mae.data.reader import config_eval_loader, config_train_loader
from crate_mae.data.transforms import normalise
from crate_mae.engine import checkpoint as ckpt
from crate_mae.engine import dist
from crate_mae.engine.log import RunLogger
from crate_mae.engine.loop import autocast, evaluate, fit, resolve_precision, stage_trainer
from crate_mae.finetuning import classifier_config, classifier_for, labelled_data
from crate_mae.model import CrateClassifier


@dataclass
class ProbeResult:
    dataset: str
    protocol: str
    feature: str
    checkpoint: str | None
    top1: float
    top5: float
    train_samples: int
    val_samples: int
    details: dict[str, Any] = field(default_factory=dict)  # C search, kNN, epochs


def pooled(model: CrateClassifier, images: torch.Tensor, feature: str) -> torch.Tensor:
    """The probed feature (B, d) of the last layer, after the encoder's final norm (family mae; the supervised
    family has none): the CLS token, or the mean of the patch tokens."""
    [(patches, cls)] = model.forward_intermediates(normalise(images), indices=1, return_prefix_tokens=True, norm=True,
                                                   output_fmt="NLC", intermediates_only=True)  # (B, N, d), (B, 1, d)
    return cls[:, 0] if feature == "cls" else patches.mean(dim=1)


class LinearProbe(nn.Module):
    """MAE's probe head on a frozen encoder: BatchNorm1d without affine (a per-feature standardisation) + Linear."""

    def __init__(self, encoder: CrateClassifier, *, feature: str, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.feature = encoder.requires_grad_(False), feature
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6),
                                  nn.Linear(encoder.num_features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # as MAE's probe
        nn.init.zeros_(self.head[1].bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.encoder.eval()  # frozen: no dropout or stochastic depth, whatever mode the probe is in
        with torch.no_grad():
            x = pooled(self.encoder, images, self.feature)
        return self.head(x.float())


@torch.no_grad()
def extract(model: CrateClassifier, loader: Any, d: dist.Dist, feature: str, precision: str) -> dict[str, torch.Tensor]:
    """This rank's share of a set's features (n, d) in float32 and labels (n,), on the CPU."""
    model.eval()
    feats, labels = [], []
    for batch in loader:
        with autocast(d.device, precision):
            feats.append(pooled(model, batch.images.to(d.device, non_blocking=True), feature).float().cpu())
        labels.append(batch.labels)
    return {"x": torch.cat(feats) if feats else torch.zeros(0, model.num_features), "y": torch.cat(labels) if labels else
            torch.zeros(0, dtype=torch.long)}


def _identity(spec: str) -> Any:
    """What the features of a shard set depend on: its shards and their counts and sizes."""
    shards = resolve_shards(spec)
    return [shards.urls, shards.samples, shards.manifest.to_json() if shards.manifest else None]


def _checkpoint_identity(path: str | None) -> Any:
    if path is None:
        return None
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]  # rewritten weights make a new key


def run_linprobe(cfg: Config) -> ProbeResult:
    return dist.run_with(cfg.run.device, lambda d: _run(cfg, d, Path(cfg.run.out_dir) / cfg.run.name))


def _run(cfg: Config, d: dist.Dist, run_dir: Path) -> ProbeResult:
    cfg, weights = classifier_config(cfg, cfg.probe.checkpoint)
    cfg, train_spec, val_spec, classes = labelled_data(cfg, d)
    dist.seed_everything(cfg.run.seed)
    encoder, cfg = classifier_for(cfg, weights, classes)
    encoder = encoder.to(d.device).requires_grad_(False)
    log = RunLogger(run_dir, enabled=d.is_main, total_steps=0)
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
    if cfg.probe.protocol == "logreg":
        result = _logreg(cfg, d, encoder, train_spec, val_spec, classes, log)
    else:
        result = _linear(cfg, d, encoder, train_spec, val_spec, classes, log, run_dir)
    if d.is_main:
        (run_dir / "results.json").write_text(json.dumps(dataclasses.asdict(result), indent=1))
        log.scalars(0, {"top1": result.top1, "top5": result.top5}, prefix=f"probe_{result.protocol}")
        knn = result.details.get("knn")
        log.info(f"\n{result.protocol} probe of {result.feature} features from {result.checkpoint or 'a random encoder'}"
                 f" on {train_spec}: top-1 {result.top1:.2f}, top-5 {result.top5:.2f} ({result.val_samples} val images)"
                 + (f"; kNN (k={cfg.probe.knn_k}) top-1 {knn['top1']:.2f}" if knn else "")
                 + f"\n  {run_dir}/results.json")
    log.close()
    return result


def _logreg(cfg: Config, d: dist.Dist, encoder: CrateClassifier, train_spec: str, val_spec: str, classes: int,
            log: RunLogger) -> ProbeResult:
    p, precision = cfg.probe, resolve_precision(cfg.run.precision, d.device)
    key = probe.feature_cache_key(_checkpoint_identity(p.checkpoint), _identity(train_spec), _identity(val_spec),
                                  dataclasses.asdict(cfg.model), p.feature, cfg.data.eval_crop_pct)
    folder = Path(p.cache_dir) / key
    transform = EvalTransform(cfg.model.img_size, crop_pct=cfg.data.eval_crop_pct)
    for split, spec in (("train", train_spec), ("val", val_spec)):  # every rank extracts its share, once
        path = folder / f"{split}-{d.rank}-of-{d.world_size}.pt"
        if probe.load_cached(path) is None:
            loader = eval_loader(spec, transform, batch_size=cfg.data.batch_size, rank=d.rank, world_size=d.world_size,
                                 num_workers=cfg.data.num_workers, max_bad_fraction=cfg.data.max_bad_fraction)
            probe.save_cached(path, extract(encoder, loader, d, p.feature, precision))
        elif d.is_main:
            log.info(f"{split} features from the cache: {path}")
    dist.barrier(d)
    result = None
    if d.is_main:  # one process fits; the others wait for its figures
        parts = {s: [probe.load_cached(folder / f"{s}-{r}-of-{d.world_size}.pt") for r in range(d.world_size)]
                 for s in ("train", "val")}
        x = {s: torch.cat([part["x"] for part in parts[s]]) for s in parts}
        y = {s: torch.cat([part["y"] for part in parts[s]]) for s in parts}
        fit_ = probe.fit_logistic_regression(x["train"], y["train"], x["val"], y["val"], Cs=p.Cs, heldout=p.heldout,
                                             solver=p.solver, max_iter=p.max_iter, seed=cfg.run.seed, device=d.device)
        details: dict[str, Any] = {"C": fit_.C, "heldout_top1": fit_.heldout_top1, "searched": fit_.searched,
                                   "solver": fit_.solver, "cache": str(folder)}
        if p.knn_k:
            details["knn"] = probe.knn_accuracy(x["train"].to(d.device), y["train"].to(d.device), x["val"].to(d.device),
                                                y["val"].to(d.device), num_classes=classes, k=p.knn_k,
                                                temperature=p.knn_temperature)
        result = ProbeResult(train_spec, "logreg", p.feature, p.checkpoint, fit_.val_top1, fit_.val_top5,
                             len(y["train"]), len(y["val"]), details)
    return dist.broadcast_object(d, result)


def _linear(cfg: Config, d: dist.Dist, encoder: CrateClassifier, train_spec: str, val_spec: str, classes: int,
            log: RunLogger, run_dir: Path) -> ProbeResult:
    accum, batch = cfg.optim.accum_steps, cfg.data.batch_size
    model = LinearProbe(encoder, feature=cfg.probe.feature, num_classes=classes).to(d.device)
    cuda = d.device.type == "cuda"
    loader = config_train_loader(cfg.data, train_spec, PretrainTransform(cfg.model.img_size, scale=cfg.probe.crop_scale),
                                 rank=d.rank, world_size=d.world_size, seed=cfg.run.seed, accum_steps=accum,
                                 pin_memory=cuda)
    val = config_eval_loader(cfg.data, val_spec, cfg.model.img_size, rank=d.rank, world_size=d.world_size,
                             pin_memory=cuda)
    criterion = nn.CrossEntropyLoss()
    trainer, _, global_batch = stage_trainer(
        cfg, model, d, lambda m, b: criterion(m(b.images.to(d.device, non_blocking=True)),
                                              b.labels.to(d.device, non_blocking=True)), len(loader))
    resume = ckpt.resume_path(run_dir, cfg.run.resume)
    if resume is not None:
        ckpt.restore(trainer, resume, cfg, d, len(loader))
    scores = {"top1": 0.0, "top5": 0.0, "samples": 0}

    def end_of_epoch(epoch: int) -> None:
        scores.update(evaluate(model, val, d, trainer.precision))
        log.scalars(trainer.state.step, {"top1": scores["top1"], "top5": scores["top5"]}, prefix="val")
        log.info(f"epoch {epoch}: val top-1 {scores['top1']:.2f} top-5 {scores['top5']:.2f}")

    fit(trainer, loader, epochs=cfg.optim.epochs, accum_steps=accum, log_every=cfg.run.log_every,
        ckpt_every=cfg.run.ckpt_every, global_batch=global_batch, log=log, on_epoch_end=end_of_epoch,
        save=lambda name: ckpt.save_training(run_dir / name, trainer, cfg, d, keep_last=cfg.run.keep_last))
    ckpt.save_training(run_dir / "final.pth", trainer, cfg, d)
    return ProbeResult(train_spec, "linear", cfg.probe.feature, cfg.probe.checkpoint, scores["top1"], scores["top5"],
                       len(loader) * batch * d.world_size, int(scores["samples"]), {"epochs": cfg.optim.epochs})
