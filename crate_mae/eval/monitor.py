"""Evaluation inside pretraining: what the model learns, measured as it trains, without changing its training.

    monitor = Monitor(cfg.monitor, cfg.model, train_spec=run.train, val_spec=run.val, data=cfg.data,
                      dist=dist, seed=cfg.run.seed, precision=trainer.precision)   # once; its loaders built here
    history.append({"epoch": e, "step": s, **monitor.evaluate(trainer.module)})    # every rank; the same dict on each
    monitor_figure(history).savefig("monitor.png"); print(monitor_table(history))

Three measures, each exact over ranks (2 ranks give 1's numbers, to the rounding of one image's values in another
batch):
- **held-out loss** — `CrateMAE.sample_loss` (its own norm_pix_loss) of the val images under FIXED masks: image i's
  noise (N,) comes from a generator seeded by (seed, key_i) alone, so it is the same at every evaluation, on any
  number of ranks, in any batch. The mean over the first `val_samples` val images in key order, added with fsum.
- **kNN top-1 / top-5 (%)** — DINO's weighted kNN (eval/knn.py) of the val images (queries) against a bank of the
  first `bank_samples` labelled train images in key order, for the CLS feature and for the mean of the patch
  tokens: clean images, eval mode, after the final norm (eval/features.py: `pooled_features`, one pass for both),
  from a headless CrateClassifier on the MAE's encoder (`hub.create_model`, from the MAE's config and weights at the
  first evaluation; refilled with its weights at each one after). The bank is gathered to every rank in key order;
  each rank scores its own queries; one all_reduce adds the counts.
- **the white-box objective per layer** — viz/measures.py's `layer_measures` (R^c before and after MSSA, ISTA's
  zeros and ℓ1/ℓ2) on the first `layers_batch` val images, on rank 0, broadcast.

"First n in key order" reads only the first shards that hold n samples (`eval_loader(first_samples=)`), and chooses
among them by the sample key "<shard url>/<key>": a fixed choice, whatever the split over ranks and workers.
Isolation: `evaluate` runs under no_grad, puts back every global generator (Python, NumPy, torch CPU and CUDA) and
every module's train/eval flag, and reads only its own evaluation loaders; weights and `.grad`s are not touched.
Legend: B images, N patches, d width, M bank images, Q queries, K classes.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from crate_mae.config import ClassifierConfig, DataConfig, MAEConfig, MonitorConfig
from crate_mae.config.sections import PREEMPT_SIGNALS
from crate_mae.data.device_decode import to_device
from crate_mae.data.manifest import ShardList, resolve_shards
from crate_mae.data.reader import ShardLoader, eval_loader, unlabelled
from crate_mae.engine.dist import (Dist, all_gather_object, all_reduce_max, all_reduce_sum, broadcast_object, rng_state,
                                   set_rng_state)
from crate_mae.engine.trainer import autocast, resolve_precision
from crate_mae.errors import ShardError
from crate_mae.eval.features import pooled_features
from crate_mae.eval.knn import knn_classify
from crate_mae.eval.linear import OnlineProbe
from crate_mae.eval.metrics import topk_correct
from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.files import checkpoint_of
from crate_mae.model.hub import create_model, load_weights
from crate_mae.model.mae import CrateMAE
from crate_mae.seeding import mix_seed
from crate_mae.viz.measures import layer_measures
from crate_mae.viz.plot import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FEATURES = ("cls", "mean")
LAYER_MEASURES = ("rate_before_mssa", "rate_after_mssa", "zero_fraction", "l1_over_l2")


def fixed_noise(keys: list[str], num_patches: int, seed: int) -> torch.Tensor:
    """The masking noise (B, N) of the held-out images: row i from a generator seeded by (seed, keys[i]) alone."""
    return torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(mix_seed(seed, "heldout", k)))
                        for k in keys])


class PassResult(NamedTuple):
    """One pass over this rank's share of a set, on the CPU."""

    keys: list[str]  # "<shard url>/<key>" of each image
    loss: torch.Tensor  # (n,) float64 held-out loss per image (empty when not measured)
    feats: dict[str, torch.Tensor]  # "cls", "mean" → (n, d) float32 (empty when not measured)
    labels: torch.Tensor  # (n,) int64


