"""The CRATE classifiers: one encoder, two families around it (config/variants.py, FAMILIES).

- family `mae`: the CRATE-MAE encoder reused (conv stem, fixed sin-cos table, final norm), no masking;
- family `supervised`: the seed's CRATE (patchify → LN → Linear → LN stem, learned table, no final norm).

Both pool (CLS, or the mean) and end in LayerNorm + Linear. timm's API: `forward_features` (tokens),
`forward_head` (pool, norm, logits), `forward_intermediates` (chosen layers' tokens).
Legend: B batch, N = h·w patches, d width, K classes.
"""
from __future__ import annotations

from typing import Literal, Sequence, Union

import torch
import torch.nn as nn

from crate_mae.config.variants import FAMILIES
from crate_mae.model.crate import Encoder, xavier_linear
from crate_mae.model.layers import CrateStem

Intermediate = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def take_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's convention for `forward_intermediates`: None → every layer, an int n → the last n, a sequence →
    those layers (negative from the end). Returns (sorted absolute indices, the largest)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"last-n indices: {indices} is not in 1..{depth}")
        take = list(range(depth - indices, depth))
    else:
        for i in indices:
            if not -depth <= i < depth:
                raise ValueError(f"layer index {i} is out of range for {depth} layers")
        take = sorted({i % depth for i in indices})
    return take, max(take)


class CrateClassifier(CrateStem):
    """stem + CLS + position table + CRATE encoder + pool + (LayerNorm, Linear) head.

    Family `mae`: non-head tensors carry the CRATE-MAE's encoder-side names (`patch_embed.proj.*`,
    `cls_token`, `encoder.*`), so a pretrained checkpoint fills them one to one; mean pooling is over the
    patch tokens. Family `supervised`: `patch_embed.{pre_norm,proj,post_norm}.*`, `pos.table`, `cls_token`,
    `encoder.layers.*`, and mean pooling over all 1 + N tokens (CLS included), as released.
    Any image size the patch divides works: the sin-cos table is regenerated, the learned one resampled.
    """

    def __init__(
        self,
        *,
        family: Literal["mae", "supervised"] = "mae",
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
        final_norm = FAMILIES[family].final_norm
        self.pool, self.num_classes, self.num_features, self.num_prefix_tokens = pool, num_classes, dim, 1
        self.head_hidden_size = dim  # timm: the width the head's Linear reads (LayerNorm only before it, no MLP)
        # timm's feature contract: every encoder layer gives a (B, d, h, w) map at the patch's stride
        # (`forward_intermediates`; `timm.create_model(..., features_only=True, out_indices=...)`)
        self.feature_info = [{"module": f"encoder.layers.{i}", "num_chs": dim, "reduction": patch_size}
                             for i in range(depth)]
        self.encoder = Encoder(dim=dim, heads=heads, depth=depth, eta=eta, lambd=lambd, drop_path=drop_path,
                               final_norm=final_norm)
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if family == "mae":  # CRATE-MAE's initialisation
            if num_classes > 0:
                self.head = xavier_linear(dim, num_classes, bias=True)
        else:  # the released supervised CRATE's: PyTorch's default Linear init
            for module in self.encoder.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) → encoder tokens (B, 1 + N, d), CLS first (after the final norm, where there is one)."""
        return self.encoder(self.tokens(img))

    def forward_intermediates(
        self,
        img: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stride: int | None = None,
    ) -> list[Intermediate] | tuple[torch.Tensor, list[Intermediate]]:
        """Chosen encoder layers' output tokens, as timm's ViTs give them.

        `indices`: None → every layer, n → the last n, a list → those layers (negative from the end).
        Each intermediate is the patch tokens, (B, d, h, w) for "NCHW" or (B, N, d) for "NLC"; with
        `return_prefix_tokens` a pair (patch tokens, CLS (B, 1, d)). `norm` applies the encoder's final norm
        (none in the supervised family). Returns the list alone if `intermediates_only`, else
        (final tokens (B, 1 + N, d), list); `stop_early` runs no layer past the last one asked for.
        `stride` s < p: the tokens of overlapping patches (`CrateStem.tokens`), on their finer grid.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        layers = self.encoder.layers
        take, last = take_indices(len(layers), indices)
        b, (h, w) = img.shape[0], self.token_grid((img.shape[-2], img.shape[-1]), stride)
        z, picked = self.tokens(img, stride=stride), []
        for i, layer in enumerate(layers[: last + 1] if stop_early else layers):
            z = layer(z)
            if i in take:
                picked.append(self.encoder.norm(z) if norm else z)
        prefix = [y[:, : self.num_prefix_tokens] for y in picked]
        spatial = [y[:, self.num_prefix_tokens:] for y in picked]  # (B, N, d)
        if output_fmt == "NCHW":
            spatial = [y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]  # (B, d, h, w)
        out: list[Intermediate] = list(zip(spatial, prefix)) if return_prefix_tokens else spatial
        return out if intermediates_only else (self.encoder.norm(z), out)

    def layer_inputs(self, img: torch.Tensor, stride: int | None = None) -> list[torch.Tensor]:
        """The tokens (B, 1 + N, d) entering every encoder layer, from one pass: the stem's output, then each
        layer's output but the last (`forward_intermediates`)."""
        outs = self.forward_intermediates(img, indices=len(self.encoder.layers), return_prefix_tokens=True,
                                          output_fmt="NLC", intermediates_only=True, stride=stride)
        return [self.tokens(img, stride=stride)] + [torch.cat([cls, patches], dim=1) for patches, cls in outs[:-1]]

    def layer_input(self, img: torch.Tensor, index: int, stride: int | None = None) -> torch.Tensor:
        """The tokens (B, 1 + N, d), CLS first, entering encoder layer `index` (negative: from the end): the stem's
        output for the first layer, else the previous layer's output (`forward_intermediates`)."""
        index = take_indices(len(self.encoder.layers), [index])[1]
        if index == 0:
            return self.tokens(img, stride=stride)
        [(patches, cls)] = self.forward_intermediates(img, indices=[index - 1], return_prefix_tokens=True,
                                                      stop_early=True, output_fmt="NLC", intermediates_only=True,
                                                      stride=stride)
        return torch.cat([cls, patches], dim=1)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last of `indices` (and the final norm / head if asked), as timm's ViTs do."""
        take, last = take_indices(len(self.encoder.layers), indices)
        self.encoder.layers = self.encoder.layers[: last + 1]
        if prune_norm:
            self.encoder.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0)
        return take

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
        """Parameters kept free of weight decay besides norms and biases (timm's convention)."""
        return {"cls_token", "pos.table"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping for layer-wise lr decay: the stem, then each encoder layer; what matches
        neither (the final norm and the head) is the top group, with the full lr, as in MAE."""
        return {"stem": r"^cls_token|^patch_embed|^pos\.", "blocks": [(r"^encoder\.layers\.(\d+)", None)]}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, pool: Literal["cls", "mean"] | str | None = None) -> None:
        """A fresh head for `num_classes` outputs (0: features only), as timm models offer; timm's pool names
        ("token", "avg") are accepted too."""
        self.num_classes = num_classes
        if pool:
            self.pool = {"token": "cls", "avg": "mean"}.get(pool, pool)
        device = self.cls_token.device
        self.head = xavier_linear(self.num_features, num_classes, bias=True).to(device) if num_classes > 0 else nn.Identity()
