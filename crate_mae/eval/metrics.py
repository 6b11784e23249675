"""Accuracy: top-k counts, and top-1 / top-5 of a classifier over an evaluation loader, exact over all ranks.

Counts, not rates, travel between ranks: each rank counts its share, one all_reduce(SUM) adds the counts.
Legend: N samples, K classes. Accuracies are in percent (0-100).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from crate_mae.data.device_decode import to_device
from crate_mae.engine.dist import Dist, all_reduce_sum
from crate_mae.engine.trainer import autocast
from crate_mae.errors import ShardError


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many of the N rows of `logits` (N, K) have their label (N,) among the top k scores, for each k.

    k is clipped to K (with K ≤ 5 classes every sample is top-5 correct). Counts rather than rates,
    so that they can be summed over ranks or chunks before dividing.
    """
    num_classes = logits.shape[1]
    top = logits.topk(min(max(ks), num_classes), dim=1).indices  # (N, k_max), best first
    hit = top == labels.to(top.device).view(-1, 1)  # (N, k_max): at most one True per row
    return {k: int(hit[:, : min(k, num_classes)].sum()) for k in ks}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, dist: Dist, precision: str = "fp32") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `model` over an evaluation loader, exact over all ranks.

    Each rank counts (top-1 correct, top-5 correct, samples) over its share of the data; one
    all_reduce(SUM) adds the counts, so every sample counts exactly once. Each batch reaches the device by
    `to_device`, the one way; the model receives its uint8 pixels (and normalises them itself).
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=dist.device)
    for batch in loader:
        batch = to_device(batch, dist.device)
        with autocast(dist.device, precision):
            logits = model(batch.images)
        correct = topk_correct(logits.float(), batch.labels, ks=(1, 5))
        counts += torch.tensor([correct[1], correct[5], len(batch.labels)], dtype=torch.float64, device=dist.device)
    model.train(was_training)
    top1, top5, n = all_reduce_sum(dist, counts).tolist()
    if n == 0:  # an accuracy over nothing would read as 0 % and let the run exit 0
        spec = getattr(getattr(loader, "stream", None), "shards", None)
        raise ShardError(f"{getattr(spec, 'spec', 'the evaluation set')}: evaluation read no samples")
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1), "samples": int(n)}
