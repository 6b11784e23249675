"""timm entry points, one per row of `MODELS`, each with a `pretrained_cfg`, built by timm's `build_model_with_cfg`.

| name                                  | what                                                                   |
| ------------------------------------- | ---------------------------------------------------------------------- |
| `crate_mae_<size>`                    | the CRATE-MAE (encoder + decoder), for pretraining and reconstructions |
| `crate_mae_encoder_<size>`            | a classifier on the CRATE-MAE's encoder (family mae)                   |
| `crate_<size>`                        | the seed's supervised CRATE (family supervised)                        |
| `crate_{small,base}_21k_patch8`       | the emergence notebooks' CRATE_small_21k / CRATE_base_21k              |

<size> is a row of the size table (nano, demo, tiny, small, base, large). Model keywords are `ModelConfig`
fields (num_classes, img_size, heads, lambd, ...), plus timm's `global_pool` ("token" | "avg") and
`drop_path_rate`. No weights are hosted: `pretrained=True` takes a local file of any layout `hub` reads,

    timm.create_model("crate_small_21k_patch8", pretrained=True, pretrained_cfg_overlay=dict(file="small_21k.pth"))

which is read once (its saved config checked against the keywords: unset ones take the checkpoint's), then
loaded through timm's own path with `hub.checkpoint_filter`. `timm.models.save_for_hf(model, DIR)` and
`timm.create_model("local-dir:DIR")` round-trip every model offline.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from crate_mae.config import ModelConfig
from crate_mae.config.variants import IMAGE_MEAN, IMAGE_STD, VARIANTS
from crate_mae.model import hub

_TIMM_POOL = {"token": "cls", "avg": "mean"}
_CONFIG_FIELDS = {f.name for f in fields(ModelConfig)}


@dataclass(frozen=True)
class TimmRow:
    """One registered name: what it builds (`kind`), its family, its size row and what differs from that row."""

    kind: str  # "mae" | "classifier"
    family: str
    variant: str
    overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 1000


def _rows() -> dict[str, TimmRow]:
    rows = {}
    for variant in VARIANTS:
        rows[f"crate_mae_{variant}"] = TimmRow("mae", "mae", variant, num_classes=0)
        rows[f"crate_mae_encoder_{variant}"] = TimmRow("classifier", "mae", variant)
        rows[f"crate_{variant}"] = TimmRow("classifier", "supervised", variant)
    # The emergence notebooks' ImageNet-21k models: CRATE_small_21k has the width of the tiny row.
    rows["crate_small_21k_patch8"] = TimmRow("classifier", "supervised", "tiny", {"patch_size": 8}, 21842)
    rows["crate_base_21k_patch8"] = TimmRow("classifier", "supervised", "base", {"patch_size": 8}, 21842)
    return rows


MODELS: dict[str, TimmRow] = _rows()


def _pretrained_cfg(row: TimmRow) -> dict[str, Any]:
    size = VARIANTS[row.variant].img_size
    return {"input_size": (3, size, size), "crop_pct": 0.875 if size >= 224 else 1.0, "interpolation": "bicubic",
            "mean": IMAGE_MEAN, "std": IMAGE_STD, "num_classes": row.num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head" if row.kind == "classifier" else None,
            "fixed_input_size": False, "license": "mit"}


default_cfgs = generate_default_cfgs({name: _pretrained_cfg(row) for name, row in MODELS.items()})


def name_for(cfg: ModelConfig, kind: str) -> str:
    """The registered name for a resolved config: the row of its family and variant (21k rows by patch and classes)."""
    for name, row in MODELS.items():
        if (row.kind, row.family, row.variant) == (kind, cfg.family, cfg.variant) and row.overrides and all(
                getattr(cfg, k) == v for k, v in row.overrides.items()) and (kind == "mae" or cfg.num_classes == row.num_classes):
            return name
    prefix = {("mae", "mae"): "crate_mae_", ("classifier", "mae"): "crate_mae_encoder_",
              ("classifier", "supervised"): "crate_"}[(kind, cfg.family)]
    return prefix + (cfg.variant or "base")  # every size is passed as a keyword too, so the row only names it


def model_args(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    """Every keyword that builds exactly `cfg` (resolved), so that timm records them for `save_for_hf`."""
    names = ["dim", "heads", "encoder_depth", "img_size", "patch_size", "eta", "lambd"]
    names += ["decoder_depth", "mask_ratio", "norm_pix_loss"] if kind == "mae" else ["pool", "drop_path", "num_classes"]
    return {n: getattr(cfg, n) for n in names}


def _construct(kind: str, family: str) -> Callable[..., nn.Module]:
    """The model class timm instantiates, from a resolved config's keywords."""
    def build(*, in_chans: int = 3, num_classes: int | None = None, global_pool: str | None = None,
              **cfg_args: Any) -> nn.Module:
        from crate_mae.model import CrateClassifier, CrateMAE

        if in_chans != 3:
            raise ValueError(f"in_chans: CRATE models take RGB images (3 channels), got {in_chans}")
        cfg = ModelConfig(**cfg_args)
        if kind == "mae":
            return CrateMAE(img_size=cfg.img_size, patch_size=cfg.patch_size, dim=cfg.dim, heads=cfg.heads,
                            encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth, eta=cfg.eta,
                            lambd=cfg.lambd, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
        pool = _TIMM_POOL.get(global_pool, global_pool) if global_pool else cfg.pool
        return CrateClassifier(family=family, num_classes=num_classes if num_classes is not None else cfg.num_classes,
                               img_size=cfg.img_size, patch_size=cfg.patch_size, dim=cfg.dim, heads=cfg.heads,
                               depth=cfg.encoder_depth, eta=cfg.eta, lambd=cfg.lambd, pool=pool,
                               drop_path=cfg.drop_path)
    return build


def _square(size: Any) -> int:
    """timm passes img_size as (H, W) when it rebuilds a model; ours are square."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"img_size: CRATE models are built for square images, got {tuple(size)}")
        return int(size[0])
    return int(size)


def _entrypoint(name: str, row: TimmRow) -> Callable[..., nn.Module]:
    def create(pretrained: bool = False, *, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
               cache_dir: Any = None, device: Any = None, dtype: Any = None, **kwargs: Any) -> nn.Module:
        if "global_pool" in kwargs:
            pool = kwargs.pop("global_pool")
            kwargs["pool"] = _TIMM_POOL.get(pool, pool)
        if "drop_path_rate" in kwargs:
            kwargs["drop_path"] = kwargs.pop("drop_path_rate")
        if "img_size" in kwargs:
            kwargs["img_size"] = _square(kwargs["img_size"])
        kwargs.pop("pretrained_model_args", None)  # timm's record of a local-dir file's keywords: passed already
        unknown = sorted(set(kwargs) - _CONFIG_FIELDS - {"in_chans"})
        if unknown:
            raise TypeError(f"{name}: unexpected keyword {unknown[0]!r}; the keywords are ModelConfig's fields")
        in_chans = kwargs.pop("in_chans", 3)
        raw = ModelConfig(**{"family": row.family, "variant": row.variant, **row.overrides, **kwargs})
        overlay = dict(pretrained_cfg_overlay or {})
        file = overlay.get("file")
        if pretrained and file and overlay.get("state_dict") is None:
            ckpt = hub.read_checkpoint(file)  # read once: its saved config is checked here, its tensors by the filter
            cfg = hub.model_config(raw, ckpt, kind=row.kind)
            classes = kwargs["num_classes"] if "num_classes" in kwargs else (ckpt.num_classes or row.num_classes)
            cfg.num_classes = classes
            overlay.update(state_dict=ckpt.state, num_classes=ckpt.num_classes or classes)
        else:
            source = {**(pretrained_cfg if isinstance(pretrained_cfg, dict) else {}), **overlay}
            if pretrained and not (source.get("state_dict") is not None or source.get("file") or source.get("url")
                                   or source.get("hf_hub_id")):
                raise ValueError(f"{name}: no hosted weights; pass pretrained_cfg_overlay=dict(file='path/to/checkpoint')")
            cfg = raw.resolve()
            if "num_classes" not in kwargs and row.kind == "classifier":
                cfg.num_classes = row.num_classes if not pretrained else source.get("num_classes", row.num_classes)
        try:
            model = build_model_with_cfg(
                _construct(row.kind, row.family), name, pretrained, pretrained_cfg=pretrained_cfg,
                pretrained_cfg_overlay=overlay, pretrained_filter_fn=hub.checkpoint_filter, pretrained_strict=False,
                kwargs_filter=("num_classes", "global_pool") if row.kind == "mae" else None,
                in_chans=in_chans, **model_args(cfg, row.kind))
        except ValueError as err:  # the filter's one-line errors, with the file they are about
            where = file or (pretrained_cfg.get("file") if isinstance(pretrained_cfg, dict) else None)
            raise ValueError(f"{where}: {err}" if where and not str(err).startswith(str(where)) else str(err)) from None
        model.pretrained_cfg.pop("state_dict", None)  # the tensors are in the model now; keep no second copy
        return model.to(device=device, dtype=dtype)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{name}: {row.kind} of family {row.family}, size {row.variant} {row.overrides or ''}".strip()
    return create


for _name, _row in MODELS.items():
    globals()[_name] = register_model(_entrypoint(_name, _row))
