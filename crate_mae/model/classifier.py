"""The CRATE classifier: the CRATE-MAE encoder without masking, pooled, with a linear head.

Legend: B batch, N = h·w patches, d width, K classes.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from crate_mae.model.convert import MAE_ONLY_PREFIXES, load_strict, to_ours
from crate_mae.model.crate import Encoder, xavier_linear
from crate_mae.model.layers import PatchEmbed, SinCosPosition, grid_size, prepend_cls


class CrateClassifier(nn.Module):
    """Patch embedding + CLS + fixed sin-cos table + CRATE encoder + pool + (LayerNorm, Linear) head.

    Its non-head tensors carry the same names as the CRATE-MAE's encoder side (`patch_embed.*`,
    `cls_token`, `encoder.*`), so a pretrained checkpoint fills them one to one (`load_pretrained`).
    Any image size that the patch divides works: the sin-cos table is regenerated for the grid.
    timm's split: `forward_features` (tokens) then `forward_head` (pool, norm, logits).
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        img_size: int = 224,
        patch_size: int = 16,
        dim: int,
        heads: int,
        depth: int,
        eta: float = 0.1,
        lambd: float = 0.1,
        pool: Literal["cls", "mean"] = "cls",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool, self.num_classes, self.num_features = pool, num_classes, dim
        self.patch_embed = PatchEmbed(patch_size=patch_size, dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.pos = SinCosPosition(dim=dim, grid=grid_size((img_size, img_size), patch_size))
        self.encoder = Encoder(dim=dim, heads=heads, depth=depth, eta=eta, lambd=lambd, drop_path=drop_path)
        self.fc_norm = nn.LayerNorm(dim)
        self.head = xavier_linear(dim, num_classes, bias=True) if num_classes > 0 else nn.Identity()

    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → the encoder's input (B, 1 + N, d): patch tokens, CLS first, sin-cos table added."""
        x, grid = self.patch_embed(img)  # (B, N, d)
        return self.pos(prepend_cls(x, self.cls_token.to(x.dtype)), grid)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → encoder tokens (B, 1 + N, d) after the final norm, CLS first."""
        return self.encoder(self.tokens(img))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, 1 + N, d) → logits (B, K), or the normed pooled feature (B, d) if pre_logits."""
        x = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → logits (B, K)."""
        return self.forward_head(self.forward_features(img))

    def no_weight_decay(self) -> set[str]:
        """Parameters kept free of weight decay besides norms and biases (timm's convention)."""
        return {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping for layer-wise lr decay: the stem, then each encoder layer; what matches
        neither (the final norm and the head) is the top group, with the full lr, as in MAE."""
        return {"stem": r"^cls_token|^patch_embed", "blocks": [(r"^encoder\.layers\.(\d+)", None)]}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, pool: Literal["cls", "mean"] | None = None) -> None:
        """A fresh head for `num_classes` outputs (0: features only), as timm models offer."""
        self.num_classes, self.pool = num_classes, pool or self.pool
        device = self.fc_norm.weight.device
        self.head = xavier_linear(self.num_features, num_classes, bias=True).to(device) if num_classes > 0 else nn.Identity()

    def head_keys(self) -> set[str]:
        """State-dict keys that a pretrained CRATE-MAE does not provide (the head's)."""
        return {k for k in self.state_dict() if k.startswith(("fc_norm.", "head."))}

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Fill every non-head tensor from a CRATE-MAE state dict, strictly.

        `state` may be ours or the released layout, bare or `{"model": ...}`-wrapped, with `module.`
        prefixes. The decoder side (`mask_token`, `decoder.*`, `decoder_pred.*`) is set aside; any
        other key that does not fit, a missing encoder tensor or a shape mismatch is an error naming it.
        """
        encoder_state = {k: v for k, v in to_ours(state).items() if not k.startswith(MAE_ONLY_PREFIXES)}
        load_strict(self, encoder_state, allow_missing=self.head_keys())
