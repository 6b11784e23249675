"""Analytic FLOP counts of a training step, for throughput and MFU (model FLOPs utilisation).

Counted: the matrix products (2 FLOPs per multiply-add); ignored: norms, softmax, ReLU, the loss and the
optimiser (a few percent for these sizes). Per image, with N patches, T = N + 1 tokens, width d, patch
pixels P = 3·p², K classes:

    patch embedding      2·N·P·d               (the p×p stride-p convolution is a (N, P) @ (P, d) product)
    encoder layer        8·T·d² + 4·T²·d       U (2Td²) + QKᵀ and AV over all heads (4T²d) + output Linear
                                               (2Td²) + ISTA's two products (4Td²: the two-product form)
    CRATE-α layer        36·T·d² + 4·T²·d      U, attention and output as above + ODL's four (d × 4d) products
                                               (Dᵀx, D z1, Dᵀ(·), D1 z2: 4 · 8Td²)
    decoder layer        6·T·d² + 4·T²·d       A (2Td²) + MSSA: U (2Td²), attention (4T²d), output Linear (2Td²)
    prediction head      2·T·d·P               (applied to all T tokens; the CLS row is dropped after)
    classifier head      2·d·K

A training step is 3 × the forward pass (backward ≈ 2 × forward), the usual convention (PaLM, nanoGPT), so
MFU = 3 · forward FLOPs · images/s ÷ the device's peak FLOP/s.
"""
from __future__ import annotations

from crate_mae.config.variants import FAMILIES

_LAYER_DD = {"crate": 8, "alpha": 36}  # an encoder layer's T·d² coefficient, by the family's layer


def forward_flops(*, dim: int, encoder_depth: int, decoder_depth: int, img_size: int, patch_size: int,
                  num_classes: int | None = None, family: str = "mae") -> int:
    """Forward FLOPs per image: a CRATE-MAE (num_classes None: encoder + decoder + prediction head) or a
    CRATE classifier (encoder + head), its encoder of `family` (CRATE-α's layers for "alpha")."""
    n = (img_size // patch_size) ** 2
    t, d, pixels = n + 1, dim, 3 * patch_size * patch_size
    coefficient = _LAYER_DD[FAMILIES[family].layer]
    flops = 2 * n * pixels * d + encoder_depth * (coefficient * t * d * d + 4 * t * t * d)
    if num_classes is None:
        flops += decoder_depth * (6 * t * d * d + 4 * t * t * d) + 2 * t * d * pixels
    else:
        flops += 2 * d * num_classes
    return flops


def train_flops(**shape: int | str | None) -> int:
    """Training FLOPs per image: 3 × `forward_flops(**shape)`."""
    return 3 * forward_flops(**shape)
