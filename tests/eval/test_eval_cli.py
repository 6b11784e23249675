"""`python -m crate_mae.eval`: voc-seg end to end (every CRATE family, our timm names, timm's ViT), its resume after
--limit and after Ctrl-C, the digits demo, maskcut on a two-image COCO set, and the one-line errors. Tiny sets
(write_demo_voc's digits at 32 px) and nano models: the whole file runs in seconds."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crate_mae.config import ClassifierConfig, config_to_dict, load_config
from crate_mae.eval.__main__ import main
from crate_mae.eval.voc import write_demo_voc
from crate_mae.model import build_mae
from crate_mae.model.hub import create_model

try:
    import pycocotools  # noqa: F401
    HAVE_COCO = True
except ImportError:
    HAVE_COCO = False
needs_coco = pytest.mark.skipif(not HAVE_COCO, reason="pycocotools (the .[seg] extra) is not installed")
# pycocotools' decode under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 6


def run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_error(capsys: pytest.CaptureFixture, argv: list[str], status: int, *parts: str) -> str:
    """main(argv) fails with `status` and exactly one stderr line `error: ...` holding every part."""
    got, _, err = run(capsys, argv)
    lines = err.splitlines()
    assert got == status and len(lines) == 1 and lines[0].startswith("error: "), (got, err)
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six digits in VOC's layout, 32 px (read-only: tests that break it work on a copy)."""
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    write_demo_voc(root, N_IMAGES, size=32)
    return root


def save_classifier(path: Path, family: str) -> Path:
    """A fresh nano CRATE classifier of `family` saved with its config, as our stages save models."""
    model, cfg = create_model(ClassifierConfig(family=family, variant="nano", num_classes=10))
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(cfg)}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {family: save_classifier(folder / f"{family}.pth", family) for family in ("mae", "supervised", "alpha")}


def voc_args(voc: Path, out: Path, *extra: object) -> list[object]:
    return ["voc-seg", "--root", voc, "--img-size", 32, "--classes", "digits", "--out", out, *extra]


def layers_of(path: Path) -> dict:
    return json.loads(path.read_text())["layers"]


