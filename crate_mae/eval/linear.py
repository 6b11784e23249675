"""MAE's linear-probe head: BatchNorm1d without affine (a per-feature standardisation) + Linear, on a frozen encoder,
trained with LARS over epochs (the optimiser and schedule are the engine's; `optim.optimizer: lars`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from crate_mae.engine.dist import Dist, all_reduce_sum
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


class OnlineProbe:
    """A linear classifier (MAE's probe head: BatchNorm without affine, then Linear) trained alongside pretraining on
    the detached CLS feature of a clean pass (no masking, the final norm), with its own AdamW: what the encoder's features are worth, step by step (as lightly's and
    solo-learn's online classifiers). It never changes the MAE: the features come under no_grad, its weights are
    initialised from its own generator, and its optimiser holds only its weights. A `Stateful` the Checkpointer
    keeps under "probe", so a resume continues it exactly. Under DDP its gradients are averaged over ranks.

    Cost per step: one clean encoder pass over the batch (no decoder, no backward through the encoder).
    """

    def __init__(self, dim: int, num_classes: int, *, lr: float, device: torch.device, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global generator: put it back
            linear = nn.Linear(dim, num_classes)
        with torch.no_grad():  # its weights from its own generator: the global ones stay where training left them
            linear.weight.normal_(0.0, 0.01, generator=generator)  # as MAE's probe head
            linear.bias.zero_()
        # MAE's probe head: a per-feature standardisation (BatchNorm without affine), then the Linear layer
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.0)

    @torch.no_grad()
    def features(self, mae: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The detached CLS feature (B, d) of a clean pass: no masking, after the final norm, in fp32."""
        return mae.encode(images)[:, 0].float()

    def step(self, mae: nn.Module, images: torch.Tensor, labels: torch.Tensor, dist: Dist) -> torch.Tensor:
        """One update of the head on a batch; returns its loss (a detached device scalar: no host sync)."""
        x = self.features(mae, images)
        self.head.train()
        loss = nn.functional.cross_entropy(self.head(x), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.world_size > 1:  # the same update and statistics on every rank: the mean gradient and running stats
            for p in self.head.parameters():
                p.grad = all_reduce_sum(dist, p.grad) / dist.world_size
            for stat in (self.head[0].running_mean, self.head[0].running_var):
                stat.copy_(all_reduce_sum(dist, stat.clone()) / dist.world_size)
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(Q, d) → (Q, K), with the running statistics (eval mode)."""
        self.head.eval()
        return self.head(features.to(self.head[1].weight.device).float())

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
