"""One layer's MSSA, seen from its tokens: each head's CLS attention, its thresholded masks, and the patch features.

CRATE's heads are subspaces; in trained CRATE models the CLS attention of single heads follows objects, an emergent
segmentation (Yu et al., "Emergence of segmentation with minimalistic white-box transformers", arXiv 2308.16271).
Legend: B images, H heads, N = h·w patch tokens, d width, p = d/H head width.

MSSA projects its input once, W = U·LN₁(z) (B, 1 + N, d): queries, keys and values are all W, so W is also "the
key" that the emergence notebooks take as patch features (`pca`, `ncut`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from crate_mae.model.classifier import CrateClassifier
from crate_mae.viz.plot import image_rows_figure, panels, picture, show_heat, show_mask

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class MSSAView(NamedTuple):
    """What one encoder layer's MSSA sees of a batch of images."""

    features: torch.Tensor  # (B, N, d): the patch rows of W = U·LN₁(z), CLS left out
    cls_attention: torch.Tensor  # (B, H, h, w): row CLS of each head's A_h over the patches, summing to one
    grid: tuple[int, int]  # (h, w), the token grid


def _view(block: torch.nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> MSSAView:
    """One layer's MSSAView from the tokens (B, 1 + N, d) entering it (module docstring)."""
    z = block.norm1(tokens)  # MSSA's input LN₁(z), (B, 1 + N, d)
    cls_row = block.attn.attention(z, queries=1)[:, :, 0, 1:]  # (B, H, N)
    cls_row = cls_row / cls_row.sum(-1, keepdim=True)
    return MSSAView(block.attn.U(z)[:, 1:], cls_row.reshape(tokens.shape[0], -1, *grid), grid)


@torch.no_grad()
def mssa_view(model: CrateClassifier, images: torch.Tensor, layer: int = -1, stride: int | None = None) -> MSSAView:
    """Encoder layer `layer` (negative: from the end) of `model` on images (B, 3, H, W), at `stride` (None: the
    patch), from one pass up to that layer.

    The CLS attention is row 0 of MSSA's explicit softmax A_h = softmax(W_h W_hᵀ/√p), without CLS's own entry and
    renormalised, so that each head's map is a distribution over the patch grid.
    """
    model.eval()
    grid = model.token_grid((images.shape[-2], images.shape[-1]), stride)
    return _view(model.encoder.layers[layer], model.layer_input(images, layer, stride=stride), grid)


@torch.no_grad()
def mssa_views(model: CrateClassifier, images: torch.Tensor, layers: list[int]) -> dict[int, MSSAView]:
    """`mssa_view` of several encoder layers (indices 0..L-1) from one pass: {layer: MSSAView}."""
    model.eval()
    grid = model.token_grid((images.shape[-2], images.shape[-1]))
    inputs = model.layer_inputs(images)  # every layer's input, one pass
    return {layer: _view(model.encoder.layers[layer], inputs[layer], grid) for layer in layers}


def cls_attention(model: CrateClassifier, images: torch.Tensor, layer: int = -1,
                  stride: int | None = None) -> torch.Tensor:
    """CLS-to-patch attention of every head of encoder `layer`: (B, H, h, w), each map summing to one."""
    return mssa_view(model, images, layer, stride).cls_attention


def mass_masks(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """DINO's thresholded attention: of each non-negative map (..., h, w), the fewest highest patches whose values
    hold at least `mass` of the map's total. Returns bool (..., h, w).

    A patch is kept when the patches ranked above it hold less than `mass` (so the last one kept is the one that
    reaches it); ties are ranked by position. mass 1 keeps every patch with a value above zero.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2).double()  # (..., N)
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    total = flat.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    above = (values.cumsum(-1) - values) / total  # the share held by the patches ranked above each one
    keep = (above < mass) & (values > 0)
    return torch.zeros_like(keep).scatter(-1, order, keep).view(maps.shape)


def most_attended(cls_maps: torch.Tensor) -> torch.Tensor:
    """The patch index (B,) with the largest CLS attention averaged over heads, in row-major order; from (B, H, h, w)."""
    return cls_maps.mean(1).flatten(1).argmax(-1)


def heads_figure(image: torch.Tensor, heat: torch.Tensor, masks: torch.Tensor, *, mass: float, title: str) -> Figure:
    """One image (3, H, W) with its heads at image resolution: the maps (H, H, W) laid over it (top row) and the
    thresholded masks (H, H, W) (bottom row), one panel per head."""
    heads = heat.shape[0]
    fig, axes = panels(2, heads + 1, title=title)
    axes[0, 0].imshow(picture(image))
    axes[0, 0].set_title("image", fontsize=7)
    axes[1, 0].text(0.5, 0.5, f"masks:\nthe fewest\npatches holding\n{mass:.0%} of a\nhead's attention", ha="center",
                    va="center", fontsize=7, transform=axes[1, 0].transAxes)
    for k in range(heads):
        show_heat(axes[0, k + 1], image, heat[k], title=f"head {k}")
        show_mask(axes[1, k + 1], image, masks[k], title=f"head {k}: mask")
    return fig


def masks_grid_figure(images: torch.Tensor, masks: torch.Tensor, names: list[str], *, title: str) -> Figure:
    """Several images (B, 3, H, W), one row each: the image, then each head's mask (B, H, H, W) over it."""
    def head(k: int) -> Callable[[Axes, int], None]:
        return lambda ax, i: show_mask(ax, images[i], masks[i, k], title=f"head {k}" if i == 0 else "")

    return image_rows_figure(images, names, [head(k) for k in range(masks.shape[1])], title=title, size=1.8)
