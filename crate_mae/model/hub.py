"""The one way from a weight file to a model: read, detect the layout, resolve the config, build through timm, load strictly.

    model, cfg = create_model(ModelConfig(), kind="classifier", checkpoint="runs/demo/encoder.pth", num_classes=10)
    ckpt = read_checkpoint("crate_small_21k.pth")        # Checkpoint: our key names, layout, saved config, shapes

Files: ours (`final.pth`, `ckpt-*.pth`, `encoder.pth`, a `.safetensors` export with the config in its metadata),
the released CRATE-MAE, the released supervised CRATE (`{"state_dict": ...}`, `module.` prefixes) and the
emergence notebooks' files (`{"model": ...}`), all read with `weights_only=True`. The family comes from the
keys, the sizes from the shapes; our files also carry their model config, which is checked against the
stage's (`ModelConfig.resolve`): a field set on both sides that differs is an error naming it, an unset
field takes the checkpoint's value. Every consumer (the probes, fine-tuning, the viz commands, and timm's
`pretrained=True` through `checkpoint_filter`) goes through here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from crate_mae.config import FUNCTION_FIELDS, ConfigError, ModelConfig
from crate_mae.model.convert import HEAD_PREFIXES, MAE_ONLY_PREFIXES, Layout, layout_of, to_ours, unwrap
from crate_mae.model.layers import resample_table

Kind = Literal["mae", "classifier"]
SAFETENSORS_CONFIG_KEY = "crate_mae_config"  # the metadata entry of our .safetensors exports


@dataclass
class Checkpoint:
    """A weight file, read: its tensors under our key names, and what it says about the model."""

    path: str
    state: dict[str, torch.Tensor]
    layout: Layout
    saved: dict[str, Any] | None  # our files' saved `model` config section; None for released files
    shapes: dict[str, Any]  # what the tensors tell: family, dim, depths, patch_size (img_size for learned tables)
    num_classes: int | None  # classes of the head it holds; None: no head (a CRATE-MAE or an encoder)

    @property
    def has_decoder(self) -> bool:
        return any(k.startswith("decoder.") for k in self.state)

    def describe(self) -> str:
        """'our CRATE-MAE encoder', 'a released supervised CRATE', ..."""
        if self.layout.family == "supervised":
            what = "supervised CRATE"
        else:
            what = "CRATE-MAE" if self.has_decoder else "CRATE-MAE " + ("classifier" if self.num_classes else "encoder")
        return f"our {what}" if self.layout.source == "ours" else f"a released {what}"


def _load_file(path: str) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """(the stored object, the config a .safetensors export carries), with one-line errors naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads(meta[SAFETENSORS_CONFIG_KEY]) if SAFETENSORS_CONFIG_KEY in meta else None
            return tensors, config
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:  # pickle errors, a zip that is not a checkpoint, a truncated file, bad JSON
        raise ValueError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})".splitlines()[0]) from None


