"""One encoder layer of any model the project builds, seen for segmentation: each head's CLS attention over the
patch grid and the patch features that affinities are built from.

Two kinds of model have attention to read:

- our CRATE models (`CrateClassifier` of any family, `CrateMAE`): MSSA's A_h = softmax(W_h W_hᵀ/√p) with
  W = U·LN₁(z), read by `crate_mae.viz.attention.mssa_view`; the features are W's patch rows (queries = keys =
  values in CRATE);
- timm's `VisionTransformer` (supervised ViT, DINO, DeiT ...): block ℓ's attention softmax(Q Kᵀ·s) (s = 1/√p)
  on that block's attention input (LN₁(x) in a pre-norm block), with Q = q_norm(x W_qᵀ + b_q), K likewise; the
  features are the keys K (heads concatenated), as DINO's and MaskCut's `--vit-feat k`.

Legend: B images, H heads, N = h·w patch tokens, d width, p = d/H head width, T prefix tokens (CLS, registers,
DeiT's distillation token), ℓ the layer (negative: from the end).

The CLS map of head h is the CLS row of A_h over the patch columns only, renormalised:
    a_h(i) = A_h[cls, T + i] / Σ_j A_h[cls, T + j] = exp(s·q_cls·k_i) / Σ_j exp(s·q_cls·k_j),
so dropping the prefix columns is the same as a softmax over the patches alone.

Image sizes: every (H, W) the patch divides. CRATE models resample their position tables themselves; a timm ViT
must be created with `dynamic_img_size=True` (or be given `model.set_input_size(img_size=(H, W))` for one size),
else any size but its `img_size` is an InputError here, before timm's own assertion. Pixels: uint8 (B, 3, H, W)
or float already normalised; for a timm ViT uint8 pixels are normalised here with its `pretrained_cfg` mean/std
(which differ between checkpoints: 0.5/0.5 for the AugReg ViTs, ImageNet's for DINO), as our models do inside.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crate_mae.errors import InputError
from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.crate import MSSA
from crate_mae.model.mae import CrateMAE
from crate_mae.viz.attention import mssa_views

# ImageNet's statistics: timm's default where a ViT's pretrained_cfg names none
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LayerView(NamedTuple):
    """What one layer's attention sees of a batch of images."""

    cls_attention: torch.Tensor  # (B, H, h, w): each head's CLS → patch attention, renormalised over the patches
    features: torch.Tensor  # (B, N, d): the patch features for affinities (CRATE: W = U·LN₁(z); ViT: the keys)
    grid: tuple[int, int]  # (h, w), the token grid, N = h·w


def _is_crate(model: nn.Module) -> bool:
    """Whether `model` is one of our CRATE models with MSSA in every encoder layer."""
    return isinstance(model, (CrateClassifier, CrateMAE)) and all(
        isinstance(getattr(layer, "attn", None), MSSA) for layer in model.encoder.layers)


def _is_vit(model: nn.Module) -> bool:
    """Whether `model` is a timm VisionTransformer (imported lazily: timm is only needed for its models)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _no_attention(model: nn.Module, why: str) -> InputError:
    return InputError(f"{type(model).__name__} has no attention to read: {why}")


def num_layers(model: nn.Module) -> int:
    """The number of layers `layer_view` can read: CRATE's encoder layers, a ViT's blocks."""
    if _is_crate(model):
        return len(model.encoder.layers)
    if _is_vit(model):
        return len(model.blocks)
    raise _no_attention(model, "layer_view reads our CRATE models (MSSA) and timm VisionTransformers")


def _absolute(layer: int, depth: int) -> int:
    """Layer `layer` (negative: from the end) as an index in 0..depth-1; an InputError naming it otherwise."""
    if not -depth <= layer < depth:
        raise InputError(f"layer {layer}: the model has {depth} layers (0..{depth - 1}, or negative from the end)")
    return layer % depth


def _vit_pixels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) → what a timm ViT takes: float, normalised with its pretrained_cfg's mean/std (uint8
    pixels), or as given (floats, taken as normalised already, as our models' `Normalize` takes them)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"layer_view takes RGB images (B, 3, H, W), got shape {list(images.shape)}")
    param = next(model.parameters())
    if images.dtype == torch.uint8:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", _IMAGENET_MEAN), device=param.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", _IMAGENET_STD), device=param.device).view(1, 3, 1, 1)
        return ((images.to(param.device).float() / 255.0 - mean) / std).to(param.dtype)
    if not images.is_floating_point():
        raise InputError(f"layer_view takes uint8 pixels or normalised float images, got {images.dtype}")
    return images.to(device=param.device, dtype=param.dtype)


def _vit_grid(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """The ViT's patch grid (h, w) for images of size hw, or an InputError saying what the caller must change."""
    embed = model.patch_embed
    ph, pw = embed.patch_size
    height, width = hw
    if height % ph or width % pw:
        raise InputError(f"image size {height}x{width} is not divisible by patch size {ph}x{pw}")
    if not getattr(model, "dynamic_img_size", False) and tuple(embed.img_size) != (height, width):
        size = "x".join(map(str, embed.img_size))
        raise InputError(f"image size {height}x{width}: this ViT takes {size} only; create it with "
                         f"dynamic_img_size=True or call model.set_input_size(img_size=({height}, {width}))")
    return height // ph, width // pw


