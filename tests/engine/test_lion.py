"""ForeachLion against lion-pytorch's Lion: same parameters step for step, groups, skipped params, resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from lion_pytorch import Lion

from crate_mae.engine.lion import ForeachLion


def _model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).to(device, dtype)


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.1, "lr": 3e-3, "lr_scale": 0.5},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int, device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters())
    x = torch.randn(5, 8, generator=g).to(device, p0.dtype)
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _assert_same(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m, n=name: f"{n}: {m}", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_lion_pytorch(dtype: torch.dtype) -> None:
    ref = _model(dtype)
    new = copy.deepcopy(ref)
    opt_ref = Lion(_groups(ref), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05)
    opt_new = ForeachLion(_groups(new), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05)
    for s in range(5):
        _step(ref, opt_ref, s)
        _step(new, opt_new, s)
        _assert_same(ref, new, rtol=0, atol=0)  # bit-exact on CPU
    assert opt_new.param_groups[0]["lr_scale"] == 0.5
    for pr, pn in zip(ref.parameters(), new.parameters()):
        torch.testing.assert_close(opt_ref.state[pr]["exp_avg"], opt_new.state[pn]["exp_avg"], rtol=0, atol=0)


def test_mixed_dtype_group_and_closure() -> None:
    a, b = _model(torch.float32), _model(torch.float64)
    params = list(a.parameters()) + list(b.parameters())
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt, opt_ref = ForeachLion(params, lr=1e-2, weight_decay=0.1), Lion(ref_params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for p, r in zip(params, ref_params):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        assert opt.step(lambda: 1.5) == 1.5
        opt_ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=0, atol=0)


def test_params_without_grad_are_skipped() -> None:
    model = _model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = ForeachLion(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(2):
        _step(model, opt, s)
    torch.testing.assert_close(frozen, before, rtol=0, atol=0)
    assert frozen not in opt.state
    assert all("exp_avg" in opt.state[p] for p in model.parameters() if p is not frozen)


def test_state_dict_round_trip() -> None:
    model = _model()
    opt = ForeachLion(_groups(model), lr=1e-3, weight_decay=0.05)
    for s in range(2):
        _step(model, opt, s)
    resumed = copy.deepcopy(model)
    opt2 = ForeachLion(_groups(resumed), lr=1e-3, weight_decay=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lr_scale"] == 0.5 and opt2.param_groups[0]["lr"] == 3e-3
    for s in range(2, 5):
        _step(model, opt, s)
        _step(resumed, opt2, s)
    _assert_same(model, resumed, rtol=0, atol=0)


def test_invalid_hyperparameters() -> None:
    with pytest.raises(ValueError):
        ForeachLion(_model().parameters(), lr=0.0)
    with pytest.raises(ValueError):
        ForeachLion(_model().parameters(), betas=(0.9, 1.5))


@pytest.mark.gpu
def test_matches_lion_pytorch_cuda_bf16() -> None:
    ref = _model(torch.bfloat16, "cuda")
    new = copy.deepcopy(ref)
    opt_ref = Lion(_groups(ref), lr=1e-3, weight_decay=0.05)
    opt_new = ForeachLion(_groups(new), lr=1e-3, weight_decay=0.05)
    for s in range(5):
        _step(ref, opt_ref, s, "cuda")
        _step(new, opt_new, s, "cuda")
    # bf16 has an 8-bit mantissa; a sign flip of a near-zero update moves an entry by 2 lr.
    _assert_same(ref, new, rtol=1.6e-2, atol=2e-2)


def test_fallbacks_without_torch_grouping_or_foreach_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    import crate_mae.engine.lion as lion_mod

    monkeypatch.setattr(lion_mod, "_torch_group", None)
    monkeypatch.delattr(torch, "_foreach_sign_")
    ref = _model()
    new = copy.deepcopy(ref)
    opt_ref = Lion(_groups(ref), lr=1e-3, weight_decay=0.05)
    opt_new = ForeachLion(_groups(new), lr=1e-3, weight_decay=0.05)
    for s in range(3):
        _step(ref, opt_ref, s)
        _step(new, opt_new, s)
    _assert_same(ref, new, rtol=0, atol=0)
