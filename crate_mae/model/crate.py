"""The CRATE operators and the layers built from them (docs/MODEL.md, "The CRATE operators" and "CRATE-α").

Each layer is one step of sparse rate reduction on the token matrix Z (rows are tokens):
MSSA compresses the tokens against H learned subspaces, ISTA sparsifies them in a dictionary D (d, d); CRATE-α's
ODL codes them in an overcomplete dictionary (d, 4d) and decodes them with a second one.
Legend: B batch, N tokens, d width, H heads, p = d/H head width, m = 4d code width. `F.linear(x, W) = x Wᵀ`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint


def xavier_linear(dim_in: int, dim_out: int, *, bias: bool) -> nn.Linear:
    """A Linear with Xavier-uniform weight and zero bias, as the released model initialises all of them."""
    linear = nn.Linear(dim_in, dim_out, bias=bias)
    nn.init.xavier_uniform_(linear.weight)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear


class MSSA(nn.Module):
    """Multi-head subspace self-attention.

    With one shared projection W = Z Uᵀ (queries = keys = values) split into heads W_h (B, H, N, p):
        A_h = softmax(W_h W_hᵀ / √p),   O_h = A_h W_h,   MSSA(Z) = [O_1 … O_H] Wₒᵀ + b.
    The paper writes the output operator as U itself; the released models (and so this one) have a
    separate output Linear `proj`, so that their checkpoints load: with bias in CRATE, without (b = 0) in CRATE-α.
    """

    def __init__(self, *, dim: int, heads: int, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.fused = True  # the fast path (SDPA); False: the explicit softmax, its twin and oracle (as timm's fused_attn)
        self.U = xavier_linear(dim, dim, bias=False)
        self.proj = xavier_linear(dim, dim, bias=proj_bias)

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, d) → W split into heads (B, H, N, p)."""
        b, n, d = z.shape
        return self.U(z).view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        """O (B, H, N, p) → proj(concat heads) (B, N, d)."""
        b, h, n, p = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * p))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, d) → (B, N, d), through fused attention (flash / memory-efficient / cuDNN kernels)."""
        if not self.fused:
            return self.forward_reference(z)
        w = self._project(z)  # (B, H, N, p)
        return self._merge(F.scaled_dot_product_attention(w, w, w))  # default scale 1/√p

    def attention(self, z: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """The explicit attention maps A_h = softmax(W_h W_hᵀ / √p): z (B, N, d) → (B, H, N, N); with `queries` q
        only the first q rows (B, H, q, N), e.g. the CLS token's, without the N × N matrix."""
        w = self._project(z)
        rows = w if queries is None else w[:, :, :queries]
        return torch.softmax(rows @ w.transpose(-2, -1) * w.shape[-1] ** -0.5, dim=-1)

    def forward_reference(self, z: torch.Tensor) -> torch.Tensor:
        """The same output as `forward` through the explicit softmax: the test oracle."""
        return self._merge(self.attention(z) @ self._project(z))


