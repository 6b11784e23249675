"""Pretraining input decoded on the GPU: the worker draws the crop, the device decodes and crops a whole batch.

A CPU worker decodes and crops a few hundred ImageNet JPEGs a second (bench/RESULTS.md); one GPU trains on
thousands. Here the worker only reads the JPEG header and draws the RandomResizedCrop box and the flip
(the same draws as `PretrainTransform`, from the same seeded generator, so resume replay works unchanged);
the training process then decodes the batch's JPEG bytes in one call (`torchvision.io.decode_jpeg` on the
device: nvjpeg's batched decoder on CUDA), pads them into one tensor, and crops and resizes every image at
once with `roi_align` (bilinear, with as many samples per output pixel as the crop is larger than the output:
an area-like antialiasing), then flips by mask. One kernel chain per batch, not per image.
Non-JPEG images (PNG) are decoded in the worker and travel as pixels; the same batched crop applies.
`to_device`, at the end of this file, is the one way any loader's batch reaches the device.
Legend: B images, S output side.
"""
from __future__ import annotations

import random
import warnings
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from crate_mae.data.stream import Batch
from crate_mae.data.transforms import PretrainTransform, check_size, decode_tensor, open_image


class RawImage(NamedTuple):
    """One sample as the worker leaves it: JPEG bytes (1-D uint8) or decoded pixels (3, H, W), and the draws."""

    payload: torch.Tensor
    encoded: bool
    box: tuple[int, int, int, int]  # left, top, width, height in source pixels
    flip: bool


class RawBatch(NamedTuple):
    """A batch of `RawImage`s, collated: what `decode_batch` turns into pixels on the device."""

    payloads: list[torch.Tensor]
    encoded: list[bool]
    boxes: torch.Tensor  # (B, 4) left, top, width, height
    flips: torch.Tensor  # (B,) bool
    size: int  # S, the side the transform crops to


class DeviceCropTransform(PretrainTransform):
    """The worker half of the pretraining augmentation: the same crop and flip draws, no decode or resize; its
    `collate` makes the batch a RawBatch (the shard stream's collate step uses it)."""

    def __call__(self, data: bytes, rng: random.Random) -> RawImage:  # type: ignore[override]
        img = open_image(data)
        check_size(img)  # the device decodes whole images: one past MAX_PIXELS is a counted skip here
        box, flip = self._draw(img.width, img.height, rng)
        if img.format == "JPEG":
            return RawImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, box, flip)
        return RawImage(decode_tensor(data, img), False, box, flip)

    def collate(self, items: list[RawImage]) -> RawBatch:
        return collate_raw(items, self.img_size)


def collate_raw(items: list[RawImage], size: int) -> RawBatch:
    return RawBatch([i.payload for i in items], [i.encoded for i in items],
                    torch.tensor([i.box for i in items], dtype=torch.float32), torch.tensor([i.flip for i in items]),
                    size)


def decode_batch(raw: RawBatch, size: int, device: torch.device) -> torch.Tensor:
    """RawBatch → uint8 (B, 3, S, S) on `device`: batched decode, one roi_align for every crop, flips."""
    jpegs = [p for p, e in zip(raw.payloads, raw.encoded) if e]
    decoded: list[torch.Tensor] = []
    if jpegs:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec; they work
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    it = iter(decoded)
    images = [next(it) if e else p.to(device, non_blocking=True) for p, e in zip(raw.payloads, raw.encoded)]
    height, width = max(x.shape[1] for x in images), max(x.shape[2] for x in images)
    batch = torch.zeros(len(images), 3, height, width, device=device)
    for i, x in enumerate(images):  # one copy each into the padded batch; everything after is batched
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    boxes = raw.boxes.to(device)
    rois = torch.cat([torch.arange(len(images), device=device, dtype=torch.float32)[:, None],
                      boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)  # (B, 5): index, x1, y1, x2, y2
    out = roi_align(batch, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(raw.flips.to(device)[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The one way a loader's batch reaches the device: its images there as uint8 pixels (B, 3, S, S) (a RawBatch of
    `data.decode_on: device` decoded and cropped there first), its labels there too.

    Training stages read through `data/prefetch.py: DeviceLoader`, which runs it once per batch (ahead in a thread,
    or in the step's thread); `eval/metrics.py: evaluate` and `eval/features.py: extract` run it on each batch.
    Every transform of ours hands over uint8 pixels, so anything else is a TypeError here, not a silent pass: what
    the model does with the pixels is `model.layers.Normalize`'s, once.
    """
    images = batch.images
    if isinstance(images, RawBatch):
        images = decode_batch(images, images.size, device)
    elif isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        images = images.to(device, non_blocking=True)
    else:
        raise TypeError(f"a loader's images are uint8 pixels or a RawBatch, got "
                        f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
    return batch._replace(images=images, labels=batch.labels.to(device, non_blocking=True))
