"""Writing shard sets: a `Source` (data/sources.py, hf.py, imagenet.py) → tar shards + manifest.

Each sample is `{__key__, jpg | png, cls}` (no `cls` for an unlabelled source): the source's own bytes when it is
already a JPEG (or PNG), re-encoded otherwise; with `resize`, images whose shorter side exceeds it are resized to it
and stored as JPEG of the given quality, as FFCV does, so that every later decode is cheaper. The order is shuffled
with a seed so each shard mixes classes. What is no usable image is skipped and counted by reason (`Skip`). A shard
is written to a temp file and renamed when complete; the manifest is written last, so an interrupted write never
leaves a set that looks complete.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import webdataset as wds
from PIL import Image

from crate_mae.atomic import AtomicFile, atomic_path
from crate_mae.data.manifest import Manifest, ShardError, ShardInfo, write_manifest

log = logging.getLogger("crate_mae.data")

JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


class Skip(Exception):
    """Raised by a Source's `load` for an item that is no sample (not an image, a file gone, a row without an image):
    the writer counts it under `reason` (a few words, the same for every item of its kind), logs `detail` and goes
    on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Source:
    """A split of a dataset: `load(i)` gives (encoded bytes, label) for i < count, or raises `Skip`.

    An unlabelled source (`labelled` False: a folder of images nobody has labelled) gives None for a label, and its
    shards carry no `cls`. `skips` counts, by reason, what its listing passed over before any load (hidden files,
    broken links): the manifest adds them to what the writer skips."""

    name: str
    classes: list[str]
    count: int
    load: Callable[[int], tuple[bytes, int | None]]
    describe: Callable[[int], str] = str  # sample i in words, for messages
    labelled: bool = True
    skips: dict[str, int] = field(default_factory=dict)


UNREADABLE = "unreadable image"  # the skip reason of an image PIL cannot decode
TOO_LARGE = "image too large"  # past PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS × 2)
UNREADABLE_FILE = "unreadable file"  # gone since the listing, no permission, an I/O error


