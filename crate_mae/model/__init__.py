"""The CRATE-MAE model family and the seed's supervised CRATE: builders from a `ModelConfig`, the one loader, timm names.

    from crate_mae.config import ModelConfig
    mae = build_mae(ModelConfig(variant="base"))                                   # CrateMAE
    clf = build_classifier(ModelConfig(family="supervised", variant="small"))      # the seed's CRATE-S
    model, cfg = hub.create_model(ModelConfig(), kind="classifier", checkpoint="encoder.pth", num_classes=10)
    timm.create_model("crate_mae_base"); timm.create_model("crate_small", num_classes=10)
"""
from __future__ import annotations

from crate_mae.config import ModelConfig
from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.convert import to_ours, to_released
from crate_mae.model.layers import patchify, unpatchify
from crate_mae.model.mae import CrateMAE, MAEOutput, random_masking
from crate_mae.model.variants import FAMILIES, VARIANTS, Variant
from crate_mae.model import hub  # noqa: E402  (the one way from a file to a model)


def build_mae(cfg: ModelConfig) -> CrateMAE:
    """A freshly initialised CrateMAE of `cfg` (unset fields resolved: λ 0.5, the released model's)."""
    return hub.create_model(cfg, kind="mae")[0]


def build_classifier(cfg: ModelConfig) -> CrateClassifier:
    """A freshly initialised CrateClassifier of `cfg` (family mae unless set; λ by family: 0.5 mae, 0.1 supervised)."""
    return hub.create_model(cfg, kind="classifier")[0]


from crate_mae.model import timm_models  # noqa: E402  (registers the crate_* names with timm)

__all__ = [
    "VARIANTS", "FAMILIES", "Variant", "CrateMAE", "MAEOutput", "CrateClassifier", "build_mae", "build_classifier",
    "hub", "random_masking", "patchify", "unpatchify", "to_ours", "to_released", "timm_models",
]
