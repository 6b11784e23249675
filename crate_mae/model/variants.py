"""The model sizes, as one table (SPEC.md, "Sizes"). No torch here: the config module reads it too."""
from __future__ import annotations

from dataclasses import dataclass


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
    # CPU-sized rows: `nano` for the tests (a training step in milliseconds), `demo` for the
    # bundled default run (32 px digits, patch 4 → 64 patches).
    "nano": Variant(dim=64, heads=4, encoder_depth=2, decoder_depth=2, img_size=32, patch_size=4),
    "demo": Variant(dim=192, heads=6, encoder_depth=4, decoder_depth=4, img_size=32, patch_size=4),
    # The published sizes (patch 16 at 224 px); the decoder mirrors the encoder's depth.
    "tiny": Variant(dim=384, heads=6, encoder_depth=12, decoder_depth=12),
    "small": Variant(dim=576, heads=12, encoder_depth=12, decoder_depth=12),
    "base": Variant(dim=768, heads=12, encoder_depth=12, decoder_depth=12),
    "large": Variant(dim=1024, heads=16, encoder_depth=24, decoder_depth=24),
}
