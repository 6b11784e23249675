"""What the viz commands read: a model (from any file the one loader reads, or a timm name), and images (files,
folders, globs, or a shard spec), as uint8 pixels the model normalises itself.
"""
from __future__ import annotations

import glob
from pathlib import Path

import torch

from crate_mae.config import ClassifierConfig, MAEConfig
from crate_mae.data.transforms import EvalTransform
from crate_mae.errors import InputError, MissingFileError
from crate_mae.model import create_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def load_model(*, checkpoint: str | None = None, model_name: str | None = None, pretrained_file: str | None = None,
               variant: str | None = None, img_size: int | None = None, whole_mae: bool = False) -> torch.nn.Module:
    """A CrateMAE (whole_mae) or a classifier of the file's family, in eval mode, strictly loaded.

    `checkpoint`: ours or released; sizes from its saved config, or its shapes and `variant`. `model_name`: a
    registered timm name (`crate_small_21k_patch8`, `crate_mae_encoder_base`, ...), weights from `pretrained_file`
    (any layout the hub reads), else freshly initialised. `img_size` builds the position table for that side.
    """
    if checkpoint is not None:
        config = MAEConfig if whole_mae else ClassifierConfig
        model, _ = create_model(config(variant=variant, img_size=img_size), checkpoint)
        return model.eval()
    import timm

    from crate_mae.model.timm_models import MODELS  # importing it registers the names with timm

    if model_name not in MODELS:
        raise InputError(f"--model {model_name}: not a registered name; the names are {', '.join(MODELS)}")
    if (MODELS[model_name].kind == "mae") != whole_mae:
        want = "a CRATE-MAE (crate_mae_<size>)" if whole_mae else "a classifier (crate_<size>, crate_mae_encoder_<size>)"
        raise InputError(f"--model {model_name}: this command needs {want}")
    overlay = {"file": pretrained_file} if pretrained_file else None
    model = timm.create_model(model_name, pretrained=bool(pretrained_file), pretrained_cfg_overlay=overlay,
                              **({"img_size": img_size} if img_size else {}))
    return model.eval()


def image_files(specs: list[str]) -> list[Path] | None:
    """The image files named by `specs` (files, folders of images, glob patterns), in order, each folder and
    pattern sorted; None when the one spec is none of these (a shard spec). An error names a spec without images."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise MissingFileError(f"{spec}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) there")
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found = [path]
        else:
            magic = glob.has_magic(spec)
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES) if magic else []
            if not found:
                if len(specs) == 1 and path.suffix.lower() not in IMAGE_SUFFIXES:
                    return None  # a manifest, a brace pattern or glob of shards, a URL
                raise MissingFileError(f"{spec}: matches no images" if magic else f"{spec}: no such image")
        files += found
    return files


def load_images(specs: list[str] | str, *, img_size: int, n: int, crop_pct: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """The first n images of `specs` as uint8 pixels (n, 3, S, S), the shorter side resized and centre-cropped
    (`EvalTransform`), and their names (file stems; `sample-i` from shards)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    transform = EvalTransform(img_size, crop_pct=crop_pct)
    files = image_files(specs)
    if files is not None:
        files = files[:n]
        images = []
        for f in files:
            try:
                images.append(transform(f.read_bytes()))
            except (OSError, ValueError) as err:
                raise InputError(f"{f}: {err}") from None
        return torch.stack(images), [f.stem for f in files]
    from crate_mae.data import eval_loader

    images = next(iter(eval_loader(specs[0], img_size, batch_size=n, num_workers=0, eval_crop_pct=crop_pct,
                                   max_bad_fraction=1.0, labels=False))).images  # pictures: unlabelled sets too
    return images, [f"sample-{i}" for i in range(images.shape[0])]


def output_path(out: str | None, *, command: str, checkpoint: str | None) -> Path:
    """The main figure's path: `out` if it names a .png file, else `<out>/<command>.png` for a folder; by default
    next to the checkpoint (or in the current folder). Other files of the command go beside it, named after it."""
    if out is not None:
        return Path(out) if Path(out).suffix.lower() == ".png" else Path(out) / f"{command}.png"
    return (Path(checkpoint).parent if checkpoint else Path(".")) / f"{command}.png"


def beside(main: Path, suffix: str, ext: str = ".png") -> Path:
    """A file next to the main figure, named after it: beside(out/attention.png, "china") → out/attention-china.png."""
    return main.with_name(f"{main.stem}-{suffix}{ext}")
