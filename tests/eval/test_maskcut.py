"""MaskCut (crate_mae/eval/maskcut.py) on synthetic patch features and on a nano CRATE's MSSA features, and its COCO
scoring (crate_mae/eval/coco.py) on a one-image COCO file written here."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import crate_mae.eval.maskcut as maskcut_module
from crate_mae.config import ClassifierConfig
from crate_mae.errors import CrateError, InputError
from crate_mae.eval.maskcut import boxes, mask_iou, maskcut, rejected, seed_component, to_pixels
from crate_mae.model import build_classifier
from crate_mae.viz.attention import mssa_view
from crate_mae.viz.ncut import affinity, fiedler_vector

try:
    import pycocotools  # noqa: F401
    HAVE_COCO = True
except ImportError:
    HAVE_COCO = False
needs_coco = pytest.mark.skipif(not HAVE_COCO, reason="pycocotools (the .[seg] extra, in .[test]: "
                                                     "pip install -e \".[seg]\") is not installed")

GRID = (16, 16)
# pycocotools' decode under numpy 2 (annToMask, in the tests only)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def blob_regions(tiny: bool = False) -> torch.Tensor:
    """A 16 × 16 patch grid of region labels: background 0 and three blobs of 25, 18 and 16 patches (1, 3, 2),
    apart from each other and from the border; `tiny` adds a blob 4 of 2 patches (0.8 % of the grid)."""
    r = torch.zeros(GRID, dtype=torch.long)
    r[2:7, 2:7] = 1
    r[9:13, 10:14] = 2
    r[11:14, 2:8] = 3
    if tiny:
        r[3, 12:14] = 4
    return r


def region_features(regions: torch.Tensor, *, d: int = 32, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """Patch features (N, d): one random orthonormal direction per region plus a little noise, so that the cosine
    is ≈ 1 within a region and ≈ 0 (far below τ = 0.15) across: the binarised graph is exactly the regions."""
    gen = torch.Generator().manual_seed(seed)
    directions, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    k = int(regions.max()) + 1
    f = directions[:k][regions.flatten()] + noise * torch.randn(regions.numel(), d, generator=gen, dtype=torch.float64)
    return f.float()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(mask_iou(a[None], b[None])[0])


def test_maskcut_finds_the_three_blobs_one_per_cut() -> None:
    regions = blob_regions()
    features = region_features(regions)
    masks = maskcut(features, GRID)
    assert masks.shape == (3, *GRID) and masks.dtype == torch.bool
    # The cut order: the largest blob first (its side of the cut is the smallest, so its |x| the largest), then 18, 16
    for mask, blob in zip(masks, (1, 3, 2)):
        assert _iou(mask, regions == blob) > 0.9
    # The first cut's object side holds all three blobs: only the seed's connected component is kept
    x = fiedler_vector(affinity(features))
    side = (x > x.mean()).view(GRID)
    assert torch.equal(side, regions > 0) and torch.equal(masks[0], regions == 1)
    # A fourth cut has nothing left: the background holds the corners, the other side is found already
    more = maskcut(features, GRID, objects=4)
    assert torch.equal(more[:3], masks) and not more[3].any()


def test_the_corner_rule_takes_the_side_without_the_corners() -> None:
    """A frame (112 patches, all four corners) around a square (144): the frame's side has the largest |x| (the
    smaller side of a cut has), but holds the corners, so the square is the object."""
    regions = torch.zeros(GRID, dtype=torch.long)
    regions[2:14, 2:14] = 1
    features = region_features(regions)
    x = fiedler_vector(affinity(features))
    assert regions.flatten()[x.abs().argmax()] == 0  # the seed rule alone would take the frame
    assert torch.equal(maskcut(features, GRID, objects=1)[0], regions == 1)


def test_a_tiny_object_is_rejected_after_the_first_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    regions = blob_regions(tiny=True)
    features = region_features(regions)
    masks = maskcut(features, GRID, objects=5)
    for mask, blob in zip(masks, (1, 3, 2)):
        assert torch.equal(mask, regions == blob)
    assert not masks[3:].any()  # the 2-patch blob (≤ 1 % of 256) is cut 4, and again cut 5: rejected both times
    monkeypatch.setattr(maskcut_module, "MIN_AREA", 0.0)
    assert torch.equal(maskcut(features, GRID, objects=5)[3], regions == 4)


def test_rejection_of_small_and_overlapping_masks() -> None:
    n = 100
    previous = torch.zeros(4, n, dtype=torch.bool)
    previous[:, :20] = True
    mask = torch.zeros(4, n, dtype=torch.bool)
    mask[0, :1] = True  # 1 % of the grid: too small (≤)
    mask[1, 10:30] = True  # IoU 10 / 30 with the previous: kept
    mask[2, 5:25] = True  # IoU 15 / 25 = 0.6 > 0.5: the same object again
    mask[3, 50:52] = True  # 2 %, apart: kept
    assert rejected(mask, previous).tolist() == [True, False, True, False]
    assert mask_iou(torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)).tolist() == [0.0]


def test_found_patches_are_masked_out_for_the_next_cut() -> None:
    """Cut 2 is cut 1 of the same features with cut 1's patches set to zero (less those patches)."""
    regions = blob_regions()
    features = region_features(regions, seed=3)
    first, second = maskcut(features, GRID, objects=2)
    masked = features.masked_fill(first.flatten()[:, None], 0)
    again = maskcut(masked, GRID, objects=1)[0]
    assert torch.equal(second, again & ~first) and second.any()
    assert not torch.equal(maskcut(features, GRID, objects=1)[0], again)  # without the masking: cut 1 again


