"""timm entry points: `timm.create_model("crate_mae_<size>")` and `timm.create_model("crate_<size>")`.

One pair per row of the size table. Model keywords are `ModelConfig` fields (num_classes, img_size,
pool, lambd, ...); timm's `global_pool` ("token" | "avg") is accepted for the classifier too.
No weights are hosted: `pretrained=True` needs a local file,
`timm.create_model("crate_base", pretrained=True, pretrained_cfg_overlay=dict(file="mae.pth"))`,
which fills a CRATE-MAE (all of it) or a classifier (all but the head) strictly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from timm.models import register_model

from crate_mae.model.variants import VARIANTS

_TIMM_POOL = {"token": "cls", "avg": "mean"}


def _checkpoint_file(pretrained: bool, overlay: dict[str, Any] | None, name: str) -> str | None:
    if not pretrained:
        return None
    if not overlay or not overlay.get("file"):
        raise ValueError(f"{name}: no hosted weights; pass pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth')")
    return str(overlay["file"])


def _entrypoint(variant: str, classifier: bool) -> Callable[..., nn.Module]:
    name = f"crate_{variant}" if classifier else f"crate_mae_{variant}"

    def create(pretrained: bool = False, *, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
               cache_dir: Any = None, device: Any = None, dtype: Any = None, **model_args: Any) -> nn.Module:
        # timm's factory hands every entry point these keywords; only the file in the overlay is used.
        import torch

        from crate_mae.config import ModelConfig
        from crate_mae.model import build_classifier, build_mae, load_released_mae

        file = _checkpoint_file(pretrained, pretrained_cfg_overlay, name)
        if "global_pool" in model_args:
            pool = model_args.pop("global_pool")
            model_args["pool"] = _TIMM_POOL.get(pool, pool)
        cfg = ModelConfig(variant=variant, **model_args)
        if not classifier:
            model = load_released_mae(file, cfg) if file else build_mae(cfg)
        else:
            model = build_classifier(cfg, from_mae=file is not None)
            if file:
                model.load_pretrained(torch.load(file, map_location="cpu", weights_only=True))
        return model.to(device=device, dtype=dtype)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"CRATE{'' if classifier else '-MAE'}-{variant} ({VARIANTS[variant]})."
    return create


for _variant in VARIANTS:
    for _classifier in (False, True):
        _fn = _entrypoint(_variant, _classifier)
        globals()[_fn.__name__] = register_model(_fn)
