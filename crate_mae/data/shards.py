"""The shard command line: write shard sets, write a manifest for existing shards, check a set.

    python -m crate_mae.data.shards write digits                          # the bundled demo → shards/digits
    python -m crate_mae.data.shards write cifar10 --root ~/data --download
    python -m crate_mae.data.shards write imagefolder --root /data/imagenet/train --split train \\
        --out shards/imagenet --resize 256 --quality 90
    python -m crate_mae.data.shards write folder --root ~/microscopy --out shards/micro    # unlabelled, any nesting
    python -m crate_mae.data.shards write hf --dataset ./my_saved_dataset --split train --label-column label
    python -m crate_mae.data.shards write imagenet --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out shards/imagenet --resize 256
    python -m crate_mae.data.shards manifest 'shards/in1k/train-{000000..001023}.tar'
    python -m crate_mae.data.shards manifest 'shards/in1k/train-*.tar.gz'     # gzip-compressed shards (or .tgz)
    python -m crate_mae.data.shards check shards/imagenet/val.json

See shards/README.md for the format.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from crate_mae.config import DataConfig
from crate_mae.data.manifest import (INFO_NAMES, Manifest, ShardError, ShardInfo, is_remote, resolve_shards,
                                    write_manifest)
from crate_mae.data.reader import ShardLoader, ShardStream
from crate_mae.data.stream import merged_members, read_samples
from crate_mae.errors import CrateError, report
from crate_mae.data.transforms import decode_rgb
from crate_mae.data.sources import cifar_source, digits_source, folder_source, imagefolder_source
from crate_mae.data.writer import Source, describe_skips, merge_parts, part_manifest_name, write_split

DIGITS_DIR = "shards/digits"


def ensure_digits(out: str | os.PathLike = DIGITS_DIR, *, size: int = 32) -> tuple[str, str]:
    """The bundled demo set's train and val manifests, written first if missing (about a second)."""
    out = Path(out)
    paths = (out / "train.json", out / "val.json")
    for split, path in zip(("train", "val"), paths):
        if not path.exists():
            write_split(digits_source(split, size=size), out, split, shard_size=250, overwrite=True)
    return str(paths[0]), str(paths[1])


def ensure_torchvision(name: str, root: str, *, download: bool, out: str | os.PathLike | None = None) -> tuple[str, str]:
    """A torchvision set (cifar10 / cifar100) as shards, written once to shards/<name>; its manifests."""
    out = Path(out or f"shards/{name}")
    paths = (out / "train.json", out / "val.json")
    for split, path in zip(("train", "val"), paths):
        if not path.exists():
            write_split(cifar_source(name, root, split, download=download), out, split, overwrite=True)
    return str(paths[0]), str(paths[1])


def count_manifest(spec: str, split: str | None = None, *, read: bool = False) -> Manifest:
    """A manifest for existing shards, by reading every sample key (classes unknown: left empty), or, for a published
    set whose `_info.json` gives the counts (data/manifest.py), from it without reading (unless `read`).

    The shards are read as training reads them (`read_samples`: gzip-compressed ones too, each checked to its tar's
    end-of-archive marker, a failed remote read retried with `DataConfig`'s defaults), so a count is the count a
    reader will find. A remote shard is listed by its full URL, without a byte size. `labelled` is whether any sample
    carries a `cls`."""
    shards = resolve_shards(spec)
    name = os.path.basename(shards.urls[0])
    split = split or name.rsplit("-", 1)[0]
    info = shards.manifest
    if info is not None and info.source.endswith(INFO_NAMES) and not read:
        return Manifest(split=split, shards=[ShardInfo(s.name, s.samples, None if is_remote(u) else os.path.getsize(u))
                                             for u, s in zip(shards.urls, info.shards)],
                        classes=info.classes, source=info.source)
    defaults = DataConfig()
    infos, labelled = [], False
    for url in shards.urls:
        count = 0
        for sample in read_samples([url], spec=spec, shards=1, retries=defaults.read_retries,
                                   wait=defaults.retry_wait):
            merged = merged_members(sample)
            if merged:
                raise ShardError(f"{url}/{sample['__key__']}: holds the members {', '.join(merged[:4])}: samples whose "
                                 f"keys contain a dot merge into one (webdataset splits member names at the first "
                                 f"dot), so no count would be true; rewrite the shards with keys without dots")
            count += 1
            labelled = labelled or "cls" in sample
        remote = is_remote(url)
        infos.append(ShardInfo(url if remote else os.path.basename(url), count, None if remote else os.path.getsize(url)))
    return Manifest(split=split, shards=infos, source=spec, labelled=labelled)


