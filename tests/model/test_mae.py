"""CrateMAE: masking, the loss, patchify, parameter counts, gradients."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig, MAEConfig
from crate_mae.model import CrateMAE, build_mae, patchify, random_masking, unpatchify
from crate_mae.model.layers import sincos_pos_table


def nano(**overrides) -> CrateMAE:
    return build_mae(MAEConfig(variant="nano", **overrides))


@pytest.mark.parametrize("n, ratio", [(196, 0.75), (64, 0.75), (64, 0.5), (49, 0.9), (10, 0.33)])
def test_masking_keeps_exactly_int_n_times_one_minus_r(n: int, ratio: float) -> None:
    noise = torch.rand(5, n)
    mask = random_masking(noise, ratio)
    assert mask.shape == (5, n)
    assert (mask.sum(1) == n - int(n * (1 - ratio))).all()


def test_mask_agrees_with_the_noise() -> None:
    """The kept patches are exactly those with the smallest noise values."""
    noise = torch.rand(4, 64)
    mask = random_masking(noise, 0.75)
    keep = 16
    for b in range(4):
        kept = set(noise[b].argsort()[:keep].tolist())
        assert kept == set((mask[b] == 0).nonzero().flatten().tolist())
        assert noise[b][mask[b] == 0].max() < noise[b][mask[b] == 1].min()


def test_same_noise_same_output_and_mask() -> None:
    model = nano().eval()
    img, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a, b = model.forward_masked(img, noise=noise), model.forward_masked(img, noise=noise)
    assert_close(a.pred, b.pred)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.mask, random_masking(noise, 0.75))


def test_forward_shapes_and_mask_ratio_argument() -> None:
    model = nano()
    out = model.forward_masked(torch.randn(3, 3, 32, 32), mask_ratio=0.5)
    assert out.pred.shape == (3, 64, 48) and out.mask.shape == (3, 64) and out.loss.shape == ()
    assert (out.mask.sum(1) == 32).all()
    with pytest.raises(ValueError, match="mask_ratio"):
        model.forward_masked(torch.randn(1, 3, 32, 32), mask_ratio=1.0)
    with pytest.raises(ValueError, match="noise"):
        model.forward_masked(torch.randn(1, 3, 32, 32), noise=torch.rand(1, 10))


def test_masked_patches_become_the_mask_token() -> None:
    """The encoder sees all tokens; a masked patch's content cannot reach the encoder."""
    model = nano().eval()
    img, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 64)
    mask = random_masking(noise, 0.75)
    changed = img.clone()
    patches = patchify(changed, 4)
    patches[0, mask[0].bool()] += 10.0  # change only masked patches
    changed = unpatchify(patches, 4)
    assert_close(model.encode(img, mask), model.encode(changed, mask))
    assert not torch.allclose(model.encode(img), model.encode(changed))


def test_loss_uses_only_masked_patches() -> None:
    model = nano()
    img = torch.randn(2, 3, 32, 32)
    mask = random_masking(torch.rand(2, 64), 0.75)
    target = model.target(img)
    pred = target.clone()
    assert model.loss(img, pred, mask).item() == 0.0
    pred_kept_wrong = torch.where(mask.bool()[..., None], target, target + 100.0)
    assert model.loss(img, pred_kept_wrong, mask).item() == 0.0  # errors at kept patches are ignored
    pred_masked_wrong = torch.where(mask.bool()[..., None], target + 1.0, target)
    assert_close(model.loss(img, pred_masked_wrong, mask), torch.tensor(1.0))  # mean over masked pixels


def test_loss_is_the_spec_formula() -> None:
    model = nano()
    out = model.forward_masked(torch.randn(2, 3, 32, 32))
    img = torch.randn(2, 3, 32, 32)
    pred, mask = torch.randn(2, 64, 48), out.mask
    expected = (((pred - patchify(img, 4)) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert_close(model.loss(img, pred, mask), expected)


def test_patchify_unpatchify_invert_each_other() -> None:
    img = torch.randn(2, 3, 32, 48)
    x = patchify(img, 8)
    assert x.shape == (2, 4 * 6, 8 * 8 * 3)
    assert torch.equal(unpatchify(x, 8, grid=(4, 6)), img)
    square = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(square, 4), 4), square)


def test_patchify_pixel_order_is_row_col_channel() -> None:
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    x = patchify(img, 2)  # (2, 4, 12)
    # patch (0, 1) of sample 1: rows 0-1, cols 2-3; within it (row, col, channel)
    expected = img[1, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(x[1, 1], expected)


def test_norm_pix_target_has_zero_mean_unit_variance_per_patch() -> None:
    model = nano(norm_pix_loss=True)
    img = torch.rand(2, 3, 32, 32) * 5 + 3
    target = model.target(img)
    assert_close(target.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    assert_close(target.var(-1), torch.ones(2, 64), atol=1e-3, rtol=0)  # unbiased, as MAE
    assert not torch.allclose(nano().target(img).mean(-1), torch.zeros(2, 64))


@pytest.mark.parametrize("variant, expected", [("tiny", 11_256_192), ("small", 24_846_528), ("base", 43_745_280)])
def test_trainable_parameter_counts(variant: str, expected: int) -> None:
    with torch.device("meta"):
        model = build_mae(MAEConfig(variant=variant))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert "pos.table" not in model.state_dict()  # the fixed table is a non-persistent buffer


def test_every_parameter_gets_a_gradient() -> None:
    """So DDP needs no find_unused_parameters."""
    model = nano()
    model.forward_masked(torch.randn(2, 3, 32, 32)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_position_table_matches_mae_layout() -> None:
    """First half encodes the column, second half the row; CLS row zero."""
    table = sincos_pos_table(8, (2, 3))
    assert table.shape == (7, 8)
    assert (table[0] == 0).all()
    # patch 4 is at row 1, col 1; patch 2 at row 0, col 2
    col_half, row_half = table[1:, :4], table[1:, 4:]
    assert torch.equal(col_half[4], col_half[1]) and torch.equal(row_half[4], row_half[3])
    assert torch.equal(row_half[2], row_half[0]) and not torch.equal(col_half[2], col_half[0])


def test_a_few_steps_reduce_the_loss() -> None:
    """A real (if tiny) optimisation: the model can fit a fixed batch."""
    model = nano()
    img, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model.forward_masked(img, noise=noise).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_training_forward_is_one_graph_without_breaks() -> None:
    """Static shapes throughout (masking by mask token, not by gathering a data-dependent number of tokens), no
    host syncs or Python branches on tensor values: torch.compile captures each forward whole, drop path included."""
    from crate_mae.model import build_classifier

    img = torch.randn(4, 3, 32, 32)
    for model in (nano(), build_classifier(ClassifierConfig(variant="nano", num_classes=10, drop_path=0.1))):
        explained = torch._dynamo.explain(model.train())(img)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_per_sample_loss_is_the_loss_of_each_image() -> None:
    model = nano().eval()
    img, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    out = model.forward_masked(img, noise=noise)
    per_image = model.sample_loss(img, out.pred, out.mask)
    assert per_image.shape == (3,)
    for i in range(3):  # each image alone gives its own entry
        alone = model.forward_masked(img[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(per_image[i], alone.loss)
    torch.testing.assert_close(per_image.mean(), out.loss)  # every image masks the same number of patches
