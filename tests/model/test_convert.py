"""Released checkpoint layout ↔ ours: round trip, strict errors, and the same function either way.

The released-layout state dict and its forward pass are written here from the model's definition (docs/MODEL.md) alone (numpy
position table as MAE writes it, three-product ISTA, explicit softmax), independent of the package.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig, MAEConfig
from crate_mae.model import CrateClassifier, build_classifier, build_mae, hub, to_ours, to_released
from crate_mae.model.mae import random_masking

D, HEADS, DEPTH, PATCH, IMG = 64, 4, 3, 4, 32
GRID = IMG // PATCH
P = 3 * PATCH * PATCH


def mae_pos_table(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed(dim, grid, cls_token=True), restated in numpy."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with every key of the released CRATE-MAE, at the nano size."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.1  # noqa: E731
    pos = torch.from_numpy(mae_pos_table(D, GRID)).float()[None]
    state = {"cls_token": r(1, 1, D), "mask_token": r(1, 1, D), "pos_embed": pos.clone(),
             "decoder_pos_embed": pos.clone(), "patch_embed.proj.weight": r(D, 3, PATCH, PATCH),
             "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D),
             "decoder_embed.weight": r(D, D), "decoder_embed.bias": r(D),
             "decoder_norm.weight": 1 + r(D), "decoder_norm.bias": r(D),
             "decoder_pred.weight": r(P, D), "decoder_pred.bias": r(P)}
    for i in range(DEPTH):
        e, d = f"blocks.{i}.layers.0.", f"decoder_blocks.{i}.layers.0."
        state.update({
            e + "0.norm.weight": 1 + r(D), e + "0.norm.bias": r(D), e + "0.fn.qkv.weight": r(D, D),
            e + "0.fn.to_out.0.weight": r(D, D), e + "0.fn.to_out.0.bias": r(D),
            e + "1.norm.weight": 1 + r(D), e + "1.norm.bias": r(D), e + "1.fn.weight": r(D, D),
            d + "0.norm.weight": 1 + r(D), d + "0.norm.bias": r(D), d + "0.fn.weight": r(D, D),
            d + "1.norm.weight": 1 + r(D), d + "1.norm.bias": r(D), d + "1.fn.qkv.weight": r(D, D),
            d + "1.fn.to_out.0.weight": r(D, D), d + "1.fn.to_out.0.bias": r(D),
        })
    return state


def released_forward(s: dict[str, torch.Tensor], img: torch.Tensor, mask: torch.Tensor,
                     eta: float = 0.1, lambd: float = 0.5) -> torch.Tensor:
    """The released forward pass, written out from docs/MODEL.md with the released key names."""
    def ln(x, key, eps=1e-5):
        return F.layer_norm(x, (D,), s[key + ".weight"], s[key + ".bias"], eps)

    def attn(x, key):
        w = F.linear(x, s[key + ".qkv.weight"])
        b, n, _ = w.shape
        w = w.reshape(b, n, HEADS, D // HEADS).permute(0, 2, 1, 3)
        a = torch.softmax(w @ w.transpose(-1, -2) * (D // HEADS) ** -0.5, dim=-1)
        o = (a @ w).permute(0, 2, 1, 3).reshape(b, n, D)
        return F.linear(o, s[key + ".to_out.0.weight"], s[key + ".to_out.0.bias"])

    x = F.conv2d(img, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.where(mask.bool()[..., None], s["mask_token"], x)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s["decoder_pos_embed"]
    for i in range(DEPTH):
        k = f"blocks.{i}.layers.0."
        x = x + attn(ln(x, k + "0.norm"), k + "0.fn")
        u, weight = ln(x, k + "1.norm"), s[k + "1.fn.weight"]
        grad_1 = F.linear(F.linear(u, weight), weight.t())
        grad_2 = F.linear(u, weight.t())
        x = F.relu(u + eta * (grad_2 - grad_1) - eta * lambd)
    x = ln(x, "norm", 1e-6)
    for i in range(DEPTH):
        k = f"decoder_blocks.{i}.layers.0."
        g = F.linear(ln(x, k + "0.norm"), s[k + "0.fn.weight"])
        x = g - attn(ln(g, k + "1.norm"), k + "1.fn")
    x = ln(x, "decoder_norm", 1e-6)
    return F.linear(x, s["decoder_pred.weight"], s["decoder_pred.bias"])[:, 1:]


def nano_mae():
    return build_mae(MAEConfig(variant="nano"))


def load_released_mae(path: Path, cfg: MAEConfig | None = None):
    """The released file through the one loader, as a CrateMAE (a released file records no heads: the row's)."""
    return hub.create_model(cfg or MAEConfig(), path)[0]


def test_released_state_converts_loads_and_computes_the_same_function() -> None:
    state = released_state()
    model = nano_mae()
    model.load_state_dict(to_ours(state), strict=True)
    img, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, GRID * GRID)
    out = model.eval().forward_masked(img, noise=noise)
    assert_close(out.pred, released_forward(state, img, random_masking(noise, 0.75)), atol=1e-5, rtol=1e-4)


