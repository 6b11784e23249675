"""DINO's weighted k-nearest-neighbour classifier on frozen features (no trained classifier at all).

Legend: N bank samples, D feature width, K classes, Q queries. Accuracies are in percent (0-100).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from crate_mae.eval.metrics import topk_correct


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, *, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted kNN: class scores (Q, K) for query_x (Q, D) against train_x (N, D), train_y (N,).

    With unit-normalised features, the k most cosine-similar training samples j of a query q vote
        score(q, c) = Σ_{j ∈ top-k(q), y_j = c} exp(sim(q, j) / T).
    Queries go `chunk` at a time, so the similarity matrix is never larger than (chunk, N).
    Runs on train_x's device and returns the scores there.
    """
    bank = F.normalize(train_x.float(), dim=1)  # (N, D)
    bank_y = train_y.to(bank.device).long()
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(query_x), chunk):
        q = F.normalize(query_x[start:start + chunk].to(bank.device).float(), dim=1)  # (B, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k) each
        votes = (sim / temperature).exp()
        # scatter_add of the weights at the neighbours' labels = the sum of weighted one-hot vectors
        scores.append(torch.zeros(len(q), num_classes, device=bank.device).scatter_add_(1, bank_y[idx], votes))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=bank.device)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Weighted-kNN top-1 and top-5 of val against train, in percent: {"top1": …, "top5": …}."""
    scores = knn_classify(train_x, train_y, val_x, num_classes=num_classes, k=k, temperature=temperature, chunk=chunk)
    correct = topk_correct(scores, val_y, ks=(1, 5))
    return {"top1": 100.0 * correct[1] / len(val_y), "top5": 100.0 * correct[5] / len(val_y)}
