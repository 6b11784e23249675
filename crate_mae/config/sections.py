"""The config sections: one typed dataclass per section, each field with its one-line doc and its checks.

A field's checks live in its section's `__post_init__`; a failure is a `ConfigError` naming the key.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from crate_mae.config.variants import FAMILIES, VARIANT_NAMES, variants_of
from crate_mae.errors import ConfigError


def _doc(default: Any, doc: str) -> Any:
    """A dataclass field with its one-line documentation (shown by `config_help` and `--help`)."""
    return field(default=default, metadata={"doc": doc})


# Fields that change the function a network computes (not only its training): a checkpoint and the
# config that loads it must agree on each one that the config sets (those of the config's kind).
FUNCTION_FIELDS = ("family", "variant", "dim", "heads", "encoder_depth", "decoder_depth", "patch_size", "eta", "lambd")
SIZE_FIELDS = ("dim", "heads", "encoder_depth", "decoder_depth", "img_size", "patch_size")


@dataclass(frozen=True)
class ModelConfig:
    """The network both kinds share: the encoder's family, sizes and ISTA constants.

    A field left unset (null) is filled by `crate_mae.model.hub.resolve_config`, the one place that resolves a
    model config: from the checkpoint being loaded, else from the `variant` row and the family's defaults. A set
    field is what the user asked for, and a checkpoint that disagrees with it is an error, never silently
    overridden. A stage's config holds the kind it builds: `MAEConfig` (pretraining) or `ClassifierConfig`.
    """

    family: Optional[Literal["mae", "supervised", "alpha"]] = _doc(
        None, "mae: CRATE-MAE's conv stem, fixed sin-cos table, final norm; supervised: the seed's CRATE "
              "(patchify-LN-Linear-LN stem, learned table, no final norm); alpha: CRATE-α (conv stem, learned table, "
              "overcomplete ODL block with a residual, no final norm) (default: the checkpoint's; else mae, or "
              "supervised when fine-tuning from scratch)")
    variant: Optional[str] = _doc(None, f"row of the family's size table: {', '.join(VARIANT_NAMES)} (tiny is 192 "
                                        "wide and huge exists for family alpha only) (default: the checkpoint's, "
                                        "else base)")
    dim: Optional[int] = _doc(None, "width d (default: the checkpoint's, else the variant's)")
    heads: Optional[int] = _doc(None, "attention heads H; d must divide by H (default: the checkpoint's, else the "
                                      "variant's)")
    encoder_depth: Optional[int] = _doc(None, "encoder layers (default: the checkpoint's, else the variant's)")
    img_size: Optional[int] = _doc(None, "square image side in pixels (default: the checkpoint's, else the variant's)")
    patch_size: Optional[int] = _doc(None, "patch side in pixels; must divide img_size (default: the checkpoint's, "
                                           "else the variant's)")
    eta: Optional[float] = _doc(None, "ISTA step size η (default: the checkpoint's, else 0.1)")
    lambd: Optional[float] = _doc(None, "ISTA sparsity λ (default: the checkpoint's, else 0.5 for family mae, 0.1 "
                                        "for supervised and alpha)")
    grad_checkpointing: bool = _doc(False, "recompute each layer's activations in the backward pass instead of "
                                           "keeping them (timm's set_grad_checkpointing): less memory, ~1/3 more "
                                           "compute; the same gradients")

    def __post_init__(self) -> None:
        if self.variant is not None and self.variant not in variants_of(self.family):
            rows = variants_of(self.family) if self.variant in VARIANT_NAMES else VARIANT_NAMES
            whose = f" of family {self.family}" if self.family is not None and self.variant in VARIANT_NAMES else ""
            raise ConfigError(f"model.variant: unknown variant {self.variant!r}{whose}; choose one of {', '.join(rows)}")
        for name in SIZE_FIELDS:
            value = getattr(self, name, None)
            _require(value is None or value > 0, f"model.{name}", "must be positive, got", value)
        if self.dim is not None and self.heads is not None:
            _require(self.dim % self.heads == 0, "model.heads", f"width {self.dim} is not divisible by heads", self.heads)
        if self.dim is not None:
            _require(self.dim % 4 == 0, "model.dim", "must be divisible by 4 (2-D sin-cos table), got", self.dim)
        if self.img_size is not None and self.patch_size is not None:
            _require(self.img_size % self.patch_size == 0, "model.img_size",
                     f"must be divisible by model.patch_size {self.patch_size}, got", self.img_size)
        _require(self.eta is None or self.eta > 0, "model.eta", "must be positive, got", self.eta)
        _require(self.lambd is None or self.lambd >= 0, "model.lambd", "must be >= 0, got", self.lambd)

    @property
    def resolved(self) -> bool:
        """Whether every field that `resolve_config` fills is set."""
        return all(getattr(self, f.name) is not None for f in fields(self)
                   if f.name in ("family", *SIZE_FIELDS, "eta", "lambd", "num_classes"))


@dataclass(frozen=True)
class MAEConfig(ModelConfig):
    """A CRATE-MAE: the shared encoder fields, its decoder, and what pretraining asks of it."""

    decoder_depth: Optional[int] = _doc(None, "decoder layers (default: the checkpoint's, else the variant's)")
    mask_ratio: float = _doc(0.75, "fraction of patches masked in pretraining, in (0, 1)")
    norm_pix_loss: bool = _doc(False, "regress per-patch normalised pixels (MAE's norm_pix_loss)")
    visible_only: Optional[bool] = _doc(None, "ours, not the paper's model: the encoder sees CLS and the visible "
                                              "patches only, the mask tokens (each with its place's position) join "
                                              "before the decoder, as in MAE (~4× fewer encoder FLOPs at mask ratio "
                                              "0.75); the same weights either way; a resume must keep it (default: "
                                              "the checkpoint's, else false: the released model's encoder of all "
                                              "tokens)")

    def __post_init__(self) -> None:
        super().__post_init__()
        masked = [name for name, parts in FAMILIES.items() if parts.masked]
        _require(self.family is None or self.family in masked, "model.family",
                 f"a masked autoencoder has an encoder of family {' or '.join(masked)}, got", self.family)
        _require(0 < self.mask_ratio < 1, "model.mask_ratio", "must lie in (0, 1), got", self.mask_ratio)
        _require(self.visible_only is None or isinstance(self.visible_only, bool), "model.visible_only",
                 "must be true or false, got", self.visible_only)


@dataclass(frozen=True)
class ClassifierConfig(ModelConfig):
    """A CRATE classifier (any family): the shared encoder fields, its pooling, stochastic depth and head."""

    pool: Literal["cls", "mean"] = _doc("cls", "pooling: the CLS token, or the mean (of the patch tokens for family "
                                               "mae; of all tokens, CLS included, for supervised, as released)")
    drop_path: float = _doc(0.0, "stochastic depth on the MSSA residual branch, rising to this rate")
    num_classes: Optional[int] = _doc(None, "outputs (0: no head, the pooled features) (default: the dataset's "
                                            "classes in a stage, else the checkpoint's head, else 1000)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.num_classes is None or self.num_classes >= 0, "model.num_classes", "must be >= 0, got",
                 self.num_classes)
        _require(0 <= self.drop_path < 1, "model.drop_path", "must lie in [0, 1), got", self.drop_path)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are batched."""

    train_shards: Optional[str] = _doc(None, "training shards: manifest .json, brace pattern, glob or URL (default: the bundled digits)")
    val_shards: Optional[str] = _doc(None, "evaluation shards, read exactly once per evaluation")
    train_samples: Optional[int] = _doc(None, "samples per epoch when the training shards have no manifest")
    dataset: Optional[Literal["cifar10", "cifar100"]] = _doc(None, "a torchvision set instead of *_shards: written "
                                                                  "once to shards/<name> from data.root")
    root: str = _doc("data", "where torchvision keeps (or downloads) data.dataset")
    download: bool = _doc(False, "let torchvision download data.dataset (rank 0 only; needs internet)")
    eval_crop_pct: float = _doc(0.875, "evaluation: centre crop of this fraction of the shorter side (1.0: none)")
    batch_size: int = _doc(64, "images per device per step (global batch = batch_size × devices × accum_steps)")
    num_workers: int = _doc(4, "data-loading processes per device")
    resample: bool = _doc(True, "draw training shards at random with replacement (else: shuffle and deal them out)")
    shuffle_buffer: int = _doc(5000, "samples in each worker's shuffle buffer")
    fast_decode: bool = _doc(True, "decode JPEGs at reduced size when the crop allows it (PIL draft)")
    max_bad_fraction: float = _doc(0.001, "stop when more than this fraction of samples cannot be used")
    read_retries: int = _doc(3, "a remote shard (pipe:, http(s)://) whose read fails is read again this many times "
                                "at most, its samples already delivered passed over (local files: never)")
    retry_wait: float = _doc(1.0, "seconds before the first re-read of a failed shard, doubled at each next one "
                                  "(at most 60 s), times a random 0.5-1")

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "data.batch_size", "must be positive, got", self.batch_size)
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0, got", self.num_workers)
        _require(self.train_samples is None or self.train_samples > 0, "data.train_samples", "must be positive, got",
                 self.train_samples)
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0, got", self.shuffle_buffer)
        _require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", "must lie in [0, 1], got",
                 self.max_bad_fraction)
        _require(0 < self.eval_crop_pct <= 1, "data.eval_crop_pct", "must lie in (0, 1], got", self.eval_crop_pct)
        _require(self.read_retries >= 0, "data.read_retries", "must be >= 0, got", self.read_retries)
        _require(0 <= self.retry_wait <= 3600, "data.retry_wait", "must lie in [0, 3600] seconds, got",
                 self.retry_wait)


