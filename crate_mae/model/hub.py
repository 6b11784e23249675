"""How a model comes into being, in one place: a config resolved once, a class called, one strict load.

    ckpt = read_checkpoint("runs/demo/encoder.pth")                  # model/files.py: the one reader
    cfg = resolve_config(ClassifierConfig(num_classes=10), ckpt)      # every field set; a disagreement is an error
    model = build_model(cfg)                                          # CrateMAE(...) or CrateClassifier(...)
    load_weights(model, ckpt.state, new_head=ckpt.num_classes != 10)  # one strict load_state_dict

or the four lines at once, the one way every part of the package makes a model (the stages, pretrain.init_from, the
monitor, timm's entry points in model/timm_models.py, the viz commands):
`model, cfg = create_model(ClassifierConfig(num_classes=10), "runs/demo/encoder.pth")`.
What you get is told by the config alone: its type (`MAEConfig` → a CrateMAE, `ClassifierConfig` → a
CrateClassifier), its family and its sizes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from crate_mae.config import FUNCTION_FIELDS, SIZE_FIELDS, ClassifierConfig, MAEConfig, ModelConfig
from crate_mae.config.variants import FAMILIES, Variant, match_variant, variants_of
from crate_mae.errors import CheckpointError, ConfigError
from crate_mae.model.classifier import CrateClassifier
from crate_mae.model.convert import HEAD_PREFIXES, MAE_ONLY_PREFIXES, layout_of, to_ours
from crate_mae.model.files import Checkpoint, read_checkpoint
from crate_mae.model.layers import resample_table
from crate_mae.model.mae import CrateMAE

DEFAULT_CLASSES = 1000  # a classifier's head when neither the stage's data nor the checkpoint says


def resolve_config(cfg: ModelConfig, source: Checkpoint | None = None, *, default_family: str = "mae",
                   resume: bool = False, default_classes: int = DEFAULT_CLASSES, data_classes: int = 0) -> ModelConfig:
    """The one function that resolves a model config: `cfg` with every unset field filled, checked against `source`.

    For each field, in order: the value set in `cfg`; else the file's (our files' saved `model` section; for a
    released file, which records no config, what its tensor shapes tell: family, width, depths, patch, image
    size); else the `variant` row (`cfg`'s, else the file's, else the row matching the file's width and depth, else
    base; a variant names a row of the family's table, `variants_of`); else the family's default (η 0.1; λ 0.5 for
    mae, 0.1 for supervised and alpha); the family itself defaults to the file's, else `default_family`. A
    classifier's `num_classes`, the one place it is decided: the value set, else `data_classes` (a stage's data, by
    its manifest), else the file's head (0 for a head's norm without its Linear), else `default_classes` (1000; a
    timm name's own).

    Checked, each an error naming the field (and the file): a field that changes the function of what `cfg` builds
    (`FUNCTION_FIELDS`, the decoder's depth for a CRATE-MAE only), set in `cfg` and recorded otherwise in the file;
    with `resume`, the image size too (the data is cut to it), and a CRATE-MAE's `visible_only` (the run's model;
    otherwise it resolves as the other fields: set, else the file's, else false). A set `variant` stands for its
    row's sizes only against a file that names no variant (a released one); against our files the variant itself is
    compared, and a size the user did not set takes the file's value.
    """
    where = f"{source.path}: " if source is not None else ""
    _check_family(cfg, source)
    own = {f.name for f in dataclasses.fields(cfg)}
    recorded = source.saved_model if source is not None else None  # our files' config; None: released or no file
    saved = (recorded if recorded is not None else source.shapes) if source is not None else {}
    saved = {k: v for k, v in saved.items() if v is not None and k in own and k in (*FUNCTION_FIELDS, "img_size")}
    given = {f: getattr(cfg, f) for f in (*FUNCTION_FIELDS, "img_size") if f in own and getattr(cfg, f) is not None}
    from_row: set[str] = set()
    family = given.get("family") or saved.get("family") or default_family
    if cfg.variant is not None and "variant" not in saved:  # the row's sizes stand for the set variant
        from_row = {name for name in SIZE_FIELDS if name in own and name not in given}
        given |= {name: getattr(_row(cfg.variant, family, where), name) for name in from_row}
    check = [f for f in FUNCTION_FIELDS if f in own] + (["img_size"] if resume else [])
    if source is not None and recorded is None:
        check = ["family"]  # a released file: its sizes are checked by the strict load, tensor by tensor
    for name in check:
        if name in given and name in saved and given[name] != saved[name]:
            how = f" (from model.variant {cfg.variant!r})" if name in from_row else ""
            raise ConfigError(f"{where}model.{name} is {saved[name]!r} in the checkpoint but {given[name]!r} in the "
                              f"config{how}; leave it unset to use the checkpoint's value")
    values = _defaults({**saved, **given}, saved, own, where, default_family)
    if isinstance(cfg, MAEConfig):
        values["visible_only"] = _visible_only(cfg.visible_only, recorded, resume, where)
    if isinstance(cfg, ClassifierConfig) and cfg.num_classes is None:
        held = source.num_classes if source is not None else None  # 0: a classifier saved without its Linear
        values["num_classes"] = data_classes or (held if held is not None else default_classes)
    try:
        return dataclasses.replace(cfg, **values)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def _visible_only(given: bool | None, recorded: Mapping[str, Any] | None, resume: bool, where: str) -> bool:
    """`MAEConfig.visible_only` resolved: the value set, else the file's (false for a released file and for ours
    written before the option: their encoder saw every token), else false. The weights are the same either way, so a
    new run from a file (init_from, a probe, the viz commands) may set either; a resume may not flip it (the run
    would change its model mid-way): a ConfigError naming the key."""
    held = bool(recorded.get("visible_only") or False) if recorded is not None else False
    if given is None:
        return held
    if resume and given != held:
        raise ConfigError(f"{where}model.visible_only is {str(held).lower()} in the checkpoint but "
                          f"{str(given).lower()} in the config: a resume continues the run's model; leave it unset to "
                          f"continue, or start a new run from this file (pretrain.init_from)")
    return given


def _defaults(values: dict[str, Any], saved: dict[str, Any], own: set[str], where: str,
              default_family: str) -> dict[str, Any]:
    """`values` (set or the file's) completed: sizes from the variant row, the family and its η and λ, the variant."""
    variant, name = values.get("variant"), values.setdefault("family", default_family)
    if variant is None and "dim" in saved and "encoder_depth" in saved:  # a released file: its heads from the row
        variant = match_variant(saved["dim"], saved["encoder_depth"], name)
    if variant is None and saved and "heads" not in values:
        raise ConfigError(f"{where}model.heads: the checkpoint does not record its number of heads, and no row of the "
                          f"family {name}'s size table has d={values.get('dim')} with {values.get('encoder_depth')} "
                          f"layers; set model.heads (or model.variant)")
    row = _row(variant or "base", name, where)
    values |= {field: getattr(row, field) for field in SIZE_FIELDS if field in own and field not in values}
    family = FAMILIES[name]
    values.setdefault("eta", family.eta)
    values.setdefault("lambd", family.lambd)
    values["variant"] = variant if variant is not None else (None if saved else "base")
    return values


def _row(variant: str, family: str, where: str) -> Variant:
    """The size row `variant` names in `family`'s table; a ConfigError naming the key where it has none."""
    rows = variants_of(family)
    if variant not in rows:
        raise ConfigError(f"{where}model.variant: family {family} has no variant {variant!r}; choose one of "
                          f"{', '.join(rows)}")
    return rows[variant]


def _check_family(cfg: ModelConfig, source: Checkpoint | None) -> None:
    """A CRATE-MAE needs a family with one (mae, alpha) and a file of it; a set family must be the file's. Errors
    name the key that tells."""
    if source is None:  # a set family is checked by MAEConfig itself
        return
    if isinstance(cfg, MAEConfig) and not FAMILIES[source.layout.family].masked:
        raise CheckpointError(f"{source.path}: holds {source.describe()} (key '{source.layout.telltale}'), which has no "
                              f"decoder; reconstructions need a CRATE-MAE (final.pth, ckpt-*.pth or the released CRATE-MAE)")
    if cfg.family is not None and cfg.family != source.layout.family:
        raise CheckpointError(f"{source.path}: holds {source.describe()} (key '{source.layout.telltale}'), but "
                              f"model.family is {cfg.family!r}")


def build_model(cfg: ModelConfig) -> CrateMAE | CrateClassifier:
    """A freshly initialised model of a resolved config: its class called directly, with exactly the config's fields."""
    if not cfg.resolved:
        raise ConfigError("build_model: the model config is not resolved (crate_mae.model.hub.resolve_config)")
    model: CrateMAE | CrateClassifier
    if isinstance(cfg, MAEConfig):
        model = CrateMAE(family=cfg.family, img_size=cfg.img_size, patch_size=cfg.patch_size, dim=cfg.dim,
                         heads=cfg.heads, encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth, eta=cfg.eta,
                         lambd=cfg.lambd, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss,
                         visible_only=bool(cfg.visible_only))
    elif isinstance(cfg, ClassifierConfig):
        model = CrateClassifier(family=cfg.family, num_classes=cfg.num_classes, img_size=cfg.img_size,
                                patch_size=cfg.patch_size, dim=cfg.dim, heads=cfg.heads, depth=cfg.encoder_depth,
                                eta=cfg.eta, lambd=cfg.lambd, pool=cfg.pool, drop_path=cfg.drop_path)
    else:
        raise TypeError(f"build_model: a MAEConfig or a ClassifierConfig, got {type(cfg).__name__}")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def _strict(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], allow_missing: set[str]) -> None:
    """The first key at fault, on one line: unexpected, of another shape, or missing."""
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"unexpected key '{key}': the model has no such tensor")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)}, model "
                                  f"{tuple(own[key].shape)}")
    missing = sorted(set(own) - set(state) - allow_missing)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing key '{missing[0]}'{more}: the checkpoint does not fill the model")


