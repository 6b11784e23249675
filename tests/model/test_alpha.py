"""CRATE-α (family `alpha`, arXiv 2405.20299): its sizes and the authors' tensors, the fast ODL path against its
plain twin, the authors' files loaded strictly and computing the authors' logits, the layouts told apart, a 21K
head kept or replaced, activation checkpointing, timm's save_for_hf / local-dir and our exports, and the config rules.

The authors' state-dict layout (`alpha_shapes`) and forward pass (`alpha_forward`) are written here from the model's
definition alone (conv stem, CLS, learned table; z ← z + MSSA(LN₁(z)), z ← z + ODL(LN₂(z)) with eps 1e-6; a bias-free
MSSA output; ODL's two ISTA steps in D (d, 4d) decoded by D1 (d, 4d); LN(eps 1e-5) → Linear on CLS), independent of
the package. Their files are made at random from those shapes, never by converting ours.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import save_for_hf
from torch.testing import assert_close

import crate_mae.model  # noqa: F401  (registers the timm names)
from crate_mae.config import ClassifierConfig, Config, MAEConfig, config_to_dict
from crate_mae.errors import CheckpointError, ConfigError
from crate_mae.model import hub, read_checkpoint, resolve_config, to_ours, to_released
from crate_mae.model.convert import Layout, layout_of
from crate_mae.model.crate import ODL, AlphaLayer, DecoderLayer, set_fused
from crate_mae.model.files import encoder_state, export_encoder

ETA = LAMBD = 0.1  # CRATE-α's ISTA step and sparsity
# The authors' sizes (d, heads, layers); the CPU rows (d, heads, layers, image side, patch) of our α MAEs
SIZES = {"tiny": (192, 3, 12), "small": (576, 12, 12), "base": (768, 12, 12), "large": (1024, 16, 24),
         "huge": (1280, 16, 32)}
CPU_SIZES = {"nano": (64, 4, 3, 32, 4), "demo": (192, 6, 4, 32, 4)}
PATCHES = (8, 14, 16, 32)
# The released files' parameter counts with an ImageNet-1K head: d·3p² + d (conv) + (1 + N)·d (table) + d (CLS)
# + L·(10d² + 4d) (U, out, D, D1, two LayerNorms) + 2d + K·d + K (head)
B16_PARAMS = 72_328_936  # d 768, 12 layers, patch 16, 14 × 14 patches
L14_PARAMS = 253_650_920  # d 1024, 24 layers, patch 14, 16 × 16 patches


def alpha_shapes(dim: int, depth: int, patch: int, grid: int, classes: int | None = 1000) -> dict[str, tuple[int, ...]]:
    """Every key of the authors' CRATE-α state dict with its shape (`classes` None: no head, an encoder)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (dim, 3, patch, patch), "conv1.bias": (dim,),
                                          "pos_embedding": (1, 1 + grid * grid, dim), "cls_token": (1, 1, dim)}
    for i in range(depth):
        k = f"transformer.layers.{i}."
        shapes |= {k + "0.norm.weight": (dim,), k + "0.norm.bias": (dim,), k + "0.fn.qkv.weight": (dim, dim),
                   k + "0.fn.to_out.0.weight": (dim, dim), k + "1.norm.weight": (dim,), k + "1.norm.bias": (dim,),
                   k + "1.fn.D": (dim, 4 * dim), k + "1.fn.D1": (dim, 4 * dim)}
    if classes is not None:
        shapes |= {"mlp_head.0.weight": (dim,), "mlp_head.0.bias": (dim,), "mlp_head.1.weight": (classes, dim),
                   "mlp_head.1.bias": (classes,)}
    return shapes


