"""Frozen features for the probes: the pooled feature of a classifier's last layer, extracted once per rank and
cached on disk (keyed by everything the features depend on), so a second probe skips the extraction.

Legend: B batch, N patches, d width.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch

from crate_mae.atomic import atomic_write
from crate_mae.data.device_decode import to_device
from crate_mae.engine.dist import Dist
from crate_mae.engine.trainer import autocast
from crate_mae.model import CrateClassifier

log = logging.getLogger("crate_mae.eval")


def pooled_features(model: CrateClassifier, images: torch.Tensor, features: tuple[str, ...] = ("cls", "mean")
                    ) -> dict[str, torch.Tensor]:
    """The probed features (B, d) of the last layer from one clean pass, after the encoder's final norm (family mae;
    the supervised family has none): "cls", the CLS token; "mean", the mean of the patch tokens."""
    [(patches, cls)] = model.forward_intermediates(images, indices=1, return_prefix_tokens=True, norm=True,
                                                   output_fmt="NLC", intermediates_only=True)  # (B, N, d), (B, 1, d)
    return {f: cls[:, 0] if f == "cls" else patches.mean(dim=1) for f in features}


def pooled(model: CrateClassifier, images: torch.Tensor, feature: str) -> torch.Tensor:
    """One probed feature (B, d): `pooled_features` of that name."""
    return pooled_features(model, images, (feature,))[feature]


@torch.no_grad()
def extract(model: CrateClassifier, loader: Any, dist: Dist, feature: str, precision: str) -> dict[str, torch.Tensor]:
    """This rank's share of a set's features (n, d) in float32 and labels (n,), on the CPU. Each batch reaches the
    device by `to_device`, the one way."""
    model.eval()
    feats, labels = [], []
    for batch in loader:
        with autocast(dist.device, precision):
            feats.append(pooled(model, to_device(batch, dist.device).images, feature).float().cpu())
        labels.append(batch.labels)  # the loader's, already on the CPU
    return {"x": torch.cat(feats) if feats else torch.zeros(0, model.num_features),
            "y": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)}


def feature_cache_key(*parts: object) -> str:
    """First 16 hex digits of the sha256 of the parts: everything the features depend on (the linear probe's: the
    checkpoint's path, size and mtime; each set's shards; the model config; the feature; the crop; the precision).

    JSON with sorted keys, so a dict's order does not matter; anything JSON cannot write goes in by
    its repr, so parts should be plain values (a repr carrying a memory address would never match).
    """
    text = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_cached(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The features saved at `path`, or None when there are none or the file is unreadable (logged, not raised)."""
    if not os.path.exists(path):
        return None
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or not a torch file at all: recompute instead
        log.warning(f"ignoring unreadable feature cache {path}: {type(error).__name__}: {error}")
        return None
    if not isinstance(features, dict) or not all(isinstance(v, torch.Tensor) for v in features.values()):
        log.warning(f"ignoring feature cache {path}: not a dict of tensors")
        return None
    return features


def save_cached(path: str | os.PathLike, features: dict[str, torch.Tensor]) -> None:
    """Save features (name → tensor) to `path` atomically: a crash leaves the old file or none, never half of one."""
    # torch.save writes a view's whole storage; a copy saves a slice of a large buffer as only itself.
    compact = {name: t.detach().to("cpu", copy=True) for name, t in features.items()}
    with atomic_write(path) as f:  # torch writes into our file: a full disk is its one line
        torch.save(compact, f)