def test_batched_equals_per_image() -> None:
    regions = [blob_regions(), blob_regions(tiny=True), blob_regions().flip(0), blob_regions().T.contiguous()]
    features = torch.stack([region_features(r, seed=i, noise=0.1) for i, r in enumerate(regions)])
    together = maskcut(features, GRID)
    assert together.shape == (4, 3, *GRID)
    for i in range(4):
        assert torch.equal(together[i], maskcut(features[i], GRID))
    assert not (together.sum(1) > 1).any()  # each image's masks are disjoint


def test_seed_component_is_scipys_4_connected_label() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    gen = torch.Generator().manual_seed(0)
    fg = torch.rand(6, 12, 9, generator=gen) > 0.45
    seed = torch.randint(0, 12 * 9, (6,), generator=gen)
    comp = seed_component(fg, seed)
    for i in range(6):
        labels, _ = ndimage.label(fg[i].numpy())  # the default structure: 4-connectivity
        label = labels.reshape(-1)[int(seed[i])]
        expected = labels == label if label else np.zeros_like(labels, dtype=bool)
        assert np.array_equal(comp[i].numpy(), expected)


def test_maskcut_refuses_a_grid_that_does_not_fit() -> None:
    with pytest.raises(InputError, match=r"grid 4 × 5 does not hold the features' 16 patches"):
        maskcut(torch.randn(16, 8), (4, 5))
    with pytest.raises(InputError, match=r"\(N, d\) or \(B, N, d\)"):
        maskcut(torch.randn(16), (4, 4))


