"""Shard-writing throughput: `write_split` of ImageNet-sized JPEGs, by number of workers, or by source.

    python bench/write.py                      # 400 generated ~500 × 375 JPEGs, --resize 256, 1 and all workers
    python bench/write.py --images 2000 --workers 1 2 4 8
    python bench/write.py --sources folder imagefolder hf parquet imagenet --images 3000   # each source

The images are bench/data.py's seeded ImageNet-like JPEGs, generated once (not timed). By workers: the source hands
out their bytes from memory, as an ImageFolder hands out files from the page cache. The target on a 2-core machine:
2 workers at ≥ 1.7 × the images/s of 1. Every row also checks that the set is byte-identical to the 1-worker one.

By source (`--sources`): the same images laid out as each source takes them, on disk: a folder of unlabelled images
three levels deep (`write folder`), class folders (`write imagefolder`), a Hugging Face `save_to_disk` folder with a
ClassLabel column (`hf`) and the same rows as one Parquet file (`parquet`; `write hf`, both need the `datasets`
library; the Parquet file's conversion to `datasets`' Arrow cache is part of building its source), and ImageNet's
archives (`write imagenet`: a tar of per-class tars, 10 classes). Each row times building the source (listing,
indexing, converting: `list_s`) and writing with all cores, once storing the images as they are and once with
`--resize 256`; the time for ImageNet-1k's 1,281,167 images at that speed is printed beside it. The inputs were just
written, so they are read from the page cache: a cold disk adds its own read time.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import synth_jpeg  # noqa: E402  (bench/data.py)

from crate_mae.data.writer import Source, write_split  # noqa: E402

IMAGENET_TRAIN = 1_281_167
CLASSES = [f"n{1000000 + 7919 * c:08d}" for c in range(10)]  # WordNet-id-like class names


def by_workers(blobs: list[bytes], workers: list[int], resize: int | None) -> list[dict]:
    source = Source("bench", [str(c) for c in range(10)], len(blobs), lambda i: (blobs[i], i % 10))
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            out = Path(tmp) / f"w{n}"
            start = time.perf_counter()
            manifest = write_split(source, out, "train", shard_size=100, resize=resize, workers=n)
            seconds = time.perf_counter() - start
            shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
            reference = reference or shards
            rows.append({"workers": n, "images": manifest.total, "seconds": seconds,
                         "images_per_s": manifest.total / seconds, "identical_to_first": shards == reference})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
        print(f"workers {row['workers']:>2}: {row['images_per_s']:7.1f} images/s ({row['seconds']:.1f} s), "
              f"{row['speedup']:.2f} × the first row, identical set: {row['identical_to_first']}")
    return rows


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def lay_out(kind: str, blobs: list[bytes], root: Path) -> Callable[[], Source]:
    """Write the images as the source `kind` takes them under `root` (not timed); a maker of its Source (timed)."""
    label = [i % len(CLASSES) for i in range(len(blobs))]
    if kind == "folder":
        from crate_mae.data.sources import folder_source

        for i, blob in enumerate(blobs):
            folder = root / f"site{i % 4}" / f"day{i % 7}" / f"cam{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:07d}.jpg").write_bytes(blob)
        return lambda: folder_source(str(root))
    if kind == "imagefolder":
        from crate_mae.data.sources import imagefolder_source

        for i, blob in enumerate(blobs):
            (root / CLASSES[label[i]]).mkdir(parents=True, exist_ok=True)
            (root / CLASSES[label[i]] / f"{CLASSES[label[i]]}_{i}.JPEG").write_bytes(blob)
        return lambda: imagefolder_source(str(root))
    if kind in ("hf", "parquet"):
        import datasets

        from crate_mae.data.hf import hf_source

        datasets.disable_progress_bars()
        datasets.config.HF_DATASETS_CACHE = str(root / "cache")  # Parquet's Arrow copy: made here, on the clock
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
        data = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs], "label": label},
                                          features=features)
        if kind == "parquet":
            root.mkdir(parents=True, exist_ok=True)
            data.to_parquet(str(root / "train.parquet"))
            return lambda: hf_source(str(root / "train.parquet"), split="train", label_column="label")
        data.save_to_disk(str(root / "saved"))
        return lambda: hf_source(str(root / "saved"), split="train", label_column="label")
    if kind == "imagenet":
        from crate_mae.data.imagenet import imagenet_sources

        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
            for c, wnid in enumerate(CLASSES):
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as tar:
                    for i in range(c, len(blobs), len(CLASSES)):
                        _tar_add(tar, f"{wnid}_{i}.JPEG", blobs[i])
                _tar_add(outer, f"{wnid}.tar", inner.getvalue())
        return lambda: imagenet_sources(train=str(root / "ILSVRC2012_img_train.tar"))["train"]
    raise SystemExit(f"--sources: unknown source {kind!r} (folder, imagefolder, hf, parquet, imagenet)")


def by_source(blobs: list[bytes], kinds: list[str], resize: int, workers: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            make = lay_out(kind, blobs, Path(tmp) / kind)
            start = time.perf_counter()
            source = make()  # once: a second Parquet source would find the first one's Arrow copy
            listed = time.perf_counter() - start
            for size in (None, resize):
                out = Path(tmp) / f"{kind}-out-{size}"
                start = time.perf_counter()
                manifest = write_split(source, out, "train", shard_size=500, resize=size, workers=workers)
                seconds = time.perf_counter() - start
                rate = manifest.total / seconds
                row = {"source": kind, "resize": size, "images": manifest.total, "workers": workers,
                       "list_s": listed, "seconds": seconds, "images_per_s": rate,
                       "imagenet_train_hours": IMAGENET_TRAIN * (1 / rate + listed / manifest.total) / 3600}
                rows.append(row)
                print(f"{kind:>11} {'as is' if size is None else f'resize {size}':>10}: {rate:7.1f} images/s "
                      f"({seconds:.1f} s; source built in {listed:.2f} s), ImageNet-1k train at this speed: "
                      f"{row['imagenet_train_hours']:.2f} h")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="worker counts to compare (with --sources: the first is used; default there: all cores)")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--sources", nargs="+", help="time each source instead: folder imagefolder hf parquet imagenet")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    blobs = [synth_jpeg(i, seed=0) for i in range(args.images)]
    if args.sources:
        workers = args.workers[0] if "--workers" in (argv if argv is not None else sys.argv) else os.cpu_count() or 1
        rows = by_source(blobs, args.sources, args.resize, workers)
    else:
        rows = by_workers(blobs, args.workers, args.resize)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