def prepare(data: bytes, *, resize: int | None, quality: int) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes to store, extension, (width, height)): original JPEG/PNG bytes unless a resize or format needs re-encoding."""
    img = Image.open(io.BytesIO(data))
    size = img.size
    if resize is not None and min(size) > resize:
        scale = resize / min(size)
        size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        img = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg", size
    if data.startswith(JPEG_MAGIC):
        return data, "jpg", size
    if data.startswith(PNG_MAGIC):
        return data, "png", size
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")  # other formats: stored losslessly as PNG
    return buf.getvalue(), "png", size


class ShardWriter:
    """Writes `<split>-NNNNNN.tar` shards of at most `max_count` samples and about `max_bytes` bytes."""

    def __init__(self, folder: Path, split: str, *, max_count: int, max_bytes: int) -> None:
        self.folder, self.split, self.max_count, self.max_bytes = folder, split, max_count, max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):06d}.tar"
        self._target = AtomicFile(self.folder / self._name)  # only a complete shard gets its real name
        self._file = open(self._target.tmp, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)  # mtime 0: the same input gives the same bytes
        self._count, self._bytes = 0, 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._file.close()
        self._target.commit()
        self.shards.append(ShardInfo(self._name, self._count, os.path.getsize(self.folder / self._name)))
        self._tar = None

    def write(self, key: str, data: bytes, ext: str, label: int | None) -> None:
        """One sample; `label` None (an unlabelled set) writes no `cls`."""
        if "." in key or "/" in key:  # webdataset splits member names at the first dot: samples would merge
            raise ValueError(f"sample key {key!r} contains a dot or a slash; shard keys must not")
        if self._tar is not None and (self._count >= self.max_count or self._bytes + len(data) > self.max_bytes):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, ext: data, **({} if label is None else {"cls": str(label).encode()})})
        self._count += 1
        self._bytes += len(data)

    def abort(self) -> None:
        """Drop the shard being written (an interrupted write leaves only complete shards, and no manifest)."""
        if self._tar is not None:
            self._tar.close()  # finish the tar stream, so nothing is flushed later into a closed file
            self._file.close()
            self._target.abort()
            self._tar = None

    @property
    def empty(self) -> bool:
        """Nothing written yet: no finished shard and none open."""
        return not self.shards and self._tar is None

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards


_JOB: tuple[Source, int | None, int] | None = None  # (source, resize, quality) of the pool's workers (fork)
Prepared = tuple[int, "bytes | None", str, "tuple[int, int]", "int | None", str, str]


def _load_prepared(i: int) -> Prepared:
    """Sample i of the job's source, loaded and prepared: (i, bytes, ext, size, label, skip reason, detail); bytes is
    None, and the reason says why, for an item skipped (`Skip` from the source, or an image PIL cannot decode)."""
    source, resize, quality = _JOB
    try:
        data, label = source.load(i)
    except Skip as skip:
        return i, None, "", (0, 0), None, skip.reason, skip.detail
    except OSError as err:  # a file gone since the listing, no permission, an I/O error: that item, not the write
        return i, None, "", (0, 0), None, UNREADABLE_FILE, f"{type(err).__name__}: {err}"
    try:
        data, ext, size = prepare(data, resize=resize, quality=quality)
    except Image.DecompressionBombError as err:
        return i, None, "", (0, 0), label, TOO_LARGE, str(err)
    except Exception as err:  # an unreadable source image: skipped by the writer, counted, named
        return i, None, "", (0, 0), label, UNREADABLE, f"{type(err).__name__}: {err}"
    return i, data, ext, size, label, "", ""


def _prepared(source: Source, order: list[int], *, resize: int | None, quality: int,
              workers: int) -> Generator[Prepared, None, None]:
    """The prepared samples in `order`, loaded and re-encoded by `workers` processes (in order, whatever their
    number: the shards are the same with 1 worker or 96)."""
    global _JOB
    _JOB = (source, resize, quality)
    try:
        if workers <= 1:
            yield from map(_load_prepared, order)
            return
        import multiprocessing

        # fork: the workers inherit the source (a closure over a folder listing or a dataset) without pickling it
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(_load_prepared, order, chunksize=32)
    finally:
        _JOB = None


def part_manifest_name(split: str, node_rank: int, num_nodes: int) -> str:
    """The manifest of one machine's part of a split written on `num_nodes` machines."""
    return f"{split}-part-{node_rank:03d}-of-{num_nodes:03d}.json"


