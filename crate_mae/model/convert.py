"""The released CRATE-MAE checkpoint's key names ↔ ours (SPEC.md, "The released checkpoint's key names").

    mae = load_released_mae("crate_mae_base.pth")            # a ready CrateMAE-Base, loaded strictly
    ours = to_ours(torch.load(path, weights_only=True))      # released or ours → our key names
    released = to_released(mae.state_dict())                 # ours → the authors' layout

Ours differs in three ways: layer keys are named for what they are (`encoder.layers.i.ista.D`
instead of `blocks.i.layers.0.1.fn.weight`); the two fixed sin-cos tables are not stored (they are
checked against ours on the way in and regenerated on the way out); the unused `decoder_embed` is dropped.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn as nn

from crate_mae.model.layers import sincos_pos_table

if TYPE_CHECKING:
    from crate_mae.config import ModelConfig
    from crate_mae.model.mae import CrateMAE

# (released, ours); {i} is a layer index. One table serves both directions.
KEY_TABLE: list[tuple[str, str]] = [
    ("cls_token", "cls_token"),
    ("mask_token", "mask_token"),
    ("patch_embed.proj.weight", "patch_embed.proj.weight"),
    ("patch_embed.proj.bias", "patch_embed.proj.bias"),
    ("blocks.{i}.layers.0.0.norm.weight", "encoder.layers.{i}.norm1.weight"),
    ("blocks.{i}.layers.0.0.norm.bias", "encoder.layers.{i}.norm1.bias"),
    ("blocks.{i}.layers.0.0.fn.qkv.weight", "encoder.layers.{i}.attn.U.weight"),
    ("blocks.{i}.layers.0.0.fn.to_out.0.weight", "encoder.layers.{i}.attn.proj.weight"),
    ("blocks.{i}.layers.0.0.fn.to_out.0.bias", "encoder.layers.{i}.attn.proj.bias"),
    ("blocks.{i}.layers.0.1.norm.weight", "encoder.layers.{i}.norm2.weight"),
    ("blocks.{i}.layers.0.1.norm.bias", "encoder.layers.{i}.norm2.bias"),
    ("blocks.{i}.layers.0.1.fn.weight", "encoder.layers.{i}.ista.D"),
    ("norm.weight", "encoder.norm.weight"),
    ("norm.bias", "encoder.norm.bias"),
    ("decoder_blocks.{i}.layers.0.0.norm.weight", "decoder.layers.{i}.norm1.weight"),
    ("decoder_blocks.{i}.layers.0.0.norm.bias", "decoder.layers.{i}.norm1.bias"),
    ("decoder_blocks.{i}.layers.0.0.fn.weight", "decoder.layers.{i}.A"),
    ("decoder_blocks.{i}.layers.0.1.norm.weight", "decoder.layers.{i}.norm2.weight"),
    ("decoder_blocks.{i}.layers.0.1.norm.bias", "decoder.layers.{i}.norm2.bias"),
    ("decoder_blocks.{i}.layers.0.1.fn.qkv.weight", "decoder.layers.{i}.attn.U.weight"),
    ("decoder_blocks.{i}.layers.0.1.fn.to_out.0.weight", "decoder.layers.{i}.attn.proj.weight"),
    ("decoder_blocks.{i}.layers.0.1.fn.to_out.0.bias", "decoder.layers.{i}.attn.proj.bias"),
    ("decoder_norm.weight", "decoder.norm.weight"),
    ("decoder_norm.bias", "decoder.norm.bias"),
    ("decoder_pred.weight", "decoder_pred.weight"),
    ("decoder_pred.bias", "decoder_pred.bias"),
]
POS_TABLE_KEYS = ("pos_embed", "decoder_pos_embed")  # both hold the fixed table; the forward adds the second
UNUSED_KEYS = ("decoder_embed.weight", "decoder_embed.bias")  # not used by the released forward pass
MAE_ONLY_PREFIXES = ("mask_token", "decoder.", "decoder_pred.")  # our keys a classifier does not have


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_OURS = [(_compile(released), ours) for released, ours in KEY_TABLE]
_TO_RELEASED = [(_compile(ours), released) for released, ours in KEY_TABLE]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return None


def unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A bare state dict from a bare or `{"model": ...}`-wrapped one, without `module.` prefixes (DDP)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (or {{'model': state_dict}}), got {type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def is_released(state: Mapping[str, Any]) -> bool:
    """Whether a (bare) state dict uses the released key names."""
    return any(k.startswith(("blocks.", "decoder_blocks.", "decoder_pos_embed")) for k in state)


def _check_pos_table(key: str, table: torch.Tensor) -> None:
    """The released model keeps its position tables fixed; a table unlike ours would be silently wrong."""
    if table.dim() != 3 or table.shape[0] != 1:
        raise ValueError(f"{key}: expected shape (1, 1 + N, d), got {tuple(table.shape)}")
    n, dim = table.shape[1] - 1, table.shape[2]
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{key}: {n} patch rows make no square grid")
    expected = sincos_pos_table(dim, (side, side))[None]
    error = (table.float() - expected).abs().max().item()
    if error > 1e-4:
        raise ValueError(f"{key}: differs from the fixed 2-D sin-cos table by {error:.3g}; this model keeps the table fixed")


def to_ours(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our key names from a released or our own state dict (bare or wrapped, `module.` prefixes allowed).

    Released keys are renamed; `pos_embed` / `decoder_pos_embed` are checked against the fixed sin-cos
    table and dropped; `decoder_embed.*` is dropped. A released-layout key that fits nowhere is an error.
    """
    state = unwrap(checkpoint)
    if not is_released(state):
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in POS_TABLE_KEYS:
            _check_pos_table(key, value)
        elif key not in UNUSED_KEYS:
            ours = _rename(key, _TO_OURS)
            if ours is None:
                raise ValueError(f"unexpected key '{key}' in a released CRATE-MAE checkpoint")
            out[ours] = value
    return out