class ISTA(nn.Module):
    """One ISTA step toward a non-negative sparse code of u in the dictionary D (d, d).

    Column-vector notation: ISTA(u) = ReLU(u + η·Dᵀ(u − D u) − η·λ). In row form, with two matrix
    products instead of the released model's three (Dᵀu − DᵀDu = Dᵀ(u − Du) exactly):
        ReLU(u + η·(u − u Dᵀ) D − η·λ).
    D is a bare parameter initialised Kaiming-uniform with PyTorch's default arguments, as released.
    """

    def __init__(self, *, dim: int, eta: float, lambd: float) -> None:
        super().__init__()
        self.D = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.D)
        self.eta, self.lambd = eta, lambd
        self.fused = True  # the two-product form; False: the released three-product form, its twin and oracle

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, N, d) → sparse code (B, N, d)."""
        if not self.fused:
            return self.forward_reference(u)
        residual = u - F.linear(u, self.D)  # (u − D u) in row form, (B, N, d)
        return F.relu(u + self.eta * (residual @ self.D) - self.eta * self.lambd)

    def forward_reference(self, u: torch.Tensor) -> torch.Tensor:
        """The released three-product form ReLU(u + η·(Dᵀu − DᵀDu) − η·λ): the test oracle."""
        d_u = F.linear(u, self.D)  # D u
        grad = F.linear(u, self.D.t()) - F.linear(d_u, self.D.t())  # Dᵀu − DᵀD u
        return F.relu(u + self.eta * grad - self.eta * self.lambd)

    def extra_repr(self) -> str:
        return f"eta={self.eta}, lambd={self.lambd}"


class ODL(nn.Module):
    """CRATE-α's sparse-coding block: two ISTA steps from zero toward a non-negative code z (m = 4d wide) of x in an
    overcomplete dictionary D (d, m), then the code decoded by a second dictionary D1 (d, m). Column form:

        z1 = ReLU(η·Dᵀx − η·λ)
        z2 = ReLU(z1 − η·Dᵀ(D z1 − x) − η·λ)
        ODL(x) = D1 z2

    The fast path reuses the first product for the second step: with a = η·Dᵀx − η·λ, z1 = ReLU(a) and
    z2 = ReLU(z1 + a − η·Dᵀ(D z1)). Four products are the fewest: Dᵀx, D z1, Dᵀ(·) and D1 z2, 2·d·m FLOPs each per
    token; folding DᵀD into one (m, m) matrix would cost 2·m² = 32d² per token, twice its two factors' 4·d·m.
    D and D1 are Kaiming-uniform with fan-in d, as the authors' training code initialises them.
    """

    def __init__(self, *, dim: int, eta: float, lambd: float, ratio: int = 4) -> None:
        super().__init__()
        self.D = nn.Parameter(torch.empty(dim, ratio * dim))
        self.D1 = nn.Parameter(torch.empty(dim, ratio * dim))
        for weight in (self.D, self.D1):
            nn.init.kaiming_uniform_(weight.t())  # torch reads the fan-in of (m, d) as d
        self.eta, self.lambd = eta, lambd
        self.fused = True  # False: the two steps as written above, the twin and oracle of the fast path

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d) → the sparse code z2 (B, N, m)."""
        if not self.fused:
            return self.code_reference(x)
        a = self.eta * (x @ self.D) - self.eta * self.lambd  # η·Dᵀx − η·λ in row form, (B, N, m)
        z1 = F.relu(a)
        return F.relu(z1 + a - self.eta * (F.linear(z1, self.D) @ self.D))

    def code_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The two steps as the authors write them: the test oracle of `code`."""
        z1 = F.relu(self.eta * (x @ self.D) - self.eta * self.lambd)
        grad = (F.linear(z1, self.D) - x) @ self.D  # Dᵀ(D z1 − x) in row form, (B, N, m)
        return F.relu(z1 - self.eta * grad - self.eta * self.lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d) → D1 z2 (B, N, d)."""
        return F.linear(self.code(x), self.D1)

    def extra_repr(self) -> str:
        return f"dim={self.D.shape[0]}, code={self.D.shape[1]}, eta={self.eta}, lambd={self.lambd}"


def set_fused(model: nn.Module, fused: bool) -> None:
    """Choose the fast paths (True) or their plain twins (False) for every MSSA, ISTA and ODL in `model`."""
    for module in model.modules():
        if isinstance(module, (MSSA, ISTA, ODL)):
            module.fused = fused


class LayerTrace(NamedTuple):
    """One encoder layer's tokens: the inputs of its two operators (B, N, d), and its sparse code."""

    mssa_in: torch.Tensor  # LN₁(z)
    ista_in: torch.Tensor  # LN₂(z + MSSA(LN₁(z))), the sparse-coding block's input
    code: torch.Tensor  # the sparse code: ISTA(ista_in) (B, N, d); ODL's z2 (B, N, 4d)