def test_round_trip_released_ours_released() -> None:
    state = released_state()
    back = to_released(to_ours(state), grid=(GRID, GRID))
    assert set(back) == set(state)
    for key in state:
        if not key.startswith("decoder_embed"):  # unused by the released forward: dropped, then an identity
            assert_close(back[key], state[key], msg=key, atol=1e-6, rtol=0)


def test_round_trip_ours_released_ours() -> None:
    ours = nano_mae().state_dict()
    again = to_ours(to_released(ours, grid=(GRID, GRID)))
    assert set(again) == set(ours)
    for key in ours:
        assert torch.equal(again[key], ours[key]), key


def test_wrapped_and_module_prefixed_checkpoints() -> None:
    state = released_state()
    direct = to_ours(state)
    wrapped = to_ours({"model": {"module." + k: v for k, v in state.items()}})
    assert set(direct) == set(wrapped)
    ours = nano_mae().state_dict()
    assert set(to_ours({"model": {"module." + k: v for k, v in ours.items()}})) == set(ours)


def test_unexpected_released_key_is_named() -> None:
    state = released_state()
    state["blocks.0.layers.0.2.fn.weight"] = torch.zeros(D, D)
    with pytest.raises(ValueError, match=r"blocks\.0\.layers\.0\.2\.fn\.weight"):
        to_ours(state)


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = released_state()
    del state["blocks.1.layers.0.1.fn.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layers\.1\.ista\.D'"):
        load_released_mae(path, MAEConfig(variant="nano"))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    torch.save(released_state(), path)
    with pytest.raises(ValueError, match=r"shape mismatch for 'cls_token'"):
        load_released_mae(path, MAEConfig(variant="demo"))


def test_a_position_table_unlike_ours_is_rejected() -> None:
    state = released_state()
    state["decoder_pos_embed"] = state["decoder_pos_embed"] + 0.01
    with pytest.raises(ValueError, match="decoder_pos_embed"):
        to_ours(state)


def test_load_released_mae_from_file_with_weights_only(tmp_path: Path) -> None:
    state = released_state(seed=3)
    path = tmp_path / "crate_mae_nano.pth"
    torch.save({"model": state}, path)
    model = load_released_mae(path, MAEConfig(variant="nano"))
    img, noise = torch.randn(1, 3, IMG, IMG), torch.rand(1, GRID * GRID)
    assert_close(model.eval().forward_masked(img, noise=noise).pred, released_forward(state, img, random_masking(noise, 0.75)),
                 atol=1e-5, rtol=1e-4)


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a loadable checkpoint"):
        load_released_mae(path)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_released_mae(tmp_path / "nothing.pth")


def test_classifier_loads_a_released_checkpoint_strictly() -> None:
    state = released_state()
    clf: CrateClassifier = build_classifier(ClassifierConfig(variant="nano", num_classes=10))
    hub.load_weights(clf, state)
    mae = nano_mae()
    mae.load_state_dict(to_ours(state))
    img = torch.randn(2, 3, IMG, IMG)
    assert_close(clf.forward_features(img), mae.encode(img))


def test_a_released_file_takes_its_sizes_from_its_shapes(tmp_path: Path) -> None:
    path = tmp_path / "released.pth"
    torch.save({"model": released_state()}, path)
    model, cfg = hub.create_model(MAEConfig(), path)  # nothing set: all from the file
    assert (cfg.variant, cfg.dim, cfg.heads, cfg.encoder_depth, cfg.patch_size, cfg.lambd) == ("nano", D, HEADS, DEPTH,
                                                                                               PATCH, 0.5)
