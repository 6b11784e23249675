"""Per-head attention maps: where each head's CLS token looks, over the patch grid.

CRATE's heads are subspaces; in trained CRATE models the CLS attention of single heads follows objects,
an emergent segmentation (arXiv 2308.16271). Legend: B images, H heads, N = h·w patches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.layers import grid_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@torch.no_grad()
def cls_attention(model: CrateClassifier, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """CLS-to-patch attention of every head of encoder `layer` (negative: from the end): (B, H, h, w).

    From MSSA's explicit softmax (`attention`), row CLS without its own entry, renormalised so that each
    head's map sums to one over the patch grid.
    """
    model.eval()
    block = model.encoder.layers[layer]
    z = model.layer_input(images, layer)  # (B, 1 + N, d)
    attn = block.attn.attention(block.norm1(z))  # (B, H, 1 + N, 1 + N)
    cls_to_patches = attn[:, :, 0, 1:]
    cls_to_patches = cls_to_patches / cls_to_patches.sum(-1, keepdim=True)
    h, w = grid_size((images.shape[-2], images.shape[-1]), model.patch_embed.patch_size)
    return cls_to_patches.reshape(images.shape[0], -1, h, w)


def overlay_figure(image: torch.Tensor, maps: torch.Tensor, *, title: str = "") -> Figure:
    """One image (3, H, W) in [0, 1] and its heads' maps (H, h, w): the image, then one panel per head with
    the map upsampled (bilinear) to the image and laid over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = maps.shape[0]
    cols = min(heads + 1, 7)
    rows = -(-(heads + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows + 0.4), squeeze=False)
    up = F.interpolate(maps[None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    picture = image.permute(1, 2, 0).cpu().numpy()
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("image", fontsize=8)
    for k in range(heads):
        ax = axes.flat[k + 1]
        ax.imshow(picture)
        ax.imshow(up[k].cpu().numpy(), cmap="inferno", alpha=0.6)
        ax.set_title(f"head {k}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
