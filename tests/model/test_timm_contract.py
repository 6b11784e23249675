"""The timm ≥ 1.0 model contract on every classifier name (part of issue 21): num_features, head_hidden_size,
get_classifier / reset_classifier, feature_info, `features_only=True` with `out_indices` (timm's FeatureGetterNet over
`forward_intermediates`), and CRATE as a backbone of a dense task. Written from timm's public API."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from crate_mae.model.timm_models import MODELS

CLASSIFIERS = [name for name, row in MODELS.items() if row.kind == "classifier"]


def side_and_grid(name: str) -> tuple[int, int]:
    """A small image that every row's patch divides (32 px), and its patch grid."""
    patch = MODELS[name].overrides.get("patch_size") or {"nano": 4, "demo": 4}.get(MODELS[name].variant, 16)
    return 32, 32 // patch


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_the_classifier_contract(name: str) -> None:
    side, grid = side_and_grid(name)
    model = timm.create_model(name, img_size=side).eval()
    d, depth = model.num_features, len(model.encoder.layers)
    assert model.head_hidden_size == d and model.get_classifier() is model.head
    assert model.get_classifier().in_features == d and model.get_classifier().out_features == model.num_classes
    info = model.feature_info
    assert [f["module"] for f in info] == [f"encoder.layers.{i}" for i in range(depth)]
    assert all(f["num_chs"] == d and f["reduction"] == side // grid for f in info)
    cfg = model.pretrained_cfg
    assert cfg["classifier"] == "head" and model.get_submodule(cfg["first_conv"]) is not None
    img = torch.randn(2, 3, side, side)
    assert model(img).shape == (2, model.num_classes)
    assert model.forward_head(model.forward_features(img), pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(5)
    assert model(img).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(img).shape == (2, d)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_features_only_gives_nchw_maps_of_the_chosen_layers(name: str) -> None:
    side, grid = side_and_grid(name)
    depth = len(timm.create_model(name, img_size=side).encoder.layers)
    picked = tuple(sorted({0, depth // 2, depth - 1}))  # two or three layers
    backbone = timm.create_model(name, img_size=side, features_only=True, out_indices=picked)
    assert backbone.feature_info.channels() == [backbone.model.num_features] * len(picked)
    assert backbone.feature_info.reduction() == [side // grid] * len(picked)
    maps = backbone(torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8))
    assert [m.shape for m in maps] == [(2, backbone.model.num_features, grid, grid)] * len(picked)
    assert len(backbone.model.encoder.layers) == depth  # the last layer is asked for: nothing pruned
    last_two = timm.create_model(name, img_size=side, features_only=True, out_indices=2)
    assert len(last_two(torch.randn(1, 3, side, side))) == 2  # an int: the last n layers, as timm's ViTs


def test_features_only_is_refused_for_the_masked_autoencoder_in_one_line() -> None:
    with pytest.raises(TypeError, match="crate_mae_nano: features_only takes a classifier name"):
        timm.create_model("crate_mae_nano", features_only=True)


def test_crate_is_a_backbone_for_a_segmentation_head() -> None:
    """A small head on multi-scale CRATE features (two layers' NCHW maps) learns to segment squares: the loss falls."""
    torch.manual_seed(0)
    backbone = timm.create_model("crate_mae_encoder_nano", features_only=True, out_indices=(0, 1))
    chs = sum(backbone.feature_info.channels())
    head = nn.Sequential(nn.Conv2d(chs, 32, 1), nn.GELU(), nn.Conv2d(32, 2, 1))
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=2e-3)

    def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 60, (n, 3, 32, 32), dtype=torch.uint8)
        masks = torch.zeros(n, 32, 32, dtype=torch.long)
        for i in range(n):
            y, x = torch.randint(0, 20, (2,)).tolist()
            images[i, :, y:y + 12, x:x + 12] = 220
            masks[i, y:y + 12, x:x + 12] = 1
        return images, masks

    losses = []
    for _ in range(40):
        images, masks = batch()
        logits = head(torch.cat(backbone(images), dim=1))  # (B, 2, 8, 8) at the patch grid
        loss = F.cross_entropy(F.interpolate(logits, size=(32, 32), mode="bilinear"), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_fx_traces_the_classifier_to_the_same_function(name: str) -> None:
    """timm's FX feature extraction (its leaf modules and functions: our input checks, grid arithmetic and position
    tables stay dynamic, registered with timm's register_notrace_*): the traced graph gives the model's output, and
    the train-mode graph back-propagates."""
    from timm.models import create_feature_extractor, get_graph_node_names

    side, _ = side_and_grid(name)
    model = timm.create_model(name, img_size=side).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    img = torch.randn(2, 3, side, side)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    torch.testing.assert_close(traced(img)[eval_nodes[-1]], model(img))
    traced = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]])
    traced(img)[train_nodes[-1]].mean().backward()
    assert model.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("name", ["crate_nano", "crate_mae_encoder_nano", "crate_mae_nano"])
def test_set_input_size_keeps_the_table_for_the_new_grid(name: str) -> None:
    """timm's `set_input_size`: the same function at the new size as the model that followed the grid on the fly, and
    the table (the learned one a Parameter again) stored for the new grid."""
    model = timm.create_model(name).eval()
    img = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16 * 16)
    before = model(img, noise=noise).pred if name.startswith("crate_mae_nano") else model(img)
    model.set_input_size(img_size=64)
    after = model(img, noise=noise).pred if name.startswith("crate_mae_nano") else model(img)
    torch.testing.assert_close(after, before)
    assert model.pos.table.shape == (1, 1 + 16 * 16, model.num_features) and model.pos.grid == (16, 16)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    if name == "crate_nano":
        assert isinstance(model.pos.table, nn.Parameter) and "pos.table" in model.state_dict()
    with pytest.raises(ValueError, match="patch_size: the stem's weights are for patch 4, got 8"):
        model.set_input_size(patch_size=8)

