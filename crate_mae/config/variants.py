"""The model sizes and families, as tables (docs/MODEL.md, "Sizes" and "Three families"). No torch here.

A *variant* is a row of widths and depths; a *family* is the layer and what is built around it:

| family       | layer                 | stem                                 | position table     | final norm | λ   |
| ------------ | --------------------- | ------------------------------------ | ------------------ | ---------- | --- |
| `mae`        | MSSA, ISTA            | p×p stride-p convolution (CRATE-MAE) | fixed 2-D sin-cos  | yes        | 0.5 |
| `supervised` | MSSA, ISTA            | patchify → LN(3p²) → Linear → LN(d)  | learned (1 + N, d) | no         | 0.1 |
| `alpha`      | MSSA, ODL (residual)  | p×p stride-p convolution             | learned (1 + N, d) | no         | 0.1 |

`supervised` is the seed's CRATE classifier (`CRATE_tiny/small/base/large`), trained only to classify; `alpha` is
CRATE-α (arXiv 2405.20299), whose published sizes differ from the others' at tiny and add huge (`ALPHA_VARIANTS`).
"""
from __future__ import annotations

from dataclasses import dataclass

# The pixel statistics every CRATE model normalises its input with (ImageNet's, as timm's IMAGENET_DEFAULT_*).
IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Variant:
    """One row of the size table: width d, heads H, depths, and the image and patch it is built for."""

    dim: int
    heads: int
    encoder_depth: int
    decoder_depth: int
    img_size: int = 224
    patch_size: int = 16


VARIANTS: dict[str, Variant] = {
    # CPU-sized rows: `nano` for the tests (a training step in milliseconds; 3 layers, as timm's feature tests ask of
    # every model), `demo` for the
    # bundled default run (32 px digits, patch 4 → 64 patches).
    "nano": Variant(dim=64, heads=4, encoder_depth=3, decoder_depth=3, img_size=32, patch_size=4),
    "demo": Variant(dim=192, heads=6, encoder_depth=4, decoder_depth=4, img_size=32, patch_size=4),
    # The published sizes (patch 16 at 224 px); the decoder mirrors the encoder's depth. The seed's
    # supervised CRATE_tiny/small/base/large have exactly these widths, heads and depths.
    "tiny": Variant(dim=384, heads=6, encoder_depth=12, decoder_depth=12),
    "small": Variant(dim=576, heads=12, encoder_depth=12, decoder_depth=12),
    "base": Variant(dim=768, heads=12, encoder_depth=12, decoder_depth=12),
    "large": Variant(dim=1024, heads=16, encoder_depth=24, decoder_depth=24),
}
# CRATE-α's table (its authors' Ti, S, B, L, H): small, base and large are the rows above; its tiny is narrower, and
# it has a huge. A variant name means the row of the model's family (`variants_of`).
ALPHA_VARIANTS: dict[str, Variant] = {
    **VARIANTS,
    "tiny": Variant(dim=192, heads=3, encoder_depth=12, decoder_depth=12),
    "huge": Variant(dim=1280, heads=16, encoder_depth=32, decoder_depth=32),
}


@dataclass(frozen=True)
class Family:
    """What a family builds around the layers, and its default ISTA constants."""

    stem: str  # "conv" | "linear"
    position: str  # "sincos" | "learned"
    final_norm: bool
    lambd: float
    eta: float = 0.1
    layer: str = "crate"  # "crate": z + MSSA, then ISTA (crate.EncoderLayer); "alpha": z + MSSA, then z + ODL
    masked: bool = True  # whether the family has a masked autoencoder (MAEConfig, crate_*mae_* names)


FAMILIES: dict[str, Family] = {
    "mae": Family(stem="conv", position="sincos", final_norm=True, lambd=0.5),
    "supervised": Family(stem="linear", position="learned", final_norm=False, lambd=0.1, masked=False),
    "alpha": Family(stem="conv", position="learned", final_norm=False, lambd=0.1, layer="alpha"),
}
VARIANT_NAMES: tuple[str, ...] = tuple(dict.fromkeys([*VARIANTS, *ALPHA_VARIANTS]))  # every family's, in order


def variants_of(family: str | None) -> dict[str, Variant]:
    """The size table whose rows a variant name means for `family` (None: the common table)."""
    return ALPHA_VARIANTS if family == "alpha" else VARIANTS


def match_variant(dim: int, encoder_depth: int, family: str | None = None) -> str | None:
    """The first row of the family's table with this width and depth (a file without a config names no row)."""
    for name, row in variants_of(family).items():
        if (row.dim, row.encoder_depth) == (dim, encoder_depth):
            return name
    return None
