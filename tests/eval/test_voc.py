"""VOC segmentation from attention: the score's arithmetic (hand-made masks, oracles, batching, resume), VOC's file
layout (palette PNGs, the digits demo set, one-line errors) and each model's per-layer view (CRATE, timm ViT)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

from crate_mae.config import ClassifierConfig, MAEConfig
from crate_mae.errors import DataError, InputError, MissingFileError
from crate_mae.eval.heads import LayerView, layer_view, layer_views, num_layers
from crate_mae.eval.voc import (DIGIT_CLASSES, IGNORE_INDEX, PAPER_FIGURES, VOC_CLASSES, VOCScore, head_masks,
                                read_pair, read_split, save_label_png, upsample, voc_palette, write_demo_voc)
from crate_mae.model.hub import create_model
from crate_mae.viz.attention import mssa_view

V = IGNORE_INDEX


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- the score's arithmetic ----------------------------------------------------------------------------------------

def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 4 × 4 images, two heads each (the expected IoUs are worked out in the test)."""
    labels = torch.tensor([
        [[1, 1, 0, 0],
         [1, 1, 0, 0],
         [0, 0, 2, 2],
         [0, V, 2, 2]],
        [[3] * 4, [3] * 4, [3] * 4, [3, 3, 3, V]],
        [[0] * 4, [0] * 4, [0, 0, V, V], [0] * 4],  # background and void only: nothing to score
    ])
    masks = torch.zeros(3, 2, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :3] = True  # head 0: the top-left 2 × 3 block
    masks[0, 1, 3, :] = True  # head 1: the bottom row (one pixel void) ...
    masks[0, 1, 2, 2] = True  # ... and one more pixel of class 2
    masks[1, 0] = True  # head 0: everything; head 1: nothing
    masks[2, 1, 0, 0] = True
    return masks, labels


def test_best_head_iou_per_class_and_image() -> None:
    masks, labels = hand_made()
    score = VOCScore()
    score.add(masks, labels)
    # Image 0, class 1 (4 px): head 0 holds all 4 of its 6 px → 4/6; head 1 none → 0. Best 2/3 (head 0).
    # Class 2 (4 px): head 0 misses; head 1 has 4 valid px (its void one left out), 3 on class 2: 3/(4+4-3) = 3/5.
    # Image 1, class 3 (15 valid px): head 0 covers them all → 1 (its void pixel out of the union); head 1 → 0.
    image_scores = [(2 / 3 + 3 / 5) / 2, 1.0]
    result = score.result()
    assert result["miou"] == pytest.approx(100 * sum(image_scores) / 2, abs=1e-12)
    assert result["images"] == 2 and result["skipped"] == 1 and len(score) == 3
    assert result["per_class"]["aeroplane"] == pytest.approx(200 / 3)
    assert result["per_class"]["bicycle"] == pytest.approx(60.0)
    assert result["per_class"]["bird"] == pytest.approx(100.0)
    assert result["per_class"]["boat"] is None and "background" not in result["per_class"]
    assert result["best_head_counts"] == [2, 1]  # class 1 and 3 by head 0, class 2 by head 1


def test_void_pixels_count_nowhere() -> None:
    masks, labels = hand_made()
    score = VOCScore()
    score.add(masks[:1], labels[:1].where(labels[:1] != V, 0))  # image 0 with its void pixel made background
    # Head 1 now has 5 px, 3 on class 2: 3/(5+4-3) = 1/2 instead of 3/5.
    assert score.result()["per_class"]["bicycle"] == pytest.approx(50.0)


def test_background_switch_scores_class_zero_too() -> None:
    masks, labels = hand_made()
    score = VOCScore(background=True)
    score.add(masks, labels)
    # Image 0, background (7 px): head 0 shares 2 of its 6 → 2/11; head 1 shares 1 of its 4 valid → 1/10.
    # Image 1 has no background; image 2 is all background (14 valid px): head 1's one pixel → 1/14, head 0 → 0.
    expected = [(2 / 11 + 2 / 3 + 3 / 5) / 3, 1.0, 1 / 14]
    result = score.result()
    assert result["miou"] == pytest.approx(100 * sum(expected) / 3, abs=1e-12)
    assert result["images"] == 3 and result["skipped"] == 0
    assert result["per_class"]["background"] == pytest.approx(100 * (2 / 11 + 1 / 14) / 2)


