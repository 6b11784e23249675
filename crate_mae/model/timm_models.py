"""timm entry points, one per row of `MODELS`, each with a `pretrained_cfg`, built by timm's `build_model_with_cfg`.

| name                                  | what                                                                   |
| ------------------------------------- | ---------------------------------------------------------------------- |
| `crate_mae_<size>`                    | the CRATE-MAE (encoder + decoder), for pretraining and reconstructions |
| `crate_mae_encoder_<size>`            | a classifier on the CRATE-MAE's encoder (family mae)                   |
| `crate_<size>`                        | the seed's supervised CRATE (family supervised)                        |
| `crate_{small,base}_21k_patch8`       | the emergence notebooks' CRATE_small_21k / CRATE_base_21k              |
| `crate_alpha_<asize>_patch{8,14,16,32}` | CRATE-α (family alpha), e.g. the released B/16 and L/14              |
| `crate_alpha_mae_<size>`              | our CRATE-MAE with a CRATE-α encoder (ours, not the paper's)            |

<size> is a row of the size table (nano, demo, tiny, small, base, large; for α also huge, and α's tiny is 192
wide); <asize> is one of CRATE-α's published tiny, small, base, large, huge. Model keywords are `ModelConfig`
fields (num_classes, img_size, heads, lambd, ...), plus timm's `global_pool` ("token" | "avg"),
`drop_path_rate`, `in_chans` (3) and `drop_rate` (0: there is no dropout). No weights are hosted: `pretrained=True` takes a local file of any layout `hub` reads,

    timm.create_model("crate_small_21k_patch8", pretrained=True, pretrained_cfg_overlay=dict(file="small_21k.pth"))

which is read once by the one reader and made by `hub.create_model`, the one way a model is made (its saved config
checked by the one resolver against the keywords: unset ones take the checkpoint's). timm's builder then adds its
`pretrained_cfg` and, with `features_only`, its feature wrapper. Weights that timm itself fetches (`local-dir:`,
`hf-hub:`) are loaded by timm's own path, their keys renamed once (`convert.to_ours`) for the pure
`hub.checkpoint_filter`. `timm.models.save_for_hf(model, DIR)` and `timm.create_model("local-dir:DIR")` round-trip
every model offline.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from crate_mae.config import ClassifierConfig, MAEConfig, ModelConfig
from crate_mae.config.variants import ALPHA_VARIANTS, IMAGE_MEAN, IMAGE_STD, VARIANTS, variants_of
from crate_mae.model.convert import to_ours
from crate_mae.model.files import read_checkpoint
from crate_mae.model.hub import checkpoint_filter, create_model

_logger = logging.getLogger(__name__)
_TIMM_POOL = {"token": "cls", "avg": "mean"}
# timm's feature-extraction keywords, handed to its builder: features_only wraps the model in timm's FeatureGetterNet
# over `forward_intermediates` (NCHW maps of the chosen encoder layers)
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "output_fmt", "norm")


@dataclass(frozen=True)
class TimmRow:
    """One registered name: what it builds (`kind`), its family, its size row and what differs from that row."""

    kind: str  # "mae" | "classifier"
    family: str
    variant: str
    overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 1000

    @property
    def config_class(self) -> type[ModelConfig]:
        return MAEConfig if self.kind == "mae" else ClassifierConfig


def _rows() -> dict[str, TimmRow]:
    rows = {}
    for variant in VARIANTS:
        rows[f"crate_mae_{variant}"] = TimmRow("mae", "mae", variant, num_classes=0)
        rows[f"crate_mae_encoder_{variant}"] = TimmRow("classifier", "mae", variant)
        rows[f"crate_{variant}"] = TimmRow("classifier", "supervised", variant)
    # The emergence notebooks' ImageNet-21k models: CRATE_small_21k has the width of the tiny row.
    rows["crate_small_21k_patch8"] = TimmRow("classifier", "supervised", "tiny", {"patch_size": 8}, 21842)
    rows["crate_base_21k_patch8"] = TimmRow("classifier", "supervised", "base", {"patch_size": 8}, 21842)
    # CRATE-α at its authors' sizes and patches (the released files: B/16 and L/14), and our MAE around its encoder
    for variant in ("tiny", "small", "base", "large", "huge"):
        for patch in (8, 14, 16, 32):
            rows[f"crate_alpha_{variant}_patch{patch}"] = TimmRow("classifier", "alpha", variant, {"patch_size": patch})
    for variant in ALPHA_VARIANTS:
        rows[f"crate_alpha_mae_{variant}"] = TimmRow("mae", "alpha", variant, num_classes=0)
    return rows


MODELS: dict[str, TimmRow] = _rows()


def _pretrained_cfg(row: TimmRow) -> dict[str, Any]:
    size = variants_of(row.family)[row.variant].img_size
    patch = row.overrides.get("patch_size") or variants_of(row.family)[row.variant].patch_size
    cfg = {"input_size": (3, size, size), "crop_pct": 0.875 if size >= 224 else 1.0, "interpolation": "bicubic",
           "mean": IMAGE_MEAN, "std": IMAGE_STD, "num_classes": row.num_classes,
           "first_conv": "patch_embed.proj", "classifier": "head" if row.kind == "classifier" else None,
           "fixed_input_size": False, "license": "mit"}
    if size % 32 == 0 and 32 % patch:  # patch 14: timm's tools shrink an input to 96 or 128 px, which it does not
        cfg["min_input_size"] = (3, 8 * patch, 8 * patch)  # divide; this is the smaller size they take instead
    return cfg


default_cfgs = generate_default_cfgs({name: _pretrained_cfg(row) for name, row in MODELS.items()})


def _config(name: str, row: TimmRow, kwargs: dict[str, Any]) -> ModelConfig:
    """The (unresolved) config a row and timm's keywords ask for: timm's names translated to ours. A classifier's
    class count is the keyword's, else (`hub.resolve_config`) the head of the file loaded, else the row's."""
    kwargs = dict(kwargs)
    if row.kind == "mae" and "num_classes" in kwargs:  # timm's rule for a headless model: the keyword is dropped
        if kwargs.pop("num_classes"):
            encoder = f"crate_alpha_{row.variant}_patch<p>" if row.family == "alpha" else f"crate_mae_encoder_{row.variant}"
            warnings.warn(f"{name}: the CRATE-MAE has no classifier, so num_classes is ignored; {encoder} is the "
                          f"classifier on its encoder", stacklevel=4)
    kwargs.pop("pretrained_model_args", None)  # timm's record of a local-dir file's keywords: passed already
    if "global_pool" in kwargs:
        pool = kwargs.pop("global_pool")
        kwargs["pool"] = _TIMM_POOL.get(pool, pool)
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    if isinstance(kwargs.get("img_size"), (tuple, list)):  # timm passes (H, W) when it rebuilds a model
        size = tuple(kwargs["img_size"])
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"img_size: CRATE models are built for square images, got {size}")
        kwargs["img_size"] = int(size[0])
    if kwargs.pop("drop_rate", 0.0):  # timm's tools (benchmark.py, train.py) pass drop_rate=0.0 to every model
        raise ValueError("drop_rate: CRATE models have no dropout (the released ones have none); drop_path_rate is "
                         "their stochastic depth")
    if kwargs.pop("in_chans", 3) != 3:
        raise ValueError("in_chans: CRATE models take RGB images (3 channels)")
    known = {f.name for f in fields(row.config_class)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unexpected keyword {unknown[0]!r}; the keywords are {row.config_class.__name__}'s fields")
    return row.config_class(**{"family": row.family, "variant": row.variant, **row.overrides, **kwargs})


def _timm_loaded(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """timm's `pretrained_filter_fn` for the weights timm fetches itself (local-dir, hf-hub): keys renamed once,
    then filtered."""
    return checkpoint_filter(to_ours(state), model)


def _entrypoint(name: str, row: TimmRow) -> Callable[..., nn.Module]:
    """`timm.create_model(name, pretrained, **kwargs)`: `hub.create_model`, handed to timm's builder."""
    def create(pretrained: bool = False, *, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
               cache_dir: Any = None, device: Any = None, dtype: Any = None, **kwargs: Any) -> nn.Module:
        features = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}  # timm's builder's, not the model's
        overlay = dict(pretrained_cfg_overlay or {})
        ckpt = read_checkpoint(overlay.pop("file")) if pretrained and overlay.get("file") else None
        source = {**(pretrained_cfg if isinstance(pretrained_cfg, dict) else {}), **overlay}
        if pretrained and ckpt is None and not any(source.get(k) is not None for k in ("state_dict", "file", "url",
                                                                                         "hf_hub_id")):
            raise ValueError(f"{name}: no hosted weights; pass pretrained_cfg_overlay=dict(file='path/to/checkpoint')")
        try:
            model, cfg = create_model(_config(name, row, kwargs), ckpt, default_classes=row.num_classes)
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None
        if ckpt is not None:  # the pretrained_cfg describes the model built: its head follows the keywords
            overlay["num_classes"] = getattr(cfg, "num_classes", 0)
            if row.kind == "classifier" and ckpt.num_classes not in (None, cfg.num_classes):
                _logger.warning(f"{name}: {ckpt.path} has a {ckpt.num_classes}-class head; it is set aside for a new "
                                f"{cfg.num_classes}-class one (num_classes={cfg.num_classes})")
        # timm's builder calls the constructor (the model made above), loads only what timm fetches itself, and adds
        # its pretrained_cfg and feature wrapper; `img_size` is its record of the input size
        model = build_model_with_cfg(lambda **_: model, name, pretrained and ckpt is None,
                                     pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
                                     pretrained_filter_fn=_timm_loaded, pretrained_strict=False,
                                     feature_cfg={"feature_cls": "getter", "out_indices": min(3, cfg.encoder_depth)},
                                     img_size=cfg.img_size, **features)
        return model.to(device=device, dtype=dtype)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{name}: {row.kind} of family {row.family}, size {row.variant} {row.overrides or ''}".strip()
    return create


for _name, _row in MODELS.items():
    globals()[_name] = register_model(_entrypoint(_name, _row))
