"""The CRATE-MAE model family and the seed's supervised CRATE: one way to make a model (`hub`), and the timm names.

    from crate_mae.config import ClassifierConfig, MAEConfig
    mae = build_mae(MAEConfig(variant="base"))                                     # a fresh CrateMAE
    clf = build_classifier(ClassifierConfig(family="supervised", variant="small")) # the seed's CRATE-S
    model, cfg = hub.create_model(ClassifierConfig(num_classes=10), "encoder.pth")   # read, resolve, build, load
    timm.create_model("crate_mae_base"); timm.create_model("crate_small", num_classes=10)
"""
from __future__ import annotations

from crate_mae.config import ClassifierConfig, MAEConfig
from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.convert import to_ours, to_released
from crate_mae.model.layers import patchify, unpatchify
from crate_mae.model.mae import CrateMAE, MAEOutput, random_masking
from crate_mae.config.variants import FAMILIES, VARIANTS, Variant  # the size table, re-exported
from crate_mae.model import files, hub  # noqa: E402  (the one reader; the one resolver and builder)
from crate_mae.model.files import Checkpoint, read_checkpoint
from crate_mae.model.hub import build_model, create_model, resolve_config


def build_mae(cfg: MAEConfig) -> CrateMAE:
    """A freshly initialised CrateMAE of `cfg` (unset fields resolved by `hub.resolve_config`: λ 0.5, the released
    model's): `hub.create_model(cfg)` without a file."""
    return hub.create_model(cfg)[0]


def build_classifier(cfg: ClassifierConfig) -> CrateClassifier:
    """A freshly initialised CrateClassifier of `cfg` (family mae unless set; λ by family: 0.5 mae, 0.1 supervised)."""
    return hub.create_model(cfg)[0]


from crate_mae.model import timm_models  # noqa: E402  (registers the crate_* names with timm)

__all__ = [
    "VARIANTS", "FAMILIES", "Variant", "CrateMAE", "MAEOutput", "CrateClassifier", "build_mae", "build_classifier",
    "build_model", "create_model", "resolve_config", "Checkpoint", "read_checkpoint", "files", "hub",
    "random_masking", "patchify", "unpatchify", "to_ours", "to_released", "timm_models",
]