def test_masks_at_token_resolution_are_upsampled_to_the_labels() -> None:
    tokens = torch.tensor([[[[True, False], [False, False]]]])  # (1, 1, 2, 2)
    pixels = upsample(tokens, (4, 6))
    assert pixels.shape == (1, 1, 4, 6) and pixels.dtype == torch.bool
    assert pixels[0, 0].nonzero().tolist() == [[r, c] for r in range(2) for c in range(3)]
    label = torch.zeros(1, 4, 6, dtype=torch.long)
    label[0, :2, :3] = 7
    score = VOCScore()
    score.add(tokens, label)  # the same as adding `pixels`
    assert score.result()["miou"] == 100.0


def test_head_masks_rules() -> None:
    maps = torch.tensor([0.5, 0.2, 0.2, 0.1]).view(1, 1, 2, 2)
    # mass: 0.5 < 0.6, 0.5 + 0.2 ≥ 0.6 → two patches, the tie between 1 and 2 broken by position
    assert head_masks(maps, 0.6, "mass").flatten().tolist() == [True, True, False, False]
    # entries: ⌈0.6 · 4⌉ = 3 patches, whatever their mass
    assert head_masks(maps, 0.6, "entries").flatten().tolist() == [True, True, True, False]
    ten = torch.rand(2, 3, 2, 5)
    assert (head_masks(ten, 0.6, "entries").flatten(-2).sum(-1) == 6).all()  # 0.6 · 10 is 6, not 7
    assert head_masks(ten, 1.0, "entries").all()
    with pytest.raises(InputError, match="rule 'top'"):
        head_masks(maps, 0.6, "top")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="keep = 0"):
        head_masks(maps, 0.0)


def gt_attention(labels: torch.Tensor, classes: int, *, complement: bool = False) -> torch.Tensor:
    """One head per class whose attention is spread evenly over that class's patches, or (`complement`) over the
    patches of no class, the background."""
    maps = torch.stack([labels == (0 if complement else c + 1) for c in range(classes)], dim=1).float()  # (B, K, h, w)
    return maps / maps.flatten(-2).sum(-1).clamp_min(1)[..., None, None]


def test_oracle_heads_score_100_and_their_complements_0() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (5, 6, 6), generator=gen)  # classes 0..3 on a 6 × 6 patch grid
    labels = tokens.repeat_interleave(4, 1).repeat_interleave(4, 2)  # patch 4: 24 × 24 pixels
    labels[:, ::7, ::5] = V  # void pixels, counted nowhere
    for complement, expected in ((False, 100.0), (True, 0.0)):
        masks = head_masks(gt_attention(tokens, 3, complement=complement), keep=1.0)  # mass 1: every patch > 0
        score = VOCScore()
        score.add(masks, labels)
        assert score.result()["miou"] == pytest.approx(expected, abs=1e-12)


def random_batch(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (n, 16, 16), generator=gen)
    labels[torch.rand(n, 16, 16, generator=gen) < 0.1] = V
    return torch.rand(n, 4, 4, 4, generator=gen) > 0.5, labels


def test_score_does_not_depend_on_batching_and_resumes() -> None:
    masks, labels = random_batch()
    whole = VOCScore()
    whole.add(masks, labels)
    split = VOCScore()
    for lo, hi in ((0, 3), (3, 4), (4, 7)):
        split.add(masks[lo:hi], labels[lo:hi])
    assert split.result() == whole.result()
    first = VOCScore()
    first.add(masks[:3], labels[:3])
    resumed = VOCScore.from_dict(json.loads(json.dumps(first.to_dict())))
    assert len(resumed) == 3
    resumed.add(masks[3:], labels[3:])
    assert resumed.result() == whole.result() and resumed.to_dict() == whole.to_dict()
    with pytest.raises(DataError, match="not a VOCScore state"):
        VOCScore.from_dict({"records": []})


def test_names_and_reference_figures() -> None:
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[-1] == "tvmonitor"
    assert PAPER_FIGURES["crate_small_21k_patch8"] == 23.9 and PAPER_FIGURES["vit_small_patch8_224.dino"] == 27.0


# --- VOC's files ---------------------------------------------------------------------------------------------------

