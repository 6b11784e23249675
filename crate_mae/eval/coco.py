"""COCO for MaskCut (crate_mae/eval/maskcut.py): the instance annotations made class-agnostic, MaskCut's masks as
COCO results, and class-agnostic box and mask AP from pycocotools' COCOeval, as CutLER (arXiv 2301.11320) and the
emergence paper (arXiv 2308.16271, Table 1) score unsupervised objects.

pycocotools is the optional extra `seg` (pip install -e ".[seg]"): this module imports without it, and each function
that needs it says so in one line.

- Ground truth: COCO's instances JSON with every annotation's category_id set to 1 and one category, "object" (what
  CutLER ships as coco_cls_agnostic_instances_val2017.json). `iscrowd` and `area` are kept as they are: a crowd
  annotation stays an ignore region (COCOeval neither counts a detection matched to it as a false positive nor
  counts it as an object to find), now for a detection of any class, since there are no classes left; `area` still
  sorts the objects into small, medium and large.
- Results: one entry per non-empty mask, category_id 1 and score 1.0 (MaskCut has no confidence; CutLER gives every
  mask 1.0), carrying both its tight box ("bbox", [x, y, w, h]) and its RLE ("segmentation"); `evaluate` keeps the
  one its iouType scores, because pycocotools' loadRes takes any entry with a box as a box result (and replaces
  its segmentation by the box's polygon).
- Ties: every score is 1.0, and COCOeval orders the detections of an image by score with a stable sort, so the
  submission order decides: give the masks in cut order and the images in ascending id.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from crate_mae.errors import ConfigError, CrateError, DataError, InputError, MissingFileError
from crate_mae.eval.maskcut import boxes

if TYPE_CHECKING:
    from pycocotools.coco import COCO

INSTALL = "scoring on COCO needs pycocotools: pip install -e \".[seg]\""
AGNOSTIC_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
# COCOeval.stats, in its order: AP over IoU 0.50:0.95, at 0.5 and 0.75, by object size; recall at 1, 10, 100 results
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


class CocoImage(NamedTuple):
    """One image of a COCO file, as the `images` list holds it."""

    id: int
    file_name: str
    height: int
    width: int


def _pycocotools() -> tuple[Any, Any, Any]:
    """(COCO, COCOeval, pycocotools.mask), or the one-line error that says how to install them."""
    try:
        from pycocotools import mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise CrateError(INSTALL) from None
    return COCO, COCOeval, mask


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pycocotools prints its progress (and COCOeval its table) on stdout: keep it out of ours."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def class_agnostic(dataset: dict[str, Any]) -> dict[str, Any]:
    """A COCO instances dataset (the parsed JSON) with one category: a copy whose annotations all have
    category_id 1 and whose `categories` is [{"id": 1, "name": "object"}]; iscrowd, area and the rest unchanged
    (module docstring). The input is not modified."""
    out = {k: v for k, v in dataset.items() if k not in ("annotations", "categories")}
    out["annotations"] = [{**ann, "category_id": 1} for ann in dataset.get("annotations", [])]
    out["categories"] = [dict(AGNOSTIC_CATEGORY)]
    return out


def coco_from(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO index of a dataset already in memory (the parsed JSON)."""
    coco_type, _, _ = _pycocotools()
    coco = coco_type()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _read_json(path: Path, what: str) -> Any:
    """The JSON held by `path`, a `what`; a missing or unreadable file is one line naming it."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable {what} ({err})") from None


def load_coco(path: str | Path, *, agnostic: bool = True) -> COCO:
    """The COCO instances file at `path` as a pycocotools index, class-agnostic (`class_agnostic`) unless
    `agnostic` is False."""
    _pycocotools()  # say what to install before reading a large file
    path = Path(path)
    dataset = _read_json(path, "COCO annotation file")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise DataError(f"{path}: not a COCO instances file (no list of images)")
    dataset.setdefault("annotations", [])
    dataset.setdefault("categories", [])
    return coco_from(class_agnostic(dataset) if agnostic else dataset)


def images(coco: COCO) -> list[CocoImage]:
    """The images of a COCO index in ascending id (the order to emit results in, module docstring)."""
    return [CocoImage(int(img["id"]), str(img["file_name"]), int(img["height"]), int(img["width"]))
            for img in sorted(coco.dataset["images"], key=lambda img: img["id"])]


def results(image_id: int, masks: torch.Tensor | np.ndarray, scores: Sequence[float] | None = None) -> list[dict]:
    """COCO result entries for one image's masks (K, H, W) bool at the image's own resolution: one per non-empty
    mask, in order, each {"image_id", "category_id": 1, "bbox": [x, y, w, h], "segmentation": RLE with its counts
    as str (JSON-ready), "score"}; `scores` (K,) default 1.0 each (module docstring)."""
    _, _, mask_api = _pycocotools()
    m = torch.as_tensor(masks).bool().cpu()
    if m.dim() != 3:
        raise InputError(f"results: image {image_id}: masks must be (K, H, W), got shape {tuple(m.shape)}")
    if scores is not None and len(scores) != m.shape[0]:
        raise InputError(f"results: image {image_id}: {len(scores)} scores for {m.shape[0]} masks")
    keep = [k for k in range(m.shape[0]) if bool(m[k].any())]  # CutLER drops masks of less than one pixel
    if not keep:
        return []
    # pycocotools encodes column-major (Fortran-ordered) uint8 (H, W, K) masks
    rles = mask_api.encode(np.asfortranarray(m[keep].permute(1, 2, 0).numpy().astype(np.uint8)))
    box = boxes(m[keep]).tolist()
    out = []
    for k, rle, b in zip(keep, rles, box):
        out.append({"image_id": int(image_id), "category_id": 1, "bbox": [float(v) for v in b],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "score": 1.0 if scores is None else float(scores[k])})
    return out


def evaluate(gt: str | Path | COCO, detections: list[dict] | str | Path, iou_type: str) -> dict[str, float]:
    """Class-agnostic COCO AP of `detections` (entries of `results`, or a JSON file of them) against `gt` (a COCO
    file or index) for `iou_type` "bbox" or "segm": COCOeval's twelve numbers (STATS) × 100, NaN where COCOeval
    has none (-1: no object of that size).

    Both sides are made class-agnostic: the ground truth by `class_agnostic` (unless it already has the one
    category 1), the detections by category_id 1. COCOeval then runs as CutLER's detectron2 evaluator does, with
    useCats on that one category; every detection may match every object. (useCats = 0 alone would not do: it
    pools only the ground truth's category ids, so detections of category 1 against a file with classes would be
    dropped.)
    """
    _, cocoeval, _ = _pycocotools()
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"evaluate: iou_type must be bbox or segm, got {iou_type!r}")
    coco_gt = load_coco(gt) if isinstance(gt, (str, Path)) else gt
    if sorted(coco_gt.getCatIds()) != [1]:
        coco_gt = coco_from(class_agnostic(coco_gt.dataset))
    if isinstance(detections, (str, Path)):
        path = Path(detections)
        detections = _read_json(path, "COCO results file")
        if not isinstance(detections, list):
            raise DataError(f"{path}: not a COCO results file (not a list of results)")
    drop = "segmentation" if iou_type == "bbox" else "bbox"  # loadRes decides the type by the keys (module docstring)
    # copies: loadRes writes into its entries (area, id, and a polygon for a box)
    dts = [{**{k: v for k, v in copy.deepcopy(d).items() if k != drop}, "category_id": 1} for d in detections]
    need = "bbox" if iou_type == "bbox" else "segmentation"
    lacking = next((i for i, d in enumerate(dts) if need not in d or "image_id" not in d), None)
    if lacking is not None:
        raise DataError(f"evaluate: result {lacking} has no {need!r} (or no image_id) to score as {iou_type}")
    known = set(coco_gt.getImgIds())
    stray = sorted({d["image_id"] for d in dts} - known)
    if stray:
        raise DataError(f"evaluate: results for image {stray[0]}, which the ground truth does not have "
                        f"({len(stray)} such image{'s' if len(stray) > 1 else ''})")
    with _quiet():
        if dts:
            coco_dt = coco_gt.loadRes(dts)
        else:  # loadRes cannot take an empty list; no detection at all scores 0
            coco_dt = coco_from({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                                 "annotations": []})
        ev = cocoeval(coco_gt, coco_dt, iou_type)  # useCats = 1 (its default), on the one category
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float("nan") if v < 0 else 100 * float(v) for name, v in zip(STATS, ev.stats)}
