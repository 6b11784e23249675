"""The timm ≥ 1.0 model contract on every crate_* name (issue 21), written from timm's public API: forward and backward
give tensors and reach every parameter; the pretrained_cfg, num_features / head_hidden_size and the classifier calls
agree with the model; forward_intermediates, prune_intermediate_layers and `features_only=True`; TorchScript; FX
(timm's and torchvision's feature extraction), then scripted. `bench/timm_suite.sh` runs timm's own file on the same
names; these are our tests of the same points, which CI runs. Images are 32 px (48 px where a size change is tested).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from crate_mae.model.crate import set_fused
from crate_mae.model.layers import unpatchify
from crate_mae.model.timm_models import MODELS

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
              pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode")]
# CRATE-α's 27 names: CI builds the ones of CPU size and the released B/16; bench/timm_suite.sh runs timm's own tests
# on every name, L/14 and the huge ones included
ALPHA_IN_CI = {"crate_alpha_tiny_patch8", "crate_alpha_tiny_patch16", "crate_alpha_base_patch16", "crate_alpha_mae_nano",
               "crate_alpha_mae_demo"}
NAMES = [name for name, row in MODELS.items() if row.family != "alpha" or name in ALPHA_IN_CI]
CLASSIFIERS = [name for name in NAMES if MODELS[name].kind == "classifier"]
SIDE = 32
_BUILT: dict[tuple, nn.Module] = {}


def patch_of(name: str) -> int:
    return MODELS[name].overrides.get("patch_size") or {"nano": 4, "demo": 4}.get(MODELS[name].variant, 16)


def make(name: str, **kwargs) -> nn.Module:
    """A fresh copy of `timm.create_model(name, img_size=32, **kwargs)`: each is built once per process, seeded, so the
    weights do not depend on the test order."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # crate_mae_* warns that it ignores num_classes
                _BUILT[key] = timm.create_model(name, img_size=SIDE, **kwargs)
    return copy.deepcopy(_BUILT[key])


def images(n: int = 2, side: int = SIDE) -> torch.Tensor:
    return torch.randn(n, 3, side, side)


def mae(name: str) -> bool:
    return MODELS[name].kind == "mae"


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_one_tensor(name: str) -> None:
    """timm's tools call `model(x)` and take a tensor: logits (B, K) from a classifier, the reconstruction (B, 3, H, W)
    from the MAE; uint8 pixels and normalised float images give the same."""
    model = make(name).eval()
    pixels = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8)
    out = model(pixels)
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert out.shape == ((2, 3, SIDE, SIDE) if mae(name) else (2, model.num_classes))
    assert_close(model(model.normalize(pixels)), out)
    assert model(images(1)).shape[0] == 1


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    """As timm builds its backward test: num_classes=42 (which the headless MAE ignores, with a warning), train mode,
    mean of the output backward: every parameter gets a gradient."""
    if mae(name):
        with pytest.warns(UserWarning, match=f"{name}: the CRATE-MAE has no classifier, so num_classes is ignored"):
            model = timm.create_model(name, img_size=SIDE, num_classes=42)
    else:
        model = make(name, num_classes=42)
    out = model.train()(images())
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert out.shape[1] == model.num_features == 3 if mae(name) else out.shape == (2, 42)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_and_the_head_calls_agree_with_the_model(name: str) -> None:
    row, model = MODELS[name], make(name).eval()
    cfg = model.pretrained_cfg
    side = 224 if row.variant not in ("nano", "demo") else 32
    assert cfg["input_size"] == timm.models.get_pretrained_cfg(name).input_size == (3, side, side)  # the row's size
    assert cfg["num_classes"] == row.num_classes == model.num_classes and not cfg["fixed_input_size"]
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state
    assert model.in_chans == 3 and model.embed_dim == model.encoder.layers[0].norm1.normalized_shape[0]
    img = images()
    features = model.forward_features(img)
    pre = model.forward_head(features, pre_logits=True)
    assert features.shape[1 if mae(name) else -1] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(img).shape == pre.shape
    for pattern in model.no_weight_decay():
        assert pattern in dict(model.named_parameters()), pattern
    with pytest.raises(TypeError, match="unexpected keyword 'not_a_model_arg'"):
        timm.create_model(name, not_a_model_arg=1)
    if mae(name):
        assert cfg["classifier"] is None and model.num_features == model.head_hidden_size == 3
        with pytest.raises(ValueError, match="the CRATE-MAE has no classifier"):
            model.reset_classifier(10)
        return
    assert cfg["classifier"] == "head" and f"{cfg['classifier']}.weight" in state
    assert model.num_features == model.head_hidden_size == model.embed_dim
    model.reset_classifier(5, global_pool="avg")
    assert model.get_classifier().out_features == 5 and model.pool == "mean" and model(img).shape == (2, 5)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == len(model.encoder.layers) + 2  # the stem, each layer, the top (norm and head)


