"""MSSA and ISTA: the fast forms against their explicit twins; layer shapes and the maths."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from crate_mae.model.crate import ISTA, MSSA, Decoder, DecoderLayer, Encoder, EncoderLayer, set_fused


def test_mssa_sdpa_equals_explicit_values_and_gradients() -> None:
    mssa = MSSA(dim=64, heads=4).double()
    z = torch.randn(3, 17, 64, dtype=torch.float64, requires_grad=True)

    fast = mssa(z)
    fast_grads = torch.autograd.grad(fast.square().sum(), [z, *mssa.parameters()])
    mssa.fused = False  # the plain twin, chosen by the attribute (as timm's fused_attn)
    slow = mssa(z)
    assert_close(slow, mssa.forward_reference(z), rtol=0, atol=0)
    slow_grads = torch.autograd.grad(slow.square().sum(), [z, *mssa.parameters()])

    assert_close(fast, slow)
    for g_fast, g_slow in zip(fast_grads, slow_grads):
        assert_close(g_fast, g_slow)


def test_mssa_matches_the_spec_formula_written_out() -> None:
    """softmax(W_h W_hᵀ/√p) W_h per head with one shared W = Z Uᵀ, then the output Linear."""
    mssa = MSSA(dim=32, heads=2).double()
    z = torch.randn(2, 5, 32, dtype=torch.float64)
    w = F.linear(z, mssa.U.weight)
    heads = []
    for h in range(2):
        wh = w[..., h * 16:(h + 1) * 16]
        heads.append(torch.softmax(wh @ wh.transpose(-1, -2) / 16**0.5, dim=-1) @ wh)
    expected = mssa.proj(torch.cat(heads, dim=-1))
    assert_close(mssa(z), expected)


def test_attention_maps_are_row_stochastic() -> None:
    mssa = MSSA(dim=64, heads=4)
    attn = mssa.attention(torch.randn(2, 9, 64))
    assert attn.shape == (2, 4, 9, 9)
    assert_close(attn.sum(-1), torch.ones(2, 4, 9))


def test_ista_two_products_equal_three_in_float64() -> None:
    ista = ISTA(dim=48, eta=0.1, lambd=0.5).double()
    u = torch.randn(4, 11, 48, dtype=torch.float64)
    assert_close(ista(u), ista.forward_reference(u), rtol=0, atol=1e-12)


def test_ista_matches_column_vector_formula() -> None:
    """ReLU(u + η·Dᵀ(u − D u) − η·λ) for one column vector u."""
    ista = ISTA(dim=8, eta=0.3, lambd=0.2).double()
    u = torch.randn(8, dtype=torch.float64)
    d = ista.D.detach()
    expected = torch.relu(u + 0.3 * d.T @ (u - d @ u) - 0.3 * 0.2)
    assert_close(ista(u[None, None])[0, 0], expected)


def test_ista_output_is_nonnegative_and_lambda_sparsifies() -> None:
    u = torch.randn(2, 50, 32)
    dense = ISTA(dim=32, eta=0.1, lambd=0.0)
    sparse = ISTA(dim=32, eta=0.1, lambd=5.0)
    sparse.D.data.copy_(dense.D.data)
    assert (dense(u) >= 0).all()
    assert (sparse(u) == 0).float().mean() > (dense(u) == 0).float().mean()


def test_init_follows_the_released_model() -> None:
    torch.manual_seed(1)
    layer = EncoderLayer(dim=256, heads=4, eta=0.1, lambd=0.5)
    # Kaiming-uniform with default arguments: bound = sqrt(6 / fan_in); Xavier: sqrt(6 / (fan_in + fan_out)).
    assert layer.ista.D.abs().max() <= (6 / 256) ** 0.5
    assert layer.ista.D.abs().max() > 0.9 * (6 / 256) ** 0.5
    assert layer.attn.U.weight.abs().max() <= (6 / 512) ** 0.5
    assert layer.attn.U.bias is None
    assert (layer.attn.proj.bias == 0).all()
    assert layer.norm1.eps == 1e-5


def test_encoder_layer_is_mssa_residual_then_ista() -> None:
    layer = EncoderLayer(dim=32, heads=2, eta=0.1, lambd=0.5)
    z = torch.randn(2, 7, 32)
    half = z + layer.attn(layer.norm1(z))
    assert_close(layer(z), layer.ista(layer.norm2(half)))


def test_decoder_layer_is_a_then_minus_mssa() -> None:
    layer = DecoderLayer(dim=32, heads=2)
    z = torch.randn(2, 7, 32)
    g = layer.norm1(z) @ layer.A.T
    assert_close(layer(z), g - layer.attn(layer.norm2(g)))


def test_stacks_end_in_a_final_norm() -> None:
    enc = Encoder(dim=32, heads=2, depth=3, eta=0.1, lambd=0.5)
    dec = Decoder(dim=32, heads=2, depth=2)
    assert len(enc.layers) == 3 and len(dec.layers) == 2
    assert enc.norm.eps == 1e-6 and dec.norm.eps == 1e-6
    out = enc(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32)
    assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_set_fused_switches_every_operator_of_a_model_to_its_twin() -> None:
    from crate_mae.config import MAEConfig
    from crate_mae.model import build_mae

    model = build_mae(MAEConfig(variant="nano")).double().eval()
    img, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 64)
    fast = model.forward_masked(img, noise=noise).pred
    set_fused(model, False)
    twins = [m for m in model.modules() if isinstance(m, (MSSA, ISTA))]
    assert len(twins) == 3 + 3 + 3 and not any(m.fused for m in twins)  # 3 encoder MSSA+ISTA, 3 decoder MSSA
    assert_close(model.forward_masked(img, noise=noise).pred, fast)