def voc_folder(root: Path, names: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> Path:
    """A VOC layout: name → (RGB (H, W, 3), label (H, W) or None for no mask)."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, (rgb, label) in names.items():
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        if label is not None:
            save_label_png(root / "SegmentationClass" / f"{name}.png", label)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")
    return root


def test_palette_png_round_trip(tmp_path: Path) -> None:
    label = np.random.default_rng(0).choice([*range(21), V], size=(9, 13)).astype(np.uint8)
    root = voc_folder(tmp_path, {"2007_000001": (np.zeros((9, 13, 3), np.uint8), label)})
    assert read_split(root, "val") == ["2007_000001"]
    image, read = read_pair(root, "2007_000001")
    assert image.shape == (3, 9, 13) and image.dtype == torch.uint8
    assert read.dtype == torch.int64 and (read.numpy() == label).all()
    with Image.open(root / "SegmentationClass/2007_000001.png") as png:  # what a viewer shows: VOC's colours
        assert png.mode == "P"
        colours = np.asarray(png.convert("RGB"))
    assert colours[label == 1].tolist()[0] == [128, 0, 0] and colours[label == V].tolist()[0] == [224, 224, 192]
    assert voc_palette()[3 * 15: 3 * 16] == [192, 128, 128]  # person


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as err:
        read_split(tmp_path, "val")
    assert "ImageSets/Segmentation/val.txt" in one_line(err)
    rgb = np.zeros((8, 10, 3), np.uint8)
    root = voc_folder(tmp_path, {"no_mask": (rgb, None), "small": (rgb, np.zeros((8, 9), np.uint8)),
                                 "coloured": (rgb, None), "odd": (rgb, np.full((8, 10), 30, np.uint8))})
    Image.fromarray(rgb).save(root / "SegmentationClass/coloured.png")  # an RGB rendering, not indices
    with pytest.raises(MissingFileError) as err:
        read_pair(root, "no_mask")
    assert "SegmentationClass/no_mask.png" in one_line(err)
    with pytest.raises(DataError) as err:
        read_pair(root, "small")
    assert "SegmentationClass/small.png" in one_line(err) and "9x8" in str(err.value)
    with pytest.raises(DataError) as err:
        read_pair(root, "coloured")
    assert "coloured.png" in one_line(err) and "mode RGB" in str(err.value)
    with pytest.raises(DataError) as err:
        read_pair(root, "odd")
    assert "odd.png" in one_line(err) and "class index 30" in str(err.value)
    with pytest.raises(MissingFileError) as err:
        read_pair(root, "absent")
    assert "JPEGImages/absent.jpg" in one_line(err)


def test_demo_set_holds_the_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    names = write_demo_voc(tmp_path / "a", 6)
    assert read_split(tmp_path / "a", "val") == names
    targets = load_digits().target
    for i, name in enumerate(names):
        image, label = read_pair(tmp_path / "a", name)
        assert image.shape == (3, 32, 32) and label.shape == (32, 32)
        assert set(label.unique().tolist()) == {0, int(targets[i]) + 1, V}
        strokes, ring = label == targets[i] + 1, label == V
        assert strokes.sum() >= 30 and ring.sum() > 0
        grey = image.float().mean(0)
        assert grey[strokes].min() > grey[label == 0].max() - 30  # JPEG blurs a little, strokes stay brighter
        assert grey[strokes].mean() > 150 and grey[label == 0].mean() < 40
    write_demo_voc(tmp_path / "b", 6)
    for path in sorted((tmp_path / "a").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


# --- each model's view of a layer ----------------------------------------------------------------------------------

def is_distribution(view: LayerView, batch: int, heads: int, grid: tuple[int, int]) -> None:
    assert view.cls_attention.shape == (batch, heads, *grid) and view.grid == grid
    assert (view.cls_attention >= 0).all()
    torch.testing.assert_close(view.cls_attention.sum((-2, -1)), torch.ones(batch, heads))


@pytest.mark.parametrize("family", ["mae", "supervised", "alpha"])
def test_crate_view_is_mssa_view(family: str) -> None:
    model, _ = create_model(ClassifierConfig(family=family, variant="nano", num_classes=0))
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    assert num_layers(model) == 3
    view = layer_view(model, images, layer=1)
    is_distribution(view, 2, 4, (8, 12))
    assert view.features.shape == (2, 96, 64)
    reference = mssa_view(model, images, 1)
    torch.testing.assert_close(view.cls_attention, reference.cls_attention, rtol=0, atol=0)
    torch.testing.assert_close(view.features, reference.features, rtol=0, atol=0)
    torch.testing.assert_close(layer_view(model, images, -1).cls_attention, mssa_view(model, images, 2).cls_attention,
                               rtol=0, atol=0)
    with pytest.raises(InputError, match="layer 3: the model has 3 layers"):
        layer_view(model, images, 3)


def test_crate_mae_view() -> None:
    model, _ = create_model(MAEConfig(variant="nano"))
    is_distribution(layer_view(model, torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)), 1, 4, (8, 8))


def tiny_vit(**kwargs: object) -> nn.Module:
    """A 2-block, 3-head ViT on 32 px images, patch 8 (no weights are downloaded)."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             **kwargs).eval()


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vit_view_is_the_blocks_own_attention(reg_tokens: int) -> None:
    model = tiny_vit(reg_tokens=reg_tokens, dynamic_img_size=True)
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    view = layer_view(model, images, layer=0)
    is_distribution(view, 2, 3, (4, 6))
    # The oracle: timm's explicit attention path, its softmaxed matrix caught at attn_drop (identity in eval mode),
    # and the keys caught at qkv's output.
    caught: dict[str, torch.Tensor] = {}
    attn = model.blocks[0].attn
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda m, a, out: caught.setdefault("attn", out))
    attn.qkv.register_forward_hook(lambda m, a, out: caught.setdefault("qkv", out))
    mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        model(((images.float() / 255 - mean) / std))
    prefix = model.num_prefix_tokens
    assert prefix == 1 + reg_tokens
    row = caught["attn"][:, :, 0, prefix:]  # (B, H, N): CLS's row, patch columns
    torch.testing.assert_close(view.cls_attention.flatten(-2), row / row.sum(-1, keepdim=True))
    keys = caught["qkv"][:, prefix:, 192:384]  # (B, N, d): the middle third is K, heads concatenated
    torch.testing.assert_close(view.features, keys)
    assert num_layers(model) == 2


