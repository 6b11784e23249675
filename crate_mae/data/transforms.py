"""Image transforms for every stage, from encoded bytes to a normalised tensor (3, S, S).

Each transform is called as `transform(data: bytes, rng: random.Random) -> Tensor`: the shard reader
hands it the stored JPEG/PNG bytes and a generator seeded by (seed, epoch, rank, worker), so the
augmentations of a run are reproducible and never touch the training process's global RNG.

Fast decode: JPEG can be decoded at 1/2, 1/4 or 1/8 scale for a fraction of the cost (PIL's `draft`,
libjpeg's DCT scaling). The pretraining crop is drawn first, on the full-size geometry read from the
header, then the image is decoded at the smallest scale at which that crop still has at least the output
resolution: the result is the same crop at the same output size, only cheaper ("when the crop allows it").
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable, Protocol

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import functional as TF

MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # the one definition used everywhere
STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


class Transform(Protocol):
    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor: ...


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image from bytes (header read only); corrupt data raises here or on load."""
    return Image.open(io.BytesIO(data))


def decode_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes to RGB; with `min_size` (w, h), a JPEG is decoded at the smallest DCT scale ≥ it."""
    img = open_image(data)
    if min_size is not None and img.format == "JPEG":
        img.draft("RGB", (max(1, min_size[0]), max(1, min_size[1])))
    return img.convert("RGB")


def to_normalised_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB (S, S) → float tensor (3, S, S), (x/255 − mean) / std."""
    return TF.normalize(TF.pil_to_tensor(img).float().div_(255.0), MEAN, STD)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling, drawn from `rng`: (left, top, w, h) in source pixels.

    Written out (rather than `RandomResizedCrop.get_params`) so that it takes an explicit generator and
    runs before the decode, on the size in the header.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback, as torchvision: the largest centred crop whose aspect lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class PretrainTransform:
    """MAE's pretraining augmentation: RandomResizedCrop(scale (0.2, 1), bicubic) → flip → normalise."""

    def __init__(self, img_size: int, *, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, fast_decode: bool = True) -> None:
        self.img_size, self.scale, self.ratio, self.hflip, self.fast_decode = img_size, scale, ratio, hflip, fast_decode

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        img = open_image(data)
        width, height = img.size
        left, top, w, h = random_resized_crop_box(width, height, self.scale, self.ratio, rng)
        factor = 1.0  # decoded pixels per source pixel
        if self.fast_decode and img.format == "JPEG":
            k = self.img_size / min(w, h)  # the crop must keep ≥ img_size pixels on its shorter side
            if k < 0.5:  # a 1/2 scale or smaller is possible
                drafted = img.draft("RGB", (math.ceil(width * k), math.ceil(height * k)))
                if drafted is not None:
                    factor = drafted[1][2] / width
        img = img.convert("RGB")
        box = (left * factor, top * factor, (left + w) * factor, (top + h) * factor)
        img = img.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC, box=box)
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalised_tensor(img)


class EvalTransform:
    """Resize the shorter side to img_size / crop_pct (bicubic), centre-crop img_size, normalise."""

    def __init__(self, img_size: int, *, crop_pct: float = 0.875, fast_decode: bool = True) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        self.img_size, self.resize, self.fast_decode = img_size, int(math.floor(img_size / crop_pct)), fast_decode

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        img = open_image(data)
        if self.fast_decode and img.format == "JPEG":
            k = self.resize / min(img.size)
            img.draft("RGB", (max(1, math.ceil(img.width * k)), max(1, math.ceil(img.height * k))))
        img = TF.resize(img.convert("RGB"), self.resize, interpolation=TF.InterpolationMode.BICUBIC)
        return to_normalised_tensor(TF.center_crop(img, self.img_size))


class FinetuneTransform:
    """timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing) on decoded RGB.

    timm draws from Python's and torch's global generators; the shard reader seeds those per
    (seed, epoch, rank, worker) inside DataLoader workers, so `rng` is not used here.
    """

    def __init__(self, img_size: int, *, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                 re_prob: float = 0.25, scale: tuple[float, float] = (0.08, 1.0)) -> None:
        from timm.data import create_transform

        self.inner: Callable[[Image.Image], torch.Tensor] = create_transform(
            img_size, is_training=True, scale=scale, auto_augment=auto_augment, interpolation="bicubic",
            re_prob=re_prob, re_mode="pixel", re_count=1, mean=MEAN, std=STD)

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        return self.inner(decode_rgb(data))
