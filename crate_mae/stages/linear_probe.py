"""The linear-probing stage: how linearly separable the frozen encoder's features are.

    result = run_linprobe(load_config("configs/linprobe/demo.yaml"))

Protocol `logreg` (the CRATE-MAE paper's, the default): the CLS (or mean-pooled) features of the train and
val sets are extracted once, without augmentation, in eval mode, and cached on disk keyed by checkpoint and
data (eval/features.py); a multinomial logistic regression is fitted on them with C chosen on a held-out part
of train (eval/logreg.py); a weighted kNN (DINO's, eval/knn.py) runs on the same features. Protocol `linear`
(MAE's): a BatchNorm (no affine) + Linear head (eval/linear.py) trained over epochs on the frozen encoder with
weak augmentation, LARS, warm-up and cosine, on any number of GPUs. Both write results.json and TensorBoard scalars.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from crate_mae.config import Config
from crate_mae.data import PretrainTransform, ShardList, eval_loader, train_loader
from crate_mae.data.prefetch import DeviceLoader
from crate_mae.engine.dist import barrier, broadcast_object
from crate_mae.engine.log import RunLogger
from crate_mae.engine.trainer import Trainer, resolve_precision
from crate_mae.errors import ShardError
from crate_mae.eval.features import extract, feature_cache_key, load_cached, save_cached
from crate_mae.eval.knn import knn_accuracy
from crate_mae.eval.linear import LinearProbe
from crate_mae.eval.logreg import fit_logistic_regression
from crate_mae.eval.metrics import evaluate
from crate_mae.model import CrateClassifier, create_model
from crate_mae.model.classifier import ClassifierObjective
from crate_mae.seeding import seed_everything
from crate_mae.stages.common import StageRun, run_stage, write_results


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


def _identity(shards: ShardList) -> Any:
    """What the features of a shard set depend on: its shards and their counts and sizes."""
    return [shards.urls, shards.samples, shards.manifest.to_json() if shards.manifest else None]


def _checkpoint_identity(path: str | None) -> Any:
    if path is None:
        return None
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]  # rewritten weights make a new key


def run_linprobe(cfg: Config) -> ProbeResult:
    return run_stage(cfg, _run, weights=cfg.probe.checkpoint)


def _run(run: StageRun) -> ProbeResult:
    cfg, classes = run.cfg, run.cfg.model.num_classes
    seed_everything(cfg.run.seed)
    encoder = create_model(cfg.model, run.weights)[0].to(run.dist.device).requires_grad_(False)
    with run.logger() as log:
        if cfg.probe.protocol == "logreg":
            result = _logreg(run, encoder, classes, log)
        else:
            result = _linear(run, encoder, classes, log)
        if run.dist.is_main:
            write_results(run.run_dir, result)
            log.scalars(0, {"top1": result.top1, "top5": result.top5}, prefix=f"probe_{result.protocol}")
            knn = result.details.get("knn")
            log.info(f"\n{result.protocol} probe of {result.feature} features from "
                     f"{result.checkpoint or 'a random encoder'} on {run.train.spec}: top-1 {result.top1:.2f}, top-5 "
                     f"{result.top5:.2f} ({result.val_samples} val images)"
                     + (f"; kNN (k={cfg.probe.knn_k}) top-1 {knn['top1']:.2f}" if knn else "")
                     + f"\n  {run.run_dir}/results.json")
    return result


def _logreg(run: StageRun, encoder: CrateClassifier, classes: int, log: RunLogger) -> ProbeResult:
    """The paper's protocol: features extracted once per rank (or read from the cache), one process fits."""
    cfg, dist, p = run.cfg, run.dist, run.cfg.probe
    precision = resolve_precision(cfg.run.precision, dist.device)
    key = feature_cache_key(_checkpoint_identity(p.checkpoint), _identity(run.train), _identity(run.val),
                            dataclasses.asdict(cfg.model), p.feature, cfg.data.eval_crop_pct, precision)
    folder = Path(p.cache_dir) / key
    for split, shards in (("train", run.train), ("val", run.val)):  # every rank extracts its share, once
        path = folder / f"{split}-{dist.rank}-of-{dist.world_size}.pt"
        if load_cached(path) is None:
            loader = eval_loader(shards, cfg.model.img_size, data=cfg.data, rank=dist.rank, world_size=dist.world_size,
                                 num_classes=classes, stop_signals=cfg.run.preempt_signals)  # labels checked
            save_cached(path, extract(encoder, loader, dist, p.feature, precision))
        elif dist.is_main:
            log.info(f"{split} features from the cache: {path}")
    barrier(dist)
    result = _fit(run, folder, classes) if dist.is_main else None  # one process fits; the others wait for it
    return broadcast_object(dist, result)