# --- voc-seg -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mae", "supervised", "alpha"])
def test_voc_seg_scores_every_layer_and_writes_masks(family: str, voc: Path, checkpoints: dict[str, Path],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, masks = tmp_path / "results.json", tmp_path / "masks"
    status, stdout, _ = run(capsys, voc_args(voc, out, "--checkpoint", checkpoints[family], "--layers", "all",
                                             "--batch", 4, "--save-masks", masks))
    assert status == 0
    record = json.loads(out.read_text())
    assert list(record["layers"]) == ["0", "1", "2"] and record["headline"]["layer"] == 2
    assert record["data"] == {"root": str(voc), "split": "val", "images": N_IMAGES, "scored": N_IMAGES,
                              "complete": True}
    for result in record["layers"].values():
        assert 0 <= result["miou"] <= 100 and result["images"] == N_IMAGES
        assert list(result["per_class"]) == [f"digit {k}" for k in range(10)]
    best = record["layers"]["2"]["best_single_head"]
    assert len(best["per_head"]) == 4 and best["miou"] == max(best["per_head"])
    assert "<- headline" in stdout and "per class IoU, layer 2" in stdout
    assert out.with_suffix(".png").stat().st_size > 0  # mIoU against the layer
    assert not out.with_name("results.partial.json").exists()  # removed once complete
    pngs = sorted(masks.glob("*.png"))
    assert [p.stem for p in pngs] == [f"digits_{i:04d}" for i in range(N_IMAGES)]
    rescored = []  # the masks re-scored from the PNGs alone, from the IoU's definition: they give the run's mIoU
    for png in pngs:
        with Image.open(png) as img:
            assert img.mode == "P" and img.size == (32, 32)  # the image's own size
            mask = np.asarray(img)
        with Image.open(voc / "SegmentationClass" / png.name) as gt:
            label = np.asarray(gt)
        valid, cls = label != 255, int(np.setdiff1d(np.unique(label), [0, 255])[0])  # one digit per image
        assert set(np.unique(mask).tolist()) <= {0, cls}  # VOC's label indices: the image's own class
        pred, truth = (mask == cls) & valid, (label == cls) & valid
        rescored.append((pred & truth).sum() / (pred | truth).sum())
    assert 100 * np.mean(rescored) == pytest.approx(record["layers"]["2"]["miou"], abs=1e-9)


def test_voc_seg_takes_our_timm_names_with_a_weights_file(voc: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import timm

    torch.save(timm.create_model("crate_mae_encoder_nano").state_dict(), tmp_path / "w.pth")
    out = tmp_path / "r.json"
    status, stdout, _ = run(capsys, voc_args(voc, out, "--model", "crate_mae_encoder_nano", "--weights",
                                             tmp_path / "w.pth", "--layers", "0,-1"))
    assert status == 0 and list(layers_of(out)) == ["0", "2"]
    assert "crate_mae_encoder_nano (w.pth)" in stdout


def test_voc_seg_timm_vit_baseline(voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A timm ViT from the user's weights file (nothing downloaded), at a size other than its 224 px."""
    import timm

    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "vit.json"
    status, _, _ = run(capsys, voc_args(voc, out, "--model", "vit_tiny_patch16_224", "--weights", tmp_path / "vit.pth",
                                        "--layers", "0,-1", "--img-size", 64))
    assert status == 0
    record = json.loads(out.read_text())
    assert list(record["layers"]) == ["0", "11"] and record["protocol"]["img_size"] == 64
    assert len(record["layers"]["11"]["best_single_head"]["per_head"]) == 3
    # a tagged name with a paper figure, fresh weights (no file: no download either)
    status, stdout, _ = run(capsys, voc_args(voc, tmp_path / "dino.json", "--model", "vit_small_patch8_224.dino"))
    assert status == 0 and "(paper: 27.0)" in stdout
    assert json.loads((tmp_path / "dino.json").read_text())["headline"]["paper"] == 27.0


def test_a_run_stopped_by_limit_goes_on_to_the_uninterrupted_result(voc: Path, checkpoints: dict[str, Path],
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    model = ["--checkpoint", checkpoints["mae"], "--layers", "all", "--batch", 2]
    assert run(capsys, voc_args(voc, tmp_path / "whole.json", *model))[0] == 0
    out = tmp_path / "parts.json"
    partial = tmp_path / "parts.partial.json"
    # --limit a multiple of --batch: the batches are the same as in one go (a batch's floats may depend on its size)
    status, stdout, _ = run(capsys, voc_args(voc, out, *model, "--limit", 4, "--save-every", 1))
    assert status == 0 and partial.exists() and "scored 4 of 6 images" in stdout
    assert json.loads(out.read_text())["data"]["complete"] is False
    assert json.loads(partial.read_text())["done"] == 4
    status, stdout, _ = run(capsys, voc_args(voc, out, *model))
    assert status == 0 and "resuming: 4 images done already" in stdout and not partial.exists()
    assert layers_of(out) == layers_of(tmp_path / "whole.json")


def test_other_settings_than_the_partial_files_are_one_line(voc: Path, checkpoints: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    args = voc_args(voc, tmp_path / "r.json", "--checkpoint", checkpoints["mae"])
    assert run(capsys, [*args, "--limit", 2])[0] == 0
    one_error(capsys, [*args, "--keep", 0.5], 1, "r.partial.json: a partial run with other settings",
              "keep: 0.6 there, 0.5 now", "--restart")
    status, stdout, _ = run(capsys, [*args, "--keep", 0.5, "--restart"])
    assert status == 0 and "resuming" not in stdout and json.loads((tmp_path / "r.json").read_text())[
        "protocol"]["keep"] == 0.5


def test_ctrl_c_saves_the_batches_done_and_the_rerun_goes_on(voc: Path, checkpoints: dict[str, Path],
                                                             tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import crate_mae.eval.segment as segment

    model = ["--checkpoint", checkpoints["supervised"], "--batch", 2, "--save-every", 100]
    assert run(capsys, voc_args(voc, tmp_path / "whole.json", *model))[0] == 0
    real, calls = segment.layer_views, []

    def interrupted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:  # inside the third batch: images 0-3 are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(segment, "layer_views", interrupted)
    out = tmp_path / "r.json"
    status, _, err = run(capsys, voc_args(voc, out, *model))
    assert status == 130 and err.splitlines() == [
        "stopped: interrupted after 4 of 6 images, which the partial file holds: the same command goes on from there"]
    assert json.loads((tmp_path / "r.partial.json").read_text())["done"] == 4 and not out.exists()
    monkeypatch.setattr(segment, "layer_views", real)
    status, stdout, _ = run(capsys, voc_args(voc, out, *model))
    assert status == 0 and "resuming: 4 images" in stdout
    assert layers_of(out) == layers_of(tmp_path / "whole.json")


def test_demo_scores_the_demo_encoder_against_a_random_one(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    one_error(capsys, ["voc-seg", "--demo"], 1, "runs/demo/encoder.pth: no such file", "python pretrain.py")
    cfg = load_config(None, ["model.variant=nano"])  # as pretraining exports its encoder, nano-sized
    encoder = {k: v for k, v in build_mae(cfg.model).state_dict().items()
               if not k.startswith(("mask_token", "decoder"))}
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    torch.save({"model": encoder, "config": config_to_dict(cfg)}, tmp_path / "runs/demo/encoder.pth")
    status, stdout, _ = run(capsys, ["voc-seg", "--demo", "--demo-images", 8])
    assert status == 0
    trained = [line for line in stdout.splitlines() if line.startswith("trained (runs/demo/encoder.pth), layer 2")]
    random = [line for line in stdout.splitlines() if line.startswith("random init (same shape, seed 0), layer 2")]
    assert len(trained) == len(random) == 1
    numbers = [float(line.rsplit("mIoU ", 1)[1]) for line in (*trained, *random)]
    folder = tmp_path / "runs/eval/demo-encoder"
    record = json.loads((folder / "voc-demo.json").read_text())
    assert [round(record["headline"][k], 1) for k in ("trained", "random")] == numbers
    assert list(record["trained"]) == ["0", "1", "2"] and record["data"]["images"] == 8
    assert (folder / "voc-demo-masks.png").stat().st_size > 0 and (folder / "voc-demo.png").stat().st_size > 0


# --- maskcut -------------------------------------------------------------------------------------------------------

def write_coco(folder: Path) -> tuple[Path, Path]:
    """Two images of other sizes than the model's (40 × 56, 48 × 32), a red block on grey in each, the block's
    mask the one annotation (category 3: scored class-agnostic); ids 9 and 4, listed out of order."""
    from pycocotools import mask as mask_api

    images_dir = folder / "val2017"
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for image_id, (h, w), (y0, y1, x0, x1) in ((9, (40, 56), (8, 26, 10, 34)), (4, (48, 32), (20, 40, 6, 22))):
        pixels = np.full((h, w, 3), 40, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 1
        pixels[mask.astype(bool)] = (210, 50, 50)
        Image.fromarray(pixels).save(images_dir / f"{image_id:012d}.png")
        rle = mask_api.encode(np.asfortranarray(mask))
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                     "area": float(mask_api.area(rle)), "bbox": mask_api.toBbox(rle).tolist(),
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
        images.append({"id": image_id, "file_name": f"{image_id:012d}.png", "height": h, "width": w})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 3, "name": "car"}]}))
    return images_dir, path


@needs_coco
def test_maskcut_end_to_end_and_resumed(checkpoints: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    from crate_mae.eval.coco import evaluate

    images, annotations = write_coco(tmp_path)
    args = ["maskcut", "--images", images, "--annotations", annotations, "--checkpoint", checkpoints["mae"],
            "--img-size", 32, "--batch", 1]  # batch 1: the resumed run's batches are the same
    out, preds = tmp_path / "mc.json", tmp_path / "preds.json"
    status, stdout, _ = run(capsys, [*args, "--layers", "all", "--out", out, "--save-predictions", preds])
    assert status == 0 and "<- headline" in stdout
    record = json.loads(out.read_text())
    assert list(record["layers"]) == ["0", "1", "2"] and record["protocol"]["objects"] == 3
    for layer, result in record["layers"].items():
        for iou_type in ("bbox", "segm"):
            assert all(0 <= result[iou_type][k] <= 100 for k in ("AP", "AP50", "AP75"))
        entries = json.loads((tmp_path / f"preds-layer{layer}.json").read_text())
        assert len(entries) == result["predictions"] >= 2  # the first cut of each image is never rejected
        assert [e["image_id"] for e in entries] == sorted(e["image_id"] for e in entries)  # ascending ids
        assert {e["image_id"]: tuple(e["segmentation"]["size"]) for e in entries} == {4: (48, 32), 9: (40, 56)}
        assert evaluate(annotations, entries, "segm")["AP"] == pytest.approx(result["segm"]["AP"])
    assert record["headline"]["bbox"] == {k: record["layers"]["2"]["bbox"][k] for k in ("AP", "AP50", "AP75")}
    # one image now, the other on the rerun: the same predictions as in one go
    one = tmp_path / "one.json"
    status, stdout, _ = run(capsys, [*args, "--limit", 1, "--out", one, "--save-predictions", tmp_path / "p1.json"])
    assert status == 0 and "scored 1 of 2 images" in stdout
    assert {e["image_id"] for e in json.loads((tmp_path / "p1.json").read_text())} == {4}
    status, stdout, _ = run(capsys, [*args, "--out", one, "--save-predictions", tmp_path / "p1.json"])
    assert status == 0 and "resuming: 1 image done already" in stdout
    assert (tmp_path / "p1.json").read_text() == (tmp_path / "preds-layer2.json").read_text()
    assert json.loads(one.read_text())["layers"]["2"] == record["layers"]["2"]


# --- one-line errors -----------------------------------------------------------------------------------------------

def test_bad_voc_files_are_one_line_each(voc: Path, checkpoints: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    model = ["--checkpoint", checkpoints["supervised"]]
    one_error(capsys, voc_args(tmp_path / "nowhere", tmp_path / "r.json", *model), 1, "no split file 'val'")
    one_error(capsys, voc_args(voc, tmp_path / "r.json", *model, "--split", "train"), 1, "train.txt: no split file")
    broken = tmp_path / "broken"
    shutil.copytree(voc, broken)
    (broken / "SegmentationClass" / "digits_0003.png").unlink()
    one_error(capsys, voc_args(broken, tmp_path / "r.json", *model), 1,
              "digits_0003.png: the mask of digits_0003.jpg is missing")
    shutil.copy(voc / "SegmentationClass" / "digits_0000.png", broken / "SegmentationClass" / "digits_0003.png")
    with Image.open(voc / "SegmentationClass" / "digits_0004.png") as mask:
        mask.resize((16, 16), Image.Resampling.NEAREST).save(broken / "SegmentationClass" / "digits_0004.png")
    one_error(capsys, voc_args(broken, tmp_path / "r2.json", *model), 1,
              "digits_0004.png: mask is 16x16 (WxH) but its image digits_0004.jpg is 32x32")


def test_bad_models_and_arguments_are_one_line_each(voc: Path, checkpoints: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    one_error(capsys, voc_args(voc, out, "--model", "resnet18"), 1, "--model resnet18: ResNet has no attention to read")
    one_error(capsys, voc_args(voc, out, "--model", "no_such_net"), 1, "neither one of ours")
    one_error(capsys, voc_args(voc, out, "--model", "crate_nano", "--weights", tmp_path / "w.pth"), 1,
              "w.pth: no such weights file")
    one_error(capsys, voc_args(voc, out, "--checkpoint", tmp_path / "c.pth"), 1, "c.pth: no such checkpoint file")
    (tmp_path / "vit.pth").write_bytes(b"not a checkpoint")
    one_error(capsys, voc_args(voc, out, "--model", "vit_tiny_patch16_224", "--weights", tmp_path / "vit.pth"), 1,
              "vit.pth: does not load into vit_tiny_patch16_224")
    model = ["--checkpoint", checkpoints["mae"]]
    one_error(capsys, voc_args(voc, out, *model, "--img-size", 30), 2, "--img-size 30", "(4x4) must divide")
    one_error(capsys, voc_args(voc, out, *model, "--layers", "3"), 2, "--layers 3: layer 3 is out of range")
    one_error(capsys, voc_args(voc, out, *model, "--layers", "a,b"), 2, "a comma list of integers")
    one_error(capsys, voc_args(voc, out, *model, "--keep", 0), 2, "--keep 0")
    one_error(capsys, voc_args(voc, out, *model, "--batch", 0), 2, "--batch 0")
    one_error(capsys, ["voc-seg", *model], 2, "needs --root")
    one_error(capsys, voc_args(voc, out), 2, "give --model NAME")
    one_error(capsys, ["maskcut", "--images", tmp_path, "--annotations", tmp_path / "a.json", *model, "--tau", 1.5], 2,
              "--tau 1.5")


@needs_coco
def test_bad_coco_inputs_are_one_line_each(checkpoints: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    images, annotations = write_coco(tmp_path)
    args = ["maskcut", "--images", images, "--checkpoint", checkpoints["mae"], "--img-size", 32]
    one_error(capsys, [*args, "--annotations", tmp_path / "none.json"], 1, "none.json: no such COCO annotation file")
    (images / "000000000004.png").unlink()
    one_error(capsys, [*args, "--annotations", annotations], 1,
              "000000000004.png: image 4 of the annotations is missing")
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    one_error(capsys, [*args, "--annotations", annotations], 1, "needs pycocotools", 'pip install -e ".[seg]"')


def test_help_answers_without_importing_torch() -> None:
    done = subprocess.run([sys.executable, "-m", "crate_mae.eval", "voc-seg", "--help"], cwd=ROOT, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--save-masks" in done.stdout and "--demo" in done.stdout
    probe = ("import sys; from crate_mae.eval.__main__ import build_parser; build_parser(); "
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("family", ["supervised", "alpha", "vit"])
def test_maskcut_takes_every_family_and_the_vit_baseline(family: str, checkpoints: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """maskcut end to end for the other families (family mae above) and a timm ViT from a weights file: valid
    predictions at each image's own size and AP figures for boxes and masks."""
    import timm

    images, annotations = write_coco(tmp_path)
    if family == "vit":
        torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "vit.pth")
        model = ["--model", "vit_tiny_patch16_224", "--weights", tmp_path / "vit.pth", "--img-size", 64]
    else:
        model = ["--checkpoint", checkpoints[family], "--img-size", 32]
    out, preds = tmp_path / "mc.json", tmp_path / "preds.json"
    status, _, _ = run(capsys, ["maskcut", "--images", images, "--annotations", annotations, *model, "--out", out,
                                "--save-predictions", preds])
    assert status == 0
    entries = json.loads(preds.read_text())
    assert len(entries) >= 2 and {e["image_id"]: tuple(e["segmentation"]["size"]) for e in entries} == \
        {4: (48, 32), 9: (40, 56)}
    headline = json.loads(out.read_text())["headline"]
    assert all(0 <= headline[t][k] <= 100 for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75"))