@dataclass
class Cost:
    """Where the last `evaluate` spent its time on this rank (seconds by part) and how many images each pass read."""

    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)

    def charge(self, part: str, since: float, device: torch.device) -> float:
        """Add the time from `since` to `part` (after the device's queue has run); returns now."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - since
        return now


class Monitor:
    """The measures of pretraining on a held-out set; `evaluate(mae)` is collective and changes nothing of `mae`."""

    def __init__(self, cfg: MonitorConfig, model_cfg: MAEConfig, *, train_spec: str | ShardList,
                 val_spec: str | ShardList, data: DataConfig, dist: Dist, seed: int, precision: str = "fp32",
                 probe: OnlineProbe | None = None, stop_signals: Sequence[str] = PREEMPT_SIGNALS) -> None:
        self.cfg, self.model_cfg, self.dist, self.seed = cfg, model_cfg, dist, seed
        self.precision = resolve_precision(precision, dist.device)
        self.skipped: list[str] = []  # one line per measure not taken, and why
        self.cost = Cost()
        self.encoder: CrateClassifier | None = None  # the classifier on the MAE's encoder, made at the first evaluation
        self.img_size = model_cfg.img_size
        self.num_patches = (model_cfg.img_size // model_cfg.patch_size) ** 2
        train, val = resolve_shards(train_spec), resolve_shards(val_spec)  # each set checked once (a stage's: already)

        def loader(shards: ShardList, labels: bool, first: int | None) -> ShardLoader:
            return eval_loader(shards, self.img_size, data=data, rank=dist.rank, world_size=dist.world_size,
                               labels=labels, pin_memory=dist.device.type == "cuda", first_samples=first,
                               stop_signals=stop_signals)  # its workers ignore the run's stop signals

        # The kNN needs a labelled bank and labelled queries; the probe, labelled queries. Each loader is built once.
        knn_why = (unlabelled(train) or unlabelled(val)) if cfg.knn_k else None
        probe_why = unlabelled(val) if probe is not None and not (cfg.knn_k and knn_why is None) else None
        if cfg.knn_k and knn_why is not None:
            self.skipped.append(f"kNN skipped: {knn_why}")
        if probe is not None and probe_why is not None:
            self.skipped.append(f"online probe not evaluated: {probe_why}")
        knn = bool(cfg.knn_k) and knn_why is None
        self.probe = probe if probe_why is None else None
        self.bank_loader = loader(train, True, cfg.bank_samples) if knn else None
        self.val_loader = loader(val, knn or self.probe is not None, cfg.val_samples)
        self.num_classes = max(self.bank_loader.stream.num_classes, self.val_loader.stream.num_classes) if knn else 0
        self.chosen: set[str] = set()  # the keys of the held-out images of the last evaluation: the kNN's queries
        self.layer_images: torch.Tensor | None = None  # (B, 3, S, S) uint8, rank 0's: the same batch every time
        if cfg.layers_batch and dist.is_main:
            first = eval_loader(val, self.img_size, data=data, batch_size=cfg.layers_batch, labels=False,
                                num_workers=0, max_bad_fraction=1.0)
            batch = next(iter(first), None)
            if batch is None:
                raise ShardError(f"{val.spec}: no usable image for the per-layer measures")
            self.layer_images = batch.images

    def evaluate(self, mae: CrateMAE) -> dict[str, float]:
        """Every measure of `mae` as it is now: flat keys ("heldout_loss", "knn_cls_top1", "layer0/zero_fraction", ...).

        Collective: every rank calls it, and every rank gets the same dict. `mae` is the raw module (not the DDP or
        compiled wrapper); its weights, gradients, train/eval flags and every global generator are left as found.
        """
        modes = [(m, m.training) for m in mae.modules()]
        saved = rng_state()
        try:
            with torch.no_grad():
                return self._measure(mae)
        finally:
            set_rng_state(saved)
            for module, training in modes:  # each module's own flag: a model may be partly in eval mode
                module.training = training

    def _measure(self, mae: CrateMAE) -> dict[str, float]:
        self.cost, start = Cost(), time.perf_counter()
        self._fill_encoder(mae)
        self.cost.charge("weights", start, self.dist.device)
        mae.eval()
        val = self._pass(self.val_loader, "val", mae=mae, features=self.bank_loader is not None or self.probe is not None)
        out = self._heldout(val)
        if self.probe is not None:
            out |= self._probe(val)
        if self.bank_loader is not None:
            out |= self._knn(val, self._pass(self.bank_loader, "bank", mae=None, features=True))
        if self.cfg.layers_batch:
            tick = time.perf_counter()
            rows = layer_measures(self.encoder, self.layer_images.to(self.dist.device), eps2=self.cfg.eps2) \
                if self.dist.is_main else None
            rows = broadcast_object(self.dist, rows)
            out |= {f"layer{r['layer']}/{name}": r[name] for r in rows for name in LAYER_MEASURES}
            self.cost.images["layers"] = len(self.layer_images) if self.layer_images is not None else 0
            self.cost.charge("layers", tick, self.dist.device)
        self.cost.seconds["total"] = time.perf_counter() - start
        return out

    def _fill_encoder(self, mae: CrateMAE) -> None:
        """The classifier on `mae`'s encoder as it is now: made by `create_model` at the first evaluation (a headless
        CrateClassifier of the MAE's config, its encoder's tensors; the decoder side set aside), refilled after."""
        if self.encoder is not None:
            load_weights(self.encoder, mae.state_dict())
            return
        source = checkpoint_of({"model": mae.state_dict(), "config": {"model": dataclasses.asdict(self.model_cfg)}},
                               "the pretraining model")
        encoder, _ = create_model(ClassifierConfig(num_classes=0), source)
        self.encoder = encoder.to(self.dist.device).eval().requires_grad_(False)

    def _pass(self, loader: ShardLoader, part: str, *, mae: CrateMAE | None, features: bool) -> PassResult:
        """This rank's share of a set: with `mae`, each image's held-out loss; with `features`, its CLS and mean."""
        device, keys, losses, labels = self.dist.device, [], [], []
        feats: dict[str, list[torch.Tensor]] = {f: [] for f in FEATURES}
        tick = time.perf_counter()
        for batch in loader:
            batch = to_device(batch, device)
            tick = self.cost.charge(f"data/{part}", tick, device)
            if mae is not None:
                noise = fixed_noise(batch.keys, self.num_patches, self.seed).to(device)  # (B, N)
                with autocast(device, self.precision):
                    out = mae.forward_masked(batch.images, noise=noise)
                losses.append(mae.sample_loss(mae.normalize(batch.images), out.pred, out.mask).double().cpu())  # (B,)
                tick = self.cost.charge("heldout", tick, device)
            if features:
                with autocast(device, self.precision):
                    for f, x in pooled_features(self.encoder, batch.images, FEATURES).items():  # one pass, both
                        feats[f].append(x.float().cpu())  # (B, d)
                tick = self.cost.charge(f"features/{part}", tick, device)
            keys += batch.keys
            labels.append(batch.labels.cpu())
        self.cost.images[part] = len(keys)
        width = self.encoder.num_features
        return PassResult(keys, torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64),
                          {f: torch.cat(v) if v else torch.zeros(0, width) for f, v in feats.items()},
                          torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))

    def _heldout(self, val: PassResult) -> dict[str, float]:
        """The mean held-out loss over the first `val_samples` images in key order: every rank gathers every
        (key, loss), so the choice and the exactly rounded sum (fsum) are the same on every rank and split."""
        tick = time.perf_counter()
        pairs = sorted(p for keys, loss in all_gather_object(self.dist, (val.keys, val.loss.tolist()))
                       for p in zip(keys, loss))[: self.cfg.val_samples]
        if not pairs:
            raise ShardError(f"{self.val_loader.stream.shards.spec}: the held-out set gave no images")
        self.chosen = {k for k, _ in pairs}  # the queries of the kNN
        self.cost.charge("gather", tick, self.dist.device)
        return {"heldout_loss": math.fsum(v for _, v in pairs) / len(pairs), "heldout_images": float(len(pairs))}

    def _probe(self, val: PassResult) -> dict[str, float]:
        """The online probe's top-1 / top-5 (%) on this rank's chosen queries (their CLS features); counts added over
        ranks."""
        mine = torch.tensor([k in self.chosen for k in val.keys], dtype=torch.bool)
        logits = self.probe.logits(val.feats["cls"][mine])  # (Q, K)
        hits = topk_correct(logits, val.labels[mine].to(logits.device), ks=(1, 5))
        counts = all_reduce_sum(self.dist, torch.tensor([hits[1], hits[5], int(mine.sum())], dtype=torch.float64,
                                                     device=self.dist.device)).tolist()
        n = max(counts[2], 1)
        return {"probe_top1": 100.0 * counts[0] / n, "probe_top5": 100.0 * counts[1] / n}

    def _knn(self, val: PassResult, bank: PassResult) -> dict[str, float]:
        """Top-1 / top-5 (%) of this rank's chosen queries against the whole bank (the same on every rank, in key
        order); counts added over ranks."""
        dist, tick = self.dist, time.perf_counter()
        parts = all_gather_object(dist, (bank.keys, bank.feats, bank.labels))
        keys = [k for p in parts for k in p[0]]
        order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__)[: self.cfg.bank_samples], dtype=torch.long)
        if len(order) == 0:
            raise ShardError(f"{self.bank_loader.stream.shards.spec}: the kNN bank gave no images")
        bank_x = {f: torch.cat([p[1][f] for p in parts])[order].to(dist.device) for f in FEATURES}  # (M, d)
        bank_y = torch.cat([p[2] for p in parts])[order].to(dist.device)  # (M,)
        mine = torch.tensor([k in self.chosen for k in val.keys], dtype=torch.bool)
        query_y = val.labels[mine].to(dist.device)  # (Q,)
        seen = torch.stack([bank_y.max(), query_y.max() if len(query_y) else bank_y.max()]).max()
        classes = max(self.num_classes, int(all_reduce_max(dist, seen.clone()).item()) + 1)  # no manifest: the labels
        tick = self.cost.charge("gather", tick, dist.device)
        counts = torch.zeros(2 * len(FEATURES) + 1, dtype=torch.float64, device=dist.device)
        for i, f in enumerate(FEATURES):
            scores = knn_classify(bank_x[f], bank_y, val.feats[f][mine].to(dist.device), num_classes=classes,
                                  k=self.cfg.knn_k, temperature=self.cfg.knn_temperature)  # (Q, K)
            hits = topk_correct(scores, query_y, ks=(1, 5))
            counts[2 * i], counts[2 * i + 1] = hits[1], hits[5]
        counts[-1] = len(query_y)
        counts = all_reduce_sum(dist, counts).tolist()
        self.cost.charge("knn", tick, dist.device)
        n = max(counts[-1], 1)
        out = {f"knn_{f}_top{k}": 100.0 * counts[2 * i + j] / n for i, f in enumerate(FEATURES) for j, k in
               enumerate((1, 5))}
        return out | {"knn_bank_images": float(len(order))}


def _depth(history: list[dict[str, float]]) -> int:
    """Encoder layers measured in `history` (0: none)."""
    return 1 + max((int(k[5:].split("/")[0]) for row in history for k in row
                    if k.startswith("layer") and k.endswith("/zero_fraction")), default=-1)


def monitor_figure(history: list[dict[str, float]]) -> Figure:
    """One panel per measure against the epoch: held-out loss; kNN top-1 (CLS, mean); R^c before and after MSSA,
    ISTA's zeros and ℓ1/ℓ2, one line per layer on a colour ramp from shallow to deep (the colourbar)."""
    if not history:
        raise ValueError("monitor_figure: an empty history")
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    depth = _depth(history)
    ramp = [plt.get_cmap("viridis")(i / max(depth - 1, 1)) for i in range(depth)]
    panels: list[tuple[str, str, list[tuple[str, str, object]]]] = [
        ("held-out loss (masked patches)", "loss", [("heldout_loss", "held-out", "C0")]),
        ("kNN top-1" + (" and the online probe's" if any("probe_top1" in row for row in history) else ""), "%",
         [("knn_cls_top1", "kNN, CLS", "C1"),
          ("knn_mean_top1", "kNN, mean of patches", "C2"), ("probe_top1", "online probe, CLS", "C3")])]
    for name, title, unit in (("rate_before_mssa", "$R^c$ before MSSA", "nats"), ("rate_after_mssa", "$R^c$ after MSSA",
                              "nats"), ("zero_fraction", "sparse code (ISTA; ODL z2): fraction of zeros", "fraction"),
                              ("l1_over_l2", "sparse code: ℓ1/ℓ2 per token", "ℓ1/ℓ2")):
        panels.append((title, unit, [(f"layer{i}/{name}", f"layer {i}", ramp[i]) for i in range(depth)]))
    panels = [p for p in panels if any(key in row for key, _, _ in p[2] for row in history)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    layer_axes = []
    for ax, (title, unit, lines) in zip(axes.flat, panels):
        for key, label, colour in [line for line in lines if any(line[0] in row for row in history)]:
            ax.plot(epochs, [row.get(key, float("nan")) for row in history], "o-", ms=3, color=colour, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if lines[0][0].startswith("layer"):
            layer_axes.append(ax)
        else:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if layer_axes:
        norm = BoundaryNorm([i - 0.5 for i in range(depth + 1)], depth)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=ListedColormap(ramp)), ax=layer_axes, ticks=range(depth))
        bar.set_label("layer (shallow → deep)")
    fig.crate_fixed_layout = True  # constrained layout already: viz/plot.py's FigureSink leaves it as it is
    return fig


def monitor_table(history: list[dict[str, float]]) -> str:
    """A plain-text table, one row per evaluation: epoch, step, held-out loss, kNN top-1 (CLS, mean), and the
    deepest layer's sparsity (ISTA's fraction of zeros and ℓ1/ℓ2); "-" where a measure was not taken."""
    last = _depth(history) - 1
    columns = [("epoch", "epoch", "{:.0f}"), ("step", "step", "{:.0f}"), ("held-out loss", "heldout_loss", "{:.4f}"),
               ("kNN top-1 CLS %", "knn_cls_top1", "{:.2f}"), ("kNN top-1 mean %", "knn_mean_top1", "{:.2f}"),
               (f"layer {last} zeros", f"layer{last}/zero_fraction", "{:.3f}"),
               (f"layer {last} ℓ1/ℓ2", f"layer{last}/l1_over_l2", "{:.2f}")]
    cells = [[title for title, _, _ in columns]]
    cells += [[fmt.format(row[key]) if key in row else "-" for _, key, fmt in columns] for row in history]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
