"""How long the segmentation figures take: each viz command on a few generated 224 px images, fresh weights.

    python bench/viz.py                                         # crate_base (patch 16) at stride 8, 4 images
    python bench/viz.py --model crate_small_21k_patch8 --stride 4 --n 4

Wall time per command, start-up and image loading included (the model is built once per command, as the CLI
does); the figures go to a temporary folder. Sizes of the work: tokens per image and the affinity matrix of ncut.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="crate_base")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--commands", nargs="+", default=["attention", "pca", "ncut", "layers"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from crate_mae.viz.__main__ import main as viz_main

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.n):  # smooth random images, 300 × 260: resized and cropped like photographs
            small = rng.integers(0, 256, (13, 15, 3), dtype=np.uint8)
            Image.fromarray(small).resize((300, 260), Image.BICUBIC).save(folder / f"{i}.png")
        for command in args.commands:
            extra = ["--stride", str(args.stride)] if command != "layers" else []
            start = time.perf_counter()
            viz_main([command, "--model", args.model, "--images", str(folder), "--size", str(args.size),
                      "--out", str(Path(tmp) / "out"), "--device", args.device, *extra])
            print(f"{command:9s} {args.model} {args.size} px stride {args.stride if extra else '-'}, {args.n} images, "
                  f"{args.device}: "
                  f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
