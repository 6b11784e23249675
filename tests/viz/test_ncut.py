"""The normalised cut: the eigenproblem it solves, a graph of two cliques, and a synthetic two-region image."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from crate_mae.config import ClassifierConfig
from crate_mae.model import build_classifier
from crate_mae.model.layers import patchify
from crate_mae.viz.attention import mssa_view
from crate_mae.viz.ncut import affinity, fiedler_vector, normalized_cut


def test_affinity_is_the_binarised_cosine() -> None:
    f = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    a = affinity(f, tau=0.5, eps=1e-3)
    expected = torch.tensor([[1, 1, 1e-3, 1e-3], [1, 1, 1e-3, 1e-3], [1e-3, 1e-3, 1, 1e-3], [1e-3, 1e-3, 1e-3, 1]],
                            dtype=torch.float64)
    assert_close(a, expected)


def test_the_cut_solves_the_generalised_eigenproblem_and_splits_two_cliques() -> None:
    n, gen = 12, torch.Generator().manual_seed(0)
    group = torch.arange(n) % 3 == 0  # 4 patches against 8, interleaved
    a = torch.where(group[:, None] == group[None, :], 1.0, 0.01).double()
    a = a + 0.001 * torch.rand(n, n, generator=gen, dtype=torch.float64)
    a = (a + a.T) / 2
    x = fiedler_vector(a)
    deg = torch.diag(a.sum(1))
    lam = (x @ (deg - a) @ x) / (x @ deg @ x)
    assert_close((deg - a) @ x, lam * deg @ x)  # (D − A) x = λ D x
    assert abs(float(x @ deg @ torch.ones(n, dtype=torch.float64))) < 1e-9  # D-orthogonal to the constant vector
    assert 0 < lam < 0.2  # the second smallest: small for a graph that nearly falls apart
    side = x > x.mean()
    assert torch.equal(side, group) or torch.equal(side, ~group)


def _two_region_image(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy red square (rows and columns 8..23) on a noisy blue background, uint8 (1, 3, S, S), and its mask."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.empty(3, size, size)
    img[:] = torch.tensor([30.0, 60.0, 210.0])[:, None, None]
    img[:, 8:24, 8:24] = torch.tensor([210.0, 40.0, 30.0])[:, None, None]
    img = (img + 25 * torch.randn(3, size, size, generator=gen)).clamp(0, 255).to(torch.uint8)[None]
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[8:24, 8:24] = True
    return img, mask


@pytest.mark.parametrize("seed_patch", [(3, 3), (0, 0)])
def test_the_cut_finds_the_two_regions_of_a_synthetic_image(seed_patch: tuple[int, int]) -> None:
    img, mask = _two_region_image()
    model = build_classifier(ClassifierConfig(variant="nano", num_classes=10))
    features = patchify(model.normalize(img), 4)[0]  # (64, 48): each patch's normalised pixels
    seed = seed_patch[0] * 8 + seed_patch[1]
    found, x = normalized_cut(features, seed)
    region = mask[::4, ::4].reshape(-1)  # the patch grid's mask (the square is aligned to 4-pixel patches)
    assert torch.equal(found, region if region[seed] else ~region)
    assert found[seed] and torch.equal(found, x > 0)


def test_the_cut_of_model_features_finds_the_square() -> None:
    """Through the model: a fresh nano CRATE's first-layer MSSA features, at stride 2, still separate the square."""
    torch.manual_seed(0)
    img, mask = _two_region_image()
    model = build_classifier(ClassifierConfig(variant="nano", num_classes=10)).eval()
    view = mssa_view(model, img, layer=0, stride=2)  # 15 × 15 tokens; token j's patch starts at pixel 2j
    region = mask[1::2, 1::2][:15, :15].reshape(-1)  # token j's centre pixel 2j + 1.5 → inside the square or not
    found, _ = normalized_cut(view.features[0], seed=7 * 15 + 7)
    agree = (found == region).double().mean()
    assert agree > 0.9, f"only {agree:.0%} of the tokens on the right side"
