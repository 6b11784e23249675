"""The foreground of an image from the normalised cut of its patch features, as MaskCut does for unsupervised
object segmentation (Wang et al., "Cut and learn for unsupervised object detection and instance segmentation",
arXiv 2301.11320), on CRATE's MSSA features.

Legend: N = h·w patches, d width.

The patches are a graph: the affinity of patches i, j is their cosine similarity, binarised,
    A_ij = 1 if cos(f_i, f_j) > τ else ε        (τ = 0.15, ε = 1e-5 by default; ε keeps the graph connected),
with degrees D = diag(A·1). Normalised cut (Shi & Malik) relaxes to the generalised eigenproblem (D − A) x = λ D x;
with y = D^½ x it is the symmetric L = I − D^-½ A D^-½, whose eigenvectors `torch.linalg.eigh` gives in float64.
The second smallest one, x = D^-½ y, is the cut: patches above its mean form one side. The side that holds the
most-attended patch (CLS attention) is the object. `affinity` and `fiedler_vector` also take a batch of images
(leading dimensions), as MaskCut on a data set does (crate_mae/eval/maskcut.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from crate_mae.viz.plot import image_rows_figure, show_map, show_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def affinity(features: torch.Tensor, *, tau: float = 0.15, eps: float = 1e-5, normalize: bool = True) -> torch.Tensor:
    """features (..., N, d) → the binarised cosine affinity A (..., N, N) in float64 (module docstring), one graph
    per leading index (a batch of images at once).

    `normalize=False` thresholds the raw inner products ⟨f_i, f_j⟩ instead of the cosines. A zero feature row (a
    patch masked out, as MaskCut does) has similarity 0 with every patch, its own self included: with τ ≥ 0 its
    row and column are all ε.
    """
    f = features.double()
    if normalize:
        f = F.normalize(f, dim=-1)  # a zero row stays zero
    return torch.where(f @ f.transpose(-1, -2) > tau, 1.0, eps).to(torch.float64)


def fiedler_vector(a: torch.Tensor) -> torch.Tensor:
    """The relaxed normalised cut of a symmetric affinity A (N, N): the generalised eigenvector x (N,) of
    (D − A) x = λ D x with the second smallest λ, signed so that its largest-magnitude entry is positive.

    A batch of affinities (..., N, N) gives one cut per graph (..., N): `torch.linalg.eigh` solves them all in one
    call (on the device the affinities are on).
    """
    n = a.shape[-1]
    if n < 2:
        raise ValueError(f"a normalised cut needs two patches or more, got {n}")
    inv_sqrt = a.sum(-1).rsqrt()  # D^-½ (diagonal), (..., N)
    laplacian = torch.eye(n, dtype=a.dtype, device=a.device) - inv_sqrt[..., :, None] * a * inv_sqrt[..., None, :]
    _, vectors = torch.linalg.eigh(laplacian)  # ascending eigenvalues
    x = vectors[..., :, 1] * inv_sqrt
    return x * x.gather(-1, x.abs().argmax(-1, keepdim=True)).sign()  # eigh's sign is arbitrary: fix it


def normalized_cut(features: torch.Tensor, seed: int, *, tau: float = 0.15,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The object of one image from its patch features (N, d): (mask (N,) bool, the cut x (N,)).

    The mask is the side of x's mean that holds patch `seed` (the most-attended one); x is returned less its mean
    and turned so that the object side is positive: mask = x > 0.
    """
    x = fiedler_vector(affinity(features, tau=tau, eps=eps))
    x = x - x.mean()
    if x[seed] <= 0:
        x = -x
    return x > 0, x


def ncut_figure(images: torch.Tensor, cuts: torch.Tensor, masks: torch.Tensor, names: list[str], *,
                title: str) -> Figure:
    """One row per image (B, 3, H, W): the image | the cut x as a map | the object mask, at image resolution
    ((B, H, W) each)."""
    return image_rows_figure(images, names, [
        lambda ax, i: show_map(ax, cuts[i], title="the cut x (red: object side)"),
        lambda ax, i: show_mask(ax, images[i], masks[i], title="object")], title=title)
