"""Every encoder layer's tokens, for both CRATE models: timm's feature contract (`feature_info`,
`forward_intermediates`, `prune_intermediate_layers`), which `timm.create_model(..., features_only=True)` wraps.

Legend: B batch, N = h·w patches, d width. A *tap* is one encoder layer's output tokens.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

Intermediate = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def take_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices` (None → every layer, n → the last n, a list → those layers, negative from the
    end): (absolute indices, the largest). An index out of range is a ValueError, as our other input checks are."""
    try:
        return feature_take_indices(depth, indices)
    except AssertionError as err:  # timm's torch._assert
        raise ValueError(str(err)) from None


def feature_info(depth: int, dim: int, patch_size: int) -> list[dict]:
    """timm's `feature_info`: one (B, d, h, w) map per encoder layer, at the patch's stride."""
    return [{"module": f"encoder.layers.{i}", "num_chs": dim, "reduction": patch_size} for i in range(depth)]


class EncoderTaps:
    """The encoder-layer taps of a model with `tokens(img, stride=)` (CrateStem), `encoder` (layers, norm) and
    `num_prefix_tokens` (the CLS token): mixed into CrateClassifier and CrateMAE.

    Two hooks say what differs between them: `_final(z, grid)`, the model's `forward_features` from the last layer's
    tokens (the classifier: the final norm; the MAE: its reconstruction), and `_prune_head()`, what
    `prune_intermediate_layers` removes after the encoder (the classifier's head; the MAE's decoder side).
    """

    def _final(self, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last layer's tokens (B, 1 + N, d) on the token grid (h, w) → what `forward_features` returns."""
        return self.encoder.norm(z)

    def _prune_head(self) -> None:
        raise NotImplementedError

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
        (`forward_features`' output, list); `stop_early` runs no layer past the last one asked for.
        `stride` s < p: the tokens of overlapping patches (`CrateStem.tokens`), on their finer grid.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        layers = self.encoder.layers
        take, last = take_indices(len(layers), indices)
        b, (h, w) = img.shape[0], self.token_grid((img.shape[-2], img.shape[-1]), stride)
        z, picked = self.tokens(img, stride=stride), []
        for i, layer in enumerate(layers[: last + 1] if stop_early or intermediates_only else layers):
            if self.encoder.grad_checkpointing and not torch.jit.is_scripting():  # as LayerStack.forward_layers
                z = checkpoint(layer, z, use_reentrant=False)
            else:
                z = layer(z)
            if i in take:
                picked.append(self.encoder.norm(z) if norm else z)
        prefix = [y[:, : self.num_prefix_tokens] for y in picked]
        spatial = [y[:, self.num_prefix_tokens:] for y in picked]  # (B, N, d)
        if output_fmt == "NCHW":
            spatial = [y.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]  # (B, d, h, w)
        out: list[Intermediate] = list(zip(spatial, prefix)) if return_prefix_tokens else spatial
        return out if intermediates_only else (self._final(z, (h, w)), out)

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
                                                      output_fmt="NLC", intermediates_only=True, stride=stride)
        return torch.cat([cls, patches], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing: every layer of the encoder (and of the decoder, where there is one)
        recomputed in the backward pass (`LayerStack.forward_layers`)."""
        for stack in (self.encoder, getattr(self, "decoder", None)):
            if stack is not None:
                stack.grad_checkpointing = enable

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last of `indices` (and the final norm, and what follows the encoder, if asked),
        as timm's ViTs do; timm's `features_only` wrapper calls this. Returns the absolute indices."""
        take, last = take_indices(len(self.encoder.layers), indices)
        self.encoder.layers = self.encoder.layers[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm:
            self.encoder.norm = nn.Identity()
        if prune_head:
            self._prune_head()
        return take