def checkpoint_filter(state: Mapping[str, torch.Tensor], model: nn.Module, *, new_head: bool = False,
                      fresh_decoder: bool = False) -> dict[str, torch.Tensor]:
    """A state dict under our key names (`Checkpoint.state`; `convert.to_ours` of any other layout) → exactly `model`'s
    state dict, checked strictly. Pure: it reads the model's own tensors' names and shapes and changes nothing.

    - the family must be the model's (an error naming the key that tells);
    - a CrateClassifier sets the CRATE-MAE's decoder side aside; a CrateMAE needs it (an encoder export has none),
      unless `fresh_decoder`: then a file without one (an encoder, or a classifier, whose head is set aside) fills
      the encoder and leaves the decoder side as initialised;
    - a learned position table of another grid is resampled to the model's (bicubic, CLS row kept);
    - the head (LayerNorm + Linear) may be absent (an encoder); with `new_head` the file's Linear head is set aside
      (a dataset of another class count), otherwise one of another shape is an error;
    - then every tensor must fit: an unexpected key, another shape or a missing key is named.
    """
    own = model.state_dict()
    family = layout_of(state).family if state else "mae"
    if family != model.family:
        raise CheckpointError(f"a {family} checkpoint (key '{layout_of(state).telltale}') cannot fill a "
                              f"{model.family}-family model")
    state = dict(state)
    if "pos.table" in state and hasattr(model.pos, "grid"):
        state["pos.table"] = resample_table(state["pos.table"], model.pos.grid)
    if isinstance(model, CrateMAE):
        head = next((k for k in state if k.startswith(HEAD_PREFIXES)), None)
        if head is not None and fresh_decoder and not any(k.startswith(MAE_ONLY_PREFIXES) for k in state):
            state, head = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}, None  # a classifier
        if head is not None:
            raise CheckpointError(f"holds a classifier head (key '{head}'): a CRATE-MAE is filled from a CRATE-MAE "
                                  f"(final.pth, ckpt-*.pth, the released file) or an encoder (encoder.pth)")
        if any(k.startswith(MAE_ONLY_PREFIXES) for k in state):
            _strict(own, state, set())
        elif fresh_decoder:
            _strict(own, state, {k for k in own if k.startswith(MAE_ONLY_PREFIXES)})
        else:
            raise CheckpointError("holds no decoder (an exported encoder?); a CRATE-MAE needs final.pth or ckpt-*.pth")
        return state
    state = {k: v for k, v in state.items() if not k.startswith(MAE_ONLY_PREFIXES)}
    head_keys = {k for k in own if k.startswith(HEAD_PREFIXES)}
    allow = head_keys if not any(k.startswith(HEAD_PREFIXES) for k in state) else set()
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        allow = allow | {k for k in head_keys if k.startswith("head.")}
    _strict(own, state, allow)
    return state


