"""The two stems (conv patch embedding; patchify → LN → Linear → LN), the two position tables (fixed sin-cos;
learned, interpolated), and patchify / unpatchify.

Legend: B batch, N = h·w patches, d width, p patch side, P = 3·p·p pixels per patch.

Stride. Both stems also take a `stride` s < p, for finer attention maps and masks (the emergence notebooks' patch 8
at stride 4): the p×p patches then overlap, and the token grid (h', w') = ((H − p)/s + 1, (W − p)/s + 1) spans the
same extent as the plain grid (h, w) = (H/p, W/p): token j sits at patch-grid coordinate j·s/p, from 0 to h − 1.
The position tables are evaluated there (`fine=` below). At s = p every path is the plain one, exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module

from crate_mae.config.variants import FAMILIES, IMAGE_MEAN, IMAGE_STD
from crate_mae.errors import InputError


@register_notrace_module  # its checks of the input stay dynamic: FX keeps it whole (a leaf), as timm's own
class Normalize(nn.Module):
    """The first step of every CRATE model, and its input contract, told by the dtype alone:

    - uint8 pixels (B, 3, H, W) in [0, 255], RGB: what every loader and transform of ours hands over, and what the
      viz commands read. They are normalised here, once: float (x/255 − mean) / std with ImageNet's statistics
      (`config.variants.IMAGE_MEAN/STD`, the `mean`/`std` of every timm `pretrained_cfg` of ours).
    - floating-point images (B, 3, H, W) already normalised with those statistics: timm's contract, for timm's own
      tools and transforms (`timm.data.create_transform`), taken as they are.

    Anything else is an `InputError`: another integer dtype (int64 pixels from numpy), or another channel count.
    A float image in [0, 1] (torchvision's `ToTensor`) is not normalised: pass its uint8 pixels
    (`torchvision.transforms.v2.PILToTensor`), or normalise it first (`Normalize(IMAGE_MEAN, IMAGE_STD)`).
    The statistics are non-persistent buffers: they follow `.to(device)` and stay out of state dicts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.dim() != 4 or img.shape[1] != 3:
            raise InputError(f"a CRATE model takes RGB images (B, 3, H, W), got shape {list(img.shape)}")
        if img.dtype == torch.uint8:
            return (img.float() - self.mean) / self.std
        if not img.is_floating_point():
            raise InputError(f"a CRATE model takes uint8 pixels or normalised float images, got {img.dtype}")
        return img


@register_notrace_function  # shape checks that stay dynamic: FX records the call, not its branches
def grid_size(img_hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an image of size (H, W); an error if the patch does not divide it."""
    height, width = img_hw
    if height % patch_size or width % patch_size:
        raise InputError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    return height // patch_size, width // patch_size


@register_notrace_function
def token_grid(img_hw: tuple[int, int], patch_size: int, stride: int | None = None) -> tuple[int, int]:
    """The token grid (h', w') of p×p patches taken every `stride` pixels (None: p, the plain grid `grid_size`).

    An error names the value at fault: the patch must divide the image (the plain grid places the position
    table), 1 ≤ s ≤ p, and s must step from the first patch to the last, i.e. divide H − p and W − p.
    """
    plain = grid_size(img_hw, patch_size)
    if stride is None or stride == patch_size:
        return plain
    if not 1 <= stride <= patch_size:
        raise InputError(f"stride {stride} must be between 1 and the patch size {patch_size}")
    height, width = img_hw
    if (height - patch_size) % stride or (width - patch_size) % stride:
        raise InputError(f"stride {stride} does not step from the first {patch_size}-pixel patch to the last of a "
                         f"{height}x{width} image: H − p = {height - patch_size} and W − p = {width - patch_size} must be multiples of it")
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → d-dim tokens: a p×p stride-p convolution 3→d with bias.

    The weight is Xavier-uniform on its flattened (d, 3·p·p) view, as MAE initialises it, so that
    the convolution starts like the Linear layer it is.
    """

    def __init__(self, *, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, -1))
        nn.init.zeros_(self.proj.bias)

    def num_patches(self, img_size: int) -> int:
        """N for a square image of side img_size."""
        h, w = grid_size((img_size, img_size), self.patch_size)
        return h * w

    def forward(self, img: torch.Tensor, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """img (B, 3, H, W) → tokens (B, N, d) in row-major patch order, and their grid (h, w); with `stride`
        the same convolution taken every s pixels, over overlapping patches: (B, h'·w', d)."""
        grid = token_grid((img.shape[-2], img.shape[-1]), self.patch_size, stride)
        if stride is None or stride == self.patch_size:
            x = self.proj(img)  # (B, d, h, w)
        else:  # the same weights, every s pixels
            x = F.conv2d(img, self.proj.weight, self.proj.bias, stride=stride)  # (B, d, h', w')
        return x.flatten(2).transpose(1, 2), grid  # (B, N, d)


class PatchifyEmbed(nn.Module):
    """The supervised CRATE's stem: patchify (pixel order (row, col, channel)) → LN(P) → Linear(P → d) → LN(d).

    Initialised as released: PyTorch's defaults for the Linear and the LayerNorms (eps 1e-5).
    """

    def __init__(self, *, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        pixels = in_chans * patch_size * patch_size
        self.pre_norm = nn.LayerNorm(pixels)
        self.proj = nn.Linear(pixels, dim)
        self.post_norm = nn.LayerNorm(dim)

    def num_patches(self, img_size: int) -> int:
        """N for a square image of side img_size."""
        h, w = grid_size((img_size, img_size), self.patch_size)
        return h * w

    def forward(self, img: torch.Tensor, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """img (B, 3, H, W) → tokens (B, N, d) in row-major patch order, and their grid (h, w); with `stride`
        the patches overlap (`patchify`'s pixel order kept): (B, h'·w', d)."""
        grid = token_grid((img.shape[-2], img.shape[-1]), self.patch_size, stride)
        if stride is None or stride == self.patch_size:
            x = patchify(img, self.patch_size)  # (B, N, P)
        else:
            b, c, p = img.shape[0], img.shape[1], self.patch_size
            cols = F.unfold(img, kernel_size=p, stride=stride)  # (B, C·p·p, N), pixels in (channel, row, col) order
            x = cols.view(b, c, p, p, -1).permute(0, 4, 2, 3, 1).reshape(b, -1, p * p * c)  # (B, N, P), (row, col, C)
        return self.post_norm(self.proj(self.pre_norm(x))), grid


def resample_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A learned CLS-first position table (1, 1 + h·w, d) resampled to another grid (1, 1 + h'·w', d).

    The patch rows are laid out on their (h, w) grid and interpolated bicubically (align_corners False), as
    the emergence notebooks do for other image sizes and strides; the CLS row is kept as it is. The stored
    grid must be square (every released table is), since a row count alone cannot tell a non-square one.
    """
    n, dim = table.shape[1] - 1, table.shape[2]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"position table of {n} patch rows makes no square grid")
    if (side, side) == tuple(grid):
        return table
    patches = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, d, h, w)
    patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)


def resample_fine(table: torch.Tensor, grid: tuple[int, int], fine: tuple[int, int]) -> torch.Tensor:
    """A CLS-first table for the plain grid (1, 1 + h·w, d) → the strided grid's (1, 1 + h'·w', d).

    Token j of the strided grid sits at coordinate j·(h − 1)/(h' − 1) = j·s/p of the plain one: bicubic sampling
    with align_corners True puts its points exactly there, so every token that coincides with a plain patch
    gets that patch's row unchanged (all of them at s = p).
    """
    if tuple(fine) == tuple(grid):
        return table
    dim = table.shape[2]
    patches = table[:, 1:].reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)  # (1, d, h, w)
    patches = F.interpolate(patches.float(), size=tuple(fine), mode="bicubic", align_corners=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, fine[0] * fine[1], dim).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)


@register_notrace_module  # resampled for the grid at run time: a leaf for FX
class LearnedPosition(nn.Module):
    """The supervised CRATE's learned table (1, 1 + N, d), CLS row first, added once after CLS is prepended.

    `table` is stored for the grid the model was built for; another grid gets it resampled on the fly
    (`resample_table`), a strided one then sampled at its tokens' places (`resample_fine`). Initialised normal
    with std `std`: 1 as the supervised CRATE is released, 0.02 as CRATE-α's training code starts it.
    """

    def __init__(self, *, dim: int, grid: tuple[int, int], std: float = 1.0) -> None:
        super().__init__()
        self.dim, self.grid = dim, tuple(grid)
        self.table = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], dim) * std)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], fine: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, 1 + h·w, d) → x + table (B, 1 + h·w, d); with the strided token grid `fine` (h', w') of the image
        whose plain grid is `grid`, x (B, 1 + h'·w', d)."""
        table = self.table if tuple(grid) == self.grid else resample_table(self.table, grid)
        if fine is not None:
            table = resample_fine(table, grid, fine)
        return x + table.to(x.dtype)

    def set_grid(self, grid: tuple[int, int]) -> None:
        """Keep the table for another grid from now on: resampled once (bicubic, CLS row kept), a new Parameter."""
        if tuple(grid) != self.grid:
            with torch.no_grad():  # a frozen table stays frozen
                self.table = nn.Parameter(resample_table(self.table, grid).contiguous(), self.table.requires_grad)
            self.grid = tuple(grid)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) → (M, dim): [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−2k/dim), k < dim/2."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_table(dim: int, grid: tuple[int, int], cls_token: bool = True,
                     fine: tuple[int, int] | None = None) -> torch.Tensor:
    """The fixed 2-D sin-cos position table (1 + h·w, d), with a zero row for CLS first.

    Channels [0, d/2) encode the patch's column and [d/2, d) its row: MAE's table (its meshgrid
    puts w first), which the released CRATE-MAE checkpoint stores, so the two agree to float
    precision. Rows follow the row-major patch order of `PatchEmbed`. With a strided token grid `fine`
    (h', w'), the (1 + h'·w', d) table at the tokens' fractional places j·(h − 1)/(h' − 1): the sin-cos
    formula evaluated there, which is its exact interpolation.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position table needs a width divisible by 4, got {dim}")
    h, w = grid
    if fine is None or tuple(fine) == tuple(grid):
        row_at, col_at = torch.arange(h), torch.arange(w)
    else:
        row_at = torch.linspace(0, h - 1, fine[0], dtype=torch.float64)
        col_at = torch.linspace(0, w - 1, fine[1], dtype=torch.float64)
    rows, cols = torch.meshgrid(row_at, col_at, indexing="ij")  # (h', w') each
    table = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()  # (1 + h·w, d)


@register_notrace_module  # its table depends on the grid: built at run time, a leaf for FX
class SinCosPosition(nn.Module):
    """Adds the fixed sin-cos table to a CLS-first token sequence, for any patch grid.

    The table for the grid the model was built for is a non-persistent buffer (it is a function
    of (d, h, w), so it never enters a state dict and cannot be trained by mistake); other grids,
    as for a classifier fine-tuned at another resolution, get their table computed on the fly.
    """

    def __init__(self, *, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.dim, self.grid = dim, tuple(grid)
        self.register_buffer("table", sincos_pos_table(dim, self.grid)[None], persistent=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], fine: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, 1 + h·w, d) → x + table (B, 1 + h·w, d); with the strided token grid `fine` (h', w') of the image
        whose plain grid is `grid`, x (B, 1 + h'·w', d)."""
        if tuple(grid) == self.grid and (fine is None or tuple(fine) == tuple(grid)):
            table = self.table
        else:
            table = sincos_pos_table(self.dim, grid, fine=fine)[None].to(x.device)
        return x + table.to(x.dtype)

    def set_grid(self, grid: tuple[int, int]) -> None:
        """Keep the table of another grid as the buffer (the same formula, computed once)."""
        self.grid = tuple(grid)
        self.table = sincos_pos_table(self.dim, self.grid)[None].to(self.table.device)


def prepend_cls(x: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
    """x (B, N, d), cls_token (1, 1, d) → (B, 1 + N, d) with CLS first."""
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)


def patchify(img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """img (B, C, H, W) → (B, h·w, p·p·C), pixels in (row, col, channel) order inside a patch.

    This is the order of the released model's prediction head and MAE's, so `pred` rows line up.
    """
    b, c, _, _ = img.shape
    h, w = grid_size((img.shape[-2], img.shape[-1]), patch_size)
    x = img.reshape(b, c, h, patch_size, w, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(b, h * w, patch_size * patch_size * c)


@register_notrace_function  # its shape check stays dynamic: FX records the call
def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """(B, h·w, p·p·C) → img (B, C, h·p, w·p); the inverse of `patchify`.

    `grid` (h, w) is needed only for non-square grids; a square one is inferred from N.
    """
    b, n, length = x.shape
    if length != patch_size * patch_size * channels:
        raise ValueError(f"patch length {length} != {patch_size}·{patch_size}·{channels}")
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches make no square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(b, channels, h * patch_size, w * patch_size)


class CrateStem(nn.Module):
    """What every CRATE model does before its layers, in one place: the base of CrateMAE and CrateClassifier.

    img (B, 3, H, W) → Normalize → patch embedding (B, N, d) → [masked patches replaced by a mask token] → CLS
    prepended → position table added → tokens (B, 1 + N, d). The family picks the parts (config/variants.py):
    `mae` the conv embedding and the fixed sin-cos table (CLS normal(0.02), as MAE); `supervised` the patchify →
    LN → Linear → LN embedding and the learned table (CLS standard normal, as released); `alpha` the conv embedding
    (Kaiming-uniform) and the learned table (normal(0.02); CLS normal(1e-6)), as CRATE-α's training code starts
    them. The parts keep the top-level names `patch_embed.*`, `cls_token`, `pos.*` that checkpoints use.
    """

    _CLS_STD = {"mae": 0.02, "supervised": 1.0, "alpha": 1e-6}

    def __init__(self, *, family: str, img_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        parts, grid = FAMILIES[family], grid_size((img_size, img_size), patch_size)
        self.family, self.in_chans, self.embed_dim = family, 3, dim  # timm's attributes
        self.normalize = Normalize()  # uint8 pixels in; everything below sees normalised images
        if parts.stem == "conv":
            self.patch_embed = PatchEmbed(patch_size=patch_size, dim=dim)
            if family == "alpha":
                nn.init.kaiming_uniform_(self.patch_embed.proj.weight)
        else:
            self.patch_embed = PatchifyEmbed(patch_size=patch_size, dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=self._CLS_STD[family])
        self.pos = SinCosPosition(dim=dim, grid=grid) if parts.position == "sincos" else \
            LearnedPosition(dim=dim, grid=grid, std=0.02 if family == "alpha" else 1.0)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """timm's `set_input_size`: the position table built for another input size from now on (the learned one
        resampled once and kept as weights; the sin-cos one computed once). Any size the patch divides works without
        it too (the tables follow the grid at run time); the patch is the stem's weights' and cannot change."""
        if patch_size is not None and patch_size != self.patch_size:
            raise InputError(f"patch_size: the stem's weights are for patch {self.patch_size}, got {patch_size}")
        if img_size is None:
            return
        size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
        self.pos.set_grid(grid_size(size, self.patch_size))
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg["input_size"] = (3, *size)

    def token_grid(self, img_hw: tuple[int, int], stride: int | None = None) -> tuple[int, int]:
        """The grid (h, w) of the patch tokens `tokens` makes for an image of size img_hw (`token_grid`)."""
        return token_grid(img_hw, self.patch_size, stride)

    def tokens(self, img: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None, stride: int | None = None) -> torch.Tensor:
        """img (B, 3, H, W), uint8 pixels (or normalised float), mask (B, N) 1 = replace by `mask_token` (1, 1, d)
        → the encoder's input (B, 1 + N, d): patch tokens, CLS first, position table added.

        `stride` s < p: overlapping patches every s pixels and the table at their places (module docstring).
        """
        x, fine = self.patch_embed(self.normalize(img), stride=stride)  # (B, N, d)
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs the mask_token that replaces the masked patches")
            x = torch.where(mask[..., None] != 0, mask_token.to(x.dtype), x)
        grid = grid_size((img.shape[-2], img.shape[-1]), self.patch_size)
        return self.pos(prepend_cls(x, self.cls_token.to(x.dtype)), grid, fine)  # fine == grid: the plain table
