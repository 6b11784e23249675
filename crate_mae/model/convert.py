"""The released checkpoints' key names ↔ ours (docs/MODEL.md, "Key layouts"). Only names and tables here; reading a
file is `crate_mae.model.files`', building and loading a model `crate_mae.model.hub`'s.

    ours = to_ours(state_dict)                               # released (any family) or ours → our key names
    released = to_released(model.state_dict())               # ours → the authors' layout of that family
    layout_of(state)                                         # Layout(source="released", family="supervised")

Two released layouts:
- CRATE-MAE (`blocks.i.layers.0.*`, `decoder_blocks.*`): its two fixed sin-cos tables are not stored by us
  (checked against ours on the way in, regenerated on the way out); the unused `decoder_embed` is dropped.
- the supervised CRATE (`to_patch_embedding.{1,2,3}.*`, `transformer.layers.i.{0,1}.*`, `mlp_head.{0,1}.*`):
  the released CRATE-S wraps it as `{"state_dict": ...}` with `module.` prefixes, the emergence notebooks'
  files as `{"model": ...}`. Its learned table is a parameter of ours too (`pos.table`).
- CRATE-α, the authors' PyTorch port (`conv1.*`, `transformer.layers.i.1.fn.{D,D1}`, `mlp_head.*`): the same
  `transformer.layers` and `mlp_head` names as the supervised CRATE, told apart by `conv1.` and ODL's `D1`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import torch

from crate_mae.model.layers import sincos_pos_table

# (released, ours); {i} is a layer index. One table per family serves both directions.
MAE_KEYS: list[tuple[str, str]] = [
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
# The supervised CRATE and CRATE-α share their authors' ViT-style names for the table, CLS, norms, MSSA and head.
_TABLE_AND_CLS = [("pos_embedding", "pos.table"), ("cls_token", "cls_token")]
_NORMS_AND_MSSA = [
    ("transformer.layers.{i}.0.norm.weight", "encoder.layers.{i}.norm1.weight"),
    ("transformer.layers.{i}.0.norm.bias", "encoder.layers.{i}.norm1.bias"),
    ("transformer.layers.{i}.0.fn.qkv.weight", "encoder.layers.{i}.attn.U.weight"),
    ("transformer.layers.{i}.0.fn.to_out.0.weight", "encoder.layers.{i}.attn.proj.weight"),
    ("transformer.layers.{i}.1.norm.weight", "encoder.layers.{i}.norm2.weight"),
    ("transformer.layers.{i}.1.norm.bias", "encoder.layers.{i}.norm2.bias"),
]
_HEAD = [("mlp_head.0.weight", "fc_norm.weight"), ("mlp_head.0.bias", "fc_norm.bias"),
         ("mlp_head.1.weight", "head.weight"), ("mlp_head.1.bias", "head.bias")]
SUPERVISED_KEYS: list[tuple[str, str]] = [
    ("to_patch_embedding.1.weight", "patch_embed.pre_norm.weight"),
    ("to_patch_embedding.1.bias", "patch_embed.pre_norm.bias"),
    ("to_patch_embedding.2.weight", "patch_embed.proj.weight"),
    ("to_patch_embedding.2.bias", "patch_embed.proj.bias"),
    ("to_patch_embedding.3.weight", "patch_embed.post_norm.weight"),
    ("to_patch_embedding.3.bias", "patch_embed.post_norm.bias"),
    *_TABLE_AND_CLS,
    *_NORMS_AND_MSSA,
    ("transformer.layers.{i}.0.fn.to_out.0.bias", "encoder.layers.{i}.attn.proj.bias"),
    ("transformer.layers.{i}.1.fn.weight", "encoder.layers.{i}.ista.D"),
    *_HEAD,
]
ALPHA_KEYS: list[tuple[str, str]] = [  # MSSA's output Linear has no bias
    ("conv1.weight", "patch_embed.proj.weight"),
    ("conv1.bias", "patch_embed.proj.bias"),
    *_TABLE_AND_CLS,
    *_NORMS_AND_MSSA,
    ("transformer.layers.{i}.1.fn.D", "encoder.layers.{i}.odl.D"),
    ("transformer.layers.{i}.1.fn.D1", "encoder.layers.{i}.odl.D1"),
    *_HEAD,
]
_FAMILY_NAMES = {"mae": "CRATE-MAE", "supervised": "supervised CRATE", "alpha": "CRATE-α"}
POS_TABLE_KEYS = ("pos_embed", "decoder_pos_embed")  # both hold the fixed table; the forward adds the second
UNUSED_KEYS = ("decoder_embed.weight", "decoder_embed.bias")  # not used by the released forward pass
MAE_ONLY_PREFIXES = ("mask_token", "decoder.", "decoder_pred.")  # our keys a classifier does not have
HEAD_PREFIXES = ("fc_norm.", "head.")  # our classifier head (LayerNorm + Linear)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers, in either order
_RELEASED_MAE = ("blocks.", "decoder_blocks.", "decoder_pos_embed", "decoder_embed.")
_RELEASED_SUPERVISED = ("to_patch_embedding.", "transformer.layers.", "mlp_head.", "pos_embedding")
_RELEASED_ALPHA = re.compile(r"conv1\.|transformer\.layers\.\d+\.1\.fn\.D1?$")  # before the supervised names


class Layout(NamedTuple):
    """Where a state dict's names come from (`ours` or `released`), and which family it holds."""

    source: str
    family: str
    telltale: str  # the key that told


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TABLES = {family: ([(_compile(r), o) for r, o in keys], [(_compile(o), r) for r, o in keys])
           for family, keys in (("mae", MAE_KEYS), ("supervised", SUPERVISED_KEYS), ("alpha", ALPHA_KEYS))}


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return None


def unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A bare state dict from a bare, `{"model": ...}`- or `{"state_dict": ...}`-wrapped one, without the
    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    state: Any = checkpoint
    if isinstance(state, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (or {{'model': ...}} / {{'state_dict': ...}}), got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def layout_of(state: Mapping[str, Any]) -> Layout:
    """Which layout and family a bare state dict holds, told by its keys; an error if it is no CRATE layout."""
    for key in state:
        if _RELEASED_ALPHA.match(key):
            return Layout("released", "alpha", key)
    for key in state:
        if ".odl." in key:
            return Layout("ours", "alpha", key)
    for key in state:
        if key.startswith(_RELEASED_MAE):
            return Layout("released", "mae", key)
        if key.startswith(_RELEASED_SUPERVISED):
            return Layout("released", "supervised", key)
    for key in state:
        if key.startswith(("patch_embed.pre_norm.", "pos.table")):
            return Layout("ours", "supervised", key)
    for key in state:
        if key.startswith(("patch_embed.proj.", "encoder.layers.")):
            return Layout("ours", "mae", key)
    first = next(iter(state), None)
    raise ValueError(f"no CRATE layout: key {first!r} is none of ours, the released CRATE-MAE's, the released "
                     f"supervised CRATE's or CRATE-α's" if first is not None else "the checkpoint holds no tensors")


def _check_pos_table(key: str, table: torch.Tensor) -> None:
    """The released CRATE-MAE keeps its position tables fixed; a table unlike ours would be silently wrong."""
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
    """Our key names from a released (any family) or our own state dict (bare or wrapped, prefixes allowed).

    Released CRATE-MAE: keys renamed, `pos_embed` / `decoder_pos_embed` checked against the fixed sin-cos table
    and dropped, `decoder_embed.*` dropped. Released supervised CRATE and CRATE-α: keys renamed. A released-layout
    key that fits nowhere is an error naming it.
    """
    state = unwrap(checkpoint)
    layout = layout_of(state) if state else Layout("ours", "mae", "")
    if layout.source == "ours":
        return state
    to_ours_table = _TABLES[layout.family][0]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if layout.family == "mae" and key in POS_TABLE_KEYS:
            _check_pos_table(key, value)
        elif not (layout.family == "mae" and key in UNUSED_KEYS):
            ours = _rename(key, to_ours_table)
            if ours is None:
                raise ValueError(f"unexpected key '{key}' in a released {_FAMILY_NAMES[layout.family]} checkpoint")
            out[ours] = value
    return out


def to_released(state: Mapping[str, torch.Tensor], *, grid: tuple[int, int] = (14, 14),
                with_decoder_embed: bool = True) -> dict[str, torch.Tensor]:
    """The released layout of our state dict's family, for the authors' code.

    CRATE-MAE: adds both position tables for `grid` (224 px / patch 16 → 14×14) and, if `with_decoder_embed`,
    an identity `decoder_embed` (their forward pass never uses it; their strict load needs it). Supervised
    CRATE and CRATE-α (a classifier): renamed one to one (the learned table is stored already).
    """
    state = unwrap(state)
    family = layout_of(state).family
    table = _TABLES[family][1]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        released = _rename(key, table)
        if released is None:
            raise ValueError(f"unexpected key '{key}' in a {_FAMILY_NAMES[family]} state dict that the authors' "
                             f"layout can hold")
        out[released] = value
    if family == "mae":
        dim = out["cls_token"].shape[-1]
        pos = sincos_pos_table(dim, grid)[None]
        out["pos_embed"], out["decoder_pos_embed"] = pos.clone(), pos.clone()
        if with_decoder_embed:
            out["decoder_embed.weight"], out["decoder_embed.bias"] = torch.eye(dim), torch.zeros(dim)
    return out
