"""The CRATE-MAE model family: the size table, builders from a `ModelConfig`, and timm registration.

    from crate_mae.config import ModelConfig
    mae = build_mae(ModelConfig(variant="base"))                       # CrateMAE
    clf = build_classifier(ModelConfig(variant="base", num_classes=10))  # CrateClassifier
    timm.create_model("crate_mae_base"); timm.create_model("crate_base", num_classes=10)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.convert import load_released_mae, to_ours, to_released
from crate_mae.model.layers import patchify, unpatchify
from crate_mae.model.mae import CrateMAE, MAEOutput, random_masking
from crate_mae.model.variants import VARIANTS, Variant

if TYPE_CHECKING:  # config imports this package for the size table, so it is imported lazily below
    from crate_mae.config import ModelConfig

MAE_LAMBD = 0.5  # λ of the released CRATE-MAE model
CLASSIFIER_LAMBD = 0.1  # λ of the papers and the supervised CRATE classifier


def build_mae(cfg: ModelConfig) -> CrateMAE:
    """A CrateMAE of the configured size; λ defaults to the released model's 0.5."""
    return CrateMAE(
        img_size=cfg.img_size, patch_size=cfg.patch_size, dim=cfg.dim, heads=cfg.heads,
        encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth, eta=cfg.eta,
        lambd=MAE_LAMBD if cfg.lambd is None else cfg.lambd,
        mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
    )


def build_classifier(cfg: ModelConfig, *, from_mae: bool = False) -> CrateClassifier:
    """A CrateClassifier of the configured size.

    λ defaults to 0.1 for a classifier trained from scratch and, with `from_mae`, to the CRATE-MAE's
    0.5, so that a pretrained encoder computes the same function it was trained as.
    """
    default_lambd = MAE_LAMBD if from_mae else CLASSIFIER_LAMBD
    return CrateClassifier(
        num_classes=cfg.num_classes, img_size=cfg.img_size, patch_size=cfg.patch_size, dim=cfg.dim,
        heads=cfg.heads, depth=cfg.encoder_depth, eta=cfg.eta,
        lambd=default_lambd if cfg.lambd is None else cfg.lambd, pool=cfg.pool, drop_path=cfg.drop_path,
    )


from crate_mae.model import timm_models  # noqa: E402  (registers crate_mae_* and crate_* with timm)

__all__ = [
    "VARIANTS", "Variant", "CrateMAE", "MAEOutput", "CrateClassifier", "build_mae", "build_classifier",
    "random_masking", "patchify", "unpatchify", "load_released_mae", "to_ours", "to_released", "timm_models",
]
