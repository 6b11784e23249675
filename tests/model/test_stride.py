"""The stride path of both stems: overlapping patches every s pixels, the position tables at the tokens' places.

Oracles: each strided token is the plain stem applied to its own p×p crop; the sin-cos table written from its
formula at fractional positions; and at s = p every output equals the plain path's exactly.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig
from crate_mae.model import build_classifier
from crate_mae.model.layers import (LearnedPosition, PatchEmbed, PatchifyEmbed, SinCosPosition, sincos_pos_table,
                                    token_grid)

FAMILIES = ["mae", "supervised"]


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier(ClassifierConfig(variant="nano", family=family, num_classes=10)).eval()


@pytest.mark.parametrize(("hw", "patch", "stride", "grid"), [
    ((32, 32), 4, 2, (15, 15)), ((32, 48), 4, 1, (29, 45)), ((224, 224), 16, 8, (27, 27)),
    ((224, 224), 8, 4, (55, 55)), ((40, 40), 8, 8, (5, 5)), ((48, 48), 16, 4, (9, 9))])
def test_token_grid_counts_the_strided_patches(hw: tuple[int, int], patch: int, stride: int, grid: tuple[int, int]) -> None:
    assert token_grid(hw, patch, stride) == grid
    assert grid == ((hw[0] - patch) // stride + 1, (hw[1] - patch) // stride + 1)


@pytest.mark.parametrize(("hw", "stride", "words"), [((32, 32), 5, "between 1 and"), ((32, 32), 0, "between 1 and"),
                                                     ((32, 32), 3, "multiples"), ((30, 32), 2, "divisible")])
def test_a_stride_that_does_not_fit_is_one_line_naming_it(hw: tuple[int, int], stride: int, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        token_grid(hw, 4, stride)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [32, 48])
def test_stride_equal_to_the_patch_is_the_plain_path(family: str, size: int) -> None:
    model = _model(family)
    img = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    assert torch.equal(model.tokens(img, stride=4), model.tokens(img))
    plain = model.forward_intermediates(img, intermediates_only=True)
    strided = model.forward_intermediates(img, intermediates_only=True, stride=4)
    for a, b in zip(plain, strided):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_strided_tokens_and_intermediates_have_the_finer_grid(family: str) -> None:
    model = _model(family)
    img = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    assert model.tokens(img, stride=2).shape == (2, 1 + 15 * 23, 64)
    final, inter = model.forward_intermediates(img, indices=[0, 1], stride=2)
    assert final.shape == (2, 1 + 15 * 23, 64) and [t.shape for t in inter] == [(2, 64, 15, 23)] * 2
    assert model.layer_input(img, -1, stride=2).shape == (2, 1 + 15 * 23, 64)


@pytest.mark.parametrize("stem", [PatchEmbed, PatchifyEmbed])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_each_strided_token_is_the_stem_of_its_own_crop(stem: type, stride: int) -> None:
    torch.manual_seed(1)
    embed, p = stem(patch_size=4, dim=16), 4
    img = torch.randn(2, 3, 16, 28)  # H − p = 12 and W − p = 24: multiples of every stride here
    tokens, (h, w) = embed(img, stride=stride)
    assert (h, w) == (12 // stride + 1, 24 // stride + 1) and tokens.shape == (2, h * w, 16)
    for i in range(h):
        for j in range(w):
            crop = img[:, :, i * stride:i * stride + p, j * stride:j * stride + p]
            assert_close(tokens[:, i * w + j], embed(crop)[0][:, 0], rtol=1e-5, atol=1e-5)


def _sincos_at(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 2-D sin-cos table (docs/MODEL.md) at any (row, col) places: [sin, cos](col·ω) then [sin, cos](row·ω), ω_k = 10000^(−4k/d)."""
    quarter = dim // 4
    omega = torch.tensor([10000 ** (-k / quarter) for k in range(quarter)], dtype=torch.float64)
    c, r = cols.double()[:, None] * omega, rows.double()[:, None] * omega
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1)


def test_the_sincos_table_of_a_strided_grid_is_the_formula_at_the_tokens_places() -> None:
    dim, grid, fine = 16, (4, 6), (7, 11)  # stride half the patch: token j at j/2
    table = sincos_pos_table(dim, grid, fine=fine)
    rows, cols = torch.meshgrid(torch.arange(7) / 2, torch.arange(11) / 2, indexing="ij")
    assert_close(table[1:], _sincos_at(dim, rows.reshape(-1), cols.reshape(-1)).float())
    assert torch.equal(table[0], torch.zeros(dim))
    plain = sincos_pos_table(dim, grid)
    assert_close(table[1:].view(7, 11, dim)[::2, ::2].reshape(-1, dim), plain[1:])  # tokens on plain patches


def test_the_learned_table_keeps_the_rows_of_tokens_on_plain_patches() -> None:
    torch.manual_seed(2)
    pos = LearnedPosition(dim=8, grid=(4, 4))
    x = torch.zeros(1, 1 + 7 * 7, 8)
    out = pos(x, (4, 4), (7, 7))[0]
    assert torch.equal(out[0], pos.table[0, 0])
    assert_close(out[1:].view(7, 7, 8)[::2, ::2].reshape(-1, 8), pos.table[0, 1:], rtol=1e-5, atol=1e-5)
    midpoint = out[1:].view(7, 7, 8)[1, 0]  # between plain rows 0 and 1 of column 0: bicubic, between them
    table = pos.table[0, 1:].view(4, 4, 8)
    assert not torch.allclose(midpoint, table[0, 0]) and not torch.allclose(midpoint, table[1, 0])
    assert torch.equal(pos(x[:, :17], (4, 4), None), pos(x[:, :17], (4, 4)))


def test_sincos_position_module_follows_the_strided_grid() -> None:
    pos = SinCosPosition(dim=16, grid=(4, 4))
    out = pos(torch.zeros(1, 1 + 7 * 7, 16), (4, 4), (7, 7))
    assert_close(out[0], sincos_pos_table(16, (4, 4), fine=(7, 7)))
    assert math.isclose(float(out[0, 1:].abs().max()), 1.0, rel_tol=1e-6)
