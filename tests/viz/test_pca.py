"""PCA of patch features: the components of data with known axes, the sign and scale conventions, the segments."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from crate_mae.viz.pca import fit_pca, pca_segments


def _known_axes(m: int = 4000, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x = mean + Σ_k σ_k a_k q_k with orthonormal q_k and σ = (5, 3, 2, 1, 0.5, 0.1); returns (x, q, σ)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    sigma = torch.tensor([5, 3, 2, 1, 0.5, 0.1], dtype=torch.float64)[:d]
    a = torch.randn(m, d, generator=gen, dtype=torch.float64)
    a = (a - a.mean(0)) / a.std(0)
    a, _ = torch.linalg.qr(a)  # exactly uncorrelated columns: the sample PCA is then the true one
    a = a * (m - 1) ** 0.5
    return 3.0 + (a * sigma) @ q.T, q, sigma


def test_pca_finds_the_known_axes_and_their_variances() -> None:
    x, q, sigma = _known_axes()
    pca = fit_pca(x, 4)
    assert_close(pca.variance, sigma[:4] ** 2)
    assert_close(pca.components @ pca.components.T, torch.eye(4, dtype=torch.float64))
    assert_close((pca.components @ q[:, :4]).abs(), torch.eye(4, dtype=torch.float64), atol=1e-9, rtol=0)
    assert_close(pca.mean, x.mean(0))


def test_scores_have_unit_variance_and_their_largest_magnitude_is_positive() -> None:
    x, _, _ = _known_axes(seed=1)
    scores = fit_pca(x, 3).scores(x)
    assert_close(scores.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert_close(scores.var(0), torch.ones(3, dtype=torch.float64))
    peak = scores.gather(0, scores.abs().argmax(0, keepdim=True))
    assert (peak > 0).all()


@pytest.mark.parametrize("change", ["negate", "scale", "shift"])
def test_the_conventions_make_scores_independent_of_sign_scale_and_offset(change: str) -> None:
    x, _, _ = _known_axes(seed=2)
    other = {"negate": -x, "scale": 7.5 * x, "shift": x - 40.0}[change]
    assert_close(fit_pca(other, 3).scores(other), fit_pca(x, 3).scores(x), atol=1e-9, rtol=1e-9)


def test_pca_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="rows"):
        fit_pca(torch.randn(1, 4), 2)
    with pytest.raises(ValueError, match="k 5"):
        fit_pca(torch.randn(10, 4), 5)


def _two_region_features(b: int = 3, side: int = 6, d: int = 8, seed: int = 0):
    """Features of b images on a side × side grid: an object square (rows/cols 1..3) at +v, background at −v, plus
    noise; within the object, a left and a right part differ along a second direction."""
    gen = torch.Generator().manual_seed(seed)
    v, part = torch.zeros(d), torch.zeros(d)
    v[0], part[1] = 4.0, 1.0
    obj = torch.zeros(side, side, dtype=torch.bool)
    obj[1:4, 1:4] = True
    left = torch.zeros(side, side, dtype=torch.bool)
    left[1:4, 1:2] = True
    feats = torch.where(obj[..., None], v, -0.4 * v) + torch.where(left[..., None], part, -0.5 * part * obj[..., None])
    feats = feats.expand(b, side, side, d) + 0.05 * torch.randn(b, side, side, d, generator=gen)
    return feats.reshape(b, side * side, d), obj


@pytest.mark.parametrize("seed_in_object", [True, False])
def test_segments_find_the_object_and_turn_toward_the_most_attended_patch(seed_in_object: bool) -> None:
    feats, obj = _two_region_features()
    side = obj.shape[0]
    seeds = torch.full((3,), 2 * side + 2 if seed_in_object else 0)  # inside the square, or a corner
    seg = pca_segments(feats, (side, side), seeds, threshold=0.0)
    expected = obj if seed_in_object else ~obj
    assert torch.equal(seg.foreground, expected.expand(3, side, side))
    assert (seg.first.flatten(1).gather(1, seeds[:, None]) > 0).all()
    assert seg.variance_ratio[0] > 0.8 and seg.variance_ratio.sum() <= 1 + 1e-9


def test_parts_are_scaled_over_the_foreground_of_all_images_and_black_elsewhere() -> None:
    feats, obj = _two_region_features(b=2)
    side = obj.shape[0]
    seg = pca_segments(feats, (side, side), torch.full((2,), 2 * side + 2))
    fg = seg.foreground[:, None].expand_as(seg.parts)
    assert seg.parts.shape == (2, 3, side, side)
    assert (seg.parts[~fg] == 0).all()
    for c in range(3):  # min–max over the foreground patches of both images together
        values = seg.parts[:, c][seg.foreground]
        assert values.min() == 0 and values.max() == pytest.approx(1.0)
    red = seg.parts[:, 0]  # the 2nd component tells the left part of the object from the rest of it
    left, rest = red[:, 1:4, 1], red[:, 1:4, 2:4]
    assert (left.min() > rest.max()) or (left.max() < rest.min())
