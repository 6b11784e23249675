"""Image transforms for every stage, from encoded bytes to an image tensor (3, S, S).

The pretraining and evaluation transforms return uint8 pixels: a batch is 4× smaller to collate, pin
and copy to the GPU than in float32, and the model normalises it on the device as its first step
(`model.layers.Normalize`), where it costs nothing. (timm's fine-tuning transform returns normalised float32,
which the model passes through.)

Each transform is called as `transform(data: bytes, rng: random.Random) -> Tensor`: the shard reader
hands it the stored JPEG/PNG bytes and a generator seeded by (seed, epoch, rank, worker), so the
augmentations of a run are reproducible and never touch the training process's global RNG.

Decoding and resampling use torchvision's kernels on uint8 tensors (libjpeg-turbo's decoder, the
antialiased bicubic `resized_crop`): measured in bench/RESULTS.md, they are faster than PIL's for the
same pixels. The crop is drawn first, from the image size in the header. Fast decode: when that crop
is at least twice the output size, a JPEG is decoded at 1/2, 1/4 or 1/8 scale instead (PIL's `draft`,
libjpeg's DCT scaling), at the smallest scale at which the crop still has the output resolution: the
same crop, only cheaper.
"""
from __future__ import annotations

import io
import math
import random
import warnings
from typing import Callable, Protocol

import torch
from PIL import Image
try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # a torchvision without its image decoders: PIL decodes everything
    decode_image = None
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from crate_mae.config.variants import IMAGE_MEAN as MEAN, IMAGE_STD as STD  # the one definition of each


class Transform(Protocol):
    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor: ...


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image from bytes (header read only); corrupt data raises here or on load."""
    return Image.open(io.BytesIO(data))


def decode_rgb(data: bytes) -> Image.Image:
    """Decode bytes to a PIL RGB image (any format PIL reads); corrupt or truncated data raises."""
    return open_image(data).convert("RGB")


def decode_tensor(data: bytes) -> torch.Tensor:
    """Decode bytes to uint8 RGB (3, H, W): torchvision's decoders, PIL for formats they do not read.

    Both raise on corrupt or truncated data (tested), so a bad image is never silently half-decoded.
    """
    if decode_image is None:
        return TF.pil_to_tensor(decode_rgb(data))
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work
            # and are the fastest available here. When they go, the PIL path below takes over.
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return TF.pil_to_tensor(decode_rgb(data))


def crop_resize(data: bytes, img: Image.Image, box: tuple[float, float, float, float], size: int,
                fast_decode: bool) -> torch.Tensor:
    """The region box = (left, top, width, height) of the image, resampled to (size, size): uint8 (3, S, S).

    `img` is the lazily opened image (its header gives the size and format).
    """
    left, top, w, h = box
    width, height = img.size  # before `draft`, which changes it
    k = size / min(w, h)  # output pixels per source pixel
    if fast_decode and img.format == "JPEG" and k < 0.5:  # a 1/2-scale decode or smaller keeps the resolution
        drafted = img.draft("RGB", (math.ceil(width * k), math.ceil(height * k)))
        if drafted is not None:
            f = drafted[1][2] / width  # decoded pixels per source pixel
            small = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC,
                                              box=(left * f, top * f, (left + w) * f, (top + h) * f))
            return TF.pil_to_tensor(small)
    return TF2.resized_crop(decode_tensor(data), round(top), round(left), round(h), round(w), [size, size],
                            interpolation=InterpolationMode.BICUBIC, antialias=True)


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
    """MAE's pretraining augmentation: RandomResizedCrop(scale (0.2, 1), bicubic) → flip → uint8 (3, S, S)."""

    def __init__(self, img_size: int, *, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, fast_decode: bool = True) -> None:
        self.img_size, self.scale, self.ratio, self.hflip, self.fast_decode = img_size, scale, ratio, hflip, fast_decode

    def _draw(self, width: int, height: int, rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
        """All the random numbers of one sample: the crop box and whether to flip."""
        return random_resized_crop_box(width, height, self.scale, self.ratio, rng), rng.random() < self.hflip

    def draw(self, data: bytes, rng: random.Random) -> None:
        """Draw exactly what `__call__` draws, reading only the header: replays a resumed epoch cheaply."""
        self._draw(*open_image(data).size, rng)

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        img = open_image(data)
        box, flip = self._draw(img.width, img.height, rng)
        x = crop_resize(data, img, box, self.img_size, self.fast_decode)
        return x.flip(-1) if flip else x


class EvalTransform:
    """The centre crop of side crop_pct × the shorter side, resized to img_size (bicubic) → uint8 (3, S, S).

    This is torchvision's Resize(img_size / crop_pct) + CenterCrop(img_size) done as one resampling of
    the source region (no intermediate full-size resize: the same pixels, less work).
    """

    def __init__(self, img_size: int, *, crop_pct: float = 0.875, fast_decode: bool = True) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        self.img_size, self.crop_pct, self.fast_decode = img_size, crop_pct, fast_decode

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        img = open_image(data)
        side = min(img.width, img.height) * self.crop_pct  # the central square that becomes the output
        box = ((img.width - side) / 2, (img.height - side) / 2, side, side)
        return crop_resize(data, img, box, self.img_size, self.fast_decode)


class FinetuneTransform:
    """timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing) on decoded RGB.

    timm draws from Python's and torch's global generators; the shard reader seeds those per
    (seed, epoch, rank, worker) inside DataLoader workers, so `rng` is not used here.
    """

    def __init__(self, img_size: int, *, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                 re_prob: float = 0.25, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5) -> None:
        from timm.data import create_transform

        self.inner: Callable[[Image.Image], torch.Tensor] = create_transform(
            img_size, is_training=True, scale=scale, hflip=hflip, auto_augment=auto_augment, interpolation="bicubic",
            re_prob=re_prob, re_mode="pixel", re_count=1, mean=MEAN, std=STD)

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        return self.inner(decode_rgb(data))