def _fit(run: StageRun, folder: Path, classes: int) -> ProbeResult:
    """Rank 0: every rank's cached features, the logistic regression (C chosen on a held-out part of train), the kNN."""
    cfg, dist, p = run.cfg, run.dist, run.cfg.probe
    parts = {s: [load_cached(folder / f"{s}-{r}-of-{dist.world_size}.pt") for r in range(dist.world_size)]
             for s in ("train", "val")}
    x = {s: torch.cat([part["x"] for part in parts[s]]) for s in parts}
    y = {s: torch.cat([part["y"] for part in parts[s]]) for s in parts}
    for split, shards in (("train", run.train), ("val", run.val)):
        if len(y[split]) == 0:
            raise ShardError(f"{shards.spec}: the {split} features hold no samples")
    fitted = fit_logistic_regression(x["train"], y["train"], x["val"], y["val"], Cs=p.Cs, heldout=p.heldout,
                                     solver=p.solver, max_iter=p.max_iter, seed=cfg.run.seed, device=dist.device)
    details: dict[str, Any] = {"C": fitted.C, "heldout_top1": fitted.heldout_top1, "searched": fitted.searched,
                               "solver": fitted.solver, "cache": str(folder)}
    if p.knn_k:
        details["knn"] = knn_accuracy(x["train"].to(dist.device), y["train"].to(dist.device), x["val"].to(dist.device),
                                      y["val"].to(dist.device), num_classes=classes, k=p.knn_k,
                                      temperature=p.knn_temperature)
    return ProbeResult(run.train.spec, "logreg", p.feature, p.checkpoint, fitted.val_top1, fitted.val_top5,
                       len(y["train"]), len(y["val"]), details)


def _linear(run: StageRun, encoder: CrateClassifier, classes: int, log: RunLogger) -> ProbeResult:
    """MAE's protocol: a BatchNorm + Linear head trained over epochs on the frozen encoder, evaluated after each."""
    cfg, dist, accum, batch = run.cfg, run.dist, run.cfg.optim.accum_steps, run.cfg.data.batch_size
    model = LinearProbe(encoder, feature=cfg.probe.feature, num_classes=classes).to(dist.device)
    cuda = dist.device.type == "cuda"
    loader = train_loader(run.train, PretrainTransform(cfg.model.img_size, scale=cfg.probe.crop_scale),
                          data=cfg.data, rank=dist.rank, world_size=dist.world_size, seed=cfg.run.seed,
                          accum_steps=accum, num_classes=classes, pin_memory=cuda,
                          stop_signals=cfg.run.preempt_signals)
    loader = DeviceLoader(loader, device=dist.device, depth=0)  # to the device once, in the step's thread
    val = eval_loader(run.val, cfg.model.img_size, data=cfg.data, rank=dist.rank, world_size=dist.world_size,
                      num_classes=classes, pin_memory=cuda, stop_signals=cfg.run.preempt_signals)
    trainer = Trainer.from_config(cfg, ClassifierObjective(model, nn.CrossEntropyLoss()).to(dist.device), dist,
                                  len(loader))
    checkpointer = run.checkpointer()
    if run.resume is not None:
        checkpointer.restore(run.resume, trainer)
    scores = {"top1": 0.0, "top5": 0.0, "samples": 0}
    for epoch in trainer.fit(loader, log=log, log_every=cfg.run.log_every, checkpointer=checkpointer):
        for _ in epoch:  # no per-step work: the head is all the Trainer trains
            pass
        scores = evaluate(model, val, dist, trainer.precision)
        log.scalars(trainer.state.step, {"top1": scores["top1"], "top5": scores["top5"]}, prefix="val")
        log.info(f"epoch {trainer.state.epoch}: val top-1 {scores['top1']:.2f} top-5 {scores['top5']:.2f}")
    trainer.save(checkpointer, "final.pth")
    return ProbeResult(run.train.spec, "linear", cfg.probe.feature, cfg.probe.checkpoint, scores["top1"],
                       scores["top5"], len(loader) * batch * dist.world_size, int(scores["samples"]),
                       {"epochs": cfg.optim.epochs})