def write_split(source: Source, out: str | os.PathLike, split: str, *, shard_size: int = 10_000,
                shard_bytes: int = 1 << 30, resize: int | None = None, quality: int = 90, seed: int = 0,
                overwrite: bool = False, workers: int = 1, num_nodes: int = 1, node_rank: int = 0) -> Manifest:
    """Write one split of `source` to `out/<split>-NNNNNN.tar` and its manifest `out/<split>.json`.

    `workers` processes load and re-encode the images; this process writes the shards in order, so the set
    (every shard's contents, and the manifest) is identical whatever the number of workers. A rerun of an
    interrupted write (same source and parameters, kept in `.<split>-write.json` until the manifest is written)
    keeps its finished shards and continues after them, to the same set; `overwrite` starts again.
    With `num_nodes` > 1 this machine writes its `node_rank`-th share of the (shuffled) samples as
    `<split>-<rank>-NNNNNN.tar` and a part manifest; `merge_parts` (`manifest --merge`) joins the parts.
    """
    if not 0 <= node_rank < num_nodes:
        raise ShardError(f"--node-rank {node_rank} is not in 0 … {num_nodes - 1} (--num-nodes {num_nodes})")
    prefix = split if num_nodes == 1 else f"{split}-{node_rank:03d}"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / (f"{split}.json" if num_nodes == 1 else part_manifest_name(split, node_rank, num_nodes))
    params_path = folder / f".{prefix}-write.json"
    params = {"source": source.name, "count": source.count, "shard_size": shard_size, "shard_bytes": shard_bytes,
              "resize": resize, "quality": quality, "seed": seed, "num_nodes": num_nodes, "node_rank": node_rank}
    finished = _finished_shards(folder, prefix, split, manifest_path, params_path, overwrite=overwrite)
    order = list(range(source.count))
    random.Random(seed).shuffle(order)  # every shard mixes classes
    order = order[source.count * node_rank // num_nodes: source.count * (node_rank + 1) // num_nodes]  # this machine's
    writer, sizes = ShardWriter(folder, prefix, max_count=shard_size, max_bytes=shard_bytes), set()
    # what the listing passed over counts once, in machine 0's part; what a load skips, in the part that loads it
    skips: Counter[str] = Counter(source.skips if node_rank == 0 else {})
    start = 0
    if finished:  # an interrupted write of the same set: keep its finished shards, continue after them
        start = _continue(writer, finished, params, json.loads(params_path.read_text()), order, sizes, skips,
                          source=source, resize=resize, quality=quality)
        log.info("%s %s: continuing after %d finished shards (%d samples)", folder, split, len(finished), start)
    write_manifest_params(params_path, params)
    _write_samples(writer, _prepared(source, order[start:], resize=resize, quality=quality, workers=workers), source,
                   skips, sizes, start=start, where=f"{folder} {split}")
    fixed = list(sizes.pop()) if len(sizes) == 1 else None
    if writer.empty:
        raise ShardError(f"{source.name}: no image to write in {split} ({len(order)} items, every one skipped: "
                         f"{describe_skips(skips)})")
    manifest = Manifest(split=split, shards=writer.finish(), classes=source.classes, image_size=fixed,
                        source=source.name, skipped=sum(skips.values()), labelled=source.labelled,
                        skips=dict(sorted(skips.items())))
    write_manifest(manifest, manifest_path)
    params_path.unlink(missing_ok=True)  # the set is complete: nothing to continue
    return manifest


def _finished_shards(folder: Path, prefix: str, split: str, manifest_path: Path, params_path: Path, *,
                     overwrite: bool) -> list[Path]:
    """The finished shards of an interrupted write to continue (none: a new write, the folder's stale shards removed);
    a split already written is a ShardError unless `overwrite`. The shard an interruption was writing is removed."""
    shards = sorted(p for p in folder.glob(f"{prefix}-*.tar") if p.name[len(prefix) + 1:-4].isdigit())
    for path in folder.glob(f".{prefix}-*.tar.*.tmp"):
        path.unlink(missing_ok=True)
    if not overwrite and (manifest_path.exists() or (shards and not params_path.exists())):
        raise ShardError(f"{folder}: split '{split}' exists already; pass overwrite (--overwrite) to replace it")
    if overwrite or not shards:
        for path in shards + [manifest_path]:
            path.unlink(missing_ok=True)  # stale shards of an earlier, longer or interrupted write
        return []
    return shards


def _write_samples(writer: ShardWriter, prepared: Generator[Prepared, None, None], source: Source,
                   skips: Counter[str], sizes: set, *, start: int, where: str) -> None:
    """Writes the prepared samples in order, counting and logging each skipped one. An interruption (any exception,
    Ctrl-C included) drops the shard in progress, so that only complete shards keep their names, and ends the
    preparing processes."""
    try:
        for n, (i, data, ext, size, label, reason, detail) in enumerate(prepared, start):
            if data is None:
                skips[reason] += 1
                log.warning("skipped %s: %s", source.describe(i), f"{reason} ({detail})" if detail else reason)
                continue
            sizes.add(size)
            writer.write(f"{i:09d}", data, ext, label)
            if (n + 1) % 10_000 == 0:
                log.info("%s: %d / %d samples", where, n + 1, source.count)
    except BaseException:
        writer.abort()
        prepared.close()
        raise


def merge_parts(folder: str | os.PathLike, split: str) -> Manifest:
    """Join the part manifests of a split written on several machines into `<folder>/<split>.json`: every part must
    be there (0 … K − 1 of the same K) and of the same source and classes; shards are listed part by part."""
    folder = Path(folder)
    parts = sorted(folder.glob(f"{split}-part-*-of-*.json"))
    if not parts:
        raise ShardError(f"{folder}: no part manifests {split}-part-RRR-of-KKK.json to merge")
    totals = {p.name.rsplit("-of-", 1)[1][:-5] for p in parts}
    if len(totals) != 1:
        raise ShardError(f"{folder}: part manifests of different machine counts ({', '.join(sorted(totals))})")
    num_nodes = int(totals.pop())
    missing = [r for r in range(num_nodes) if not (folder / part_manifest_name(split, r, num_nodes)).exists()]
    if missing:
        raise ShardError(f"{folder}: the parts of machines {', '.join(map(str, missing))} of {num_nodes} are not "
                         f"written yet ({part_manifest_name(split, missing[0], num_nodes)})")
    from crate_mae.data.manifest import read_manifest

    manifests = [read_manifest(folder / part_manifest_name(split, r, num_nodes)) for r in range(num_nodes)]
    first = manifests[0]
    for r, m in enumerate(manifests):
        if (m.classes, m.source, m.labelled) != (first.classes, first.source, first.labelled):
            raise ShardError(f"{folder / part_manifest_name(split, r, num_nodes)}: another source or class list than "
                             f"part 0's")
    sizes = {tuple(m.image_size) if m.image_size else None for m in manifests}
    merged = Manifest(split=split, shards=[s for m in manifests for s in m.shards], classes=first.classes,
                      image_size=list(sizes.pop()) if len(sizes) == 1 and None not in sizes else None,
                      source=first.source, skipped=sum(m.skipped for m in manifests), labelled=first.labelled,
                      skips=dict(sorted(sum((Counter(m.skips) for m in manifests), Counter()).items())))
    write_manifest(merged, folder / f"{split}.json")
    return merged


def write_manifest_params(path: Path, params: dict) -> None:
    """The parameters of a write in progress, so that a rerun continues only the same write."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(params))


def _continue(writer: ShardWriter, shards: list[Path], params: dict, saved: dict, order: list[int], sizes: set,
              skips: Counter[str], *, source: Source, resize: int | None, quality: int) -> int:
    """Take over the finished shards of an interrupted write: the position in `order` to continue from. Each finished
    shard was closed when the next sample arrived, so the next shard starts exactly where the uninterrupted write's
    would: the set comes out the same. The items skipped before that position (the ones in `order` before it that no
    shard holds) are loaded again to count them under their reasons in `skips`, as the uninterrupted write did."""
    for key, value in params.items():
        if saved.get(key) != value:
            raise ShardError(f"{shards[0].parent}: an interrupted write with {key}={saved.get(key)!r} is there; this one "
                             f"has {value!r}: rerun it as it was, or pass --overwrite to start again")
    names = [f"{writer.split}-{n:06d}.tar" for n in range(len(shards))]
    if [p.name for p in shards] != names:
        raise ShardError(f"{shards[0].parent}: the finished shards are not {names[0]} … {names[-1]} in a row; "
                         f"pass --overwrite to start again")
    written: set[int] = set()
    for path in shards:
        count = 0
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            count += 1
            written.add(int(sample["__key__"]))
            data = sample.get("jpg", sample.get("png"))
            sizes.add(Image.open(io.BytesIO(data)).size)
        writer.shards.append(ShardInfo(path.name, count, path.stat().st_size))
    where = {i: k for k, i in enumerate(order)}
    position = max(where[i] for i in written) + 1
    for reason in _reasons(source, [i for i in order[:position] if i not in written], resize=resize, quality=quality):
        skips[reason] += 1
    return position


def _reasons(source: Source, items: list[int], *, resize: int | None, quality: int) -> Iterator[str]:
    """The skip reasons of `items` (each one skipped by the interrupted write), found by loading them again."""
    for _, _, _, _, _, reason, _ in _prepared(source, items, resize=resize, quality=quality, workers=1):
        yield reason or "gone since"  # skipped then, readable now: still not in the set, so still counted


def describe_skips(skips: dict[str, int]) -> str:
    """'3 not images, 1 hidden file': the skips of a write, in words, most first."""
    most_first = sorted(skips.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{n} × {reason}" for reason, n in most_first) or "none"