def verify_manifest(spec: str) -> int:
    """Count every shard of a manifest's set and compare with the manifest: 0 if all agree, else 1 (printed)."""
    shards = resolve_shards(spec)
    if shards.samples is None:
        raise ShardError(f"{spec}: no manifest to verify; write one with python -m crate_mae.data.shards manifest")
    counted = count_manifest(spec, read=True)
    wrong = [(url, listed, info.samples) for url, listed, info in zip(shards.urls, shards.samples, counted.shards)
             if listed != info.samples]
    for url, listed, real in wrong:
        print(f"{url}: {real} samples, the manifest says {listed}")
    print(f"{spec}: {len(shards.urls) - len(wrong)} of {len(shards.urls)} shards agree with the manifest "
          f"({counted.total} samples counted, {shards.total} listed)")
    return 1 if wrong else 0


def _decode_only(data: bytes, rng: object = None) -> torch.Tensor:
    """A full decode, for `check`: a corrupt or truncated image raises here."""
    decode_rgb(data)
    return torch.zeros(0)


def _sources(args: argparse.Namespace) -> dict[str, Source]:
    """The split(s) that `write SOURCE` writes, by split name; a missing option is a ShardError naming it."""
    def need(flag: str, what: str) -> str:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if not value:
            raise ShardError(f"{flag} is required for {args.source} ({what})")
        return value

    if args.source == "digits":
        return {split: digits_source(split, size=args.size) for split in ("train", "val")}
    if args.source in ("cifar10", "cifar100"):
        root = need("--root", "where torchvision keeps it")
        return {split: cifar_source(args.source, root, split, download=args.download) for split in ("train", "val")}
    if args.source == "imagefolder":
        return {args.split: imagefolder_source(need("--root", "a folder of class folders"))}
    if args.source == "folder":
        return {args.split: folder_source(need("--root", "a folder of images, in any nesting"), files=args.files)}
    if args.source == "hf":
        from crate_mae.data.hf import hf_source

        dataset = need("--dataset", "a save_to_disk folder, Parquet files, or a Hub name")
        return {args.split: hf_source(dataset, split=args.split, image_column=args.image_column,
                                      label_column=args.label_column)}
    from crate_mae.data.imagenet import imagenet_sources

    if not (args.train or args.val):
        raise ShardError("imagenet needs --train ILSVRC2012_img_train.tar and/or --val ILSVRC2012_img_val.tar")
    return imagenet_sources(train=args.train, val=args.val, devkit=args.devkit, val_labels=args.val_labels)