class EncoderLayer(nn.Module):
    """One CRATE layer: z½ = z + MSSA(LN₁(z));  z⁺ = ISTA(LN₂(z½)).

    There is no residual around ISTA: its own `u +` term is the skip, on the normalised input. So
    stochastic depth (`drop_path`, for fine-tuning) can only drop the MSSA branch; ISTA always runs.
    """

    def __init__(self, *, dim: int, heads: int, eta: float, lambd: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # in-layer norms keep PyTorch's eps 1e-5, as released
        self.attn = MSSA(dim=dim, heads=heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.ista = ISTA(dim=dim, eta=eta, lambd=lambd)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, d) → (B, N, d)."""
        z = z + self.drop_path(self.attn(self.norm1(z)))
        return self.ista(self.norm2(z))

    def trace(self, z: torch.Tensor) -> LayerTrace:
        """The same step with its intermediate tokens, for measuring what each operator does (no drop path)."""
        mssa_in = self.norm1(z)
        ista_in = self.norm2(z + self.attn(mssa_in))
        return LayerTrace(mssa_in, ista_in, self.ista(ista_in))


class AlphaLayer(nn.Module):
    """One CRATE-α layer: z½ = z + MSSA(LN₁(z));  z⁺ = z½ + ODL(LN₂(z½)), both norms with eps 1e-6.

    Unlike CRATE's, the sparse-coding block sits in a residual branch, so stochastic depth drops either branch.
    MSSA's output Linear has no bias; U and it start normal with std 0.02, as in the authors' training code.
    """

    def __init__(self, *, dim: int, heads: int, eta: float, lambd: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSSA(dim=dim, heads=heads, proj_bias=False)
        for linear in (self.attn.U, self.attn.proj):
            nn.init.normal_(linear.weight, std=0.02)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.odl = ODL(dim=dim, eta=eta, lambd=lambd)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, d) → (B, N, d)."""
        z = z + self.drop_path(self.attn(self.norm1(z)))
        return z + self.drop_path(self.odl(self.norm2(z)))

    def trace(self, z: torch.Tensor) -> LayerTrace:
        """The same step's operator inputs and ODL's code z2 (no drop path)."""
        mssa_in = self.norm1(z)
        ista_in = self.norm2(z + self.attn(mssa_in))
        return LayerTrace(mssa_in, ista_in, self.odl.code(ista_in))


LAYERS: dict[str, type[nn.Module]] = {"crate": EncoderLayer, "alpha": AlphaLayer}  # a family's `layer`


class DecoderLayer(nn.Module):
    """The approximate inverse of an encoder layer: g = LN₁(z) Aᵀ;  z⁺ = g − MSSA(LN₂(g)).

    A (d, d) undoes the sparse coding (a bare parameter, Kaiming-uniform, as released); the MSSA
    step is then taken backwards (minus instead of plus), expanding what the encoder compressed.
    """

    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.A = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.A)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = MSSA(dim=dim, heads=heads)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, d) → (B, N, d)."""
        g = F.linear(self.norm1(z), self.A)
        return g - self.attn(self.norm2(g))


class LayerStack(nn.Module):
    """Layers applied in order, then a final LayerNorm (eps 1e-6), or none (the supervised CRATE and CRATE-α have none).

    With `grad_checkpointing` (timm's `set_grad_checkpointing`) each layer's activations are recomputed in the
    backward pass instead of kept: the memory of one layer's instead of all of them, the same gradients (the RNG
    state of stochastic depth is replayed).
    """

    def __init__(self, layers: list[nn.Module], *, dim: int, final_norm: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else nn.Identity()
        self.grad_checkpointing = False

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d) → the last layer's output (B, N, d), without the final norm."""
        for layer in self.layers:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d) → (B, N, d)."""
        return self.norm(self.forward_layers(x))


class Encoder(LayerStack):
    """`depth` encoder layers of kind `layer` ("crate": `EncoderLayer`; "alpha": `AlphaLayer`).

    `drop_path` is the stochastic-depth rate of the last layer; earlier layers rise linearly from 0.
    """

    def __init__(self, *, dim: int, heads: int, depth: int, eta: float, lambd: float, drop_path: float = 0.0,
                 final_norm: bool = True, layer: str = "crate") -> None:
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        make = LAYERS[layer]
        super().__init__([make(dim=dim, heads=heads, eta=eta, lambd=lambd, drop_path=r) for r in rates], dim=dim,
                         final_norm=final_norm)


class Decoder(LayerStack):
    """`depth` CRATE decoder layers, with weights of their own (not tied to the encoder's)."""

    def __init__(self, *, dim: int, heads: int, depth: int) -> None:
        super().__init__([DecoderLayer(dim=dim, heads=heads) for _ in range(depth)], dim=dim)
