"""The recipe of the README's emergent-segmentation figures: a short CRATE-MAE run of our own on the two photographs
scikit-learn ships (`sklearn.datasets.load_sample_images`: a Chinese temple, a flower), then the viz commands.

    python docs/figures.py                      # about 5 min on 2 CPU cores; writes docs/emergence-*.png
    python docs/figures.py --skip-training      # the figures again from runs/photos/encoder.pth

1. 1,472 random crops (each 12–45 % of the photo's shorter side, flipped at random) resized to 32 px, written as
   an image folder and then shards (`python -m crate_mae.data.shards write imagefolder`);
2. `python pretrain.py` with the demo model (912k parameters, patch 4) on those shards, the demo recipe;
3. `attention`, `pca` and `ncut` of its encoder on the two photos at 96 px, stride 2 (47 × 47 tokens).

These are figures of that small model, which has seen two pictures: the released checkpoints give the paper's.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "photos-data"
RUN = ROOT / "runs" / "photos"


def photos(out: Path) -> list[Path]:
    """The two sample photographs as PNG files (427 × 640 RGB)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in zip(data.filenames, data.images):
        path = out / (Path(name).stem + ".png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def crops(sources: list[Path], out: Path, *, count: int, size: int = 32, seed: int = 0) -> None:
    """`count` random square crops of the photos at `size` px, in one class folder (pretraining reads no labels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in sources]
    folder = out / "all"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = images[i % len(images)]
        short = min(image.size)
        side = int(short * rng.uniform(0.12, 0.45))
        x, y = rng.integers(0, image.size[0] - side + 1), rng.integers(0, image.size[1] - side + 1)
        crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:05d}.png")


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-training", action="store_true", help="reuse runs/photos/encoder.pth")
    args = parser.parse_args()
    pictures = photos(WORK / "photos")
    if not args.skip_training:
        crops(pictures, WORK / "crops", count=1472)
        run("-m", "crate_mae.data.shards", "write", "imagefolder", "--root", str(WORK / "crops"), "--out",
            str(WORK / "shards"), "--shard-size", "500", "--overwrite")
        shutil.rmtree(RUN, ignore_errors=True)  # a fresh run, not a resume of an older one
        run("pretrain.py", "--set", f"data.train_shards={WORK / 'shards' / 'train.json'}", "run.name=photos")
    encoder, images = str(RUN / "encoder.pth"), [str(p) for p in pictures]
    common = ["--checkpoint", encoder, "--images", *images, "--size", "96", "--stride", "2"]
    run("-m", "crate_mae.viz", "attention", *common, "--out", str(ROOT / "docs" / "emergence-attention.png"))
    run("-m", "crate_mae.viz", "pca", *common, "--out", str(ROOT / "docs" / "emergence-pca.png"))
    run("-m", "crate_mae.viz", "ncut", *common, "--out", str(ROOT / "docs" / "emergence-ncut.png"))


if __name__ == "__main__":
    main()
