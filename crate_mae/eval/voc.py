"""PASCAL VOC 2012 segmentation from attention alone: the protocol of Yu et al., "Emergence of segmentation with
minimalistic white-box transformers" (arXiv 2308.16271, Fig. 4b, Eq. 13-14), which follows DINO's (Caron et al.
2021, §4.2.2): no weights are trained and no class is predicted; each head's thresholded CLS attention is matched,
per image and per ground-truth class, with the class mask it overlaps best.

Legend: B images, H heads (K in the sums), h × w the token grid, H_px × W_px the pixels, c a class, G_c the pixels
of class c, M_k head k's mask.

For image i and each class c present in its label (1..20; background 0 too if `background`), over the pixels that
are not void (255):
    IoU_k(c) = |M_k ∩ G_c| / |M_k ∪ G_c|,   s_i(c) = max_k IoU_k(c),   s_i = mean_c s_i(c),
    mIoU = 100 · mean_i s_i        (images without a class are left out and counted as skipped),
    IoU(c) = 100 · mean over the images containing c of s_i(c).
This is not the confusion-matrix mIoU of supervised segmentation: no head is chosen at dataset level.

The data layout is VOC's own (VOCdevkit/VOC2012): `ImageSets/Segmentation/{split}.txt`, `JPEGImages/{name}.jpg`,
`SegmentationClass/{name}.png` (a palette PNG whose pixel values are the class indices). `write_demo_voc` builds a
tiny set in that layout from scikit-learn's bundled digits, offline, for tests and demos.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from crate_mae.atomic import atomic_path
from crate_mae.errors import DataError, InputError, MissingFileError
from crate_mae.viz.attention import mass_masks

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# The classes of `write_demo_voc`'s set: digit k is class k + 1 (pass as `class_names` / `num_classes`)
DIGIT_CLASSES: tuple[str, ...] = ("background", *(f"digit {k}" for k in range(10)))
IGNORE_INDEX = 255  # VOC's void label: object boundaries and ambiguous regions, left out of every count

# The paper's VOC12 mIoU (arXiv 2308.16271 v1, Fig. 4b), keyed by timm / registered names. The CRATE rows are the
# paper's "CRATE-S/8" and "CRATE-B/8" (supervised on ImageNet-21k, patch 8); that these are the released checkpoints
# behind our crate_small_21k_patch8 / crate_base_21k_patch8 names is our reading, not stated in the paper. The ViT
# rows are supervised ViT-S/8 / ViT-B/8 and DINO's, under timm's names for those checkpoints.
PAPER_FIGURES: dict[str, float] = {
    "crate_small_21k_patch8": 23.9,
    "crate_base_21k_patch8": 23.6,
    "vit_small_patch8_224": 14.1,
    "vit_base_patch8_224": 19.2,
    "vit_small_patch8_224.dino": 27.0,
    "vit_base_patch8_224.dino": 27.3,
}


# --- reading and writing VOC's layout ------------------------------------------------------------------------------

def read_split(root: str | os.PathLike, split: str = "val") -> list[str]:
    """The image names of `ImageSets/Segmentation/{split}.txt` under `root` (VOCdevkit/VOC2012), in file order."""
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise MissingFileError(f"{path}: no split file {split!r} (is {root} a VOC2012 folder?)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: the split lists no images")
    return names


def _open(path: Path, what: str) -> Image.Image:
    """`path` opened with PIL (not yet decoded), or a one-line error naming it."""
    if not path.is_file():
        raise MissingFileError(f"{path}: {what} is missing")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


def read_pair(root: str | os.PathLike, name: str,
              num_classes: int = len(VOC_CLASSES)) -> tuple[torch.Tensor, torch.Tensor]:
    """Image `name` and its class mask: (uint8 (3, H, W) RGB, int64 (H, W) class indices).

    The mask's pixel values are read as indices (its palette is ignored): 0..num_classes-1, and 255 for void.
    A missing image or mask, a mask that is not palette / grey indices, one of another size than its image, or one
    holding a value outside those is a one-line error naming the file.
    """
    root = Path(root)
    image_path, mask_path = root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png"
    with _open(image_path, "the image") as img:
        rgb = np.asarray(img.convert("RGB"))
    with _open(mask_path, f"the mask of {image_path.name}") as mask:
        if mask.mode not in ("P", "L"):  # an RGB rendering of the palette would give colours, not classes
            raise DataError(f"{mask_path}: a mask in mode {mask.mode}; VOC's masks are palette ('P') class indices")
        label = np.asarray(mask)  # 'P' → the palette indices themselves, never the colours
    if label.shape != rgb.shape[:2]:
        raise DataError(f"{mask_path}: mask is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                        f"{image_path.name} is {rgb.shape[1]}x{rgb.shape[0]}")
    bad = np.setdiff1d(np.unique(label), [*range(num_classes), IGNORE_INDEX])
    if bad.size:
        raise DataError(f"{mask_path}: class index {int(bad[0])} outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()), torch.from_numpy(label.astype(np.int64))


def voc_palette() -> list[int]:
    """VOC's colour map, 256 RGB triples flattened (768 ints): index i's bits 0, 1, 2 go to red, green and blue's
    most significant bit, bits 3, 4, 5 to the next one, and so on (so 255, void, is (224, 224, 192))."""
    palette = []
    for index in range(256):
        rgb, bits = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette.extend(rgb)
    return palette


def save_label_png(path: str | os.PathLike, label: torch.Tensor | np.ndarray) -> None:
    """A class mask (H, W) of indices 0..255 written as VOC writes them: a palette PNG with VOC's colour map, so
    that viewers show colours while `read_pair` (and VOC's tools) read the indices."""
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if array.ndim != 2:
        raise InputError(f"{path}: a label is (H, W), got shape {list(array.shape)}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(f"{path}: label values must be in 0..255, got {array.min()}..{array.max()}")
    image = Image.fromarray(array.astype(np.uint8))  # mode "L"; the palette makes it "P", indices unchanged
    image.putpalette(voc_palette())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _ring(mask: np.ndarray) -> np.ndarray:
    """The one-pixel outer boundary of a bool mask (H, W), 8-connected: its dilation by a 3 × 3 square minus it."""
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    height, width = mask.shape
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + height, dx:dx + width]
    return grown & ~mask


def write_demo_voc(root: str | os.PathLike, n: int = 20, *, size: int = 32, threshold: int = 128,
                   split: str = "val") -> list[str]:
    """A VOC-layout set under `root` from the first `n` of scikit-learn's bundled 8×8 digits (offline,
    deterministic): each digit upsampled bilinearly to `size` × `size`, written as an RGB JPEG (quality 95); its
    mask is the strokes (upsampled grey ≥ `threshold`) labelled digit + 1 (1..10, `DIGIT_CLASSES`), background 0,
    and, as VOC marks its boundaries, a one-pixel void (255) ring just outside the strokes. Returns the names,
    listed in `split`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if not 1 <= n <= len(digits.target):
        raise InputError(f"n = {n}: the digits have {len(digits.target)} images")
    if size < 8:
        raise InputError(f"size = {size}: at least the digits' own 8 pixels")
    root = Path(root)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"digits_{i:04d}" for i in range(n)]
    for i, name in enumerate(names):
        grey = Image.fromarray((digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8))
        grey = grey.resize((size, size), Image.Resampling.BILINEAR)
        strokes = np.asarray(grey) >= threshold  # from the pixels before JPEG, so the mask does not depend on it
        label = np.where(strokes, int(digits.target[i]) + 1, 0).astype(np.uint8)
        label[_ring(strokes)] = IGNORE_INDEX
        with atomic_path(root / "JPEGImages" / f"{name}.jpg") as tmp:
            grey.convert("RGB").save(tmp, format="JPEG", quality=95)
        save_label_png(root / "SegmentationClass" / f"{name}.png", label)
    with atomic_path(root / "ImageSets" / "Segmentation" / f"{split}.txt") as tmp:
        tmp.write_text("".join(f"{name}\n" for name in names))
    return names


# --- masks from attention ------------------------------------------------------------------------------------------

def head_masks(cls_attention: torch.Tensor, keep: float = 0.6,
               rule: Literal["mass", "entries"] = "mass") -> torch.Tensor:
    """Each head's attention map (B, H, h, w) thresholded to a bool mask (B, H, h, w).

    - "mass" (DINO's `visualize_attention.py`): the fewest highest patches holding at least `keep` of the map's
      attention (`crate_mae.viz.attention.mass_masks`);
    - "entries" (the CRATE paper's literal "top P = 60% of entries"): the ⌈keep · h·w⌉ highest patches, ties
      ranked by position, whatever their share of the mass.
    """
    if not 0 < keep <= 1:
        raise InputError(f"keep = {keep}: a fraction in (0, 1]")
    if cls_attention.dim() < 2:
        raise InputError(f"attention maps are (..., h, w), got shape {list(cls_attention.shape)}")
    if rule == "mass":
        return mass_masks(cls_attention, keep)
    if rule != "entries":
        raise InputError(f"rule {rule!r}: one of 'mass' (DINO's) or 'entries' (the CRATE paper's)")
    flat = cls_attention.flatten(-2)  # (..., N)
    count = math.ceil(keep * flat.shape[-1] - 1e-9)  # the guard: 0.6 · 10 is 6.000000000000001 in floats
    order = flat.argsort(dim=-1, descending=True, stable=True)
    ranked = torch.arange(flat.shape[-1], device=flat.device) < count  # the first `count` ranks kept
    keep_mask = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, ranked.expand_as(order))
    return keep_mask.view(cls_attention.shape)


def upsample(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """bool masks (B, H, h, w) → bool (B, H, H_px, W_px), each pixel taking the token whose cell holds its centre
    ("nearest-exact"; for H_px = h·p it is each patch repeated p × p, as DINO's nearest upsampling by the patch)."""
    if masks.dim() != 4:
        raise InputError(f"masks are (B, H, h, w), got shape {list(masks.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(masks.shape[-2:]) == size:
        return masks.bool()
    return F.interpolate(masks.to(torch.uint8), size=size, mode="nearest-exact").bool()


# --- the score -----------------------------------------------------------------------------------------------------

class VOCScore:
    """The per-image, per-class best-head IoU of the paper (module docstring), accumulated over batches.

    It keeps, for every image added, each scored class's best IoU and the head that gave it, so the result is the
    same however the images are batched (the means are `math.fsum`s, exact whatever the order), and `to_dict` /
    `from_dict` (plain JSON types) let a partial run resume: `len(score)` is the number of images added so far.
    """

    def __init__(self, *, background: bool = False, class_names: Sequence[str] = VOC_CLASSES,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.background, self.class_names, self.ignore_index = background, tuple(class_names), ignore_index
        self.records: list[list[tuple[int, float, int]]] = []  # per image: (class, best IoU, best head) per class

    def __len__(self) -> int:
        return len(self.records)

    def add(self, masks: torch.Tensor, labels: torch.Tensor) -> None:
        """masks bool (B, H, h, w) (nearest-upsampled here if not at the labels' size) or (B, H, H_px, W_px);
        labels (B, H_px, W_px) class indices, `ignore_index` for void."""
        if masks.dim() != 4 or labels.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise InputError(f"masks (B, H, h, w) and labels (B, H_px, W_px) of one batch, got shapes "
                             f"{list(masks.shape)} and {list(labels.shape)}")
        masks, labels = upsample(masks, labels.shape[-2:]), labels.to(masks.device)
        for mask, label in zip(masks, labels):
            self.records.append(self._score_image(mask, label))

    def _score_image(self, masks: torch.Tensor, label: torch.Tensor) -> list[tuple[int, float, int]]:
        """One image's masks (K, H_px, W_px) against its label (H_px, W_px): [(class, best IoU, head), ...]."""
        valid = label != self.ignore_index
        present = label[valid].unique().tolist()
        out_of_range = [c for c in present if not 0 <= c < len(self.class_names)]
        if out_of_range:
            raise DataError(f"label value {out_of_range[0]} is not a class (0..{len(self.class_names) - 1}) "
                            f"nor void ({self.ignore_index})")
        classes = [c for c in present if self.background or c != 0]
        if not classes:
            return []
        # counts as float64 matrix products: exact integers (far below 2**53 pixels)
        truth = torch.stack([(label == c) & valid for c in classes]).flatten(1).double()  # (C, P)
        heads = (masks & valid).flatten(1).double()  # (K, P), void pixels out of both sets
        inter = truth @ heads.T  # (C, K)
        union = truth.sum(1, keepdim=True) + heads.sum(1) - inter  # ≥ |G_c| > 0
        best, head = (inter / union).max(dim=1)
        return [(c, float(v), int(k)) for c, v, k in zip(classes, best.tolist(), head.tolist())]

    def result(self) -> dict[str, Any]:
        """{"miou": 100 · mean image score (None before any image with a class), "per_class": {name: 100 · mean best IoU over the images holding it, or
        None if none did}, "images": images scored, "skipped": images without a class to score, "background": ...,
        "best_head_counts": how often each head was the best one for a (image, class) pair}."""
        scored = [r for r in self.records if r]
        image_scores = [math.fsum(v for _, v, _ in r) / len(r) for r in scored]
        per_class: dict[str, float | None] = {}
        for c, name in enumerate(self.class_names):
            if c == 0 and not self.background:
                continue
            values = [v for r in scored for k, v, _ in r if k == c]
            per_class[name] = 100.0 * math.fsum(values) / len(values) if values else None
        heads = [k for r in scored for _, _, k in r]
        counts = [heads.count(k) for k in range(max(heads) + 1)] if heads else []
        return {"miou": 100.0 * math.fsum(image_scores) / len(image_scores) if image_scores else None,
                "per_class": per_class, "images": len(scored), "skipped": len(self.records) - len(scored),
                "background": self.background, "best_head_counts": counts}

    def to_dict(self) -> dict[str, Any]:
        """The whole state as plain JSON types (floats round-trip exactly through `json`)."""
        return {"background": self.background, "class_names": list(self.class_names),
                "ignore_index": self.ignore_index, "records": [[list(t) for t in r] for r in self.records]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> VOCScore:
        """The accumulator `to_dict` described, to go on adding images."""
        try:
            score = cls(background=bool(state["background"]), class_names=state["class_names"],
                        ignore_index=int(state["ignore_index"]))
            score.records = [[(int(c), float(v), int(k)) for c, v, k in r] for r in state["records"]]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"not a VOCScore state ({type(err).__name__}: {err})") from None
        return score
