"""MAE's linear-probe head: BatchNorm1d without affine (a per-feature standardisation) + Linear, on a frozen encoder,
trained with LARS over epochs (the optimiser and schedule are the engine's; `optim.optimizer: lars`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from crate_mae.eval.features import pooled
from crate_mae.model import CrateClassifier


class LinearProbe(nn.Module):
    """MAE's probe head on a frozen encoder: BatchNorm1d without affine + Linear; the encoder stays in eval mode."""

    def __init__(self, encoder: CrateClassifier, *, feature: str, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.feature = encoder.requires_grad_(False), feature
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6),
                                  nn.Linear(encoder.num_features, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # as MAE's probe
        nn.init.zeros_(self.head[1].bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) → logits (B, K)."""
        self.encoder.eval()  # frozen: no dropout or stochastic depth, whatever mode the probe is in
        with torch.no_grad():
            x = pooled(self.encoder, images, self.feature)
        return self.head(x.float())
