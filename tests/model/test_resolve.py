"""`hub.resolve_config`, the one function that resolves a model config: the precedence (set here, the file's, the
variant row, the family's defaults), the checks that name a disagreeing field, and what a resume checks besides.

(Moved here from tests/config/test_config.py when `ModelConfig.resolve` became `crate_mae.model.hub.resolve_config`;
the assertions are those of the old tests, plus the kind- and resume-specific checks.)
"""
from __future__ import annotations

import dataclasses

import pytest

from crate_mae.config import ClassifierConfig, ConfigError, MAEConfig
from crate_mae.model import Checkpoint, resolve_config
from crate_mae.model.convert import Layout


def ours(model: dict) -> Checkpoint:
    """What the one reader gives for one of our files whose saved `model` section is `model` (no tensors needed)."""
    return Checkpoint("runs/x/final.pth", {}, Layout("ours", model.get("family", "mae"), "cls_token"), {"model": model},
                      {}, None)


def released(shapes: dict, num_classes: int | None = None) -> Checkpoint:
    """A released file: no config, only what its shapes tell."""
    return Checkpoint("released.pth", {}, Layout("released", shapes["family"], "blocks.0"), None, shapes, num_classes)


SAVED = dataclasses.asdict(resolve_config(MAEConfig(variant="nano", heads=2, lambd=0.3)))


def test_unset_fields_take_the_checkpoints_values() -> None:
    for cfg in (MAEConfig(), MAEConfig(variant="nano"), MAEConfig(family="mae", img_size=64)):
        got = resolve_config(cfg, ours(SAVED))
        assert (got.variant, got.heads, got.lambd, got.eta, got.dim) == ("nano", 2, 0.3, 0.1, 64)
    assert resolve_config(MAEConfig(img_size=64), ours(SAVED)).img_size == 64  # not checked unless resuming
    with pytest.raises(ConfigError, match=r"final\.pth: model\.img_size is 32 in the checkpoint but 64"):
        resolve_config(MAEConfig(img_size=64), ours(SAVED), resume=True)


@pytest.mark.parametrize("field, value", [("heads", 4), ("lambd", 0.5), ("eta", 0.2), ("variant", "demo"),
                                          ("encoder_depth", 4), ("family", "supervised"), ("patch_size", 8),
                                          ("decoder_depth", 4)])
def test_a_set_field_that_differs_from_the_checkpoint_is_named(field: str, value: object) -> None:
    if field == "family":  # a family is told by the keys, before any field is compared
        with pytest.raises(ValueError, match=r"final\.pth: holds our CRATE-MAE .* but model\.family is 'supervised'"):
            resolve_config(ClassifierConfig(family="supervised"), ours(SAVED))
        return
    with pytest.raises(ConfigError, match=rf"final\.pth: model\.{field} is {SAVED[field]!r} in the checkpoint but "
                                          rf"{value!r} in the config"):
        resolve_config(MAEConfig(**{field: value}), ours(SAVED))


def test_a_classifier_ignores_the_decoder_and_takes_the_heads_class_count() -> None:
    got = resolve_config(ClassifierConfig(), ours(SAVED))
    assert isinstance(got, ClassifierConfig) and not hasattr(got, "decoder_depth")
    assert (got.heads, got.num_classes, got.pool) == (2, 1000, "cls")  # an encoder: no head, the default count
    head = dataclasses.replace(ours(SAVED), num_classes=10)
    assert resolve_config(ClassifierConfig(), head).num_classes == 10
    assert resolve_config(ClassifierConfig(num_classes=3), head).num_classes == 3  # a new head, not an error


def test_a_file_without_a_config_gives_shapes_and_the_row_gives_heads() -> None:
    shapes = {"family": "supervised", "dim": 384, "encoder_depth": 12, "patch_size": 8, "img_size": 224}
    got = resolve_config(ClassifierConfig(), released(shapes, 21842))
    assert (got.variant, got.heads, got.patch_size, got.lambd, got.num_classes) == ("tiny", 6, 8, 0.1, 21842)
    assert resolve_config(ClassifierConfig(heads=12), released(shapes)).heads == 12
    odd = {"family": "mae", "dim": 96, "encoder_depth": 5, "patch_size": 8}
    with pytest.raises(ConfigError, match="released.pth: model.heads: the checkpoint does not record its number of "
                                          "heads.*set model.heads"):
        resolve_config(ClassifierConfig(), released(odd))
    assert resolve_config(ClassifierConfig(heads=3), released(odd)).variant is None


def test_without_a_file_the_row_and_the_family_fill_everything() -> None:
    mae = resolve_config(MAEConfig())
    assert (mae.variant, mae.family, mae.dim, mae.decoder_depth, mae.lambd) == ("base", "mae", 768, 12, 0.5)
    sup = resolve_config(ClassifierConfig(variant="small"), default_family="supervised")
    assert (sup.family, sup.dim, sup.lambd, sup.num_classes) == ("supervised", 576, 0.1, 1000)
    assert sup.resolved and not ClassifierConfig().resolved
    with pytest.raises(ConfigError, match="a masked autoencoder has an encoder of family mae or alpha"):
        resolve_config(MAEConfig(family="supervised"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mae.dim = 4  # type: ignore[misc]  (a resolved config is frozen: what was built cannot drift)
