"""Image transforms for every stage, from encoded bytes to uint8 pixels (3, S, S).

One contract for every transform (pretraining, evaluation, fine-tuning): uint8 RGB pixels in [0, 255]. A batch
is 4× smaller to collate, pin and copy to the GPU than in float32, and the model normalises it on the device as
its first step (`model.layers.Normalize`), the one place where input is normalised.

Each transform is called as `transform(data: bytes, rng: random.Random) -> Tensor`: the shard reader
hands it the stored JPEG/PNG bytes and a generator seeded by (seed, epoch, rank, worker), so the
augmentations of a run are reproducible and never touch the training process's global RNG. Two optional
methods: `draw(data, rng)` makes only the random draws (a resumed epoch's replay), and `collate(images)` says
how its outputs batch (default `torch.stack`; `device_decode.DeviceCropTransform`'s makes a RawBatch).

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

import numpy as np
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


MAX_PIXELS = 64_000_000  # a larger image is decoded at reduced size (JPEG) or skipped: memory stays bounded


def check_size(img: Image.Image) -> None:
    """An image past MAX_PIXELS (as opened, or as drafted to a reduced JPEG scale) raises: a counted skip."""
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{img.width}×{img.height} pixels is more than the {MAX_PIXELS:,}-pixel limit")


def _draft_to_limit(img: Image.Image, scale: float = 1.0) -> float:
    """Ask a JPEG for a reduced DCT-scale decode (1/2, 1/4 or 1/8): at least to `scale` of its size (PIL keeps the
    requested size or more), and far enough to fit MAX_PIXELS where 1/8 can; returns the decoded pixels per source
    pixel (1.0: no reduction)."""
    width, height = img.size
    if img.format != "JPEG":
        return 1.0
    fit = next((d for d in (1, 2, 4, 8) if (width / d) * (height / d) <= MAX_PIXELS), 8)  # the limit's denominator
    request = (min(math.ceil(width * scale), math.ceil(width / fit)), min(math.ceil(height * scale), math.ceil(height / fit)))
    if request[0] >= width and request[1] >= height:
        return 1.0
    drafted = img.draft("RGB", request)
    return drafted[1][2] / width if drafted is not None else 1.0


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 1, L, LA, P (with transparency), RGBA, CMYK, YCbCr, and the 16-bit and 32-bit
    grey modes (I;16*, I, F), which PIL's own convert("RGB") would clip to white: they are scaled to 8 bits."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and values.max(initial=0) <= 1.0 else 65535.0 if img.mode != "F" else 255.0
        if img.mode == "I" and values.max(initial=0) <= 255:
            top = 255.0  # an 8-bit image stored as 32-bit ints
        img = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette image with transparency: through RGBA, as PIL recommends
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode bytes to an 8-bit PIL RGB image (any format and mode PIL reads); corrupt or truncated data raises,
    and so does an image past MAX_PIXELS (a JPEG is decoded at the reduced scale that fits instead)."""
    img = open_image(data)
    _draft_to_limit(img)  # a huge JPEG: a reduced decode keeps the memory bounded
    check_size(img)
    return to_rgb(img)


def decode_tensor(data: bytes, img: Image.Image | None = None) -> torch.Tensor:
    """Decode bytes to uint8 RGB (3, H, W): torchvision's decoders, PIL for formats they do not read.

    Both raise on corrupt or truncated data (tested), so a bad image is never silently half-decoded. A 16-bit PNG
    (torchvision gives uint16) is scaled to 8 bits; an image past MAX_PIXELS goes the PIL way (reduced or skipped).
    `img`, the image already opened from `data` (its header), saves opening it again.
    """
    img = img if img is not None else open_image(data)
    if decode_image is None or img.width * img.height > MAX_PIXELS:
        return TF.pil_to_tensor(decode_rgb(data))
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work
            # and are the fastest available here. When they go, the PIL path below takes over.
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return TF.pil_to_tensor(decode_rgb(data))
    return image if image.dtype == torch.uint8 else TF2.to_dtype(image, torch.uint8, scale=True)


def crop_resize(data: bytes, img: Image.Image, box: tuple[float, float, float, float], size: int,
                fast_decode: bool) -> torch.Tensor:
    """The region box = (left, top, width, height) of the image, resampled to (size, size): uint8 (3, S, S).

    `img` is the lazily opened image (its header gives the size and format).
    """
    left, top, w, h = box
    k = size / min(w, h)  # output pixels per source pixel
    oversized = img.width * img.height > MAX_PIXELS
    if img.format == "JPEG" and (oversized or (fast_decode and k < 0.5)):  # a 1/2-scale decode or smaller
        f = _draft_to_limit(img, k if fast_decode and k < 0.5 else 1.0)  # decoded pixels per source pixel
        if f < 1.0:
            check_size(img)
            small = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC,
                                       box=(left * f, top * f, (left + w) * f, (top + h) * f))
            return TF.pil_to_tensor(small)
    check_size(img)  # past the limit and not reducible: a counted skip, before any pixel is decoded
    return TF2.resized_crop(decode_tensor(data, img), round(top), round(left), round(h), round(w), [size, size],
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
    """timm's fine-tuning recipe → uint8 (3, S, S), like every transform here: RandomResizedCrop, flip and
    RandAugment as `timm.data.create_transform` builds them (its PIL stages, made pixels by `PILToTensor`, as for
    timm's own prefetching loader), then timm's RandomErasing in pixel mode.

    timm erases after normalising: its random pixels are standard normal in normalised space. The erasing runs in
    that same space here, (x/255 − mean)/std, and the result comes back as pixels, (z·std + mean)·255 rounded and
    clamped to [0, 255]: unerased pixels come back exactly, the erased ones are timm's noise to the nearest grey
    level, and the model's `Normalize` stays the one normalisation. timm draws from Python's and torch's global
    generators; the shard reader seeds those per (seed, epoch, rank, worker) inside DataLoader workers, so `rng`
    is not used here.
    """

    def __init__(self, img_size: int, *, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                 re_prob: float = 0.25, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5) -> None:
        from timm.data import create_transform
        from timm.data.random_erasing import RandomErasing

        self.pixels: Callable[[Image.Image], torch.Tensor] = create_transform(  # uint8 (3, S, S): no normalising
            img_size, is_training=True, scale=scale, hflip=hflip, auto_augment=auto_augment, interpolation="bicubic",
            mean=MEAN, std=STD, use_prefetcher=True)
        self.erase = RandomErasing(re_prob, mode="pixel", max_count=1, device="cpu") if re_prob > 0 else None
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        x = self.pixels(decode_rgb(data))  # (3, S, S) uint8
        if self.erase is None:
            return x
        z = self.erase((x.float() / 255 - self.mean) / self.std)  # timm's erasing, in its normalised space
        return ((z * self.std + self.mean) * 255).round_().clamp_(0, 255).to(torch.uint8)