def test_to_pixels_and_boxes() -> None:
    masks = torch.zeros(3, 2, 3, dtype=torch.bool)
    masks[0, 0, 1] = True  # patch (row 0, column 1)
    masks[1, 1, :] = True  # the bottom row
    up = to_pixels(masks, (4, 6))  # ×2 exactly: each patch is 2 × 2 pixels
    assert up.shape == (3, 4, 6)
    assert torch.equal(up[0], masks[0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert boxes(up).tolist() == [[2, 0, 2, 2], [0, 2, 6, 2], [0, 0, 0, 0]]  # [x, y, w, h]; empty: zeros
    # 2 × 3 patches on 5 × 7 pixels: the block edges at rows 2.5 and columns 2.33, 4.67; each pixel takes the patch
    # its centre (j + 0.5) falls in, a centre on an edge the later patch
    odd = to_pixels(masks, (5, 7))
    assert boxes(odd)[:2].tolist() == [[2, 0, 3, 2], [0, 2, 7, 3]]
    smooth = to_pixels(masks, (5, 7), mode="bilinear")
    assert not (smooth[0] & smooth[1]).any() and smooth[1, -1].all()
    grid = torch.zeros(2, 7, 9, dtype=torch.bool)
    grid[0, 1:4, 2:8] = True
    grid[1, 6, 0] = True
    assert boxes(grid).tolist() == [[2, 1, 6, 3], [0, 6, 1, 1]]


def test_maskcut_on_a_nano_crates_mssa_features() -> None:
    """End to end: the patch rows of W = U·LN₁(z) of a fresh nano CRATE, whose inner products are CRATE's
    M_ij = Σ_k ⟨U_k* z_i, U_k* z_j⟩, through MaskCut to masks and boxes at image resolution."""
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(variant="nano", num_classes=10)).eval()
    img = torch.full((2, 3, 32, 32), 40, dtype=torch.uint8)
    img[0, 0, 8:24, 8:24] = 220  # a red square
    img[1, 2, 4:16, 16:28] = 220  # a blue one elsewhere
    img = (img.float() + 20 * torch.randn(img.shape)).clamp(0, 255).to(torch.uint8)
    view = mssa_view(model, img, layer=-1, stride=2)
    assert view.features.shape == (2, 15 * 15, 64) and view.grid == (15, 15)
    masks = maskcut(view.features, view.grid)
    assert masks.shape == (2, 3, 15, 15) and masks.dtype == torch.bool
    assert masks[:, 0].any(dim=(1, 2)).all()  # the first cut is never rejected
    assert not (masks.sum(1) > 1).any()
    pixels = to_pixels(masks, (32, 32))
    assert pixels.shape == (2, 3, 32, 32) and boxes(pixels).shape == (2, 3, 4)


# COCO: one 40 × 60 image, two objects of two classes: a polygon and an RLE

H, W = 40, 60


def _gt_dataset() -> dict:
    from pycocotools import mask as mask_api

    polygon = [5.0, 4.0, 25.0, 4.0, 25.0, 20.0, 5.0, 20.0]
    poly_rle = mask_api.merge(mask_api.frPyObjects([polygon], H, W))
    blob = np.zeros((H, W), dtype=np.uint8)
    blob[22:36, 30:55] = 1
    blob[22:26, 30:34] = 0  # not a box: a notch
    rle = mask_api.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [{"id": 1, "image_id": 7, "category_id": 2, "segmentation": [polygon], "iscrowd": 0,
             "area": float(mask_api.area(poly_rle)), "bbox": mask_api.toBbox(poly_rle).tolist()},
            {"id": 2, "image_id": 7, "category_id": 5, "segmentation": rle, "iscrowd": 0,
             "area": float(mask_api.area(rle)), "bbox": mask_api.toBbox(rle).tolist()}]
    return {"images": [{"id": 7, "file_name": "000007.jpg", "height": H, "width": W}], "annotations": anns,
            "categories": [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}]}


@pytest.fixture
def gt_file(tmp_path: Path) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_gt_dataset()))
    return path


def _gt_masks(gt_file: Path) -> torch.Tensor:
    from crate_mae.eval.coco import load_coco

    coco = load_coco(gt_file)
    return torch.stack([torch.from_numpy(coco.annToMask(a)).bool() for a in coco.loadAnns(coco.getAnnIds())])


