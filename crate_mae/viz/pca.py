"""PCA of patch features across images: the first component splits object from background, the next three colour
its parts (the emergence notebooks' figure, arXiv 2308.16271).

Legend: B images, N = h·w patches, d width, M = B·N patches of all images together, k components.

One PCA is fitted over the patches of all the images, so that a colour means the same direction of feature space
in every image. Conventions, fixed so that a figure does not depend on the eigen-solver's arbitrary signs:
- scale: a component's scores are (x − mean)·v / √λ, unit variance over the fitted patches (λ its eigenvalue);
- sign: each component points where its largest-magnitude score is positive; then the first is turned toward the
  object, so that the images' most-attended patches (CLS attention) score positive on average;
- foreground: first score > `threshold` (in those unit-variance units; default 0, the mean of all patches);
- parts: components 2–4 at the foreground patches, each min–max scaled to [0, 1] over the foreground of all the
  images together, as R, G, B; the background is black.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from crate_mae.viz.plot import image_rows_figure, picture, show_map, show_mask

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class PCA(NamedTuple):
    """A fitted PCA: scores(x) = (x − mean) · componentsᵀ / √variance."""

    mean: torch.Tensor  # (d,)
    components: torch.Tensor  # (k, d), orthonormal rows, by decreasing variance
    variance: torch.Tensor  # (k,), the variance of the fitted rows along each component
    total_variance: torch.Tensor  # (), the sum over all d directions (the covariance's trace)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) → unit-variance scores (..., k), in float64."""
        return (x.double() - self.mean) @ self.components.T / self.variance.clamp_min(1e-300).sqrt()


def fit_pca(x: torch.Tensor, k: int) -> PCA:
    """The first k principal components of the rows of x (M, d), from the eigenvectors of the covariance
    (x − mean)ᵀ(x − mean)/(M − 1), in float64; each signed so that its largest-magnitude score is positive."""
    if x.shape[0] < 2 or not 1 <= k <= x.shape[1]:
        raise ValueError(f"PCA of {x.shape[0]} rows of width {x.shape[1]}: need 2 rows or more and 1 ≤ k ≤ width, got k {k}")
    x64 = x.double()
    mean = x64.mean(0)
    centred = x64 - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / (x.shape[0] - 1))  # ascending
    total = values.clamp_min(0).sum()
    values, vectors = values.flip(0)[:k].clamp_min(0), vectors.flip(1)[:, :k].T  # (k,), (k, d)
    projected = centred @ vectors.T  # (M, k)
    signs = projected.gather(0, projected.abs().argmax(0, keepdim=True)).sign()[0]
    return PCA(mean, vectors * torch.where(signs == 0, 1.0, signs)[:, None], values, total)


class PCASegments(NamedTuple):
    """Per image, on the token grid."""

    first: torch.Tensor  # (B, h, w): the first component's score, turned toward the object
    foreground: torch.Tensor  # (B, h, w) bool: first > threshold
    parts: torch.Tensor  # (B, 3, h, w) in [0, 1]: components 2–4 at the foreground, black elsewhere
    variance_ratio: torch.Tensor  # (4,): each component's share of the total variance


def pca_segments(features: torch.Tensor, grid: tuple[int, int], seeds: torch.Tensor, *,
                 threshold: float = 0.0) -> PCASegments:
    """features (B, N, d), one row per patch in row-major order on `grid`; seeds (B,) each image's most-attended
    patch. One PCA of the M = B·N patches (module docstring)."""
    b, n, d = features.shape
    flat = features.reshape(b * n, d)
    pca = fit_pca(flat, min(4, d))
    scores = pca.scores(flat).reshape(b, n, -1)  # (B, N, k)
    first = scores[..., 0]
    if first.gather(1, seeds.view(b, 1).to(first.device)).mean() < 0:  # turn the first component toward the object
        first = -first
    foreground = first > threshold
    parts = torch.zeros(b, n, 3, dtype=torch.float64, device=features.device)
    if scores.shape[-1] > 1 and foreground.any():
        chosen = scores[..., 1:4][foreground]  # (M_fg, ≤3)
        low, high = chosen.min(0).values, chosen.max(0).values
        parts[..., : chosen.shape[-1]][foreground] = (chosen - low) / (high - low).clamp_min(1e-12)
    ratio = pca.variance / pca.total_variance
    h, w = grid
    return PCASegments(first.reshape(b, h, w), foreground.reshape(b, h, w),
                       parts.permute(0, 2, 1).reshape(b, 3, h, w), ratio)


def pca_figure(images: torch.Tensor, first: torch.Tensor, foreground: torch.Tensor, parts: torch.Tensor,
               names: list[str], *, title: str) -> Figure:
    """One row per image (B, 3, H, W): the image | first component | foreground | parts as RGB, all at image
    resolution ((B, H, W), (B, H, W) bool, (B, 3, H, W))."""
    def parts_panel(ax: Axes, i: int) -> None:
        ax.imshow(picture(parts[i]))
        ax.set_title("parts: 2nd–4th as RGB", fontsize=7)

    return image_rows_figure(images, names, [
        lambda ax, i: show_map(ax, first[i], title="1st component (red: object side)"),
        lambda ax, i: show_mask(ax, images[i], foreground[i], title="foreground"),
        parts_panel], title=title)
