"""CRATE-MAE: random masking, the masked autoencoder's forward pass and its loss (docs/MODEL.md).

Legend: B batch, N = h·w patches, d width, P = 3·p·p pixels per patch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crate_mae.model.crate import Decoder, Encoder, xavier_linear
from crate_mae.model.layers import CrateStem, grid_size, patchify


class MAEOutput(NamedTuple):
    """What `CrateMAE.forward` returns."""

    loss: torch.Tensor  # () mean squared error over the masked patches
    pred: torch.Tensor  # (B, N, P) predicted pixels (normalised per patch if norm_pix_loss)
    mask: torch.Tensor  # (B, N) 1 = masked (removed), 0 = kept, in the original patch order


def random_masking(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Per-sample random masking by argsort of `noise` (B, N): the mask (B, N), 1 = masked.

    The patches with the int(N·(1 − r)) smallest noise values are kept, as in MAE:
    ids_shuffle = argsort(noise), ids_restore = argsort(ids_shuffle); patch j is kept iff its rank
    ids_restore[j] < len_keep. Equal to MAE's gather of [0]*len_keep + [1]*rest by ids_restore.
    """
    n = noise.shape[1]
    len_keep = int(n * (1 - mask_ratio))
    ids_restore = noise.argsort(dim=1).argsort(dim=1)  # (B, N) rank of each patch
    return (ids_restore >= len_keep).to(noise.dtype)


class CrateMAE(CrateStem):
    """The CRATE masked autoencoder.

    img → patch tokens → masked ones replaced by `mask_token` → CLS prepended → sin-cos table added
    → Encoder → Decoder → `decoder_pred` Linear → pred without the CLS row.
    The encoder sees all 1 + N tokens (the released model's choice, unlike MAE's visible-only encoder).
    The released model's `decoder_embed` Linear is unused by its forward pass, so this one has none.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        dim: int,
        heads: int,
        encoder_depth: int,
        decoder_depth: int,
        eta: float = 0.1,
        lambd: float = 0.5,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__(family="mae", img_size=img_size, patch_size=patch_size, dim=dim)  # normalise, embed, CLS, table
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.num_classes, self.num_features = 0, dim  # timm's attributes (no classifier head)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.encoder = Encoder(dim=dim, heads=heads, depth=encoder_depth, eta=eta, lambd=lambd)
        self.decoder = Decoder(dim=dim, heads=heads, depth=decoder_depth)
        self.decoder_pred = xavier_linear(dim, 3 * patch_size * patch_size, bias=True)

    def encode(self, img: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """img (B, 3, H, W) uint8 or normalised, mask (B, N) or None → encoder output (B, 1 + N, d), CLS first."""
        return self.encoder(self.tokens(img, mask, self.mask_token))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + N, d) → pred (B, N, P); the CLS row is dropped."""
        return self.decoder_pred(self.decoder(latent))[:, 1:]

    def target(self, img: torch.Tensor) -> torch.Tensor:
        """The regression target (B, N, P): patchify(img), per-patch normalised if norm_pix_loss.

        Normalisation uses the unbiased variance, as MAE (and so the released model) does:
        t ← (t − mean) / (var + 1e-6)^½ over the P pixels of each patch.
        """
        target = patchify(img, self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def patch_loss(self, img: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Each patch's mean squared error (B, N), in fp32: (pred − target)².mean(−1)."""
        return (pred.float() - self.target(img.float())).pow(2).mean(dim=-1)

    def sample_loss(self, img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each image's loss (B,): its patch errors averaged over its masked patches (what the viz commands show)."""
        return (self.patch_loss(img, pred) * mask).sum(dim=1) / mask.sum(dim=1)

    def loss(self, img: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches of the whole batch (in fp32).

        ((pred − target)².mean(−1) · mask).sum() / mask.sum()
        """
        return (self.patch_loss(img, pred) * mask).sum() / mask.sum()

    def no_weight_decay(self) -> set[str]:
        """Parameters kept free of weight decay besides norms and biases (timm's convention)."""
        return {"cls_token", "mask_token"}

    def forward(
        self, img: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """img (B, 3, H, W), uint8 pixels (or normalised float) → MAEOutput(loss, pred (B, N, P), mask (B, N)).

        `mask_ratio` defaults to the one the model was built with. `noise` (B, N) replaces the uniform
        draw that orders patches for masking (as Hugging Face's ViTMAE does), so a mask can be reproduced.
        """
        img = self.normalize(img)  # (B, 3, H, W) float: the loss's target is the normalised image, as in MAE
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0 < ratio < 1:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {ratio}")
        h, w = grid_size((img.shape[-2], img.shape[-1]), self.patch_size)
        if noise is None:
            noise = torch.rand(img.shape[0], h * w, device=img.device)
        elif noise.shape != (img.shape[0], h * w):
            raise ValueError(f"noise must have shape (B, N) = ({img.shape[0]}, {h * w}), got {tuple(noise.shape)}")
        mask = random_masking(noise.float(), ratio)
        pred = self.decode(self.encode(img, mask))
        return MAEOutput(loss=self.loss(img, pred, mask), pred=pred, mask=mask)