def _write(args: argparse.Namespace) -> None:
    common = dict(shard_size=args.shard_size, shard_bytes=int(args.shard_bytes), resize=args.resize,
                  quality=args.quality, seed=args.seed, overwrite=args.overwrite, workers=args.workers,
                  num_nodes=args.num_nodes, node_rank=args.node_rank)
    out = args.out or f"shards/{args.source}"
    for split, source in _sources(args).items():
        manifest = write_split(source, out, split, **common)
        where = f"{out}/{split}.json" if args.num_nodes == 1 else \
            f"{out}/{part_manifest_name(split, args.node_rank, args.num_nodes)} (then: manifest --merge {out})"
        labels = f"{manifest.num_classes} classes" if manifest.labelled else "no labels"
        print(f"{where}: {manifest.total} samples in {len(manifest.shards)} shards, {labels}"
              + (f"; skipped {describe_skips(manifest.skips)}" if manifest.skipped else ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crate_mae.data.shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    _write_arguments(sub.add_parser("write", help="write a shard set and its manifest"))
    counting = sub.add_parser("manifest", help="count the samples of existing shards and write <folder>/<split>.json")
    counting.add_argument("spec", help="brace pattern or glob of local shards (.tar, or gzip-compressed .tar.gz / "
                                       ".tgz)")
    counting.add_argument("--split", help="split name (default: the shard name before its last '-')")
    counting.add_argument("--merge", action="store_true", help="SPEC is a folder: join the part manifests that "
                                                                "`write --num-nodes K` left there into <split>.json")
    counting.add_argument("--verify", action="store_true", help="count every shard of SPEC (a manifest) against the "
                                                                 "manifest and report the shards that disagree; write "
                                                                 "nothing")
    sub.add_parser("check", help="read every sample of a shard set and report the bad ones").add_argument("spec")
    return parser


def _write_arguments(w: argparse.ArgumentParser) -> None:
    """The options of `write`."""
    w.add_argument("source", choices=["digits", "cifar10", "cifar100", "imagefolder", "folder", "hf", "imagenet"])
    w.add_argument("--root", help="dataset folder (cifar: torchvision's root; imagefolder: root/<class>/<image>; "
                                  "folder: unlabelled images at any depth)")
    w.add_argument("--out", help="output folder (default: shards/<source>)")
    w.add_argument("--split", default="train", help="split name for imagefolder and folder; for hf, the dataset's "
                                                    "split, written under its own name (default: train)")
    w.add_argument("--files", help="folder: a file of paths (one a line, relative to --root) to write instead of "
                                   "every image under --root")
    w.add_argument("--dataset", help="hf: a save_to_disk folder, a Parquet file, folder or glob, or a Hub name")
    w.add_argument("--image-column", default="image", help="hf: the column of the images (default: image)")
    w.add_argument("--label-column", help="hf: the column of the labels (default: none, an unlabelled set)")
    w.add_argument("--train", help="imagenet: ILSVRC2012_img_train.tar (a tar of per-class tars)")
    w.add_argument("--val", help="imagenet: ILSVRC2012_img_val.tar")
    w.add_argument("--devkit", help="imagenet: ILSVRC2012_devkit_t12.tar.gz (the val labels)")
    w.add_argument("--val-labels", help="imagenet: a val labels file instead of the devkit (a WordNet id a line in "
                                        "file order, '<file> <wnid>' lines, or LOC_val_solution.csv)")
    w.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs internet)")
    w.add_argument("--size", type=int, default=32, help="digits: image side in pixels (default: 32)")
    w.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: 10000; digits: 250)")
    w.add_argument("--shard-bytes", type=float, default=1e9, help="bytes per shard at most (default: 1e9)")
    w.add_argument("--resize", type=int, default=None, help="resize the shorter side to N and store JPEG")
    w.add_argument("--quality", type=int, default=90, help="JPEG quality with --resize (default: 90)")
    w.add_argument("--seed", type=int, default=0, help="seed of the sample order (default: 0)")
    w.add_argument("--overwrite", action="store_true", help="replace an existing split")
    w.add_argument("--num-nodes", type=int, default=1, help="machines writing the split together (default: 1)")
    w.add_argument("--node-rank", type=int, default=0, help="this machine's part, 0 … num-nodes − 1")
    w.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes that load and re-encode the images (default: all cores); the set is the same "
                        "for any number")


def _manifest(args: argparse.Namespace) -> int:
    """`manifest`: count a set into <folder>/<split>.json, merge the parts of several machines, or verify one."""
    if args.verify:
        return verify_manifest(args.spec)
    if args.merge:
        merged = merge_parts(args.spec, args.split or "train")
        print(f"{args.spec}/{merged.split}.json: {merged.total} samples in {len(merged.shards)} shards")
        return 0
    if is_remote(args.spec):  # the manifest is written beside the shards: remote ones have no folder here
        raise ShardError(f"{args.spec}: the manifest command counts local shards (a brace pattern or glob of "
                         f"files, .tar, .tar.gz or .tgz); for remote shards write <split>.json by hand or "
                         f"set data.train_samples")
    manifest = count_manifest(args.spec, args.split)
    path = Path(resolve_shards(args.spec).urls[0]).parent / f"{manifest.split}.json"
    write_manifest(manifest, path)
    print(f"{path}: {manifest.total} samples in {len(manifest.shards)} shards"
          + (f", the counts of {manifest.source} (manifest --verify {path} reads them all)"
             if manifest.source.endswith(INFO_NAMES) else ""))
    return 0


def _check(spec: str) -> int:
    """`check`: read and fully decode every sample of a set; every bad one is logged by name. 1 if any is bad."""
    # Not a model's evaluation loader (`eval_loader`): the same stream, with a full decode and no resize.
    stream = ShardStream(resolve_shards(spec), _decode_only, DataConfig(batch_size=256, num_workers=0,
                                                                        max_bad_fraction=1.0), train=False)
    loader = ShardLoader(stream, named=None)
    for _ in loader:
        pass
    print(f"{spec}: {loader.seen} samples, {loader.bad} bad")
    return 1 if loader.bad else 0


def main(argv: list[str] | None = None) -> int:
    """The command line; an expected failure ends in one line `error: ...` and its exit status (errors.report)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "write":
            args.shard_size = args.shard_size or (250 if args.source == "digits" else 10_000)
            _write(args)
            return 0
        return _manifest(args) if args.command == "manifest" else _check(args.spec)
    except CrateError as err:  # ours: ShardError, DataError, WriteError, ...
        return report(err)
    except OSError as err:  # a disk or folder at fault
        return report(CrateError(str(err)))


if __name__ == "__main__":
    sys.exit(main())