@pytest.mark.parametrize("name", ["crate_nano", "crate_mae_nano"])
def test_timm_tools_keywords_are_taken(name: str) -> None:
    """The keywords timm's benchmark.py and train.py pass to every model: in_chans 3, drop_rate 0, scriptable; a
    dropout or another channel count is refused by name."""
    model = timm.create_model(name, in_chans=3, drop_rate=0.0, scriptable=True).eval()
    assert torch.jit.script(model)(images()).shape[0] == 2
    with pytest.raises(ValueError, match="drop_rate: CRATE models have no dropout"):
        timm.create_model(name, drop_rate=0.1)
    with pytest.raises(ValueError, match="in_chans: CRATE models take RGB images"):
        timm.create_model(name, in_chans=1)


@pytest.mark.parametrize("name", ["crate_nano", "crate_mae_nano", "crate_mae_encoder_nano"])
def test_made_on_the_meta_device_in_any_dtype_and_frozen_stays_frozen(name: str) -> None:
    """timm's `device=` and `dtype=` keywords; reset_classifier keeps the model's device, dtype and mode; a frozen model
    stays frozen through reset_classifier(0) and set_input_size."""
    model = timm.create_model(name, device="meta", dtype=torch.float64).eval()
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    if not mae(name):
        model.reset_classifier(3)
        assert {(p.device.type, p.dtype) for p in model.head.parameters()} == {("meta", torch.float64)}
        assert not model.head.training
    model = make(name).requires_grad_(False)
    model.reset_classifier(0)
    model.set_input_size(img_size=64)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.to(torch.bfloat16)(images().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_and_pruning(name: str) -> None:
    """One (B, d, h, w) map per encoder layer at the patch's stride; the final output is forward_features'; stop_early
    and a model pruned to a layer give that layer's map, and every parameter left in a pruned model is used."""
    model, p = make(name).eval(), patch_of(name)
    depth, d, grid = len(model.encoder.layers), model.embed_dim, SIDE // p
    assert [f["module"] for f in model.feature_info] == [f"encoder.layers.{i}" for i in range(depth)]
    assert {(f["num_chs"], f["reduction"]) for f in model.feature_info} == {(d, p)} and depth >= 3
    img = images()
    with torch.no_grad():
        final, taps = model.forward_intermediates(img)
        assert_close(final, model.forward_features(img))
        assert [t.shape for t in taps] == [(2, d, grid, grid)] * depth
        nlc = model.forward_intermediates(img, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert_close(nlc[1], taps[-1].flatten(2).transpose(1, 2))
        for i in (0, depth // 2):
            [alone] = model.forward_intermediates(img, indices=[i], stop_early=True, intermediates_only=True)
            assert_close(alone, taps[i])
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([depth - 1], prune_head=False)
        assert_close(kept(img), model(img))
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([1])
        assert take == [1] and len(pruned.encoder.layers) == 2 and len(pruned.feature_info) == 2
        assert_close(pruned.forward_intermediates(img, indices=take, intermediates_only=True)[0], taps[1])
    assert not any(k.startswith(("decoder", "mask_token", "head.")) for k in pruned.state_dict())
    pruned.train()
    taps = pruned.forward_intermediates(img, indices=take, intermediates_only=True)
    (taps[0].sum() + pruned.forward_features(img).sum()).backward()
    assert not [n for n, q in pruned.named_parameters() if q.grad is None]


@pytest.mark.parametrize("name", NAMES)
def test_features_only_gives_nchw_maps_of_the_chosen_layers(name: str) -> None:
    """timm's FeatureGetterNet over forward_intermediates: NCHW maps of the chosen layers, as detection and segmentation
    heads take them; the MAE's decoder side is pruned away (its encoder is the backbone)."""
    p = patch_of(name)
    depth = len(make(name).encoder.layers)
    picked = tuple(sorted({0, depth // 2, depth - 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = timm.create_model(name, img_size=SIDE, features_only=True, out_indices=picked)
    d = backbone.model.embed_dim
    assert backbone.feature_info.channels() == [d] * len(picked) and backbone.feature_info.reduction() == [p] * len(picked)
    maps = backbone(torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8))
    assert [m.shape for m in maps] == [(2, d, SIDE // p, SIDE // p)] * len(picked)
    assert not any(k.startswith(("decoder", "mask_token", "head.")) for k in backbone.state_dict())
    default = timm.create_model(name, img_size=SIDE, features_only=True)  # timm's default: the last three layers
    assert len(default(images(1))) == 3


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_gives_the_eager_output(name: str) -> None:
    """torch.jit.script of the whole model (timm's `set_scriptable`), at the built size and at another one (the position
    table then made on the fly), for uint8 and float input; and the plain twins script too."""
    model = make(name).eval()
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(model)
    for img in (images(), images(1, side=48), torch.randint(0, 256, (1, 3, SIDE, SIDE), dtype=torch.uint8)):
        assert_close(scripted(img), model(img))
    set_fused(model, False)
    img = images()
    assert_close(torch.jit.script(model)(img), model(img))


def _fx(model: nn.Module) -> nn.Module:
    """torchvision's feature extractor over the model's output node, with timm's leaf modules and functions (those
    registered with timm's register_notrace_*), as timm's own FX tests build it."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kwargs = {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_fx_traces_to_the_same_function_and_backpropagates(name: str) -> None:
    """FX: the traced eval graph gives the model's output (at two sizes); the traced train graph reaches every
    parameter; the traced graph scripts."""
    model = make(name).eval()
    traced = _fx(model)
    with torch.no_grad():
        for img in (images(), images(1, side=48)):
            [out] = traced(img).values()
            assert_close(out, model(img))
    traced.train()
    [out] = traced(images()).values()
    out.mean().backward()
    assert not [n for n, p in traced.named_parameters() if p.grad is None]
    with timm.layers.set_scriptable(True):
        scripted = torch.jit.script(traced.eval())
    img = images()
    [out] = scripted(img).values()
    assert_close(out, model(img))


def test_the_mae_forward_is_its_reconstruction() -> None:
    """crate_mae_*(x) is the reconstruction (B, 3, H, W): in eval mode of the whole image, unmasked (deterministic);
    in train mode of the input masked at mask_ratio, the prediction of `forward_masked` drawn from the same generator."""
    model, img = make("crate_mae_nano").eval(), images()
    grid = (SIDE // 4, SIDE // 4)
    with torch.no_grad():
        assert_close(model(img), unpatchify(model.decode(model.encode(img)), 4, grid))
        assert torch.equal(model(img), model(img))
        model.train()
        torch.manual_seed(5)
        masked = model(img)
        torch.manual_seed(5)
        assert_close(masked, unpatchify(model.forward_masked(img).pred, 4, grid))


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
        images_, masks = batch()
        logits = head(torch.cat(backbone(images_), dim=1))  # (B, 2, 8, 8) at the patch grid
        loss = F.cross_entropy(F.interpolate(logits, size=(32, 32), mode="bilinear"), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("name", ["crate_nano", "crate_mae_encoder_nano", "crate_mae_nano"])
def test_set_input_size_keeps_the_table_for_the_new_grid(name: str) -> None:
    """timm's `set_input_size`: the same function at the new size as the model that followed the grid on the fly, and
    the table (the learned one a Parameter again) stored for the new grid."""
    model = timm.create_model(name).eval()
    img = torch.randn(2, 3, 64, 64)
    before = model(img)
    model.set_input_size(img_size=64)
    assert_close(model(img), before)
    assert model.pos.table.shape == (1, 1 + 16 * 16, model.embed_dim) and model.pos.grid == (16, 16)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    if name == "crate_nano":
        assert isinstance(model.pos.table, nn.Parameter) and "pos.table" in model.state_dict()
    with pytest.raises(ValueError, match="patch_size: the stem's weights are for patch 4, got 8"):
        model.set_input_size(patch_size=8)
