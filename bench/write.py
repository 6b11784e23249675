"""Shard-writing throughput: `write_split` of ImageNet-sized JPEGs with a resize, with 1 worker and with all cores.

    python bench/write.py                      # 400 generated ~500 × 375 JPEGs, --resize 256, 1 and all workers
    python bench/write.py --images 2000 --workers 1 2 4 8

The images are bench/data.py's seeded ImageNet-like JPEGs, generated once into memory (not timed); the source
hands out their bytes, as an ImageFolder hands out files from the page cache. The target on a 2-core machine:
2 workers at ≥ 1.7 × the images/s of 1. Every row also checks that the set is byte-identical to the 1-worker one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import synth_jpeg  # noqa: E402  (bench/data.py)

from crate_mae.data.writer import Source, write_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    blobs = [synth_jpeg(i, seed=0) for i in range(args.images)]
    source = Source("bench", [str(c) for c in range(10)], len(blobs), lambda i: (blobs[i], i % 10))
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            out = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            manifest = write_split(source, out, "train", shard_size=100, resize=args.resize, workers=workers)
            seconds = time.perf_counter() - start
            shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
            reference = reference or shards
            rows.append({"workers": workers, "images": manifest.total, "seconds": seconds,
                         "images_per_s": manifest.total / seconds, "identical_to_first": shards == reference})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
        print(f"workers {row['workers']:>2}: {row['images_per_s']:7.1f} images/s ({row['seconds']:.1f} s), "
              f"{row['speedup']:.2f} × the first row, identical set: {row['identical_to_first']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