def _scale(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, std) of a random tensor for `key`: norms near 1, matrices scaled by their fan-in so that every
    branch adds O(1) (or, ODL's, a few tenths) to the tokens and about half of ODL's codes are active."""
    dim = shape[0]
    if key.endswith("norm.weight") or key == "mlp_head.0.weight":
        return 1.0, 0.1
    if key.endswith(("norm.bias", "conv1.bias", "mlp_head.0.bias", "mlp_head.1.bias")):
        return 0.0, 0.1
    if key == "conv1.weight":
        return 0.0, (3 * shape[2] * shape[3]) ** -0.5
    if key in ("pos_embedding", "cls_token"):
        return 0.0, 0.5
    if key.endswith(".fn.D1"):
        return 0.0, 2 * dim**-0.5  # 4/√(4d): the decoded code adds ~0.15-0.3 of the tokens' norm
    return 0.0, shape[-1] ** -0.5  # qkv, to_out, D, the head's Linear


def released_alpha(seed: int, *, dim: int, depth: int, patch: int, grid: int,
                   classes: int | None = 10) -> dict[str, torch.Tensor]:
    """An authors'-layout CRATE-α state dict (float32), every tensor drawn at random from its shape."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in alpha_shapes(dim, depth, patch, grid, classes).items():
        offset, std = _scale(key, shape)
        state[key] = offset + std * torch.randn(shape, generator=gen)
    return state


def expanded_alpha(seed: int, *, dim: int, depth: int, patch: int, grid: int) -> dict[str, torch.Tensor]:
    """The authors' state dict of a released size (1000 classes) without its memory: each tensor a random vector of its
    last dimension broadcast to its shape (a stride-0 view, which torch.save stores as the vector alone)."""
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape[-1], generator=gen).expand(shape)
            for key, shape in alpha_shapes(dim, depth, patch, grid).items()}