def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def shapes_of(state: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    """The model fields a state dict (our names) tells by its shapes alone; heads, λ and η it cannot tell."""
    out: dict[str, Any] = {"family": family}
    if "cls_token" in state:
        out["dim"] = int(state["cls_token"].shape[-1])
    if (depth := _count_layers(state, "encoder.layers.")):
        out["encoder_depth"] = depth
    if (depth := _count_layers(state, "decoder.layers.")):
        out["decoder_depth"] = depth
    if family == "mae" and "patch_embed.proj.weight" in state:
        out["patch_size"] = int(state["patch_embed.proj.weight"].shape[-1])
    elif family == "supervised" and "patch_embed.pre_norm.weight" in state:
        out["patch_size"] = int(round((state["patch_embed.pre_norm.weight"].shape[0] / 3) ** 0.5))
    if "pos.table" in state and "patch_size" in out:
        side = int(round((state["pos.table"].shape[1] - 1) ** 0.5))
        out["img_size"] = side * out["patch_size"]
    return out


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A weight file of any supported layout, its tensors renamed to ours; one-line errors name the file."""
    path = str(path)
    stored, config = _load_file(path)
    if isinstance(stored, Mapping) and isinstance(stored.get("config"), Mapping):
        config = dict(stored["config"])
    try:
        raw = unwrap(stored)
        layout = layout_of(raw)
        state = to_ours(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    saved = dict(config["model"]) if config and isinstance(config.get("model"), Mapping) else None
    if saved is not None:
        saved.setdefault("family", "mae")  # files written before the supervised family existed are CRATE-MAEs
    head = state.get("head.weight")
    return Checkpoint(path, state, layout, saved, shapes_of(state, layout.family),
                      int(head.shape[0]) if head is not None else None)


def model_config(cfg: ModelConfig, ckpt: Checkpoint | None, *, kind: Kind, default_family: str = "mae") -> ModelConfig:
    """`cfg` resolved against what `ckpt` says (ModelConfig.resolve); a disagreement names the file and field.

    Our files are compared on every field that changes the function (a classifier ignores the decoder's
    depth); released files carry no config, so only their family is compared here, and their sizes are
    checked by the strict load, which names the tensor and both shapes.
    """
    if kind == "mae" and (cfg.family or "mae") != "mae":
        raise ConfigError(f"model.family: a CRATE-MAE is of family mae, got {cfg.family!r}")
    if ckpt is None:
        return cfg.resolve(default_family=default_family)
    if kind == "mae" and ckpt.layout.family != "mae":
        raise ValueError(f"{ckpt.path}: holds {ckpt.describe()} (key '{ckpt.layout.telltale}'), which has no decoder; "
                         f"reconstructions need a CRATE-MAE (final.pth, ckpt-*.pth or the released CRATE-MAE)")
    if cfg.family is not None and cfg.family != ckpt.layout.family:
        raise ValueError(f"{ckpt.path}: holds {ckpt.describe()} (key '{ckpt.layout.telltale}'), but model.family is "
                         f"{cfg.family!r}")
    try:
        if ckpt.saved is not None:
            check = tuple(f for f in FUNCTION_FIELDS if kind == "mae" or f != "decoder_depth")
            saved = {k: v for k, v in ckpt.saved.items() if k in (*FUNCTION_FIELDS, "img_size")}
            return cfg.resolve(saved, check=check)
        return cfg.resolve(ckpt.shapes, check=("family",))
    except ConfigError as err:
        raise ConfigError(f"{ckpt.path}: {err}") from None


def _strict(model: nn.Module, state: dict[str, torch.Tensor], allow_missing: set[str]) -> None:
    """The first key at fault, on one line: unexpected, of another shape, or missing."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"unexpected key '{key}': the model has no such tensor")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
    missing = sorted(set(own) - set(state) - allow_missing)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing key '{missing[0]}'{more}: the checkpoint does not fill the model")


def checkpoint_filter(state_dict: Mapping[str, Any], model: nn.Module, *, new_head: bool | None = None
                      ) -> dict[str, torch.Tensor]:
    """timm's `pretrained_filter_fn`: any supported layout → exactly the model's state dict, checked strictly.

    - the family must be the model's (an error naming the key that tells);
    - a classifier sets the CRATE-MAE's decoder side aside; a CrateMAE needs it (an encoder export has none);
    - a learned position table of another grid is resampled to the model's (bicubic, CLS row kept);
    - the head (LayerNorm + Linear) may be absent (an encoder), and one of another class count is dropped
      only for a new head: `new_head`, or by default timm's rule, the model's num_classes differing from the
      pretrained_cfg's (the checkpoint's);
    - then every tensor must fit: an unexpected key, another shape or a missing key is named.
    """
    state = to_ours(state_dict)
    family = layout_of(state).family if state else "mae"
    is_mae = not hasattr(model, "head_keys")
    own_family = "mae" if is_mae else model.family
    if family != own_family:
        key = layout_of(state).telltale
        raise ValueError(f"a {family} checkpoint (key '{key}') cannot fill a {own_family}-family model")
    if is_mae:
        if not any(k.startswith("decoder.") for k in state):
            raise ValueError("holds no decoder (an exported encoder?); a CRATE-MAE needs final.pth or ckpt-*.pth")
        allow: set[str] = set()
    else:
        state = {k: v for k, v in state.items() if not k.startswith(MAE_ONLY_PREFIXES)}
        allow = model.head_keys() if not any(k.startswith(HEAD_PREFIXES) for k in state) else set()
        head, own_head = state.get("head.weight"), model.state_dict().get("head.weight")
        if head is not None and (own_head is None or head.shape != own_head.shape):
            if new_head is None:
                new_head = model.num_classes != (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
            if not new_head:
                _strict(model, {k: v for k, v in state.items() if not k.startswith("head.")},
                        {k for k in model.head_keys() if k.startswith("head.")})  # a wrong size is named first
                raise ValueError(f"shape mismatch for 'head.weight': checkpoint {tuple(head.shape)}, model "
                                 f"{tuple(own_head.shape) if own_head is not None else 'no head'}; a new head is made "
                                 f"only when asked for (num_classes of another dataset)")
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            allow = {k for k in model.head_keys() if k.startswith("head.")}
        if "pos.table" in state and hasattr(model.pos, "grid"):
            state["pos.table"] = resample_table(state["pos.table"], model.pos.grid)
    _strict(model, state, allow)
    return state


def load_weights(model: nn.Module, checkpoint: Mapping[str, Any], *, new_head: bool = False) -> None:
    """Fill `model` from a state dict of any supported layout, strictly (`checkpoint_filter`), in place."""
    model.load_state_dict(checkpoint_filter(checkpoint, model, new_head=new_head), strict=False)


def create_model(cfg: ModelConfig, *, kind: Kind, checkpoint: str | os.PathLike | Checkpoint | None = None,
                 num_classes: int | None = None, default_family: str = "mae") -> tuple[nn.Module, ModelConfig]:
    """A CrateMAE or classifier and the config it was built from (every field set), weights from `checkpoint`.

    The config is `cfg` resolved against the checkpoint (`model_config`). A classifier's class count is
    `num_classes` (a new head where the checkpoint's differs), else the checkpoint's head's, else the config's.
    The model is built by `timm.create_model` and filled through timm's pretrained path with
    `checkpoint_filter`, so it carries its `pretrained_cfg` and saves with `timm.models.save_for_hf`.
    """
    import timm

    from crate_mae.model.timm_models import model_args, name_for

    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    resolved = model_config(cfg, ckpt, kind=kind, default_family=default_family)
    classes = num_classes if num_classes is not None else (ckpt.num_classes if ckpt is not None and ckpt.num_classes
                                                           else resolved.num_classes)
    resolved = replace(resolved, num_classes=classes)
    overlay = None
    if ckpt is not None:
        overlay = {"state_dict": ckpt.state, "num_classes": ckpt.num_classes or classes}
    try:
        model = timm.create_model(name_for(resolved, kind), pretrained=ckpt is not None, pretrained_cfg_overlay=overlay,
                                  **model_args(resolved, kind))
    except ValueError as err:
        raise ValueError(f"{ckpt.path}: {err}" if ckpt is not None else str(err)) from None
    return model, resolved


def save_safetensors(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, path: str | os.PathLike) -> None:
    """A `.safetensors` export of a state dict (our key names), with the run's config (JSON) in its metadata, so
    that `read_checkpoint` checks it as it checks our `.pth` files. Written atomically."""
    from safetensors.torch import save_file

    from crate_mae.atomic import atomic_path

    tensors = {k: v.detach().contiguous().cpu() for k, v in unwrap(state).items()}
    metadata = {SAFETENSORS_CONFIG_KEY: json.dumps(dict(config))} if config else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
