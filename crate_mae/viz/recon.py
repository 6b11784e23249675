"""Seeing inside a CRATE-MAE: reconstruction grids (one implementation for the PNG and TensorBoard).

Legend: B images, N patches, P = 3·p·p pixels per patch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision.utils import make_grid

from crate_mae.config.variants import IMAGE_MEAN as MEAN, IMAGE_STD as STD
from crate_mae.model.layers import patchify, unpatchify
from crate_mae.model.mae import CrateMAE
from crate_mae.viz.plot import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def denormalise(img: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) → [0, 1] pixels."""
    mean = torch.tensor(MEAN, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=img.device).view(1, 3, 1, 1)
    return (img * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model: CrateMAE, img: torch.Tensor, *, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Original, masked input, reconstruction, and reconstruction with visible patches pasted back.

    All (B, 3, H, W) in [0, 1], plus `loss` (B,): each image's masked-patch MSE. With norm_pix_loss the
    prediction is in per-patch normalised units; it is mapped back with each target patch's own mean
    and std, as MAE's visualisation does.
    """
    img = model.normalize(img)  # uint8 pixels → the normalised image the model reconstructs
    was_training = model.training
    model.eval()
    out = model.forward_masked(img, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    p, grid = model.patch_size, (img.shape[-2] // model.patch_size, img.shape[-1] // model.patch_size)
    target, pred = patchify(img, p), out.pred.float()  # (B, N, P)
    loss = model.sample_loss(img, out.pred, out.mask)  # (B,): the model's own loss, per image
    if model.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = unpatchify(pred, p, grid)  # (B, 3, H, W) normalised units
    hidden = unpatchify(out.mask[..., None].expand_as(target), p, grid)  # (B, 3, H, W), 1 = masked
    masked = img * (1 - hidden)  # 0 in normalised units: masked patches show the mean colour
    pasted = masked + recon * hidden
    return {"original": denormalise(img), "masked": denormalise(masked), "reconstruction": denormalise(recon),
            "pasted": denormalise(pasted), "loss": loss}


def reconstruction_grid(model: CrateMAE, img: torch.Tensor, *, mask_ratio: float | None = None,
                        noise: torch.Tensor | None = None, pad: int = 2) -> torch.Tensor:
    """One row per image: original | masked | reconstruction | reconstruction + visible. → (3, H', W') in [0, 1]."""
    parts = reconstruct(model, img, mask_ratio=mask_ratio, noise=noise)
    columns = [parts[k] for k in ("original", "masked", "reconstruction", "pasted")]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # (4B, 3, H, W), row-major: image by image
    return make_grid(rows.cpu(), nrow=4, padding=pad, pad_value=1.0)


def reconstruction_figure(model: CrateMAE, img: torch.Tensor, *, mask_ratio: float | None = None,
                          noise: torch.Tensor | None = None) -> Figure:
    """The same four columns as `reconstruction_grid`, one row per image, each row labelled with its masked loss."""
    plt = pyplot()
    parts = reconstruct(model, img, mask_ratio=mask_ratio, noise=noise)
    titles = ("original", "masked", "reconstruction", "+ visible")
    n = img.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.7 * n + 0.3), squeeze=False)
    for i in range(n):
        for j, key in enumerate(("original", "masked", "reconstruction", "pasted")):
            ax = axes[i, j]
            ax.imshow(parts[key][i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        axes[i, 0].set_ylabel(f"loss {parts['loss'][i].item():.3f}", fontsize=8)
    return fig