def test_every_layer_from_one_pass_equals_each_layer_alone() -> None:
    """`layer_views` reads several layers from one forward pass (what `--layers all` costs): each equals `layer_view`
    of that layer alone, for a CRATE model and a ViT, negative indices included."""
    torch.manual_seed(0)
    crate = create_model(ClassifierConfig(family="alpha", variant="nano", num_classes=0))[0]
    vit = tiny_vit(reg_tokens=1, dynamic_img_size=True)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for model, layers in ((crate, [0, 1, -1]), (vit, [0, -1])):
        views = layer_views(model, images, layers)
        assert list(views) == layers
        for layer in layers:
            alone = layer_view(model, images, layer)
            torch.testing.assert_close(views[layer].cls_attention, alone.cls_attention)
            torch.testing.assert_close(views[layer].features, alone.features)
            assert views[layer].grid == alone.grid


def test_vit_sizes_and_attentionless_models() -> None:
    fixed = tiny_vit()
    is_distribution(layer_view(fixed, torch.randn(1, 3, 32, 32), -1), 1, 3, (4, 4))  # floats: taken as normalised
    with pytest.raises(InputError) as err:
        layer_view(fixed, torch.randn(1, 3, 32, 48))
    assert "dynamic_img_size=True" in one_line(err)
    with pytest.raises(InputError, match="not divisible by patch size 8x8"):
        layer_view(tiny_vit(dynamic_img_size=True), torch.randn(1, 3, 32, 36))
    with pytest.raises(InputError) as err:
        layer_view(tiny_vit(class_token=False, global_pool="avg"), torch.randn(1, 3, 32, 32))
    assert "has no attention to read: it has no CLS token" in one_line(err)
    for model in (nn.Linear(3, 3), timm.create_model("resnet10t", pretrained=False)):
        with pytest.raises(InputError) as err:
            layer_view(model, torch.randn(1, 3, 32, 32))
        assert f"{type(model).__name__} has no attention to read" in one_line(err)
        with pytest.raises(InputError, match="has no attention to read"):
            num_layers(model)


def test_demo_set_through_a_crate_model(tmp_path: Path) -> None:
    """The whole chain on the digits set: read, view, threshold, upsample, score."""
    names = write_demo_voc(tmp_path, 4)
    pairs = [read_pair(tmp_path, name) for name in names]
    images, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    model, _ = create_model(ClassifierConfig(family="supervised", variant="nano", num_classes=0))
    view = layer_view(model, images)
    score = VOCScore(class_names=DIGIT_CLASSES)
    score.add(upsample(head_masks(view.cls_attention), labels.shape[-2:]), labels)
    result = score.result()
    assert result["images"] == 4 and 0 < result["miou"] < 100
    assert list(result["per_class"]) == [f"digit {k}" for k in range(10)]
