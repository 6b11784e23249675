"""One layer's MSSA seen from its tokens: the CLS row, the patch features, the thresholded-mass rule, image resolution."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig
from crate_mae.model import build_classifier
from crate_mae.viz.attention import mass_masks, most_attended, mssa_view
from crate_mae.viz.plot import to_pixels


@pytest.mark.parametrize("family", ["mae", "supervised"])
@pytest.mark.parametrize("stride", [None, 2])
def test_the_view_is_row_cls_of_mssa_and_its_projection(family: str, stride: int | None) -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(variant="nano", family=family, num_classes=10, encoder_depth=3)).eval()
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    view = mssa_view(model, img, layer=1, stride=stride)
    side = 15 if stride else 8
    block = model.encoder.layers[1]
    z = block.norm1(model.layer_input(img, 1, stride=stride))
    full = block.attn.attention(z)  # (B, H, 1 + N, 1 + N), the whole softmax
    expected = full[:, :, 0, 1:] / full[:, :, 0, 1:].sum(-1, keepdim=True)
    assert view.grid == (side, side) and view.cls_attention.shape == (2, 4, side, side)
    assert_close(view.cls_attention.flatten(2), expected)
    assert_close(view.features, block.attn.U(z)[:, 1:])
    assert_close(view.cls_attention.sum((-2, -1)), torch.ones(2, 4))


@pytest.mark.parametrize(("values", "mass", "kept"), [
    ([0.5, 0.3, 0.1, 0.1], 0.6, [1, 1, 0, 0]),  # 0.5 < 0.6, then 0.8 reaches it
    ([0.5, 0.25, 0.125, 0.125], 0.5, [1, 0, 0, 0]),  # the first alone holds exactly half
    ([0.1, 0.5, 0.1, 0.3], 0.6, [0, 1, 0, 1]),  # ranked by value, not by place
    ([0.25, 0.25, 0.25, 0.25], 0.6, [1, 1, 1, 0]),  # ties: by place
    ([0.7, 0.3, 0.0, 0.0], 1.0, [1, 1, 0, 0]),  # all the mass: every patch above zero
    ([7.0, 2.1, 0.7, 0.7], 0.6, [1, 0, 0, 0]),  # maps need not sum to one: 7/10.5 ≥ 0.6
])
def test_the_thresholded_mass_rule(values: list[float], mass: float, kept: list[int]) -> None:
    got = mass_masks(torch.tensor(values).view(1, 2, 2), mass)
    assert got.dtype == torch.bool and got.view(-1).int().tolist() == kept


def test_masks_are_the_fewest_patches_holding_the_mass() -> None:
    torch.manual_seed(0)
    maps = torch.rand(3, 5, 6, 7) ** 4  # peaky maps, as attention is
    masks = mass_masks(maps, 0.6)
    total = maps.sum((-2, -1))
    held = (maps * masks).sum((-2, -1))
    assert (held >= 0.6 * total - 1e-6).all()
    smallest_kept = torch.where(masks, maps, torch.inf).flatten(-2).min(-1).values
    assert (held - smallest_kept < 0.6 * total).all()  # one patch fewer would not hold it
    assert (torch.where(masks, -torch.inf, maps).flatten(-2).max(-1).values <= smallest_kept).all()  # the highest ones
    with pytest.raises(ValueError, match="mass"):
        mass_masks(maps, 0.0)


def test_most_attended_is_the_peak_of_the_head_mean() -> None:
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, :, 1, 2] = 1.0
    maps[1, 0, 3, 3], maps[1, 1, 0, 0], maps[1, 2, 0, 0] = 1.0, 0.6, 0.6
    assert most_attended(maps).tolist() == [1 * 4 + 2, 0]


@pytest.mark.parametrize(("patch", "stride"), [(4, 4), (4, 2), (8, 4), (4, 1), (8, 2)])
def test_to_pixels_puts_each_token_at_its_patch_centre(patch: int, stride: int) -> None:
    size = 4 * patch
    side = (size - patch) // stride + 1
    maps = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side)
    up = to_pixels(maps, (size, size), patch_size=patch, stride=stride)
    assert up.shape == (1, 1, size, size)
    for j in range(side):  # token j's patch covers pixels [j·s, j·s + p): the pixel at its centre carries its value
        centre = j * stride + (patch - 1) // 2  # of the two middle pixels, the first
        assert up[0, 0, centre, centre] == maps[0, 0, j, j]
    if stride == patch:
        assert torch.equal(up, F.interpolate(maps, scale_factor=patch, mode="nearest"))
