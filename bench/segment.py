"""How fast the segmentation measures run: `python -m crate_mae.eval voc-seg` and `maskcut` on synthetic images,
at the paper's size, with the small patch-8 CRATE (fresh weights), projected to the real sets.

    python bench/segment.py                                  # CPU: 480 px, crate_small_21k_patch8 (60 × 60 tokens)
    python bench/segment.py --device cuda --n 32 --n-all 8 --maskcut-n 8 --json segment.json

Each figure is the wall time of the command in-process (the model built, the images read and resized, the partial
file written: everything but Python's start-up), on `--n` images for voc-seg's last layer, `--n-all` for every layer
(read from one forward pass, `heads.layer_views`: the extra cost is each layer's masks and scores), and
`--maskcut-n` for maskcut's last layer (3 normalised cuts per image, each a dense N × N float64 eigenproblem,
N = 3,600 at 480 px). Images per second are projected to VOC12 val (1,449 images) and COCO val2017 (5,000).
The images are smooth random 500 × 375 pictures with two labelled blobs, as VOC's and COCO's sizes are.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

VOC_VAL, COCO_VAL = 1449, 5000


def write_sets(root: Path, n: int) -> tuple[Path, Path, Path]:
    """n images in VOC's layout (JPEG, palette masks of two classes) and the same images as a COCO set."""
    import numpy as np
    from PIL import Image

    from crate_mae.eval.voc import save_label_png

    voc = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names, images, anns = [], [], []
    height, width = 375, 500
    for i in range(n):
        name = f"bench_{i:04d}"
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        label = np.zeros((height, width), np.uint8)
        label[60:220, 80:260] = 1 + i % 20
        label[200:340, 300:470] = 1 + (i + 7) % 20
        picture.save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        save_label_png(voc / "SegmentationClass" / f"{name}.png", label)
        names.append(name)
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": height, "width": width})
        for k, (x, y, w, h) in enumerate(((80, 60, 180, 160), (300, 200, 170, 140))):
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append({"id": 2 * i + k + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": w * h,
                         "bbox": [x, y, w, h], "segmentation": [polygon]})
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    annotations = root / "instances.json"
    annotations.write_text(json.dumps({"images": images, "annotations": anns,
                                       "categories": [{"id": 1, "name": "thing"}]}))
    return voc, voc / "JPEGImages", annotations


def timed(argv: list[str]) -> float:
    """Wall seconds of `python -m crate_mae.eval ARGV`, in-process, its output kept out of ours."""
    from crate_mae.eval.__main__ import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    if status != 0:
        raise SystemExit(f"{' '.join(argv)}: exit status {status}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="crate_small_21k_patch8")
    parser.add_argument("--size", type=int, default=480, help="voc-seg's side (default 480, the paper's)")
    parser.add_argument("--n", type=int, default=4, help="images for voc-seg, last layer (default 4)")
    parser.add_argument("--n-all", type=int, default=2, help="images for voc-seg, every layer (default 2)")
    parser.add_argument("--maskcut-size", type=int, default=480, help="maskcut's side (default 480)")
    parser.add_argument("--maskcut-n", type=int, default=1, help="images for maskcut (default 1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        voc, images, annotations = write_sets(Path(tmp), max(args.n, args.n_all, args.maskcut_n))
        common = ["--model", args.model, "--device", args.device, "--restart", "--save-every", "1000"]
        runs = [("voc-seg", "last", args.n, args.size, ["voc-seg", "--root", str(voc), "--layers", "last",
                                                        "--batch", str(args.batch)]),
                ("voc-seg", "all", args.n_all, args.size, ["voc-seg", "--root", str(voc), "--layers", "all",
                                                           "--batch", str(args.batch)]),
                ("maskcut", "last", args.maskcut_n, args.maskcut_size,
                 ["maskcut", "--images", str(images), "--annotations", str(annotations), "--layers", "last"])]
        for command, layers, n, size, argv in runs:
            if n < 1:
                continue
            out = Path(tmp) / f"{command}-{layers}.json"
            seconds = timed([*argv, *common, "--img-size", str(size), "--limit", str(n), "--out", str(out)])
            total = VOC_VAL if command == "voc-seg" else COCO_VAL
            rate = n / seconds
            row = {"command": command, "layers": layers, "model": args.model, "img_size": size, "images": n,
                   "device": args.device, "seconds": round(seconds, 2), "images_per_s": round(rate, 4),
                   "projected_set": "VOC12 val" if command == "voc-seg" else "COCO val2017",
                   "projected_images": total, "projected_hours": round(total / rate / 3600, 2)}
            rows.append(row)
            print(f"{command:7s} layers {layers:4s} {args.model} {size} px, {n} image{'s' if n > 1 else ' '} on "
                  f"{args.device}: {seconds:6.1f} s, {rate:.3f} img/s -> {row['projected_set']} ({total} images): "
                  f"{row['projected_hours']:.1f} h", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
