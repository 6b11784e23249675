"""The CRATE classifiers: one class, three families (config/variants.py, FAMILIES).

- family `mae`: the CRATE-MAE encoder reused (conv stem, fixed sin-cos table, final norm), no masking;
- family `supervised`: the seed's CRATE (patchify → LN → Linear → LN stem, learned table, no final norm);
- family `alpha`: CRATE-α (conv stem, learned table, MSSA + ODL layers with residuals, no final norm).

All pool (CLS, or the mean) and end in LayerNorm + Linear. timm's API: `forward_features` (tokens),
`forward_head` (pool, norm, logits), `forward_intermediates` (chosen layers' tokens).
Legend: B batch, N = h·w patches, d width, K classes.
"""
# No `from __future__ import annotations` here: torch.fx writes the root `forward`'s annotations into the code
# of a traced model, and TorchScript (timm's FX-then-script path) must read them as types, not strings.

from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from crate_mae.config.variants import FAMILIES
from crate_mae.model.crate import Encoder, xavier_linear
from crate_mae.model.layers import CrateStem, Normalize
from crate_mae.model.taps import EncoderTaps, feature_info


class CrateClassifier(EncoderTaps, CrateStem):
    """stem + CLS + position table + CRATE encoder + pool + (LayerNorm, Linear) head.

    Family `mae`: non-head tensors carry the CRATE-MAE's encoder-side names (`patch_embed.proj.*`,
    `cls_token`, `encoder.*`), so a pretrained checkpoint fills them one to one; mean pooling is over the
    patch tokens. Family `supervised`: `patch_embed.{pre_norm,proj,post_norm}.*`, `pos.table`, `cls_token`,
    `encoder.layers.*`, and mean pooling over all 1 + N tokens (CLS included), as released. Family `alpha`:
    `patch_embed.proj.*`, `pos.table`, `cls_token`, `encoder.layers.i.{norm1,attn,norm2,odl}.*`; mean pooling over
    the patch tokens.
    Any image size the patch divides works: the sin-cos table is regenerated, the learned one resampled.
    """

    def __init__(
        self,
        *,
        family: Literal["mae", "supervised", "alpha"] = "mae",
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
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        super().__init__(family=family, img_size=img_size, patch_size=patch_size, dim=dim)  # normalise, embed, CLS, table
        parts = FAMILIES[family]
        self.pool, self.num_classes, self.num_features, self.num_prefix_tokens = pool, num_classes, dim, 1
        self.head_hidden_size = dim  # timm: the width the head's Linear reads (LayerNorm only before it, no MLP)
        # timm's feature contract: every encoder layer gives a (B, d, h, w) map at the patch's stride
        # (`forward_intermediates`; `timm.create_model(..., features_only=True, out_indices=...)`)
        self.feature_info = feature_info(depth, dim, patch_size)
        self.encoder = Encoder(dim=dim, heads=heads, depth=depth, eta=eta, lambd=lambd, drop_path=drop_path,
                               final_norm=parts.final_norm, layer=parts.layer)
        self.fc_norm = nn.LayerNorm(dim)  # PyTorch's eps 1e-5 in every family, as released
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if family == "mae":  # CRATE-MAE's initialisation
            if num_classes > 0:
                self.head = xavier_linear(dim, num_classes, bias=True)
        elif family == "alpha":  # CRATE-α's training code: the head normal(0.02), zero bias
            if num_classes > 0:
                nn.init.normal_(self.head.weight, std=0.02)
                nn.init.zeros_(self.head.bias)
        else:  # the released supervised CRATE's: PyTorch's default Linear init
            for module in self.encoder.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → encoder tokens (B, 1 + N, d), CLS first (after the final norm, where there is one)."""
        return self.encoder(self.tokens(img))

    def _prune_head(self) -> None:
        """What `prune_intermediate_layers(prune_head=True)` removes after the encoder: the head's norm and Linear."""
        self.fc_norm = nn.Identity()
        self.reset_classifier(0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, 1 + N, d) → logits (B, K), or the normed pooled feature (B, d) if pre_logits."""
        if self.pool == "cls":
            x = x[:, 0]
        else:  # the released supervised CRATE averages all tokens, CLS included; CRATE-MAE's probe the patches
            x = x.mean(dim=1) if self.family == "supervised" else x[:, 1:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → logits (B, K)."""
        return self.forward_head(self.forward_features(img))

    def no_weight_decay(self) -> set[str]:
        """Parameters kept free of weight decay besides norms and biases (timm's convention): CLS, and the learned
        position table where there is one (family mae's sin-cos table is a buffer, not trained). ODL's dictionaries
        D and D1 decay, as every other matrix does."""
        return {"cls_token", "pos.table"} & {name for name, _ in self.named_parameters()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping for layer-wise lr decay: the stem, then each encoder layer; what matches
        neither (the final norm and the head) is the top group, with the full lr, as in MAE."""
        return {"stem": r"^cls_token|^patch_embed|^pos\.", "blocks": [(r"^encoder\.layers\.(\d+)", None)]}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Literal["cls", "mean", "token", "avg"] | None = None) -> None:
        """A fresh head for `num_classes` outputs (0: features only), as timm models offer, on the model's device
        and dtype, in its train/eval mode. `global_pool` None keeps the pooling; timm's names ("token", "avg") are ours ("cls", "mean")."""
        if global_pool:
            pool = {"token": "cls", "avg": "mean"}.get(global_pool, global_pool)
            if pool not in ("cls", "mean"):
                raise ValueError(f"global_pool must be 'cls'/'token' or 'mean'/'avg', got {global_pool!r}")
            self.pool = pool
        self.num_classes = num_classes
        like = self.cls_token
        head = xavier_linear(self.num_features, num_classes, bias=True).to(like.device, like.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head = head.train(self.training)


class ClassifierObjective(nn.Module):
    """Supervised training's objective as a module: `forward(images, labels)` is `criterion(model(x), y)`, a scalar.

    `model` is any classifier (a CrateClassifier; the linear probe's head on a frozen encoder): the Trainer optimises
    and checkpoints it, and wraps this module in DDP and torch.compile, which hook `forward` alone. With `mix` (timm's
    Mixup / CutMix: (images, labels) → (mixed images, soft targets)) the images are normalised first and mixed, as in
    timm's own pipeline: uint8 pixels cannot hold a mixture, and the model takes float input as normalised already
    (model/layers.py: Normalize). The criterion must fit the targets: soft ones with `mix`, class indices without.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, mix: Optional[Callable[
            [torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        super().__init__()
        self.model, self.criterion, self.mix = model, criterion, mix
        self.normalize = Normalize()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), labels (B,) → the loss (a () tensor)."""
        if self.mix is not None:
            images, labels = self.mix(self.normalize(images), labels)
        return self.criterion(self.model(images), labels)