def load_weights(model: nn.Module, state: Mapping[str, Any], *, new_head: bool = False,
                 fresh_decoder: bool = False) -> None:
    """Fill `model` from a state dict of any supported layout (bare or wrapped, released or ours): its keys renamed
    to ours (`to_ours`, once), `checkpoint_filter`, then one `load_state_dict`."""
    filtered = checkpoint_filter(to_ours(state), model, new_head=new_head, fresh_decoder=fresh_decoder)
    model.load_state_dict(filtered, strict=False)  # strict: checked by the filter, which names the key at fault


def create_model(cfg: ModelConfig, checkpoint: str | os.PathLike | Checkpoint | None = None, *,
                 default_family: str = "mae", default_classes: int = DEFAULT_CLASSES,
                 fresh_decoder: bool = False) -> tuple[CrateMAE | CrateClassifier, ModelConfig]:
    """The one way a model is made (the stages, pretrain.init_from, the monitor's classifier on the MAE's encoder,
    timm's entry points, the viz commands): the file read (once, unless handed read), the config resolved
    (`resolve_config`: a config a stage resolved already against the same file comes back as it was), the class
    built, the file's tensors loaded (once, strictly). Returns the model and the config it was built from.

    A classifier whose class count differs from the file's head gets a new head (the rest is loaded strictly);
    `fresh_decoder` lets an encoder alone fill a CrateMAE (pretrain.init_from), its decoder side as initialised.
    """
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    resolved = resolve_config(cfg, ckpt, default_family=default_family, default_classes=default_classes)
    model = build_model(resolved)
    if ckpt is not None:
        new_head = isinstance(resolved, ClassifierConfig) and ckpt.num_classes not in (None, resolved.num_classes)
        try:  # the Checkpoint's tensors are under our names already: no second conversion
            state = checkpoint_filter(ckpt.state, model, new_head=new_head, fresh_decoder=fresh_decoder)
        except CheckpointError as err:
            raise CheckpointError(f"{ckpt.path}: {err}") from None
        model.load_state_dict(state, strict=False)  # strict: checked by the filter, which names the key at fault
    return model, resolved
