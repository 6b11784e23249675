"""The white-box measures of CRATE, per encoder layer: the coding rate MSSA lowers, the sparsity ISTA (or ODL) makes.

Legend: B images, N tokens, d width, H heads, p = d/H head width, K = H subspaces.

Compression term (CRATE, arXiv 2306.01129, eq. 8; the rate of the tokens coded against the heads' subspaces):
    R^c(Z; U) = Σ_k ½ · logdet(I + p/(N·ε²) · (U_kᵀ Z)ᵀ (U_kᵀ Z)),
with Z (d, N) one image's tokens as columns and U_k (d, p) head k's slice of the shared projection U.
By Sylvester's identity logdet(I_N + α AᵀA) = logdet(I_p + α A Aᵀ) for A = U_kᵀ Z (p, N), so the p × p form
is used; it is computed in float64 through a Cholesky factor (logdet = 2 Σ log diag L), which is stable for
these symmetric positive-definite matrices. ε² = 0.5 unless set. MSSA is one gradient step that lowers it.

Sparsity of the non-negative sparse code (`LayerTrace.code`: ISTA's output; for CRATE-α, ODL's overcomplete code
z2, 4d wide, not its dense decoding): the fraction of exact zeros, and the ℓ1/ℓ2 ratio ‖z‖₁/‖z‖₂ of each token
(between 1 for a one-hot token and √width for a flat one; lower is sparser), averaged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crate_mae.model.classifier import CrateClassifier
from crate_mae.viz.plot import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def coding_rate(z: torch.Tensor, u: torch.Tensor, *, heads: int, eps2: float = 0.5) -> torch.Tensor:
    """R^c of tokens z (B, N, d) against the shared projection U (d, d), an nn.Linear weight.

    Head k's basis U_k (d, p) is the transpose of rows [k·p, (k+1)·p) of that weight, so that the rows of
    U_kᵀ Z are z @ U[k·p:(k+1)·p]ᵀ: exactly MSSA's head-k projection W_k. Returns (B,) in nats, one value
    per image (each image's N tokens are coded on their own).
    """
    b, n, d = z.shape
    p = d // heads
    z64, u64 = z.double(), u.double()
    total = torch.zeros(b, dtype=torch.float64, device=z.device)
    eye = torch.eye(p, dtype=torch.float64, device=z.device)
    for k in range(heads):
        a = z64 @ u64[k * p:(k + 1) * p].T  # (B, N, p): the rows of A = U_kᵀ Z
        gram = eye + (p / (n * eps2)) * a.transpose(1, 2) @ a  # (B, p, p) = I + α A Aᵀ
        chol = torch.linalg.cholesky(gram)
        total += torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # ½ logdet = Σ log diag L
    return total


def sparsity(z: torch.Tensor) -> dict[str, float]:
    """Of codes z (B, N, d): the fraction of exact zeros, and the mean ℓ1/ℓ2 ratio of the tokens."""
    z64 = z.double()
    l2 = z64.norm(dim=-1)
    ratio = z64.abs().sum(-1) / l2.clamp_min(1e-12)
    return {"zero_fraction": (z64 == 0).double().mean().item(), "l1_over_l2": ratio[l2 > 0].mean().item()}


@torch.no_grad()
def layer_measures(model: CrateClassifier, images: torch.Tensor, *, eps2: float = 0.5) -> list[dict[str, float]]:
    """For every encoder layer, over a batch of normalised images (B, 3, H, W): R^c before and after MSSA
    (of LN₁(z) and of LN₂(z + MSSA(LN₁ z)), the inputs of the two operators, so that scale does not enter),
    and the sparsity of the layer's code (ISTA's output; ODL's z2 for CRATE-α). Means over the images."""
    model.eval()
    rows = []
    for i, (layer, z) in enumerate(zip(model.encoder.layers, model.layer_inputs(images))):
        trace = layer.trace(z)  # the layer's two operators, each input kept
        heads, weight = layer.attn.heads, layer.attn.U.weight
        rows.append({"layer": i,
                     "rate_before_mssa": coding_rate(trace.mssa_in, weight, heads=heads, eps2=eps2).mean().item(),
                     "rate_after_mssa": coding_rate(trace.ista_in, weight, heads=heads, eps2=eps2).mean().item(),
                     **sparsity(trace.code)})
    return rows


def layers_figure(rows: list[dict[str, float]]) -> Figure:
    """The seed's per-layer figure from `layer_measures` rows: R^c before / after MSSA (left), the code's sparsity
    (right)."""
    plt = pyplot()
    layers = [r["layer"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(layers, [r["rate_before_mssa"] for r in rows], "o-", label="before MSSA")
    left.plot(layers, [r["rate_after_mssa"] for r in rows], "s-", label="after MSSA")
    left.set(xlabel="layer", ylabel="R^c (nats)", title="compression: coding rate against the heads' subspaces")
    left.legend(fontsize=8)
    zeros = right.plot(layers, [r["zero_fraction"] for r in rows], "o-", color="C2", label="fraction of zeros")
    right.set(xlabel="layer", ylabel="fraction of zeros", title="sparsity of the code (ISTA; ODL's z2)")
    ratio_axis = right.twinx()
    ratio = ratio_axis.plot(layers, [r["l1_over_l2"] for r in rows], "s--", color="C3", label="ℓ1/ℓ2 per token")
    ratio_axis.set_ylabel("ℓ1/ℓ2 per token (lower: sparser)")
    right.legend(handles=zeros + ratio, fontsize=8, loc="best")
    for ax in (left, right):
        ax.set_xticks(layers)
    return fig