def alpha_forward(s: dict[str, torch.Tensor], img: torch.Tensor, *, heads: int, eta: float = ETA, lambd: float = LAMBD,
                  codes: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """The authors' CRATE-α forward pass at the native image size: normalised images (B, 3, H, W) → logits (B, K).
    `codes`, if given, collects each layer's ODL codes (z1, z2)."""
    dim, patch = s["cls_token"].shape[-1], s["conv1.weight"].shape[-1]
    x = F.conv2d(img, s["conv1.weight"], s["conv1.bias"], stride=patch).flatten(2).transpose(1, 2)  # (B, N, d)
    b, n, _ = x.shape
    x = torch.cat([s["cls_token"].expand(b, -1, -1), x], dim=1) + s["pos_embedding"][:, : n + 1]
    for i in range(sum(k.endswith(".fn.D1") for k in s)):
        k = f"transformer.layers.{i}."
        u = F.layer_norm(x, (dim,), s[k + "0.norm.weight"], s[k + "0.norm.bias"], eps=1e-6)
        w = (u @ s[k + "0.fn.qkv.weight"].t()).reshape(b, -1, heads, dim // heads).transpose(1, 2)  # (B, H, 1+N, p)
        a = torch.softmax(w @ w.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
        x = x + (a @ w).transpose(1, 2).reshape(b, -1, dim) @ s[k + "0.fn.to_out.0.weight"].t()  # no bias
        u = F.layer_norm(x, (dim,), s[k + "1.norm.weight"], s[k + "1.norm.bias"], eps=1e-6)
        dic, dic1 = s[k + "1.fn.D"], s[k + "1.fn.D1"]
        z1 = torch.relu(eta * (u @ dic) - eta * lambd)
        z2 = torch.relu(z1 - eta * ((z1 @ dic.t() - u) @ dic) - eta * lambd)
        if codes is not None:
            codes.append((z1, z2))
        x = x + z2 @ dic1.t()
    feat = F.layer_norm(x[:, 0], (dim,), s["mlp_head.0.weight"], s["mlp_head.0.bias"], eps=1e-5)
    return feat @ s["mlp_head.1.weight"].t() + s["mlp_head.1.bias"]


def count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


# The authors' names → ours (the package's documented names), written here independently of convert.py's table
OUR_NAMES = {"conv1.weight": "patch_embed.proj.weight", "conv1.bias": "patch_embed.proj.bias",
             "pos_embedding": "pos.table", "cls_token": "cls_token", "mlp_head.0.weight": "fc_norm.weight",
             "mlp_head.0.bias": "fc_norm.bias", "mlp_head.1.weight": "head.weight", "mlp_head.1.bias": "head.bias"}
LAYER_NAMES = {"0.norm.weight": "norm1.weight", "0.norm.bias": "norm1.bias", "0.fn.qkv.weight": "attn.U.weight",
               "0.fn.to_out.0.weight": "attn.proj.weight", "1.norm.weight": "norm2.weight",
               "1.norm.bias": "norm2.bias", "1.fn.D": "odl.D", "1.fn.D1": "odl.D1"}


def our_name(key: str) -> str:
    """Our name of an authors' key: `transformer.layers.{i}.<x>` → `encoder.layers.{i}.<y>`, the rest by table."""
    if key.startswith("transformer.layers."):
        index, rest = key[len("transformer.layers."):].split(".", 1)
        return f"encoder.layers.{index}.{LAYER_NAMES[rest]}"
    return OUR_NAMES[key]


def released_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors under the authors' names (the package's own conversion)."""
    return to_released(model.state_dict())


# ---------------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("patch", PATCHES)
def test_every_alpha_classifier_name_holds_the_authors_tensors(size: str, patch: int) -> None:
    """Each crate_alpha_<size>_patch<p> (built on the meta device: no memory, no init) has, under the authors' names,
    exactly the keys and shapes of their layout at 224 px with 1000 classes, its heads, and that parameter count."""
    dim, heads, depth = SIZES[size]
    with torch.device("meta"):
        model = timm.create_model(f"crate_alpha_{size}_patch{patch}")
    expected = alpha_shapes(dim, depth, patch, 224 // patch)
    assert {k: tuple(v.shape) for k, v in released_of(model).items()} == expected
    assert sum(p.numel() for p in model.parameters()) == count(expected)
    assert model.encoder.layers[0].attn.heads == heads and model.num_classes == 1000 and model.num_features == dim
    assert all(isinstance(layer, AlphaLayer) for layer in model.encoder.layers)
    assert isinstance(model.encoder.norm, nn.Identity)  # no final norm


@pytest.mark.parametrize("size", [*CPU_SIZES, *SIZES])
def test_every_alpha_mae_name_has_an_alpha_encoder_and_our_decoder(size: str) -> None:
    """crate_alpha_mae_<size>: its encoder side is the authors' layout without the head; the decoder is ours (CRATE's
    decoder layers, the encoder's width, as deep as the encoder), with its parameter count from the formula."""
    dim, heads, depth, side, patch = CPU_SIZES[size] if size in CPU_SIZES else (*SIZES[size], 224, 16)
    with torch.device("meta"):
        model = timm.create_model(f"crate_alpha_mae_{size}")
    state = model.state_dict()
    encoder = alpha_shapes(dim, depth, patch, side // patch, classes=None)
    assert {k: tuple(v.shape) for k, v in to_released(encoder_state(state)).items()} == encoder
    assert model.family == "alpha" and model.encoder.layers[0].attn.heads == heads
    assert len(model.decoder.layers) == depth and all(isinstance(m, DecoderLayer) for m in model.decoder.layers)
    pixels = 3 * patch * patch
    decoder = depth * (3 * dim * dim + 5 * dim) + 2 * dim + pixels * dim + pixels + dim  # layers, norm, pred, mask
    assert sum(p.numel() for p in model.parameters()) == count(encoder) + decoder


@pytest.mark.parametrize("name, dim, depth, patch, params", [("crate_alpha_base_patch16", 768, 12, 16, B16_PARAMS),
                                                             ("crate_alpha_large_patch14", 1024, 24, 14, L14_PARAMS)])
def test_released_b16_and_l14_files_load_strictly(tmp_path: Path, name: str, dim: int, depth: int, patch: int,
                                                  params: int) -> None:
    """The released B/16 and L/14, for real: a file of their shapes in the authors' layout loads strictly through the
    timm name, every tensor in its place (each key holds its own random values, so swapped twins such as qkv and
    to_out, or D and D1, would show), with the published parameter count; a small image gives (B, 1000) logits."""
    grid = 224 // patch
    state = expanded_alpha(1, dim=dim, depth=depth, patch=patch, grid=grid)
    assert count(alpha_shapes(dim, depth, patch, grid)) == params
    path = tmp_path / "released.pth"
    torch.save(state, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert sum(p.numel() for p in model.parameters()) == params
    ours = model.state_dict()
    assert set(ours) == {our_name(k) for k in state}
    assert all(torch.equal(ours[our_name(k)], v) for k, v in state.items())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 2 * patch, 2 * patch)).shape == (2, 1000)  # the table resampled


# --------------------------------------------------------------------------------------------- fast path and twin


@pytest.mark.parametrize("shape, ratio", [((2, 5, 8), 4), ((1, 17, 64), 4), ((7, 24), 4), ((3, 2, 4, 16), 4),
                                          ((2, 9, 12), 2)])
def test_fused_odl_equals_its_plain_twin(shape: tuple[int, ...], ratio: int) -> None:
    """ODL's fast path (the first product reused in the second step) equals the two steps as written, in float64, on
    inputs of both signs where part of each code is active, to rounding level; so do the decoded outputs."""
    dim = shape[-1]
    odl = ODL(dim=dim, eta=ETA, lambd=LAMBD, ratio=ratio).double()
    x = 2 * torch.randn(shape, dtype=torch.float64)
    assert (x < 0).any() and (x > 0).any()
    fast = odl.code(x)
    odl.fused = False
    plain = odl.code(x)
    assert fast.shape == (*shape[:-1], ratio * dim)
    assert 0.05 < (plain > 0).double().mean() < 0.95  # neither all zero nor all active
    assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    assert_close(plain, odl.code_reference(x), rtol=0, atol=0)
    out_plain = odl(x)
    odl.fused = True
    assert_close(odl(x), out_plain, rtol=1e-12, atol=1e-12)


def test_fast_paths_equal_plain_twins_in_whole_alpha_models() -> None:
    """`set_fused(model, False)` switches every MSSA (SDPA → explicit softmax) and ODL to its plain twin; a whole α
    classifier's logits and an α MAE's masked prediction and loss are the same either way, in float64."""
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    clf = timm.create_model("crate_alpha_tiny_patch8", img_size=32, num_classes=5).double().eval()
    mae = timm.create_model("crate_alpha_mae_nano").double().eval()
    noise = torch.rand(2, 64)
    with torch.no_grad():
        logits, out = clf(img), mae.forward_masked(img, noise=noise)
        set_fused(clf, False)
        set_fused(mae, False)
        assert not any(getattr(m, "fused", False) for m in [*clf.modules(), *mae.modules()])
        assert_close(clf(img), logits, rtol=1e-12, atol=1e-12)
        plain = mae.forward_masked(img, noise=noise)
    assert_close(plain.pred, out.pred, rtol=1e-12, atol=1e-12)
    assert_close(plain.loss, out.loss, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ the authors' files


WRAPPERS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    "bare": lambda s: s,
    "state_dict with module. prefixes": lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_an_authors_file_gives_the_authors_logits(tmp_path: Path, wrapper: str) -> None:
    """A random CRATE-α Ti/16 in the authors' layout, at its native 224 px: loaded strictly through the timm name and
    through `hub.create_model(ClassifierConfig())`, cast to float64, its logits are the oracle's to rounding level."""
    dim, heads, depth = SIZES["tiny"]
    state = released_alpha(2, dim=dim, depth=depth, patch=16, grid=14)
    path = tmp_path / "alpha_ti16.pth"
    torch.save(WRAPPERS[wrapper](state), path)
    img = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    codes: list[tuple[torch.Tensor, torch.Tensor]] = []
    expected = alpha_forward({k: v.double() for k, v in state.items()}, img, heads=heads, codes=codes)
    assert len(codes) == depth and all(0.2 < (z > 0).double().mean() < 0.8 for pair in codes for z in pair)
    by_timm = timm.create_model("crate_alpha_tiny_patch16", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    by_hub, cfg = hub.create_model(ClassifierConfig(), path)
    assert (cfg.family, cfg.variant, cfg.heads, cfg.img_size, cfg.lambd, cfg.eta, cfg.num_classes) == \
        ("alpha", "tiny", 3, 224, 0.1, 0.1, 10)
    for model in (by_timm, by_hub):
        with torch.no_grad():
            logits = model.double().eval()(img)
        assert (logits - expected).abs().max() < 1e-10


def test_wrong_extra_or_missing_keys_are_one_line_errors(tmp_path: Path) -> None:
    """An authors' file that does not fit: a tensor of another shape, a key of no CRATE-α tensor, a layer too many
    and a missing tensor are each a one-line CheckpointError naming the file and the key."""
    dim, _, depth = SIZES["tiny"]
    good = released_alpha(3, dim=dim, depth=depth, patch=32, grid=7)
    extra_layer = {k.replace("layers.0.", "layers.12."): v for k, v in good.items() if ".layers.0." in k}
    cases = {
        "wrong shape": ({**good, "transformer.layers.3.1.fn.D1": torch.zeros(dim, 3 * dim)},
                        r"shape mismatch for 'encoder\.layers\.3\.odl\.D1': "
                        r"checkpoint \(192, 576\), model \(192, 768\)"),
        "extra key": ({**good, "transformer.layers.0.1.fn.D2": torch.zeros(dim, 4 * dim)},
                      r"unexpected key 'transformer\.layers\.0\.1\.fn\.D2'"),
        "extra layer": ({**good, **extra_layer}, r"unexpected key 'encoder\.layers\.12\.\S+'"),
        "missing": ({k: v for k, v in good.items() if k != "transformer.layers.5.1.fn.D"},
                    r"missing key 'encoder\.layers\.5\.odl\.D'"),
    }
    for what, (state, message) in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.pth"
        torch.save(state, path)
        for make in (lambda: timm.create_model("crate_alpha_tiny_patch32", pretrained=True,
                                               pretrained_cfg_overlay={"file": str(path)}),
                     lambda: hub.create_model(ClassifierConfig(variant="tiny", patch_size=32), path)):
            with pytest.raises(CheckpointError, match=message) as err:
                make()
            assert "\n" not in str(err.value) and path.name in str(err.value), what


# ------------------------------------------------------------------------------------------------------ layouts


def _released_supervised(dim: int = 64, depth: int = 2, patch: int = 4, grid: int = 8) -> dict[str, torch.Tensor]:
    """Every key of the released supervised CRATE (zeros): the same `transformer.layers` and `mlp_head` names."""
    pixels = 3 * patch * patch
    state = {"to_patch_embedding.1.weight": (pixels,), "to_patch_embedding.1.bias": (pixels,),
             "to_patch_embedding.2.weight": (dim, pixels), "to_patch_embedding.2.bias": (dim,),
             "to_patch_embedding.3.weight": (dim,), "to_patch_embedding.3.bias": (dim,),
             "pos_embedding": (1, 1 + grid * grid, dim), "cls_token": (1, 1, dim), "mlp_head.0.weight": (dim,),
             "mlp_head.0.bias": (dim,), "mlp_head.1.weight": (7, dim), "mlp_head.1.bias": (7,)}
    for i in range(depth):
        k = f"transformer.layers.{i}."
        state |= {k + "0.norm.weight": (dim,), k + "0.norm.bias": (dim,), k + "0.fn.qkv.weight": (dim, dim),
                  k + "0.fn.to_out.0.weight": (dim, dim), k + "0.fn.to_out.0.bias": (dim,), k + "1.norm.weight": (dim,),
                  k + "1.norm.bias": (dim,), k + "1.fn.weight": (dim, dim)}
    return {k: torch.zeros(shape) for k, shape in state.items()}


def test_alpha_layouts_round_trip_and_are_told_from_the_supervised_crate(tmp_path: Path) -> None:
    """to_released of our α classifier is the authors' layout, and to_ours brings it back exactly; layout_of tells
    released/alpha and ours/alpha whatever the key order, and still tells a released supervised CRATE (the same
    `transformer.layers` and `mlp_head` names) as supervised; the authors' layout has no place for an α MAE's
    decoder."""
    dim, _, depth = SIZES["tiny"]
    ours = timm.create_model("crate_alpha_tiny_patch8", img_size=32, num_classes=5).state_dict()
    released = to_released(ours)
    assert {k: tuple(v.shape) for k, v in released.items()} == alpha_shapes(dim, depth, 8, 4, classes=5)
    back = to_ours(released)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    assert to_ours({"state_dict": {"module." + k: v for k, v in released.items()}}).keys() == ours.keys()
    shared_first = dict(sorted(released.items(), key=lambda kv: not kv[0].startswith(("mlp_head", "pos_embedding",
                                                                                      "transformer.layers"))))
    assert next(iter(shared_first)).startswith(("mlp_head", "pos_embedding"))  # the supervised names come first
    assert layout_of(shared_first)[:2] == layout_of(released)[:2] == ("released", "alpha")
    assert layout_of(ours)[:2] == ("ours", "alpha")
    supervised = _released_supervised()
    assert layout_of(supervised)[:2] == ("released", "supervised")
    assert not any(".odl." in k for k in to_ours(supervised))
    for state, name, told in ((released, "alpha.pth", "a released CRATE-α classifier"),
                              (supervised, "crate.pth", "a released supervised CRATE")):
        torch.save(state, tmp_path / name)
        assert read_checkpoint(tmp_path / name).describe() == told
    mae = timm.create_model("crate_alpha_mae_nano").state_dict()
    assert layout_of(mae) == Layout("ours", "alpha", "encoder.layers.0.odl.D")
    with pytest.raises(ValueError, match=r"unexpected key '(mask_token|decoder)"):
        to_released(mae)


# -------------------------------------------------------------------------------------------------- a 21K head


def test_a_21k_head_is_kept_by_default_and_replaced_on_request(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """An authors' file with ImageNet-21K's 19167-class head: loaded as it is by default (every tensor the file's);
    with num_classes=1000 the head's Linear is a new one (as initialised: zero bias) and every other tensor, the
    head's LayerNorm included, is still the file's."""
    dim, _, depth = SIZES["tiny"]
    state = released_alpha(4, dim=dim, depth=depth, patch=16, grid=14, classes=19167)
    path = tmp_path / "alpha_21k.pth"
    torch.save(state, path)
    overlay = {"file": str(path)}
    kept = timm.create_model("crate_alpha_tiny_patch16", pretrained=True, pretrained_cfg_overlay=overlay)
    assert kept.num_classes == 19167 and kept.pretrained_cfg["num_classes"] == 19167
    loaded = released_of(kept)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert hub.create_model(ClassifierConfig(), path)[0].num_classes == 19167
    with caplog.at_level(logging.WARNING):
        by_timm = timm.create_model("crate_alpha_tiny_patch16", pretrained=True, pretrained_cfg_overlay=overlay,
                                    num_classes=1000)
    assert "19167-class head; it is set aside for a new 1000-class one" in caplog.text
    by_hub, cfg = hub.create_model(ClassifierConfig(num_classes=1000), path)
    assert cfg.num_classes == 1000
    for model in (by_timm, by_hub):
        assert model.num_classes == 1000 and model.head.weight.shape == (1000, dim)
        assert not model.head.bias.any()
        loaded = released_of(model)
        rest = [k for k in state if not k.startswith("mlp_head.1.")]
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in rest)
    assert by_timm.pretrained_cfg["num_classes"] == 1000


# ------------------------------------------------------------------------------------ activation checkpointing


def _alpha_classifier() -> nn.Module:
    return hub.create_model(ClassifierConfig(family="alpha", variant="nano", drop_path=0.5, num_classes=5,
                                             grad_checkpointing=True))[0]


def _mae_classifier() -> nn.Module:
    return timm.create_model("crate_mae_encoder_nano", num_classes=5, drop_path_rate=0.5)


def _alpha_mae() -> nn.Module:
    return timm.create_model("crate_alpha_mae_nano")


MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {  # (build, has stochastic depth)
    "alpha classifier": (_alpha_classifier, True),
    "alpha MAE": (_alpha_mae, False),
    "mae-family classifier": (_mae_classifier, True),
}


@pytest.mark.parametrize("which", list(MODELS))
def test_activation_checkpointing_gives_the_same_gradients(which: str) -> None:
    """With `set_grad_checkpointing(True)` (or the config key) every layer runs again in the backward pass (counted),
    and the loss and every gradient are those without it, in float64, stochastic depth included (its RNG state
    replayed: a drawn mask that changed would change them, as another seed shows); eval outputs under no_grad are
    unchanged."""
    build, stochastic = MODELS[which]
    model = build().double()
    assert model.encoder.grad_checkpointing == (which == "alpha classifier")  # the config key model.grad_checkpointing
    img = torch.randn(8, 3, 32, 32, dtype=torch.float64)  # 8 images: stochastic depth draws 8 coins per branch
    noise = torch.rand(8, 64)
    is_mae = hasattr(model, "forward_masked")
    calls = [0]
    model.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def loss() -> torch.Tensor:
        return model.forward_masked(img, noise=noise).loss if is_mae else model(img).square().mean()

    def run(checkpointing: bool, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(checkpointing)
        calls[0] = 0
        torch.manual_seed(seed)
        value = loss()
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return value.detach(), grads, calls[0]

    model.train()
    plain, plain_grads, plain_calls = run(False, 1)
    ckpt, ckpt_grads, ckpt_calls = run(True, 1)
    assert (plain_calls, ckpt_calls) == (1, 2)  # recomputed in the backward pass
    if is_mae:
        assert model.decoder.grad_checkpointing
    assert len(plain_grads) == len(list(model.parameters()))  # every parameter has a gradient
    assert_close(ckpt, plain, rtol=1e-12, atol=0)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert_close(ckpt_grads[name], grad, rtol=1e-12, atol=1e-15, msg=name)
    if stochastic:
        assert not torch.equal(run(False, 2)[0], plain)  # stochastic depth is live: another seed, another loss
    model.eval()
    with torch.no_grad():
        model.set_grad_checkpointing(False)
        reference = model(img)
        model.set_grad_checkpointing(True)
        assert torch.equal(model(img), reference)


# ------------------------------------------------------------------------------------------ saving and exporting


def test_save_for_hf_then_local_dir_round_trips_alpha_models(tmp_path: Path) -> None:
    """timm's save_for_hf and `local-dir:` give back an α classifier (its keywords included) and an α MAE that
    compute exactly what they did."""
    img = torch.randn(2, 3, 32, 32)
    clf = timm.create_model("crate_alpha_tiny_patch8", img_size=32, num_classes=5, heads=6, pool="mean").eval()
    save_for_hf(clf, tmp_path / "clf", safe_serialization=True)
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {"config.json", "model.safetensors"}
    again = timm.create_model(f"local-dir:{tmp_path / 'clf'}", pretrained=True).eval()
    assert (again.family, again.num_classes, again.pool, again.encoder.layers[0].attn.heads) == ("alpha", 5, "mean", 6)
    assert torch.equal(again(img), clf(img))
    mae = timm.create_model("crate_alpha_mae_nano").eval()
    save_for_hf(mae, tmp_path / "mae", safe_serialization=True)
    back = timm.create_model(f"local-dir:{tmp_path / 'mae'}", pretrained=True).eval()
    noise = torch.rand(2, 64)
    assert back.family == "alpha"
    assert torch.equal(back.forward_masked(img, noise=noise).pred, mae.forward_masked(img, noise=noise).pred)
    assert torch.equal(back(img), mae(img))


def test_safetensors_export_of_an_alpha_mae_fills_an_alpha_classifier(tmp_path: Path) -> None:
    """`export_encoder` of an α MAE to .safetensors (the run's config in its metadata) loads into an α classifier
    without a head, its config (heads 2) carried, with the MAE's encoder tokens."""
    cfg = Config(model=resolve_config(MAEConfig(family="alpha", variant="nano", heads=2)))
    mae = hub.build_model(cfg.model).eval()
    path = tmp_path / "encoder.safetensors"
    export_encoder(mae.state_dict(), config_to_dict(cfg), path)
    clf, clf_cfg = hub.create_model(ClassifierConfig(num_classes=0), path)
    assert (clf_cfg.family, clf_cfg.heads, clf_cfg.dim, clf.num_classes) == ("alpha", 2, 64, 0)
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(clf.eval().forward_features(img), mae.encode(img))
        assert clf(img).shape == (2, 64)


# -------------------------------------------------------------------------------------------------- config rules


def test_family_and_variant_rules(tmp_path: Path) -> None:
    """A CRATE-α file asked for as family mae is an error naming the family; a masked autoencoder of family
    supervised, and a huge variant of family mae, are ConfigErrors naming the key; tiny means 192 wide with 3 heads
    in family alpha and 384 wide with 6 in family mae."""
    path = tmp_path / "alpha.pth"
    torch.save(released_alpha(5, dim=64, depth=3, patch=4, grid=8), path)
    with pytest.raises(CheckpointError, match=r"alpha\.pth: holds a released CRATE-α classifier \(key 'conv1\.weight'\)"
                                              r", but model\.family is 'mae'"):
        hub.create_model(ClassifierConfig(family="mae"), path)
    for make in (lambda: resolve_config(MAEConfig(family="supervised")),
                 lambda: hub.create_model(MAEConfig(family="supervised"), path)):
        with pytest.raises(ConfigError, match=r"model\.family: a masked autoencoder has an encoder of family mae or "
                                              r"alpha, got 'supervised'"):
            make()
    with pytest.raises(ConfigError, match=r"model\.variant: unknown variant 'huge' of family mae"):
        ClassifierConfig(family="mae", variant="huge")
    alpha, mae = (resolve_config(ClassifierConfig(family=f, variant="tiny")) for f in ("alpha", "mae"))
    assert (alpha.dim, alpha.heads, alpha.encoder_depth, alpha.lambd) == (192, 3, 12, 0.1)
    assert (mae.dim, mae.heads, mae.encoder_depth, mae.lambd) == (384, 6, 12, 0.5)
    assert resolve_config(ClassifierConfig(family="alpha", variant="huge")).dim == 1280


def test_an_alpha_classifier_file_initialises_an_alpha_mae_only_with_a_fresh_decoder(tmp_path: Path) -> None:
    """init_from at the model level: an authors' CRATE-α classifier fills an α MAE's encoder (tensor for tensor; the
    head set aside) with `fresh_decoder`, the decoder side as a fresh model of the same seed initialises it; without
    it the file is a CheckpointError naming the head's key."""
    state = released_alpha(6, dim=64, depth=3, patch=4, grid=8)
    path = tmp_path / "alpha.pth"
    torch.save(state, path)
    torch.manual_seed(7)
    mae, cfg = hub.create_model(MAEConfig(), path, fresh_decoder=True)
    assert (cfg.family, cfg.variant, cfg.dim, cfg.heads, cfg.decoder_depth) == ("alpha", "nano", 64, 4, 3)
    loaded = to_released(encoder_state(mae.state_dict()))
    assert set(loaded) == {k for k in state if not k.startswith("mlp_head.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    torch.manual_seed(7)
    fresh = hub.build_model(cfg).state_dict()
    decoder = [k for k in fresh if k.startswith(("mask_token", "decoder.", "decoder_pred."))]
    assert decoder and all(torch.equal(mae.state_dict()[k], fresh[k]) for k in decoder)
    with pytest.raises(CheckpointError, match=r"alpha\.pth: holds a classifier head \(key '(fc_norm|head)\."):
        hub.create_model(MAEConfig(), path)