@torch.no_grad()
def _vit_views(model: nn.Module, images: torch.Tensor, layers: list[int]) -> dict[int, LayerView]:
    """`layer_views` for a timm VisionTransformer: each chosen block's attention input caught by a pre-hook on its
    `attn` module during one `forward_intermediates` (stopping after the deepest), then its own qkv projection, q/k
    norms and scale applied to it, so any block layout (pre-norm, post-norm, layer scale) is read as it runs."""
    from timm.layers import Attention

    if not getattr(model, "has_class_token", False):
        raise _no_attention(model, "it has no CLS token (class_token=False), so no CLS attention")
    for layer in layers:
        attn = getattr(model.blocks[layer], "attn", None)
        if type(attn) is not Attention:  # a subclass (or DiffAttention, RoPE ...) may compute something else
            kind = type(attn).__name__ if attn is not None else "no attn module"
            raise _no_attention(model, f"block {layer} has {kind}, not timm's standard Attention")
    grid = _vit_grid(model, (images.shape[-2], images.shape[-1]))
    pixels = _vit_pixels(model, images)
    caught: dict[int, torch.Tensor] = {}
    handles = [model.blocks[layer].attn.register_forward_pre_hook(
        lambda _module, args, layer=layer: caught.__setitem__(layer, args[0])) for layer in layers]
    try:
        model.forward_intermediates(pixels, indices=[max(layers)], stop_early=True, intermediates_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: _vit_read(model, model.blocks[layer].attn, caught[layer], grid) for layer in layers}


def _vit_read(model: nn.Module, attn: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> LayerView:
    """One block's LayerView from what its attention reads, x (B, T + N, d)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T+N, p)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    prefix = model.num_prefix_tokens
    # CLS is token 0 (timm puts it first, before registers / distillation token); softmax over the patches only
    # equals the full row without its prefix columns, renormalised
    logits = (q[:, :, :1] * attn.scale) @ k[:, :, prefix:].transpose(-2, -1)  # (B, H, 1, N)
    cls_row = torch.softmax(logits.float(), dim=-1)[:, :, 0]  # (B, H, N)
    keys = k[:, :, prefix:].transpose(1, 2).reshape(b, n - prefix, -1)  # (B, N, H·p), heads concatenated
    return LayerView(cls_row.reshape(b, attn.num_heads, *grid), keys, grid)


def layer_view(model: nn.Module, images: torch.Tensor, layer: int = -1) -> LayerView:
    """Layer `layer` (negative: from the end) of `model` on images (B, 3, H, W), uint8 or normalised float.

    CRATE (any family, classifier or MAE): `crate_mae.viz.attention.mssa_view`, features W = U·LN₁(z).
    timm VisionTransformer: block `layer`'s CLS row of softmax(Q Kᵀ/√p) over the patches, features the keys K.
    The model is put in eval mode (no dropout, no drop path). Returns `LayerView` with cls_attention (B, H, h, w),
    each map summing to one over the grid.
    """
    return layer_views(model, images, [layer])[layer]


def layer_views(model: nn.Module, images: torch.Tensor, layers: list[int]) -> dict[int, LayerView]:
    """`layer_view` of several layers (negative: from the end) from one pass of the model: {layer as given: view}.
    Scoring every layer so costs one forward pass, not one per layer."""
    if _is_crate(model):
        index = {layer: _absolute(layer, len(model.encoder.layers)) for layer in layers}
        views = mssa_views(model, images.to(next(model.parameters()).device), sorted(set(index.values())))
        return {layer: LayerView(views[i].cls_attention, views[i].features, views[i].grid)
                for layer, i in index.items()}
    if _is_vit(model):
        model.eval()
        index = {layer: _absolute(layer, len(model.blocks)) for layer in layers}
        views = _vit_views(model, images, sorted(set(index.values())))
        return {layer: views[i] for layer, i in index.items()}
    raise _no_attention(model, "layer_view reads our CRATE models (MSSA) and timm VisionTransformers")