@needs_coco
def test_class_agnostic_ground_truth(gt_file: Path) -> None:
    from crate_mae.eval.coco import class_agnostic, images, load_coco

    original = _gt_dataset()
    agnostic = class_agnostic(original)
    assert [a["category_id"] for a in agnostic["annotations"]] == [1, 1]
    assert agnostic["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    for before, after in zip(original["annotations"], agnostic["annotations"]):
        assert {k: v for k, v in after.items() if k != "category_id"} == \
               {k: v for k, v in before.items() if k != "category_id"}  # iscrowd, area, segmentation kept
    assert [a["category_id"] for a in original["annotations"]] == [2, 5]  # the input is left alone
    coco = load_coco(gt_file)
    assert coco.getCatIds() == [1] and len(coco.getAnnIds(catIds=[1])) == 2
    assert load_coco(gt_file, agnostic=False).getCatIds() == [2, 5]
    assert images(coco) == [(7, "000007.jpg", H, W)]


@needs_coco
def test_results_entries_are_json_ready_rle_and_boxes(gt_file: Path) -> None:
    from pycocotools import mask as mask_api

    from crate_mae.eval.coco import results

    masks = torch.cat([_gt_masks(gt_file), torch.zeros(1, H, W, dtype=torch.bool)])  # an empty (rejected) mask
    entries = results(7, masks)
    assert len(entries) == 2  # the empty one is left out
    json.dumps(entries)
    for entry, mask in zip(entries, masks):
        assert entry["category_id"] == 1 and entry["score"] == 1.0 and entry["image_id"] == 7
        rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_api.decode(rle), mask.numpy())
        assert entry["bbox"] == mask_api.toBbox(rle).tolist()
    assert [e["score"] for e in results(7, masks, scores=[0.5, 0.25, 0.1])] == [0.5, 0.25]


@needs_coco
def test_coco_ap_of_perfect_shifted_and_missing_predictions(gt_file: Path, tmp_path: Path) -> None:
    from crate_mae.eval.coco import evaluate, load_coco, results

    masks = _gt_masks(gt_file)
    perfect = results(7, masks)
    for iou_type in ("bbox", "segm"):
        stats = evaluate(gt_file, perfect, iou_type)
        assert stats["AP"] == stats["AP50"] == stats["AP75"] == pytest.approx(100.0)
        assert stats["AR100"] == pytest.approx(100.0) and np.isnan(stats["APl"])  # no large (> 96²) object
        # the same numbers against the file with its two classes: evaluate scores class-agnostic whatever it gets
        assert evaluate(load_coco(gt_file, agnostic=False), perfect, iou_type) == pytest.approx(stats, nan_ok=True)
    shifted = results(7, masks.roll(3, dims=2))  # 3 pixels to the right
    missing = results(7, masks[:1])
    for iou_type in ("bbox", "segm"):
        moved = evaluate(gt_file, shifted, iou_type)
        assert moved["AP50"] == pytest.approx(100.0) and moved["AP"] < 90 and moved["AP75"] < 100
        half = evaluate(gt_file, missing, iou_type)
        assert half["AR100"] == pytest.approx(50.0)
        assert half["AP"] == pytest.approx(100 * 51 / 101)  # precision 1 up to recall 0.5: 51 of the 101 points
        assert evaluate(gt_file, [], iou_type)["AP"] == 0.0
    path = tmp_path / "results.json"
    path.write_text(json.dumps(perfect))
    assert evaluate(gt_file, path, "segm")["AP"] == pytest.approx(100.0)  # a results file, as the CLI writes
    assert "bbox" in perfect[0] and "segmentation" in perfect[0]  # evaluate works on copies


@needs_coco
def test_results_for_an_unknown_image_or_without_the_scored_key_are_refused(gt_file: Path) -> None:
    from crate_mae.eval.coco import evaluate, results

    with pytest.raises(CrateError, match="results for image 8, which the ground truth does not have"):
        evaluate(gt_file, results(8, _gt_masks(gt_file)), "bbox")
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results(7, _gt_masks(gt_file))]
    assert evaluate(gt_file, boxes_only, "bbox")["AP"] == pytest.approx(100.0)
    with pytest.raises(CrateError, match="result 0 has no 'segmentation'"):
        evaluate(gt_file, boxes_only, "segm")


def test_coco_imports_without_pycocotools_and_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import crate_mae.eval.coco as coco

    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    coco = importlib.reload(coco)
    try:
        with pytest.raises(CrateError, match=r'pip install -e "\.\[seg\]"'):
            coco.results(1, torch.ones(1, 2, 2, dtype=torch.bool))
        with pytest.raises(CrateError, match="needs pycocotools"):
            coco.evaluate("instances.json", [], "segm")
    finally:
        monkeypatch.undo()
        importlib.reload(coco)