@dataclass(frozen=True)
class PretrainDataConfig(DataConfig):
    """Pretraining's data section: the common keys, and where its JPEGs are decoded."""

    decode_on: Literal["cpu", "device"] = _doc("cpu", "decode and crop JPEGs in the workers (cpu) or batched on the "
                                                "training device (device: nvjpeg on a GPU)")
    prefetch: int = _doc(2, "batches moved to the device (and decoded there) ahead of the step by a background "
                            "thread, on a side CUDA stream; 0: in the step's thread")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.prefetch >= 0, "data.prefetch", "must be >= 0, got", self.prefetch)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (warm-up, then cosine, updated every iteration)."""

    optimizer: Literal["adamw", "lion", "lars", "sgd"] = _doc("adamw", "adamw (torch), lion (lion-pytorch), lars "
                                                               "(timm; MAE's linear probe) or sgd")
    lr: Optional[float] = _doc(None, "absolute peak learning rate (default: blr × global batch / 256)")
    blr: float = _doc(1.5e-4, "base learning rate per 256 images, scaled as MAE does")
    min_lr: float = _doc(0.0, "learning rate at the end of the cosine")
    weight_decay: float = _doc(0.05, "decoupled weight decay (none on norms, biases and tokens)")
    betas: tuple[float, float] = _doc((0.9, 0.95), "AdamW / Lion betas")
    momentum: float = _doc(0.9, "LARS / SGD momentum")
    layer_decay: Optional[float] = _doc(None, "layer-wise lr decay: layer i of L gets lr × decay^(L − i) (fine-tuning)")
    epochs: int = _doc(800, "training epochs")
    warmup_epochs: float = _doc(40.0, "linear warm-up epochs")
    accum_steps: int = _doc(1, "micro-batches accumulated per optimiser step")
    clip_grad: Optional[float] = _doc(None, "clip the global gradient norm to this value (None: no clipping)")

    def __post_init__(self) -> None:
        _require(self.lr is None or self.lr > 0, "optim.lr", "must be positive, got", self.lr)
        _require(self.blr > 0, "optim.blr", "must be positive, got", self.blr)
        _require(self.min_lr >= 0, "optim.min_lr", "must be >= 0, got", self.min_lr)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0, got", self.weight_decay)
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "must lie in [0, 1), got", self.betas)
        _require(self.epochs > 0, "optim.epochs", "must be positive, got", self.epochs)
        _require(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs",
                 f"must lie in [0, optim.epochs={self.epochs}], got", self.warmup_epochs)
        _require(self.accum_steps >= 1, "optim.accum_steps", "must be >= 1, got", self.accum_steps)
        _require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", "must be positive, got", self.clip_grad)
        _require(0 <= self.momentum < 1, "optim.momentum", "must lie in [0, 1), got", self.momentum)
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1, "optim.layer_decay", "must lie in (0, 1], got",
                 self.layer_decay)


def signal_number(name: str) -> int:
    """'SIGTERM', 'TERM' or '15' → 15; an unknown name is a ValueError naming it."""
    key = str(name).strip().upper()
    if key.isdigit():
        try:
            key = signal.Signals(int(key)).name
        except ValueError:
            key = "?"
    key = key if key.startswith("SIG") else f"SIG{key}"
    if not isinstance(getattr(signal, key, None), signal.Signals) or key in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"{name!r} is not a signal a process can handle (e.g. SIGTERM, SIGUSR1, SIGUSR2, SIGHUP)")
    return int(getattr(signal, key))


PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")  # run.preempt_signals' default: SLURM's and torchrun's stop signals


def stop_signals(names: tuple[str, ...] | list[str]) -> list[int]:
    """The one list of signals that stop a run at a step boundary: `run.preempt_signals` and Ctrl-C (SIGINT), as
    numbers. The run handles them (engine/preempt.py) and its data workers ignore them (data/reader.py)."""
    return sorted({signal_number(name) for name in names} | {int(signal.SIGINT)})


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, how it computes, and how often it logs and saves."""

    name: str = _doc("crate-mae", "run name: outputs go to out_dir/name")
    out_dir: str = _doc("runs", "folder that holds the runs")
    seed: int = _doc(0, "seed for weights, masking and data order")
    device: str = _doc("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _doc("auto", "auto: bf16 on GPUs that have it, fp32 on CPU")
    compile: bool = _doc(False, "torch.compile the model")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _doc(
        "default", "torch.compile mode; reduce-overhead (and max-autotune) replay the step's kernels as CUDA graphs")
    log_every: int = _doc(20, "optimiser steps between log lines")
    ckpt_every: int = _doc(1000, "optimiser steps between checkpoints")
    keep_last: int = _doc(2, "periodic checkpoints kept besides the final one")
    resume: Optional[str] = _doc(None, "'auto' (the run's latest checkpoint) or a checkpoint path")
    preempt_signals: tuple[str, ...] = _doc(PREEMPT_SIGNALS, "signals (besides Ctrl-C) on which a training "
                                            "run finishes its step, saves a checkpoint there on every rank and "
                                            "exits with status 75, resumable with --resume auto (SLURM sends SIGTERM, "
                                            "or the signal of #SBATCH --signal; torchrun's agent SIGTERM)")
    preempt_grace: float = _doc(120.0, "seconds a signalled run has to stop and save; past them, or at a second "
                                       "signal, it stops at once (a write under way dropped, earlier files whole)")

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty folder name, got", self.name)
        for name in ("log_every", "ckpt_every"):
            _require(getattr(self, name) > 0, f"run.{name}", "must be positive, got", getattr(self, name))
        _require(self.keep_last >= 0, "run.keep_last", "must be >= 0, got", self.keep_last)
        _require(self.preempt_grace >= 0, "run.preempt_grace", "must be >= 0 seconds, got", self.preempt_grace)
        for name in self.preempt_signals:
            try:
                signal_number(name)
            except ValueError as err:
                raise ConfigError(f"run.preempt_signals: {err}") from None


@dataclass(frozen=True)
class MonitorConfig:
    """What pretraining measures while it trains (on the val set and a kNN bank of the train set), every `every`
    epochs, after the last one, and once before the first step (the random encoder's baseline)."""

    every: int = _doc(1, "epochs between evaluations (0: no monitor)")
    val_samples: Optional[int] = _doc(10000, "held-out images for the reconstruction loss and the kNN queries: the "
                                             "first in key order of the val set (None: all of it)")
    bank_samples: Optional[int] = _doc(10000, "kNN bank: the first this many labelled train images in key order "
                                              "(None: all; the bank is gathered to every rank)")
    knn_k: int = _doc(20, "kNN: neighbours (0: no kNN)")
    knn_temperature: float = _doc(0.07, "kNN: temperature of the exp(similarity / T) vote weights")
    layers_batch: int = _doc(64, "images of the fixed val batch on which the white-box objective is measured per "
                                 "layer (0: not measured)")
    eps2: float = _doc(0.5, "ε² of the coding rate R^c")
    probe: bool = _doc(False, "an online linear probe: a Linear head on the detached CLS feature of a clean pass, "
                              "trained alongside with its own AdamW and evaluated with the monitor (costs one "
                              "encoder pass per step; the training shards must then carry labels)")
    probe_lr: float = _doc(1e-2, "the online probe's AdamW learning rate")

    def __post_init__(self) -> None:
        _require(self.every >= 0, "monitor.every", "must be >= 0, got", self.every)
        _require(self.probe_lr > 0, "monitor.probe_lr", "must be positive, got", self.probe_lr)
        for name in ("val_samples", "bank_samples"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"monitor.{name}", "must be positive, got", value)
        _require(self.knn_k >= 0, "monitor.knn_k", "must be >= 0, got", self.knn_k)
        _require(self.knn_temperature > 0, "monitor.knn_temperature", "must be positive, got", self.knn_temperature)
        _require(self.layers_batch >= 0, "monitor.layers_batch", "must be >= 0, got", self.layers_batch)
        _require(self.eps2 > 0, "monitor.eps2", "must be positive, got", self.eps2)


@dataclass(frozen=True)
class PretrainConfig:
    """Where pretraining starts."""

    init_from: Optional[str] = _doc(None, "start a new run from these weights (our final.pth, encoder.pth or a "
                                          "classifier — the decoder then starts fresh, a head is set aside —, a "
                                          ".safetensors export, the released CRATE-MAE or CRATE-α): the optimiser, "
                                          "schedule and step start anew (unlike --resume, which continues a run)")


@dataclass(frozen=True)
class ProbeConfig:
    """Linear probing of a frozen pretrained encoder (linprobe.py)."""

    checkpoint: Optional[str] = _doc(None, "pretrained weights: our encoder.pth / final.pth or the released "
                                           "CRATE-MAE file; None: a randomly initialised encoder (a baseline)")
    protocol: Literal["logreg", "linear"] = _doc("logreg", "logreg: CRATE-MAE's logistic regression on extracted "
                                                   "features; linear: MAE's BatchNorm + Linear head trained over epochs")
    feature: Literal["cls", "mean"] = _doc("cls", "the feature probed: the CLS token or the mean of patch tokens")
    Cs: tuple[float, ...] = _doc((1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), "logreg: inverse L2 strengths searched")
    heldout: float = _doc(0.1, "logreg: fraction of train held out to choose C")
    solver: Literal["auto", "sklearn", "torch"] = _doc("auto", "logreg: scikit-learn, full-batch L-BFGS in torch, "
                                                        "or auto (torch for large sets)")
    max_iter: int = _doc(1000, "logreg: solver iterations")
    crop_scale: tuple[float, float] = _doc((0.08, 1.0), "linear: RandomResizedCrop area range of the weak augmentation")
    knn_k: int = _doc(20, "kNN: neighbours (0: no kNN)")
    knn_temperature: float = _doc(0.07, "kNN: temperature of the exp(similarity / T) vote weights")
    cache_dir: str = _doc("runs/feature_cache", "extracted features, keyed by checkpoint and data")

    def __post_init__(self) -> None:
        _require(0 < self.heldout < 1, "probe.heldout", "must lie in (0, 1), got", self.heldout)
        _require(all(c > 0 for c in self.Cs), "probe.Cs", "must all be positive, got", self.Cs)
        _require(self.max_iter > 0, "probe.max_iter", "must be positive, got", self.max_iter)
        _require(self.knn_k >= 0, "probe.knn_k", "must be >= 0, got", self.knn_k)
        _require(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "probe.crop_scale",
                 "must be (low, high) with 0 < low <= high <= 1, got", self.crop_scale)
        _require(self.knn_temperature > 0, "probe.knn_temperature", "must be positive, got", self.knn_temperature)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning the encoder as a CRATE classifier, or training one from scratch (finetune.py)."""

    checkpoint: Optional[str] = _doc(None, "pretrained weights (encoder.pth, final.pth or the released file); "
                                           "None: from scratch (supervised CRATE)")
    auto_augment: Optional[str] = _doc("rand-m9-mstd0.5-inc1", "timm RandAugment policy (None: off)")
    crop_scale: tuple[float, float] = _doc((0.08, 1.0), "RandomResizedCrop area range")
    hflip: float = _doc(0.5, "horizontal flip probability")
    reprob: float = _doc(0.25, "random erasing probability")
    mixup: float = _doc(0.8, "mixup alpha (0: off)")
    cutmix: float = _doc(1.0, "cutmix alpha (0: off)")
    smoothing: float = _doc(0.1, "label smoothing")
    ema_decay: Optional[float] = _doc(None, "keep an EMA of the weights with this decay and evaluate it too")

    def __post_init__(self) -> None:
        _require(0 <= self.reprob <= 1, "finetune.reprob", "must lie in [0, 1], got", self.reprob)
        _require(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "finetune.crop_scale",
                 "must be (low, high) with 0 < low <= high <= 1, got", self.crop_scale)
        _require(0 <= self.hflip <= 1, "finetune.hflip", "must lie in [0, 1], got", self.hflip)
        _require(self.mixup >= 0 and self.cutmix >= 0, "finetune.mixup", "alphas must be >= 0, got",
                 (self.mixup, self.cutmix))
        _require(0 <= self.smoothing < 1, "finetune.smoothing", "must lie in [0, 1), got", self.smoothing)
        _require(self.ema_decay is None or 0 < self.ema_decay < 1, "finetune.ema_decay", "must lie in (0, 1), got",
                 self.ema_decay)


def _like(section: type, name: str, default: Any) -> Any:
    """The field `name` of `section` with another default and the same doc: a stage's own optimiser defaults."""
    return field(default=default, metadata=section.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class ProbeOptimConfig(OptimConfig):
    """The linear probe's optimiser (protocol linear), by default MAE's recipe: LARS, base lr 0.1, no weight decay,
    90 epochs with 10 of warm-up."""

    optimizer: Literal["adamw", "lion", "lars", "sgd"] = _like(OptimConfig, "optimizer", "lars")
    blr: float = _like(OptimConfig, "blr", 0.1)
    weight_decay: float = _like(OptimConfig, "weight_decay", 0.0)
    epochs: int = _like(OptimConfig, "epochs", 90)
    warmup_epochs: float = _like(OptimConfig, "warmup_epochs", 10.0)


@dataclass(frozen=True)
class FinetuneOptimConfig(OptimConfig):
    """Fine-tuning's optimiser, by default MAE's recipe: AdamW (0.9, 0.999), base lr 5e-4, weight decay 0.05, layer
    decay 0.75, 100 epochs with 5 of warm-up, cosine to 1e-6."""

    blr: float = _like(OptimConfig, "blr", 5e-4)
    min_lr: float = _like(OptimConfig, "min_lr", 1e-6)
    betas: tuple[float, float] = _like(OptimConfig, "betas", (0.9, 0.999))
    layer_decay: Optional[float] = _like(OptimConfig, "layer_decay", 0.75)
    epochs: int = _like(OptimConfig, "epochs", 100)
    warmup_epochs: float = _like(OptimConfig, "warmup_epochs", 5.0)


@dataclass(frozen=True)
class Config:
    """What every stage's config holds: sections `model`, `data`, `optim`, `run`. Each stage narrows them to the
    kind it reads (its model's kind, its data keys, its optimiser's defaults) and adds its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass(frozen=True)
class PretrainStage(Config):
    """pretrain.py: masked pretraining of a CRATE-MAE (MAE's recipe for the optimiser: 800 epochs, 40 of warm-up,
    AdamW)."""

    model: MAEConfig = field(default_factory=MAEConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass(frozen=True)
class LinearProbeStage(Config):
    """linprobe.py: a classifier's encoder, frozen, with the probe's optimiser defaults, and `probe`."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass(frozen=True)
class FinetuneStage(Config):
    """finetune.py: a classifier, with fine-tuning's optimiser defaults, and `finetune`."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


STAGES: dict[str, type[Config]] = {"pretrain": PretrainStage, "linprobe": LinearProbeStage, "finetune": FinetuneStage}


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message} {value!r}")