def to_released(state: Mapping[str, torch.Tensor], *, grid: tuple[int, int] = (14, 14),
                with_decoder_embed: bool = True) -> dict[str, torch.Tensor]:
    """The released layout from our CRATE-MAE state dict, for the authors' code.

    Adds both position tables for `grid` (224 px / patch 16 → 14×14) and, if `with_decoder_embed`,
    an identity `decoder_embed` (their forward pass never uses it; their strict load needs it).
    """
    state = unwrap(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        released = _rename(key, _TO_RELEASED)
        if released is None:
            raise ValueError(f"unexpected key '{key}' in a CrateMAE state dict")
        out[released] = value
    dim = out["cls_token"].shape[-1]
    table = sincos_pos_table(dim, grid)[None]
    out["pos_embed"], out["decoder_pos_embed"] = table.clone(), table.clone()
    if with_decoder_embed:
        out["decoder_embed.weight"], out["decoder_embed.bias"] = torch.eye(dim), torch.zeros(dim)
    return out


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, allow_missing: set[str] = frozenset()) -> None:
    """load_state_dict(strict=True), but the first key at fault is named on one line.

    Keys in `allow_missing` may be absent (a classifier's fresh head).
    """
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"unexpected key '{key}': the model has no such tensor")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
    missing = sorted(set(own) - set(state) - set(allow_missing))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing key '{missing[0]}'{more}: the checkpoint does not fill the model")
    model.load_state_dict(dict(state), strict=False)


def load_released_mae(path: str | os.PathLike, config: "ModelConfig | None" = None) -> "CrateMAE":
    """A ready `CrateMAE` from a released (or our own) checkpoint file, read with `weights_only=True`.

    `config` gives the size (default: the released base model, d 768, 12 heads, 12 + 12 layers; the
    checkpoint alone cannot tell the number of heads). Every tensor must fit, or the key at fault is named.
    """
    from crate_mae.config import ModelConfig  # imported here: config imports the model package
    from crate_mae.model import build_mae

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    except Exception as err:  # pickle errors, a zip that is not a checkpoint, a truncated file
        raise ValueError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})".splitlines()[0]) from None
    model = build_mae(config or ModelConfig(variant="base"))
    try:
        load_strict(model, to_ours(checkpoint))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return model
